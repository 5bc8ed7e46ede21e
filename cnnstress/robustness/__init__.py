"""Robustness: how the classifier holds up off the clean test set.

* corruptions  CIFAR-10-C's common corruptions, generated in-package
* frost        the authors' frost photographs (package data), hash-checked
* calibration  ECE / MCE, reliability bins, temperature scaling
* adversarial  FGSM and PGD (L-infinity)
* suite        the stress stage's computations over all of the above
"""
from .adversarial import ATTACKS, adversarial_accuracy, fgsm, pgd
from .calibration import (CalibrationBins, apply_temperature, calibration_bins, expected_calibration_error,
                          fit_temperature, max_calibration_error)
from .corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt, corrupt_cells
from .suite import calibration_report, corruption_report, count_failures, stress_settings

__all__ = [
    "ATTACKS", "CORRUPTIONS", "CalibrationBins", "FAMILIES", "SEVERITIES", "adversarial_accuracy",
    "apply_temperature", "calibration_bins", "calibration_report", "corrupt", "corrupt_cells", "corruption_report",
    "count_failures", "expected_calibration_error", "fgsm", "fit_temperature", "max_calibration_error", "pgd",
    "stress_settings",
]
