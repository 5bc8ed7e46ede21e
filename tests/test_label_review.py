"""Ground truth for failure triage: the vendored human review, the order
check, label-quality scores, and precision/recall/precision-at-k against the
review on crafted data with hand-computed answers."""
from __future__ import annotations

import csv
from importlib import resources

import numpy as np
import pytest
import torch

from cnnstress.errors import DataError
from cnnstress.xai import label_review as lr
from cnnstress.xai.label_errors import SCORE_METHODS, label_quality_scores


def package_text(name: str) -> str:
    return resources.files("cnnstress.resources").joinpath(name).read_text()


# --- the vendored files -------------------------------------------------------------

def test_vendored_review_has_275_images_and_54_label_errors():
    review = lr.load_review()
    assert len(review) == 275
    assert sum(e.label_error for e in review.values()) == 54
    assert list(review) == sorted(review) and all(i == e.index for i, e in review.items())
    # An independent read of the raw file: csv rows after the comment header.
    rows = list(csv.DictReader(line for line in package_text(lr.REVIEW_FILE).splitlines()
                               if not line.startswith("#")))
    assert len(rows) == 275
    assert sum(int(r["votes_given"]) < 3 for r in rows) == 54
    assert sum(r["label_error"] == "1" for r in rows) == 54
    assert {int(r["index"]) for r in rows if r["label_error"] == "1"} == {
        i for i, e in review.items() if e.label_error}


def test_vendored_files_name_their_source_and_licence():
    assert lr.source_line() == "Source: cleanlab/label-errors, mturk/cifar10_mturk.json (Apache-2.0)."
    assert lr.source_line(lr.LABELS_FILE).startswith("Source: cleanlab/label-errors, ")
    assert lr.source_line(lr.LABELS_FILE).endswith("(Apache-2.0).")
    assert "fewer than 3 of 5" in package_text(lr.REVIEW_FILE)


def test_official_labels_are_10000_class_ids_and_agree_with_the_review():
    labels = lr.official_test_labels()
    assert labels.dtype == np.int64 and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10        # CIFAR-10's test set is balanced
    digits = "".join(line for line in package_text(lr.LABELS_FILE).splitlines() if not line.startswith("#"))
    assert labels[:12].tolist() == [int(c) for c in digits[:12]]
    for i, e in lr.load_review().items():
        assert e.given_label == labels[i] != e.guessed_label
    labels[0] = 9                                              # a copy: the cache is not touched
    assert lr.official_test_labels()[0] == int(digits[0])


def test_review_entry_dict_form_is_the_csv_columns():
    entry = lr.load_review()[165]                             # 1 of 5 chose "deer"
    assert tuple(entry.to_dict()) == lr.REVIEW_COLUMNS
    assert entry.label_error is True and entry.votes_given == 1
    assert lr.ReviewEntry.from_dict(entry.to_dict()) == entry
    assert lr.review_verdict(165, lr.load_review()) == "reviewed: label error"
    assert lr.review_verdict(20, lr.load_review()) == "reviewed: label correct"
    assert lr.review_verdict(0, lr.load_review()) == "not reviewed"


HEADER = "# a comment\n" + ",".join(lr.REVIEW_COLUMNS) + "\n"


@pytest.mark.parametrize("rows, where", [
    ("165,4,2,1,1,3,0,1\n165,4,2,1,1,3,0,1\n", "line 4: image 165 appears twice"),
    ("165,4,2,1,1,2,0,1\n", "line 3: the votes do not add up to 5"),
    ("165,4,2,1,1,3,0,0\n", "line 3: label_error 0 does not follow"),
    ("165,3,2,1,1,3,0,1\n", "line 3: given label 3 differs from the official label 4"),
    ("10000,4,2,1,1,3,0,1\n", "line 3: index 10000 is not a test index"),
    ("165,4,2,1,1,3,0\n", "line 3 is not 8 whole numbers"),
    ("165,4,2,1,-1,3,0,1\n", "line 3 is not 8 whole numbers"),
])
def test_a_damaged_review_is_one_line_naming_the_line(rows, where):
    official = lr.official_test_labels()
    assert lr.parse_review(HEADER + "165,4,2,1,1,3,0,1\n", official)[165].label_error
    with pytest.raises(DataError) as exc:
        lr.parse_review(HEADER + rows, official)
    assert where in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DataError, match="column header"):
        lr.parse_review("index,given_label\n165,4\n", official)


