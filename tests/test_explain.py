"""The explanation stage: faithfulness verdicts, sanity check on a copy,
drift, label suspects, and the stage end to end on fixture data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnstress.xai import checks as explain
from cnnstress.__main__ import main
from conftest import cli
from cnnstress.config import get_config
from cnnstress.evaluate import Failure, FailureTable, Predictions
from cnnstress.xai.label_errors import find_label_issues
from cnnstress.model import resnet18


def _preds(probs: np.ndarray, labels: np.ndarray) -> Predictions:
    p = torch.as_tensor(probs, dtype=torch.float32)
    return Predictions(logits=p.log(), probs=p, preds=p.argmax(1), labels=torch.as_tensor(labels))


def test_paired_interval_and_verdicts_hand_worked():
    d = explain._paired(np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.3, 0.3]))
    # differences -0.2, -0.1, 0: mean -0.1, sd 0.1, se 0.1/sqrt(3)
    assert d["mean_diff"] == pytest.approx(-0.1)
    assert d["high"] == pytest.approx(-0.1 + 4.302653 * 0.1 / np.sqrt(3))  # t(0.975, 2 df), not 1.96
    better_del = {"mean_diff": -0.1, "low": -0.2, "high": -0.01}
    better_ins = {"mean_diff": 0.1, "low": 0.01, "high": 0.2}
    unclear = {"mean_diff": 0.0, "low": -0.1, "high": 0.1}
    assert explain._judge(better_del, better_ins) == "better than random"
    assert explain._judge(better_ins, better_del) == "worse than random"
    assert explain._judge(better_del, unclear) == "better on deletion only"
    assert explain._judge(unclear, better_del) == "worse on insertion only"
    assert explain._judge(unclear, unclear) == "not distinguishable from random"
    assert explain._judge(better_del, better_del) == "better on deletion, worse on insertion"


@pytest.mark.parametrize("n", [2, 3, 8, 32, 200])
def test_paired_interval_is_students_t_against_scipy(n):
    from scipy import stats
    rng = np.random.default_rng(n)
    a, b = rng.random(n), rng.random(n)
    d = a - b
    lo, hi = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
    r = explain._paired(a, b)
    assert r["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert (r["low"], r["high"]) == (pytest.approx(lo, abs=1e-10), pytest.approx(hi, abs=1e-10))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 8, 31, 99, 1000])
@pytest.mark.parametrize("p", [0.5, 0.8, 0.975, 0.995, 0.9999])
def test_t_quantile_matches_scipy(p, df):
    from scipy import stats
    assert explain.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_t_quantile_rejects_bad_arguments():
    for p, df, says in ((0.975, 0, "df must be a positive integer, got 0"),
                        (0.975, 2.5, "df must be a positive integer, got 2.5"),
                        (1.0, 3, r"p must be in \[0.5, 1\), got 1.0"), (0.2, 3, r"p must be in \[0.5, 1\), got 0.2")):
        with pytest.raises(ValueError, match=says):
            explain.t_quantile(p, df)


def test_label_suspects_split_failures():
    rng = np.random.default_rng(0)
    n, c = 400, 4
    labels = np.arange(n) % c
    probs = rng.dirichlet(np.full(c, 0.3), size=n)
    probs[np.arange(n), labels] += 3.0                 # confident and right ...
    flipped = np.arange(0, n, 25)                      # ... except 16 planted wrong labels
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1) % c
    probs /= probs.sum(1, keepdims=True)
    preds = _preds(probs, given)
    wrong = np.flatnonzero(probs.argmax(1) != given)
    rows = [Failure(position=int(p), dataset_index=int(p), true=int(given[p]), pred=int(probs[p].argmax()),
                    confidence=float(probs[p].max()), top3=()) for p in wrong]
    r = explain.label_suspects(preds, FailureTable(rows, threshold=0.0))
    assert r["failures"] == len(wrong) == 16
    assert r["suspect_failures"] >= 14                 # the planted errors are found ...
    assert set(r["suspect_failure_positions"]) <= set(flipped.tolist())
    assert sorted(r["suspect_failure_positions"] + r["model_error_positions"]) == sorted(wrong.tolist())
    assert r["suspects"] <= 18                         # ... with few flags elsewhere
    assert r["reliable"] == (r["suspects"] / n <= explain.PLAUSIBLE_FLAG_FRACTION)
    agree = explain.agreed_suspects({"baseline": r, "improved": r}, {"baseline": preds, "improved": preds})
    assert agree["positions"] == r["suspect_positions"]     # a model agrees with itself


def test_the_two_models_are_not_independent():
    # what agreed_suspects' docstring and the report say: same initial weights,
    # same batch order; only the augmentation draws differ
    from cnnstress.train import build_model, epoch_seed
    config = get_config("smoke")
    base, imp = config.replace(augment="baseline"), config.replace(augment="enhanced")
    assert base.diff(imp) == {"augment": ("baseline", "enhanced")}
    a, b = (build_model(c, torch.device("cpu")).state_dict() for c in (base, imp))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(epoch_seed(base.seed, e, 0) == epoch_seed(imp.seed, e, 0) for e in range(base.epochs))
    doc = " ".join(explain.agreed_suspects.__doc__.split())
    assert "*not* independent" in doc and "same initial weights" in doc and "same batch order" in doc


def test_sanity_report_leaves_the_model_alone_and_drift_of_a_model_with_itself():
    config = get_config("smoke", sanity_samples=4, faithfulness_samples=4)
    torch.manual_seed(0)
    model = resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    logits = torch.randn(20, 10)
    labels = torch.arange(20) % 10
    preds = Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1), labels=labels)
    summary, raw = explain.sanity_report(model, images, preds, config, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    for method in ("gradcam", "gradcam++"):
        assert summary[method]["steps"][0] == "original" and len(summary[method]["median_ssim"]) == 7
        # the documented rule, from the raw scores: median |spearman_abs| over finite images at the
        # first step that randomises the layer, passed when below the threshold
        res = raw[method]
        row = np.abs(np.asarray(res.spearman_abs, dtype=np.float64)[res.layer_step])
        finite = row[np.isfinite(row)]
        want = None if finite.size == 0 else bool(np.median(finite) < explain.SANITY_THRESHOLD)
        assert summary[method]["verdict"]["passed"] is want
        assert summary[method]["verdict"]["step"] == res.steps[res.layer_step] == "layer4"
    d = explain.drift_report({"baseline": model, "improved": model}, images, {"baseline": preds, "improved": preds},
                             {"fixed": [0, 1, 2], "persisting": [3, 4], "new": [], "newly_confident": [5]},
                             config, torch.device("cpu"))
    assert d["new"] == {"n": 0} and d["newly_confident"]["n"] == 1
    for group in ("fixed", "persisting"):
        assert d[group]["centre_shift"] == pytest.approx(0.0)
        assert d[group]["moved_onto_centre"] == 0
        if d[group]["median_spearman"] is not None:
            assert d[group]["median_spearman"] == pytest.approx(1.0)


# --- the stage through the command line -----------------------------------------------------

def _rule_verdict(method: dict, random: dict) -> str:
    """The verdict rule of the report, from per-image AUCs: a 95% Student-t
    interval of the paired differences per measure (deletion: lower is
    better; insertion: higher), then the words."""
    from scipy import stats

    def side(key: str, better_if_negative: bool) -> str | None:
        d = np.array(method[key]) - np.array(random[key])
        lo, hi = stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=stats.sem(d))
        if hi < 0:
            return "better" if better_if_negative else "worse"
        if lo > 0:
            return "worse" if better_if_negative else "better"
        return None

    d, i = side("deletion_aucs", True), side("insertion_aucs", False)
    words = {("better", "better"): "better than random", ("worse", "worse"): "worse than random",
             (None, None): "not distinguishable from random",
             ("better", None): "better on deletion only", ("worse", None): "worse on deletion only",
             (None, "better"): "better on insertion only", (None, "worse"): "worse on insertion only",
             ("better", "worse"): "better on deletion, worse on insertion",
             ("worse", "better"): "worse on deletion, better on insertion"}
    return words[(d, i)]


def test_run_writes_explanations(analysed_run):
    out = analysed_run
    for png in ("faithfulness.png", "sanity_check.png", "label_suspects.png", "cam_methods.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    cached = json.loads((out / "explanations.json").read_text())["results"]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("baseline", "improved"):
        m = metrics[name]
        assert set(m["sanity_check"]) == {"gradcam", "gradcam++"}
        # label suspects among the failures, recomputed from the saved predictions
        with np.load(out / f"predictions_{name}.npz") as npz:
            probs, labels = npz["probs"], npz["labels"]
        flags = find_label_issues(probs, labels)
        failing = (probs.argmax(1) != labels) & (probs.max(1) > metrics["comparison"]["threshold"])
        assert m["high_confidence_failures"] == int(failing.sum())
        assert m["label_suspect_failures"] == int((failing & flags).sum())
        assert m["model_error_failures"] == int((failing & ~flags).sum())
        assert m["label_suspects_test"] == int(flags.sum())
        sample = m["faithfulness"]["sample"]
        assert set(sample) == {"gradcam", "gradcam++", "random", "random_smooth"}
        assert 0 <= sample["gradcam"]["deletion_auc"] <= 1 and 0 <= sample["gradcam"]["insertion_auc"] <= 1
        # the verdicts, recomputed from the per-image AUCs with SciPy's t interval and the documented rule
        for group, r in cached["faithfulness"][name].items():
            if not r.get("n"):
                continue
            for method in ("gradcam", "gradcam++"):
                for key, rnd in (("verdict", "random"), ("verdict_smooth", "random_smooth")):
                    want = _rule_verdict(r["methods"][method], r["methods"][rnd])
                    assert r["methods"][method][key] == want, (name, group, method, key)
                    assert m["faithfulness"][group][method][key] == want
        assert cached["faithfulness"][name]["sample"]["n"] == 8
        assert cached["faithfulness"][name]["sample"]["cam_resolution"] == [4, 4]     # layer4 on 32x32
    assert set(cached["drift"]) >= {"fixed", "persisting", "new", "newly_confident"}
    assert cached["drift"]["newly_confident"]["n"] == min(len(metrics["comparison"]["failures"]["newly_confident"]),
                                                           4 * cached["faithfulness"]["baseline"]["sample"]["n"])
    report = (out / "analysis_report.txt").read_text()
    flat = " ".join(report.split())
    assert "label_agreement" in cached and "trained independently" not in flat
    assert "The two models are not independent (same initial weights, same batch order" in flat
    for text in ("8. Can the explanations and the failures be trusted?", "8a. Faithfulness", "8b. Sanity check",
                 "8c. Explanation drift", "8d. Failure triage", "9. Failure triage against human review", "10. Summary"):
        assert text in report, text


@pytest.mark.slow
def test_explain_command_reuses_the_cache_and_layer3_recomputes(analysed_copy, shared_cifar_dir, capsys):
    analysed_run = analysed_copy   # this test writes: a private copy
    args = cli("explain", shared_cifar_dir, analysed_run)
    before = (analysed_run / "explanations.json").read_bytes()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "explanations: reusing" in out and "stress: reusing" in out
    assert (analysed_run / "explanations.json").read_bytes() == before
    assert main(args + ["--layer", "layer3"]) == 0
    after = json.loads((analysed_run / "explanations.json").read_text())
    assert after["key"]["settings"]["cam_layer"] == "layer3"
    assert "maps at layer3" in (analysed_run / "analysis_report.txt").read_text()


def test_bad_explain_options_are_one_line_errors(shared_cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:                  # the flags are checked as Config checks the field
        main(cli("explain", shared_cifar_dir, tmp_path / "out", "--layer", "layer9"))
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cam_layer" in err and "layer4" in err
    with pytest.raises(SystemExit) as exc:                  # argparse refuses it before anything runs
        main(cli("explain", shared_cifar_dir, tmp_path / "out", "--samples", "0"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--samples" in err


def test_unreadable_caches_are_recomputed_not_trusted(tmp_path):
    from cnnstress.io import read_json_cache
    path = tmp_path / "stress_baseline.json"
    path.write_text("{ truncated")
    assert read_json_cache(path, {"any": "key"}) is None
    path.write_text('{"key": {"other": 1}, "results": {"x": 1}}')
    assert read_json_cache(path, {"any": "key"}) is None
    path.write_text('{"key": {"any": "key"}, "results": {"x": 1}}')
    assert read_json_cache(path, {"any": "key"}) == {"x": 1}
