"""Grad-CAM and Grad-CAM++: hand-worked values, agreement with pytorch-grad-cam,
hygiene (hooks, modes, .grad), target handling, layer validation and overlays."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.augment import normalize
from cnnstress.errors import CnnstressError
from cnnstress.xai.cam import (CAM_METHODS, CamExplainer, CamResult, GradCAM, GradCAMError,
                               GradCAMPlusPlus, compute_cam, compute_cam_plus_plus, get_layer,
                               normalize_maps, overlay, to_display_image, upsample)
from cnnstress.model import resnet18


class TinyNet(nn.Module):
    """1x1 conv (1 -> 2 channels) -> global average pool -> linear (2 -> 3).

    With x = 0..15 on a 4x4 grid: A_0 = x, A_1 = 8 - x. Logit c is
    y_c = sum_k W[c,k] * mean(A_k) + b_c, so dy_c/dA_k[i,j] = W[c,k] / 16 and
    alpha_k = W[c,k] / 16; Grad-CAM raw = ReLU(sum_k W[c,k] A_k / 16).
    """

    def __init__(self, boom: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2, eps=0.0)   # exact identity in eval mode with fresh stats
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        self.unused = nn.Conv2d(2, 2, 1)
        self.boom = boom
        self.forwards = 0
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 8.0]))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0], [-1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        a = self.bn(self.conv(x))
        if self.boom:
            raise RuntimeError("boom inside forward")
        return self.fc(torch.flatten(self.pool(a), 1))


def tiny_input(n: int = 1) -> torch.Tensor:
    return torch.arange(16.0).view(1, 1, 4, 4).repeat(n, 1, 1, 1)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not getattr(m, "_backward_pre_hooks", {}) for m in model.modules())


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return normalize(torch.rand(3, 3, 32, 32, generator=g))


# --- hand-worked values ------------------------------------------------------

def test_hand_worked_raw_and_maps():
    model = TinyNet().eval()
    x = tiny_input()
    v = torch.arange(16.0).view(4, 4)
    res = GradCAM(model, model.conv).attribute(x, targets=[0])
    # class 0: W = [1, 2] -> (x + 2 (8 - x)) / 16 = (16 - x) / 16: 1.0 down to 1/16, all > 0
    expected0 = (16 - v) / 16
    assert torch.allclose(res.raw[0], expected0, atol=1e-6)
    assert res.raw[0, 0, 0].item() == pytest.approx(1.0) and res.raw[0, 3, 3].item() == pytest.approx(1 / 16)
    # same size -> upsampling is the identity; min-max: ((16-x)/16 - 1/16) / (15/16) = (15 - x) / 15
    assert torch.allclose(res.maps[0], (15 - v) / 15, atol=1e-6)

    res1 = GradCAM(model, model.conv).attribute(x, targets=1)
    # class 1: W = [3, -1] -> (3x - (8 - x)) / 16 = (x - 2) / 4, ReLU clips x < 2
    expected1 = torch.tensor([[0.0, 0.0, 0.0, 0.25], [0.5, 0.75, 1.0, 1.25],
                              [1.5, 1.75, 2.0, 2.25], [2.5, 2.75, 3.0, 3.25]])
    assert torch.allclose(res1.raw[0], expected1, atol=1e-6)
    assert torch.allclose(res1.maps[0], expected1 / 3.25, atol=1e-6)
    assert res1.targets.tolist() == [1] and res1.zero.tolist() == [False]
    # the logits are the model's: y_1 = 3 * 7.5 - (8 - 7.5) = 22
    assert res1.logits[0, 1].item() == pytest.approx(22.0)


def test_hand_worked_predicted_class_and_upsampling():
    model = TinyNet().eval()
    res = GradCAM(model, model.conv).attribute(tiny_input())
    # logits: y0 = 7.5 + 2 * 0.5 = 8.5, y1 = 22, y2 = -8 -> class 1 predicted
    assert res.targets.tolist() == [1]
    maps = GradCAM(model, model.conv)(torch.nn.functional.interpolate(tiny_input(), size=(8, 8)))
    assert maps.shape == (1, 8, 8) and maps.dtype == torch.float32


def test_compute_upsample_normalize_are_separate_steps():
    acts = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 1, 4, 4)
    grads = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), -1.0)])
    raw = compute_cam(acts, grads)
    assert torch.allclose(raw[0], 0.5 * acts[0, 0]) and torch.equal(raw[1], torch.zeros(4, 4))
    up = upsample(raw, 8)
    assert up.shape == (2, 8, 8) and up.min() >= 0
    assert torch.allclose(up[0, 0, 0], raw[0, 0, 0]) and torch.allclose(up[0, -1, -1], raw[0, -1, -1])
    per_image = normalize_maps(up)
    assert per_image[0].max() == 1 and per_image[0].min() == 0 and torch.equal(per_image[1], torch.zeros(8, 8))
    shared = normalize_maps(up, scale=2 * float(up.max()))   # one scale for both: 0 stays 0
    assert torch.allclose(shared[0], up[0] / (2 * up.max())) and shared.max() == pytest.approx(0.5)
    assert torch.equal(normalize_maps(up, scale=0.0), torch.zeros_like(up))
    with pytest.raises(GradCAMError, match=r"activations and gradients of one shape \(N,K,h,w\)"):
        compute_cam(acts, grads[:, :, :2])


# --- agreement with pytorch-grad-cam -----------------------------------------

def _assert_matches_reference(ours, reference_cls, resnet, images, classes, layer_name):
    """Our CamResult equals the pytorch-grad-cam class `reference_cls` (raw maps
    at the layer and the upsampled, normalised maps) on a copy of the model."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    theirs_model = copy.deepcopy(resnet)   # pytorch-grad-cam fills .grad and leaves eval mode on
    targets = [ClassifierOutputTarget(c) for c in classes]
    with reference_cls(theirs_model, [getattr(theirs_model, layer_name)]) as pgc:
        maps = pgc(images, targets)
        acts = pgc.activations_and_grads.activations[0].numpy()
        grads = pgc.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(pgc.get_cam_image(images, None, targets, acts, grads), 0)
    assert raw.shape == tuple(ours.raw.shape)
    scale = np.abs(raw).max()
    assert scale > 0 and not ours.zero.any()
    np.testing.assert_allclose(ours.raw.numpy(), raw, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.maps.numpy(), maps, atol=1e-5)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_matches_pytorch_grad_cam(resnet, images, layer_name):
    """pytorch-grad-cam returns minmax(cv2.resize(minmax(ReLU(cam)))) with
    minmax(m) = (m - min) / (1e-7 + max). Min-max is affine-invariant, so that
    equals our minmax(upsample(raw)) up to the 1e-7 epsilon, provided that
    cv2.resize INTER_LINEAR (float32, half-pixel centres) equals torch bilinear
    with align_corners=False, which holds for upsampling. We compare
    (a) raw low-resolution maps against ReLU(pytorch-grad-cam's get_cam_image)
        fed with the activations and gradients it captured itself: same maths,
        differing only in summation order -> relative tolerance 1e-5;
    (b) final full-resolution maps: same resize + same normalisation -> 1e-5
        absolute on [0, 1] (observed <= 2.2e-6; raw: ~5e-7 relative).
    The random-init raw maps are ~1e-4 in magnitude, hence relative tolerances."""
    from pytorch_grad_cam import GradCAM as PGCGradCAM

    # Classes chosen so that, with this random init, every map is non-zero and
    # class 4 is partly clipped by the ReLU (an all-zero map would make the
    # comparison vacuous; several classes are all zero on these images).
    classes = [4, 5, 0]
    ours = GradCAM(resnet, getattr(resnet, layer_name)).attribute(images, targets=classes)
    _assert_matches_reference(ours, PGCGradCAM, resnet, images, classes, layer_name)
    assert (ours.raw[0] == 0).any() and (ours.raw[0] > 0).any()   # the ReLU really clipped


