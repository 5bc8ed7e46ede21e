"""Typed results (cnnstress.results): the Record mechanics, and for every
result type an exact round trip of a dict made by the real producer on tiny
fixture data: T.from_dict(D).to_dict() gives D back with the same keys in the
same order and the same value types (an int stays an int, a null stays)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cnnstress import compare, results
from cnnstress.robustness import suite as stress
from cnnstress.robustness.adversarial import adversarial_accuracy
from cnnstress.xai import checks as explain
from cnnstress.config import get_config
from cnnstress.data import Split
from cnnstress.errors import ResultFormatError
from cnnstress.evaluate import Predictions, mine_failures, summarize
from cnnstress.model import ResNet
from cnnstress.results import Record, optional, other_keys

CPU = torch.device("cpu")


def assert_exact(got: Any, want: Any, where: str = "") -> None:
    """got is want as JSON: same types (bool, int and float told apart), same
    keys in the same order, equal values (NaN equal to NaN)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} vs {list(want)}"
        for k in want:
            assert_exact(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} vs {len(want)} items"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_exact(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def round_trip(tp: type[Record], d: dict) -> Record:
    """Check the exact round trip of d through tp (and through JSON text, as
    a cache is read back), and that d itself is left alone."""
    before = copy.deepcopy(d)
    obj = tp.from_dict(d)
    assert isinstance(obj, tp)
    assert_exact(obj.to_dict(), d, tp.__name__)
    assert_exact(tp.from_dict(json.loads(json.dumps(d))).to_dict(), d, tp.__name__ + " via JSON")
    assert_exact(d, before, "input")
    return obj


def _preds(logits: torch.Tensor, labels: torch.Tensor) -> Predictions:
    return Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1), labels=labels)


def _logits(n: int, seed: int, scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overconfident logits (softmax calibrated at scale 1, times `scale`) and labels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g)
    base[torch.arange(n), torch.randint(0, 10, (n,), generator=g)] += 1.5
    labels = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    return base * scale, labels


# --- Record mechanics ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Inner(Record):
    x: float
    tag: str | None


@dataclass(frozen=True, kw_only=True)
class _Outer(Record):
    n: int
    ratio: float
    flags: list[bool]
    pair: tuple[int, ...]
    inner: _Inner
    table: dict[str, list[float | None]]
    note: str | None = optional()
    extra: dict[str, _Inner] = other_keys()


def test_record_round_trip_keeps_types_order_and_nulls():
    d = {"n": 3, "ratio": 1, "flags": [True, False], "pair": [1, 2], "inner": {"x": 0.5, "tag": None},
         "table": {"b": [1.5, None, 2], "a": []}, "z-key": {"x": 2, "tag": "t"}, "1/255": {"x": 0.1, "tag": None}}
    obj = round_trip(_Outer, d)
    assert obj.ratio == 1 and type(obj.ratio) is int          # an int in a float field stays an int
    assert obj.pair == (1, 2) and obj.inner == _Inner(x=0.5, tag=None) and obj.note is None
    assert list(obj.extra) == ["z-key", "1/255"] and obj.extra["z-key"] == _Inner(x=2, tag="t")
    built = _Outer(n=1, ratio=0.25, flags=[], pair=(4,), inner=_Inner(x=1.0, tag="a"), table={})
    assert_exact(built.to_dict(), {"n": 1, "ratio": 0.25, "flags": [], "pair": [4],
                                   "inner": {"x": 1.0, "tag": "a"}, "table": {}})


def test_optional_fields_are_absent_when_none_and_written_when_set():
    base = {"n": 1, "ratio": 0.5, "flags": [], "pair": [], "inner": {"x": 0.0, "tag": None}, "table": {}}
    obj = _Outer.from_dict(base)
    assert obj.note is None and "note" not in obj.to_dict()
    with_note = {**base, "note": "hi"}
    assert_exact(dataclasses.replace(obj, note="hi").to_dict(), with_note)
    round_trip(_Outer, with_note)
    # optional() means "absent when None": an explicit null is read as None and written as absent
    assert "note" not in _Outer.from_dict({**base, "note": None}).to_dict()
    # a plain `X | None` field (no marker) keeps its null
    assert_exact(_Inner.from_dict({"x": 1.0, "tag": None}).to_dict(), {"x": 1.0, "tag": None})


