"""Stress tests beyond clean accuracy, for trained models on the test split.

Three questions, each answered per model from a fixed, seeded sample:

* **Calibration**: can the confidence be trusted? ECE/MCE with
  `config.calibration_bins` equal-width bins on the clean test set, before and
  after temperature scaling. The temperature is fitted on the *validation*
  split's logits, never on the test set.
* **Corruptions**: CIFAR-10-C's common corruptions (cnnstress.robustness.corruptions),
  generated from a stratified sample of `config.corruption_subset` clean test
  images (None = all), at severities 1-5: accuracy and ECE per cell, the mean
  corruption accuracy (RobustBench's headline figure, the mean over every type
  and severity), the same mean without frost (the 14 types of runs before
  frost was added) and the drop from the clean accuracy on the same images.
* **Adversarial**: FGSM and PGD (L-infinity) accuracy on a stratified sample
  of `config.adv_subset` test images at budgets `config.adv_eps` grey levels.

Every model sees the same corrupted and the same clean images, so the numbers
of two models are paired. Results are plain JSON-ready dicts.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import Split, sample_positions
from ..evaluate import Predictions, infer
from ..runtime import resolve_precision, seed_stream
from .calibration import apply_temperature, calibration_bins, confident_errors, fit_temperature
from .corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt, corrupt_cells

# Bump when the stage's numbers change meaning (invalidates caches). 2: frost added,
# motion blur and snow through ImageMagick's exact 8-bit conversion (issue 19).
STRESS_VERSION = 2
# The types of the runs before frost was added, for the comparable mean.
TYPES_WITHOUT_FROST: tuple[str, ...] = tuple(c for c in CORRUPTIONS if c != "frost")


def stress_settings(config: Config) -> dict[str, Any]:
    """What the stress numbers depend on besides the model and the test images."""
    return {
        "version": STRESS_VERSION,
        "seed": config.seed,
        "corruption_subset": config.corruption_subset,
        "corruptions": list(CORRUPTIONS),
        "severities": list(SEVERITIES),
        "adv_subset": config.adv_subset,
        "adv_eps": list(config.adv_eps),
        "pgd_steps": config.pgd_steps,
        "calibration_bins": config.calibration_bins,
    }


def _bins_dict(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, Any]:
    b = calibration_bins(probs, labels, n_bins)

    def clean(a: np.ndarray) -> list:
        return [None if not np.isfinite(v) else float(v) for v in a]
    return {"ece": b.ece, "mce": b.mce, "count": b.count.tolist(),
            "accuracy": clean(b.accuracy), "confidence": clean(b.confidence)}


def calibration_report(val_logits: torch.Tensor, val_labels: torch.Tensor, test: Predictions,
                       config: Config) -> dict[str, Any]:
    """Temperature fitted on validation logits (N,C); ECE, MCE, NLL and the
    failure count (wrong above `config.failure_threshold`) on the test set
    before and after dividing the logits by it."""
    temperature = fit_temperature(val_logits, val_labels)
    scaled = apply_temperature(test.logits, temperature)
    nll = torch.nn.functional.cross_entropy
    n_bins = config.calibration_bins
    report = {
        "bins": n_bins,
        "temperature": temperature,
        "val_n": int(val_labels.shape[0]),
        "test_n": len(test),
        "uncalibrated": {**_bins_dict(test.probs, test.labels, n_bins),
                         "nll": float(nll(test.logits.float(), test.labels))},
        "calibrated": {**_bins_dict(scaled, test.labels, n_bins),
                       "nll": float(nll(test.logits.float() / temperature, test.labels))},
    }
    return count_failures(report, test, config.failure_threshold)


def count_failures(report: dict[str, Any], test: Predictions, threshold: float) -> dict[str, Any]:
    """Set the failure counts (wrong above `threshold`) before and after
    temperature scaling in a calibration report; cheap, so a changed threshold
    never needs the stage rerun."""
    report["failure_threshold"] = threshold
    report["uncalibrated"]["failures"] = confident_errors(test.probs, test.labels, threshold)
    report["calibrated"]["failures"] = confident_errors(apply_temperature(test.logits, report["temperature"]),
                                                        test.labels, threshold)
    return report


def _cell_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float) -> tuple[float, float]:
    return (calibration_bins(logits.softmax(1), labels, n_bins).ece,
            calibration_bins(apply_temperature(logits, temperature), labels, n_bins).ece)


def corruption_report(models: Mapping[str, nn.Module], test: Split, config: Config, *,
                      device: torch.device, temperatures: Mapping[str, float],
                      progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Accuracy and ECE of every model at every corruption type and severity,
    on one stratified sample of the test split. Each corrupted batch is made
    once (seeded by config.seed) and fed to every model; the batches are made
    by config.corruption_workers processes (None = auto), which work ahead
    while the models evaluate earlier types, and do not depend on that count."""
    pos = sample_positions(test.labels, config.corruption_subset, seed_stream(config.seed, "corruption_sample"))
    images, labels = test.images[pos], test.labels[pos]
    amp = resolve_precision(config.precision, device)

    def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return infer(model, x, device=device, batch_size=config.eval_batch_size, amp_dtype=amp,
                     channels_last=config.channels_last)

    out: dict[str, dict[str, Any]] = {}
    pooled: dict[str, dict[int, list[torch.Tensor]]] = {name: {s: [] for s in SEVERITIES} for name in models}
    for name, model in models.items():
        clean = logits_of(model, images)
        out[name] = {"n": int(labels.shape[0]), "positions_seed": config.seed,
                     "clean_accuracy": float((clean.argmax(1) == labels).float().mean()),
                     "clean_ece": calibration_bins(clean.softmax(1), labels, config.calibration_bins).ece,
                     "accuracy": {}, "ece": {}, "ece_calibrated": {}}
    n = int(labels.shape[0])
    batches = corrupt_cells(images, [(c, s) for c in CORRUPTIONS for s in SEVERITIES], seed=config.seed,
                            workers=config.corruption_workers)
    for cname in CORRUPTIONS:
        # All severities of one type in one inference call: full batches even for small samples.
        x = torch.cat([next(batches) for _ in SEVERITIES])
        for name, model in models.items():
            all_logits = logits_of(model, x)
            for key in ("accuracy", "ece", "ece_calibrated"):
                out[name][key][cname] = []
            for i, severity in enumerate(SEVERITIES):
                logits = all_logits[i * n:(i + 1) * n]
                ece, ece_cal = _cell_ece(logits, labels, config.calibration_bins, temperatures[name])
                out[name]["accuracy"][cname].append(float((logits.argmax(1) == labels).float().mean()))
                out[name]["ece"][cname].append(ece)
                out[name]["ece_calibrated"][cname].append(ece_cal)
                pooled[name][severity].append(logits)
        if progress:
            progress(cname)
    for name, r in out.items():
        acc = np.array([r["accuracy"][c] for c in CORRUPTIONS])              # (types, severities)
        r["mean_corruption_accuracy"] = float(acc.mean())
        r["mean_corruption_accuracy_without_frost"] = float(np.mean([r["accuracy"][c] for c in TYPES_WITHOUT_FROST]))
        r["drop_from_clean"] = r["clean_accuracy"] - r["mean_corruption_accuracy"]
        r["accuracy_by_severity"] = acc.mean(0).tolist()
        r["accuracy_by_family"] = {fam: float(acc[[i for i, c in enumerate(CORRUPTIONS) if FAMILIES[c] == fam]].mean())
                                   for fam in dict.fromkeys(FAMILIES[c] for c in CORRUPTIONS)}
        # ECE of all types pooled at each severity (one calibration question per severity).
        by_sev, by_sev_cal = [], []
        for severity in SEVERITIES:
            logits = torch.cat(pooled[name][severity])
            ys = labels.repeat(len(CORRUPTIONS))
            e, e_cal = _cell_ece(logits, ys, config.calibration_bins, temperatures[name])
            by_sev.append(e)
            by_sev_cal.append(e_cal)
        r["ece_by_severity"] = by_sev
        r["ece_calibrated_by_severity"] = by_sev_cal
    return out


