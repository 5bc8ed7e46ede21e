"""Sanity checks (Adebayo et al. 2018): Spearman and SSIM against references,
the cascading randomisation leaving the caller's model alone and changing the
maps, and the verdict logic on crafted scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.augment import normalize
from cnnstress.errors import CnnstressError
from cnnstress.xai.cam import GradCAMError
from cnnstress.model import resnet18
from cnnstress.xai.randomisation import DEFAULT_ORDER, SanityError, SanityResult, cascading_randomization, verdict
from cnnstress.xai.similarity import spearman, ssim

# --- Spearman ------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    for shape in [(5, 6), (4, 4), (32, 32), (7,)]:
        for _ in range(3):
            a = rng.integers(-3, 4, shape)                      # many ties
            b = a + rng.integers(-2, 3, shape)
            assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
            assert spearman(a, b, absolute=True) == pytest.approx(
                spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic, abs=1e-12)
    c = rng.random((8, 8))
    assert spearman(c, c) == pytest.approx(1.0) and spearman(c, -c) == pytest.approx(-1.0)
    assert spearman(c, -c, absolute=True) == pytest.approx(1.0)
    assert spearman(c, np.exp(3 * c)) == pytest.approx(1.0)     # ranks only: monotone maps are equal
    assert spearman(torch.tensor(c), torch.tensor(c ** 2)) == pytest.approx(1.0)   # tensors too


def test_spearman_hand_computed_and_undefined_cases():
    # a = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; b = [1, 3, 2, 4] -> ranks [1, 3, 2, 4]
    # centred: [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]: r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(np.sqrt(0.9), abs=1e-12)
    assert np.isnan(spearman(np.zeros((4, 4)), np.random.default_rng(1).random((4, 4))))
    assert np.isnan(spearman([1.0], [2.0]))
    with pytest.raises(SanityError, match="one shape"):
        spearman(np.zeros((4, 4)), np.zeros(16))
    with pytest.raises(SanityError, match="NaN"):
        spearman([0.0, np.nan], [1.0, 2.0])


# --- SSIM ---------------------------------------------------------------------------

def skimage_style_ssim(a: np.ndarray, b: np.ndarray, data_range: float, crop: bool = True) -> float:
    """skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False) transcribed with scipy's gaussian_filter
    (truncate 3.5 -> radius 5), then the 5-pixel border crop."""
    from scipy.ndimage import gaussian_filter

    def f(z):
        return gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")
    ux, uy = f(a), f(b)
    vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float((s[5:-5, 5:-5] if crop else s).mean())


@pytest.mark.parametrize("shape", [(11, 11), (32, 32), (17, 40)])
def test_ssim_matches_skimage_transcription(shape):
    rng = np.random.default_rng(0)
    a = rng.random(shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), 0, 1)
    for r in (1.0, 2.5):
        assert ssim(a, b, data_range=r) == pytest.approx(skimage_style_ssim(a, b, r), abs=1e-12)


def test_ssim_matches_skimage():
    import skimage.metrics as skm   # a declared test dependency: never skipped
    rng = np.random.default_rng(3)
    a = rng.random((32, 32))
    b = np.clip(a + 0.2 * rng.standard_normal((32, 32)), 0, 1)
    ref = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    assert ssim(a, b, data_range=1.0) == pytest.approx(ref, abs=1e-10)


def test_ssim_small_maps_use_the_whole_map():
    """Below 11 px a side (where skimage raises) nothing is cropped along that
    side: the mean runs over all positions of the mirrored-border S map."""
    rng = np.random.default_rng(2)
    for shape in [(4, 4), (7, 7), (10, 3)]:
        a, b = rng.random(shape), rng.random(shape)
        assert ssim(a, b, data_range=1.0) == pytest.approx(
            skimage_style_ssim(a, b, 1.0, crop=False), abs=1e-12)
    # one short axis (4 < 11): only the long axis is cropped
    a, b = rng.random((4, 20)), rng.random((4, 30))[:, :20]
    from scipy.ndimage import gaussian_filter
    c1, c2 = 1e-4, 9e-4

    def f(z):
        return gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")
    ux, uy = f(a), f(b)
    s = (2 * ux * uy + c1) * (2 * (f(a * b) - ux * uy) + c2) / (
        (ux ** 2 + uy ** 2 + c1) * (f(a * a) - ux ** 2 + f(b * b) - uy ** 2 + c2))
    assert ssim(a, b, data_range=1.0) == pytest.approx(s[:, 5:-5].mean(), abs=1e-12)


def test_ssim_hand_computed_constant_maps():
    """Constant maps have zero (co)variances, so S = (2ab + C1) / (a^2 + b^2 + C1)
    everywhere (the contrast-structure term is C2 / C2 = 1), at any size."""
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)          # 0.2401 / 0.4001
    assert expected == pytest.approx(0.2401 / 0.4001)
    for shape in [(1, 1), (4, 4), (32, 32)]:
        assert ssim(np.full(shape, 0.2), np.full(shape, 0.6), data_range=1.0) == pytest.approx(expected)
    # all-zero vs constant 1: S = C1 / (1 + C1)
    assert ssim(np.zeros((4, 4)), np.ones((4, 4)), data_range=1.0) == pytest.approx(1e-4 / (1 + 1e-4))


def test_ssim_identities():
    rng = np.random.default_rng(4)
    for shape in [(4, 4), (32, 32)]:
        a, b = rng.random(shape), rng.random(shape)
        assert ssim(a, a, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
        assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)            # data_range from the maps
        assert ssim(a, b, data_range=1.0) == pytest.approx(ssim(b, a, data_range=1.0), abs=1e-15)
        # an inverted map on the same range: structure anti-correlated, SSIM low
        assert ssim(a, 1 - a, data_range=1.0) < -0.5
        # but a vs -a is NOT low: the luminance term (2 mu_a mu_b + C1) / ... and the
        # structure term (2 cov + C2) / ... are both negative, and SSIM is their
        # product (observed 0.95); same formula as skimage. Compare maps on [0, 1].
        assert ssim(a, -a, data_range=2.0) > 0.5
    a, b = rng.random((32, 32)), rng.random((32, 32))
    assert abs(ssim(a, b, data_range=1.0)) < 0.1                    # independent noise
    assert ssim(np.full((4, 4), 3.0), np.full((4, 4), 3.0)) == 1.0   # zero joint range: identical
    assert ssim(torch.ones(4, 4), torch.ones(4, 4), data_range=1.0) == pytest.approx(1.0)


def test_ssim_rejects_bad_inputs():
    with pytest.raises(SanityError, match="2-D"):
        ssim(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), data_range=1.0)
    with pytest.raises(SanityError, match="one shape"):
        ssim(np.zeros((4, 4)), np.zeros((4, 5)), data_range=1.0)
    with pytest.raises(SanityError, match="data_range"):
        ssim(np.zeros((4, 4)), np.zeros((4, 4)), data_range=0.0)
    assert issubclass(SanityError, CnnstressError)


# --- the cascade ------------------------------------------------------------------------

class TinyCNN(nn.Module):
    """Names as in the CIFAR ResNet (conv1, bn1, layer1..4, pool, linear), tiny,
    plus a parameter in a module without reset_parameters()."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.gain * x

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        block = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1), nn.BatchNorm2d(cout),
                                                   nn.ReLU())
        self.layer1, self.layer2 = block(8, 8, 1), block(8, 16, 2)
        self.layer3 = block(16, 16, 2)
        self.layer4 = nn.Sequential(block(16, 16, 1), TinyCNN.Scale())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.pool(x), 1))


