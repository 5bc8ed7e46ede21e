"""metrics.json and analysis_report.txt, every number taken from the run."""
from __future__ import annotations

import datetime as _dt
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .augment import PRESETS
from .config import PROFILES
from .data import CLASSES
from .io import atomic_write, save_json
from .lock import locks_output
from .runtime import describe_hardware, resolve_device

if TYPE_CHECKING:
    from .pipeline import RunResult

WIDTH = 88


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _model_metrics(result: "RunResult", name: str) -> dict[str, Any]:
    trained = result.trained[name]
    history = trained.result.history
    summary = result.summaries[name]
    best = max(history, key=lambda h: h["val_acc"])
    return {
        **summary,
        "train_seconds": trained.result.train_seconds,
        "epochs": len(history),
        "final_val_accuracy": history[-1]["val_acc"],
        "best_val_accuracy": best["val_acc"],
        "best_val_epoch": best["epoch"],
        "augment": trained.config.augment,
        "checkpoint": str(trained.checkpoint),
        "reused_checkpoint": bool(trained.result.reused),  # True: loaded, not trained in this run
        **({"published_run": trained.reference} if getattr(trained, "reference", None) else {}),  # --weights
        **_stress_metrics(result, name),
        **_explain_metrics(result, name),
    }


def _explain_metrics(result: "RunResult", name: str) -> dict[str, Any]:
    """The explanation stage's headline numbers for one model (empty when it did not run)."""
    ex = result.explanations
    if not ex:
        return {}
    faith = {group: {m: {"deletion_auc": v["deletion_auc"], "insertion_auc": v["insertion_auc"],
                         **{k: v[k] for k in ("verdict", "verdict_smooth") if k in v}}
                     for m, v in r["methods"].items()} for group, r in ex["faithfulness"][name].items() if r.get("n")}
    ls = ex["label_suspects"][name]
    return {
        "faithfulness": faith,
        "sanity_check": {m: ex["sanity"][name][m]["verdict"]["passed"] for m in ("gradcam", "gradcam++")},
        "label_suspect_failures": ls["suspect_failures"],
        "model_error_failures": ls["failures"] - ls["suspect_failures"],
        "label_suspects_test": ls["suspects"],
        "label_suspects_reliable": ls["reliable"],
    }


def _stress_metrics(result: "RunResult", name: str) -> dict[str, Any]:
    """The stress stage's headline numbers for one model (empty when it did not run)."""
    if not result.stress:
        return {}
    r = result.stress[name]
    cal, corr, adv = r["calibration"], r["corruptions"], r["adversarial"]
    eps = [f"{k}/255" for k in adv["eps_255"]]
    return {
        "ece": cal["uncalibrated"]["ece"],                 # 15 bins, clean test set, uncalibrated
        "ece_calibrated": cal["calibrated"]["ece"],        # after temperature scaling fitted on validation
        "mce": cal["uncalibrated"]["mce"],
        "mce_calibrated": cal["calibrated"]["mce"],
        "temperature": cal["temperature"],
        "high_confidence_failures_calibrated": cal["calibrated"]["failures"],
        "mean_corruption_accuracy": corr["mean_corruption_accuracy"],
        "corruption_clean_accuracy": corr["clean_accuracy"],   # the same images, uncorrupted
        "corruption_drop": corr["drop_from_clean"],
        "corruption_ece_by_severity": corr["ece_by_severity"],
        "adversarial_clean_accuracy": adv["clean_accuracy"],
        "fgsm_accuracy": dict(zip(eps, adv["fgsm"])),
        "pgd_accuracy": dict(zip(eps, adv["pgd"])),
    }


