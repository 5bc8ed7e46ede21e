"""Deletion / insertion (RISE): a crafted model with known evidence, curve
endpoints, hand-checked AUCs, batching, determinism, model hygiene, errors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.errors import CnnstressError
from cnnstress.xai.faithfulness import (FaithfulnessError, FaithfulnessResult, baseline_images,
                                        deletion_insertion, gaussian_blur, importance_order, random_maps,
                                        trapezoid_auc)

PATCH = (slice(8, 16), slice(16, 24))     # rows 8..15, cols 16..23 of channel 0


class PatchModel(nn.Module):
    """10 classes; logit 0 = scale * mean of an 8x8 patch of channel 0, the
    other logits 0. So the only evidence for class 0 is that patch."""

    def __init__(self, boom: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.bn = nn.BatchNorm1d(1)            # a buffer-holding module, to watch modes/stats
        self.boom = boom
        self.forwards = 0
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        self.seen_training.append(self.training)
        if self.boom:
            raise RuntimeError("boom inside forward")
        l0 = self.scale * x[:, 0, PATCH[0], PATCH[1]].mean(dim=(1, 2))
        return torch.cat([l0[:, None], torch.zeros(x.shape[0], 9)], dim=1)


class MeanModel(nn.Module):
    """2 classes with softmax p(class 0) = s := mean of channel 0 (on [0, 1]):
    logits (log s, log(1 - s)). Makes every curve point hand-computable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.log(s), torch.log1p(-s)], dim=1)