def test_batched_equals_one_by_one(resnet, images):
    cam = GradCAM(resnet)
    batch = cam.attribute(images[:2], targets=[4, 5])
    for i, c in enumerate([4, 5]):
        single = cam.attribute(images[i:i + 1], targets=c)
        torch.testing.assert_close(single.raw[0], batch.raw[i], rtol=1e-4, atol=1e-9)
    assert batch.maps.shape == (2, 32, 32) and batch.maps.dtype == torch.float32
    assert batch.maps.min() >= 0 and batch.maps.max() <= 1


def test_one_forward_per_batch():
    model = TinyNet().eval()
    GradCAM(model, model.conv).attribute(tiny_input(5), targets=[0, 1, 0, 1, 0])
    assert model.forwards == 1


# --- hygiene: hooks, modes, gradients ----------------------------------------

def test_no_hooks_left_after_success_and_after_errors():
    model = TinyNet().eval()
    cam = GradCAM(model, model.conv)
    cam(tiny_input())
    assert no_hooks(model)

    boom = TinyNet(boom=True)
    with pytest.raises(RuntimeError, match="boom inside forward"):   # not swallowed
        GradCAM(boom, boom.conv)(tiny_input())
    assert no_hooks(boom)

    with pytest.raises(GradCAMError, match="not a \\(N,C,h,w\\) convolutional feature map"):
        GradCAM(model, model.fc)(tiny_input())
    with pytest.raises(GradCAMError, match="targets has 1 entries but the batch has 2 images"):
        cam(tiny_input(2), targets=[0])
    assert no_hooks(model)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_mode_restored_and_computation_in_eval(mode):
    model = TinyNet()
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
    before = {name: m.training for name, m in model.named_modules()}
    stats = copy.deepcopy(model.bn.state_dict())
    x = tiny_input(2) + torch.randn(2, 1, 4, 4)
    res = GradCAM(model, model.conv).attribute(x, targets=1)
    assert {name: m.training for name, m in model.named_modules()} == before
    for k, v in model.bn.state_dict().items():      # BatchNorm ran in eval: stats untouched
        assert torch.equal(v, stats[k]), k
    ref = GradCAM(model.eval(), model.conv).attribute(x, targets=1)
    torch.testing.assert_close(res.raw, ref.raw)

    boom = TinyNet(boom=True).train()
    with pytest.raises(RuntimeError, match="boom inside forward"):
        GradCAM(boom, boom.conv)(tiny_input())
    assert all(m.training for m in boom.modules())