def test_type_errors_name_the_path():
    good = {"n": 1, "ratio": 0.5, "flags": [True], "pair": [1], "inner": {"x": 0.0, "tag": None},
            "table": {"a": [1.0]}, "k": {"x": 1.0, "tag": None}}
    cases = [
        ({"inner": {"x": "0", "tag": None}}, r"^_Outer\.inner\.x is str, expected a number$"),
        ({"table": {"a": [1.0, "x"]}}, r"^_Outer\.table\.a\[1\] is str, expected a number$"),
        ({"flags": [1]}, r"^_Outer\.flags\[0\] is int, expected bool$"),
        ({"n": True}, r"^_Outer\.n is bool, expected a whole number$"),
        ({"n": 1.0}, r"^_Outer\.n is float, expected a whole number$"),
        ({"pair": {"a": 1}}, r"^_Outer\.pair is dict, expected a list$"),
        ({"k": {"x": None, "tag": None}}, r"^_Outer\.k\.x is null, expected a number$"),
        ({"inner": [0.0]}, r"^_Outer\.inner is list, expected an object$"),
    ]
    for change, message in cases:
        with pytest.raises(ResultFormatError, match=message):
            _Outer.from_dict({**good, **change})
    missing = {k: v for k, v in good.items() if k != "ratio"}
    with pytest.raises(ResultFormatError, match=r"^_Outer\.ratio is missing$"):
        _Outer.from_dict(missing)
    with pytest.raises(ResultFormatError, match=r"^cache\.inner\.tag is int, expected str$"):
        _Outer.from_dict({**good, "inner": {"x": 0.0, "tag": 3}}, where="cache")
    with pytest.raises(ResultFormatError, match=r"^Calibration\.uncalibrated\.count\[1\] is str"):
        results.Calibration.from_dict({"bins": 2, "temperature": 1.0, "val_n": 1, "test_n": 1,
                                       "uncalibrated": {"ece": 0, "mce": 0, "count": [1, "2"], "accuracy": [],
                                                        "confidence": [], "nll": 0.1},
                                       "calibrated": {}})


def test_other_keys_collects_the_flat_keys_and_refuses_a_clash():
    s = results.SanitySummary.from_dict({"n": 0, "dataset_positions": []})
    assert s.methods == {}
    bad = {"n": 1, "dataset_positions": [4], "gradcam++": {"steps": "x"}}
    with pytest.raises(ResultFormatError, match=r"^SanitySummary\.gradcam\+\+\.steps is str, expected a list$"):
        results.SanitySummary.from_dict(bad)
    clash = _Outer(n=1, ratio=0.5, flags=[], pair=(), inner=_Inner(x=0.0, tag=None), table={},
                   extra={"n": _Inner(x=1.0, tag=None)})
    with pytest.raises(ValueError, match="keys that are fields"):
        clash.to_dict()


def test_extra_keys_are_ignored_on_read():
    # metrics.json's per-model section: summarize()'s keys followed by others
    d = {"test_accuracy": 0.5, "n": 2, "loss": 0.7, "per_class_accuracy": {"cat": None}, "high_confidence_failures": 0,
         "threshold": 0.8, "mean_confidence": 0.6, "confusion_matrix": [[1]], "top_confused_pairs": []}
    got = results.TestSummary.from_dict({**d, "epochs": 3, "ece": 0.1}).to_dict()
    assert_exact(got, d)


def test_drift_group_is_all_or_nothing():
    assert_exact(round_trip(results.DriftGroup, {"n": 0}).to_dict(), {"n": 0})
    full = {"n": 2, "median_spearman": None, "undefined": 2, "centre_fraction": {"baseline": 0.25, "improved": 0.5},
            "centre_shift": 0.25, "moved_onto_centre": 1}
    assert round_trip(results.DriftGroup, full).median_spearman is None   # a present null stays present


# --- the failures and comparison stages -----------------------------------------------------------

def test_test_summary_from_summarize():
    logits, labels = _logits(200, seed=0)
    labels[labels == 7] = 6                       # class 7 has no images: its accuracy is None
    d = summarize(_preds(logits, labels), threshold=0.6)
    assert d["per_class_accuracy"]["horse"] is None and d["high_confidence_failures"] > 0
    s = round_trip(results.TestSummary, d)
    assert isinstance(s.top_confused_pairs[0], results.ConfusedPair) and s.n == 200
    empty = summarize(_preds(torch.empty(0, 10), torch.empty(0, dtype=torch.long)))
    assert empty["test_accuracy"] is None and empty["top_confused_pairs"] == []
    round_trip(results.TestSummary, empty)