def test_a_damaged_label_file_is_refused():
    good = "# header\n" + "0123456789" * 1000 + "\n"
    assert lr.parse_official_labels(good)[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(DataError, match="9999 labels instead of 10000"):
        lr.parse_official_labels(good[:-2])
    with pytest.raises(DataError, match="line 2 holds something other than digits"):
        lr.parse_official_labels(good.replace("5", "x", 1))


# --- the order check ----------------------------------------------------------------

def test_order_check_accepts_the_official_set_and_subsets_by_official_index():
    official = lr.official_test_labels()
    for check in (lr.check_order(official), lr.check_order(official, np.arange(10000))):
        assert check == lr.OrderCheck(official=True, n=10000, differing=0, reason=None)
    subset = np.sort(np.random.default_rng(0).choice(10000, 500, replace=False))
    assert lr.check_order(official[subset], subset).official
    # tensors, as a loaded Split holds them
    assert lr.check_order(torch.from_numpy(official[subset]), torch.from_numpy(subset)).official


def test_order_check_refuses_a_reordered_set_in_one_line():
    official = lr.official_test_labels()
    perm = np.random.default_rng(1).permutation(10000)
    differ = int((official[perm] != official).sum())          # about 9,000
    check = lr.check_order(official[perm])
    assert not check.official and check.differing == differ and check.n == 10000
    assert check.reason == (f"the loaded test set is not in the official order ({differ} of 10000 labels differ); "
                            "ground-truth triage is skipped — regenerate data/ with ../shared/tools/cifar10_offline.py")
    # A subset whose labels are read as positions 0..499 (no indices given), or with shifted indices.
    subset = np.sort(np.random.default_rng(0).choice(9999, 500, replace=False))
    assert not lr.check_order(official[subset]).official
    shifted = lr.check_order(official[subset], subset + 1)
    assert not shifted.official and shifted.differing == int((official[subset] != official[subset + 1]).sum())


@pytest.mark.parametrize("labels, indices, why", [
    ([3, 8, 8], [0, 1], "has 3 labels but 2 indices"),
    ([3, 8, 8], [0, 1, 10000], "(1 outside 0-9999)"),
    ([3, 8, 8], [-1, 1, 2], "(1 outside 0-9999)"),
    ([3, 8, 8], [0, 1, 1], "(1 repeats)"),
])
def test_order_check_refuses_indices_that_cannot_be_official(labels, indices, why):
    check = lr.check_order(labels, indices)
    assert not check.official and check.differing is None and check.n == 3
    assert why in check.reason and check.reason.endswith("cifar10_offline.py") and "\n" not in check.reason
    assert lr.check_order([3, 8, 8], [0, 1, 2]).official                    # the first three official labels


# --- label-quality scores -----------------------------------------------------------

PROBS = np.array([[0.7, 0.2, 0.1],
                  [0.1, 0.6, 0.3],
                  [0.3, 0.3, 0.4],
                  [0.5, 0.5, 0.0]])
LABELS = np.array([0, 2, 2, 1])


def test_label_quality_scores_by_hand():
    # self-confidence: p of the given label
    np.testing.assert_allclose(label_quality_scores(PROBS, LABELS), [0.7, 0.3, 0.4, 0.5])
    # normalized margin: (p_given - max other + 1) / 2; margins 0.5, -0.3, 0.1, 0.0
    np.testing.assert_allclose(label_quality_scores(PROBS, LABELS, method="normalized_margin"),
                               [0.75, 0.35, 0.55, 0.5])
    assert label_quality_scores(np.zeros((0, 3)), np.zeros(0, int), method="normalized_margin").shape == (0,)
    with pytest.raises(ValueError, match="method must be one of"):
        label_quality_scores(PROBS, LABELS, method="entropy")
    with pytest.raises(ValueError, match="at least two classes"):
        label_quality_scores(np.ones((2, 1)), [0, 0], method="normalized_margin")


def test_label_quality_scores_match_cleanlab():
    import cleanlab.rank as rank   # a declared test dependency: never skipped
    rng = np.random.default_rng(3)
    for c in (2, 3, 10):
        logits = rng.normal(size=(200, c)) * 3
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = rng.integers(0, c, 200)
        for method in SCORE_METHODS:
            np.testing.assert_array_equal(label_quality_scores(probs, labels, method=method),
                                          rank.get_label_quality_scores(labels, probs, method=method))


# --- triage on crafted data ---------------------------------------------------------

def entry(index: int, error: bool) -> lr.ReviewEntry:
    votes = 1 if error else 5
    return lr.ReviewEntry(index=index, given_label=0, guessed_label=1, votes_given=votes, votes_guessed=5 - votes,
                          votes_neither=0, votes_both=0, label_error=error)


# Confirmed errors 10, 11, 12 (loaded) and 13 (not loaded); 20, 21 reviewed and correct.
REVIEW = {i: entry(i, error=i < 20) for i in (10, 11, 12, 13, 20, 21)}
LOADED = [10, 11, 12, 20, 21, 30, 31, 32, 33]


def test_triage_by_hand():
    failures = [31, 20, 10, 12, 30]
    flagged = [10, 11, 20, 21, 30, 32]
    scores = [0.1, 0.2, 0.2, 0.05, 0.9]          # per failure, in failures' order; 20 and 10 tie
    t = lr.triage(failures, flagged, REVIEW, LOADED, scores=scores)
    assert t.failures == 5 and t.confirmed_loaded == 3          # 13 is not loaded
    assert t.label_error == [10, 12] and t.label_correct == [20] and t.not_reviewed == 2
    assert t.errors_among_failures == lr.Ratio(hits=2, total=3, value=2 / 3)
    assert t.failures_with_label_error == lr.Ratio(hits=2, total=5, value=0.4)
    # flags: reviewed 10, 11, 20, 21 -> 2 of 4 confirmed; recall 10, 11 of 10, 11, 12
    assert t.flags == lr.FlagScore(flagged=6, reviewed=4, precision=lr.Ratio(hits=2, total=4, value=0.5),
                                   recall=lr.Ratio(hits=2, total=3, value=2 / 3), confirmed=[10, 11],
                                   reviewed_correct=[20, 21])
    # ranked by score, ties by index: 12 (0.05), 31 (0.1), 10 (0.2), 20 (0.2), 30 (0.9)
    assert t.ranked == [12, 31, 10, 20, 30]
    assert [(p.k, p.hits) for p in t.precision_at_k] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    np.testing.assert_allclose([p.precision for p in t.precision_at_k], [1, 1 / 2, 2 / 3, 2 / 4, 2 / 5])
    assert lr.GroundTruthTriage.from_dict(t.to_dict()) == t
    assert t.to_dict()["flags"]["precision"] == {"hits": 2, "total": 4, "value": 0.5}


def test_triage_without_scores_and_empty_denominators():
    t = lr.triage([30, 31], [32], REVIEW, LOADED)
    assert t.ranked is None and t.precision_at_k is None and t.not_reviewed == 2
    assert t.failures_with_label_error == lr.Ratio(hits=0, total=2, value=0.0)
    assert t.flags.precision == lr.Ratio(hits=0, total=0, value=None)        # no flag was reviewed
    # nothing confirmed is loaded: recall undefined
    none_loaded = lr.flag_scores([30], REVIEW, [20, 30])
    assert none_loaded.recall == lr.Ratio(hits=0, total=0, value=None)
    empty = lr.triage([], [], REVIEW, LOADED, scores=[])
    assert empty.failures == 0 and empty.failures_with_label_error.value is None and empty.precision_at_k == []


def test_flag_scores_serve_the_two_model_agreement_set():
    agreed = [11, 12, 21, 33]
    s = lr.flag_scores(agreed, REVIEW, LOADED)
    assert (s.precision.hits, s.precision.total, s.recall.hits, s.recall.total) == (2, 3, 2, 3)
    assert s.confirmed == [11, 12] and s.reviewed_correct == [21]


def test_precision_at_k_counts_unreviewed_as_not_an_error():
    at_k = lr.precision_at_k([30, 10, 13, 20], REVIEW)
    assert [(p.k, p.hits, p.precision) for p in at_k] == [(1, 0, 0.0), (2, 1, 0.5), (3, 2, 2 / 3), (4, 2, 0.5)]


@pytest.mark.parametrize("failures, flagged, scores, match", [
    ([13], [], None, "failure_indices must be official indices of loaded"),
    ([10, 10], [], None, "failure_indices repeats"),
    ([10], [99], None, "flagged_indices must be official indices of loaded"),
    ([10, 12], [], [0.1], "scores must be 2 finite numbers"),
    ([10, 12], [], [0.1, np.nan], "scores must be 2 finite numbers"),
])
def test_triage_refuses_inconsistent_inputs(failures, flagged, scores, match):
    with pytest.raises(ValueError, match=match):
        lr.triage(failures, flagged, REVIEW, LOADED, scores=scores)
