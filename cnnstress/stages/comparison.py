"""Stage: the paired comparison of the two models on the same test images.

Accuracy difference with a bootstrap interval, McNemar's test, and what
happened to the failures (fixed, persisting, new, newly confident).
Cheap (predictions only), so it is recomputed on every run, never cached.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


from ..compare import compare_models
from ..data import CLASSES
from ..plots import FigureSpec, plot_confusion_matrices, plot_model_comparison
from ..reporting import Paragraph, Section
from ..results import Comparison
from .base import Stage, StudyContext, save_figures



GROUPS = ("fixed", "persisting", "new", "newly_confident")   # FailureGroups' image lists, in this order
# FailureCounts' fields as a reader says them
COUNT_WORDS = {"still_high_confidence": "still above the threshold",
               "wrong_low_confidence": "still wrong, less confident", "newly_confident": "newly confident"}


@dataclass(frozen=True)
class ExampleRow:
    """One test image of a failure group: its label and both models' predictions (a: the reference)."""
    group: str
    dataset_index: int
    true: str
    a_pred: str
    a_confidence: float
    b_pred: str
    b_confidence: float


@dataclass(frozen=True)
class FailureExamples:
    """The failure groups' sizes and a few test images of each (Study.failure_examples());
    lines as text, a table in a notebook."""
    counts: dict[str, int]
    rows: list[ExampleRow]
    models: tuple[str, str] = ("baseline", "improved")   # a, b

    def words(self) -> list[tuple[str, int]]:
        named = {"a": f"{self.models[0]} failures", "b": f"{self.models[1]} failures", **COUNT_WORDS}
        return [(named.get(k, k), v) for k, v in self.counts.items()]

    def __str__(self) -> str:
        return "\n".join([", ".join(f"{k}: {v}" for k, v in self.words())] + [
            f"{r.group:>15}: test image {r.dataset_index:>5}, true {r.true:<10} {self.models[0]} {r.a_pred} "
            f"({r.a_confidence:.0%}), {self.models[1]} {r.b_pred} ({r.b_confidence:.0%})" for r in self.rows])

    def _repr_markdown_(self) -> str:
        head = ", ".join(f"{k} **{v}**" for k, v in self.words()) + "\n\n"
        if not self.rows:
            return head
        a, b = self.models
        return head + f"| group | test image | true | {a} | {b} |\n|---|---|---|---|---|\n" + "\n".join(
            f"| {r.group} | {r.dataset_index} | {r.true} | {r.a_pred} ({r.a_confidence:.0%}) | "
            f"{r.b_pred} ({r.b_confidence:.0%}) |" for r in self.rows)


