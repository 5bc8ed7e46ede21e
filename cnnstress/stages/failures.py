"""Stage: test predictions, high-confidence failures, and Grad-CAM of the top ones.

Writes predictions_<model>.npz (the cache: reused when made from the same
checkpoint and test images), failures_<model>.csv, failure_case_<i>.png
(the baseline's top `top_failures`, or one "no failures" figure),
confusion_matrix.png and model_comparison.png once both models are evaluated.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..augment import normalize, to_float
from ..data import CLASSES
from ..evaluate import FailureTable, Predictions, evaluate_split, mine_failures, summarize
from ..io import atomic_write, ensure_writable_dir, predictions_path, remove_file
from ..plots import (FigureSpec, plot_confusion_matrices, plot_confusion_matrix, plot_failure_case, plot_no_failures,
                     write_figure)
from ..reporting import Figure, Paragraph, Section, Table, pct, per_model
from ..results import Record, TestSummary, transient
from ..runtime import resolve_device, resolve_precision
from ..weights import describe_reference
from ..xai import GradCAM, applicable_review, get_layer, label_suspects, review_note
from ..xai.cam import describe_cam
from .base import Stage, StudyContext, save_figures


SUSPECT_NOTE = "suspected label error (confident learning)"
SUSPECT_NOTE_WEAK = "label suspect (confident learning; unreliable for this model, see report)"
TABLE_ROWS = 10  # failures listed when a result is shown in a notebook


@dataclass
class CamRegion(Record):
    """Where a Grad-CAM map's mass lies (xai.cam.describe_cam): pixels, 32x32 image."""
    region: str
    peak_region: str
    centroid: list[float]
    peak: list[int]
    centre_fraction: float

    @property
    def all_zero(self) -> bool:
        """No positive evidence for the class at this layer (xai.cam.describe_cam's 'nowhere')."""
        return self.peak_region.startswith("nowhere")

    def short(self) -> str:
        """'peaks at the centre', or 'is all zero' (the log line)."""
        return "is all zero" if self.all_zero else f"peaks at the {self.peak_region}"

    def words(self) -> str:
        if self.all_zero:
            return "is all zero (no positive evidence for the class at this layer)"
        return (f"peaks at the {self.peak_region} (peak at row {self.peak[0]}, col {self.peak[1]}; centroid row "
                f"{self.centroid[0]:.0f}, col {self.centroid[1]:.0f}; {100 * self.centre_fraction:.0f}% of the "
                f"mass in the central quarter)")


@dataclass
class FailureCase(Record):
    """One explained failure of the baseline."""
    rank: int
    position: int                 # index in the loaded test split
    dataset_index: int            # index in the official test set
    true: int
    pred: int
    confidence: float             # probability of `pred`, [0, 1]
    top3: list[list[float]]       # [[class id, probability], ...] most probable first
    where_pred: CamRegion
    where_true: CamRegion
    figure: str | None = None
    label_suspect: bool = False   # confident learning flags the label as possibly wrong
    improved_pred: int | None = None
    improved_confidence: float | None = None
    review: str | None = None     # the human review's verdict and votes (xai.label_review.review_note)


@dataclass
class ModelFailures(Record):
    """One model's test results: the summary (metrics.json) and its top failures."""
    name: str
    summary: TestSummary
    top: list[list[Any]] = field(default_factory=list)  # [dataset_index, true, pred, confidence] of the top rows
    predictions: Predictions = transient()   # in memory only: the test predictions
    table: FailureTable = transient()        # and the ranked failures (failures_<name>.csv)

    def _repr_markdown_(self) -> str:
        s = self.summary
        head = (f"**{self.name}**: test accuracy {100 * s.test_accuracy:.2f}% on {s.n:,} images; "
                f"{s.high_confidence_failures} failures above {s.threshold:.0%} confidence\n\n")
        if not self.top:
            return head
        rows = [f"| {i} | {d} | {CLASSES[t]} | {CLASSES[p]} | {100 * c:.1f}% |"
                for i, (d, t, p, c) in enumerate(self.top, 1)]
        return head + "| rank | test image | true | predicted | confidence |\n|---|---|---|---|---|\n" + "\n".join(rows)

    def plot_confusion_matrix(self, ax=None):
        """This model's test confusion matrix (rows true, columns predicted); returns the Figure."""
        return plot_confusion_matrix(np.asarray(self.summary.confusion_matrix), title=f"{self.name}: confusion matrix",
                                     ax=ax)


