"""The notebook's steps return results that display themselves (issue 21):
each has a Markdown table for Jupyter and, where the command line prints it,
plain text; the numbers are the result's own, not formatted by the Study."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from cnnstress.config import Config, get_config
from cnnstress.data import CLASSES, CifarSplits, Split, SplitCounts
from cnnstress.model import ModelSummary, resnet18, summarise
from cnnstress.results import TestSummary
from cnnstress.stages.comparison import ExampleRow, FailureExamples
from cnnstress.stages.failures import ModelFailures
from cnnstress.stages.report import ReportResult
from cnnstress.study import Setup, Study
from conftest import copy_run


def _split(labels: list[int]) -> Split:
    n = len(labels)
    return Split(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.tensor(labels), torch.arange(n))


def test_model_summary_counts_the_resnet_and_leaves_its_mode():
    model = resnet18().train()
    s = summarise(model)
    assert s == ModelSummary(11_173_962, (2, 3, 32, 32), (2, 10)) and model.training
    assert "| 11,173,962 | (2, 3, 32, 32) | (2, 10) |" in s._repr_markdown_()
    assert str(s) == "parameters: 11,173,962\nforward: input (2, 3, 32, 32) -> logits (2, 10)"
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))    # 12 * 3 + 3 parameters
    assert summarise(tiny, (4, 3, 2, 2)) == ModelSummary(39, (4, 3, 2, 2), (4, 3))


def test_split_counts_per_class():
    splits = CifarSplits(train=_split([0, 0, 1, 9]), val=_split([2]), test=_split([9, 9]))
    counts = splits.counts()
    assert counts.per_class["train"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1] and sum(counts.per_class["test"]) == 2
    md = counts._repr_markdown_().splitlines()
    assert md[0] == "| split | images | " + " | ".join(CLASSES) + " |"
    assert md[2] == "| train | 4 | 2 | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 |"
    assert str(SplitCounts({"val": [1000] + [0] * 9})) == "  val:  1,000 images, per class [1000, 0, 0, 0, 0, 0, 0, 0, 0, 0]"


def test_config_table_says_which_fields_change_the_weights():
    config = get_config("smoke")
    md = config._repr_markdown_()
    assert md.count("\n") == len(config.to_dict()) + 1             # header, rule, one row per field
    assert f"| `epochs` | `{config.epochs}` | training | yes | training epochs |" in md
    assert "| `device` | `'auto'` | runtime | no |" in md
    assert set(config.training_key()) == {line.split("`")[1] for line in md.splitlines()[2:] if "| yes |" in line}
    assert "auto / cpu / cuda" in md                                # a '|' in help text cannot break the table


def test_setup_as_text_and_table():
    s = Setup(version="1.0", profile="quick", epochs=4, seed=42, weights=None, device="cpu", hardware="2 cores",
              data_dir="data", out_dir="outputs")
    assert str(s).splitlines() == ["cnnstress 1.0: profile 'quick', 4 epoch(s), seed 42",
                                   "device: cpu - 2 cores", "data: data   outputs: outputs"]
    assert "| models | trained here |" in s._repr_markdown_()
    published = Setup(**{**s.__dict__, "weights": "results/full"})
    assert "published weights results/full" in str(published)
    assert "| models | published weights `results/full` |" in published._repr_markdown_()


def test_failure_examples_text_and_table():
    ex = FailureExamples(counts={"a": 3, "newly_confident": 1}, rows=[
        ExampleRow("fixed", 17, "cat", "dog", 0.91, "cat", 0.6)])
    assert str(ex).splitlines() == [
        "baseline failures: 3, newly confident: 1", "          fixed: test image    17, true cat        baseline dog (91%), improved cat (60%)"]
    assert "| fixed | 17 | cat | dog (91%) | cat (60%) |" in ex._repr_markdown_()
    assert FailureExamples(counts={"fixed": 0}, rows=[])._repr_markdown_().strip() == "fixed **0**"


def test_model_failures_plot_their_confusion_matrix():
    cm = np.diag(np.arange(1, 11)).tolist()
    summary = TestSummary.from_dict({
        "test_accuracy": 1.0, "n": 55, "loss": 0.1, "per_class_accuracy": dict.fromkeys(CLASSES, 1.0),
        "high_confidence_failures": 0, "threshold": 0.8, "mean_confidence": 0.9, "confusion_matrix": cm,
        "top_confused_pairs": []})
    fig, ax = plt.subplots()
    try:
        assert ModelFailures("baseline", summary).plot_confusion_matrix(ax=ax) is fig
        assert ax.get_title().startswith("baseline: confusion matrix")
    finally:
        plt.close(fig)


def test_report_result_shows_the_report_it_wrote():
    r = ReportResult(metrics="o/metrics.json", text="o/analysis_report.txt", html="o/report.html", seconds=1.0,
                     content="REPORT\nline two")
    assert "```text\nREPORT\nline two\n```" in r._repr_markdown_() and str(r) == "REPORT\nline two"
    assert "content" not in r.to_dict()                                # in memory only, not in metrics.json
    assert str(ReportResult.from_dict(r.to_dict())) == "report: o/analysis_report.txt"


@pytest.mark.slow
def test_the_study_steps_return_these_results(analysed_run, shared_cifar_dir, tmp_path):
    """On a finished run: every step that used to print returns its result,
    and the report step shows the analysis_report.txt it wrote."""
    out = copy_run(analysed_run, tmp_path / "run")
    study = Study(config=Config.load(out / "config.json"), data_dir=shared_cifar_dir, out_dir=out, progress=False,
                  log=None)
    setup = study.describe()
    assert isinstance(setup, Setup) and setup.out_dir == str(out) and setup.device == "cpu"
    assert study.describe_model().parameters == 701_466   # the smoke profile's width 16 (test_model_config.py)
    counts = study.show_data(n=4)
    try:
        assert counts.per_class["test"] == torch.bincount(study.splits.test.labels, minlength=10).tolist()
        assert counts.figure is not None and len(counts.figure.axes) >= 4
    finally:
        plt.close(counts.figure)
    fails = study.failures("baseline")          # the README's Python example reads the table from here
    assert len(fails.table) == fails.summary.high_confidence_failures
    assert fails.predictions.accuracy == pytest.approx(fails.summary.test_accuracy)
    assert [f.dataset_index for f in fails.table.rows[:len(fails.top)]] == [row[0] for row in fails.top]
    examples = study.failure_examples(k=1)
    comparison = study.result("comparison").failures
    assert examples.counts == comparison.counts.to_dict()
    assert [r.dataset_index for r in examples.rows] == [
        int(study.splits.test.indices[getattr(comparison, g)[0]])
        for g in ("fixed", "persisting", "new", "newly_confident") if getattr(comparison, g)]
    report = study.report()
    assert report.content == (out / "analysis_report.txt").read_text()
    for gone in ("config_table", "confusion_matrix", "show_report"):   # presentation left the Study
        assert not hasattr(study, gone), gone
