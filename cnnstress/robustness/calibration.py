"""Can the model's confidence be trusted? Calibration error and temperature scaling.

* `calibration_bins` / `expected_calibration_error` / `max_calibration_error`:
  equal-width confidence bins as in Guo et al. 2017 ("On Calibration of Modern
  Neural Networks"), 15 bins by default. ECE is the bin-size-weighted mean of
  |accuracy - mean confidence| over the bins; MCE the largest such gap over
  non-empty bins. Confidence is the top-class probability.
* `fit_temperature`: one scalar T > 0 dividing the logits, fitted by minimising
  the negative log-likelihood on held-out logits (the validation split, never
  the test set); T > 1 softens an over-confident model. Argmax, hence
  accuracy, is unchanged by T.

Everything here works on CPU tensors or arrays of probabilities (N,C) or logits
(N,C) with integer labels (N,); nothing touches a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..arrays import as_int_vector, as_numpy

DEFAULT_BINS = 15  # Guo et al. 2017


def _probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_numpy(probs)
    y = as_int_vector(labels, "labels")
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"need probs (N,C) and labels (N,), got {p.shape} and {y.shape}")
    return p.astype(np.float64), y


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics over `n_bins` equal-width confidence bins on [0, 1].

    edges: (n_bins+1,); count: (n_bins,) images per bin; accuracy and
    confidence: (n_bins,) means per bin (NaN for an empty bin)."""
    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        """|accuracy - confidence| per bin (NaN for an empty bin)."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        filled = self.count > 0
        return float((self.count[filled] / total * self.gaps[filled]).sum())

    @property
    def mce(self) -> float:
        filled = self.count > 0
        return float(self.gaps[filled].max()) if filled.any() else float("nan")


def calibration_bins(probs: Any, labels: Any, n_bins: int = DEFAULT_BINS) -> CalibrationBins:
    """Bin the top-class confidence of probs (N,C) into `n_bins` equal-width
    bins, (lo, hi] except the first, which also holds 0 (Guo et al.'s
    convention); returns counts, accuracy and mean confidence per bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1 (got {n_bins})")
    p, y = _probs_labels(probs, labels)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i+1]]; searchsorted(side="left") - 1 gives that, with 0 -> bin 0.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return CalibrationBins(edges=edges, count=count, accuracy=accuracy, confidence=confidence)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = DEFAULT_BINS) -> float:
    """ECE in [0, 1] with `n_bins` equal-width bins."""
    return calibration_bins(probs, labels, n_bins).ece


def max_calibration_error(probs: Any, labels: Any, n_bins: int = DEFAULT_BINS) -> float:
    """MCE in [0, 1]: the largest |accuracy - confidence| over non-empty bins."""
    return calibration_bins(probs, labels, n_bins).mce


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on
    held-out (validation) logits (N,C) and labels (N,). Optimised over log T
    with L-BFGS, so T stays positive; deterministic for the same inputs."""
    z = torch.as_tensor(logits, dtype=torch.float64).detach().cpu()
    y = torch.as_tensor(labels, dtype=torch.long).detach().cpu()
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"need logits (N,C) and labels (N,) with N > 0, got {tuple(z.shape)} and {tuple(y.shape)}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) as float32 probabilities (N,C)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return torch.as_tensor(logits, dtype=torch.float32).div(temperature).softmax(1)


def confident_errors(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> int:
    """Wrong predictions (argmax != label) with confidence above `threshold`
    in probabilities (N,C): the failure count, before or after temperature
    scaling (pass apply_temperature's probabilities)."""
    conf, pred = probs.max(1)
    return int(((pred != labels) & (conf > threshold)).sum())

