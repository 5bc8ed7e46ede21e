"""The stress stage: calibration report, corruption bookkeeping, caching, CLI."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.robustness import suite as stress
from cnnstress.__main__ import main
from conftest import cli
from cnnstress.config import get_config
from cnnstress.robustness.corruptions import CORRUPTIONS, SEVERITIES
from cnnstress.data import Split
from cnnstress.errors import ConfigError
from cnnstress.evaluate import Predictions


def _preds(logits: torch.Tensor, labels: torch.Tensor) -> Predictions:
    return Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1), labels=labels)


def _overconfident(n: int, seed: int, scale: float = 4.0):
    """Logits whose softmax is calibrated at scale 1, multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    base = torch.randn(n, 10, generator=g)
    base[torch.arange(n), labels] += 1.5
    # draw labels from the calibrated distribution so that T = scale is right
    labels = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    return base * scale, labels


def test_calibration_report_fits_on_validation_and_counts_failures():
    config = get_config("smoke", failure_threshold=0.8)
    val_logits, val_labels = _overconfident(3000, seed=0)
    test_logits, test_labels = _overconfident(3000, seed=1)
    test = _preds(test_logits, test_labels)
    r = stress.calibration_report(val_logits, val_labels, test, config)
    assert 3.0 < r["temperature"] < 5.0                      # recovers the scale from validation alone
    assert r["calibrated"]["ece"] < r["uncalibrated"]["ece"]
    assert r["calibrated"]["nll"] < r["uncalibrated"]["nll"]
    wrong = test.preds != test.labels
    assert r["uncalibrated"]["failures"] == int((wrong & (test.confidence > 0.8)).sum())
    scaled = (test_logits / r["temperature"]).softmax(1).max(1).values
    assert r["calibrated"]["failures"] == int((wrong & (scaled > 0.8)).sum())
    assert r["calibrated"]["failures"] < r["uncalibrated"]["failures"]
    assert sum(r["uncalibrated"]["count"]) == 3000 and len(r["uncalibrated"]["count"]) == 15
    # a new threshold only recounts
    stress.count_failures(r, test, 0.0)
    assert r["uncalibrated"]["failures"] == int(wrong.sum()) == r["calibrated"]["failures"]
    json.dumps(r)  # JSON-ready


class _Constant(nn.Module):
    """Ignores the image: the same logits for every input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class _MeanColour(nn.Module):
    """Class scores from the mean of each channel: depends on the image."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _split(n: int = 40) -> Split:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return Split(images, labels, torch.arange(n))


def test_corruption_report_bookkeeping():
    config = get_config("smoke", corruption_subset=20, channels_last=False)
    split = _split()
    logits = torch.zeros(10)
    logits[3] = 2.0
    models = {"constant": _Constant(logits), "colour": _MeanColour()}
    cells = []
    out = stress.corruption_report(models, split, config, device=torch.device("cpu"),
                                   temperatures={"constant": 1.0, "colour": 1.0}, progress=cells.append)
    assert cells == list(CORRUPTIONS)
    const = out["constant"]
    # an image-blind model has the same accuracy everywhere: 2 of the 20 images are class 3
    assert const["n"] == 20 and const["clean_accuracy"] == pytest.approx(0.1)
    for c in CORRUPTIONS:
        assert const["accuracy"][c] == pytest.approx([0.1] * 5)
    assert const["mean_corruption_accuracy"] == pytest.approx(0.1)
    assert const["drop_from_clean"] == pytest.approx(0.0, abs=1e-9)
    colour = out["colour"]
    acc = np.array([colour["accuracy"][c] for c in CORRUPTIONS])
    assert acc.shape == (len(CORRUPTIONS), 5) and ((acc >= 0) & (acc <= 1)).all()
    assert colour["mean_corruption_accuracy"] == pytest.approx(acc.mean())
    assert colour["accuracy_by_severity"] == pytest.approx(acc.mean(0).tolist())
    assert len(colour["ece_by_severity"]) == 5
    # the mean over the 14 types of runs before frost: every row but frost's
    older = np.array([colour["accuracy"][c] for c in CORRUPTIONS if c != "frost"])
    assert len(CORRUPTIONS) == 15 and older.shape == (14, 5)
    assert colour["mean_corruption_accuracy_without_frost"] == pytest.approx(older.mean())
    assert set(colour["accuracy_by_family"]) == {"noise", "blur", "weather", "digital"}


