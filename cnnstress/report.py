"""metrics.json and analysis_report.txt, every number taken from the run."""
from __future__ import annotations

import datetime as _dt
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .augment import PRESETS
from .checkpoint import atomic_write, save_json
from .config import PROFILES
from .data import CLASSES
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
        "config": base_cfg.to_dict(),
        "profile": result.config.profile,
        "hardware": describe_hardware(resolve_device(result.config.device)),
        "pipeline_seconds": result.seconds,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


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
        f"{fc['new']} failures are new to the improved model.")
    gains = sorted(((imp["per_class_accuracy"][c] or 0) - (base["per_class_accuracy"][c] or 0), c) for c in CLASSES)
    lines += _wrap(f"Largest per-class gain: {gains[-1][1]} ({100 * gains[-1][0]:+.1f} points); "
                   f"smallest: {gains[0][1]} ({100 * gains[0][0]:+.1f} points).")
    lines += _section("7. Summary")
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


def write_report(result: "RunResult") -> Path:
    """Write metrics.json and analysis_report.txt under result.outputs."""
    metrics = build_metrics(result)
    save_json(result.outputs / "metrics.json", metrics)
    path = result.outputs / "analysis_report.txt"
    text = render_report(result, metrics)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