@dataclass
class FailuresResult(Record):
    models: dict[str, ModelFailures]
    threshold: float
    top_failures: int
    cases: list[FailureCase] = field(default_factory=list)
    # What later stages read, in memory only: model -> evaluate.Predictions / evaluate.FailureTable.
    predictions: dict[str, Predictions] = transient()
    tables: dict[str, FailureTable] = transient()
    suspects_reliable: bool | None = transient()   # confident learning trustworthy for the explained model


def read_predictions(path: Path, stamp: str, indices: np.ndarray, log,
                     labels: np.ndarray | None = None) -> Predictions | None:
    """The cached Predictions when `path` holds this checkpoint's predictions
    for these test images (and these `labels`), with the shapes, dtypes and
    values `predictions` writes: a cache that makes no sense is a miss."""
    n = indices.shape[0]
    try:
        # The zip directory bounds what np.load may inflate: a small file must not unpack to gigabytes.
        with zipfile.ZipFile(path) as z:
            inflated = sum(info.file_size for info in z.infolist())
        if inflated > 256 * n + (1 << 20):
            if log:
                log(f"predictions: {path} would inflate to {inflated >> 20} MB, far more than {n} predictions; "
                    "recomputing")
            return None
        with np.load(path, allow_pickle=False) as cached:
            if (str(cached["checkpoint_stamp"]) != stamp
                    or not np.array_equal(cached["dataset_indices"], indices)):
                return None
            arrays = {k: cached[k] for k in ("logits", "probs", "preds", "labels")}
    except Exception as exc:  # truncated, not a zip, not numpy, a missing array: all a cache miss
        if log:
            log(f"predictions: {path} is unreadable ({type(exc).__name__}); recomputing")
        return None
    shapes = {"logits": (n, len(CLASSES)), "probs": (n, len(CLASSES)), "preds": (n,), "labels": (n,)}
    bad = [k for k, a in arrays.items()
           if a.shape != shapes[k] or a.dtype.kind != ("f" if k in ("logits", "probs") else "i")]
    if not bad:
        bad = [k for k, ok in _sensible(arrays, labels).items() if not ok]
    if bad:
        if log:
            log(f"predictions: {path} holds a malformed {bad[0]} array; recomputing")
        return None
    return Predictions(**{k: torch.from_numpy(a) for k, a in arrays.items()})