def build_metrics(result: "RunResult") -> dict[str, Any]:
    """The machine-readable results: baseline, improved, comparison."""
    base_cfg = result.trained["baseline"].config
    imp_cfg = result.trained["improved"].config
    cmp = result.comparison
    return {
        "baseline": _model_metrics(result, "baseline"),
        "improved": _model_metrics(result, "improved"),
        "comparison": {
            "config_diff": {k: list(v) for k, v in base_cfg.diff(imp_cfg).items()},
            "accuracy_diff": cmp["accuracy_diff"],
            "mcnemar": cmp["mcnemar"],
            "failures": cmp["failures"],
            "threshold": cmp["threshold"],
        },
        **({"stress": _stress_details(result)} if result.stress else {}),
        **({"explanations": {k: v for k, v in result.explanations.items() if k != "sanity_maps"}}
           if result.explanations else {}),
        "config": base_cfg.to_dict(),
        "profile": result.config.profile,
        "hardware": describe_hardware(resolve_device(result.config.device)),
        "pipeline_seconds": result.seconds,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def _stress_details(result: "RunResult") -> dict[str, Any]:
    from .robustness.suite import stress_settings
    return {"settings": stress_settings(result.trained["baseline"].config),
            "files": ["corruption_accuracy.csv", "stress_baseline.json", "stress_improved.json",
                      "robustness.png", "corruption_examples.png", "reliability_diagram.png", "adversarial.png"],
            **{name: result.stress[name] for name in ("baseline", "improved")}}


def _gap(epoch: dict) -> str:
    """Train minus validation accuracy of one history entry, in signed points."""
    return f"{100 * (epoch['train_acc'] - epoch['val_acc']):+.1f}"


def _section(title: str) -> list[str]:
    return ["", title, "-" * len(title)]


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent) or [""]


def _where(d: dict) -> str:
    if d["peak_region"].startswith("nowhere"):
        return "is all zero (no positive evidence for the class at this layer)"
    return (f"peaks at the {d['peak_region']} (peak at row {d['peak'][0]}, col {d['peak'][1]}; centroid row "
            f"{d['centroid'][0]:.0f}, col {d['centroid'][1]:.0f}; {100 * d['centre_fraction']:.0f}% of the "
            f"mass in the central quarter)")


def _case_lines(result: "RunResult") -> list[str]:
    lines = []
    improved = result.predictions.get("improved")
    threshold = result.failures["baseline"].threshold
    if not result.cases:
        return _wrap(f"The baseline made no wrong prediction above {threshold:.0%} confidence, "
                     "so there are no failure cases to explain.")
    wanted = result.trained["baseline"].config.top_failures
    if len(result.cases) < wanted:
        lines += _wrap(f"Only {len(result.cases)} high-confidence failure(s) exist, fewer than the "
                       f"{wanted} cases asked for; all are shown.")
    for case in result.cases:
        f = case.failure
        top3 = ", ".join(f"{CLASSES[c]} {100 * p:.1f}%" for c, p in f.top3)
        text = (f"Case {case.rank} (failure_case_{case.rank}.png): test image {f.dataset_index}, "
                f"true {CLASSES[f.true]}, predicted {CLASSES[f.pred]} with {100 * f.confidence:.1f}% "
                f"confidence (top-3: {top3}). Grad-CAM for the predicted class "
                f"{_where(case.where_pred)}; for the true class it {_where(case.where_true)}.")
        if improved is not None:
            p = int(improved.preds[f.position])
            conf = float(improved.probs[f.position, p])
            verdict = "fixed" if p == f.true else "still wrong"
            text += (f" The improved model predicts {CLASSES[p]} ({100 * conf:.1f}%): {verdict}.")
        if case.label_suspect:
            text += " Confident learning flags this label as a suspected label error"
            reliable = (result.explanations or {}).get("label_suspects", {}).get("baseline", {}).get("reliable", True)
            text += "." if reliable else " (unreliable for this model: see the failure triage below)."
        lines += _wrap(text, "  ")
        lines.append("")
    return lines


