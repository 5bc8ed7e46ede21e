"""Confident learning: thresholds, confident joint, calibration, label issues."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnstress.xai.label_errors import (calibrate_confident_joint, confident_joint, find_label_issues,
                                        per_class_thresholds)

# Six examples, three classes. Example 3 (given 1) is confidently class 0 and
# example 5 (given 2) confidently class 1; example 1 is above no threshold.
PROBS = np.array([
    [0.90, 0.05, 0.05],   # 0: given 0
    [0.50, 0.45, 0.05],   # 1: given 0
    [0.10, 0.80, 0.10],   # 2: given 1
    [0.75, 0.20, 0.05],   # 3: given 1  <- really 0
    [0.05, 0.15, 0.80],   # 4: given 2
    [0.05, 0.55, 0.40],   # 5: given 2  <- really 1
])
LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_thresholds_and_confident_joint_by_hand():
    t = per_class_thresholds(PROBS, LABELS)
    # t_j = mean of p_j over the examples given label j
    np.testing.assert_allclose(t, [(0.90 + 0.50) / 2, (0.80 + 0.20) / 2, (0.80 + 0.40) / 2])  # 0.7, 0.5, 0.6
    cj = confident_joint(PROBS, LABELS)
    # 0: .90 >= .7 -> col 0.  1: .50 < .7, .45 < .5, .05 < .6 -> not counted.
    # 2: .80 >= .5 -> col 1.  3: .75 >= .7 (.20 < .5) -> col 0.
    # 4: .80 >= .6 -> col 2.  5: .55 >= .5 (.40 < .6) -> col 1.
    np.testing.assert_array_equal(cj, [[1, 0, 0],
                                       [1, 1, 0],
                                       [0, 1, 1]])
    assert cj.dtype == np.int64
    # calibrated: rows scaled to the label counts (2, 2, 2)
    np.testing.assert_array_equal(calibrate_confident_joint(cj, LABELS), [[2, 0, 0],
                                                                         [1, 1, 0],
                                                                         [0, 1, 1]])
    # prune_by_noise_rate: cell (1, 0) removes the given-1 example with the
    # largest p0 - p1 (example 3: .55 vs -.70), cell (2, 1) the given-2 one
    # with the largest p1 - p2 (example 5: .15 vs -.65).
    expected = [False, False, False, True, False, True]
    np.testing.assert_array_equal(find_label_issues(PROBS, LABELS), expected)
    np.testing.assert_array_equal(find_label_issues(PROBS, LABELS, filter_by="confident_learning"), expected)
    # torch inputs work the same
    np.testing.assert_array_equal(find_label_issues(torch.tensor(PROBS, dtype=torch.float32),
                                                    torch.tensor(LABELS)), expected)


def test_two_classes_above_threshold_go_to_the_more_probable_of_them():
    probs = np.array([[0.35, 0.40, 0.25],     # 0 and 1 pass -> 1
                      [0.25, 0.30, 0.45],     # 0 and 1 pass, 2 (the overall argmax) does not -> 1
                      [0.10, 0.10, 0.80]])    # only 2 passes
    cj = confident_joint(probs, np.array([0, 0, 2]), thresholds=[0.2, 0.2, 0.7])
    # (cleanlab would put the second example in column 2, the overall argmax)
    np.testing.assert_array_equal(cj, [[0, 2, 0], [0, 0, 0], [0, 0, 1]])


def test_a_class_nobody_is_labelled_gets_an_unreachable_threshold():
    probs = np.array([[0.0, 0.0, 1.0], [0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    labels = np.array([0, 0, 1])                       # nobody labelled 2
    t = per_class_thresholds(probs, labels)
    assert t[2] > 1.0 and np.isfinite(t).all()
    assert confident_joint(probs, labels)[:, 2].sum() == 0   # not even p = 1.0 counts into class 2


def test_argmax_equal_to_the_given_label_is_never_flagged():
    # Example 2 (given 0) is below t0 = .8067 but above t1 = .45, so it is
    # counted off the diagonal, yet its argmax is its label: cleanlab clears it.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.52, 0.48], [0.20, 0.80], [0.90, 0.10]])
    labels = np.array([0, 0, 0, 1, 1])
    cj = confident_joint(probs, labels)
    assert cj[0, 1] == 1 and cj[1, 0] == 1
    for how in ("confident_learning", "prune_by_noise_rate"):
        np.testing.assert_array_equal(find_label_issues(probs, labels, filter_by=how),
                                      [False, False, False, False, True])


def test_calibration_by_hand_with_rounding():
    cj = np.array([[5, 1, 0], [2, 2, 1], [0, 0, 0]])
    labels = np.repeat([0, 1, 2], [7, 4, 3])
    cal = calibrate_confident_joint(cj, labels)
    # row 0: (5, 1, 0) * 7/6 = (5.83, 1.17, 0)        -> (6, 1, 0)
    # row 1: (2, 2, 1) * 4/5 = (1.6, 1.6, 0.8) rounds to (2, 2, 1) = 5 > 4: lower
    #        the most over-rounded, the first of the tied 1.6s  -> (1, 2, 1)
    # row 2: no confident counts but 3 examples: all on the diagonal
    np.testing.assert_array_equal(cal, [[6, 1, 0], [1, 2, 1], [0, 0, 3]])


def test_keep_at_least_one_per_class_truncates_like_cleanlab():
    from cnnstress.xai.label_errors import keep_at_least_n_per_class
    # prune counts (true, given): given label 0 has no example kept (diagonal 0)
    prune = np.array([[0, 1, 0, 2], [3, 5, 1, 0], [3, 0, 4, 1], [3, 1, 0, 6]])
    # column 0: diagonal raised 0 -> 1; 3 non-zero cells - 1 = 2 share the increase:
    # each 3 - 1/2 = 2.5, which cleanlab's astype(int) truncates to 2 (rounding
    # with row totals kept would give 2, 3, 3: rows 2 and 3 sum to x.5 and round up)
    np.testing.assert_array_equal(keep_at_least_n_per_class(prune, 1),
                                  [[1, 1, 0, 2], [2, 5, 1, 0], [2, 0, 4, 1], [2, 1, 0, 6]])
    # n = 2: columns 1-3 raise nothing (diagonals >= 2); column 0 takes 2/2 = 1 from each
    np.testing.assert_array_equal(keep_at_least_n_per_class(prune, 2),
                                  [[2, 1, 0, 2], [2, 5, 1, 0], [2, 0, 4, 1], [2, 1, 0, 6]])


def _planted(seed=0, n=600, c=4, concentration=50.0, n_flips=30):
    """probs ~ Dirichlet concentrated on the true class (a model that knows
    the truth, evaluated out of sample); given labels = truth with `n_flips`
    flipped to another class."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, c, n)
    alpha = np.ones((n, c))
    alpha[np.arange(n), truth] = concentration
    probs = rng.gamma(alpha)
    probs /= probs.sum(1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, n_flips, replace=False)
    given[flipped] = (given[flipped] + rng.integers(1, c, n_flips)) % c
    planted = np.zeros(n, dtype=bool)
    planted[flipped] = True
    return probs, given, planted