def test_param_grads_and_requires_grad_untouched(resnet, images):
    model = TinyNet().eval()
    GradCAM(model, model.conv)(tiny_input())
    assert all(p.grad is None for p in model.parameters())

    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv.weight.requires_grad_(False)
    GradCAM(model, model.conv)(tiny_input())
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv.weight.grad is None and not model.conv.weight.requires_grad

    frozen = TinyNet().eval().requires_grad_(False)   # works on a fully frozen model too
    res = GradCAM(frozen, frozen.conv).attribute(tiny_input(), targets=1)
    assert res.raw[0, 3, 3].item() == pytest.approx(3.25)
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())

    GradCAM(resnet)(images[:1])
    assert all(p.grad is None for p in resnet.parameters()) and no_hooks(resnet)


def test_works_under_no_grad_and_inference_mode():
    model = TinyNet().eval()
    with torch.no_grad():
        a = GradCAM(model, model.conv).attribute(tiny_input(), targets=1).raw
    with torch.inference_mode():
        x = tiny_input()
        b = GradCAM(model, model.conv).attribute(x, targets=1).raw
    torch.testing.assert_close(a, b)
    assert a[0, 3, 3].item() == pytest.approx(3.25)


# --- targets -----------------------------------------------------------------

def test_target_forms():
    model = TinyNet().eval()
    cam = GradCAM(model, model.conv)
    x = tiny_input(3)
    ref = cam.attribute(x, targets=[0, 1, 0])
    for t in ([0, 1, 0], (0, 1, 0), torch.tensor([0, 1, 0]), np.array([0, 1, 0])):
        res = cam.attribute(x, targets=t)
        assert res.targets.dtype == torch.long and res.targets.tolist() == [0, 1, 0]
        torch.testing.assert_close(res.raw, ref.raw)
    assert cam.attribute(x, targets=torch.tensor(1)).targets.tolist() == [1, 1, 1]
    assert cam.attribute(x).targets.tolist() == [1, 1, 1]

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    mixed = cam.attribute(x, targets=[ClassifierOutputTarget(0), 1, lambda row: row[0]])
    assert mixed.targets.tolist() == [0, 1, -1]
    torch.testing.assert_close(mixed.raw, ref.raw)
    batch_fn = cam.attribute(x, targets=ClassifierOutputTarget(1))   # one callable on (N,C)
    assert batch_fn.targets.tolist() == [1, 1, 1]
    torch.testing.assert_close(batch_fn.raw, cam.attribute(x, targets=1).raw)