def test_corruption_report_does_not_depend_on_workers():
    """Two generator processes give the report one in-process generator gives."""
    split = _split()
    models = {"colour": _MeanColour()}
    reports = [stress.corruption_report(models, split, get_config("smoke", corruption_subset=20, channels_last=False,
                                                                  corruption_workers=w),
                                        device=torch.device("cpu"), temperatures={"colour": 1.3})
               for w in (1, 2)]
    assert reports[0] == reports[1]
    with pytest.raises(ConfigError, match="corruption_workers"):
        get_config("smoke", corruption_workers=0)
    assert len(set(np.round([a for c in CORRUPTIONS for a in reports[0]["colour"]["accuracy"][c]], 6))) > 1


def test_corruption_csv_has_robustbench_layout(tmp_path):
    results = {name: {"accuracy": {c: [0.5 + 0.01 * s + 0.1 * k for s in SEVERITIES] for c in CORRUPTIONS}}
               for k, name in enumerate(("baseline", "improved"))}
    path = stress.write_corruption_csv(tmp_path / "c.csv", results)
    rows = list(csv.reader(path.open()))
    assert rows[0][0] == "corruption" and rows[1][0] == "severity"
    assert rows[0][1:6] == [CORRUPTIONS[0]] * 5 and rows[1][1:6] == ["1", "2", "3", "4", "5"]
    assert len(rows[0]) == 1 + 5 * len(CORRUPTIONS)
    assert rows[2][0] == "baseline" and float(rows[2][3]) == pytest.approx(0.53)
    assert rows[3][0] == "improved" and float(rows[3][1]) == pytest.approx(0.61)


# --- the stage through the command line ---------------------------------------------------

def _plain_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al.'s ECE written out: bins (k/15, (k+1)/15], the first also
    holding 0; sum over bins of (share of images) * |accuracy - mean confidence|."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = (conf <= hi) & ((conf > lo) if k else True)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(total)


def test_plain_ece_hand_worked():
    # confidences 0.1 (right), 0.5 (wrong), 0.95 twice (right, wrong), 4 classes
    probs = np.array([[0.1, 0.3, 0.3, 0.3], [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3],
                      [0.95, 0.05 / 3, 0.05 / 3, 0.05 / 3], [0.95, 0.05 / 3, 0.05 / 3, 0.05 / 3]])
    labels = np.array([1, 1, 0, 2])
    # conf 0.3 (argmax 1, right) in bin 4, 0.5 wrong in bin 7, the 0.95 pair in bin 14 with accuracy 1/2:
    # (1/4)|1 - 0.3| + (1/4)|0 - 0.5| + (2/4)|0.5 - 0.95|
    assert _plain_ece(probs, labels) == pytest.approx(0.25 * 0.7 + 0.25 * 0.5 + 0.5 * 0.45)


@pytest.fixture
def stressed(analysed_run):
    return analysed_run


