"""Stage: metrics.json, analysis_report.txt and report.html from the other stages.

The report derives no numbers: metrics.json is each stage's `model_metrics`
(merged per model) and `metrics` (under the stage's name), and both reports
render each stage's `sections` in stage order, then this stage's summary.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import PROFILES
from ..io import HTML_REPORT_FILE, METRICS_FILE, REPORT_FILE, RUN_LOG, atomic_write, save_json
from ..registry import BASELINE, IMPROVED
from ..reporting import Document, Paragraph, Section, render_text, write_html
from ..results import Record, transient
from ..runtime import describe_hardware, resolve_device
from .base import Stage, StudyContext



@dataclass
class ReportResult(Record):
    metrics: str          # paths of what was written
    text: str
    html: str
    seconds: float        # the study's wall time when the report was written
    content: str = transient()   # analysis_report.txt as written

    def __str__(self) -> str:
        return self.content or f"report: {self.text}"

    def _repr_markdown_(self) -> str:
        files = f"Written: `{self.metrics}`, `{self.text}`, `{self.html}`"
        return f"{files}\n\n```text\n{self.content}\n```" if self.content else files


class Findings(list):
    """The study's findings (sentences): a bulleted list as text, in a notebook as Markdown."""

    def __str__(self) -> str:
        return "\n".join(f"- {sentence}" for sentence in self)

    def _repr_markdown_(self) -> str:
        return str(self)


class ReportStage(Stage):
    """Renders what the other stages found: metrics.json, analysis_report.txt,
    report.html. It requires every stage before it; the Study hands in those
    that ran or are cached (an analysis never computed is left out)."""

    name = "report"
    title = "Summary"

    def requirements(self, study: StudyContext) -> tuple[str, ...]:
        """Every stage before it (a stage added to STAGES is reported too)."""
        names = [s.name for s in study.stage_list]
        return tuple(names[:names.index(self.name)])

    def done(self, study: StudyContext, results: Mapping[str, Any]) -> list:
        """(stage, result) of the stages that ran, in stage order."""
        return [(s, results[s.name]) for s in study.stage_list if s is not self and s.name in results]

    def build_metrics(self, study: StudyContext, results: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        done = self.done(study, results)
        metrics: dict[str, Any] = {m: {} for m in study.models}
        for s, result in done:
            for m in study.models:
                metrics[m].update(s.model_metrics(study, result, m))
        for s, result in done:
            section = s.metrics(study, result)
            if section is not None:
                metrics[s.name] = section
        metrics.update({
            "config": study.model_config(study.models[0]).to_dict(),
            "profile": study.config.profile,
            "hardware": describe_hardware(resolve_device(study.config.device)),
            "pipeline_seconds": seconds,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "stages": [s.name for s, _ in done],
        })
        return metrics

    def document(self, study: StudyContext, results: Mapping[str, Any], metrics: dict[str, Any]):

        training = results.get("training")
        reused = [n for n, m in training.models.items() if m.reused_checkpoint] if training else []
        seconds = metrics["pipeline_seconds"]
        timing = f"whole pipeline {seconds:.0f} s"
        if reused:  # a rerun: its wall time says nothing about training
            timing = (f"this run {seconds:.0f} s with the {' and '.join(reused)} model{'s' if len(reused) > 1 else ''} "
                      f"loaded from finished checkpoints (training times below are from when they were trained)")
        sections = []
        for s, result in self.done(study, results):
            sections += s.sections(study, result)
        sections.append(Section(self.title, self.summary_blocks(study, results), key=self.name))
        meta = [f"Created {metrics['created']}, profile '{metrics['profile']}', {timing}.",
                f"Hardware: {metrics['hardware']}."]
        return Document("cnnstress analysis report", meta, sections)

    def findings(self, study: StudyContext, results: Mapping[str, Any]) -> Findings:
        """What the study found, one entry per stage in `results` (its
        `finding`), then why a worse improved model may be underfitting:
        sentences built from the typed results, no number written by hand."""
        note = self.underfitting_note(results)
        return Findings([text for _, text in self.stage_findings(study, results)] + ([note] if note else []))

    def stage_findings(self, study: StudyContext, results: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(stage name, its finding) for each stage that ran and has one, in stage order."""
        found = [(s.name, s.finding(study, result)) for s, result in self.done(study, results)]
        return [(name, text) for name, text in found if text]

    def underfitting_note(self, results: Mapping[str, Any]) -> str | None:
        """Why the enhanced augmentation lost accuracy, when it did and the
        improved model also fits its training data less; else None."""
        comparison, training = results.get("comparison"), results.get("training")
        if comparison is None or training is None or comparison.accuracy_diff.diff > 0 \
                or not {BASELINE, IMPROVED} <= set(training.models):   # trained here, not supplied
            return None
        b, i = training.models[BASELINE], training.models[IMPROVED]
        if i.final_train_accuracy >= b.final_train_accuracy:
            return None
        # Augmentation makes the training task harder; in a short run that shows
        # as underfitting rather than as better generalisation.
        return (f"The improved model also fits its training data less ({100 * i.final_train_accuracy:.2f}% vs "
                f"{100 * b.final_train_accuracy:.2f}% training accuracy after {i.epochs} epochs, train-validation "
                f"gap {i.gap_points:+.1f} vs {b.gap_points:+.1f} points): it is still underfitting, and stronger "
                f"augmentation needs more epochs than this run had to pay off (the 'full' profile trains "
                f"{PROFILES['full']['epochs']} epochs on every training image).")

    def summary_blocks(self, study: StudyContext, results: Mapping[str, Any]) -> list:
        """The report's closing section: the findings (Study.findings()), then where the numbers are."""
        comparison = results.get("comparison")
        if comparison is None and len(study.models) == 2:
            return [Paragraph("The comparison did not run; see the sections above.")]
        better = comparison is not None and comparison.accuracy_diff.diff > 0
        note = self.underfitting_note(results)
        verdict = "verdict-good" if better else "verdict-bad"
        blocks = [Paragraph(text, kind=verdict if name == "comparison" else "text")
                  for name, text in self.stage_findings(study, results)]
        if note:
            blocks.append(Paragraph(note, kind="note"))
        npz, csv = (" and ".join(f"{kind}_{n}.{ext}" for n in study.models)
                    for kind, ext in (("predictions", "npz"), ("failures", "csv")))
        blocks.append(Paragraph(f"Files: metrics.json, {npz} hold every number above; {csv} "
                                f"list{'s' if len(study.models) == 1 else ''} each failure."))
        return blocks

    def compute(self, study: StudyContext, inputs: Mapping[str, Any]) -> ReportResult:
        seconds = time.perf_counter() - study.started
        metrics = self.build_metrics(study, inputs, seconds)
        save_json(study.out / METRICS_FILE, metrics)
        doc = self.document(study, inputs, metrics)
        text = render_text(doc)
        path = study.out / REPORT_FILE
        atomic_write(path, lambda tmp: tmp.write_text(text))
        html = write_html(doc, study.out, name=HTML_REPORT_FILE)
        study.timer.lap("report", what=f"{METRICS_FILE}, {REPORT_FILE}, {HTML_REPORT_FILE}")
        study.timer.write(study.out / RUN_LOG, resolve_device(study.config.device), profile=study.config.profile,
                          config=study.config.to_dict())
        return ReportResult(metrics=str(study.out / METRICS_FILE), text=str(path), html=str(html), seconds=seconds,
                            content=text)

    def summary(self, study: StudyContext, result: ReportResult) -> str:
        return f"report: {result.text}, {Path(result.html).name} ({result.seconds:.0f}s in all)"


stage = ReportStage()
