"""`python -m cnnstress run` end to end on fixture data (smoke profile)."""
import json

import numpy as np
import pytest
from matplotlib import image as mpimg

from cnnstress.__main__ import main
from cnnstress.evaluate import FailureTable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_out(trained_run):
    """The session's `run --no-stress --no-explain` (read only; the analysis
    stages are tested in test_stress.py and test_explain.py)."""
    return trained_run


def _valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_run_writes_every_output(run_out):
    for name in ("training_curves.png", "model_comparison.png", "confusion_matrix.png", "failure_case_1.png"):
        _valid_png(run_out / name)
    metrics = json.loads((run_out / "metrics.json").read_text())
    for model in ("baseline", "improved"):
        m = metrics[model]
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert isinstance(m["high_confidence_failures"], int)
        assert m["train_seconds"] > 0 and m["epochs"] == 1
        (epoch,) = json.loads((run_out / model / "history.json").read_text())["history"]
        assert m["median_epoch_seconds"] == epoch["seconds"]          # one epoch: its own time
        with np.load(run_out / f"predictions_{model}.npz") as npz:
            probs, labels, preds = npz["probs"], npz["labels"], npz["preds"]
            assert probs.shape == (100, 10) and probs.dtype == np.float32
            np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
            np.testing.assert_array_equal(preds, probs.argmax(1))
            # the saved predictions reproduce the reported figures
            assert m["test_accuracy"] == pytest.approx(float((preds == labels).mean()))
            wrong_confident = ((preds != labels) & (probs.max(1) > 0.8)).sum()
            assert m["high_confidence_failures"] == wrong_confident
        table = FailureTable.from_csv(run_out / f"failures_{model}.csv")
        assert len(table) == m["high_confidence_failures"]
    cmp = metrics["comparison"]
    assert cmp["config_diff"] == {"augment": ["baseline", "enhanced"]}
    assert {"accuracy_diff", "mcnemar", "failures"} <= set(cmp)
    # the failure groups, recomputed per image from the saved predictions
    npz = {m: np.load(run_out / f"predictions_{m}.npz") for m in ("baseline", "improved")}
    labels = npz["baseline"]["labels"]
    wrong = {m: npz[m]["preds"] != labels for m in npz}
    high = {m: wrong[m] & (npz[m]["probs"].max(1) > cmp["threshold"]) for m in npz}
    groups = {"fixed": high["baseline"] & ~wrong["improved"],
              "still_high_confidence": high["baseline"] & high["improved"],
              "wrong_low_confidence": high["baseline"] & wrong["improved"] & ~high["improved"],
              "new": high["improved"] & ~wrong["baseline"],
              "newly_confident": high["improved"] & wrong["baseline"] & ~high["baseline"]}
    for group, mask in groups.items():
        assert cmp["failures"][group] == np.flatnonzero(mask).tolist(), group
        assert cmp["failures"]["counts"][group] == int(mask.sum()), group
    report = (run_out / "analysis_report.txt").read_text()
    flat = " ".join(report.split())
    c = cmp["failures"]["counts"]
    assert (f"Of the improved model's {c['b']}: {c['still_high_confidence']} persist from the baseline's, "
            f"{c['new']} new (the baseline predicted the image correctly) and {c['newly_confident']} newly "
            f"confident (the baseline got the image wrong too") in flat
    assert "new to the improved model" not in flat
    for heading in ("1. Configuration", "3. Test results", "McNemar", "High-confidence failures"):
        assert heading in report
    assert "nan" not in report.lower().replace("nanmean", "")
    # --no-stress --no-explain: no analysis sections, files or metrics
    assert "Stress tests" not in report and "explanations" not in report and "8. Summary" in report
    assert "ece" not in metrics["baseline"] and "stress" not in metrics and "explanations" not in metrics
    assert not list(run_out.glob("stress_*.json")) and not (run_out / "robustness.png").exists()
    assert not (run_out / "explanations.json").exists() and not (run_out / "faithfulness.png").exists()


def test_run_saves_its_config_and_reruns_from_it(trained_copy, shared_cifar_dir, capsys):
    """`run` writes its resolved config; `run --config` repeats that run on the trained models."""
    from cnnstress.config import Config, get_config
    run_out = trained_copy
    saved = Config.load(run_out / "config.json")
    assert saved == get_config("smoke", device="cpu", stress=False, explain=False)
    metrics = (run_out / "metrics.json").read_bytes()
    code = main(["run", "--config", str(run_out / "config.json"), "--no-progress",
                 "--data-dir", str(shared_cifar_dir), "--out-dir", str(run_out)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("reusing finished checkpoint") == 2
    assert Config.load(run_out / "config.json") == saved
    old, new = json.loads(metrics), json.loads((run_out / "metrics.json").read_text())
    for model in ("baseline", "improved"):
        assert new[model]["test_accuracy"] == old[model]["test_accuracy"]
        assert new[model]["high_confidence_failures"] == old[model]["high_confidence_failures"]


def test_rerun_reuses_models_and_explains_failures(trained_copy, shared_cifar_dir, capsys):
    run_out = trained_copy
    ckpt = run_out / "baseline" / "checkpoint.pt"
    before = ckpt.read_bytes()
    no_failures = (run_out / "failure_case_1.png").read_bytes()   # the 80% threshold leaves none
    # threshold 0 turns every wrong prediction into a failure, so the Grad-CAM cases exist (the failure
    # stage draws them; stress and explanations are not needed here and are tested on their own)
    code = main(["run", "--profile", "smoke", "--device", "cpu", "--no-progress", "--threshold", "0.0",
                 "--no-stress", "--no-explain",
                 "--data-dir", str(shared_cifar_dir), "--out-dir", str(run_out)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("reusing finished checkpoint") == 2
    assert ckpt.read_bytes() == before
    for i in (1, 2, 3):
        _valid_png(run_out / f"failure_case_{i}.png")
    report = " ".join((run_out / "analysis_report.txt").read_text().split())  # undo line wrapping
    assert "Case 1 (failure_case_1.png)" in report and "Grad-CAM for the predicted class" in report
    assert (run_out / "failure_case_1.png").read_bytes() != no_failures
    # The same run again redraws no figure (each is redrawn only when what it is drawn from changed:
    # plots.files); asking for one case removes the files of cases 2 and 3 and keeps the others.
    def figures():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_out.glob("*.png")}

    again = ["run", "--profile", "smoke", "--device", "cpu", "--no-progress", "--threshold", "0.0", "--no-stress",
             "--no-explain", "--data-dir", str(shared_cifar_dir), "--out-dir", str(run_out)]
    drawn = figures()
    assert {"failure_case_3.png", "training_curves.png", "confusion_matrix.png", "model_comparison.png"} <= set(drawn)
    assert main(again) == 0 and figures() == drawn
    assert main([*again, "--top-failures", "1"]) == 0
    assert {n: v for n, v in figures().items() if n != "failure_case_1.png"} == {
        n: v for n, v in drawn.items() if n not in ("failure_case_1.png", "failure_case_2.png", "failure_case_3.png")}