def test_planted_label_errors_are_recovered():
    probs, given, planted = _planted()
    for how in ("prune_by_noise_rate", "confident_learning"):
        flags = find_label_issues(probs, given, filter_by=how)
        hits = int((flags & planted).sum())
        recall, precision = hits / planted.sum(), hits / max(int(flags.sum()), 1)
        assert precision >= 0.8, (how, precision)
        if how == "prune_by_noise_rate":
            assert recall >= 0.8, recall


def test_calibrated_joint_sums_to_n_with_row_sums_equal_to_label_counts():
    probs, given, _ = _planted(seed=1, c=5, concentration=10.0, n_flips=60)
    cal = calibrate_confident_joint(confident_joint(probs, given), given)
    assert cal.dtype == np.int64 and (cal >= 0).all()
    assert cal.sum() == len(given)
    np.testing.assert_array_equal(cal.sum(1), np.bincount(given, minlength=5))


def test_no_flags_when_every_label_is_its_confident_prediction():
    # Each example is confident in its own label only (above that class's
    # threshold, below everyone else's): the joint is diagonal, nothing to prune.
    rng = np.random.default_rng(3)
    labels = np.arange(90) % 3
    top = rng.uniform(0.8, 0.98, 90)
    probs = np.tile(((1 - top) / 2)[:, None], (1, 3))
    probs[np.arange(90), labels] = top
    cj = confident_joint(probs, labels)
    assert np.count_nonzero(cj - np.diag(np.diagonal(cj))) == 0 and cj.trace() > 0
    np.testing.assert_array_equal(calibrate_confident_joint(cj, labels), np.diag([30, 30, 30]))
    for how in ("prune_by_noise_rate", "confident_learning"):
        assert not find_label_issues(probs, labels, filter_by=how).any()


def test_empty_input():
    assert find_label_issues(np.zeros((0, 3)), np.zeros(0, dtype=int)).shape == (0,)
    np.testing.assert_array_equal(confident_joint(np.zeros((0, 3)), np.zeros(0, dtype=int)), np.zeros((3, 3)))


@pytest.mark.parametrize("probs, labels, match", [
    (PROBS[:, :2], LABELS, "sum to 1"),
    (np.log(PROBS), LABELS, r"\[0, 1\]"),
    (PROBS, LABELS[:5], "rows"),
    (PROBS, LABELS + 1, r"\[0, 3\)"),
    (PROBS[0], LABELS[:1], "2-D"),
    (np.where(np.eye(6, 3) > 0, np.nan, PROBS), LABELS, "NaN"),
    (PROBS, LABELS + 0.5, "integer"),
])
def test_invalid_inputs_are_one_line_value_errors(probs, labels, match):
    for fn in (per_class_thresholds, confident_joint, find_label_issues):
        with pytest.raises(ValueError, match=match) as info:
            fn(probs, labels)
        assert "\n" not in str(info.value)


def test_invalid_options():
    with pytest.raises(ValueError, match="filter_by"):
        find_label_issues(PROBS, LABELS, filter_by="both")
    with pytest.raises(ValueError, match="thresholds"):
        confident_joint(PROBS, LABELS, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="square"):
        calibrate_confident_joint(np.ones((2, 3)), LABELS)
    with pytest.raises(ValueError, match="labels"):
        calibrate_confident_joint(np.ones((2, 2)), LABELS)