def sample_grid_images(test: Split, config: Config, index: int = 0) -> tuple[int, dict[str, list[np.ndarray]]]:
    """One test image (the `index`-th of the corruption sample) at every
    severity of every type: (dataset index, {type: [HWC uint8 for severity
    0 (clean), 1..5]})."""
    pos = sample_positions(test.labels, config.corruption_subset,
                           seed_stream(config.seed, "corruption_sample"))[index:index + 1]
    image = test.images[pos]
    grid = {}
    for cname in CORRUPTIONS:
        grid[cname] = [image[0].permute(1, 2, 0).numpy()] + [
            corrupt(image, cname, s, seed=config.seed)[0].permute(1, 2, 0).numpy() for s in SEVERITIES]
    return int(test.indices[pos[0]]), grid


def write_corruption_csv(path, results: Mapping[str, Mapping[str, Any]]):
    """Accuracy per model, corruption and severity in RobustBench's layout
    (its unaggregated_results.csv): one row per model, two header rows
    (corruption, severity), read back with
    pandas.read_csv(path, header=[0, 1], index_col=0). Written atomically."""
    from pathlib import Path

    from ..io import atomic_write

    cols = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    lines = ["corruption," + ",".join(c for c, _ in cols),
             "severity," + ",".join(str(s) for _, s in cols)]
    for name, r in results.items():
        lines.append(name + "," + ",".join(f"{r['accuracy'][c][s - 1]:.4f}" for c, s in cols))
    text = "\n".join(lines) + "\n"
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