@pytest.mark.parametrize("targets, match", [
    ([0, 1], "2 entries but the batch has 3"),
    ([0, 1, 0, 1], "4 entries but the batch has 3"),
    (torch.tensor([0, 1]), "batch has 3"),
    (torch.tensor([[0, 1, 0]]), "batch has 3"),
    (torch.tensor([0.0, 1.0, 0.0]), "integer"),
    (5, "out of range"),
    ([0, -1, 0], "out of range"),
    ([0, 1.5, 0], "class indices or callables"),
    (True, "must be None"),
    ("cat", "must be None"),
])
def test_bad_targets_raise(targets, match):
    model = TinyNet().eval()
    with pytest.raises(GradCAMError, match=match):
        GradCAM(model, model.conv)(tiny_input(3), targets=targets)


# --- layer validation --------------------------------------------------------

def test_bad_layers_raise(resnet, images):
    with pytest.raises(GradCAMError, match="not a .N,C,h,w. convolutional feature map.*layer4"):
        GradCAM(resnet, resnet.linear)(images[:1])
    with pytest.raises(GradCAMError, match="1x1 map.*layer4"):
        GradCAM(resnet, resnet.pool)(images[:1])
    with pytest.raises(GradCAMError, match="not a submodule"):
        GradCAM(resnet, nn.Conv2d(3, 3, 1))
    model = TinyNet().eval()
    with pytest.raises(GradCAMError, match="did not run"):
        GradCAM(model, model.unused)(tiny_input())
    with pytest.raises(GradCAMError, match="no `layer4`"):
        GradCAM(model)
    assert no_hooks(resnet) and no_hooks(model)
    assert issubclass(GradCAMError, CnnstressError) and issubclass(GradCAMError, ValueError)


def test_bad_inputs_raise(resnet):
    cam = GradCAM(resnet)
    with pytest.raises(GradCAMError, match="float batch"):
        cam(torch.zeros(3, 32, 32))
    with pytest.raises(GradCAMError, match="float batch"):
        cam(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(GradCAMError, match="empty"):
        cam(torch.zeros(0, 3, 32, 32))
    half = TinyNet().eval().double()
    with pytest.raises(GradCAMError, match="fp32"):
        GradCAM(half, half.conv)(tiny_input())


def test_shared_layer_raises():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.fc = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))

    model = Twice()
    with pytest.raises(GradCAMError, match="ran 2 times"):
        GradCAM(model, model.conv)(tiny_input())
    assert no_hooks(model)


