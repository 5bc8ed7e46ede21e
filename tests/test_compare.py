"""cnnstress.compare: McNemar, paired bootstrap, failure comparison."""
import math

import numpy as np
import pytest

from cnnstress.compare import (bootstrap_accuracy_diff, chi2_sf_1dof, compare_failures,
                               mcnemar)
from cnnstress.evaluate import mine_failures


def paired(b, c, both_right=0, both_wrong=0, seed=0):
    """Correctness arrays with b (A right, B wrong) and c (A wrong, B right)
    discordant pairs, shuffled."""
    a = np.array([True] * b + [False] * c + [True] * both_right + [False] * both_wrong)
    bb = np.array([False] * b + [True] * c + [True] * both_right + [False] * both_wrong)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], bb[order]


# --- McNemar ---------------------------------------------------------------

def test_mcnemar_exact_branch_hand_computed():
    # b=1, c=6, n=7: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125
    r = mcnemar(*paired(1, 6, both_right=40, both_wrong=5))
    assert (r["b"], r["c"], r["n_discordant"], r["n"]) == (1, 6, 7, 52)
    assert r["method"] == "exact"
    assert r["statistic"] == 1.0
    assert r["p_value"] == pytest.approx(0.125, abs=1e-15)
    # symmetric in b and c
    assert mcnemar(*paired(6, 1))["p_value"] == pytest.approx(0.125, abs=1e-15)
    # b=3, c=21 (24 < 25, still exact): 2 * (1 + 24 + 276 + 2024) / 2^24
    assert mcnemar(*paired(3, 21))["p_value"] == pytest.approx(4650 / 2 ** 24, rel=1e-12)
    # balanced: two-sided p is capped at 1
    assert mcnemar(*paired(12, 12))["p_value"] == 1.0


def test_mcnemar_no_discordant_pairs():
    r = mcnemar(*paired(0, 0, both_right=10, both_wrong=3))
    assert (r["b"], r["c"], r["p_value"], r["method"]) == (0, 0, 1.0, "exact")
    assert mcnemar([], [])["p_value"] == 1.0


def test_mcnemar_chi_square_branch_formula():
    b, c = 30, 15
    r = mcnemar(*paired(b, c, both_right=100))
    expected_stat = (abs(b - c) - 1) ** 2 / (b + c)       # 196 / 45
    assert r["method"] == "chi2_cc"
    assert r["statistic"] == pytest.approx(expected_stat)
    assert r["p_value"] == pytest.approx(math.erfc(math.sqrt(expected_stat / 2)))
    assert 0.03 < r["p_value"] < 0.04
    # the branch switches at b + c == 25
    assert mcnemar(*paired(20, 5))["method"] == "chi2_cc"
    assert mcnemar(*paired(20, 4))["method"] == "exact"
    # b == c: the corrected statistic is clamped at 0, p = 1
    r = mcnemar(*paired(20, 20))
    assert (r["statistic"], r["p_value"]) == (0.0, 1.0)


def test_mcnemar_textbook_value():
    # Agresti, Categorical Data Analysis: presidential approval, discordant
    # cells 150 and 86. Corrected statistic (|150-86|-1)^2/236 = 3969/236
    # = 16.818; chi-square(1) upper tail 4.1146e-5.
    r = mcnemar(*paired(150, 86, both_right=794, both_wrong=570))
    assert r["statistic"] == pytest.approx(16.818, abs=5e-4)
    assert r["p_value"] == pytest.approx(4.1146e-5, rel=1e-4)
    # chi-square(1) critical values from tables
    assert chi2_sf_1dof(3.841458820694124) == pytest.approx(0.05, rel=1e-12)
    assert chi2_sf_1dof(6.6348966010212145) == pytest.approx(0.01, rel=1e-12)


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="paired"):
        mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="boolean"):
        mcnemar([0, 2], [1, 1])


# --- paired bootstrap -------------------------------------------------------

def test_bootstrap_contains_true_diff():
    # A right on 150 of 200; B right on those and on 20 more: diff = +0.10
    a, b = paired(0, 20, both_right=150, both_wrong=30)
    r = bootstrap_accuracy_diff(a, b, n_boot=500, seed=1)
    assert r["diff"] == pytest.approx(0.10)
    assert (r["acc_a"], r["acc_b"]) == (pytest.approx(0.75), pytest.approx(0.85))
    assert r["low"] <= r["diff"] <= r["high"]
    assert 0 < r["low"] < 0.1 < r["high"] < 0.2          # B never worse: CI above 0
    assert (r["n_boot"], r["confidence"]) == (500, 0.95)
    wider = bootstrap_accuracy_diff(a, b, n_boot=500, seed=1, confidence=0.99)
    assert wider["low"] <= r["low"] and wider["high"] >= r["high"]


def test_bootstrap_interval_equals_a_naive_resampling_loop():
    # The same generator, one resample per loop iteration, accuracies recomputed from scratch.
    rng = np.random.default_rng(11)
    a, b = rng.random(157) < 0.6, rng.random(157) < 0.7
    r = bootstrap_accuracy_diff(a, b, n_boot=400, seed=5, confidence=0.9)
    draw = np.random.default_rng(5)
    diffs = []
    for _ in range(400):
        idx = draw.integers(0, 157, size=157, dtype=np.int64)
        diffs.append(b[idx].mean() - a[idx].mean())
    low, high = np.quantile(diffs, [0.05, 0.95])
    assert r["low"] == pytest.approx(low, abs=1e-12) and r["high"] == pytest.approx(high, abs=1e-12)
    assert r["diff"] == pytest.approx(b.mean() - a.mean(), abs=1e-15)


