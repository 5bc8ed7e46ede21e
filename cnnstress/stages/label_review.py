"""Stage: the high-confidence failures triaged against a human review of the test labels.

Northcutt et al. (NeurIPS 2021) had five workers judge 275 CIFAR-10 test
images that their confident-learning models flagged; 54 are label errors
(cnnstress.xai.label_review, shipped as package data). For each model this
stage sorts its high-confidence failures into three kinds: confirmed label
error (the review says the label is wrong), flagged by confident learning
but not confirmed (reviewed correct, or not reviewed), and model error; it
scores the confident-learning flags of each model and of the two models'
agreement against the review (precision on the reviewed images, recall on
the confirmed errors) and ranks the failures by the label-quality score
(precision at k). Writes label_errors_confirmed.png and label_precision_at_k.png.

Cheap (predictions only: no model is run), so it is recomputed on every run
and never cached, like the comparison stage. Every index it reports is an
official test index. When the loaded test set is not in the official order
the review does not apply: the result says so (one summary line, one report
paragraph, official_order false in metrics.json) and nothing else is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..data import CLASSES
from ..io import remove_file
from ..plots import FigureSpec, plot_confirmed_label_errors, plot_precision_at_k
from ..reporting import Figure, Paragraph, Section, Table, per_model
from ..results import Record, optional
from ..xai.checks import agreed_suspects, label_suspects
from ..xai.label_errors import label_quality_scores
from ..xai.label_review import (N_CONFIRMED, N_REVIEWED, WORKERS, FlagScore, GroundTruthTriage, OrderCheck,
                                PrecisionAtK, Ratio, applicable_review, flag_scores, source_line, triage)
from .base import Stage, StudyContext, save_figures


CONFIRMED_FIGURE = "label_errors_confirmed.png"
PRECISION_FIGURE = "label_precision_at_k.png"
REPORT_KS = (5, 10, 20, 50)      # precision at these k, and at k = all failures
LISTED = 20                      # official indices listed in a report paragraph


@dataclass(frozen=True, kw_only=True)
class FailureKinds(Record):
    """One model's high-confidence failures in the report's three kinds
    (official test indices in failure rank order, most confident first):
    confirmed_label_error: the review says the label is wrong (confirmed_flagged
    of them flagged by confident learning); flagged by confident learning but
    not confirmed: flagged_reviewed_correct (the review says the label is
    right) and flagged_not_reviewed (a count); model_error: neither flagged nor
    confirmed (model_error_reviewed_correct of them reviewed: label correct)."""
    confirmed_label_error: list[int]
    confirmed_flagged: int
    flagged_reviewed_correct: list[int]
    flagged_not_reviewed: int
    model_error: int
    model_error_reviewed_correct: int

    @property
    def flagged_unconfirmed(self) -> int:
        return len(self.flagged_reviewed_correct) + self.flagged_not_reviewed


@dataclass(frozen=True, kw_only=True)
class ModelReview(Record):
    """One model against the review: its triage (xai.label_review.triage:
    counts, flag precision/recall, failures ranked by the label-quality score
    and precision at k), the three kinds of failure, and whether its
    confident-learning flags are plausible (xai.checks.label_suspects:
    flagged_fraction of the test set, reliable below its ceiling)."""
    triage: GroundTruthTriage
    kinds: FailureKinds
    flags_reliable: bool
    flagged_fraction: float


@dataclass(kw_only=True)
class LabelReview(Record):
    """The stage's result (metrics.json "label_review"; there without each
    triage's `ranked` and with precision at REPORT_KS and at all failures
    only). official_order: whether the review applies (order: check_order's
    result, its reason when not); the rest only when it applies: threshold
    (failure confidence), source (where the review comes from), reviewed and
    confirmed (reviewed images / confirmed label errors in the loaded test
    set), per model its ModelReview, and agreement: the images both models
    flag with the same predicted class (xai.checks.agreed_suspects) against
    the review."""
    official_order: bool
    order: OrderCheck
    threshold: float | None = optional()
    source: str | None = optional()
    reviewed: int | None = optional()
    confirmed: int | None = optional()
    models: dict[str, ModelReview] | None = optional()
    agreement: FlagScore | None = optional()

    def _repr_markdown_(self) -> str:
        if not self.official_order:
            return f"**label review**: {self.order.reason}"
        rows = [f"| {n} | {m.triage.failures} | {len(m.kinds.confirmed_label_error)} | "
                f"{m.kinds.flagged_unconfirmed} ({len(m.kinds.flagged_reviewed_correct)} reviewed correct) | "
                f"{m.kinds.model_error} | {_ratio(m.triage.flags.precision)} | {_ratio(m.triage.flags.recall)} |"
                for n, m in (self.models or {}).items()]
        if self.agreement is not None:
            rows.append(f"| both models agree | | | | | {_ratio(self.agreement.precision)} | "
                        f"{_ratio(self.agreement.recall)} |")
        return (f"**label review**: {self.confirmed} confirmed label errors and {self.reviewed} reviewed images in "
                f"the loaded test set; failures above {self.threshold:.0%} confidence\n\n"
                "| model | failures | confirmed label error | flagged, not confirmed | model error | "
                "flag precision | flag recall |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def report_ks(n: int) -> list[int]:
    """The k of the precision-at-k table for n ranked failures: REPORT_KS below n, then n."""
    return [k for k in REPORT_KS if k < n] + ([n] if n else [])


def _ratio(r: Ratio) -> str:
    return f"{r.hits}/{r.total}" + (f" ({100 * r.value:.0f}%)" if r.value is not None else "")


def _at(curve: list[PrecisionAtK] | None, k: int) -> PrecisionAtK | None:
    return curve[k - 1] if curve and 0 < k <= len(curve) else None


def failure_kinds(failure_indices: list[int], flagged: set[int], review: dict) -> FailureKinds:
    """Sort failures (official indices, rank order) into the three kinds, given
    the confident-learning flags (official indices) and the review."""
    confirmed, rc = [], []
    confirmed_flagged = not_reviewed = model_error = model_error_rc = 0
    for i in failure_indices:
        entry = review.get(i)
        if entry is not None and entry.label_error:
            confirmed.append(i)
            confirmed_flagged += i in flagged
        elif i in flagged:
            if entry is None:
                not_reviewed += 1
            else:
                rc.append(i)
        else:
            model_error += 1
            model_error_rc += entry is not None
    return FailureKinds(confirmed_label_error=confirmed, confirmed_flagged=confirmed_flagged,
                        flagged_reviewed_correct=rc, flagged_not_reviewed=not_reviewed, model_error=model_error,
                        model_error_reviewed_correct=model_error_rc)


class LabelReviewStage(Stage):
    name = "label_review"
    title = "Failure triage against human review"
    requires = ("failures",)

    def compute(self, study: StudyContext, inputs: Mapping[str, Any]) -> LabelReview:
        test = study.splits.test
        order, review = applicable_review(test.labels, test.indices)
        if not order.official:
            return LabelReview(official_order=False, order=order)
        loaded = test.indices.numpy()
        preds, tables = inputs["failures"].predictions, inputs["failures"].tables
        suspects = {n: label_suspects(preds[n], tables[n]) for n in study.models}
        models = {}
        for n in study.models:
            p, s = preds[n], suspects[n]
            positions = np.asarray(tables[n].positions, dtype=np.int64)
            fail_idx = [int(i) for i in loaded[positions]]
            scores = label_quality_scores(p.probs.numpy(), p.labels.numpy())[positions]
            flagged = loaded[np.asarray(s["suspect_positions"], dtype=np.int64)]
            models[n] = ModelReview(
                triage=triage(fail_idx, flagged, review, loaded, scores),
                kinds=failure_kinds(fail_idx, {int(i) for i in flagged}, review),
                flags_reliable=bool(s["reliable"]), flagged_fraction=float(s["flagged_fraction"]))
        agreement = None
        if len(study.models) == 2:
            agreed = agreed_suspects(suspects, {n: preds[n] for n in study.models})["positions"]
            agreement = flag_scores(loaded[np.asarray(agreed, dtype=np.int64)], review, loaded)
        result = LabelReview(official_order=True, order=order, threshold=study.config.failure_threshold,
                             source=source_line(), reviewed=int(sum(int(i) in review for i in loaded)),
                             confirmed=int(sum(int(i) in review and review[int(i)].label_error for i in loaded)),
                             models=models, agreement=agreement)
        return result

    def lap(self, study: StudyContext, result: LabelReview) -> None:
        if result.official_order:
            study.timer.lap("label review", len(study.splits.test), "test images checked against the review")

    def figures(self, study: StudyContext, result: LabelReview, *, inputs: Mapping[str, Any] | None = None,
                show: bool = False) -> list:
        """label_errors_confirmed.png: the confirmed label errors that are
        high-confidence failures of either model, image by image;
        label_precision_at_k.png: precision at k of each model's failures."""
        if not result.official_order:
            for stale in (CONFIRMED_FIGURE, PRECISION_FIGURE):   # from an earlier run on official data
                remove_file(study.out / stale)
            return []
        test = study.splits.test
        _, review = applicable_review(test.labels, test.indices)
        position = {int(i): p for p, i in enumerate(test.indices.tolist())}
        models = result.models or {}
        shown = sorted({i for m in models.values() for i in m.kinds.confirmed_label_error})
        preds = {n: inputs["failures"].predictions[n] for n in models}
        entries = []
        for i in shown:
            pos, e = position[i], review[i]
            entries.append({
                "image": test.images[pos].permute(1, 2, 0).numpy(), "dataset_index": i,
                "given": CLASSES[e.given_label], "guessed": CLASSES[e.guessed_label], "votes": e.votes_guessed,
                "workers": WORKERS,
                "predictions": {n: (CLASSES[int(p.preds[pos])], float(p.confidence[pos]),
                                    i in models[n].kinds.confirmed_label_error) for n, p in preds.items()}})
        t = result.threshold
        title = (f"Confirmed label errors (human review) that are high-confidence failures (>{t:.0%})\n"
                 f"of either model: {len(entries)} of the {result.confirmed} in the loaded test set")
        figures = {
            CONFIRMED_FIGURE: FigureSpec(
                plot_confirmed_label_errors, entries, title=title if entries else "",
                empty_text=f"none of the {result.confirmed} confirmed label errors is a high-confidence failure "
                           f"(>{t:.0%}) of either model"),
            PRECISION_FIGURE: FigureSpec(
                plot_precision_at_k,
                {n: [(a.k, a.precision) for a in (m.triage.precision_at_k or [])] for n, m in models.items()},
                flagged={n: m.kinds.confirmed_flagged + m.kinds.flagged_unconfirmed for n, m in models.items()},
                title=f"High-confidence failures (>{t:.0%}) ranked by the confident-learning score:\n"
                      f"share of the first k that are confirmed label errors"),
        }
        return save_figures(figures, study.out, show=show)

    # --- what it reports ---------------------------------------------------
    def summary(self, study: StudyContext, result: LabelReview) -> str:
        if not result.official_order:
            return f"label review: {result.order.reason}"
        lines = []
        for n, m in (result.models or {}).items():
            t, k = m.triage, m.kinds
            lines.append(f"label review {n}: {len(k.confirmed_label_error)} of {t.failures} high-confidence failures "
                         f"are confirmed label errors (of the {result.confirmed} in the test set); confident-learning "
                         f"flags: precision {t.flags.precision.hits}/{t.flags.precision.total} reviewed, recall "
                         f"{t.flags.recall.hits}/{t.flags.recall.total}")
        if result.agreement is not None:
            a = result.agreement
            lines.append(f"label review, both models agreeing: {a.flagged} flags, precision "
                         f"{a.precision.hits}/{a.precision.total} reviewed, recall {a.recall.hits}/{a.recall.total}")
        return "\n".join(lines)

    def finding(self, study: StudyContext, result: LabelReview) -> str:
        if not result.official_order:
            return f"The human review of the test labels does not apply here: {result.order.reason}."
        confirmed = per_model({n: f"{len(m.kinds.confirmed_label_error)} of {m.triage.failures}"
                               for n, m in (result.models or {}).items()})
        return (f"The human review of {result.reviewed} test labels ({result.confirmed} of them wrong) confirms a "
                f"wrong label behind {confirmed} high-confidence failures (a lower bound: an unreviewed image counts as "
                f"correctly labelled).")

    def model_metrics(self, study: StudyContext, result: LabelReview, model: str) -> dict[str, Any]:
        if not result.official_order or not result.models or model not in result.models:
            return {}
        m = result.models[model]
        t, k = m.triage, m.kinds
        return {"confirmed_label_error_failures": len(k.confirmed_label_error),
                "flagged_unconfirmed_failures": k.flagged_unconfirmed,
                "unflagged_model_error_failures": k.model_error,
                "reviewed_correct_failures": len(t.label_correct),
                "unreviewed_failures": t.not_reviewed,
                "flag_precision": t.flags.precision.value,
                "flag_recall": t.flags.recall.value}

    def metrics(self, study: StudyContext, result: LabelReview) -> dict[str, Any]:
        d = result.to_dict()
        for name, m in (result.models or {}).items():
            tri = d["models"][name]["triage"]
            tri.pop("ranked", None)     # every failure's index: failures_<model>.csv has them
            if m.triage.precision_at_k is not None:
                tri["precision_at_k"] = [_at(m.triage.precision_at_k, k).to_dict()
                                         for k in report_ks(m.triage.failures)]
        return d

    def sections(self, study: StudyContext, result: LabelReview) -> list:
        if not result.official_order:
            return [Section(self.title, [Paragraph(f"Not done: {result.order.reason}.", kind="note")],
                            key=self.name)]
        models = result.models or {}
        t = result.threshold
        blocks = [Paragraph(
            f"Ground truth: Northcutt, Athalye & Mueller (NeurIPS 2021) had five crowd workers judge "
            f"{N_REVIEWED} CIFAR-10 test images that their own confident-learning models had flagged; "
            f"{N_CONFIRMED} are label errors (fewer than 3 of the 5 chose the given label). The loaded test set "
            f"holds {result.reviewed} of the reviewed images and {result.confirmed} of the confirmed errors. "
            f"{(result.source or '').rstrip('.')}. Every index below is an official test index, so an image can be looked up in "
            f"published per-image studies.")]
        rows = []
        for n, m in models.items():
            k = m.kinds
            rows.append([n, str(m.triage.failures), str(len(k.confirmed_label_error)),
                         str(len(k.flagged_reviewed_correct)), str(k.flagged_not_reviewed), str(k.model_error)])
        blocks.append(Table(["model", f"failures >{t:.0%}", "confirmed label error", "flagged: reviewed correct",
                             "flagged: not reviewed", "model error"], rows,
                            caption="Three kinds of high-confidence failure: confirmed label error (human review); "
                                    "flagged by confident learning but not confirmed (the review says the label "
                                    "is right, or did not look at the image); model error (neither)."))
        for n, m in models.items():
            tri, k = m.triage, m.kinds
            text = (f"{n}: {len(k.confirmed_label_error)} of its {tri.failures} high-confidence failures are "
                    f"confirmed label errors, i.e. it fails confidently on {_ratio(tri.errors_among_failures)} of "
                    f"the confirmed errors")
            if k.confirmed_label_error:
                text += (f" (test images {_listed(k.confirmed_label_error)}; confident learning flags "
                         f"{k.confirmed_flagged} of them)")
            text += (f". {k.flagged_unconfirmed} more failures are flagged by confident learning without being "
                     f"confirmed: {len(k.flagged_reviewed_correct)} reviewed: label correct"
                     + (f" ({_listed(k.flagged_reviewed_correct)})" if k.flagged_reviewed_correct else "")
                     + f", {k.flagged_not_reviewed} not reviewed. {k.model_error} are model errors"
                     + (f" ({k.model_error_reviewed_correct} of them reviewed: label correct)"
                        if k.model_error_reviewed_correct else "") + ".")
            blocks.append(Paragraph(text))
        flag_rows = [[n, str(m.triage.flags.flagged), str(m.triage.flags.reviewed), _ratio(m.triage.flags.precision),
                      _ratio(m.triage.flags.recall)] for n, m in models.items()]
        if result.agreement is not None:
            a = result.agreement
            flag_rows.append(["both models agree", str(a.flagged), str(a.reviewed), _ratio(a.precision),
                              _ratio(a.recall)])
        blocks.append(Table(["flags of", "flagged", "reviewed", "precision (reviewed)", "recall (confirmed)"],
                            flag_rows, caption="Confident-learning flags over the whole loaded test set against "
                                               "the review: precision = confirmed errors / flagged images the "
                                               "review covers; recall = flagged confirmed errors / confirmed "
                                               "errors in the loaded test set."))
        ks = [k for k in REPORT_KS if any(k < m.triage.failures for m in models.values())]
        at_rows = []
        for n, m in models.items():
            cells = [_at(m.triage.precision_at_k, k) for k in ks if k < m.triage.failures]
            cells.append(_at(m.triage.precision_at_k, m.triage.failures))
            at_rows.append([n, *[f"{a.hits}/{a.k}" if a is not None else "none" for a in cells]])
        if any(m.triage.failures for m in models.values()):
            blocks.append(Table(["model", *[f"k={k}" for k in ks], "all failures"],
                                [row[:-1] + [""] * (len(ks) + 2 - len(row)) + row[-1:] for row in at_rows],
                                caption="Precision at k: confirmed label errors among the k failures that the "
                                        "label-quality score (self-confidence: the probability of the given label) "
                                        "ranks most suspicious."))
        weak = [n for n, m in models.items() if not m.flags_reliable]
        honest = ("An image the review did not cover counts as not a label error, so every figure here is a lower "
                  f"bound: the review covers only the {N_REVIEWED} images that an earlier method flagged, and a flag "
                  f"on an unreviewed image is neither confirmed nor refuted (precision is therefore measured on the "
                  f"reviewed images only). Confirmed label errors are rare ({N_CONFIRMED} of 10,000 test images), so "
                  f"a model that is often wrong fails mostly on correctly labelled images and its failures rarely "
                  f"hit the {N_CONFIRMED}.")
        if weak:
            honest += (" The flags cover " + ", ".join(f"{100 * models[n].flagged_fraction:.1f}% ({n})" for n in weak)
                       + " of the test set, far above the ~0.5% of real errors: at this accuracy confident "
                         "learning mostly flags the model's own mistakes.")
        blocks.append(Paragraph(honest, kind="note"))
        blocks.append(Figure(CONFIRMED_FIGURE, "confirmed label errors the models fail on, with the reviewers' "
                                               "votes and each model's prediction"))
        blocks.append(Figure(PRECISION_FIGURE, "precision at k of the failures ranked by the confident-learning "
                                               "score"))
        return [Section(self.title, blocks, key=self.name)]


def _listed(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:LISTED])
    return shown + (f" and {len(indices) - LISTED} more" if len(indices) > LISTED else "")


stage = LabelReviewStage()