def test_default_layer_and_non_square_input(resnet):
    cam = GradCAM(resnet)
    assert cam.target_layer is resnet.layer4
    res = cam.attribute(torch.randn(2, 3, 32, 40))
    assert isinstance(res, CamResult)
    assert res.raw.shape == (2, 4, 5) and res.maps.shape == (2, 32, 40) and res.logits.shape == (2, 10)


# --- all-zero maps -----------------------------------------------------------

def test_all_zero_map_flagged_without_nan():
    model = TinyNet().eval()
    # class 2: W = [-1, -1] -> -(x + 8 - x) / 16 = -0.5 everywhere -> ReLU -> 0
    res = GradCAM(model, model.conv).attribute(tiny_input(2), targets=[2, 1])
    assert res.zero.tolist() == [True, False]
    assert torch.equal(res.raw[0], torch.zeros(4, 4)) and torch.equal(res.maps[0], torch.zeros(4, 4))
    assert torch.isfinite(res.maps).all() and torch.isfinite(res.raw).all()
    assert res.maps[1].max() == 1


# --- display -----------------------------------------------------------------

def test_overlay_rgb_and_red_for_hot():
    black = np.zeros((5, 6, 3), dtype=np.uint8)
    hot = overlay(black, np.ones((5, 6), dtype=np.float32), alpha=0.5)
    assert hot.shape == (5, 6, 3) and hot.dtype == np.float32
    assert hot.min() >= 0 and hot.max() <= 1
    # jet(1) is dark red (0.5, 0, 0): red must be in channel 0 (RGB, not BGR)
    assert hot[..., 0].min() > 0.2 and hot[..., 1:].max() < 0.01
    cold = overlay(black, torch.zeros(5, 6), alpha=1.0)
    assert cold[..., 2].min() > 0.4 and cold[..., :2].max() < 0.01   # jet(0): dark blue

    grey = np.full((5, 6, 3), 0.4, dtype=np.float64)
    assert np.allclose(overlay(grey, np.ones((5, 6)), alpha=0.0), 0.4)
    mix = overlay(grey, np.ones((5, 6)), alpha=0.25)
    assert np.allclose(mix[..., 0], 0.75 * 0.4 + 0.25 * 0.5, atol=1e-2)
    white = overlay(np.full((5, 6, 3), 255, np.uint8), np.ones((5, 6)), alpha=0.5)
    assert white.max() <= 1.0 and white[..., 0].min() > white[..., 1].max()