def render_report(result: "RunResult", metrics: dict[str, Any]) -> str:
    base, imp = metrics["baseline"], metrics["improved"]
    cmp = metrics["comparison"]
    diff = cmp["accuracy_diff"]
    mc = cmp["mcnemar"]
    fc = cmp["failures"]["counts"]
    threshold = cmp["threshold"]
    n_test = base["n"]
    splits_line = (f"{n_test} test images" + (" (a stratified subset of the official test set)"
                                              if result.config.test_subset else " (the official test set)"))
    reused = [name for name in ("baseline", "improved") if metrics[name]["reused_checkpoint"]]
    timing = f"whole pipeline {metrics['pipeline_seconds']:.0f} s"
    if reused:  # a rerun: its wall time says nothing about training
        timing = (f"this run {metrics['pipeline_seconds']:.0f} s with the {' and '.join(reused)} model{'s' if len(reused) > 1 else ''} "
                  f"loaded from finished checkpoints (training times below are from when they were trained)")
    lines = ["cnnstress analysis report", "=" * 25]
    lines += _wrap(f"Created {metrics['created']}, profile '{metrics['profile']}', {timing}.")
    lines += [f"Hardware: {metrics['hardware']}."]
    lines += _section("1. Configuration")
    cfg = metrics["config"]
    shown = ["seed", "epochs", "batch_size", "lr", "weight_decay", "schedule", "val_size", "train_subset",
             "precision", "device", "failure_threshold"]
    lines += _wrap("Baseline: " + ", ".join(f"{k}={cfg[k]}" for k in shown) + ".")
    changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in cmp["config_diff"].items())
    lines += _wrap(f"Improved model = baseline with exactly one change ({changes}); everything else, "
                   "the seed included, is identical.")
    spec = PRESETS["enhanced"]
    lines += _wrap(f"Enhanced augmentation: RandomCrop(32, padding={spec.crop_padding}), "
                   f"HorizontalFlip(p={spec.flip_p}), Rotation(+/-{spec.rotation_deg:g} deg), "
                   f"ColorJitter(brightness={spec.brightness}, contrast={spec.contrast}, "
                   f"saturation={spec.saturation}, hue={spec.hue}), RandomErasing(p={spec.erase_p}, "
                   f"scale={spec.erase_scale}, ratio={spec.erase_ratio}).")
    lines += _section("2. Training")
    for name, m in (("baseline", base), ("improved", imp)):
        hist = result.trained[name].result.history
        lines += _wrap(f"{name}: {m['epochs']} epochs in {m['train_seconds']:.0f} s "
                       f"({m['train_seconds'] / max(m['epochs'], 1):.1f} s/epoch); final train loss "
                       f"{hist[-1]['train_loss']:.3f} / accuracy {_pct(hist[-1]['train_acc'])}, validation loss "
                       f"{hist[-1]['val_loss']:.3f} / accuracy {_pct(m['final_val_accuracy'])} "
                       f"(best {_pct(m['best_val_accuracy'])} at epoch {m['best_val_epoch']}). "
                       f"Gap train-validation accuracy: {_gap(hist[-1])} points.")
    lines.append("Curves: training_curves.png.")
    lines += _section(f"3. Test results ({splits_line})")
    lines.append(f"{'model':<10} {'accuracy':>9} {'loss':>7} {'failures >' + format(threshold, '.0%'):>15} "
                 f"{'mean conf.':>11}")
    for name, m in (("baseline", base), ("improved", imp)):
        lines.append(f"{name:<10} {_pct(m['test_accuracy']):>9} {m['loss']:>7.3f} "
                     f"{m['high_confidence_failures']:>15d} {_pct(m['mean_confidence'], 1):>11}")
    lines.append("")
    lines.append(f"{'class':<11} {'baseline':>9} {'improved':>9} {'change':>8}")
    for cls in CLASSES:
        a, b = base["per_class_accuracy"][cls], imp["per_class_accuracy"][cls]
        change = "n/a" if a is None or b is None else f"{100 * (b - a):+.1f}"
        lines.append(f"{cls:<11} {_pct(a, 1):>9} {_pct(b, 1):>9} {change:>8}")
    lines.append("Figures: model_comparison.png, confusion_matrix.png.")
    lines += _section("4. Most confused class pairs (both directions)")
    for name, m in (("baseline", base), ("improved", imp)):
        pairs = m["top_confused_pairs"]
        text = "; ".join(f"{p['a']}/{p['b']} {p['total']} ({p['a']}->{p['b']} {p['a_as_b']}, "
                         f"{p['b']}->{p['a']} {p['b_as_a']})" for p in pairs) or "none"
        lines += _wrap(f"{name}: {text}.")
    lines += _section(f"5. The baseline's top high-confidence failures (>{threshold:.0%})")
    lines += _case_lines(result)
    lines += _section("6. What the enhanced augmentation changed")
    sig = "significant" if mc["p_value"] < 0.05 else "not significant"
    lines += _wrap(
        f"Test accuracy {_pct(diff['acc_a'])} -> {_pct(diff['acc_b'])}: {100 * diff['diff']:+.2f} points, "
        f"{100 * diff['confidence']:.0f}% paired-bootstrap interval [{100 * diff['low']:+.2f}, "
        f"{100 * diff['high']:+.2f}] ({diff['n_boot']} resamples).")
    lines += _wrap(
        f"McNemar's test on the paired predictions ({mc['method']}): {mc['b']} images only the baseline "
        f"gets right, {mc['c']} only the improved model gets right; statistic {mc['statistic']:.2f}, "
        f"p = {mc['p_value']:.3g} ({sig} at 5%).")
    lines += _wrap(
        f"High-confidence failures {fc['a']} -> {fc['b']}. Of the baseline's {fc['a']}: {fc['fixed']} fixed "
        f"(now correct), {fc['persisting']} still wrong ({fc['still_high_confidence']} still above "
        f"{threshold:.0%} confidence, {fc['wrong_low_confidence']} wrong with less confidence). "
        f"Of the improved model's {fc['b']}: {fc['still_high_confidence']} persist from the baseline's, "
        f"{fc['new']} new (the baseline predicted the image correctly) and {fc['newly_confident']} newly "
        f"confident (the baseline got the image wrong too, with at most {threshold:.0%} confidence).")
    gains = sorted(((imp["per_class_accuracy"][c] or 0) - (base["per_class_accuracy"][c] or 0), c) for c in CLASSES)
    lines += _wrap(f"Largest per-class gain: {gains[-1][1]} ({100 * gains[-1][0]:+.1f} points); "
                   f"smallest: {gains[0][1]} ({100 * gains[0][0]:+.1f} points).")
    number = 7
    if result.stress:
        lines += _stress_lines(result, metrics, number)
        number += 1
    if result.explanations:
        lines += _explain_lines(result, metrics, number)
        number += 1
    lines += _section(f"{number}. Summary")
    better = diff["diff"] > 0
    lines += _wrap(
        f"Changing only the augmentation preset {'raised' if better else 'did not raise'} test accuracy "
        f"({100 * diff['diff']:+.2f} points, {sig} by McNemar) and changed the number of wrong predictions "
        f"made with more than {threshold:.0%} confidence from {fc['a']} to {fc['b']} "
        f"({(fc['b'] - fc['a']) / fc['a'] * 100 if fc['a'] else 0:+.0f}%). "
        f"Files: metrics.json, predictions_baseline.npz and predictions_improved.npz hold every number "
        f"above; failures_baseline.csv and failures_improved.csv list each failure.")
    base_hist = result.trained["baseline"].result.history[-1]
    imp_hist = result.trained["improved"].result.history[-1]
    if not better and imp_hist["train_acc"] < base_hist["train_acc"]:
        # Augmentation makes the training task harder; in a short run that shows
        # as underfitting rather than as better generalisation.
        lines += _wrap(
            f"The improved model also fits its training data less ({_pct(imp_hist['train_acc'])} vs "
            f"{_pct(base_hist['train_acc'])} training accuracy after {imp['epochs']} epochs, train-validation "
            f"gap {_gap(imp_hist)} vs {_gap(base_hist)} points): it is still "
            f"underfitting, and stronger augmentation needs more epochs than this run had to pay off "
            f"(the 'full' profile trains {PROFILES['full']['epochs']} epochs on every training image).")
    return "\n".join(lines) + "\n"


