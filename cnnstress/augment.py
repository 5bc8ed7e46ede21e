"""Batched augmentation on the training device, with per-sample randomness.

Each operation is split in two: drawing its random parameters for a batch
(``sample_*``) and applying given parameters (the plain functions), so the
tests can feed the same parameters to torchvision and compare. Parameters have
torchvision's meaning:

    RandomCrop(32, padding=4)  -> crop(x, top, left, padding)
    RandomHorizontalFlip(p)    -> hflip(x, mask)
    RandomRotation(degrees)    -> rotate(x, angles)  nearest, fill 0, about the centre
    ColorJitter(b, c, s, h)    -> adjust_brightness/contrast/saturation/hue
    RandomErasing(p, scale, ratio, value=0) -> erase(x, boxes), after Normalize

Images go in as uint8 NCHW (N,3,H,W) and come out as normalised float32.
One deviation from torchvision: ColorJitter's random order of its four
operations is drawn once per batch, not per image (the factors are per image);
per-image order would cost four times the work for no known benefit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import CIFAR_MEAN, CIFAR_STD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision


@dataclass(frozen=True)
class AugmentSpec:
    crop_padding: int = 0                       # pixels of zero padding before a random crop; 0 = off
    flip_p: float = 0.0                         # probability of a horizontal flip
    rotation_deg: float = 0.0                   # angle drawn uniformly in [-deg, +deg]; 0 = off
    brightness: float = 0.0                     # ColorJitter factors, torchvision meaning
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0                            # in [0, 0.5]
    erase_p: float = 0.0                        # RandomErasing probability; 0 = off
    erase_scale: tuple[float, float] = (0.02, 0.33)   # erased fraction of the image area
    erase_ratio: tuple[float, float] = (0.3, 3.3)     # aspect ratio range of the erased box

    @property
    def is_identity(self) -> bool:
        return self == AugmentSpec()


PRESETS = {
    "baseline": AugmentSpec(),
    "enhanced": AugmentSpec(crop_padding=4, flip_p=0.5, rotation_deg=15.0,
                            brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1,
                            erase_p=0.5),
}


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) 0..255 -> float32 on [0, 1]. Never writes to `x`
    (``x.float()`` returns `x` itself when it is already float32, so an
    in-place divide there would scale the caller's tensor)."""
    return x.to(torch.float32).div(255.0)


def normalize(x: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    """Normalised (N,3,H,W) -> float on [0, 1] (clamped)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp_(0.0, 1.0)


# --- geometry --------------------------------------------------------------

def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding` on every side, then cut an HxW window per image at
    (top[i], left[i]) of the padded image (0 <= top, left <= 2*padding)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top.view(n, 1) + torch.arange(h, device=x.device)
    cols = left.view(n, 1) + torch.arange(w, device=x.device)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where `mask` (N,) bool is true."""
    return torch.where(_per_sample(mask), x.flip(-1), x)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by angles[i] degrees about its
    centre; nearest neighbour, zeros outside (torchvision's defaults)."""
    n, _, h, w = x.shape
    rad = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(rad), torch.sin(rad)
    # torchvision's inverse affine matrix for rotate(angle): [[c, -s, 0], [s, c, 0]]
    # applied to pixel-centred coordinates, then scaled to grid_sample's [-1, 1].
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (N,2,2)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=x.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=x.device)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, h * w, 2)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2))
    grid = grid / torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    out = F.grid_sample(x.float(), grid.view(n, h, w, 2), mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


# --- colour (float images on [0, 1]) --------------------------------------

def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (_per_sample(factor) * x).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # For sector i, (r, g, b) is column i of this table.
    table = torch.stack([torch.stack((v, q, p, p, t, v), 1),
                         torch.stack((t, v, v, q, p, p), 1),
                         torch.stack((p, p, t, v, v, q), 1)], 1)  # (N,3,6,H,W)
    return table.gather(2, i.unsqueeze(1).unsqueeze(1).expand(-1, 3, 1, -1, -1)).squeeze(2)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift hue by factor[i] (a fraction of the colour wheel, in [-0.5, 0.5])."""
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


# --- erasing (on normalised images) ----------------------------------------

def erase(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Fill box (top, left, height, width) of each image with `value`; a box of
    height 0 leaves its image untouched. boxes: int (N,4)."""
    _, _, h, w = x.shape
    top, left, bh, bw = boxes.unbind(1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + bh).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + bw).view(-1, 1))
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)
    return x.masked_fill(mask, value)


