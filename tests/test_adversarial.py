"""FGSM / PGD in pixel space and accuracy under attack.

Two kinds of model:
* hand-built linear models on 3x2x2 images, whose input gradient has a known
  sign, so the exact adversarial images and accuracies can be written down;
* a CIFAR ResNet-18 on 8x8 images whose linear head was fit to the features
  of 16 images (the body keeps its seeded random init), for the properties
  that must hold on the real architecture.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnstress.robustness.adversarial import adversarial_accuracy, fgsm, pgd
from cnnstress.augment import normalize, to_float
from cnnstress.data import CIFAR_MEAN, CIFAR_STD
from cnnstress.errors import ConfigError
from cnnstress.model import resnet18

EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
# (plain comparisons rather than torch.testing.assert_close, whose first call
# imports ~1.5 s of torch internals)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors on shared cores: one thread avoids OpenMP spin-waits that
    # make each ResNet pass 3-10x slower under contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _std_per_input() -> torch.Tensor:
    """CIFAR std of each of the 12 inputs of a flattened (3,2,2) image."""
    return torch.tensor(CIFAR_STD).repeat_interleave(4)


def _mean_per_input() -> torch.Tensor:
    return torch.tensor(CIFAR_MEAN).repeat_interleave(4)


def grey_margin_model(g0: float = 127.5) -> nn.Module:
    """2-class linear model on normalised (3,2,2) images with logits
    z0 = 0, z1 = sum_p (x_p - g0/255), x in pixel units: every pixel moves z1
    one-for-one, so a budget eps moves z1 by at most 12*eps and the attack
    optimum is every pixel shifted by eps against the label."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = _std_per_input()                       # undo the /std of normalize
        model[1].bias.zero_()
        model[1].bias[1] = -(g0 / 255 - _mean_per_input()).sum()     # undo the -mean, shift by g0
    return model


def grey_images(levels) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


# --- exact results on linear models -----------------------------------------

def test_fgsm_moves_every_pixel_by_eps_against_the_weight_sign():
    # z1 = v . normalize(x), z0 = 0. For label 1 the CE gradient w.r.t. x is
    # -(1 - p1) * v / std, so FGSM steps by -eps * sign(v); for label 0 by
    # +eps * sign(v). Pixels with v = 0 stay put, pixels at 0 or 1 are clipped.
    v = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.0, 1.0, -1.0, -1.0])
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = v * 0.1
        model[1].bias.zero_()
    x = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.8, 0.3, 0.6, 0.7, 0.0, 0.99, 1.0, 0.01],
                      [0.5, 0.5, 0.5, 0.2, 0.8, 0.3, 0.6, 0.7, 1.0, 0.0, 0.0, 1.0]]).view(2, 3, 2, 2)
    y = torch.tensor([1, 0])
    eps = 4 / 255
    out = fgsm(model, x, y, eps)
    s = torch.sign(v).view(3, 2, 2)
    expected = torch.stack([(x[0] - eps * s).clamp(0, 1), (x[1] + eps * s).clamp(0, 1)])
    assert (out - expected).abs().max() <= 1e-7
    # spot checks written out by hand
    assert out[0, 0, 0, 0] == pytest.approx(0.5 - eps, abs=1e-7)    # v > 0, label 1: down
    assert out[0, 0, 1, 0] == pytest.approx(0.5, abs=0)              # v = 0: unchanged
    assert out[0, 2, 0, 0] == 0.0                                     # v > 0 at 0: clipped
    assert out[0, 2, 1, 0] == 1.0                                     # v < 0 at 1: clipped
    assert out[1, 0, 0, 1] == pytest.approx(0.5 - eps, abs=1e-7)     # v < 0, label 0: down
    # PGD reaches the same corner of the box on a linear model: its path
    # (2.5 eps) is longer than the farthest random start (2 eps) from it.
    # Pixels with v = 0 get no gradient and keep their random start.
    out_pgd = pgd(model, x, y, eps, seed=3)
    moved = (s != 0).expand_as(x)
    assert (out_pgd[moved] - expected[moved]).abs().max() <= 1e-6
    assert (out_pgd[~moved] - x[~moved]).abs().max() <= eps + 1e-6


def test_eps_zero_returns_the_input_bit_identical_without_running_the_model():
    model = grey_margin_model()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x = to_float(grey_images([3, 128, 250]))
    y = torch.tensor([0, 1, 1])
    for attack in (fgsm, pgd):
        out = attack(model, x, y, 0.0)
        assert torch.equal(out, x) and out.dtype == x.dtype
        assert out.data_ptr() != x.data_ptr()  # a copy: the caller may write to it
    assert calls == []


