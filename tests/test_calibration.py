"""Calibration error and temperature scaling on crafted, hand-worked inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnstress.robustness.calibration import (apply_temperature, calibration_bins, expected_calibration_error,
                                              fit_temperature, max_calibration_error)


def test_ece_and_mce_hand_worked():
    # Two bins, (0, .5] and (.5, 1]. Upper bin: confidences .9 (right), .8 (wrong), .6 (right):
    # accuracy 2/3, mean confidence 2.3/3, gap 0.1. Lower bin: .5 (a tie, argmax 0, right): gap 0.5.
    probs = [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.5, 0.5]]
    labels = [0, 1, 0, 0]
    bins = calibration_bins(probs, labels, n_bins=2)
    assert bins.count.tolist() == [1, 3]
    assert bins.accuracy == pytest.approx([1.0, 2 / 3])
    assert bins.confidence == pytest.approx([0.5, 2.3 / 3])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.75 * 0.1 + 0.25 * 0.5)
    assert max_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.5)


def test_perfectly_calibrated_bin_has_zero_ece_and_empty_bins_are_nan():
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])  # 3 of 4 right at 75% confidence
    bins = calibration_bins(probs, labels)          # 15 bins: 0.75 lies in (0.7333, 0.8]
    assert bins.count.sum() == 4 and bins.count[11] == 4
    assert np.isnan(bins.accuracy[0])
    assert bins.ece == pytest.approx(0.0) and bins.mce == pytest.approx(0.0)


def test_bin_edges_follow_guo_convention():
    # a confidence exactly on an edge goes to the bin below it ((lo, hi]); 1.0 goes to the last bin
    probs = np.array([[0.6, 0.4], [1.0, 0.0]])
    bins = calibration_bins(probs, [0, 0], n_bins=5)  # edges 0, .2, .4, .6, .8, 1
    assert bins.count.tolist() == [0, 0, 1, 0, 1]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="probs"):
        calibration_bins(np.ones((3, 2)) / 2, [0, 1])


def _overconfident_set(scale: float, n: int = 4000, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    return true_logits * scale, labels   # calibrated at T = scale


def test_temperature_scaling_recovers_the_scale_and_lowers_nll():
    logits, labels = _overconfident_set(3.0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    before = F.cross_entropy(logits, labels).item()
    after = F.cross_entropy(logits / t, labels).item()
    assert after < before
    probs_before = logits.softmax(1)
    probs_after = apply_temperature(logits, t)
    assert expected_calibration_error(probs_after, labels) < expected_calibration_error(probs_before, labels)
    assert torch.equal(probs_after.argmax(1), probs_before.argmax(1))  # accuracy unchanged


def test_temperature_of_an_underconfident_set_is_below_one():
    logits, labels = _overconfident_set(0.4)
    assert fit_temperature(logits, labels) < 1.0


def test_bad_temperature_inputs():
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