def _better(delta: float, higher_is_better: bool = True, tol: float = 0.0) -> str:
    if abs(delta) <= tol:
        return "unchanged"
    return "better" if (delta > 0) == higher_is_better else "worse"


def _stress_lines(result: "RunResult", metrics: dict[str, Any], number: int = 7) -> list[str]:
    """Section 7: calibration, corruptions, adversarial, and what the one change did to each."""
    from .robustness.corruptions import CORRUPTIONS, SEVERITIES, UNAVAILABLE

    st = {name: result.stress[name] for name in ("baseline", "improved")}
    cal = {n: r["calibration"] for n, r in st.items()}
    cor = {n: r["corruptions"] for n, r in st.items()}
    adv = {n: r["adversarial"] for n, r in st.items()}
    threshold = metrics["comparison"]["threshold"]
    lines = _section(f"{number}. Stress tests beyond accuracy")
    lines += ["", f"{number}a. Calibration (clean test set)"]
    lines += _wrap(f"Expected calibration error with {cal['baseline']['bins']} equal-width confidence bins "
                   f"(Guo et al. 2017) and maximum calibration error over non-empty bins. Temperature T fitted by "
                   f"minimising the NLL on the {cal['baseline']['val_n']} validation images (never the test set); "
                   f"T > 1 means the model was over-confident. Accuracy is unchanged by T.")
    lines.append(f"{'model':<10} {'ECE':>7} {'MCE':>7} {'NLL':>6} {'T':>6} {'ECE(T)':>7} {'MCE(T)':>7} "
                 f"{'NLL(T)':>7} {'failures >' + format(threshold, '.0%') + ' before/after':>26}")
    for n, c in cal.items():
        u, k = c["uncalibrated"], c["calibrated"]
        lines.append(f"{n:<10} {_pct(u['ece']):>7} {_pct(u['mce'], 1):>7} {u['nll']:>6.3f} {c['temperature']:>6.3f} "
                     f"{_pct(k['ece']):>7} {_pct(k['mce'], 1):>7} {k['nll']:>7.3f} "
                     f"{str(u['failures']) + ' -> ' + str(k['failures']):>26}")
    lines.append("Figure: reliability_diagram.png (bars labelled with the images per bin).")

    n_cell = cor["baseline"]["n"]
    lines += ["", f"{number}b. Common corruptions ({len(CORRUPTIONS)} CIFAR-10-C types x severities "
                  f"{SEVERITIES[0]}-{SEVERITIES[-1]}, {n_cell} test images per cell)"]
    missing = "; ".join(f"{k}: {v}" for k, v in UNAVAILABLE.items())
    lines += _wrap(f"Generated in the package from the clean test images with the CIFAR parameters of Hendrycks "
                   f"& Dietterich's generation code, seeded (no download). Left out: {missing}. Mean corruption "
                   f"accuracy = the mean over every type and severity (RobustBench's headline figure); the drop is "
                   f"from the clean accuracy on the same {n_cell} images. One cell's accuracy has a standard error "
                   f"of up to {50 / n_cell ** 0.5:.1f} points at this sample size.")
    fams = list(cor["baseline"]["accuracy_by_family"])
    lines.append(f"{'model':<10} {'clean':>7} {'mean corr.':>10} {'drop':>7} " + " ".join(f"{f:>8}" for f in fams))
    for n, c in cor.items():
        lines.append(f"{n:<10} {_pct(c['clean_accuracy'], 1):>7} {_pct(c['mean_corruption_accuracy']):>10} "
                     f"{100 * c['drop_from_clean']:>6.1f}p " + " ".join(f"{_pct(c['accuracy_by_family'][f], 1):>8}" for f in fams))
    lines.append("")
    lines.append(f"{'corruption':<18} {'baseline':>9} {'improved':>9} {'change':>7}   (mean over severities)")
    for cname in CORRUPTIONS:
        a = sum(cor["baseline"]["accuracy"][cname]) / len(SEVERITIES)
        b = sum(cor["improved"]["accuracy"][cname]) / len(SEVERITIES)
        lines.append(f"{cname:<18} {_pct(a, 1):>9} {_pct(b, 1):>9} {100 * (b - a):>+7.1f}")
    lines.append("")
    lines.append("ECE under corruption, all types pooled per severity (uncalibrated / with the clean T):")
    for n, c in cor.items():
        lines.append(f"  {n:<10} " + "  ".join(f"s{s} {_pct(e, 1)}/{_pct(ec, 1)}" for s, e, ec in
                                               zip(SEVERITIES, c["ece_by_severity"], c["ece_calibrated_by_severity"])))
    lines.append("Files: robustness.png, corruption_examples.png, corruption_accuracy.csv (RobustBench layout).")

    a0 = adv["baseline"]
    lines += ["", f"{number}c. Adversarial robustness (L-infinity, {a0['n']} test images, PGD {a0['steps']} steps of "
                  f"2.5*eps/steps with a seeded random start)"]
    lines.append(f"{'eps':>6} " + " ".join(f"{n + ' ' + atk.upper():>14}" for n in adv for atk in ("fgsm", "pgd")))
    lines.append(f"{'0':>6} " + " ".join(f"{_pct(adv[n]['clean_accuracy'], 1):>14}" for n in adv for _ in (0, 1)))
    for i, k in enumerate(a0["eps_255"]):
        lines.append(f"{str(k) + '/255':>6} " + " ".join(f"{_pct(adv[n][atk][i], 1):>14}" for n in adv
                                                          for atk in ("fgsm", "pgd")))
    for n, r in adv.items():
        weaker = [f"{k}/255" for k, f, p in zip(r["eps_255"], r["fgsm"], r["pgd"]) if p > f]
        if weaker:
            lines += _wrap(f"For the {n} model PGD left more images correct than FGSM at {', '.join(weaker)}: "
                           f"its {r['steps']} small steps missed what FGSM's one full step found; the lower of the "
                           f"two is the better estimate of robust accuracy there.")
    lines.append("Figure: adversarial.png.")

    lines += ["", f"{number}d. Did the augmentation help beyond clean accuracy?"]
    d_clean = metrics["improved"]["test_accuracy"] - metrics["baseline"]["test_accuracy"]
    d_mca = cor["improved"]["mean_corruption_accuracy"] - cor["baseline"]["mean_corruption_accuracy"]
    d_drop = cor["improved"]["drop_from_clean"] - cor["baseline"]["drop_from_clean"]
    d_ece = cal["improved"]["uncalibrated"]["ece"] - cal["baseline"]["uncalibrated"]["ece"]
    d_pgd = [b - a for a, b in zip(adv["baseline"]["pgd"], adv["improved"]["pgd"])]
    k_small = a0["eps_255"][0]
    lines += _wrap(
        f"Clean test accuracy {100 * d_clean:+.2f} points ({_better(d_clean)}). Mean corruption accuracy "
        f"{100 * d_mca:+.2f} points ({_better(d_mca)}); the drop from clean went from "
        f"{100 * cor['baseline']['drop_from_clean']:.1f} to {100 * cor['improved']['drop_from_clean']:.1f} points "
        f"({_better(d_drop, higher_is_better=False)} relative robustness). ECE {_pct(cal['baseline']['uncalibrated']['ece'])} "
        f"-> {_pct(cal['improved']['uncalibrated']['ece'])} ({_better(d_ece, higher_is_better=False)} calibrated). "
        f"PGD accuracy at {k_small}/255 {100 * d_pgd[0]:+.1f} points and at {a0['eps_255'][-1]}/255 "
        f"{100 * d_pgd[-1]:+.1f} points ({_better(d_pgd[0])} / {_better(d_pgd[-1])}).")
    worst = min(CORRUPTIONS, key=lambda c: sum(cor["improved"]["accuracy"][c]) - sum(cor["baseline"]["accuracy"][c]))
    best = max(CORRUPTIONS, key=lambda c: sum(cor["improved"]["accuracy"][c]) - sum(cor["baseline"]["accuracy"][c]))
    lines += _wrap(f"The augmentation helped most against {best} and least (or hurt most) against {worst}. "
                   f"Neither model was trained against attacks, so accuracy near zero at {a0['eps_255'][-1]}/255 "
                   f"is expected; the small budgets show how brittle the decision boundary is.")
    return lines