def sample_erase_boxes(n: int, h: int, w: int, spec: AugmentSpec, gen: torch.Generator,
                       device: torch.device, attempts: int = 10) -> torch.Tensor:
    """RandomErasing's draw, vectorised: up to `attempts` tries per image for a
    box that fits; images not drawn (prob 1 - p) or with no fitting try get an
    empty box. Returns int64 (N,4) (top, left, height, width)."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, attempts, generator=gen, device=device) * (hi - lo) + lo

    area = uniform(*spec.erase_scale) * (h * w)
    aspect = torch.exp(uniform(math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1])))
    bh = torch.round(torch.sqrt(area * aspect)).long()
    bw = torch.round(torch.sqrt(area / aspect)).long()
    fits = (bh < h) & (bw < w)
    first = fits.float().argmax(1, keepdim=True)  # first fitting try (0 if none)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    use = fits.any(1) & (torch.rand(n, generator=gen, device=device) < spec.erase_p)
    # For an image with no fitting try, bh/bw are an oversized try: keep the
    # offset draw well defined (non-negative span) and return an all-zero box.
    top = (torch.rand(n, generator=gen, device=device) * (h - bh + 1).clamp(min=1)).long()
    left = (torch.rand(n, generator=gen, device=device) * (w - bw + 1).clamp(min=1)).long()
    zero = torch.zeros_like(bh)
    return torch.stack([torch.where(use, v, zero) for v in (top, left, bh, bw)], 1)


# --- the preset pipeline ---------------------------------------------------

def _factor(n: int, spread: float, gen: torch.Generator, device, centre: float = 1.0) -> torch.Tensor:
    lo = max(0.0, centre - spread) if centre == 1.0 else centre - spread
    return torch.rand(n, generator=gen, device=device) * (centre + spread - lo) + lo


def augment_batch(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator | None = None,
                  host_gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalised float32 (N,3,H,W), augmented per `spec`
    in torchvision's order: crop, flip, rotation, colour jitter, normalise,
    erasing. `gen` must live on x's device (it is unused for the identity);
    `host_gen`, a CPU generator, draws the jitter order so that a GPU run needs
    no host synchronisation (defaults to `gen` when that is on the CPU)."""
    out = to_float(x)
    n, _, h, w = out.shape
    dev = out.device
    if not spec.is_identity and gen is None:
        raise ValueError("augment_batch needs a torch.Generator on the images' device")
    if spec.crop_padding:
        top = torch.randint(0, 2 * spec.crop_padding + 1, (n,), generator=gen, device=dev)
        left = torch.randint(0, 2 * spec.crop_padding + 1, (n,), generator=gen, device=dev)
        out = crop(out, top, left, spec.crop_padding)
    if spec.flip_p:
        out = hflip(out, torch.rand(n, generator=gen, device=dev) < spec.flip_p)
    if spec.rotation_deg:
        angles = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * spec.rotation_deg
        out = rotate(out, angles)
    jitter = [(adjust_brightness, spec.brightness, 1.0), (adjust_contrast, spec.contrast, 1.0),
              (adjust_saturation, spec.saturation, 1.0), (adjust_hue, spec.hue, 0.0)]
    if any(spread for _, spread, _ in jitter):
        if host_gen is not None:
            order = torch.randperm(4, generator=host_gen)
        elif gen.device.type == "cpu":
            order = torch.randperm(4, generator=gen)
        else:  # a device generator can only draw on its device (costs one sync)
            order = torch.randperm(4, generator=gen, device=gen.device)
        for k in order.tolist():
            fn, spread, centre = jitter[k]
            if spread:
                out = fn(out, _factor(n, spread, gen, dev, centre))
    out = normalize(out)
    if spec.erase_p:
        out = erase(out, sample_erase_boxes(n, h, w, spec, gen, dev))
    return out


HOST_STREAM = 1  # SeedSequence spawn key of the host (jitter-order) stream
# Version of the augmentation draws, saved in checkpoints: a non-identity
# preset's checkpoint made with other draws is another model and must not be
# reused or resumed. 2: host stream from host_seed (1 replayed the device stream).
DRAWS_VERSION = 2


def host_seed(seed: int) -> int:
    """The seed of Augmenter's host generator, derived from `seed` through
    NumPy's SeedSequence (spawn key HOST_STREAM): a CPU generator seeded with
    `seed` itself would replay the device stream's draws on a CPU run (the
    jitter order would repeat the first crop offsets)."""
    ss = np.random.SeedSequence(int(seed) % 2**64, spawn_key=(HOST_STREAM,))
    return int(ss.generate_state(1, np.uint64)[0])


class Augmenter:
    """A preset bound to a device, with its own seeded generators, so that
    augmentation draws never touch the global RNG: `gen` (on the device,
    seeded with `seed`) for the per-image parameters and `host_gen` (CPU,
    seeded with host_seed(seed), a distinct stream) for the jitter order."""

    def __init__(self, spec: AugmentSpec | str, device: torch.device | str, seed: int) -> None:
        self.spec = PRESETS[spec] if isinstance(spec, str) else spec
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.host_gen = torch.Generator().manual_seed(host_seed(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return augment_batch(x, self.spec, self.gen, self.host_gen)