def test_bootstrap_deterministic_under_seed_and_chunking():
    a, b = paired(15, 25, both_right=120, both_wrong=40)
    r1 = bootstrap_accuracy_diff(a, b, n_boot=300, seed=7)
    r2 = bootstrap_accuracy_diff(a, b, n_boot=300, seed=7)
    assert r1 == r2
    # small chunks (7 resamples at a time) draw the same indices
    assert bootstrap_accuracy_diff(a, b, n_boot=300, seed=7, max_chunk_elems=7 * a.size) == r1
    r3 = bootstrap_accuracy_diff(a, b, n_boot=300, seed=8)
    assert (r3["low"], r3["high"]) != (r1["low"], r1["high"])


def test_bootstrap_degenerate_for_identical_classifiers():
    a, _ = paired(0, 0, both_right=70, both_wrong=30)
    r = bootstrap_accuracy_diff(a, a.copy(), n_boot=200)
    assert r["low"] == r["high"] == r["diff"] == 0.0


def test_bootstrap_rejects_bad_arguments():
    a, b = paired(2, 3)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_accuracy_diff(a, b, confidence=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_accuracy_diff(a, b, n_boot=0)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_accuracy_diff([], [])


# --- failure comparison -----------------------------------------------------

def probs_for(labels, wrong):
    """3-class probabilities: correct (p=0.7) except where `wrong` maps a
    position to (predicted class, confidence)."""
    n = len(labels)
    out = np.empty((n, 3), np.float32)
    for i, y in enumerate(labels):
        pred, conf = wrong.get(i, (y, 0.7))
        out[i] = (1 - conf) / 2
        out[i, pred] = conf
    return out


def test_compare_failures_fixed_persisting_new():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    probs_a = probs_for(labels, {1: (0, 0.9), 2: (0, 0.9), 3: (1, 0.9), 4: (2, 0.95),
                                 8: (1, 0.6)})   # wrong, below the threshold
    probs_b = probs_for(labels, {3: (2, 0.5),    # still wrong, low confidence
                                 4: (2, 0.95),   # still wrong, high confidence
                                 7: (2, 0.85),   # new: A got it right
                                 8: (0, 0.9),    # newly confident: A wrong too, with less confidence
                                 5: (0, 0.6)})   # wrong for B only, low: in no list
    fa = mine_failures(probs_a, labels)
    fb = mine_failures(probs_b, labels)
    assert sorted(fa.positions.tolist()) == [1, 2, 3, 4]
    assert sorted(fb.positions.tolist()) == [4, 7, 8]
    r = compare_failures(fa, fb, probs_b.argmax(1), labels, preds_a=probs_a.argmax(1))
    assert r["fixed"] == [1, 2]
    assert r["persisting"] == [3, 4]
    assert r["still_high_confidence"] == [4]
    assert r["wrong_low_confidence"] == [3]
    assert r["new"] == [7]
    assert r["newly_confident"] == [8]
    assert r["counts"] == {"a": 4, "b": 3, "fixed": 2, "persisting": 2, "still_high_confidence": 1,
                           "wrong_low_confidence": 1, "new": 1, "newly_confident": 1}


def test_compare_failures_groups_match_a_per_image_classification():
    # independent check: classify every image from its own predictions and confidences
    rng = np.random.default_rng(4)
    n, c, thr = 600, 4, 0.7
    labels = rng.integers(0, c, n)
    probs_a, probs_b = (rng.dirichlet(np.full(c, 0.4), n) for _ in range(2))
    fa, fb = mine_failures(probs_a, labels, thr), mine_failures(probs_b, labels, thr)
    r = compare_failures(fa, fb, probs_b.argmax(1), labels, preds_a=probs_a.argmax(1))
    want: dict = {k: [] for k in ("fixed", "still_high_confidence", "wrong_low_confidence", "new",
                                  "newly_confident")}
    for i in range(n):
        a_wrong, b_wrong = probs_a[i].argmax() != labels[i], probs_b[i].argmax() != labels[i]
        a_high, b_high = a_wrong and probs_a[i].max() > thr, b_wrong and probs_b[i].max() > thr
        if a_high:
            want["fixed" if not b_wrong else "still_high_confidence" if b_high else "wrong_low_confidence"].append(i)
        elif b_high:
            want["newly_confident" if a_wrong else "new"].append(i)
    for k, v in want.items():
        assert r[k] == v, k
    assert min(len(v) for v in want.values()) > 0       # every group is exercised
    assert r["counts"]["b"] == len(want["still_high_confidence"]) + len(want["new"]) + len(want["newly_confident"])


def test_compare_failures_rejects_mismatched_inputs():
    labels = np.array([0, 1, 2])
    fa = mine_failures(probs_for(labels, {2: (0, 0.9)}), labels)
    with pytest.raises(ValueError, match="outside"):
        compare_failures(fa, fa, np.array([0]), np.array([0]), preds_a=np.array([0]))
    with pytest.raises(ValueError, match="length"):
        compare_failures(fa, fa, np.array([0, 1]), labels, preds_a=labels)
    with pytest.raises(ValueError, match="length"):
        compare_failures(fa, fa, labels, labels, preds_a=np.array([0, 1]))
