"""Deletion / insertion faithfulness of saliency maps (Petsiuk et al. 2018, RISE).

Given images, one importance map per image and the class to explain, pixels
are ranked by decreasing importance. Ties are broken at random (a seeded
permutation per image), not in raster order: a Grad-CAM map is zero after the
ReLU over whole blocks, and removing those blocks top row first would score
the raster order, not the map. Then, in `steps` equal chunks of pixels:

    deletion:  start from the image and replace the most important pixels
               (all channels of a pixel) by the baseline image;
    insertion: start from the baseline image and put the most important
               pixels of the image back.

After each step (and before the first) the softmax probability of the target
class is recorded: steps + 1 points at the fractions k_s / (H*W) of pixels
changed, k_s = floor(s * H * W / steps) (exactly s / steps when the steps
divide H*W, e.g. 16 steps at 32x32). The area under each curve (trapezoid
rule over the fraction, 0..1) scores the map: a faithful map makes the
probability drop fast under deletion (low deletion AUC) and rise fast under
insertion (high insertion AUC). Compare against `random_maps` of the same
shape, the chance level, in two variants: pixel noise (independent per
pixel) and smooth noise (drawn at the CAM layer's resolution, e.g. 4x4, and
upsampled exactly as the CAM is). A CAM map is smooth, and smooth maps
remove connected regions, which alone changes the curves; beating the smooth
baseline separates faithfulness from smoothness.

Baselines, in the normalised input space the model sees:
    "blur": a Gaussian blur of the image (sigma `blur_sigma` = 5 px, radius
            3 sigma, separable conv). At the border the kernel is truncated
            and renormalised (each output pixel is a weighted mean of image
            pixels only), so any image size works and no padding colour
            leaks in.
    "mean": zeros = the dataset mean colour (inputs are normalised with the
            CIFAR mean/std).

All N * (steps + 1) * 2 perturbed inputs go through the model in batches of
`batch_size`, built on the fly (never all in memory), under torch.no_grad
and in eval mode (restored afterwards, also on errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FaithfulnessError
from ..runtime import batch_slices, eval_mode
from .cam import upsample
from .metric import ExplainFunc, Metric

__all__ = ["BASELINES", "Deletion", "FaithfulnessError", "FaithfulnessResult", "Insertion", "MODES",
           "PixelPerturbation", "baseline_images", "deletion_insertion", "gaussian_blur", "importance_order",
           "perturbation_curves", "random_explain_func", "random_maps", "trapezoid_auc"]

BASELINES = ("blur", "mean")


@dataclass(frozen=True)
class FaithfulnessResult:
    """Deletion and insertion curves of N maps; float32 CPU tensors.

    deletion:      (N, steps+1) target-class softmax probability, on [0, 1],
                   after removing fractions[s] of the pixels (column 0: the
                   clean image; last column: the baseline image).
    insertion:     (N, steps+1) probability after inserting fractions[s] of
                   the pixels into the baseline (column 0: the baseline image;
                   last column: the clean image).
    fractions:     (steps+1,) fraction of pixels changed, 0 .. 1.
    deletion_auc:  (N,) trapezoid area under `deletion` over `fractions`, on
                   [0, 1]; lower = more faithful.
    insertion_auc: (N,) area under `insertion`; higher = more faithful.
    targets:       (N,) int64, the classes scored.
    baseline:      "blur" or "mean".
    """
    deletion: torch.Tensor
    insertion: torch.Tensor
    fractions: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    targets: torch.Tensor
    baseline: str


def trapezoid_auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid-rule area under curves (N, S) (or (S,)) sampled at
    `fractions` (S,), increasing from 0 to 1 -> (N,) (or a 0-d tensor)."""
    if fractions.ndim != 1 or curves.shape[-1] != fractions.shape[0] or fractions.shape[0] < 2:
        raise FaithfulnessError(f"trapezoid_auc needs curves (N,S) and fractions (S,), S >= 2; got "
                                f"{tuple(curves.shape)} and {tuple(fractions.shape)}")
    return torch.trapezoid(curves, fractions.to(curves), dim=-1)


