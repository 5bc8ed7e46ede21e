"""Stage: can the explanations and the failures be trusted?

Faithfulness (deletion/insertion AUC of Grad-CAM, Grad-CAM++ and two random
maps), the parameter-randomisation sanity check, explanation drift between
the two models and confident-learning label suspects (cnnstress.xai.checks).
Cached in explanations.json (reused when made from the same checkpoints, test
images and settings); writes faithfulness.png, sanity_check.png,
label_suspects.png and cam_methods.png.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..augment import normalize, to_float
from ..data import CLASSES
from ..io import EXPLANATIONS_FILE
from ..plots import FigureSpec, plot_cam_methods, plot_faithfulness, plot_label_suspects, plot_sanity_check
from ..reporting import Figure, Paragraph, Section, Table, pct, per_model
from ..results import Explanations
from ..runtime import resolve_device
from ..supplied import feature_maps, finer_layer
from ..xai.checks import (CAM_EXPLAINERS, EXPLAIN_VERSION, FAITHFULNESS_METHODS, KNOWN_TEST_LABEL_ERRORS, agreed_suspects,
                          drift_report, faithfulness_report, label_suspects, sanity_report)
from ..xai.cam import cam_explain_func
from ..xai.label_review import applicable_review, review_note
from ..xai.randomisation import verdict_word
from .base import CachedStage, StudyContext, save_figures


SANITY_FIGURE_IMAGES = 3    # images whose maps are drawn at every randomisation step
SUSPECT_TILES = 12          # tiles per group in label_suspects.png


def _outside(positions: list[int], n_test: int, where: str) -> str | None:
    bad = next((i for i, p in enumerate(positions) if p >= n_test), None)
    return None if bad is None else f"{where}[{bad}] is {positions[bad]}, expected 0..{n_test - 1}"


def explanations_problem(result: Explanations, models: tuple[str, ...] | list[str], n_test: int) -> str | None:
    """What a cached explanations result lacks that the readers need beyond
    its types and ranges: every model, every method with its verdicts,
    positions inside the test split of `n_test` images, the two-model parts
    (drift, label agreement) and sanity maps forming a 4-d array. None when it fits."""
    for part in ("faithfulness", "sanity", "label_suspects"):
        missing = [m for m in models if m not in getattr(result, part)]
        if missing:
            return f"results.{part}.{missing[0]} is missing"
    for m in models:
        for group_name in ("failures", "sample"):
            group, where = getattr(result.faithfulness[m], group_name), f"results.faithfulness.{m}.{group_name}"
            if group.n == 0:
                continue
            if group.methods is None or group.fractions is None:
                return f"{where}.{'methods' if group.methods is None else 'fractions'} is missing"
            missing = [k for k in FAITHFULNESS_METHODS if k not in group.methods]
            if missing:
                return f"{where}.methods.{missing[0]} is missing"
            for k in CAM_EXPLAINERS:
                for verdict in ("verdict", "verdict_smooth"):
                    if getattr(group.methods[k], verdict) is None:
                        return f"{where}.methods.{k}.{verdict} is missing"
        missing = [k for k in CAM_EXPLAINERS if k not in result.sanity[m].methods]
        if missing:
            return f"results.sanity.{m}.{missing[0]} is missing"
        ls = result.label_suspects[m]
        for name in ("suspect_positions", "suspect_failure_positions", "model_error_positions"):
            problem = _outside(getattr(ls, name), n_test, f"results.label_suspects.{m}.{name}")
            if problem:
                return problem
    if len(models) == 2:
        if result.drift is None or result.label_agreement is None:
            return f"results.{'drift' if result.drift is None else 'label_agreement'} is missing"
        for name in ("fixed", "persisting", "new"):
            group = result.drift.groups.get(name)
            if group is None:
                return f"results.drift.{name} is missing"
            if group.n and (group.moved_onto_centre is None or group.centre_fraction is None
                            or sorted(group.centre_fraction) != sorted(models)):
                return f"results.drift.{name} lacks the centre fractions of both models"
        agreement = result.label_agreement
        for where, positions in [("results.label_agreement.positions", agreement.positions),
                                 *[(f"results.label_agreement.failures.{m}", agreement.failures.get(m))
                                   for m in models]]:
            if positions is None:
                return f"{where} is missing"
            problem = _outside(positions, n_test, where)
            if problem:
                return problem
    if result.sanity_maps is not None:
        try:
            shape = np.asarray(result.sanity_maps.maps, dtype=np.float64).shape   # ragged: ValueError
        except (ValueError, TypeError):
            return "results.sanity_maps.maps is not a regular array of numbers"
        if len(shape) != 4:
            return f"results.sanity_maps.maps has {len(shape)} dimensions, expected 4"
    return None


class ExplanationsStage(CachedStage):
    name = "explanations"
    title = "Can the explanations and the failures be trusted?"
    requires = ("failures", "comparison")   # predictions and failure tables; the failure groups (drift)
    unit_type = Explanations
    command = "explain"
    config_groups = ("explanations",)
    enabled_by = "explain"
    analysis = True
    banner = "explanations: faithfulness, sanity check, drift, label suspects"

    version = EXPLAIN_VERSION

    def settings(self, study: StudyContext) -> dict[str, Any]:
        """Its group's fields, and what else the numbers depend on: the failure
        threshold (the failure group) and the methods compared."""
        return {**super().settings(study), "failure_threshold": study.config.failure_threshold,
                "methods": list(FAITHFULNESS_METHODS)}

    def cache_units(self, study: StudyContext) -> dict[str, Path]:
        return {"explanations": study.out / EXPLANATIONS_FILE}

    def unit_problem(self, study: StudyContext, result: Explanations) -> str | None:
        return explanations_problem(result, study.models, len(study.splits.test))

    def compute_units(self, study: StudyContext, inputs: Mapping[str, Any],
                      units: list[str]) -> dict[str, Explanations]:
        config = study.config
        names = study.models
        preds, tables = inputs["failures"].predictions, inputs["failures"].tables
        device = resolve_device(config.device)
        images = study.splits.test.images
        t0 = time.perf_counter()
        raw: dict[str, Any] = {"faithfulness": {}, "sanity": {}, "label_suspects": {}, "seconds": {}}
        sanity_maps = None
        for name in names:
            t1 = time.perf_counter()
            model = study.model(name).model
            layer = study.cam_layer(name)
            raw["faithfulness"][name] = faithfulness_report(model, images, preds[name], tables[name], config, device,
                                                            layer)
            summary, maps = sanity_report(model, images, preds[name], config, device, layer)
            raw["sanity"][name] = summary
            if sanity_maps is None:
                g = maps["gradcam"]
                sanity_maps = {"model": name, "steps": list(g.steps),
                               "maps": np.round(g.maps[:, :SANITY_FIGURE_IMAGES], 3).tolist()}
            raw["label_suspects"][name] = label_suspects(preds[name], tables[name])
            raw["seconds"][name] = time.perf_counter() - t1
        if len(names) == 2:
            raw["label_agreement"] = agreed_suspects(raw["label_suspects"], {n: preds[n] for n in names})
            raw["drift"] = drift_report({n: study.model(n).model for n in names}, images, preds,
                                        inputs["comparison"].failures.to_dict(), config, device,
                                        {n: study.cam_layer(n) for n in names})
        raw["sanity_maps"] = sanity_maps
        raw["seconds"]["total"] = time.perf_counter() - t0
        return {"explanations": Explanations.from_dict(raw)}

    def assemble(self, study: StudyContext, inputs: Mapping[str, Any],
                 parts: dict[str, Explanations]) -> Explanations:
        return parts["explanations"]

    def lap_units(self, study: StudyContext, computed: list[str]) -> None:
        study.timer.lap("explain")

    def layer_words(self, study: StudyContext) -> str:
        """The CAM layer the checks read: one name, or per model when they differ."""
        layers = {n: study.cam_layer(n) for n in study.models}
        return next(iter(layers.values())) if len(set(layers.values())) == 1 else \
            ", ".join(f"{l} ({n})" for n, l in layers.items())

    def compared_layers(self, study: StudyContext, name: str) -> list[str]:
        """The layers cam_methods.png sets side by side: layer3 and layer4 of our
        ResNet-18; for a supplied model its CAM layer and the last layer one
        resolution finer (supplied.finer_layer), when there is one."""
        if name not in study.supplied:
            return ["layer3", "layer4"]
        layer = study.cam_layer(name)
        finer = finer_layer(study.model(name).model, layer)
        return [finer, layer] if finer else [layer]

    def figures(self, study: StudyContext, result: Explanations, *, inputs: Mapping[str, Any] | None = None,
                show: bool = False) -> list:
        """faithfulness.png, sanity_check.png, label_suspects.png, cam_methods.png."""

        config = study.config
        test = study.splits.test
        sm = result.sanity_maps
        figures = {
            "faithfulness.png": FigureSpec(plot_faithfulness, {n: f.to_dict() for n, f in result.faithfulness.items()}),
            "sanity_check.png": FigureSpec(
                plot_sanity_check, {n: s.to_dict() for n, s in result.sanity.items()},
                np.asarray(sm.maps, dtype=np.float32) if sm else None, sm.steps if sm else None,
                map_title=f"{sm.model if sm else ''}: Grad-CAM ({study.cam_layer(sm.model) if sm else config.cam_layer}) "
                          f"of {SANITY_FIGURE_IMAGES} test "
                          "images as the layers are re-initialised"),
        }
        name = study.models[0] if study.models[0] in result.label_suspects else next(iter(result.label_suspects))
        ls = result.label_suspects[name]
        p = inputs["failures"].predictions[name]
        _, review = applicable_review(test.labels, test.indices)   # {} unless the test set is official
        entries = []
        confirmed = {i for i, e in review.items() if e.label_error}
        for group, positions in (("suspect", ls.suspect_failure_positions), ("model", ls.model_error_positions)):
            # The confirmed label errors are always among the tiles; the most confident failures fill the rest.
            first = [q for q in positions if int(test.indices[q]) in confirmed][:SUSPECT_TILES]
            chosen = set(first + [q for q in positions if q not in first][:SUSPECT_TILES - len(first)])
            for pos in (q for q in positions if q in chosen):
                index = int(test.indices[pos])
                entries.append({"image": test.images[pos].permute(1, 2, 0).numpy(),
                                "given": CLASSES[int(p.labels[pos])], "predicted": CLASSES[int(p.preds[pos])],
                                "confidence": float(p.confidence[pos]), "suspect": group == "suspect",
                                "dataset_index": index,
                                **({"review": review_note(review[index], CLASSES, short=True),
                                    "label_error": review[index].label_error} if index in review else {})})
        title = (f"{name}: high-confidence failures (>{config.failure_threshold:.0%}) triaged by confident "
                 f"learning ({ls.suspect_failures} suspects of {ls.failures}; at most {SUSPECT_TILES} shown each)")
        if review:
            title += "\nconfirmed label errors (human review) always shown, with the reviewers' votes under the tile"
        if not ls.reliable:
            title += (f"\nUNRELIABLE: {ls.flagged_fraction:.0%} of all test images flagged; the model is too weak "
                      "to tell wrong labels from its own mistakes")
        figures["label_suspects.png"] = FigureSpec(
            plot_label_suspects, entries, title=title,
            totals={True: ls.suspect_failures, False: ls.failures - ls.suspect_failures})
        rows = inputs["failures"].tables[name].rows
        pos = rows[0].position if rows else 0
        model = study.model(name).model
        x = normalize(to_float(test.images[pos:pos + 1])).to(resolve_device(config.device))
        target = p.preds[pos:pos + 1]
        layers = self.compared_layers(study, name)
        sizes = dict(feature_maps(model))
        maps = {f"{label} {layer}": cam_explain_func(method, layer)(model, x, target)[0].numpy()
                for layer in layers for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"))}
        resolution = ", ".join(f"{layer}: {sizes[layer][0]}x{sizes[layer][1]}" + (" map" if i == 0 else "")
                               for i, layer in enumerate(layers))
        figures["cam_methods.png"] = FigureSpec(
            plot_cam_methods, test.images[pos].permute(1, 2, 0).numpy(), maps,
            title=f"{name}, test image {int(test.indices[pos])}: predicted {CLASSES[int(target[0])]}, "
                  f"label {CLASSES[int(p.labels[pos])]} ({resolution})")
        return save_figures(figures, study.out, show=show)

    # --- what it reports ---------------------------------------------------
    def summary(self, study: StudyContext, result: Explanations) -> str:
        lines = []
        for name, f in result.faithfulness.items():
            ls = result.label_suspects[name]
            methods = f.sample.methods or {}
            verdicts = ", ".join(f"{m} {methods[m].verdict} (pixel noise) / {methods[m].verdict_smooth} (smooth)"
                                 for m in CAM_EXPLAINERS if m in methods) or "no sample"
            sanity = ", ".join(f"{m} {verdict_word(result.sanity[name].methods[m].verdict.passed)}" for m in CAM_EXPLAINERS)
            lines.append(f"explanations {name}: faithfulness (sample) {verdicts}; sanity check {sanity}; "
                         f"{ls.suspect_failures} of {ls.failures} failures are suspected label errors")
        return "\n".join(lines)

    def finding(self, study: StudyContext, result: Explanations) -> str:
        parts, sizes = [], set()
        for name, f in result.faithfulness.items():
            cam = (f.sample.methods or {}).get("gradcam")
            faith = f"{cam.verdict} / {cam.verdict_smooth}" if cam is not None and cam.verdict else "no sample"
            sizes.add(f.sample.n)
            sanity = verdict_word(result.sanity[name].methods["gradcam"].verdict.passed)
            parts.append(f"{name} {faith}, sanity check {sanity}")
        ls = result.label_suspects
        weak = {n: pct(t.flagged_fraction, 1) for n, t in ls.items() if not t.reliable}
        caveat = (f" (unreliable: the flags cover {per_model(weak)} of the test set, far more than its wrong labels)"
                  if weak else "")
        return (f"Grad-CAM's faithfulness (deletion and insertion on {' / '.join(map(str, sorted(sizes)))} sample "
                f"images) against a pixel-noise / a smooth random map: {'; '.join(parts)}. Confident learning "
                f"suspects a wrong label behind "
                f"{per_model({n: f'{t.suspect_failures} of {t.failures}' for n, t in ls.items()})} "
                f"high-confidence failures{caveat}.")

    def model_metrics(self, study: StudyContext, result: Explanations, model: str) -> dict[str, Any]:
        faith = {group: {m: {"deletion_auc": v.deletion_auc, "insertion_auc": v.insertion_auc,
                             **({"verdict": v.verdict} if v.verdict is not None else {}),
                             **({"verdict_smooth": v.verdict_smooth} if v.verdict_smooth is not None else {})}
                         for m, v in g.methods.items()}
                 for group, g in (("failures", result.faithfulness[model].failures),
                                  ("sample", result.faithfulness[model].sample)) if g.n}
        ls = result.label_suspects[model]
        return {
            "faithfulness": faith,
            "sanity_check": {m: result.sanity[model].methods[m].verdict.passed for m in CAM_EXPLAINERS},
            "label_suspect_failures": ls.suspect_failures,
            "model_error_failures": ls.failures - ls.suspect_failures,
            "label_suspects_test": ls.suspects,
            "label_suspects_reliable": ls.reliable,
        }

    def metrics(self, study: StudyContext, result: Explanations) -> dict[str, Any]:
        d = result.to_dict()
        d.pop("sanity_maps", None)   # drawn in sanity_check.png; too big for metrics.json
        return d

    def sections(self, study: StudyContext, result: Explanations) -> list:

        cfg = study.config
        subs = []
        start = "a blurred copy of the image" if cfg.faithfulness_baseline == "blur" else "a mean-colour image"
        rows = []
        weak = []
        for name, f in result.faithfulness.items():
            for group, g in (("failures", f.failures), ("sample", f.sample)):
                if not g.n:
                    rows.append([name, f"{group} (0)", "no images"])
                    continue
                for method, m in g.methods.items():
                    verdict = f"{m.verdict} | {m.verdict_smooth}" if m.verdict is not None else "(reference)"
                    rows.append([name, f"{group} ({g.n})", method, f"{m.deletion_auc:.3f}", f"{m.insertion_auc:.3f}",
                                 verdict])
                    if m.verdict is not None and {m.verdict, m.verdict_smooth} != {"better than random"}:
                        weak.append(f"{method} ({name}, {group}): {m.verdict} | {m.verdict_smooth}")
        faith = [
            Paragraph(f"Pixels are replaced by those of {start} in order of the map's importance (deletion), or "
                      f"restored into it (insertion), in {cfg.faithfulness_steps} steps, and the probability of the "
                      f"explained class (the model's prediction) is recorded; AUC over the fraction of pixels. Lower "
                      f"deletion and higher insertion AUC = more faithful. Equal map values (e.g. the zeros of a CAM "
                      f"after its ReLU) are ordered at random (seeded), not top row first. Two chance levels: a "
                      f"pixel-noise map, and a smooth random map drawn at the CAM's own resolution and upsampled as "
                      f"the CAM is (a CAM removes connected regions, which alone changes the curves, so beating the "
                      f"smooth map is the stricter test). A method counts as better than a random map only when the "
                      f"paired 95% intervals (Student's t over the images) of both differences exclude zero."),
            Table(["model", "images", "method", "deletion", "insertion", "verdict vs pixel noise | vs smooth random"],
                  rows, align="lllrrl"),
            Paragraph("Every explanation method beat both random maps on both measures in every group." if not weak else
                      "Not clearly better than both random maps on both measures (verdict vs pixel noise | vs "
                      "smooth random): " + "; ".join(weak) + ". Where a method does not beat random, its maps are "
                      "no evidence of what the model used; where it beats pixel noise but not the smooth map, the "
                      "advantage may be smoothness alone.", kind="verdict-bad" if weak else "verdict-good"),
            Figure("faithfulness.png", "deletion and insertion curves per method and group"),
        ]
        at = self.layer_words(study)
        subs.append(Section(f"Faithfulness: deletion / insertion (Petsiuk et al. 2018), maps at {at}",
                            faith, key=self.name))

        n = next(iter(result.sanity.values())).n
        sanity = [Paragraph(
            f"On a copy of each model (the trained weights are untouched), the layers are re-initialised from the "
            f"head down, cumulatively, and the maps of {n} test images recomputed for the same classes. A method "
            f"passes when, once {at} and everything above it are random, the median |Spearman| rank "
            f"correlation with the original maps is below the threshold: maps that survive the destruction of the "
            f"weights do not explain the model.")]
        for name, s in result.sanity.items():
            for method in CAM_EXPLAINERS:
                sm = s.methods[method]
                v = sm.verdict
                signed = sm.median_spearman_signed[v.step_index] if v.step_index is not None else None
                signed = "n/a" if signed is None else f"{signed:.3f}"
                sanity.append(Paragraph(
                    f"{verdict_word(v.passed).upper()}: {name}, {method}: {v.reason}; there the signed Spearman "
                    f"median is {signed} and the median SSIM {v.median_ssim:.3f}.",
                    kind="verdict-good" if v.passed else "verdict-bad" if v.passed is False else "note"))
        sanity.append(Figure("sanity_check.png", "rank correlation as the layers are re-initialised, and the maps"))
        subs.append(Section("Sanity check: cascading model-parameter randomisation (Adebayo et al. 2018)", sanity,
                            key=self.name))

        if result.drift is not None:
            first, second = study.models
            drift_rows = []
            for group in ("fixed", "persisting", "new", "newly_confident"):
                g = result.drift.groups[group]
                label = group.replace("_", " ")
                if not g.n:
                    drift_rows.append([label, "0"])
                    continue
                rho = "n/a" if g.median_spearman is None else f"{g.median_spearman:.3f}"
                drift_rows.append([label, str(g.n), rho, pct(g.centre_fraction[first], 1),
                                   pct(g.centre_fraction[second], 1), f"{g.moved_onto_centre} of {g.n}"])
            subs.append(Section(f"Explanation drift: {first} vs {second} Grad-CAM on the same images", [
                Paragraph("Each model explains its own prediction. Rank correlation of the two maps (1 = same order "
                          "of importance) and the mean share of map mass in the central quarter of the image, where "
                          "CIFAR objects usually sit."),
                Table(["failures", "images", "median rho", f"centre: {first}", second, "moved onto centre"],
                      drift_rows)], key=self.name))

        triage = [Paragraph(
            "Confident learning (Northcutt et al. 2021, cleanlab's prune_by_noise_rate) on the test-set "
            "probabilities, which are out-of-sample for a model trained on the training split: an image is a "
            "suspect when the model is confidently sure of another class beyond what that class's per-class "
            "threshold allows. A suspect high-confidence failure may be a wrong label, not a model error; it "
            "is marked in the failure-case figures.")]
        triage.append(Table(["model", "failures", "suspected label errors", "model errors", "suspects in test set"],
                            [[name, str(ls.failures), str(ls.suspect_failures), str(ls.failures - ls.suspect_failures),
                              f"{ls.suspects} of {ls.n_test} ({100 * ls.flagged_fraction:.1f}%)"]
                             for name, ls in result.label_suspects.items()]))
        for name, ls in result.label_suspects.items():
            triage.append(Paragraph(
                f"{name}: {ls.suspect_failures} of {ls.failures} high-confidence failures are suspected label errors, "
                f"{ls.failures - ls.suspect_failures} are model errors ({ls.suspects} suspects in all {ls.n_test} "
                f"test images, {100 * ls.flagged_fraction:.1f}%)."))
        agree = result.label_agreement
        if agree is not None:
            first, second = study.models
            why = ("The two models are not independent (same initial weights, same batch order: only the "
                   "augmentation differs), so they share many mistakes and this agreement is weaker evidence of a "
                   "wrong label than two independently trained models would give." if not study.supplied else
                   "Two models that share training data or initial weights share mistakes too; their agreement is "
                   "strong evidence of a wrong label only when they were trained independently.")
            triage.append(Paragraph(
                f"Both models flag {agree.count} test images and predict the same other class for them. {why} "
                f"Among the {first}'s failures "
                f"{len(agree.failures[first])}, among the {second} model's {len(agree.failures[second])}.",
                kind="note"))
        weak_models = [name for name, ls in result.label_suspects.items() if not ls.reliable]
        if weak_models:
            triage.append(Paragraph(
                f"Unreliable here ({', '.join(weak_models)}): Northcutt et al. (2021) found {KNOWN_TEST_LABEL_ERRORS} "
                f"label errors in CIFAR-10's 10,000 test images (about 0.5%); flagging far more means confident "
                f"learning is flagging the model's own confident mistakes. Its thresholds come from the model's "
                f"probabilities, so it needs an accurate model (train longer, e.g. the 'full' profile) before its "
                f"suspects mean anything.", kind="verdict-bad"))
        triage.append(Figure("label_suspects.png", f"{study.models[0]}'s failures, suspects and model errors"))
        triage.append(Figure("cam_methods.png", "Grad-CAM vs Grad-CAM++, "
                             + " vs ".join(self.compared_layers(study, study.models[0]))))
        subs.append(Section("Failure triage: suspected label errors (confident learning)", triage, key=self.name))
        return [Section(self.title, subs, key=self.name)]



stage = ExplanationsStage()
