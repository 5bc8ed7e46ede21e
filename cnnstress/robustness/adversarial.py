"""White-box adversarial robustness: FGSM and PGD under an L-infinity budget.

Both attacks work in *pixel space*: images are float (N,3,H,W) on [0, 1],
unnormalised, NCHW, and are normalised with the CIFAR mean/std
(`augment.normalize`) only on the way into the model. The budget `eps` is
therefore in pixel units: 8/255 lets every channel of every pixel move by up
to 8 grey levels. Every returned image x_adv satisfies
|x_adv - x|_inf <= eps (up to float rounding, < 1e-6) and lies in [0, 1].

* FGSM (Goodfellow et al. 2015): x_adv = clip(x + eps * sign(grad_x CE), 0, 1).
* PGD (Madry et al. 2018): a uniform random start in the eps-ball, then
  `steps` signed-gradient steps of size `step_size` (default 2.5*eps/steps, so
  the path can cross the ball from one face to the other), each followed by
  a projection onto the eps-ball around x and onto [0, 1].

During an attack the model is in eval mode (batch-norm running statistics,
so examples do not influence each other) and computes in fp32 with autocast
disabled; its mode is restored afterwards, also on an exception. Gradients are
taken only with respect to the input (`torch.autograd.grad`), so parameters'
`.grad` are never touched. PGD's random start comes from its own seeded
`torch.Generator`, never the global RNG.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import normalize, to_float
from ..errors import ConfigError
from ..runtime import batch_slices, eval_mode, progress_bar, progress_enabled

ATTACKS = ("fgsm", "pgd")
DEFAULT_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
STEP_SIZE_RULE = "2.5*eps/steps"  # Madry et al. 2018


# --- validation ------------------------------------------------------------

def _check_eps(eps: Any) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"eps must be a number (pixel units on [0, 1], e.g. 8/255), got {eps!r}") from None
    if not math.isfinite(e) or e < 0:
        raise ConfigError(f"eps must be finite and >= 0 (pixel units on [0, 1], e.g. 8/255), got {eps!r}")
    return e


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _check_step_size(step_size: Any, eps: float, steps: int) -> float:
    if step_size is None:
        return 2.5 * eps / steps
    try:
        s = float(step_size)
    except (TypeError, ValueError):
        raise ConfigError(f"step_size must be a positive number or None, got {step_size!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise ConfigError(f"step_size must be a positive number or None, got {step_size!r}")
    return s


def _check_pixels(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError("images must be a float tensor (N,3,H,W) on [0, 1]; "
                         "convert uint8 with cnnstress.augment.to_float")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N,3,H,W), got {tuple(images.shape)}")
    if images.numel() and not (float(images.min()) >= 0.0 and float(images.max()) <= 1.0):
        raise ValueError("images must be unnormalised pixels on [0, 1] (NaN or values outside found); "
                         "the attack normalises internally")


def _labels_on(labels: Any, n: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class ids, got dtype {y.dtype}")
    return y.to(device=device, dtype=torch.int64)


def _attack_device(model: nn.Module, device: Any, fallback: torch.device) -> torch.device:
    """`device` if given, else where the model's parameters live, else `fallback`."""
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return fallback


# --- the attacks on device tensors (model already in eval mode) ------------

