"""The stage contract: a new stage is one class plus one line in STAGES.

A toy stage registered in the list is run by `python -m cnnstress run`,
cached in its own file (a second run reuses it), reported in metrics.json
(per model and under its name) and in both reports; the Study runs single
stages after a "kernel restart" from the caches.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest

from cnnstress import stages
from cnnstress.__main__ import main
from cnnstress.reporting import Paragraph, Section
from cnnstress.results import Record
from cnnstress.stages.base import Stage
from conftest import cli


@dataclass
class ToyResult(Record):
    wrong: dict[str, int]       # wrong test predictions per model
    total: int


class ToyStage(Stage):
    name = "toy"
    title = "Toy stage: wrong predictions"
    config_groups = ("failures",)
    computed = 0

    def run(self, study, *, force=False, show=False):
        from cnnstress.stages.failures import stage as failures
        path = study.out / "toy.json"
        key = self.cache_key(study)
        cached = None if force else self.read_cache(study, path, key, ToyResult)
        if cached is not None:
            return cached
        ToyStage.computed += 1
        wrong = {}
        for n in study.models:
            p = failures.predictions(study, n)
            wrong[n] = int((p.preds != p.labels).sum())
        result = ToyResult(wrong=wrong, total=sum(wrong.values()))
        self.write_cache(study, path, key, result)
        return result

    def summary(self, study, result):
        return f"toy: {result.total} wrong predictions in all"

    def model_metrics(self, study, result, model):
        return {"toy_wrong": result.wrong[model]}

    def metrics(self, study, result):
        return result.to_dict()

    def sections(self, study, result):
        return [Section(self.title, [Paragraph(f"The two models make {result.total} wrong predictions in all "
                                               "(toy stage).")], key=self.name)]


@pytest.fixture
def toy_registered(monkeypatch):
    toy = ToyStage()
    ToyStage.computed = 0
    monkeypatch.setattr(stages, "STAGES", [*stages.STAGES[:-1], toy, stages.STAGES[-1]])   # before the report
    return toy


def test_a_registered_stage_is_run_cached_and_reported(toy_registered, analysed_run, shared_cifar_dir,
                                                       tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(analysed_run, out)        # trained models and caches: only the toy stage is new
    assert main(cli("run", shared_cifar_dir, out)) == 0
    printed = capsys.readouterr().out
    assert ToyStage.computed == 1 and (out / "toy.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = {n: json.loads((analysed_run / "metrics.json").read_text())[n] for n in ("baseline", "improved")}
    for n in ("baseline", "improved"):     # an independent count: accuracy x images from the original run
        assert metrics[n]["toy_wrong"] == round(predictions[n]["n"] * (1 - predictions[n]["test_accuracy"]))
    assert metrics["toy"]["total"] == metrics["baseline"]["toy_wrong"] + metrics["improved"]["toy_wrong"]
    assert metrics["stages"][-1] == "toy"
    text = (out / "analysis_report.txt").read_text()
    html = (out / "report.html").read_text()
    assert "Toy stage: wrong predictions" in text and "(toy stage)" in text
    assert "Toy stage: wrong predictions" in html and "(toy stage)" in html
    # the toy section comes after the explanations and before the summary, numbered in order
    assert text.index("Can the explanations and the failures be trusted?") < text.index("Toy stage") \
        < text.index("Summary")
    assert f"toy: {metrics['toy']['total']} wrong predictions in all" in printed
    # a second run reuses the toy cache
    assert main(cli("run", shared_cifar_dir, out)) == 0
    assert ToyStage.computed == 1
    # a changed setting of its config group (the failure threshold) invalidates it
    assert main(cli("run", shared_cifar_dir, out, "--threshold", "0.5")) == 0
    assert ToyStage.computed == 2


def test_study_after_a_restart_reads_every_stage_from_the_caches(analysed_run, shared_cifar_dir, tmp_path):
    """A fresh Study (a new kernel) on a finished run, with the run's saved
    config: the report alone fills every stage in from the caches, trains
    nothing and recomputes no analysis."""
    from cnnstress.config import Config
    from cnnstress.study import Study

    out = tmp_path / "run"
    shutil.copytree(analysed_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stress_baseline.json", out / "explanations.json",
                                                     out / "baseline" / "checkpoint.pt")}
    lines = []
    study = Study(config=Config.load(out / "config.json"), data_dir=shared_cifar_dir, out_dir=out, progress=False,
                  log=lines.append)
    study.report()
    assert set(study.results) == {"training", "failures", "comparison", "stress", "explanations", "label_review",
                                  "report"}
    for p in (out / "stress_baseline.json", out / "explanations.json", out / "baseline" / "checkpoint.pt"):
        assert p.stat().st_mtime_ns == before[p.name], p
    assert any("reusing" in line for line in lines) and not any("train loss" in line for line in lines)
    original = json.loads((analysed_run / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    for key in ("baseline", "improved", "comparison", "stress", "explanations"):
        a, b = dict(original[key]), dict(again[key])
        for volatile in ("train_seconds", "reused_checkpoint", "checkpoint"):
            a.pop(volatile, None), b.pop(volatile, None)
        assert a == b, key


def test_stage_names_are_unique_and_the_report_is_last():
    names = [s.name for s in stages.STAGES]
    assert len(names) == len(set(names)) and names[-1] == "report"
    assert names == ["training", "failures", "comparison", "stress", "explanations", "label_review", "report"]
    with pytest.raises(KeyError, match="no stage 'nope'"):
        stages.get_stage("nope")