class RecordingMeanModel(MeanModel):
    """MeanModel that keeps a copy of every input batch it is shown."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return super().forward(x)


def patch_images(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    x[:, 0, PATCH[0], PATCH[1]] += 2.0
    return x


def patch_map(n: int = 4) -> torch.Tensor:
    m = torch.zeros(n, 32, 32)
    m[:, PATCH[0], PATCH[1]] = 1.0
    return m


def zeros_t(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


# --- the evidence is known ----------------------------------------------------

@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_true_evidence_beats_random_and_inverted_is_worst(baseline):
    model, x, t = PatchModel(), patch_images(), zeros_t(4)
    good = deletion_insertion(model, x, patch_map(), t, baseline=baseline)
    rand = deletion_insertion(model, x, random_maps(4, 32, 32, seed=3), t, baseline=baseline)
    inv = deletion_insertion(model, x, -patch_map(), t, baseline=baseline)
    # per image, not just on average
    assert (good.deletion_auc < rand.deletion_auc - 0.1).all()
    assert (good.insertion_auc > rand.insertion_auc + 0.1).all()
    assert (inv.deletion_auc > rand.deletion_auc + 0.1).all()
    assert (inv.insertion_auc < rand.insertion_auc - 0.1).all()
    # the good map removes the whole patch in the first 1/16 of the pixels
    assert good.deletion[:, 1].max() < 0.5 < good.deletion[:, 0].min()
    assert (inv.deletion[:, :-1] == inv.deletion[:, :1]).all()   # patch kept until the last step


def test_curve_endpoints_are_the_clean_and_baseline_probabilities():
    model, x, t = PatchModel(), patch_images(), zeros_t(4)
    for baseline in ("blur", "mean"):
        res = deletion_insertion(model, x, random_maps(4, 32, 32, seed=1), t, baseline=baseline)
        clean = torch.softmax(model(x), dim=1)[:, 0]
        base = torch.softmax(model(baseline_images(x, baseline)), dim=1)[:, 0]
        torch.testing.assert_close(res.deletion[:, 0], clean, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.insertion[:, -1], clean, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.deletion[:, -1], base, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.insertion[:, 0], base, rtol=0, atol=1e-7)
    assert torch.allclose(base, torch.full((4,), 0.1)) and (clean > 0.9).all()   # "mean": logit 0


def test_shapes_dtypes_and_fractions():
    model, x, t = PatchModel(), patch_images(3), zeros_t(3)
    res = deletion_insertion(model, x, patch_map(3), t, steps=8)
    assert isinstance(res, FaithfulnessResult) and res.baseline == "blur"
    assert res.deletion.shape == res.insertion.shape == (3, 9)
    assert res.fractions.shape == (9,) and res.deletion_auc.shape == res.insertion_auc.shape == (3,)
    for v in (res.deletion, res.insertion, res.fractions, res.deletion_auc, res.insertion_auc):
        assert v.dtype == torch.float32 and v.device.type == "cpu"
    torch.testing.assert_close(res.fractions, torch.arange(9) / 8.0)
    assert res.targets.dtype == torch.long and res.targets.tolist() == [0, 0, 0]
    assert ((res.deletion >= 0) & (res.deletion <= 1)).all()
    # 25 pixels in 4 steps: floor(s * 25 / 4) = 0, 6, 12, 18, 25 pixels changed
    tiny = deletion_insertion(MeanModel(), torch.full((1, 3, 5, 5), 0.5), torch.rand(1, 5, 5),
                              zeros_t(1), steps=4, baseline="mean")
    torch.testing.assert_close(tiny.fractions, torch.tensor([0, 6, 12, 18, 25]) / 25.0)
    torch.testing.assert_close(tiny.deletion[0], 0.5 * (1 - tiny.fractions))


# --- hand-checked values --------------------------------------------------------

def test_hand_checked_curves_and_trapezoid_auc():
    """2x2 image, channel 0 = [[0.4, 0.2], [0.1, 0.1]], map = that channel
    (pixel 2 and 3 tie: pixel 2 goes first), mean baseline (0), 4 steps:
      deletion  p = mean of what is left = 0.8/4, 0.4/4, 0.2/4, 0.1/4, 0
      insertion p = 0, 0.4/4, 0.6/4, 0.7/4, 0.8/4
    AUC (trapezoid, dx = 1/4): deletion 0.25 * (0.15 + 0.075 + 0.0375 + 0.0125)
    = 0.06875; insertion 0.25 * (0.05 + 0.125 + 0.1625 + 0.1875) = 0.13125."""
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[0.4, 0.2], [0.1, 0.1]])
    res = deletion_insertion(MeanModel(), x, x[:, 0].clone(), zeros_t(1), steps=4, baseline="mean")
    torch.testing.assert_close(res.deletion[0], torch.tensor([0.2, 0.1, 0.05, 0.025, 0.0]))
    torch.testing.assert_close(res.insertion[0], torch.tensor([0.0, 0.1, 0.15, 0.175, 0.2]))
    assert res.deletion_auc.item() == pytest.approx(0.06875, abs=1e-7)
    assert res.insertion_auc.item() == pytest.approx(0.13125, abs=1e-7)

    # 2 steps: deletion 0.2, 0.05, 0 at 0, 1/2, 1 -> 0.5 * (0.125 + 0.025) = 0.075
    two = deletion_insertion(MeanModel(), x, x[:, 0].clone(), zeros_t(1), steps=2, baseline="mean")
    assert two.deletion_auc.item() == pytest.approx(0.075, abs=1e-7)

    # a flat map with seed=None: ties broken by pixel index (row-major), so pixel 0 goes first, then 1, 2, 3
    x[0, 0] = torch.tensor([[0.1, 0.4], [0.2, 0.1]])
    flat = deletion_insertion(MeanModel(), x, torch.zeros(1, 2, 2), zeros_t(1), steps=4, baseline="mean",
                              seed=None)
    torch.testing.assert_close(flat.deletion[0], torch.tensor([0.8, 0.7, 0.3, 0.1, 0.0]) / 4)

    f = torch.tensor([0.0, 0.5, 1.0])
    assert trapezoid_auc(torch.tensor([1.0, 0.5, 0.0]), f).item() == pytest.approx(0.5)
    torch.testing.assert_close(trapezoid_auc(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), f),
                               torch.tensor([0.25, 1.0]))


# --- ties and the random baselines ---------------------------------------------------

def test_ties_are_broken_at_random_not_in_raster_order():
    """A map that is zero everywhere (a CAM with no positive evidence, after
    the ReLU) on images whose evidence is the bottom half: raster order would
    delete the empty top half first and keep p(class 0) at 0.495 halfway; a
    random order removes evidence in proportion, p about 0.25."""
    n, side = 64, 16
    x = torch.full((n, 3, side, side), 0.01)
    x[:, 0, side // 2:] = 0.99
    flat = torch.zeros(n, side, side)
    raster = deletion_insertion(MeanModel(), x, flat, zeros_t(n), steps=2, baseline="mean", seed=None)
    rand = deletion_insertion(MeanModel(), x, flat, zeros_t(n), steps=2, baseline="mean", seed=0)
    torch.testing.assert_close(raster.deletion[:, 1], torch.full((n,), 0.99 / 2))
    # halfway, the random half holds a hypergeometric share of the evidence: mean 0.25, sd ~0.016
    half = rand.deletion[:, 1].double()
    assert abs(half.mean().item() - 0.25) < 0.01 and half.std().item() > 0.005
    # What the model was shown, read back from its inputs (not from importance_order): halfway, each
    # image has exactly half its pixels deleted (set to the mean baseline, 0), in every channel at once;
    # insertion shows exactly those pixels; the halves differ between images and are not raster order.
    seen = RecordingMeanModel()
    again = deletion_insertion(seen, x, flat, zeros_t(n), steps=2, baseline="mean", seed=0)
    assert torch.equal(again.deletion, rand.deletion)                 # the seed fixes the order
    shown = torch.cat(seen.inputs).view(n, 2, 3, 3, side * side)       # image, mode, step, channel, pixel
    deleted_half = shown[:, 0, 1] == 0
    inserted_half = shown[:, 1, 1] != 0
    assert torch.equal(deleted_half, deleted_half[:, :1].expand_as(deleted_half))   # channels together
    assert (deleted_half[:, 0].sum(1) == side * side // 2).all()
    assert torch.equal(inserted_half[:, 0], deleted_half[:, 0])
    assert (shown[:, 0, 0] != 0).all() and (shown[:, 0, 2] == 0).all()   # nothing, then everything deleted
    torch.testing.assert_close(rand.deletion[:, 1], (x[:, 0].reshape(n, -1) * ~deleted_half[:, 0]).mean(1))
    assert len({tuple(d.nonzero().flatten().tolist()) for d in deleted_half[:, 0]}) == n
    assert not deleted_half[:, 0, :side * side // 2].all(1).any()


def test_importance_order_sorts_values_and_shuffles_only_ties():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 4, (6, 5, 5), generator=g).float()      # many ties
    for seed in (None, 0, 1):
        order = importance_order(maps, seed)
        vals = maps.reshape(6, -1).gather(1, order)
        assert (vals[:, :-1] >= vals[:, 1:]).all()                    # decreasing
        assert torch.equal(order.sort(1).values, torch.arange(25).expand(6, 25))   # a permutation
    assert torch.equal(importance_order(maps, None), torch.argsort(-maps.reshape(6, -1), dim=1, stable=True))
    assert not torch.equal(importance_order(maps, 0), importance_order(maps, None))
    assert not torch.equal(importance_order(maps, 0), importance_order(maps, 1))
    # an image's order does not depend on the images after it
    assert torch.equal(importance_order(maps[:2], 0), importance_order(maps, 0)[:2])
    distinct = torch.randperm(25, generator=g).float().view(1, 5, 5)   # no ties: the seed is irrelevant
    assert torch.equal(importance_order(distinct, 0), importance_order(distinct, None))


def _span_residual(maps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Largest distance of each map (N,32,32) from the span of the bilinear
    upsamplings of the h*w unit impulses (a CAM's possible maps at h x w)."""
    from cnnstress.xai.cam import upsample
    basis = upsample(torch.eye(h * w).view(h * w, h, w), (32, 32)).reshape(h * w, -1).double()
    flat = maps.reshape(maps.shape[0], -1).double()
    coef = torch.linalg.lstsq(basis.T, flat.T).solution
    return (basis.T @ coef - flat.T).abs().amax(0)