class ComparisonStage(Stage):
    name = "comparison"
    title = "What the enhanced augmentation changed"
    requires = ("failures",)
    n_boot = 2000

    def enabled(self, study: StudyContext) -> bool:
        """Only between two models (the reference first)."""
        return len(study.models) == 2

    def compute(self, study: StudyContext, inputs: Mapping[str, Any]) -> Comparison:
        failures = inputs["failures"]
        pair = study.models
        preds = {n: failures.predictions[n] for n in pair}
        tables = {n: failures.tables[n] for n in pair}
        base_cfg, imp_cfg = (study.model_config(n) for n in pair)
        result = Comparison.from_dict({
            "config_diff": {k: list(v) for k, v in base_cfg.diff(imp_cfg).items()},
            **compare_models(preds, tables, study.config, n_boot=self.n_boot)})
        return dataclasses.replace(result, per_class_accuracy={
            n: failures.models[n].summary.per_class_accuracy for n in pair})

    def lap(self, study: StudyContext, result: Comparison) -> None:
        study.timer.lap("compare")

    def figures(self, study: StudyContext, result: Comparison, *, inputs: Mapping[str, Any] | None = None,
                show: bool = False) -> list:
        """confusion_matrix.png (a panel per model) and model_comparison.png
        (accuracy, per-class accuracy, failure bars split by the comparison's groups)."""
        models = inputs["failures"].models
        summaries = {n: m.summary.to_dict() for n, m in models.items()}
        figures = {"model_comparison.png": FigureSpec(plot_model_comparison, summaries,
                                                      failure_groups=result.failures.counts.to_dict()),
                   "confusion_matrix.png": FigureSpec(plot_confusion_matrices, summaries)}
        return save_figures(figures, study.out, show=show)

    def examples(self, study: StudyContext, result: Comparison, failures: Any, k: int = 3) -> "FailureExamples":
        """The failure groups' counts and up to `k` test images of each group
        (`failures`: the failures stage's result, with the predictions)."""
        test = study.splits.test
        base, imp = (failures.predictions[n] for n in study.models)
        groups = result.failures
        rows = [ExampleRow(group=kind, dataset_index=int(test.indices[pos]), true=CLASSES[int(base.labels[pos])],
                           a_pred=CLASSES[int(base.preds[pos])], a_confidence=float(base.confidence[pos]),
                           b_pred=CLASSES[int(imp.preds[pos])], b_confidence=float(imp.confidence[pos]))
                for kind in GROUPS for pos in getattr(groups, kind)[:k]]
        return FailureExamples(counts=groups.counts.to_dict(), rows=rows, models=tuple(study.models))

    def summary(self, study: StudyContext, result: Comparison) -> str:
        d, fc = result.accuracy_diff, result.failures.counts
        return (f"comparison: test accuracy {100 * d.acc_a:.2f}% -> {100 * d.acc_b:.2f}% ({100 * d.diff:+.2f} points, "
                f"{d.confidence:.0%} interval [{100 * d.low:+.2f}, {100 * d.high:+.2f}]), McNemar p = "
                f"{result.mcnemar.p_value:.3g}; failures {fc.a} -> {fc.b}: {fc.fixed} fixed, "
                f"{fc.still_high_confidence} persist, {fc.new} new, {fc.newly_confident} newly confident")

    def finding(self, study: StudyContext, result: Comparison) -> str:
        d, mc, fc = result.accuracy_diff, result.mcnemar, result.failures.counts
        a, b = study.models
        t = study.config.failure_threshold if result.threshold is None else result.threshold
        change = ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in (result.config_diff or {}).items()) or "nothing"
        moved = (f"{'raised' if d.diff > 0 else 'lowered'} test accuracy by {abs(100 * d.diff):.2f} points"
                 if d.diff else "left test accuracy unchanged")
        sig = "significant" if mc.p_value < 0.05 else "not significant"
        lead = f"Changing only {change}" if not study.supplied else f"Compared with {a}, {b}"
        return (f"{lead} {moved} ({d.confidence:.0%} paired-bootstrap interval "
                f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}]; McNemar p = {mc.p_value:.3g}, {sig} at 5%). "
                f"Of the {a}'s {fc.a} failures above {t:.0%} confidence, {fc.fixed} were fixed and "
                f"{fc.still_high_confidence} stayed above it; of the {b} model's {fc.b}, {fc.new} are new (the "
                f"{a} was right) and {fc.newly_confident} newly confident (the {a} was wrong, less sure).")

    def metrics(self, study: StudyContext, result: Comparison) -> dict[str, Any]:
        return result.to_dict()

    def sections(self, study: StudyContext, result: Comparison) -> list:
        diff, mc, fc, t = result.accuracy_diff, result.mcnemar, result.failures.counts, result.threshold
        a, b = study.models
        sig = "significant" if mc.p_value < 0.05 else "not significant"
        blocks = [
            Paragraph(f"Test accuracy {100 * diff.acc_a:.2f}% -> {100 * diff.acc_b:.2f}%: {100 * diff.diff:+.2f} "
                      f"points, {100 * diff.confidence:.0f}% paired-bootstrap interval [{100 * diff.low:+.2f}, "
                      f"{100 * diff.high:+.2f}] ({diff.n_boot} resamples)."),
            Paragraph(f"McNemar's test on the paired predictions ({mc.method}): {mc.b} images only the {a} "
                      f"gets right, {mc.c} only the {b} model gets right; statistic {mc.statistic:.2f}, "
                      f"p = {mc.p_value:.3g} ({sig} at 5%).",
                      kind="verdict-good" if mc.p_value < 0.05 and diff.diff > 0 else
                      "verdict-bad" if mc.p_value < 0.05 else "note"),
            Paragraph(f"High-confidence failures {fc.a} -> {fc.b}. Of the {a}'s {fc.a}: {fc.fixed} "
                      f"fixed (now correct), {fc.persisting} still wrong ({fc.still_high_confidence} still "
                      f"above {t:.0%} confidence, {fc.wrong_low_confidence} wrong with less confidence). "
                      f"Of the {b} model's {fc.b}: {fc.still_high_confidence} persist from the {a}'s, "
                      f"{fc.new} new (the {a} predicted the image correctly) and {fc.newly_confident} newly "
                      f"confident (the {a} got the image wrong too, with at most {t:.0%} confidence)."),
        ]
        if result.per_class_accuracy is not None:
            base, imp = (result.per_class_accuracy[n] for n in study.models)
            gains = sorted(((imp[c] or 0) - (base[c] or 0), c) for c in CLASSES)
            blocks.append(Paragraph(f"Largest per-class gain: {gains[-1][1]} ({100 * gains[-1][0]:+.1f} points); "
                                    f"smallest: {gains[0][1]} ({100 * gains[0][0]:+.1f} points)."))
        title = self.title if not study.supplied else f"What changes from {a} to {b}"
        return [Section(title, blocks, key=self.name)]


stage = ComparisonStage()