def _sensible(arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> dict[str, bool]:
    """Per array, whether its values are possible: finite logits, probabilities
    that are their softmax's (in [0, 1], rows summing to 1), predictions that
    are classes (their argmax), the split's labels."""
    logits, probs, preds = arrays["logits"], arrays["probs"], arrays["preds"]
    with np.errstate(all="ignore"):
        finite = bool(np.isfinite(logits).all())
        probs_ok = bool(np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
                        and np.allclose(probs.sum(1), 1, atol=1e-3))
    classes = len(CLASSES)
    preds_ok = bool(((preds >= 0) & (preds < classes)).all()) and (
        not finite or preds.size == 0 or bool((preds == logits.argmax(1)).all()))
    labels_ok = bool(((arrays["labels"] >= 0) & (arrays["labels"] < classes)).all()) and (
        labels is None or np.array_equal(arrays["labels"], labels))
    return {"logits": finite, "probs": probs_ok, "preds": preds_ok, "labels": labels_ok}


class FailuresStage(Stage):
    name = "failures"
    title = "Test results"
    config_groups = ("failures",)   # the threshold and how many cases; the cases' CAM layer below

    def settings(self, study: StudyContext) -> dict[str, Any]:
        return {**super().settings(study), "cam_layer": study.cam_layer(study.models[0])}

    # --- one model ---------------------------------------------------------
    def predictions(self, study: StudyContext, name: str, *, force: bool = False) -> Predictions:
        """Test-set predictions of model `name`, cached as predictions_<name>.npz
        (probs (N,10) float32, labels, preds, logits, dataset indices)."""
        trained = study.model(name)
        kept = study.recall(f"predictions:{name}", (trained,))
        if kept is not None and not force:
            return kept
        split = study.splits.test
        path = predictions_path(study.out, name)
        stamp = study.model_stamp(name)
        indices = split.indices.numpy()
        preds = None
        if path.exists() and not force and stamp:
            preds = read_predictions(path, stamp, indices, study.log, split.labels.numpy())
        if preds is None:
            preds = evaluate_split(trained, split)
            ensure_writable_dir(study.out)
            arrays = dict(probs=preds.probs.numpy(), labels=preds.labels.numpy(), preds=preds.preds.numpy(),
                          logits=preds.logits.numpy(), dataset_indices=indices,
                          checkpoint_stamp=np.array(stamp), classes=np.array(CLASSES))

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                    np.savez_compressed(f, **arrays)
            atomic_write(path, write)
        study.timer.lap(f"evaluate {name}", len(split), "test images, or read from the cache")
        return study.keep(f"predictions:{name}", (trained,), preds)

    def table(self, study: StudyContext, name: str) -> FailureTable:
        """Wrong predictions above config.failure_threshold, ranked, saved as failures_<name>.csv."""
        preds = self.predictions(study, name)
        key = (preds, study.config.failure_threshold)
        table = study.recall(f"failure_table:{name}", key)
        if table is None:
            table = mine_failures(preds.probs, preds.labels, study.config.failure_threshold,
                                  dataset_indices=study.splits.test.indices)
            table.to_csv(study.out / f"failures_{name}.csv")
            study.keep(f"failure_table:{name}", key, table)
        return table

    def evaluate_one(self, study: StudyContext, name: str, *, quiet: bool = False) -> ModelFailures:
        preds = self.predictions(study, name)
        table = self.table(study, name)
        summary = TestSummary.from_dict(summarize(preds, study.config.failure_threshold))
        result = ModelFailures(name=name, summary=summary,
                               top=[[f.dataset_index, f.true, f.pred, f.confidence] for f in table.rows[:TABLE_ROWS]],
                               predictions=preds, table=table)
        study.keep(f"model_failures:{name}", (table,), result)
        if quiet:
            return result
        study.say(f"{name}: test accuracy {100 * preds.accuracy:.2f}%, "
                  f"{len(table)} failures above {study.config.failure_threshold:.0%} confidence")
        trained = study.model(name)
        if trained.reference:
            device = resolve_device(study.config.device)
            precision = resolve_precision(study.config.precision, device)
            study.say(f"{name}: " + describe_reference(trained.reference, summary.to_dict(),
                                                       f"{device}, {str(precision or 'fp32').replace('torch.', '')}"))
        return result

    def model_result(self, study: StudyContext, name: str, *, quiet: bool = True) -> ModelFailures:
        """Model `name`'s results: the ones a step of this session made with the
        current settings (a notebook cell), else evaluated now."""
        done = study.recall(f"model_failures:{name}", (self.table(study, name),))
        return done if done is not None else self.evaluate_one(study, name, quiet=quiet)

    # --- Grad-CAM of the baseline's top failures ---------------------------
    def explain_cases(self, study: StudyContext, *, show: bool = False, name: str | None = None) -> list[FailureCase]:
        """Grad-CAM for the predicted and the true class of the top failures;
        writes failure_case_<i>.png (or a 'no failures' figure). name: the
        model explained, default the first (the reference)."""
        name = name or study.models[0]
        trained = study.model(name)
        table = self.table(study, name)
        preds = self.predictions(study, name)
        config = study.config
        out = study.out
        rows = table.rows[:config.top_failures]
        drawn = {f"failure_case_{i + 1}.png" for i in range(max(1, len(rows)))}
        for stale in out.glob("failure_case_*.png"):   # cases of an earlier run beyond this one's
            if stale.name not in drawn:
                remove_file(stale)
        if not rows:
            write_figure(FigureSpec(plot_no_failures, config.failure_threshold, name), out / "failure_case_1.png",
                         show=show)
            return study.keep("cases", self.cases_key(study, name), [])
        suspects = label_suspects(preds, table)
        flagged = set(suspects["suspect_failure_positions"])
        _, review = applicable_review(study.splits.test.labels, study.splits.test.indices)  # {} unless official
        device = resolve_device(config.device)
        positions = torch.tensor([f.position for f in rows])
        images = study.splits.test.images[positions]
        x = normalize(to_float(images)).to(device)
        cam = GradCAM(trained.model, get_layer(trained.model, study.cam_layer(name)))
        pred_maps = cam(x, [f.pred for f in rows]).cpu().numpy()
        true_maps = cam(x, [f.true for f in rows]).cpu().numpy()
        # The improved model's verdict on each case, when this session has its predictions already.
        other = study.models[1] if len(study.models) == 2 else None
        improved = (study.recall(f"predictions:{other}", (study.trained[other],))
                    if other in study.trained else None)
        cases = []
        for i, f in enumerate(rows):
            suspect = f.position in flagged
            reviewed = review_note(review[f.dataset_index], CLASSES) if f.dataset_index in review else None
            notes = [(SUSPECT_NOTE if suspects["reliable"] else SUSPECT_NOTE_WEAK) if suspect else None, reviewed]
            spec = FigureSpec(
                plot_failure_case, images[i].permute(1, 2, 0).numpy(), pred_maps[i], true_maps[i],
                true_name=CLASSES[f.true], pred_name=CLASSES[f.pred], confidence=f.confidence,
                top3=[(CLASSES[c], p) for c, p in f.top3],
                title=f"{name} failure #{i + 1}: test image {f.dataset_index}",
                note="\n".join(n for n in notes if n) or None)
            path = write_figure(spec, out / f"failure_case_{i + 1}.png", show=show)
            case = FailureCase(
                rank=i + 1, position=f.position, dataset_index=f.dataset_index, true=f.true, pred=f.pred,
                confidence=f.confidence, top3=[[c, p] for c, p in f.top3],
                where_pred=CamRegion.from_dict(_plain(describe_cam(pred_maps[i]))),
                where_true=CamRegion.from_dict(_plain(describe_cam(true_maps[i]))),
                figure=path.name, label_suspect=suspect, review=reviewed)
            if improved is not None:
                p = int(improved.preds[f.position])
                case.improved_pred, case.improved_confidence = p, float(improved.probs[f.position, p])
            cases.append(case)
        for c in cases:
            study.say(f"case {c.rank}: {CLASSES[c.true]} taken for {CLASSES[c.pred]} ({c.confidence:.0%}); "
                      f"predicted-class map {c.where_pred.short()}, true-class map {c.where_true.short()}"
                      + ("; suspected label error" if c.label_suspect else "")
                      + (f"; {c.review}" if c.review else ""))
        study.timer.lap("failures gradcam", what="Grad-CAM figures of the top failures")
        return study.keep("cases", self.cases_key(study, name), cases)

    def cases_key(self, study: StudyContext, name: str | None = None) -> tuple:
        """What the Grad-CAM cases are made from: the model's failure table and the case settings."""
        name = name or study.models[0]
        return (self.table(study, name), study.config.top_failures, study.cam_layer(name))

    # --- the contract ------------------------------------------------------
    def run(self, study: StudyContext, inputs: Mapping[str, Any], *, force: bool = False, show: bool = False,
            cached_only: bool = False) -> FailuresResult:
        models = {}
        for name in study.models:
            if force:
                self.predictions(study, name, force=True)
            models[name] = self.evaluate_one(study, name) if force else self.model_result(study, name, quiet=False)
        cases = None if force else study.recall("cases", self.cases_key(study))
        if cases is None:
            cases = self.explain_cases(study, show=show)
        if len(study.models) == 2:   # cases drawn before the other model existed (notebook stage 8)
            improved = self.predictions(study, study.models[1])
            for c in cases:
                if c.improved_pred is None:
                    c.improved_pred = int(improved.preds[c.position])
                    c.improved_confidence = float(improved.probs[c.position, c.improved_pred])
        if len(study.models) == 1:   # with two, the comparison stage draws both side by side
            save_figures({"confusion_matrix.png": FigureSpec(
                plot_confusion_matrices, {n: m.summary.to_dict() for n, m in models.items()})}, study.out, show=show)
        predictions = {n: self.predictions(study, n) for n in study.models}
        tables = {n: self.table(study, n) for n in study.models}
        return FailuresResult(models=models, threshold=study.config.failure_threshold,
                              top_failures=study.config.top_failures, cases=cases, predictions=predictions,
                              tables=tables, suspects_reliable=bool(label_suspects(
                                  predictions[study.models[0]], tables[study.models[0]])["reliable"]) if cases else None)

    def summary(self, study: StudyContext, result: FailuresResult) -> str:
        return "; ".join(f"{n}: test accuracy {100 * m.summary.test_accuracy:.2f}%, "
                         f"{m.summary.high_confidence_failures} high-confidence failures"
                         for n, m in result.models.items())

    def finding(self, study: StudyContext, result: FailuresResult) -> str:
        ms = result.models
        n = next(iter(ms.values())).summary.n
        return (f"On the {n:,} test images, accuracy was "
                f"{per_model({name: pct(m.summary.test_accuracy) for name, m in ms.items()})}; "
                f"{per_model({name: str(m.summary.high_confidence_failures) for name, m in ms.items()})} images "
                f"were predicted wrongly with more than {result.threshold:.0%} confidence.")

    def model_metrics(self, study: StudyContext, result: FailuresResult, model: str) -> dict[str, Any]:
        return result.models[model].summary.to_dict()

    def sections(self, study: StudyContext, result: FailuresResult) -> list:
        models = result.models
        n_test = next(iter(models.values())).summary.n
        where = " (a stratified subset of the official test set)" if study.config.test_subset else " (the official test set)"
        t = result.threshold
        overview = Table(["model", "accuracy", "loss", f"failures >{t:.0%}", "mean conf."],
                         [[n, pct(m.summary.test_accuracy), f"{m.summary.loss:.3f}",
                           str(m.summary.high_confidence_failures), pct(m.summary.mean_confidence, 1)]
                          for n, m in models.items()])
        names = list(models)
        per_class = Table(["class", *names, "change"] if len(names) == 2 else ["class", *names],
                          [[c, *[pct(models[n].summary.per_class_accuracy[c], 1) for n in names],
                            *([_change(models[names[0]].summary.per_class_accuracy[c],
                                       models[names[1]].summary.per_class_accuracy[c])] if len(names) == 2 else [])]
                           for c in CLASSES])
        figures = [Figure("model_comparison.png", "accuracy, failures, per-class accuracy"),
                   Figure("confusion_matrix.png", "both confusion matrices")] if len(names) == 2 else \
            [Figure("confusion_matrix.png", "the confusion matrix")]
        test = Section(f"Test results ({n_test} test images{where})", [overview, per_class, *figures], key=self.name)
        pairs = []
        for n, m in models.items():
            text = "; ".join(f"{p.a}/{p.b} {p.total} ({p.a}->{p.b} {p.a_as_b}, {p.b}->{p.a} {p.b_as_a})"
                             for p in m.summary.top_confused_pairs) or "none"
            pairs.append(Paragraph(f"{n}: {text}."))
        confused = Section("Most confused class pairs (both directions)", pairs, key=self.name)
        return [test, confused, Section(f"The {names[0]}'s top high-confidence failures (>{t:.0%})",
                                        self.case_blocks(study, result), key=self.name)]

    def case_blocks(self, study: StudyContext, result: FailuresResult) -> list:
        if not result.cases:
            return [Paragraph(f"The {study.models[0]} made no wrong prediction above {result.threshold:.0%} confidence, "
                              "so there are no failure cases to explain.")]
        blocks = []
        if len(result.cases) < result.top_failures:
            blocks.append(Paragraph(f"Only {len(result.cases)} high-confidence failure(s) exist, fewer than the "
                                    f"{result.top_failures} cases asked for; all are shown."))
        reliable = result.suspects_reliable is not False
        for case in result.cases:
            top3 = ", ".join(f"{CLASSES[int(c)]} {100 * p:.1f}%" for c, p in case.top3)
            text = (f"Case {case.rank} ({case.figure}): test image {case.dataset_index}, "
                    f"true {CLASSES[case.true]}, predicted {CLASSES[case.pred]} with {100 * case.confidence:.1f}% "
                    f"confidence (top-3: {top3}). Grad-CAM for the predicted class "
                    f"{case.where_pred.words()}; for the true class it {case.where_true.words()}.")
            if case.improved_pred is not None:
                verdict = "fixed" if case.improved_pred == case.true else "still wrong"
                text += (f" The {study.models[-1]} model predicts {CLASSES[case.improved_pred]} "
                         f"({100 * case.improved_confidence:.1f}%): {verdict}.")
            if case.label_suspect:
                text += " Confident learning flags this label as a suspected label error"
                text += "." if reliable else " (unreliable for this model: see the failure triage below)."
            if case.review:
                text += f" Human review: {case.review.removeprefix('reviewed: ')}."
            blocks.append(Paragraph(text))
            blocks.append(Figure(case.figure, f"case {case.rank}: image, Grad-CAM of the predicted and the true class"))
        return blocks



def _change(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{100 * (b - a):+.1f}"


def _plain(d: dict) -> dict:
    """describe_cam's dict with NumPy scalars and tuples as JSON types."""
    return {k: [float(x) if isinstance(x, (float, np.floating)) else int(x) for x in v]
            if isinstance(v, (tuple, list)) else (float(v) if isinstance(v, (np.floating,)) else v)
            for k, v in d.items()}


stage = FailuresStage()
