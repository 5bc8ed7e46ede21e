"""Metrics in cnnstress.evaluate, checked against hand-worked values."""
import json
import math

import numpy as np
import pytest
import torch

from cnnstress.data import CLASSES
from cnnstress.evaluate import (CSV_HEADER, Failure, FailureTable, Predictions, confusion_matrix,
                                mine_failures, most_confused_pairs, per_class_accuracy, summarize)

ABC = ("ant", "bee", "cow")


# --- confusion matrix ------------------------------------------------------

def test_confusion_matrix_three_classes():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 0, 1, 2, 2, 0, 2, 2]
    cm = confusion_matrix(labels, preds, num_classes=3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    # rows = true class, columns = predicted class
    np.testing.assert_array_equal(cm, [[2, 1, 0],
                                       [0, 1, 1],
                                       [1, 0, 3]])
    # torch tensors give the same answer
    cm_t = confusion_matrix(torch.tensor(labels), torch.tensor(preds), num_classes=3)
    np.testing.assert_array_equal(cm_t, cm)


def test_confusion_matrix_empty_and_invalid():
    np.testing.assert_array_equal(confusion_matrix([], [], num_classes=2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], num_classes=3)


def test_per_class_accuracy_with_empty_class():
    cm = np.array([[2, 1, 0],
                   [0, 0, 0],   # no sample of class 1
                   [1, 0, 3]])
    acc = per_class_accuracy(cm)
    assert acc[0] == pytest.approx(2 / 3)
    assert math.isnan(acc[1])
    assert acc[2] == pytest.approx(3 / 4)


# --- most confused pairs ---------------------------------------------------

def test_most_confused_pairs_ordering():
    cm = np.array([[10, 3, 1, 0],    # support 14
                   [5, 8, 0, 2],     # support 15
                   [0, 0, 9, 4],     # support 13
                   [0, 2, 4, 7]])    # support 13
    # totals: (0,1)=3+5=8, (2,3)=4+4=8, (1,3)=2+2=4, (0,2)=1, (0,3)=0, (1,2)=0
    pairs = most_confused_pairs(cm, k=10, classes="abcd")
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("c", "d"), ("b", "d"), ("a", "c")]
    first = pairs[0]
    assert (first["a_as_b"], first["b_as_a"], first["total"]) == (3, 5, 8)
    assert first["rate"] == pytest.approx(8 / (14 + 15))
    assert pairs[1]["rate"] == pytest.approx(8 / (13 + 13))
    assert (pairs[3]["a_as_b"], pairs[3]["b_as_a"]) == (1, 0)
    # k truncates; pairs never confused are left out
    assert [(p["a"], p["b"]) for p in most_confused_pairs(cm, k=2, classes="abcd")] == [("a", "b"), ("c", "d")]
    assert most_confused_pairs(np.eye(3, dtype=int), classes=ABC) == []
    with pytest.raises(ValueError, match="class names"):
        most_confused_pairs(cm, classes=ABC)


# --- failure miner ---------------------------------------------------------

def _edge_probs():
    probs = np.array([
        [0.8, 0.1, 0.1],              # 0: wrong, confidence exactly 0.8 -> excluded
        [0.1, 0.8000001, 0.0999999],  # 1: wrong, just above 0.8 -> included
        [0.95, 0.03, 0.02],           # 2: correct and confident -> excluded
        [0.05, 0.05, 0.9],            # 3: wrong, 0.9 -> rank 1
        [0.02, 0.9, 0.08],            # 4: wrong, 0.9 (tie with 3) -> rank 2
        [0.5, 0.3, 0.2],              # 5: wrong but not confident -> excluded
    ], dtype=np.float32)
    labels = np.array([1, 0, 0, 0, 2, 1])
    return probs, labels


def test_mine_failures_threshold_edges_and_ranking():
    probs, labels = _edge_probs()
    table = mine_failures(probs, labels, threshold=0.8)
    assert len(table) == 3
    np.testing.assert_array_equal(table.positions, [3, 4, 1])
    assert table.positions.dtype == np.int64
    r0 = table.rows[0]
    assert (r0.position, r0.dataset_index, r0.true, r0.pred) == (3, 3, 0, 2)
    assert r0.confidence == pytest.approx(0.9)
    # top3: most probable first, the 0.05 tie broken by lower class id
    assert [c for c, _ in r0.top3] == [2, 0, 1]
    assert [p for _, p in r0.top3] == pytest.approx([0.9, 0.05, 0.05])
    r2 = table.rows[2]
    assert (r2.position, r2.true, r2.pred) == (1, 0, 1)
    assert r2.confidence > 0.8
    assert [c for c, _ in r2.top3] == [1, 0, 2]