def test_comparison_from_compare_models_and_metrics_form():
    from cnnstress.compare import compare_models

    logits_a, labels = _logits(300, seed=1)
    logits_b = logits_a.clone()
    logits_b[::3] = torch.randn(100, 10, generator=torch.Generator().manual_seed(2)) * 4
    preds = {"baseline": _preds(logits_a, labels), "improved": _preds(logits_b, labels)}
    failures = {n: mine_failures(p.probs, p.labels, 0.7) for n, p in preds.items()}
    config = get_config("smoke")
    d = compare_models(preds, failures, config, n_boot=200)
    c = round_trip(results.Comparison, d)
    assert "config_diff" not in c.to_dict() and c.failures.counts.a == len(failures["baseline"])
    groups = c.failures
    assert groups.counts.b == groups.counts.still_high_confidence + groups.counts.new + groups.counts.newly_confident
    # metrics.json puts config_diff first (report.build_metrics)
    base, imp = config.replace(augment="baseline"), config.replace(augment="enhanced")
    metrics_form = {"config_diff": {k: list(v) for k, v in base.diff(imp).items()}, **d}
    assert round_trip(results.Comparison, metrics_form).config_diff == {"augment": ["baseline", "enhanced"]}
    # the parts, straight from compare.*
    round_trip(results.McNemar, compare.mcnemar([True, False, True], [True, True, False]))
    round_trip(results.AccuracyDiff, compare.bootstrap_accuracy_diff([True, False, True], [True, True, True], n_boot=50))


# --- the stress stage ----------------------------------------------------------------------------