@pytest.mark.parametrize("res", [(4, 4), (8, 8)])
def test_smooth_random_maps_have_the_cam_block_structure(res):
    from cnnstress.xai.cam import GradCAM
    from cnnstress.model import resnet18
    smooth = random_maps(5, 32, 32, seed=2, resolution=res)
    assert smooth.shape == (5, 32, 32) and smooth.dtype == torch.float32
    assert smooth.min() >= 0 and smooth.max() < 1
    assert torch.equal(smooth, random_maps(5, 32, 32, seed=2, resolution=res))
    assert _span_residual(smooth, *res).max() < 1e-5                    # h x w numbers, upsampled
    assert _span_residual(random_maps(5, 32, 32, seed=2), *res).min() > 0.3   # pixel noise is not
    # a real Grad-CAM map at the layer of that resolution lies in the same span
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cam = GradCAM(model, "layer4" if res == (4, 4) else "layer3").attribute(x)
    assert tuple(cam.raw.shape[1:]) == res
    assert _span_residual(cam.maps, *res).max() < 1e-5
    with pytest.raises(FaithfulnessError, match="resolution"):
        random_maps(2, 32, 32, resolution=(4,))
    with pytest.raises(FaithfulnessError, match="positive int"):
        random_maps(2, 32, 32, resolution=(0, 4))


# --- batching -------------------------------------------------------------------