def test_run_writes_stress_outputs_and_metrics(stressed):
    metrics = json.loads((stressed / "metrics.json").read_text())
    for name in ("baseline", "improved"):
        m = metrics[name]
        for key in ("ece", "ece_calibrated", "mean_corruption_accuracy", "mean_corruption_accuracy_without_frost",
                    "fgsm_accuracy", "pgd_accuracy"):
            assert key in m, key
        assert 0 <= m["ece"] <= 1 and 0 <= m["mean_corruption_accuracy"] <= 1
        assert set(m["pgd_accuracy"]) == {"2/255", "8/255"}
        # ECE recomputed from the saved test predictions, bin by bin
        with np.load(stressed / f"predictions_{name}.npz") as npz:
            probs, labels, logits = npz["probs"].astype(np.float64), npz["labels"], npz["logits"].astype(np.float64)
        assert m["ece"] == pytest.approx(_plain_ece(probs, labels), abs=1e-9)
        z = logits / m["temperature"]
        scaled = np.exp(z - z.max(1, keepdims=True))
        assert m["ece_calibrated"] == pytest.approx(_plain_ece(scaled / scaled.sum(1, keepdims=True), labels), abs=1e-6)
    rows = list(csv.reader((stressed / "corruption_accuracy.csv").open()))
    assert [r[0] for r in rows[2:]] == ["baseline", "improved"]
    assert len(rows[0]) == 1 + 15 * 5 and rows[0].count("frost") == 5      # 15 types x 5 severities
    report = (stressed / "analysis_report.txt").read_text()
    for text in ("7. Stress tests beyond accuracy", "7a. Calibration", "7b. Common corruptions",
                 "7c. Adversarial", "7d. Did the augmentation help", "frost", "9. Failure triage against human review", "10. Summary"):
        assert text in report, text
    for png in ("robustness.png", "corruption_examples.png", "reliability_diagram.png", "adversarial.png"):
        assert (stressed / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_stress_command_reuses_cache_and_force_recomputes(analysed_copy, shared_cifar_dir, capsys):
    import os
    stressed = analysed_copy
    args = cli("stress", shared_cifar_dir, stressed)
    before = (stressed / "stress_baseline.json").read_bytes()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "mean corruption accuracy" in out
    assert (stressed / "stress_baseline.json").read_bytes() == before
    # The same settings with --force: recomputed and rewritten, not reused (the smoke subset is 10 already).
    for name in ("baseline", "improved"):
        os.utime(stressed / f"stress_{name}.json", ns=(10**9, 10**9))
    assert main(args + ["--force"]) == 0
    assert "stress: reusing" not in capsys.readouterr().out
    for name in ("baseline", "improved"):
        assert (stressed / f"stress_{name}.json").stat().st_mtime_ns != 10**9, name
    after = json.loads((stressed / "stress_baseline.json").read_text())["results"]
    assert after["corruptions"]["n"] == 10
    metrics = json.loads((stressed / "metrics.json").read_text())
    assert metrics["stress"]["settings"]["corruption_subset"] == 10


@pytest.mark.slow
def test_stress_cache_from_before_frost_is_not_reused(stressed, shared_cifar_dir, tmp_path, capsys):
    """A stress cache written before frost and ImageMagick's 8-bit conversion
    (settings version 1, 14 types) is recomputed, never reused: the key holds
    the version and the list of types."""
    import shutil

    settings = stress.stress_settings(get_config("smoke"))
    assert settings["version"] == 2 and settings["corruptions"] == list(CORRUPTIONS) and "frost" in CORRUPTIONS
    out = tmp_path / "run"
    shutil.copytree(stressed, out)
    cache = out / "stress_baseline.json"                            # this code's (the session's run is read only)
    old = json.loads(cache.read_text())
    old["key"]["settings"]["version"] = 1
    old["key"]["settings"]["corruptions"].remove("frost")
    cache.write_text(json.dumps(old))
    assert main(cli("stress", shared_cifar_dir, out)) == 0
    said = capsys.readouterr().out
    assert f"reusing {cache}" not in said and f"reusing {out / 'stress_improved.json'}" in said
    assert json.loads(cache.read_text())["key"]["settings"]["version"] == 2


def test_stress_without_trained_models_is_a_one_line_error(shared_cifar_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    assert main(cli("stress", shared_cifar_dir, empty)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint" in err and "not found" in err and "cnnstress run" in err