def _explain_lines(result: "RunResult", metrics: dict[str, Any], number: int) -> list[str]:
    """Explanations: faithfulness, sanity check, drift, label suspects."""
    from .xai.randomisation import verdict_word

    ex = result.explanations
    cfg = result.trained["baseline"].config
    lines = _section(f"{number}. Can the explanations and the failures be trusted?")
    lines += ["", f"{number}a. Faithfulness: deletion / insertion (Petsiuk et al. 2018), maps at {cfg.cam_layer}"]
    start = "a blurred copy of the image" if cfg.faithfulness_baseline == "blur" else "a mean-colour image"
    lines += _wrap(f"Pixels are replaced by those of {start} in order of the map's importance (deletion), or "
                   f"restored into it (insertion), in {cfg.faithfulness_steps} steps, and the probability of the "
                   f"explained class (the model's prediction) is recorded; AUC over the fraction of pixels. Lower "
                   f"deletion and higher insertion AUC = more faithful. Equal map values (e.g. the zeros of a CAM "
                   f"after its ReLU) are ordered at random (seeded), not top row first. Two chance levels: a "
                   f"pixel-noise map, and a smooth random map drawn at the CAM's own resolution and upsampled as "
                   f"the CAM is (a CAM removes connected regions, which alone changes the curves, so beating the "
                   f"smooth map is the stricter test). A method counts as better than a random map only when the "
                   f"paired 95% intervals (Student's t over the images) of both differences exclude zero.")
    lines.append(f"{'model':<9} {'images':<15} {'method':<14} {'deletion':>8} {'insertion':>9}  "
                 f"verdict vs pixel noise | vs smooth random")
    for name, groups in ex["faithfulness"].items():
        for group, r in groups.items():
            if not r.get("n"):
                lines.append(f"{name:<9} {group + ' (0)':<15} no images")
                continue
            for method, m in r["methods"].items():
                verdict = f"{m['verdict']} | {m['verdict_smooth']}" if "verdict" in m else "(reference)"
                lines.append(f"{name:<9} {group + ' (' + str(r['n']) + ')':<15} {method:<14} "
                             f"{m['deletion_auc']:>8.3f} {m['insertion_auc']:>9.3f}  {verdict}")
    weak = [f"{m} ({name}, {group}): {v['verdict']} | {v['verdict_smooth']}"
            for name, groups in ex["faithfulness"].items() for group, r in groups.items() if r.get("n")
            for m, v in r["methods"].items() if "verdict" in v
            if {v["verdict"], v["verdict_smooth"]} != {"better than random"}]
    lines += _wrap("Every explanation method beat both random maps on both measures in every group." if not weak else
                   "Not clearly better than both random maps on both measures (verdict vs pixel noise | vs "
                   "smooth random): " + "; ".join(weak) + ". Where a "
                   "method does not beat random, its maps are no evidence of what the model used; where it beats "
                   "pixel noise but not the smooth map, the advantage may be smoothness alone.")
    lines.append("Figure: faithfulness.png.")

    lines += ["", f"{number}b. Sanity check: cascading model-parameter randomisation (Adebayo et al. 2018)"]
    n = ex["sanity"]["baseline"]["n"]
    lines += _wrap(f"On a copy of each model (the trained weights are untouched), the layers are re-initialised from "
                   f"the head down, cumulatively, and the maps of {n} test images recomputed for the same classes. "
                   f"A method passes when, once {cfg.cam_layer} and everything above it are random, the median "
                   f"|Spearman| rank correlation with the original maps is below the threshold: maps that survive "
                   f"the destruction of the weights do not explain the model.")
    for name, s in ex["sanity"].items():
        for method in ("gradcam", "gradcam++"):
            v = s[method]["verdict"]
            word = verdict_word(v["passed"]).upper()
            signed = s[method]["median_spearman_signed"][v["step_index"]] if v["step_index"] is not None else None
            signed = "n/a" if signed is None else f"{signed:.3f}"
            lines += _wrap(f"{word}: {name}, {method}: {v['reason']}; there the signed Spearman median is {signed} "
                           f"and the median SSIM {v['median_ssim']:.3f}.", "  ")
    lines.append("Figure: sanity_check.png.")

    if "drift" in ex:
        d = ex["drift"]
        lines += ["", f"{number}c. Explanation drift: baseline vs improved Grad-CAM on the same images"]
        lines += _wrap("Each model explains its own prediction. Rank correlation of the two maps (1 = same order of "
                       "importance) and the mean share of map mass in the central quarter of the image, where CIFAR "
                       "objects usually sit.")
        lines.append(f"{'failures':<15} {'images':>6} {'median rho':>10} {'centre: baseline':>16} {'improved':>8} "
                     f"{'moved onto centre':>17}")
        for group in ("fixed", "persisting", "new", "newly_confident"):
            g = d[group]
            label = group.replace("_", " ")
            if not g["n"]:
                lines.append(f"{label:<15} {0:>6}")
                continue
            rho = "n/a" if g["median_spearman"] is None else f"{g['median_spearman']:.3f}"
            lines.append(f"{label:<15} {g['n']:>6} {rho:>10} {_pct(g['centre_fraction']['baseline'], 1):>16} "
                         f"{_pct(g['centre_fraction']['improved'], 1):>8} {g['moved_onto_centre']:>10} of {g['n']}")

    lines += ["", f"{number}{'d' if 'drift' in ex else 'c'}. Failure triage: suspected label errors (confident learning)"]
    lines += _wrap("Confident learning (Northcutt et al. 2021, cleanlab's prune_by_noise_rate) on the test-set "
                   "probabilities, which are out-of-sample for a model trained on the training split: an image is a "
                   "suspect when the model is confidently sure of another class beyond what that class's per-class "
                   "threshold allows. A suspect high-confidence failure may be a wrong label, not a model error; it "
                   "is marked in the failure-case figures.")
    from .xai.checks import KNOWN_TEST_LABEL_ERRORS
    for name, ls in ex["label_suspects"].items():
        lines += _wrap(f"{name}: {ls['suspect_failures']} of {ls['failures']} high-confidence failures are suspected "
                       f"label errors, {ls['failures'] - ls['suspect_failures']} are model errors "
                       f"({ls['suspects']} suspects in all {ls['n_test']} test images, "
                       f"{100 * ls['flagged_fraction']:.1f}%).", "  ")
    agree = ex.get("label_agreement")
    if agree:
        lines += _wrap(f"Both models flag {agree['count']} test images and predict the same other class for them. "
                       f"The two models are not independent (same initial weights, same batch order: only the "
                       f"augmentation differs), so they share many mistakes and this agreement is weaker evidence "
                       f"of a wrong label than two independently trained models would give. Among the baseline's "
                       f"failures {len(agree['failures']['baseline'])}, among the improved model's "
                       f"{len(agree['failures']['improved'])}.", "  ")
    weak = [name for name, ls in ex["label_suspects"].items() if not ls["reliable"]]
    if weak:
        lines += _wrap(f"Unreliable here ({', '.join(weak)}): Northcutt et al. (2021) found {KNOWN_TEST_LABEL_ERRORS} "
                       f"label errors in CIFAR-10's 10,000 test images (about 0.5%); flagging far more means confident "
                       f"learning is flagging the model's own confident mistakes. Its thresholds come from the model's "
                       f"probabilities, so it needs an accurate model (train longer, e.g. the 'full' profile) before "
                       f"its suspects mean anything.")
    lines.append("Figures: label_suspects.png (baseline), cam_methods.png (Grad-CAM vs Grad-CAM++, layer3 vs layer4).")
    return lines


@locks_output
def write_report(result: "RunResult") -> Path:
    """Write metrics.json and analysis_report.txt under result.outputs."""
    metrics = build_metrics(result)
    save_json(result.outputs / "metrics.json", metrics)
    path = result.outputs / "analysis_report.txt"
    text = render_report(result, metrics)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