class _MeanColour(torch.nn.Module):
    """Class scores from each channel's mean: depends on the image, cheap."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def stress_parts():
    """calibration_report, corruption_report and adversarial_accuracy on tiny data."""
    config = get_config("smoke", corruption_subset=10, corruption_workers=1, channels_last=False,
                        failure_threshold=0.8)
    val_logits, val_labels = _logits(400, seed=3)
    test = _preds(*_logits(400, seed=4))
    calibration = stress.calibration_report(val_logits, val_labels, test, config)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8)
    split = Split(images, torch.arange(20) % 10, torch.arange(20))
    model = _MeanColour()
    corruptions = stress.corruption_report({"m": model}, split, config, device=CPU, temperatures={"m": 1.5})["m"]
    adv_eps = (0, 1, 4)
    adversarial = adversarial_accuracy(model, images[:8], split.labels[:8], eps_list=[k / 255 for k in adv_eps],
                                       steps=2, seed=0, device=CPU, batch_size=4, progress=False)
    return {"config": config, "test": test, "calibration": calibration, "corruptions": corruptions,
            "adversarial": adversarial, "adv_eps": adv_eps, "model": model, "images": images[:8],
            "labels": split.labels[:8]}


def test_calibration_from_calibration_report(stress_parts):
    d = stress_parts["calibration"]
    assert None in d["uncalibrated"]["accuracy"]          # empty low-confidence bins: nulls in the lists
    c = round_trip(results.Calibration, d)
    assert c.failure_threshold == 0.8 and isinstance(c.calibrated.failures, int)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 0.95, "tie"])
def test_with_failure_counts_matches_count_failures(stress_parts, threshold):
    test, d = stress_parts["test"], stress_parts["calibration"]
    if threshold == "tie":   # exactly a wrong prediction's confidence: not above it, so not counted
        threshold = float(test.confidence[test.preds != test.labels].max())
    cal = results.Calibration.from_dict(copy.deepcopy(d))
    before = cal.to_dict()
    new = results.with_failure_counts(cal, test, threshold)
    assert_exact(new.to_dict(), stress.count_failures(copy.deepcopy(d), test, threshold))
    assert_exact(cal.to_dict(), before)                       # a new object; the old one is unchanged
    # from a report without counts (keys appended at the end, as count_failures does)
    bare = copy.deepcopy(d)
    del bare["failure_threshold"], bare["uncalibrated"]["failures"], bare["calibrated"]["failures"]
    bare_cal = round_trip(results.Calibration, bare)
    assert bare_cal.failure_threshold is None and bare_cal.calibrated.failures is None
    assert_exact(results.with_failure_counts(bare_cal, test, threshold).to_dict(),
                 stress.count_failures(copy.deepcopy(bare), test, threshold))
    # independent count: wrong and above the threshold, before and after temperature scaling
    wrong = test.preds != test.labels
    scaled_conf = (test.logits / cal.temperature).softmax(1).max(1).values
    assert new.uncalibrated.failures == int((wrong & (test.confidence > threshold)).sum())
    assert new.calibrated.failures == int((wrong & (scaled_conf > threshold)).sum())


def test_corruption_grid_from_corruption_report(stress_parts):
    g = round_trip(results.CorruptionGrid, stress_parts["corruptions"])
    assert g.n == 10 and "frost" in g.accuracy and len(g.ece_by_severity) == 5


def test_attack_curves_from_adversarial_accuracy(stress_parts):
    d = stress_parts["adversarial"]
    a = round_trip(results.AttackCurves, d)
    assert a.eps_255 is None and "eps_255" not in a.to_dict()
    staged = {**d, "eps_255": list(stress_parts["adv_eps"])}          # as pipeline.stress_test adds it
    assert round_trip(results.AttackCurves, staged).eps_255 == [0, 1, 4]
    only_pgd = adversarial_accuracy(stress_parts["model"], stress_parts["images"], stress_parts["labels"],
                                    eps_list=[2 / 255], attacks=("pgd",), steps=1, device=CPU, progress=False)
    assert round_trip(results.AttackCurves, only_pgd).fgsm is None
    empty = adversarial_accuracy(stress_parts["model"], stress_parts["images"][:0], stress_parts["labels"][:0],
                                 eps_list=[2 / 255], steps=1, device=CPU, progress=False)
    assert round_trip(results.AttackCurves, empty).clean_accuracy is None


def test_stress_result_as_the_stage_builds_it(stress_parts):
    d = {"calibration": stress_parts["calibration"], "corruptions": stress_parts["corruptions"],
         "adversarial": {**stress_parts["adversarial"], "eps_255": list(stress_parts["adv_eps"])},
         "seconds": {"calibration_and_corruptions": 1.25, "adversarial": 0.5}}
    r = round_trip(results.StressResult, d)
    assert isinstance(r.calibration, results.Calibration) and isinstance(r.seconds, results.StressSeconds)


# --- the explanation stage -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explain_parts():
    """Every explain.* producer on a tiny ResNet and 30 images, two 'models'."""
    config = get_config("smoke", faithfulness_samples=3, faithfulness_steps=4, sanity_samples=3,
                        eval_batch_size=64, failure_threshold=0.3)
    torch.manual_seed(0)
    models = {"baseline": ResNet((1, 1, 1, 1)).eval(), "improved": ResNet((1, 1, 1, 1)).eval()}
    g = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (30, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(30) % 10
    from cnnstress.evaluate import predict
    preds = {n: predict(m, images, labels, device=CPU, channels_last=False) for n, m in models.items()}
    failures = {n: mine_failures(p.probs, p.labels, 0.1) for n, p in preds.items()}
    none = mine_failures(preds["baseline"].probs, preds["baseline"].labels, 0.99)
    assert len(failures["baseline"]) > 0 and len(none) == 0
    comparison = compare.compare_failures(failures["baseline"], failures["improved"], preds["improved"].preds,
                                          labels, preds_a=preds["baseline"].preds)
    out: dict[str, Any] = {"faithfulness": {}, "sanity": {}, "label_suspects": {}, "seconds": {}}
    sanity_maps = None
    for name, m in models.items():
        out["faithfulness"][name] = explain.faithfulness_report(m, images, preds[name], failures[name], config, CPU)
        summary, raw = explain.sanity_report(m, images, preds[name], config, CPU)
        out["sanity"][name] = summary
        if sanity_maps is None:    # as pipeline.explain_models keeps it
            gc = raw["gradcam"]
            sanity_maps = {"model": name, "steps": list(gc.steps), "maps": np.round(gc.maps[:, :2], 3).tolist()}
        out["label_suspects"][name] = explain.label_suspects(preds[name], failures[name])
        out["seconds"][name] = 0.5
    empty_faith = explain.faithfulness_report(models["baseline"], images, preds["baseline"], none, config, CPU)
    agreement = explain.agreed_suspects(out["label_suspects"], preds)
    groups = {**comparison, "new": []}           # one empty group
    drift = explain.drift_report(models, images, preds, groups, config, CPU)
    return {"result": out, "sanity_maps": sanity_maps, "agreement": agreement, "drift": drift,
            "empty_faith": empty_faith}


def test_faithfulness_groups_from_faithfulness_report(explain_parts):
    d = explain_parts["result"]["faithfulness"]["baseline"]
    f = round_trip(results.Faithfulness, d)
    methods = f.sample.methods
    assert list(methods) == ["gradcam", "gradcam++", "random", "random_smooth"]
    assert methods["random"].verdict is None and "verdict" not in methods["random"].to_dict()
    assert isinstance(methods["gradcam"].vs_random_smooth, results.PairedComparison)
    empty = round_trip(results.Faithfulness, explain_parts["empty_faith"])
    assert empty.failures.to_dict() == {"n": 0} and empty.failures.methods is None


def test_sanity_summary_from_sanity_report(explain_parts):
    d = explain_parts["result"]["sanity"]["baseline"]
    s = round_trip(results.SanitySummary, d)
    assert list(s.methods) == ["gradcam", "gradcam++"] and s.n == 3
    assert isinstance(s.methods["gradcam++"].verdict, results.SanityVerdict)


def test_label_triage_agreement_and_drift(explain_parts):
    t = round_trip(results.LabelTriage, explain_parts["result"]["label_suspects"]["improved"])
    assert t.n_test == 30
    round_trip(results.LabelAgreement, explain_parts["agreement"])
    drift = round_trip(results.Drift, explain_parts["drift"])
    assert list(drift.groups) == list(explain.DRIFT_GROUPS) and drift.groups["new"].to_dict() == {"n": 0}
    assert drift.layer == "layer4"


def test_explanations_one_and_two_models(explain_parts):
    r = explain_parts["result"]
    two = {**r, "label_agreement": explain_parts["agreement"], "drift": explain_parts["drift"],
           "sanity_maps": explain_parts["sanity_maps"], "seconds": {**r["seconds"], "total": 1.0}}
    e = round_trip(results.Explanations, two)
    assert isinstance(e.drift, results.Drift) and isinstance(e.sanity_maps, results.SanityMaps)
    # one model: no label_agreement nor drift keys at all, and they stay absent
    one = {k: ({"baseline": v["baseline"]} if k in ("faithfulness", "sanity", "label_suspects") else v)
           for k, v in r.items()}
    one = {**one, "sanity_maps": explain_parts["sanity_maps"], "seconds": {"baseline": 0.5, "total": 0.7}}
    e1 = round_trip(results.Explanations, one)
    assert e1.label_agreement is None and e1.drift is None
    assert "label_agreement" not in e1.to_dict() and "drift" not in e1.to_dict()
    # metrics.json's copy drops sanity_maps
    no_maps = {k: v for k, v in two.items() if k != "sanity_maps"}
    assert round_trip(results.Explanations, no_maps).sanity_maps is None


def test_comparison_displays_itself_hand_worked():
    from cnnstress.results import Comparison
    c = Comparison.from_dict({
        "accuracy_diff": {"acc_a": 0.8585, "acc_b": 0.9175, "diff": 0.059, "low": 0.052, "high": 0.066,
                          "confidence": 0.95, "n_boot": 2000, "seed": 42, "n": 10000},
        "mcnemar": {"b": 120, "c": 710, "n_discordant": 830, "n": 10000, "statistic": 418.0, "p_value": 1e-90,
                    "method": "chi2_cc"},
        "failures": {"counts": {"a": 891, "b": 404, "fixed": 700, "persisting": 191, "still_high_confidence": 150,
                                "wrong_low_confidence": 41, "new": 154, "newly_confident": 100},
                     "fixed": [], "persisting": [], "still_high_confidence": [], "wrong_low_confidence": [],
                     "new": [], "newly_confident": []},
        "threshold": 0.8})
    assert c._repr_markdown_() == (
        "**comparison**: test accuracy 85.85% -> 91.75% (+5.90 points, 95% interval [+5.20, +6.60]; "
        "McNemar p = 1e-90)\n\n"
        "| failures above 80% confidence | baseline | improved | fixed | still failing | new | newly confident |\n"
        "|---|---|---|---|---|---|---|\n"
        "| count | 891 | 404 | 700 | 150 | 154 | 100 |")
