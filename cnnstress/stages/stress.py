"""Stage: stress tests beyond clean accuracy (calibration, corruptions, attacks).

Per model, cached as stress_<model>.json (reused when made from the same
checkpoint, test images and stress settings); writes corruption_accuracy.csv,
robustness.png, corruption_examples.png, reliability_diagram.png and
adversarial.png. The computations live in cnnstress.robustness; the samples
are the named seed streams "corruption_sample" and "attack_sample".
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..compare import better
from ..data import sample_positions
from ..evaluate import evaluate_split
from ..io import stress_path
from ..plots import FigureSpec, plot_adversarial, plot_corruption_examples, plot_reliability_diagram, plot_robustness
from ..reporting import Figure, Paragraph, Section, Table, pct
from ..results import Record, StressResult, transient, with_failure_counts
from ..robustness import (CORRUPTIONS, FAMILIES, SEVERITIES, adversarial_accuracy, apply_temperature, calibration_bins,
                          calibration_report, corruption_report)
from ..robustness.suite import STRESS_VERSION, sample_grid_images, stress_settings, write_corruption_csv
from ..runtime import progress_bar, progress_enabled, resolve_device, seed_stream
from .base import CachedStage, StudyContext, save_figures

FIGURES = ["robustness.png", "corruption_examples.png", "reliability_diagram.png", "adversarial.png"]


def stress_files(models: tuple[str, ...]) -> list[str]:
    """What the stage writes for these models (StressStageResult.files)."""
    return ["corruption_accuracy.csv", *[f"stress_{n}.json" for n in models], *FIGURES]


@dataclass
class StressStageResult(Record):
    settings: dict[str, Any]          # robustness.suite.stress_settings: what the numbers depend on
    files: list[str]
    models: dict[str, StressResult]
    test_accuracy: dict[str, float] = transient()   # model -> clean accuracy on the whole test split (report)

    def _repr_markdown_(self) -> str:
        """In a notebook: per model, calibration, corruption and attack accuracy."""
        rows = []
        for name, r in self.models.items():
            cal, corr, adv = r.calibration, r.corruptions, r.adversarial
            rows.append(f"| {name} | {100 * cal.uncalibrated.ece:.2f}% -> {100 * cal.calibrated.ece:.2f}% "
                        f"(T = {cal.temperature:.2f}) | {100 * corr.clean_accuracy:.1f}% | "
                        f"{100 * corr.mean_corruption_accuracy:.1f}% | "
                        + (f"{100 * adv.pgd[-1]:.1f}% |" if adv.pgd and adv.pgd[-1] is not None else "n/a |"))
        eps = next(iter(self.models.values())).adversarial.eps_255
        return ("**stress tests**\n\n| model | ECE, then after temperature scaling | clean (same images) | "
                f"mean over {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} severities | "
                f"PGD at {eps[-1] if eps else '?'}/255 |\n|---|---|---|---|---|\n" + "\n".join(rows))

    def corruption_change(self) -> dict[str, float]:
        """The second model's minus the first's (improved minus baseline) accuracy per
        corruption type, summed over severities / 5 (points, [−1, 1])."""
        first, second = self.models
        a, b = self.models[first].corruptions.accuracy, self.models[second].corruptions.accuracy
        return {c: (sum(b[c]) - sum(a[c])) / len(SEVERITIES) for c in CORRUPTIONS}


def stress_problem(result: StressResult, n_eps: int) -> str | None:
    """What a cached stress result lacks that the readers need beyond its
    types and ranges: every corruption type at every severity, every family,
    one value per attack budget (`n_eps` budgets). None when it fits."""
    c = result.corruptions
    for name in ("accuracy", "ece", "ece_calibrated"):
        grid = getattr(c, name)
        for t in CORRUPTIONS:
            if t not in grid:
                return f"results.corruptions.{name}.{t} is missing"
            if len(grid[t]) != len(SEVERITIES):
                return f"results.corruptions.{name}.{t} has {len(grid[t])} items, expected {len(SEVERITIES)}"
    families = sorted(set(FAMILIES[t] for t in CORRUPTIONS))
    if sorted(c.accuracy_by_family) != families:
        return f"results.corruptions.accuracy_by_family has keys {sorted(c.accuracy_by_family)}, expected {families}"
    for name in ("accuracy_by_severity", "ece_by_severity", "ece_calibrated_by_severity"):
        if len(getattr(c, name)) != len(SEVERITIES):
            return f"results.corruptions.{name} has {len(getattr(c, name))} items, expected {len(SEVERITIES)}"
    for name in ("eps", "eps_255", "fgsm", "pgd"):
        values = getattr(result.adversarial, name)
        if values is None:
            return f"results.adversarial.{name} is missing"
        if len(values) != n_eps:
            return f"results.adversarial.{name} has {len(values)} items, expected {n_eps}"
    return None


class StressStage(CachedStage):
    name = "stress"
    title = "Stress tests beyond accuracy"
    requires = ("failures",)
    unit_type = StressResult
    command = "stress"
    config_groups = ("stress",)
    enabled_by = "stress"
    analysis = True
    banner = "stress tests: calibration, corruptions, adversarial"

    version = STRESS_VERSION

    def settings(self, study: StudyContext) -> dict[str, Any]:
        """Its group's fields, and the corruption types: a cache made with
        other types (before frost) is never reused."""
        return {**super().settings(study), "corruptions": list(CORRUPTIONS)}

    def cache_units(self, study: StudyContext) -> dict[str, Path]:
        return {n: stress_path(study.out, n) for n in study.models}   # stress_<model>.json

    def unit_key(self, study: StudyContext, unit: str) -> dict[str, Any]:
        return self.cache_key(study, (unit,))

    def unit_problem(self, study: StudyContext, result: StressResult) -> str | None:
        return stress_problem(result, len(study.config.adv_eps))

    def compute_units(self, study: StudyContext, inputs: Mapping[str, Any], units: list[str]) -> dict[str, StressResult]:
        config = study.config
        preds = inputs["failures"].predictions
        device = resolve_device(config.device)
        show_bar = progress_enabled(study.progress)
        t0 = time.perf_counter()
        raw: dict[str, dict] = {}
        for name in units:
            val_logits = evaluate_split(study.model(name), study.splits.val).logits
            raw[name] = {"calibration": calibration_report(val_logits, study.splits.val.labels, preds[name], config)}
        temperatures = {n: raw[n]["calibration"]["temperature"] for n in units}
        bar = progress_bar(len(CORRUPTIONS), "corruptions (5 severities each)", show_bar)
        try:
            corr = corruption_report({n: study.model(n).model for n in units}, study.splits.test, config,
                                     device=device, temperatures=temperatures,
                                     progress=(lambda _type: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        t_corr = time.perf_counter() - t0
        test = study.splits.test
        adv_pos = sample_positions(test.labels, config.adv_subset, seed_stream(config.seed, "attack_sample"))
        results = {}
        for name in units:
            raw[name]["corruptions"] = corr[name]
            t1 = time.perf_counter()
            raw[name]["adversarial"] = adversarial_accuracy(
                study.model(name).model, test.images[adv_pos], test.labels[adv_pos],
                eps_list=[k / 255 for k in config.adv_eps], steps=config.pgd_steps, seed=config.seed,
                device=device, batch_size=config.eval_batch_size, progress=show_bar)
            raw[name]["adversarial"]["eps_255"] = list(config.adv_eps)
            raw[name]["seconds"] = {"calibration_and_corruptions": t_corr / len(units),
                                    "adversarial": time.perf_counter() - t1}
            results[name] = StressResult.from_dict(raw[name])
        return results

    def assemble(self, study: StudyContext, inputs: Mapping[str, Any],
                 parts: dict[str, StressResult]) -> StressStageResult:
        # Failure counts before/after temperature scaling follow the current threshold (cheap).
        preds = inputs["failures"].predictions
        config = study.config
        models = {n: dataclasses.replace(r, calibration=with_failure_counts(r.calibration, preds[n],
                                                                           config.failure_threshold))
                  for n, r in parts.items()}
        return StressStageResult(settings=stress_settings(config), files=stress_files(study.models), models=models,
                                 test_accuracy={n: m.summary.test_accuracy
                                                for n, m in inputs["failures"].models.items()})

    def lap_units(self, study: StudyContext, computed: list[str]) -> None:
        config = study.config
        per_cell = min(config.corruption_subset or len(study.splits.test), len(study.splits.test))
        if computed:
            study.timer.lap("stress", len(computed) * len(CORRUPTIONS) * len(SEVERITIES) * per_cell,
                            f"{len(computed)} models x {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} severities x "
                            f"{per_cell} images; attacks and calibration in the time too")
        else:
            study.timer.lap("stress", what="read from the caches")

    def figures(self, study: StudyContext, result: StressStageResult, *, inputs: Mapping[str, Any] | None = None,
                show: bool = False) -> list:
        """corruption_accuracy.csv and the four stress figures."""

        config = study.config
        models = result.models
        paths = [write_corruption_csv(study.out / "corruption_accuracy.csv",
                                      {n: r.corruptions.to_dict() for n, r in models.items()})]
        bins = {}
        for name, r in models.items():
            preds = inputs["failures"].predictions[name]
            t = r.calibration.temperature
            bins[name] = calibration_bins(preds.probs, preds.labels, config.calibration_bins)
            bins[f"{name}, T={t:.2f}"] = calibration_bins(apply_temperature(preds.logits, t), preds.labels,
                                                           config.calibration_bins)
        index, grid = sample_grid_images(study.splits.test, config)
        figures = {
            "robustness.png": FigureSpec(plot_robustness, {n: r.corruptions.to_dict() for n, r in models.items()}),
            "corruption_examples.png": FigureSpec(plot_corruption_examples, grid,
                                                  title=f"Test image {index} under each corruption"),
            "reliability_diagram.png": FigureSpec(plot_reliability_diagram, bins, ncols=2),
            "adversarial.png": FigureSpec(plot_adversarial, {n: r.adversarial.to_dict() for n, r in models.items()}),
        }
        return paths + save_figures(figures, study.out, show=show)

    def summary(self, study: StudyContext, result: StressStageResult) -> str:
        return "\n".join(
            f"stress {n}: ECE {100 * r.calibration.uncalibrated.ece:.2f}% -> {100 * r.calibration.calibrated.ece:.2f}% "
            f"(T={r.calibration.temperature:.3f}), mean corruption accuracy "
            f"{100 * r.corruptions.mean_corruption_accuracy:.2f}%, PGD {r.adversarial.eps_255[-1]}/255 accuracy "
            f"{100 * r.adversarial.pgd[-1]:.1f}%" for n, r in result.models.items())

    def finding(self, study: StudyContext, result: StressStageResult) -> str:
        rs = list(result.models.values())

        def each(value, digits: int = 2) -> str:   # "1.60% / 2.74%", in the order of the models
            return " / ".join(pct(value(r), digits) for r in rs)

        first = rs[0]
        return (f"Beyond clean accuracy ({' / '.join(result.models)}): calibration error (ECE) "
                f"{each(lambda r: r.calibration.uncalibrated.ece)}, "
                f"{each(lambda r: r.calibration.calibrated.ece)} after temperature scaling; mean accuracy over "
                f"{len(first.corruptions.accuracy)} corruption types at {len(first.corruptions.accuracy_by_severity)} "
                f"severities {each(lambda r: r.corruptions.mean_corruption_accuracy)}, against "
                f"{each(lambda r: r.corruptions.clean_accuracy)} on the same images uncorrupted; PGD accuracy at "
                f"{first.adversarial.eps_255[-1]}/255 {each(lambda r: r.adversarial.pgd[-1], 1)} "
                f"({first.adversarial.steps} steps, {first.adversarial.n} images).")

    def model_metrics(self, study: StudyContext, result: StressStageResult, model: str) -> dict[str, Any]:
        r = result.models[model]
        cal, corr, adv = r.calibration, r.corruptions, r.adversarial
        eps = [f"{k}/255" for k in adv.eps_255]
        return {
            "ece": cal.uncalibrated.ece,                 # 15 bins, clean test set, uncalibrated
            "ece_calibrated": cal.calibrated.ece,        # after temperature scaling fitted on validation
            "mce": cal.uncalibrated.mce,
            "mce_calibrated": cal.calibrated.mce,
            "temperature": cal.temperature,
            "high_confidence_failures_calibrated": cal.calibrated.failures,
            "mean_corruption_accuracy": corr.mean_corruption_accuracy,            # all 15 types
            # the 14 types of runs before frost was added, comparable with their mean
            "mean_corruption_accuracy_without_frost": corr.mean_corruption_accuracy_without_frost,
            "corruption_clean_accuracy": corr.clean_accuracy,   # the same images, uncorrupted
            "corruption_drop": corr.drop_from_clean,
            "corruption_ece_by_severity": corr.ece_by_severity,
            "adversarial_clean_accuracy": adv.clean_accuracy,
            "fgsm_accuracy": dict(zip(eps, adv.fgsm)),
            "pgd_accuracy": dict(zip(eps, adv.pgd)),
        }

    def metrics(self, study: StudyContext, result: StressStageResult) -> dict[str, Any]:
        return {"settings": result.settings, "files": result.files,
                **{n: r.to_dict() for n, r in result.models.items()}}

    def sections(self, study: StudyContext, result: StressStageResult) -> list:

        m = result.models
        cal = {n: r.calibration for n, r in m.items()}
        cor = {n: r.corruptions for n, r in m.items()}
        adv = {n: r.adversarial for n, r in m.items()}
        t = study.config.failure_threshold
        c0 = next(iter(cal.values()))
        subs: list[tuple[str, list]] = []

        def sub(title: str) -> list:
            subs.append((title, []))
            return subs[-1][1]
        blocks = sub("Calibration (clean test set)")
        blocks.append(Paragraph(
            f"Expected calibration error with {c0.bins} equal-width confidence bins (Guo et al. 2017) and maximum "
            f"calibration error over non-empty bins. Temperature T fitted by minimising the NLL on the {c0.val_n} "
            f"validation images (never the test set); T > 1 means the model was over-confident. Accuracy is "
            f"unchanged by T."))
        blocks.append(Table(["model", "ECE", "MCE", "NLL", "T", "ECE(T)", "MCE(T)", "NLL(T)",
                             f"failures >{t:.0%} before/after"],
                            [[n, pct(c.uncalibrated.ece), pct(c.uncalibrated.mce, 1), f"{c.uncalibrated.nll:.3f}",
                              f"{c.temperature:.3f}", pct(c.calibrated.ece), pct(c.calibrated.mce, 1),
                              f"{c.calibrated.nll:.3f}", f"{c.uncalibrated.failures} -> {c.calibrated.failures}"]
                             for n, c in cal.items()]))
        blocks.append(Figure("reliability_diagram.png", "reliability diagrams, bars labelled with the images per bin"))

        n_cell = next(iter(cor.values())).n
        blocks = sub((f"Common corruptions ({len(CORRUPTIONS)} CIFAR-10-C types x severities "
                              f"{SEVERITIES[0]}-{SEVERITIES[-1]}, {n_cell} test images per cell)"))
        blocks.append(Paragraph(
            f"Generated in the package from the clean test images with the CIFAR parameters of Hendrycks & "
            f"Dietterich's generation code, seeded (no download; frost overlays the authors' photographs, shipped "
            f"with the package). Mean corruption accuracy = the mean over all {len(CORRUPTIONS)} types and "
            f"{len(SEVERITIES)} severities, RobustBench's headline figure (its Standard model scores 73.46% on the "
            f"published CIFAR-10-C); 'without frost' is the mean over the {len(CORRUPTIONS) - 1} types of earlier "
            f"runs. The drop is from the clean accuracy on the same {n_cell} images. One cell's accuracy has a "
            f"standard error of up to {50 / n_cell ** 0.5:.1f} points at this sample size."))
        fams = list(next(iter(cor.values())).accuracy_by_family)
        blocks.append(Table(["model", "clean", "mean corr.", "without frost", "drop", *fams],
                            [[n, pct(c.clean_accuracy, 1), pct(c.mean_corruption_accuracy),
                              pct(c.mean_corruption_accuracy_without_frost), f"{100 * c.drop_from_clean:.1f}p",
                              *[pct(c.accuracy_by_family[f], 1) for f in fams]]
                             for n, c in cor.items()]))
        two = len(m) == 2
        if two:
            first, second = m
            change = result.corruption_change()
            blocks.append(Table(["corruption", first, second, "change"],
                                [[c, pct(sum(cor[first].accuracy[c]) / len(SEVERITIES), 1),
                                  pct(sum(cor[second].accuracy[c]) / len(SEVERITIES), 1),
                                  f"{100 * change[c]:+.1f}"] for c in CORRUPTIONS],
                                caption="mean over severities"))
        blocks.append(Paragraph("ECE under corruption, all types pooled per severity (uncalibrated / with the clean T):"))
        blocks.append(Table(["model", *[f"s{s}" for s in SEVERITIES]],
                            [[n, *[f"{pct(e, 1)}/{pct(ec, 1)}" for e, ec in
                                   zip(c.ece_by_severity, c.ece_calibrated_by_severity)]] for n, c in cor.items()]))
        blocks.append(Figure("robustness.png", "accuracy per corruption and severity"))
        blocks.append(Figure("corruption_examples.png", "one test image under each corruption"))
        blocks.append(Paragraph("Also: corruption_accuracy.csv (RobustBench layout)."))

        a0 = next(iter(adv.values()))
        blocks = sub((f"Adversarial robustness (L-infinity, {a0.n} test images, PGD {a0.steps} steps of "
                              f"2.5*eps/steps with a seeded random start)"))
        header = ["eps", *[f"{n} {atk.upper()}" for n in adv for atk in ("fgsm", "pgd")]]
        rows = [["0", *[pct(adv[n].clean_accuracy, 1) for n in adv for _ in (0, 1)]]]
        for i, k in enumerate(a0.eps_255):
            rows.append([f"{k}/255", *[pct(getattr(adv[n], atk)[i], 1) for n in adv for atk in ("fgsm", "pgd")]])
        blocks.append(Table(header, rows))
        for n, r in adv.items():
            weaker = [f"{k}/255" for k, f, p in zip(r.eps_255, r.fgsm, r.pgd)
                      if p is not None and f is not None and p > f]
            if weaker:
                blocks.append(Paragraph(
                    f"For the {n} model PGD left more images correct than FGSM at {', '.join(weaker)}: its {r.steps} "
                    f"small steps missed what FGSM's one full step found; the lower of the two is the better "
                    f"estimate of robust accuracy there.", kind="note"))
        blocks.append(Figure("adversarial.png", "accuracy under FGSM and PGD by budget"))

        if two:
            blocks = sub("Did the augmentation help beyond clean accuracy?" if not study.supplied else
                         f"Is {second} more robust than {first} beyond clean accuracy?")
            b, i = m[first], m[second]
            text = ""
            if result.test_accuracy is not None:
                d_clean = result.test_accuracy[second] - result.test_accuracy[first]
                text = f"Clean test accuracy {100 * d_clean:+.2f} points ({better(d_clean)}). "
            d_mca = i.corruptions.mean_corruption_accuracy - b.corruptions.mean_corruption_accuracy
            d_drop = i.corruptions.drop_from_clean - b.corruptions.drop_from_clean
            d_ece = i.calibration.uncalibrated.ece - b.calibration.uncalibrated.ece
            d_pgd = [(y or 0) - (x or 0) for x, y in zip(b.adversarial.pgd, i.adversarial.pgd)]
            eps = b.adversarial.eps_255
            text += (
                f"Mean corruption accuracy {100 * d_mca:+.2f} points ({better(d_mca)}); the drop from clean went from "
                f"{100 * b.corruptions.drop_from_clean:.1f} to {100 * i.corruptions.drop_from_clean:.1f} points "
                f"({better(d_drop, higher_is_better=False)} relative robustness). ECE "
                f"{pct(b.calibration.uncalibrated.ece)} -> {pct(i.calibration.uncalibrated.ece)} "
                f"({better(d_ece, higher_is_better=False)} calibrated). PGD accuracy at {eps[0]}/255 "
                f"{100 * d_pgd[0]:+.1f} points and at {eps[-1]}/255 {100 * d_pgd[-1]:+.1f} points "
                f"({better(d_pgd[0])} / {better(d_pgd[-1])}).")
            blocks.append(Paragraph(text))
            change = result.corruption_change()
            best, worst = max(change, key=change.get), min(change, key=change.get)
            helped = "The augmentation helped" if not study.supplied else f"{second} gained"
            blocks.append(Paragraph(
                f"{helped} most against {best} and least (or hurt most) against {worst}. Neither "
                f"model was trained against attacks, so accuracy near zero at {eps[-1]}/255 is expected; the small "
                f"budgets show how brittle the decision boundary is."))
        return [Section(self.title, [Section(t, b, key=self.name) for t, b in subs], key=self.name)]



stage = StressStage()
