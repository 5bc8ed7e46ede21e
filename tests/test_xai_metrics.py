"""The metric API (issue 13): deletion / insertion AUC and the parameter
randomisation check take the explanation (and the similarity) as callables
and declare their score direction. Custom callables give hand-computed
values; the default callables reproduce the stage's functions exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.errors import CnnstressError
from cnnstress.xai import checks
from cnnstress.xai.cam import cam_explain_func, normalize_maps
from cnnstress.xai.faithfulness import Deletion, FaithfulnessError, Insertion, PixelPerturbation, deletion_insertion
from cnnstress.xai.metric import Metric
from cnnstress.xai.randomisation import (ParameterRandomisation, SanityError, cascading_randomization, display_ssim,
                                         randomised_copies, verdict)
from cnnstress.xai.similarity import abs_spearman, spearman, ssim

from test_sanity import tiny_model


class TopRowsModel(nn.Module):
    """Class 0's softmax probability = the share of the top two rows' pixels
    (of a 4x4 image of ones) still holding the image: with the "mean"
    baseline (zeros) a removed pixel reads 0. logits = [log m, log(1 - m)]."""

    def forward(self, x):
        m = x[:, 0, :2, :].mean(dim=(1, 2)).double()
        return torch.stack([torch.log(m), torch.log1p(-m)], dim=1).float()


def ones(n: int = 2) -> torch.Tensor:
    return torch.ones(n, 3, 4, 4)


def constant_explain(model, x, targets):
    return torch.full((x.shape[0], x.shape[2], x.shape[3]), 0.5)


def bottom_explain(model, x, targets):
    maps = torch.zeros(x.shape[0], x.shape[2], x.shape[3])
    maps[:, 2:, :] = 1.0
    return maps


# --- direction -------------------------------------------------------------------

def test_directions_are_declared():
    assert issubclass(Deletion, PixelPerturbation) and issubclass(PixelPerturbation, Metric)
    assert Deletion.higher_is_better is False and Insertion.higher_is_better is True
    assert ParameterRandomisation.higher_is_better is False
    assert (Deletion.name, Insertion.name) == ("deletion_auc", "insertion_auc")
    assert Deletion.better(0.2, 0.3) and not Deletion.better(0.3, 0.2)
    assert Insertion.better(0.3, 0.2) and not Insertion.better(0.2, 0.3)
    assert ParameterRandomisation.better(0.1, 0.9)


def test_stage_verdict_reads_the_declared_directions():
    lower = {"mean_diff": -0.1, "low": -0.2, "high": -0.05}    # method - random < 0
    higher = {"mean_diff": 0.1, "low": 0.05, "high": 0.2}
    # deletion lower (better by its direction), insertion higher (better by its)
    assert checks._judge(lower, higher) == "better than random"
    assert checks._judge(higher, lower) == "worse than random"


# --- deletion / insertion with custom explain_func -------------------------------

@pytest.mark.parametrize("explain, deletion, insertion", [
    # raster order (seed=None) on a constant map removes the top rows first:
    # deletion p = 1 - s/8 for s <= 8 then 0 -> AUC 0.25; insertion -> 0.75
    (constant_explain, 0.25, 0.75),
    # the bottom half first: p stays 1 for 8 steps, then falls -> 0.75 / 0.25
    (bottom_explain, 0.75, 0.25),
])
def test_custom_explain_func_gives_hand_computed_aucs(explain, deletion, insertion):
    kw = dict(steps=16, baseline="mean", seed=None)
    d = Deletion(**kw)(TopRowsModel(), ones(), torch.zeros(2, dtype=torch.long), explain_func=explain)
    i = Insertion(**kw)(TopRowsModel(), ones(), torch.zeros(2, dtype=torch.long), explain_func=explain)
    assert d.shape == (2,) and d.dtype == torch.float32
    np.testing.assert_allclose(d.numpy(), deletion, atol=1e-6)
    np.testing.assert_allclose(i.numpy(), insertion, atol=1e-6)
    curves, fractions = Deletion(**kw).curves(TopRowsModel(), ones(1), torch.zeros(1, dtype=torch.long),
                                              explain_func=explain)
    assert curves.shape == (1, 17) and fractions.tolist() == [s / 16 for s in range(17)]


def test_metric_classes_match_deletion_insertion():
    torch.manual_seed(0)
    model = tiny_model().eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    maps = torch.rand(3, 16, 16)
    ref = deletion_insertion(model, x, maps, t, steps=8, batch_size=7, seed=2)
    kw = dict(steps=8, batch_size=7, seed=2)
    np.testing.assert_allclose(Deletion(**kw)(model, x, t, maps=maps), ref.deletion_auc, atol=1e-6)
    np.testing.assert_allclose(Insertion(**kw)(model, x, t, explain_func=lambda m, xx, tt: maps),
                               ref.insertion_auc, atol=1e-6)


def test_explain_func_gets_model_images_and_targets():
    seen = {}

    def spy(model, x, targets):
        seen.update(model=model, x=x, targets=targets, grad=torch.is_grad_enabled())
        return constant_explain(model, x, targets)

    model, x, t = TopRowsModel(), ones(), torch.tensor([0, 1])
    Deletion(baseline="mean")(model, x, t, explain_func=spy)
    assert seen["model"] is model and seen["x"] is x and seen["targets"] is t and seen["grad"]


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"maps": torch.zeros(2, 4, 4), "explain_func": constant_explain}, "exactly one"),
    ({"explain_func": "gradcam"}, "callable"),
    ({"explain_func": lambda m, x, t: np.zeros((2, 4, 4))}, "tensor"),
    ({"explain_func": lambda m, x, t: torch.zeros(2, 4, 3)}, "maps must be"),
])
def test_perturbation_metric_errors(kwargs, match):
    with pytest.raises(FaithfulnessError, match=match) as info:
        Deletion(baseline="mean")(TopRowsModel(), ones(), torch.zeros(2, dtype=torch.long), **kwargs)
    assert "\n" not in str(info.value) and isinstance(info.value, CnnstressError)


# --- parameter randomisation -----------------------------------------------------

def test_default_similarity_reproduces_the_cam_cascade_exactly():
    model = tiny_model().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 2, 3])
    ref = cascading_randomization(model, x, t, method="gradcam", layer="layer3", seed=4)
    ref_v = verdict(ref, threshold=0.5)
    res = ParameterRandomisation(layer="layer3", seed=4)(
        model, x, t, explain_func=cam_explain_func("gradcam", "layer3", normalized=False))
    assert res.steps == ref.steps and res.step == ref.layer_step
    np.testing.assert_array_equal(res.scores, np.abs(ref.spearman_abs))
    assert res.median == ref_v["median"] and res.passed == ref_v["passed"]


def test_cam_cascade_is_the_metric_with_named_similarities():
    """cascading_randomization is ParameterRandomisation with the stage's
    further similarities and kept maps: its scores are those functions on the
    kept maps, its display maps their min-max normalisation."""
    model = tiny_model().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([2, 0, 1])
    res = ParameterRandomisation(layer="layer3", seed=1, order=["linear", "layer4", "layer3"], keep_maps=True,
                                 similarities={"ssim": display_ssim, "one": lambda a, b: 1.0})(
        model, x, t, explain_func=cam_explain_func("gradcam", "layer3", normalized=False))
    assert res.maps.shape == (4, 3, 16, 16) and res.targets.tolist() == [2, 0, 1]
    assert set(res.similarities) == {"ssim", "one"} and (res.similarities["one"] == 1.0).all()
    expected = [[ssim(normalize_maps(torch.from_numpy(res.maps[0, i:i + 1]))[0].double().numpy(),
                      normalize_maps(torch.from_numpy(res.maps[s, i:i + 1]))[0].double().numpy(), data_range=1.0)
                 for i in range(3)] for s in range(4)]
    np.testing.assert_array_equal(res.similarities["ssim"], expected)
    cam = cascading_randomization(model, x, t, method="gradcam", layer="layer3", seed=1,
                                  order=["linear", "layer4", "layer3"])
    np.testing.assert_array_equal(cam.raw, res.maps)
    np.testing.assert_array_equal(cam.ssim, res.similarities["ssim"])
    np.testing.assert_array_equal(cam.maps[2], normalize_maps(torch.from_numpy(res.maps[2])).numpy())
    # the display maps are what the CAM itself gives for the original model
    np.testing.assert_array_equal(cam.maps[0], cam_explain_func("gradcam", "layer3")(model, x, t).numpy())
    assert ParameterRandomisation(keep_maps=False, order=["linear"])(
        model, x, t, explain_func=cam_explain_func("gradcam", "layer4")).maps is None


def test_similarity_always_one_fails_and_zero_passes():
    model = tiny_model().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    explain = cam_explain_func("gradcam", "layer4")
    same = ParameterRandomisation(similarity_func=lambda a, b: 1.0, order=["linear", "layer4"])
    res = same(model, x, t, explain_func=explain)
    assert res.passed is False and res.median == 1.0 and res.step == 2 and res.scores.shape == (3, 2)
    differ = ParameterRandomisation(similarity_func=lambda a, b: 0.0, order=["linear", "layer4"])
    assert differ(model, x, t, explain_func=explain).passed is True


def test_weight_independent_explanation_fails_the_check():
    """An explanation that ignores the model (e.g. an edge detector) stays the
    same under randomisation: similarity 1, the check fails."""
    model = tiny_model().eval()
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    res = ParameterRandomisation()(model, x, t, explain_func=lambda m, xx, tt: xx.abs().sum(1))
    np.testing.assert_allclose(res.scores, 1.0)
    assert res.step == len(res.steps) - 1 and res.passed is False


def test_similarity_func_sees_map_pairs_and_nan_is_undecided():
    model = tiny_model().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    shapes = []

    def nan_sim(a, b):
        shapes.append((a.shape, b.shape))
        return float("nan")

    res = ParameterRandomisation(similarity_func=nan_sim, order=["linear"])(
        model, x, t, explain_func=cam_explain_func("gradcam", "layer4"))
    assert shapes == [((16, 16), (16, 16))] * 4 and res.passed is None and np.isnan(res.median)


def test_layer_never_randomised_is_undecided():
    model = tiny_model().eval()
    res = ParameterRandomisation(order=["linear"], layer="layer3")(
        model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), explain_func=cam_explain_func("gradcam", "layer3"))
    assert res.step is None and res.passed is None


def test_randomised_copies_leave_the_model_alone():
    model = tiny_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = list((s.index, s.names) for s in randomised_copies(model, [["linear"], ["layer4", "layer3"]], seed=1))
    assert steps == [(0, []), (1, ["linear"]), (2, ["layer4", "layer3"])]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_each_cascade_step_reinitialises_exactly_its_modules():
    model = tiny_model().eval()
    with torch.no_grad():   # move every tensor off its reset value, so that each reset shows
        for v in model.state_dict().values():
            v.add_(3) if v.is_floating_point() else v.fill_(7)
    groups = [["linear"], ["layer4"], ["layer3", "layer2"]]
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    not_reset = {}
    for step in randomised_copies(model, groups, seed=3):
        not_reset[step.index] = step.not_reset
        now = {k: v.clone() for k, v in step.model.state_dict().items()}
        for k, v in now.items():
            module = k.rsplit(".", 1)[0]
            mine = any(module == n or module.startswith(n + ".") for n in step.names)
            if mine and k not in step.not_reset:
                assert not torch.equal(v, previous[k]), f"step {step.index}: {k} was not re-initialised"
            else:
                assert torch.equal(v, previous[k]), f"step {step.index}: {k} changed outside {step.names}"
        if step.index:
            state = step.model.state_dict()   # BatchNorm back to its initial statistics and affine values
            for k in (k for k in state if k.endswith("running_mean") and k.startswith(tuple(step.names))):
                bn = k.rsplit(".", 1)[0]
                assert torch.equal(state[k], torch.zeros_like(state[k]))
                assert torch.equal(state[bn + ".running_var"], torch.ones_like(state[k]))
                assert int(state[bn + ".num_batches_tracked"]) == 0
                assert torch.equal(state[bn + ".weight"], torch.ones_like(state[k]))
        previous = now
    assert not_reset == {0: [], 1: [], 2: ["layer4.1.gain"], 3: []}   # a module without reset_parameters


@pytest.mark.parametrize("kwargs, call, match", [
    ({"similarity_func": 0.5}, {}, "similarity_func must be callable"),
    ({"threshold": float("nan")}, {}, "threshold"),
    ({"order": []}, {}, "order"),
    ({"layer": "layer9"}, {}, "layer9"),
    ({}, {"explain_func": None}, "explain_func must be callable"),
    ({}, {"explain_func": lambda m, x, t: torch.zeros(3, 16, 16)}, "N=2"),
])
def test_randomisation_metric_errors(kwargs, call, match):
    call = {"explain_func": cam_explain_func("gradcam", "layer4"), **call}
    with pytest.raises(CnnstressError, match=match) as info:
        ParameterRandomisation(**{"order": ["linear"], **kwargs})(tiny_model().eval(), torch.randn(2, 3, 16, 16),
                                                                  torch.tensor([0, 1]), **call)
    assert "\n" not in str(info.value)


def test_abs_spearman_is_the_verdicts_score():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    # the reference: SciPy's rank correlation of the absolute maps, its sign dropped
    assert abs_spearman(a, b) == pytest.approx(abs(spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0]), abs=1e-12)
    assert abs_spearman(a, -a) == pytest.approx(1.0, abs=1e-12)         # |a| == |-a|: the same ranking
    flipped = np.arange(25.0).reshape(5, 5)                             # a reversed ranking counts as similar
    assert abs_spearman(flipped, 25.0 - flipped) == pytest.approx(1.0, abs=1e-12)
    assert spearman(flipped, 25.0 - flipped) == pytest.approx(-1.0, abs=1e-12)
    assert np.isnan(abs_spearman(np.zeros((5, 5)), a))                  # a constant map: undefined
    assert issubclass(SanityError, CnnstressError)
