"""The label_review stage on the fixture run (tests/conftest.py `analysed_run`).

The fixture's test set is synthetic, so it is not in the official order: run
as is, the stage says so in one line and changes nothing else. To test the
triage, the official labels and the review it looks up
(cnnstress.xai.label_review.official_test_labels / load_review, reached
through applicable_review) are replaced by the fixture's labels and a review
crafted over the fixture's failures, whose answer the test works out with set
arithmetic on the run's predictions (predictions_<model>.npz).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cnnstress import stages
from cnnstress.__main__ import main
from cnnstress.data import CLASSES
from cnnstress.xai import label_review as lr
from cnnstress.xai.label_errors import find_label_issues
from conftest import cli, copy_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = ("baseline", "improved")
PER_MODEL_KEYS = ("confirmed_label_error_failures", "flagged_unconfirmed_failures", "unflagged_model_error_failures",
                  "reviewed_correct_failures", "unreviewed_failures", "flag_precision", "flag_recall")


def _failures(p: dict[str, np.ndarray]) -> list[int]:
    """Official indices of every wrong prediction, most confident first (the
    failures at threshold 0: the fixture's models are never 80% sure)."""
    conf = p["probs"].max(axis=1)
    wrong = np.flatnonzero(p["preds"] != p["labels"])
    return [int(p["dataset_indices"][i]) for i in wrong[np.argsort(-conf[wrong], kind="stable")]]


def _predictions(run, name: str) -> dict[str, np.ndarray]:
    with np.load(run / f"predictions_{name}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in ("probs", "labels", "preds", "dataset_indices")}


def _entry(index: int, given: int, error: bool) -> lr.ReviewEntry:
    guessed = (given + 1) % len(CLASSES)
    return lr.ReviewEntry(index=index, given_label=given, guessed_label=guessed,
                          votes_given=0 if error else 4, votes_guessed=5 if error else 1, votes_neither=0,
                          votes_both=0, label_error=error)


@pytest.fixture
def crafted(analysed_run, monkeypatch):
    """Official labels = the fixture's; a review over the fixture: the
    baseline's top failure, an improved-only failure (when there is one) and a
    correctly predicted image are label errors; the baseline's second failure
    and another correctly predicted image are reviewed correct."""
    preds = {n: _predictions(analysed_run, n) for n in MODELS}
    idx, labels = preds["baseline"]["dataset_indices"], preds["baseline"]["labels"]
    official = np.zeros(lr.N_TEST, dtype=np.int64)
    official[idx] = labels
    fails = {n: _failures(preds[n]) for n in MODELS}
    assert len(fails["baseline"]) >= 2, "the fixture run needs two baseline failures for this test"
    right = [int(i) for i, p, y in zip(idx, preds["baseline"]["preds"], labels) if p == y]
    label_of = dict(zip(idx.tolist(), labels.tolist()))
    errors = {fails["baseline"][0], right[0]} | {i for i in fails["improved"] if i not in fails["baseline"]}
    correct = {fails["baseline"][1], right[1]}
    review = {i: _entry(i, label_of[i], i in errors) for i in sorted(errors | correct)}
    monkeypatch.setattr(lr, "official_test_labels", lambda: official.copy())
    monkeypatch.setattr(lr, "load_review", lambda: dict(review))
    return {"preds": preds, "fails": fails, "errors": errors, "correct": correct, "review": review}


def test_triage_against_a_crafted_review(crafted, analysed_run, shared_cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    copy_run(analysed_run, out)        # trained models and predictions: nothing is retrained
    assert main(cli("run", shared_cifar_dir, out, "--threshold", "0", "--no-stress", "--no-explain")) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    errors, correct, preds, fails = crafted["errors"], crafted["correct"], crafted["preds"], crafted["fails"]
    reviewed = errors | correct
    section = metrics["label_review"]
    assert section["official_order"] is True and section["order"]["differing"] == 0
    assert section["confirmed"] == len(errors) and section["reviewed"] == len(reviewed)
    flags = {}
    for n in MODELS:
        with open(out / f"failures_{n}.csv", newline="") as f:     # the stage's failures are the test's
            assert [int(r["dataset_index"]) for r in csv.DictReader(f)] == fails[n]
        p = preds[n]
        flags[n] = set(p["dataset_indices"][find_label_issues(p["probs"], p["labels"])].tolist())
        f, m = fails[n], metrics[n]
        confirmed = [i for i in f if i in errors]
        assert m["confirmed_label_error_failures"] == len(confirmed)
        assert m["reviewed_correct_failures"] == len([i for i in f if i in correct])
        assert m["unreviewed_failures"] == len([i for i in f if i not in reviewed])
        assert m["flagged_unconfirmed_failures"] == len([i for i in f if i in flags[n] and i not in errors])
        assert m["unflagged_model_error_failures"] == len([i for i in f if i not in flags[n] and i not in errors])
        hits = flags[n] & errors
        assert m["flag_recall"] == pytest.approx(len(hits) / len(errors))
        on_reviewed = flags[n] & reviewed
        assert m["flag_precision"] == (pytest.approx(len(hits) / len(on_reviewed)) if on_reviewed else None)
        tri = section["models"][n]["triage"]
        assert tri["label_error"] == sorted(confirmed) and "ranked" not in tri
        assert tri["precision_at_k"][-1] == {"k": len(f), "hits": len(confirmed),
                                             "precision": pytest.approx(len(confirmed) / len(f))}
        assert section["models"][n]["kinds"]["confirmed_label_error"] == confirmed   # in failure rank order
        assert (f"label review {n}: {len(confirmed)} of {len(f)} high-confidence failures are confirmed label "
                f"errors") in printed
    # the agreement: flagged under both models with the same predicted class
    same = {int(i) for i, a, b in zip(preds["baseline"]["dataset_indices"], preds["baseline"]["preds"],
                                      preds["improved"]["preds"]) if a == b}
    agreed = flags["baseline"] & flags["improved"] & same
    assert section["agreement"]["flagged"] == len(agreed)
    assert section["agreement"]["recall"]["hits"] == len(agreed & errors)
    assert section["agreement"]["precision"]["total"] == len(agreed & reviewed)
    # the top baseline failure is a confirmed error: its failure case says so with the votes
    top = fails["baseline"][0]
    vote = f"5 of 5 reviewers: {CLASSES[crafted['review'][top].guessed_label]}"
    case1 = next(line for line in printed.splitlines() if line.startswith("case 1:"))
    assert f"reviewed: label error, {vote}" in case1
    text = (out / "analysis_report.txt").read_text()
    flat = " ".join(text.split())
    start = flat.index("Failure triage against human review")
    section_text = flat[start:flat.index("Summary", start)]
    for kind in ("confirmed label error", "flagged: reviewed correct", "flagged: not reviewed", "model error",
                 "precision (reviewed)", "recall (confirmed)", "both models agree", "k=5", "all failures"):
        assert kind in section_text, kind
    assert f"test images {top}" in section_text
    assert f"Human review: label error, {vote}." in flat
    html = (out / "report.html").read_text()
    assert "Failure triage against human review" in html and "label_errors_confirmed.png" in html
    for png in ("label_errors_confirmed.png", "label_precision_at_k.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE, png


def _without_seconds(value):
    """`value` without its timings ("seconds" anywhere): a stage that had to
    recompute (another test may have left a cache of other settings) takes
    another time, and nothing else may differ."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    return value


def _without_volatile(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in ("created", "pipeline_seconds", "stages", "label_review")}
    for n in MODELS:
        out[n] = {k: v for k, v in out[n].items() if k not in ("train_seconds", "reused_checkpoint", "checkpoint")}
    return _without_seconds(out)


@pytest.mark.slow
def test_not_official_order_is_one_line_and_changes_nothing_else(analysed_run, shared_cifar_dir, tmp_path,
                                                                  monkeypatch, capsys):
    without, out = tmp_path / "without", tmp_path / "with"
    copy_run(analysed_run, without)
    copy_run(analysed_run, out)
    with monkeypatch.context() as mp:         # the same run without the stage
        mp.setattr(stages, "STAGES", [s for s in stages.STAGES if s.name != "label_review"])
        assert main(cli("run", shared_cifar_dir, without)) == 0
    capsys.readouterr()
    assert main(cli("run", shared_cifar_dir, out)) == 0
    printed = capsys.readouterr().out
    ours = [line for line in printed.splitlines() if line.startswith("label review")]
    assert len(set(ours)) == 1 and "not in the official order" in ours[0]      # (the CLI repeats summaries)
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["label_review"]
    assert section["official_order"] is False and "not in the official order" in section["order"]["reason"]
    assert set(section) == {"official_order", "order"}
    for n in MODELS:
        assert not set(PER_MODEL_KEYS) & set(metrics[n])
    reference = json.loads((without / "metrics.json").read_text())
    assert _without_volatile(metrics) == _without_volatile(reference)
    assert metrics["stages"] == reference["stages"] + ["label_review"]
    assert not (out / "label_errors_confirmed.png").exists() and not (out / "label_precision_at_k.png").exists()
    text = " ".join((out / "analysis_report.txt").read_text().split())
    start = text.index("Failure triage against human review")
    section_text = text[start:text.index("Summary", start)]
    assert section_text.count("Not done: the loaded test set is not in the official order") == 1
    assert "reviewed:" not in text and "Human review" not in text