def _model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """normalize(x), in channels-last layout when the model's first conv
    weight is (as training builds it on a GPU), so cuDNN need not convert."""
    z = normalize(x)
    w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        z = z.contiguous(memory_format=torch.channels_last)
    return z


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(sum of per-example CE)/dx for pixels x. Summed, not averaged, so an
    example's gradient does not shrink with the batch size (eval-mode
    examples are independent, so each row is that example's own gradient)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.cross_entropy(model(_model_input(model, x)).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _check_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Labels must be class ids the model has; one forward of one image tells
    how many (beyond them cross-entropy fails with an IndexError on the CPU and
    a device-side assert, fatal to the CUDA context, on a GPU). Eval mode."""
    if y.numel() == 0 or x.shape[0] == 0:
        return
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        classes = model(_model_input(model, x[:1])).shape[1]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise ValueError(f"labels must be class ids in 0..{classes - 1} (the model has {classes} outputs), "
                         f"got {low}..{high}")


def _attack_inputs(model: nn.Module, images: torch.Tensor, labels: Any,
                   device: Any) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """The attack device, the images as fp32 there and the labels there."""
    dev = _attack_device(model, device, images.device)
    return dev, images.detach().to(dev, torch.float32), _labels_on(labels, images.shape[0], dev)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    if eps == 0:
        return x
    return (x + eps * _input_grad(model, x, y).sign()).clamp_(0.0, 1.0)


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
         step_size: float, random_start: bool, gen: torch.Generator | None) -> torch.Tensor:
    if eps == 0:
        return x
    if random_start:
        noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x_adv = (x + (noise * 2.0 - 1.0) * eps).clamp_(0.0, 1.0)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv = _project(x_adv + step_size * _input_grad(model, x_adv, y).sign(), x, eps)
    return x_adv


# --- public API --------------------------------------------------------------

def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
         device: Any = None) -> torch.Tensor:
    """Fast Gradient Sign Method, L-inf, in pixel space.

    images: float (N,3,H,W) on [0, 1], unnormalised (the model receives
    `normalize(images)`); labels: int (N,); eps: budget in pixel units (>= 0).
    Returns adversarial images with the shape, dtype and device of `images`,
    on [0, 1] and within eps of them in L-inf. eps=0 returns an unchanged copy
    without running the model. `device`: where to compute (default: the
    model's parameters' device)."""
    eps = _check_eps(eps)
    _check_pixels(images)
    if eps == 0:
        return images.detach().clone()
    dev, x, y = _attack_inputs(model, images, labels, device)
    with eval_mode(model):
        _check_classes(model, x, y)
        out = _fgsm(model, x, y, eps)
    return out.to(images.device, images.dtype)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
        steps: int = 10, step_size: float | None = None, random_start: bool = True,
        seed: int = 0, device: Any = None) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al. 2018), L-inf, in pixel space.

    images: float (N,3,H,W) on [0, 1], unnormalised; labels: int (N,); eps:
    budget in pixel units (>= 0). Starts at a uniform draw in [-eps, eps]
    around x (from a torch.Generator seeded with `seed` on the attack device;
    `random_start=False` starts at x), then takes `steps` steps of
    `step_size` (default 2.5*eps/steps) along the sign of the input gradient,
    projecting onto the eps-ball and [0, 1] after each. Returns adversarial
    images with the shape, dtype and device of `images`; eps=0 returns an
    unchanged copy. Deterministic for a given seed on a deterministic device."""
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    size = _check_step_size(step_size, eps, steps)
    _check_pixels(images)
    if eps == 0:
        return images.detach().clone()
    dev, x, y = _attack_inputs(model, images, labels, device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    with eval_mode(model):
        _check_classes(model, x, y)
        out = _pgd(model, x, y, eps, steps, size, random_start, gen)
    return out.to(images.device, images.dtype)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return int((model(_model_input(model, x)).argmax(1) == y).sum())


def adversarial_accuracy(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, *,
                         eps_list: Sequence[float] = DEFAULT_EPS,
                         attacks: Sequence[str] = ATTACKS, steps: int = 10, seed: int = 0,
                         device: Any = None, batch_size: int = 256,
                         progress: bool | None = None) -> dict[str, Any]:
    """Accuracy on clean images and under each attack at each budget.

    images_uint8: uint8 (N,3,H,W) on the CPU (as stored); labels: int (N,).
    Each batch of `batch_size` is moved to `device` once and attacked at every
    eps in `eps_list` (pixel units, e.g. 8/255) with every attack in `attacks`
    ("fgsm", "pgd"); PGD uses `steps` steps of 2.5*eps/steps with a random
    start. Every eps gets its own generator seeded with `seed`, drawn batch by
    batch, so results are reproducible for a fixed (seed, batch_size, device)
    and the start direction is shared across eps.

    Returns a JSON-ready dict: n, eps (list of floats, pixel units),
    clean_accuracy, one list of accuracies (aligned with eps) per requested
    attack under the keys "fgsm" / "pgd", steps, step_size_rule and seed.
    Accuracies are None when N = 0. `progress`: a tqdm bar (None = only in a
    terminal or notebook, as for training)."""
    eps_values = [_check_eps(e) for e in eps_list]
    steps = _check_steps(steps)
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ConfigError(f"attacks must be a non-empty subset of {ATTACKS}, got {attacks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
        raise ValueError("images_uint8 must be a uint8 tensor (N,3,H,W) as stored")
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"images_uint8 must have shape (N,3,H,W), got {tuple(images_uint8.shape)}")
    n = int(images_uint8.shape[0])
    labels = _labels_on(labels, n, torch.device("cpu"))
    dev = _attack_device(model, device, images_uint8.device)

    gens = {(a, i): torch.Generator(device=dev).manual_seed(int(seed))
            for a in attacks if a == "pgd" for i in range(len(eps_values))}
    clean = 0
    correct = {a: [0] * len(eps_values) for a in attacks}
    batches = batch_slices(n, batch_size)
    bar = progress_bar(len(batches) * len(attacks) * len(eps_values), "adversarial",
                        progress_enabled(progress))
    try:
        with eval_mode(model):
            _check_classes(model, to_float(images_uint8[:1].to(dev)), labels)
            for batch in batches:
                x = to_float(images_uint8[batch].to(dev))
                y = labels[batch].to(dev)
                batch_clean = _correct(model, x, y)
                clean += batch_clean
                for a in attacks:
                    for i, eps in enumerate(eps_values):
                        if eps == 0:  # no perturbation: the clean count, by construction
                            correct[a][i] += batch_clean
                        else:
                            if a == "fgsm":
                                x_adv = _fgsm(model, x, y, eps)
                            else:
                                x_adv = _pgd(model, x, y, eps, steps, 2.5 * eps / steps, True, gens[a, i])
                            correct[a][i] += _correct(model, x_adv, y)
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    def acc(k: int) -> float | None:
        return k / n if n else None

    out: dict[str, Any] = {"n": n, "eps": eps_values, "clean_accuracy": acc(clean)}
    for a in attacks:
        out[a] = [acc(k) for k in correct[a]]
    out.update(steps=steps, step_size_rule=STEP_SIZE_RULE, seed=int(seed))
    return out