def test_batched_through_the_model_and_independent_of_batch_size():
    x, t, m = patch_images(3), zeros_t(3), random_maps(3, 32, 32, seed=5)
    big = PatchModel()
    ref = deletion_insertion(big, x, m, t, steps=4)
    assert big.forwards == 1                     # 3 images x 5 steps x 2 curves in one batch
    small = PatchModel()
    res = deletion_insertion(small, x, m, t, steps=4, batch_size=7)
    assert small.forwards == math.ceil(3 * 5 * 2 / 7)
    torch.testing.assert_close(res.deletion, ref.deletion, rtol=0, atol=1e-7)
    torch.testing.assert_close(res.insertion, ref.insertion, rtol=0, atol=1e-7)
    # per-image results do not depend on the other images in the batch
    one = deletion_insertion(PatchModel(), x[1:2], m[1:2], t[1:2], steps=4)
    torch.testing.assert_close(one.deletion[0], ref.deletion[1], rtol=0, atol=1e-7)


def test_resnet_with_gradcam_maps_smoke():
    from cnnstress.xai.cam import GradCAM
    from cnnstress.model import resnet18
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cam = GradCAM(model).attribute(x)
    res = deletion_insertion(model, x, cam.maps, cam.targets, steps=2, device="cpu")
    assert res.deletion.shape == (2, 3) and torch.isfinite(res.deletion_auc).all()
    p = torch.softmax(model(x), dim=1).gather(1, cam.targets.view(-1, 1)).squeeze(1).detach()
    torch.testing.assert_close(res.deletion[:, 0], p, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.insertion[:, -1], p, rtol=1e-4, atol=1e-6)


# --- random maps, blur ------------------------------------------------------------

def test_random_maps_deterministic_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a, b = random_maps(3, 8, 6, seed=7), random_maps(3, 8, 6, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, random_maps(3, 8, 6, seed=8))
    assert a.shape == (3, 8, 6) and a.dtype == torch.float32 and a.min() >= 0 and a.max() < 1
    assert len(torch.unique(a)) == a.numel()          # no ties in practice
    with pytest.raises(FaithfulnessError, match="positive int"):
        random_maps(0, 8, 8, seed=0)


def test_gaussian_blur_matches_scipy_inside_and_keeps_constants():
    from scipy.ndimage import gaussian_filter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 48, 48, generator=g, dtype=torch.float64)
    out = gaussian_blur(x, 5.0)
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, 5.0, 5.0), truncate=3.0)
    # away from the border (radius 15) both are the same weighted sum
    np.testing.assert_allclose(out.numpy()[..., 15:-15, 15:-15], ref[..., 15:-15, 15:-15], atol=1e-12)
    const = torch.full((1, 3, 32, 32), -1.25)
    torch.testing.assert_close(gaussian_blur(const), const)    # renormalised at the border too
    small = gaussian_blur(torch.randn(1, 3, 4, 4))              # smaller than the kernel: still fine
    assert small.shape == (1, 3, 4, 4) and torch.isfinite(small).all()
    assert torch.equal(baseline_images(const, "mean"), torch.zeros_like(const))


# --- model hygiene ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "mixed"])
def test_model_mode_params_and_grads_untouched(mode):
    model = PatchModel().train()
    if mode == "mixed":
        model.bn.eval()
    before = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    deletion_insertion(model, patch_images(2), patch_map(2), zeros_t(2), steps=2)
    assert model.seen_training == [False]                     # ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())

    boom = PatchModel(boom=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        deletion_insertion(boom, patch_images(2), patch_map(2), zeros_t(2))
    assert all(m.training for m in boom.modules())


# --- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"maps": torch.zeros(2, 32, 31)}, "maps must be"),
    ({"maps": torch.full((2, 32, 32), float("nan"))}, "NaN"),
    ({"targets": torch.zeros(2)}, "integer"),
    ({"targets": torch.zeros(3, dtype=torch.long)}, "N=2"),
    ({"targets": torch.tensor([0, 10])}, "out of range"),
    ({"images": torch.zeros(2, 32, 32)}, "float batch"),
    ({"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, "float batch"),
    ({"baseline": "noise"}, "blur, mean"),
    ({"steps": 0}, "steps"),
    ({"steps": 2000}, "steps"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, match):
    args = {"images": patch_images(2), "maps": patch_map(2), "targets": zeros_t(2)}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(FaithfulnessError, match=match) as info:
        deletion_insertion(PatchModel(), args["images"], args["maps"], args["targets"], **kwargs)
    assert "\n" not in str(info.value)
    assert issubclass(FaithfulnessError, CnnstressError)