def tiny_model() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():                 # "trained-looking" BatchNorm statistics
        model.train()(torch.randn(16, 3, 16, 16))
    return model


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "grad": {k: p.grad for k, p in model.named_parameters()},
            "training": {k: m.training for k, m in model.named_modules()}}


def assert_same(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in state.items():
        assert v.dtype == snap["state"][k].dtype and torch.equal(v, snap["state"][k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == snap["requires_grad"]
    assert all(p.grad is None for p in model.parameters())
    assert {k: m.training for k, m in model.named_modules()} == snap["training"]


def test_caller_model_bit_identical_and_global_rng_untouched():
    model = tiny_model().train()
    model.layer2.eval()                                   # mixed modes must survive as they are
    model.conv1.weight.requires_grad_(False)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = cascading_randomization(model, x, [1, 2, 3], layer="layer3")
    assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert res.steps == ["original", *DEFAULT_ORDER] and res.layer_step == 3
    assert res.targets.tolist() == [1, 2, 3] and res.targets.dtype == np.int64
    s = len(res.steps)
    assert res.spearman.shape == res.spearman_abs.shape == res.ssim.shape == (s, 3)
    assert res.maps.shape == (s, 3, 16, 16) and res.maps.dtype == np.float32
    assert res.raw.shape == (s, 3, 16, 16) and res.zero.shape == (s, 3)   # upsampled, un-normalised
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    assert res.not_reset == ["layer4.1.gain"]             # reported, not silently skipped
    # abs and signed agree for ReLU'd maps (up to the nan pattern)
    np.testing.assert_array_equal(res.spearman, res.spearman_abs)


def test_seeded_and_deterministic():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = cascading_randomization(model, x, None, order=["linear", "layer4"], seed=5)
    b = cascading_randomization(model, x, None, order=["linear", "layer4"], seed=5)
    c = cascading_randomization(model, x, None, order=["linear", "layer4"], seed=6)
    np.testing.assert_array_equal(a.raw, b.raw)
    np.testing.assert_array_equal(a.ssim, b.ssim)
    np.testing.assert_array_equal(a.raw[0], c.raw[0])             # same original
    assert not np.array_equal(a.raw[1:], c.raw[1:])              # other randomisation
    pred = model(x).argmax(1)
    assert a.targets.tolist() == pred.tolist()                   # None: the original predictions


def test_cascade_changes_resnet_maps():
    """A random CIFAR ResNet stands in for a trained one; the classes are ones
    whose original layer4 Grad-CAM is non-zero and partly clipped on these
    images (see test_gradcam.test_matches_pytorch_grad_cam). The cascade is
    cut after layer4 to keep the test fast (the full order runs on TinyCNN)."""
    torch.manual_seed(0)
    model = resnet18().eval()
    images = normalize(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    res = cascading_randomization(model, images, [4, 5, 0], method="gradcam", layer="layer4",
                                  order=["linear", "layer4"], seed=0)
    assert res.layer_step == 2 and res.steps == ["original", "linear", "layer4"]
    assert not res.zero[0].any()
    np.testing.assert_allclose(res.spearman[0], 1.0)
    np.testing.assert_allclose(res.ssim[0], 1.0, atol=1e-12)
    # once the target layer (and the head above it) is randomised, the maps no
    # longer look like the originals (observed |rho| 0.41, 0.64 and one all-zero
    # map -> nan; SSIM 0.07, -0.07, 0.36)
    k = res.layer_step
    sim = np.abs(res.spearman_abs[k])
    assert np.isfinite(sim).sum() >= 2 and np.nanmax(sim) < 0.8 and np.nanmedian(sim) < 0.7
    assert np.median(res.ssim[k]) < 0.3 and res.ssim[k].max() < 0.6
    v = verdict(res, threshold=0.7)
    assert v["passed"] is True and v["step"] == "layer4" and v["n_images"] == 3
    assert v["n_used"] + v["n_nan"] == 3 and v["median_per_step"]["original"] == 1.0
    assert v["n_nan"] == int(res.zero[k].sum())          # nan here = a map that went all-zero


def test_gradcam_plus_plus_runs_in_the_cascade():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = cascading_randomization(model, x, [0, 1], method="gradcam++", order=["linear", "layer4"])
    assert res.method == "gradcam++" and res.steps == ["original", "linear", "layer4"]
    assert np.isfinite(res.ssim).all()


def test_cascade_errors():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(SanityError, match="gradcam, gradcam\\+\\+"):
        cascading_randomization(model, x, None, method="lime")
    with pytest.raises(GradCAMError, match="valid: conv1, bn1, layer1"):
        cascading_randomization(model, x, None, order=["linear", "layer9"])
    with pytest.raises(GradCAMError, match="valid"):
        cascading_randomization(model, x, None, layer="layer5")
    with pytest.raises(SanityError, match="integer class indices"):
        cascading_randomization(model, x, [0.5, 1.0])
    with pytest.raises(SanityError, match="N=2"):
        cascading_randomization(model, x, [0, 1, 2])
    with pytest.raises(SanityError, match="order"):
        cascading_randomization(model, x, None, order=[])


# --- the verdict ---------------------------------------------------------------------

def crafted(rows: list[list[float]], layer_step: int | None = 2) -> SanityResult:
    scores = np.array(rows, dtype=np.float64)
    s, n = scores.shape
    steps = ["original", "linear", "layer4", "layer3"][:s]
    return SanityResult(steps=steps, method="gradcam", layer="layer4", layer_step=layer_step,
                        targets=np.zeros(n, np.int64), spearman=scores, spearman_abs=scores,
                        ssim=np.where(np.isfinite(scores), scores, 0.0),
                        maps=np.zeros((s, n, 2, 2), np.float32),
                        raw=np.zeros((s, n, 1, 1), np.float32), zero=np.zeros((s, n), bool), not_reset=[])


def test_verdict_on_crafted_scores():
    # only the row at layer_step decides; earlier rows (head only) may still be similar
    ok = verdict(crafted([[1, 1, 1, np.nan], [0.9, 0.95, 0.9, np.nan], [0.1, -0.2, 0.3, np.nan],
                          [0.9, 0.9, 0.9, 0.9]]))
    assert ok["passed"] is True and ok["step"] == "layer4" and ok["step_index"] == 2
    assert ok["median"] == pytest.approx(0.2) and ok["n_used"] == 3 and ok["n_nan"] == 1
    assert ok["n_images"] == 4 and ok["metric"] == "|spearman_abs|" and ok["threshold"] == 0.5
    assert ok["median_per_step"]["linear"] == pytest.approx(0.9)
    assert "\n" not in ok["reason"]

    # a flipped ranking (-0.8) still mirrors the original: it counts as similar
    bad = verdict(crafted([[1, 1, 1], [0.9, 0.9, 0.9], [0.9, -0.8, 0.7]]))
    assert bad["passed"] is False and bad["median"] == pytest.approx(0.8)
    assert verdict(crafted([[1, 1, 1], [0.9, 0.9, 0.9], [0.9, -0.8, 0.7]]), threshold=0.85)["passed"] is True
    # exactly at the threshold is not below it
    assert verdict(crafted([[1], [1], [0.5]]))["passed"] is False

    undefined = verdict(crafted([[1, 1], [1, 1], [np.nan, np.nan]]))
    assert undefined["passed"] is None and undefined["n_nan"] == 2 and "constant" in undefined["reason"]
    never = verdict(crafted([[1, 1], [0.1, 0.1]], layer_step=None))
    assert never["passed"] is None and "never randomises" in never["reason"]
    with pytest.raises(SanityError, match="threshold"):
        verdict(crafted([[1], [1], [0.1]]), threshold=0.0)