def random_maps(n: int, h: int, w: int, seed: int = 0, *,
                resolution: tuple[int, int] | None = None) -> torch.Tensor:
    """Random importance maps, float32 (N,H,W) on [0, 1), CPU, from a private
    torch.Generator seeded with `seed` (the global RNG is not touched; the
    same arguments give the same maps). The chance-level baseline for
    `deletion_insertion`.

    resolution=None: pixel noise, uniform and independent per pixel.
    resolution=(h', w'): smooth noise, uniform (N,h',w') upsampled to (H,W)
    by gradcam.upsample, exactly as a CAM at a layer of that resolution is
    (e.g. (4, 4) for a ResNet-18's layer4 on 32x32 inputs)."""
    sizes = [("n", n), ("h", h), ("w", w)]
    if resolution is not None:
        if not isinstance(resolution, (tuple, list)) or len(resolution) != 2:
            raise FaithfulnessError(f"resolution must be (h, w); got {resolution!r}")
        sizes += [("resolution[0]", resolution[0]), ("resolution[1]", resolution[1])]
    for name, v in sizes:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FaithfulnessError(f"random_maps needs positive int sizes; got {name}={v!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if resolution is None:
        return torch.rand(n, h, w, generator=gen)
    return upsample(torch.rand(n, *resolution, generator=gen), (h, w))


def random_explain_func(seed: int = 0, *, resolution: tuple[int, int] | None = None) -> ExplainFunc:
    """The chance level as an explain_func (cnnstress.xai.metric):
    f(model, x, targets) -> random_maps(N, H, W, seed, resolution=resolution)
    for inputs x (N,3,H,W); the model and the targets are ignored, and the
    same x shape gives the same maps."""
    def explain(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return random_maps(int(x.shape[0]), int(x.shape[2]), int(x.shape[3]), seed=seed, resolution=resolution)
    return explain


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of x float (N,C,H,W), per channel, radius
    ceil(3 sigma); the kernel is truncated at the border and renormalised
    (a normalised convolution), so the output is a weighted mean of in-image
    pixels for any image size. Same shape and dtype as x."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FaithfulnessError(f"gaussian_blur needs a float batch (N,C,H,W); got {shape}")
    if not sigma > 0:
        raise FaithfulnessError(f"blur sigma must be > 0; got {sigma}")
    n, c, h, w = x.shape
    k = _gaussian_kernel(float(sigma), x.device, x.dtype)
    r = k.numel() // 2

    def sep(t: torch.Tensor) -> torch.Tensor:      # (B,1,H,W), zero padding
        t = F.conv2d(F.pad(t, (r, r, 0, 0)), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(t, (0, 0, r, r)), k.view(1, 1, -1, 1))

    num = sep(x.reshape(n * c, 1, h, w))
    den = sep(torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype))
    return (num / den).reshape(n, c, h, w)


def baseline_images(images: torch.Tensor, baseline: str = "blur", *,
                    blur_sigma: float = 5.0) -> torch.Tensor:
    """The baseline (N,3,H,W) for normalised images (N,3,H,W): their Gaussian
    blur ("blur") or zeros, the dataset mean colour ("mean")."""
    if baseline == "blur":
        return gaussian_blur(images, blur_sigma)
    if baseline == "mean":
        return torch.zeros_like(images)
    raise FaithfulnessError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")


def _check_inputs(images, maps, targets, steps, batch_size) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FaithfulnessError(f"images must be a float batch (N,C,H,W) of normalised images; got {shape}")
    n, _, h, w = images.shape
    if n == 0:
        raise FaithfulnessError("deletion_insertion got an empty batch")
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != (n, h, w):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise FaithfulnessError(f"maps must be (N,H,W) = {(n, h, w)} to match the images; got {shape}")
    if maps.dtype == torch.bool or maps.is_complex():
        raise FaithfulnessError(f"maps must be real numbers; got dtype {maps.dtype}")
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise FaithfulnessError("maps contain NaN or inf; the pixel order would be undefined")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (n,):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise FaithfulnessError(f"targets must be a tensor of N={n} class indices; got {shape}")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise FaithfulnessError(f"targets must hold integer class indices; got dtype {targets.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= h * w:
        raise FaithfulnessError(f"steps must be an int in 1..{h * w} (the pixel count); got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FaithfulnessError(f"batch_size must be a positive int; got {batch_size!r}")


def importance_order(maps: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """Pixel indices (row-major) of maps (N,H,W) by decreasing value, int64
    (N,H*W), on the maps' device. Ties: seed=None keeps the lower pixel index
    first (a stable sort, raster order); an int breaks them by a uniformly
    random permutation per image from a private CPU generator seeded with
    `seed` (the same order on every device). Image i's order depends on the
    seed and on i, not on the other maps' values."""
    n = maps.shape[0]
    flat = maps.detach().reshape(n, -1)
    key = -flat.double() if flat.is_floating_point() else -flat.long()
    if seed is None:
        return torch.argsort(key, dim=1, stable=True)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.argsort(torch.rand(flat.shape, generator=gen, dtype=torch.float64), dim=1).to(flat.device)
    # a stable sort of the randomly permuted values: equal values keep their random order
    return perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, stable=True))


MODES = ("deletion", "insertion")


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                       targets: torch.Tensor, *, steps: int = 16, baseline: str = "blur",
                       device: torch.device | str | None = None, batch_size: int = 256,
                       blur_sigma: float = 5.0, seed: int | None = 0) -> FaithfulnessResult:
    """Deletion and insertion curves and AUCs (see the module docstring).

    model:   a classifier returning logits (B,C) for inputs (B,3,H,W); put in
             eval mode for the call (each module's mode restored afterwards,
             also on errors), run under no_grad, parameters never written.
    images:  float (N,3,H,W) NCHW, normalised (normalize(to_float(uint8))).
    maps:    (N,H,W) importance per pixel, any real scale (only the order
             matters; ties broken as `importance_order` does with `seed`).
    targets: integer (N,) class per image (e.g. the class the map explains).
    steps:   number of equal pixel chunks (curves have steps+1 points).
    baseline: "blur" (Gaussian blur, sigma `blur_sigma` px) or "mean" (zeros).
    device:  where to run; default the model's (first parameter's) device.
             The model is not moved: its parameters must already be there.
    batch_size: perturbed inputs per forward pass.
    seed:    tie-breaking between equal map values: an int = a seeded random
             order, None = raster order (lower pixel index first).
    Returns a FaithfulnessResult (CPU float32 tensors).
    """
    curves, fractions = perturbation_curves(model, images, maps, targets, MODES, steps=steps, baseline=baseline,
                                            device=device, batch_size=batch_size, blur_sigma=blur_sigma, seed=seed)
    deletion, insertion = curves["deletion"], curves["insertion"]
    return FaithfulnessResult(
        deletion=deletion, insertion=insertion, fractions=fractions,
        deletion_auc=trapezoid_auc(deletion, fractions), insertion_auc=trapezoid_auc(insertion, fractions),
        targets=targets.detach().to("cpu", torch.long), baseline=baseline)


def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                        modes: tuple[str, ...] = MODES, *, steps: int = 16, baseline: str = "blur",
                        device: torch.device | str | None = None, batch_size: int = 256,
                        blur_sigma: float = 5.0, seed: int | None = 0,
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The curves of `modes` (a subset of MODES, in any order) as
    deletion_insertion computes them (same arguments): ({mode: float32 CPU
    (N, steps+1)}, fractions float32 (steps+1,)). The perturbed inputs of all
    modes share the forward batches, image by image, mode by mode."""
    _check_inputs(images, maps, targets, steps, batch_size)
    if baseline not in BASELINES:
        raise FaithfulnessError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(MODES):
        raise FaithfulnessError(f"modes must be distinct names out of {', '.join(MODES)}; got {modes!r}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None
                                                           else images.device)
    if param is not None and (param.device.type != dev.type or (
            dev.index is not None and param.device.index not in (None, dev.index))):
        raise FaithfulnessError(f"the model is on {param.device} but device={dev}; move the model "
                                f"first (model.to(device)) or pass device={param.device}")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    n, _, h, w = images.shape
    npix = h * w
    counts = torch.tensor([s * npix // steps for s in range(steps + 1)], dtype=torch.long, device=dev)
    fractions = counts.double().div(npix).float().cpu()
    is_insertion = torch.tensor([m == "insertion" for m in modes], device=dev)

    with torch.no_grad(), eval_mode(model):
        x = images.detach().to(device=dev, dtype=dtype)
        base = baseline_images(x, baseline, blur_sigma=blur_sigma)
        order = importance_order(maps.detach().to(dev), seed)     # (N,P) most important first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(npix, device=dev).expand(n, npix))
        tgt = targets.detach().to(device=dev, dtype=torch.long)

        per_image = len(modes) * (steps + 1)   # [modes[0] s=0..S, modes[1] s=0..S, ...]
        total = n * per_image
        probs = torch.empty(total, dtype=torch.float32, device=dev)
        for part in batch_slices(total, batch_size):
            j = torch.arange(part.start, part.stop, device=dev)
            img, rest = j // per_image, j % per_image
            insertion, s = is_insertion[rest // (steps + 1)], rest % (steps + 1)
            changed = rank[img] < counts[s].unsqueeze(1)            # (B,P): top-k_s pixels
            take_base = (changed != insertion.unsqueeze(1)).view(-1, 1, h, w)
            batch = torch.where(take_base, base[img], x[img])
            logits = model(batch)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != j.numel():
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise FaithfulnessError(f"the model must return logits (B,C); got {shape}")
            t = tgt[img]
            if part.start == 0 and not bool(((tgt >= 0) & (tgt < logits.shape[1])).all()):
                bad = tgt[(tgt < 0) | (tgt >= logits.shape[1])][0].item()
                raise FaithfulnessError(f"target class {bad} is out of range for {logits.shape[1]} classes")
            p = torch.softmax(logits.float(), dim=1)
            probs[j] = p.gather(1, t.view(-1, 1)).squeeze(1)

    curves = probs.view(n, len(modes), steps + 1).cpu()
    return {m: curves[:, i].contiguous() for i, m in enumerate(modes)}, fractions


class PixelPerturbation(Metric):
    """Area under a deletion or insertion curve (Petsiuk et al. 2018) of the
    maps an explanation method gives: a Metric whose `mode` says which
    curve. Settings as deletion_insertion's; calling it scores one batch:

        metric(model, images, targets, explain_func=f)  # maps = f(model, images, targets)
        metric(model, images, targets, maps=maps)        # maps computed already

    images float (N,3,H,W) normalised; targets int (N,); maps (N,H,W), any
    real scale (only the order matters; ties broken with `seed`). Returns the
    per-image AUCs, float32 CPU (N,) on [0, 1]; `curves` gives the curves.
    explain_func is called outside no_grad (gradient methods need autograd),
    before the model is put in eval mode for the perturbed forwards.
    """
    mode: ClassVar[str]

    def __init__(self, *, steps: int = 16, baseline: str = "blur", device: torch.device | str | None = None,
                 batch_size: int = 256, blur_sigma: float = 5.0, seed: int | None = 0) -> None:
        self.settings = dict(steps=steps, baseline=baseline, device=device, batch_size=batch_size,
                             blur_sigma=blur_sigma, seed=seed)

    def curves(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
               explain_func: ExplainFunc | None = None,
               maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(curves float32 (N, steps+1), fractions float32 (steps+1,)) on the CPU."""
        if (explain_func is None) == (maps is None):
            raise FaithfulnessError(f"{self.name} needs exactly one of explain_func (a callable "
                                    f"(model, x, targets) -> maps (N,H,W)) and maps")
        if explain_func is not None:
            if not callable(explain_func):
                raise FaithfulnessError(f"explain_func must be callable; got {type(explain_func).__name__}")
            maps = explain_func(model, images, targets)
            if not isinstance(maps, torch.Tensor):
                raise FaithfulnessError(f"explain_func must return a tensor (N,H,W); got {type(maps).__name__}")
        curves, fractions = perturbation_curves(model, images, maps, targets, (self.mode,), **self.settings)
        return curves[self.mode], fractions

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                 explain_func: ExplainFunc | None = None, maps: torch.Tensor | None = None) -> torch.Tensor:
        curves, fractions = self.curves(model, images, targets, explain_func=explain_func, maps=maps)
        return trapezoid_auc(curves, fractions)


class Deletion(PixelPerturbation):
    """Deletion AUC: the target probability falls fast when the most
    important pixels go first, so a faithful map scores low."""
    name = "deletion_auc"
    mode = "deletion"
    higher_is_better = False


class Insertion(PixelPerturbation):
    """Insertion AUC: the target probability rises fast when the most
    important pixels come back first, so a faithful map scores high."""
    name = "insertion_auc"
    mode = "insertion"
    higher_is_better = True
