"""The stage contract: a new stage is one class plus one line in STAGES.

A toy stage registered in the list is run by `python -m cnnstress run`,
cached in its own file (a second run reuses it), reported in metrics.json
(per model and under its name) and in both reports; the Study runs single
stages after a "kernel restart" from the caches.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from cnnstress import stages
from cnnstress.__main__ import main
from cnnstress.reporting import Paragraph, Section
from cnnstress.results import Record
from cnnstress.stages.base import CachedStage, Stage
from conftest import cli, copy_run


@dataclass
class ToyResult(Record):
    wrong: dict[str, int]       # wrong test predictions per model
    total: int
    fixed: int                  # the comparison's fixed failures, as handed in


class ToyStage(CachedStage):
    """Reads two stages' results (failures and comparison) without importing
    or running either: the Study hands them in."""

    name = "toy"
    title = "Toy stage: wrong predictions"
    config_groups = ("failures",)
    requires = ("failures", "comparison")
    unit_type = ToyResult
    command = "run"
    computed = 0
    handed: list = []

    def cache_units(self, study):
        return {"toy": study.out / "toy.json"}

    def compute_units(self, study, inputs, units):
        ToyStage.computed += 1
        ToyStage.handed = sorted(inputs)
        preds = inputs["failures"].predictions
        wrong = {n: int((preds[n].preds != preds[n].labels).sum()) for n in study.models}
        return {"toy": ToyResult(wrong=wrong, total=sum(wrong.values()),
                                 fixed=inputs["comparison"].failures.counts.fixed)}

    def assemble(self, study, inputs, parts):
        return parts["toy"]

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


@pytest.mark.slow
def test_a_registered_stage_is_run_cached_and_reported(toy_registered, analysed_run, shared_cifar_dir,
                                                       tmp_path, capsys):
    out = tmp_path / "run"
    copy_run(analysed_run, out)        # trained models and caches: only the toy stage is new
    assert main(cli("run", shared_cifar_dir, out)) == 0
    printed = capsys.readouterr().out
    assert ToyStage.computed == 1 and (out / "toy.json").is_file()
    assert ToyStage.handed == ["comparison", "failures"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["toy"]["fixed"] == metrics["comparison"]["failures"]["counts"]["fixed"]
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
    capsys.readouterr()                # the next check reads the third run's log alone
    # a changed setting of its config group invalidates it (top_failures: a failures field that
    # no built-in cached stage keys on, so nothing else is recomputed)
    assert main(cli("run", shared_cifar_dir, out, "--top-failures", "2")) == 0
    assert ToyStage.computed == 2
    assert "explanations: reusing" in capsys.readouterr().out


@pytest.mark.slow
def test_study_after_a_restart_reads_every_stage_from_the_caches(analysed_run, shared_cifar_dir, tmp_path):
    """A fresh Study (a new kernel) on a finished run, with the run's saved
    config: the report alone fills every stage in from the caches, trains
    nothing and recomputes no analysis."""
    from cnnstress.config import Config
    from cnnstress.study import Study

    out = tmp_path / "run"
    copy_run(analysed_run, out)
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


def test_a_stage_is_handed_what_it_requires_and_each_stage_runs_once(monkeypatch, tmp_path):
    """C requires A and B, B requires A: asking for C runs A once, then B,
    then C with both results; C never names another stage's module. A
    required analysis with nothing cached is left out of the inputs (not
    computed behind the user's back)."""
    from cnnstress.study import Study

    @dataclass
    class Num(Record):
        value: int

    runs, handed = [], {}

    class Part(Stage):
        def compute(self, study, inputs):
            runs.append(self.name)
            handed[self.name] = dict(inputs)
            return Num(value=len(self.name) + sum(r.value for r in inputs.values()))

    class A(Part):
        name = "a"

    class B(Part):
        name = "b"
        requires = ("a",)

    class Absent(CachedStage):
        name = "absent"
        analysis = True
        unit_type = Num

        def cache_units(self, study):
            return {"absent": study.out / "absent.json"}

        def unit_key(self, study, unit):
            return {"stage": "absent", "models": {"m": "stamp"}}

        def compute_units(self, study, inputs, units):
            raise AssertionError("a required analysis was computed")

    class C(Part):
        name = "c"
        requires = ("a", "b", "absent")

    monkeypatch.setattr(stages, "STAGES", [A(), B(), Absent(), C()])
    study = Study("smoke", data_dir=tmp_path / "data", out_dir=tmp_path / "out", log=None)
    result = study.run_stage("c")
    assert runs == ["a", "b", "c"]
    assert set(handed["c"]) == {"a", "b"} and handed["c"]["a"] is study.results["a"]
    assert handed["b"]["a"] is study.results["a"]
    assert result.value == 1 + (1 + 1) + 1          # c + b (b + a) + a
    assert "absent" in study.skipped
    study.run_stage("c")                              # again: only c reruns, a and b are this session's
    assert runs == ["a", "b", "c", "c"]


def test_the_memo_keeps_what_a_settings_change_does_not_touch(monkeypatch, tmp_path):
    """Study.set drops exactly the results whose fingerprint changed: the
    stages of the changed Config group and those requiring them."""
    from cnnstress.study import Study

    @dataclass
    class Num(Record):
        value: int

    runs = []

    class Part(Stage):
        def compute(self, study, inputs):
            runs.append(self.name)
            return Num(value=len(runs))

    class Attacks(Part):
        name, config_groups = "attacks", ("stress",)

    class Maps(Part):
        name, config_groups = "maps", ("explanations",)

    class Both(Part):
        name, requires = "both", ("attacks", "maps")

    monkeypatch.setattr(stages, "STAGES", [Attacks(), Maps(), Both()])
    study = Study("smoke", data_dir=tmp_path / "data", out_dir=tmp_path / "out", log=None)
    study.run_stage("both")
    assert runs == ["attacks", "maps", "both"]
    study.set(pgd_steps=study.config.pgd_steps + 1)
    assert set(study.results) == {"maps"}              # attacks changed, and both requires it
    study.result("both")
    assert runs == ["attacks", "maps", "both", "attacks", "both"]
    study.set(pgd_steps=study.config.pgd_steps)        # no change: everything kept
    assert set(study.results) == {"attacks", "maps", "both"}


def test_kept_steps_match_their_key_by_identity_for_objects(tmp_path):
    from cnnstress.study import Study
    study = Study("smoke", data_dir=tmp_path / "data", out_dir=tmp_path / "out", log=None)
    model, other = object(), object()
    assert study.keep("predictions:m", (model, 0.8), "p") == "p"
    assert study.recall("predictions:m", (model, 0.8)) == "p"
    assert study.recall("predictions:m", (other, 0.8)) is None     # another (retrained) model
    assert study.recall("predictions:m", (model, 0.9)) is None     # another threshold
    assert study.recall("predictions:x", (model, 0.8)) is None