def test_mine_failures_torch_and_dataset_indices():
    probs, labels = _edge_probs()
    table = mine_failures(torch.from_numpy(probs), torch.from_numpy(labels), threshold=0.8,
                          dataset_indices=torch.arange(100, 106))
    assert [r.dataset_index for r in table.rows] == [103, 104, 101]
    assert [r.position for r in table.rows] == [3, 4, 1]
    with pytest.raises(ValueError, match="dataset_indices"):
        mine_failures(probs, labels, dataset_indices=[1, 2])


def test_mine_failures_other_thresholds_and_empty():
    probs, labels = _edge_probs()
    # 0.9 is not strictly greater than 0.9: nothing left
    empty = mine_failures(probs, labels, threshold=0.9)
    assert len(empty) == 0 and empty.rows == []
    assert empty.positions.shape == (0,)
    # threshold 0: every wrong prediction, still ranked by confidence
    np.testing.assert_array_equal(mine_failures(probs, labels, threshold=0.0).positions, [3, 4, 1, 0, 5])
    # no predictions at all
    assert len(mine_failures(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))) == 0


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_mine_failures_rejects_bad_threshold(bad):
    probs, labels = _edge_probs()
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        mine_failures(probs, labels, threshold=bad)


def test_failure_table_csv_round_trip(tmp_path):
    probs, labels = _edge_probs()
    table = mine_failures(probs, labels, threshold=0.8, dataset_indices=np.arange(10, 16))
    path = tmp_path / "failures.csv"
    table.to_csv(path, classes=ABC)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_HEADER)
    assert lines[0] == ("rank,position,dataset_index,true,true_name,pred,pred_name,confidence,"
                        "top1,top1_prob,top2,top2_prob,top3,top3_prob")
    first = lines[1].split(",")
    assert first[:7] == ["1", "3", "13", "0", "ant", "2", "cow"]
    assert (first[8], first[10], first[12]) == ("cow", "ant", "bee")
    back = FailureTable.from_csv(path, classes=ABC)
    assert back.rows == table.rows            # exact, floats included
    assert all(isinstance(r, Failure) for r in back)
    # no temporary files left beside the target
    assert [p.name for p in tmp_path.iterdir()] == ["failures.csv"]
    # an empty table round-trips too
    FailureTable(rows=[]).to_csv(path, classes=ABC)
    assert path.read_text().splitlines() == [",".join(CSV_HEADER)]
    assert len(FailureTable.from_csv(path, classes=ABC)) == 0


def test_failure_table_csv_rejects_foreign_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a failure table"):
        FailureTable.from_csv(path)


# --- summary ---------------------------------------------------------------

def _predictions(logits, labels):
    logits = torch.tensor(logits, dtype=torch.float32)
    return Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1),
                       labels=torch.tensor(labels, dtype=torch.int64))


def test_summarize_is_json_ready():
    # 10 classes; class ids 0..3 used. Big logits -> confident predictions.
    logits = np.zeros((5, 10), np.float32)
    for i, (p, v) in enumerate([(0, 10), (1, 10), (1, 10), (3, 10), (2, 1)]):
        logits[i, p] = v
    labels = [0, 1, 2, 2, 2]   # pos 2 (2 -> 1) and 3 (2 -> 3) confidently wrong; pos 4 right
    pred = _predictions(logits, labels)
    s = summarize(pred, threshold=0.8)
    json.dumps(s, allow_nan=False)
    assert s["n"] == 5
    assert s["test_accuracy"] == pytest.approx(3 / 5)
    # by hand: rows (0,1,1,3) have one logit 10 and nine 0s, row 4 one logit 1; rows 0, 1, 4 are right
    z10, z1 = np.exp(10) + 9, np.e + 9
    nll = [np.log(z10) - 10, np.log(z10) - 10, np.log(z10), np.log(z10), np.log(z1) - 1]
    assert s["loss"] == pytest.approx(np.mean(nll), rel=1e-6)
    assert s["high_confidence_failures"] == 2
    assert s["mean_confidence"] == pytest.approx((4 * np.exp(10) / z10 + np.e / z1) / 5, rel=1e-6)
    assert list(s["per_class_accuracy"]) == list(CLASSES)
    assert s["per_class_accuracy"]["airplane"] == 1.0
    assert s["per_class_accuracy"]["bird"] == pytest.approx(1 / 3)
    assert s["per_class_accuracy"]["truck"] is None          # no samples
    assert len(s["confusion_matrix"]) == 10 and s["confusion_matrix"][2][1] == 1
    assert [(p["a"], p["b"]) for p in s["top_confused_pairs"]] == [("automobile", "bird"), ("bird", "cat")]


def test_summarize_empty_split():
    pred = _predictions(np.zeros((0, 3)), [])
    s = summarize(pred, classes=ABC)
    json.dumps(s, allow_nan=False)
    assert s["n"] == 0 and s["test_accuracy"] is None and s["loss"] is None
    assert s["mean_confidence"] is None and s["high_confidence_failures"] == 0