def test_accuracy_under_attack_matches_the_hand_computed_margins():
    # z1 = 12 (g - 127.5) / 255 for a uniform grey level g; at budget k/255 the
    # optimal attack moves z1 by 12 k / 255 against the label, so an example
    # stays correct iff its distance |g - 127.5| exceeds k. 140 labelled 0 is
    # wrong even clean.
    levels = [128, 129, 130, 132, 136, 127, 125, 123, 118, 140]
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    model = grey_margin_model()
    res = adversarial_accuracy(model, grey_images(levels), torch.tensor(labels),
                               eps_list=(0.0, *EPS), batch_size=4, seed=5, progress=False)
    assert res["n"] == 10
    assert res["clean_accuracy"] == pytest.approx(0.9)
    expected = [0.9, 0.7, 0.6, 0.4, 0.2]          # distances > 0, 1, 2, 4, 8 grey levels
    assert res["fgsm"] == pytest.approx(expected)
    assert res["pgd"] == pytest.approx(expected)   # FGSM is optimal here and PGD reaches it
    assert res["eps"] == pytest.approx([0.0, *EPS])
    assert res["steps"] == 10 and res["seed"] == 5 and res["step_size_rule"] == "2.5*eps/steps"
    assert json.loads(json.dumps(res)) == res
    # batching does not change anything here
    res_one = adversarial_accuracy(model, grey_images(levels), torch.tensor(labels),
                                   eps_list=(0.0, *EPS), batch_size=100, seed=5, progress=False)
    assert res_one == res


def test_attacks_ignore_an_outer_no_grad_and_autocast():
    model = grey_margin_model()
    x = to_float(grey_images([120, 130, 131]))
    y = torch.tensor([0, 1, 1])
    ref = fgsm(model, x, y, 2 / 255)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fgsm(model, x, y, 2 / 255)
        out_pgd = pgd(model, x, y, 2 / 255, steps=3)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert (out_pgd - x).abs().max() <= 2 / 255 + 1e-6


def test_progress_bar_runs(capsys):
    model = grey_margin_model()
    res = adversarial_accuracy(model, grey_images([128, 127]), torch.tensor([1, 0]),
                               eps_list=(1 / 255,), attacks=("pgd",), steps=2, progress=True)
    assert "fgsm" not in res and res["pgd"] == [0.0]
    assert "adversarial" in capsys.readouterr().err