def test_overlay_rejects_bad_inputs():
    img = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(GradCAMError, match="HWC"):
        overlay(np.zeros((3, 4, 4), np.float32), np.zeros((4, 4)))
    with pytest.raises(GradCAMError, match="does not match"):
        overlay(img, np.zeros((4, 5)))
    with pytest.raises(GradCAMError, match="to_display_image"):
        overlay(img - 1.0, np.zeros((4, 4)))
    with pytest.raises(GradCAMError, match="cam must lie"):
        overlay(img, np.full((4, 4), 2.0))
    with pytest.raises(GradCAMError, match="alpha"):
        overlay(img, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(GradCAMError, match="colormap"):
        overlay(img, np.zeros((4, 4)), colormap="no-such-map")


def test_to_display_image_round_trip():
    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(2, 3, 5, 7, generator=g)
    x = normalize(rgb)
    single = to_display_image(x[0])
    assert single.shape == (5, 7, 3) and single.dtype == np.float32
    np.testing.assert_allclose(single, rgb[0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert to_display_image(x).shape == (2, 5, 7, 3)
    out = overlay(single, np.zeros((5, 7)), alpha=0.3)
    assert out.shape == (5, 7, 3)


def test_describe_cam_names_peak_and_centroid_separately():
    from cnnstress.xai.cam import describe_cam
    cam = np.zeros((9, 9))
    cam[0, 4] = 2.0   # strongest blob at the top
    cam[8, 4] = 1.0   # weaker blob at the bottom: the centroid falls between them
    d = describe_cam(cam)
    assert d["peak"] == (0, 4) and d["peak_region"] == "top"
    assert d["region"] == "centre"                      # centroid row 8/3 ~ 2.67, col 4
    assert d["centroid"] == pytest.approx((8 / 3, 4.0))
    assert d["centre_fraction"] == 0.0                  # neither blob in rows/cols 2..6


def test_describe_cam_all_zero_map_is_reported_not_divided():
    from cnnstress.xai.cam import describe_cam
    d = describe_cam(np.zeros((4, 4)))
    assert d["peak_region"].startswith("nowhere") and d["centre_fraction"] == 0.0


def test_failure_case_wording_of_an_all_zero_map():
    """The log line and the report say 'is all zero', never 'at the nowhere'."""
    from cnnstress.stages.failures import CamRegion
    from cnnstress.xai.cam import describe_cam
    zero = CamRegion.from_dict(describe_cam(np.zeros((4, 4))))
    assert zero.short() == "is all zero" and zero.words().startswith("is all zero")
    cam = np.zeros((9, 9))
    cam[4, 4] = 1.0
    assert CamRegion.from_dict(describe_cam(cam)).short() == "peaks at the centre"


# --- Grad-CAM++ ----------------------------------------------------------------

def test_compute_cam_plus_plus_hand_worked():
    """Two channels, eps=0 so the fractions are exact.
    Channel 0: A = [[1,2],[3,0]] (sum 6), g = [[1,-1],[0.5,0]]:
      a = g^2 / (2 g^2 + 6 g^3) = 1 / (2 + 6 g) where g != 0: 1/8, -1/4, 1/5, (0)
      w0 = sum ReLU(g) a = 1/8 + 0.5/5 = 0.225
    Channel 1: A = -0.5 everywhere (sum -2), g = 0.25: a = 1 / (2 - 0.5) = 2/3,
      w1 = 4 * 0.25 * 2/3 = 2/3
    raw = ReLU(0.225 A0 - 1/3) = [[0, 0.45 - 1/3], [0.675 - 1/3, 0]]."""
    acts = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[-0.5, -0.5], [-0.5, -0.5]]]).unsqueeze(0)
    grads = torch.tensor([[[1.0, -1.0], [0.5, 0.0]], [[0.25] * 2] * 2]).unsqueeze(0)
    raw = compute_cam_plus_plus(acts, grads, eps=0.0)
    expected = torch.tensor([[[0.0, 0.45 - 1 / 3], [0.675 - 1 / 3, 0.0]]])
    torch.testing.assert_close(raw, expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(raw).all()          # the 0/0 where g == 0 is masked, not NaN
    # the default eps (1e-6) barely moves gradients of order 1
    torch.testing.assert_close(compute_cam_plus_plus(acts, grads), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(GradCAMError, match="one shape"):
        compute_cam_plus_plus(acts, grads[:, :1])


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_plus_plus_matches_pytorch_grad_cam(resnet, images, layer_name):
    """Same comparison as for Grad-CAM, against pytorch_grad_cam.GradCAMPlusPlus:
    (a) raw maps vs ReLU(get_cam_image) on its own captured activations and
    gradients (observed ~7e-7 relative); (b) final maps, 1e-5 absolute
    (observed <= 1.4e-6). The gradients here are ~3e-3, so the eps = 1e-6 in
    the a_ij denominator matters: matching it is part of what is tested."""
    from pytorch_grad_cam import GradCAMPlusPlus as PGCPlusPlus

    classes = [4, 5, 0]
    ours = GradCAMPlusPlus(resnet, layer_name).attribute(images, targets=classes)
    _assert_matches_reference(ours, PGCPlusPlus, resnet, images, classes, layer_name)
    # and it is not just Grad-CAM again
    plain = GradCAM(resnet, layer_name).attribute(images, targets=classes)
    assert (plain.maps - ours.maps).abs().max() > 1e-2


def test_cam_methods_registry():
    assert CAM_METHODS == {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
    assert all(issubclass(cls, CamExplainer) for cls in CAM_METHODS.values())
    assert not issubclass(GradCAMPlusPlus, GradCAM)


def test_both_cam_methods_are_public_api():
    import cnnstress
    for name, cls in (("GradCAM", GradCAM), ("GradCAMPlusPlus", GradCAMPlusPlus)):
        assert name in cnnstress.__all__
        assert getattr(cnnstress, name) is cls


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_shares_hygiene_and_checks(method):
    cls = CAM_METHODS[method]
    model = TinyNet().train()
    before = {name: m.training for name, m in model.named_modules()}
    res = cls(model, model.conv).attribute(tiny_input(2) + torch.randn(2, 1, 4, 4), targets=[0, 1])
    assert isinstance(res, CamResult) and res.maps.shape == (2, 4, 4) and res.raw.min() >= 0
    assert {name: m.training for name, m in model.named_modules()} == before
    assert no_hooks(model) and all(p.grad is None for p in model.parameters())
    assert model.forwards == 1

    boom = TinyNet(boom=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        cls(boom, boom.conv)(tiny_input())
    assert no_hooks(boom) and all(m.training for m in boom.modules())

    label = {"gradcam": "Grad-CAM needs", "gradcam++": r"Grad-CAM\+\+ needs"}[method]
    with pytest.raises(GradCAMError, match=label):
        cls(model, model.conv)(torch.zeros(4, 4))
    with pytest.raises(GradCAMError, match="did not run"):
        cls(model, model.unused)(tiny_input())
    with pytest.raises(GradCAMError, match="2 entries"):
        cls(model, model.conv)(tiny_input(3), targets=[0, 1])
    with pytest.raises(GradCAMError, match="not a submodule"):
        cls(model, nn.Conv2d(1, 1, 1))
    assert no_hooks(model)


def test_plus_plus_on_tiny_net_is_hand_checkable():
    """TinyNet: g_k = W[c,k] / 16 is constant over the 4x4 grid, so
    a_k = 1 / (2 + S_k g_k) (+ eps), w_k = 16 ReLU(g_k) a_k. Class 0 (W = [1, 2]):
    S_0 = sum(x) = 120, S_1 = sum(8 - x) = 8; g = [1/16, 1/8]:
    w_0 = 1 / (2 + 7.5) = 2/19, w_1 = 2 / (2 + 1) = 2/3 (eps: ~3e-4 relative here);
    raw = ReLU(2/19 x + 2/3 (8 - x)) = ReLU(16/3 - 32/57 x), clipped for x > 9.5."""
    model = TinyNet().eval()
    res = GradCAMPlusPlus(model, "conv").attribute(tiny_input(), targets=0)
    v = torch.arange(16.0).view(4, 4)
    expected = torch.relu(2 / 19 * v + 2 / 3 * (8 - v))
    assert (expected == 0).sum() == 6 and (res.raw[0] == 0).sum() == 6
    torch.testing.assert_close(res.raw[0], expected, rtol=1e-4, atol=1e-5)


def test_get_layer_resolves_names_and_lists_choices(resnet):
    assert get_layer(resnet, "layer3") is resnet.layer3
    assert get_layer(resnet, "layer4") is resnet.layer4
    assert get_layer(resnet, "layer4.1.conv2") is resnet.layer4[1].conv2
    assert GradCAM(resnet, "layer3").target_layer is resnet.layer3      # names accepted too
    for bad in ("layer5", "layer4.9", "", "layer4.0.conv1.weight"):
        with pytest.raises(GradCAMError) as info:
            get_layer(resnet, bad)
        msg = str(info.value)
        assert "\n" not in msg and repr(bad) in msg
        assert "valid: conv1, bn1, layer1, layer2, layer3, layer4, pool, linear" in msg
        assert "layer1.0" in msg
    with pytest.raises(GradCAMError, match="valid"):
        GradCAMPlusPlus(resnet, "layer7")