# --- a ResNet-18 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted():
    """A 2-class ResNet-18 on 8x8 images: seeded random body, linear head fit
    by least squares (minimum norm, targets +-1) to its eval-mode features of
    16 images whose class shows as +10 grey levels in one channel, so all 16
    are classified correctly; the images, labels and model (eval mode)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = torch.randint(90, 166, (16, 3, 8, 8), generator=gen)
    x[torch.arange(16), y] += 10
    x = x.to(torch.uint8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet18(num_classes=2).eval()
    with torch.no_grad():
        feats = torch.flatten(model.pool(model.forward_features(normalize(to_float(x)))), 1)
        design = torch.cat([feats, torch.ones(16, 1)], 1).double()
        target = F.one_hot(y, 2).double() * 2 - 1
        sol = torch.linalg.lstsq(design, target, driver="gelsd").solution
        model.linear.weight.copy_(sol[:-1].T)
        model.linear.bias.copy_(sol[-1])
    return x, y, model


def test_pgd_accuracy_falls_monotonically_with_eps_on_resnet(fitted):
    x, y, model = fitted
    res = adversarial_accuracy(model, x, y, eps_list=(0.0, *EPS), steps=5, batch_size=16,
                               attacks=("pgd",), progress=False)
    acc = res["pgd"]
    assert res["clean_accuracy"] >= 0.9          # the model does fit its images ...
    assert acc[0] == res["clean_accuracy"]       # eps = 0 is the clean accuracy
    assert acc[-1] <= res["clean_accuracy"] - 0.5  # ... and 8/255 really hurts: not vacuous
    assert all(a >= b for a, b in zip(acc, acc[1:])), acc


def test_bounds_range_and_pgd_beats_fgsm_on_resnet(fitted):
    x_u8, y, model = fitted
    x = to_float(x_u8)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # pixels at the edges of [0, 1]
    eps = 4 / 255
    adv = {"fgsm": fgsm(model, x, y, eps), "pgd": pgd(model, x, y, eps, steps=5)}
    for name, out in adv.items():
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert (out - x).abs().max() <= eps + 1e-6, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name
        assert not torch.equal(out, x), name
    with torch.no_grad():
        loss = {k: float(F.cross_entropy(model(normalize(v)), y)) for k, v in adv.items()}
        clean = float(F.cross_entropy(model(normalize(x)), y))
    assert loss["pgd"] >= loss["fgsm"] > clean


def test_pgd_is_deterministic_under_its_seed_and_leaves_the_global_rng_alone(fitted):
    x_u8, y, model = fitted
    x, y = to_float(x_u8[:4]), y[:4]
    state = torch.get_rng_state()
    a = pgd(model, x, y, 8 / 255, steps=2, seed=7)
    b = pgd(model, x, y, 8 / 255, steps=2, seed=7)
    c = pgd(model, x, y, 8 / 255, steps=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_one_full_step_of_pgd_without_random_start_is_fgsm(fitted):
    x_u8, y, model = fitted
    x, y = to_float(x_u8[:4]), y[:4]
    eps = 2 / 255
    assert torch.equal(pgd(model, x, y, eps, steps=1, step_size=eps, random_start=False),
                       fgsm(model, x, y, eps))


def test_a_channels_last_model_gets_the_same_attack(fitted):
    x_u8, y, model = fitted
    x, y = to_float(x_u8[:4]), y[:4]
    ref = fgsm(model, x, y, 2 / 255)
    model.to(memory_format=torch.channels_last)
    try:
        out = fgsm(model, x, y, 2 / 255)
    finally:
        model.to(memory_format=torch.contiguous_format)
    # same up to gradient entries so close to 0 that their sign depends on the layout
    assert (out == ref).float().mean() > 0.99


def test_model_mode_params_and_buffers_untouched(fitted):
    x_u8, y, model = fitted
    x, y = to_float(x_u8[:4]), y[:4]
    model.train()
    marker = torch.full_like(model.linear.weight, 3.0)
    model.linear.weight.grad = marker.clone()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fgsm(model, x, y, 2 / 255)
        pgd(model, x, y, 2 / 255, steps=2)
        adversarial_accuracy(model, x_u8[:4], y, eps_list=(2 / 255,), steps=1, progress=False)
        assert model.training and all(m.training for m in model.modules())
        assert torch.equal(model.linear.weight.grad, marker)
        assert all(p.grad is None for n, p in model.named_parameters() if n != "linear.weight")
        # eval mode during the attack: batch-norm statistics did not move
        assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
        # restored on an exception too (label 5 of a 2-class model: refused before any attack step)
        with pytest.raises(ValueError, match=r"class ids in 0\.\.1 \(the model has 2 outputs\), got 0\.\.5"):
            pgd(model, x, torch.tensor([5, 0, 1, 0]), 2 / 255, steps=1)
        with pytest.raises(ValueError, match=r"class ids in 0\.\.1 .*got -1\.\.1"):
            fgsm(model, x, torch.tensor([-1, 0, 1, 0]), 2 / 255)
        with pytest.raises(ValueError, match="the model has 2 outputs"):
            adversarial_accuracy(model, x_u8[:4], torch.tensor([0, 2, 1, 0]), eps_list=(2 / 255,), steps=1,
                                 progress=False)
        assert model.training
    finally:
        model.eval()
        model.linear.weight.grad = None


# --- validation ----------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m, x, y: fgsm(m, x, y, -1 / 255),
    lambda m, x, y: pgd(m, x, y, float("nan")),
    lambda m, x, y: pgd(m, x, y, 2 / 255, steps=0),
    lambda m, x, y: pgd(m, x, y, 2 / 255, step_size=0.0),
    lambda m, x, y: adversarial_accuracy(m, (x * 255).to(torch.uint8), y, eps_list=(1 / 255, -1.0)),
    lambda m, x, y: adversarial_accuracy(m, (x * 255).to(torch.uint8), y, steps=0),
    lambda m, x, y: adversarial_accuracy(m, (x * 255).to(torch.uint8), y, attacks=("cw",)),
])
def test_bad_config_is_a_one_line_config_error(call):
    model = grey_margin_model()
    x, y = to_float(grey_images([100, 150])), torch.tensor([0, 1])
    with pytest.raises(ConfigError) as info:
        call(model, x, y)
    assert "\n" not in str(info.value)


def test_bad_images_are_one_line_value_errors():
    model = grey_margin_model()
    u8, y = grey_images([100, 150]), torch.tensor([0, 1])
    for bad in (u8, normalize(to_float(u8)), to_float(u8)[:, :2]):
        with pytest.raises(ValueError) as info:
            fgsm(model, bad, y, 1 / 255)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="uint8"):
        adversarial_accuracy(model, to_float(u8), y)
    with pytest.raises(ValueError, match="labels"):
        pgd(model, to_float(u8), torch.tensor([0, 1, 1]), 1 / 255)
