"""CIFAR-10-C common corruptions, generated from clean images (no download).

Re-implements Hendrycks & Dietterich (2019), "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", with the CIFAR
parameters of the authors' generator (hendrycks/robustness,
ImageNet-C/create_c/make_cifar_c.py), batched and seeded:

    x = corrupt(images, "fog", severity=3, seed=0)

`images` is a uint8 torch tensor (N, 3, 32, 32), NCHW, RGB, values 0..255;
the result has the same shape, layout and dtype. Severity 0 is an unchanged
copy, 1..5 are the CIFAR-10-C levels.

Faithfulness. Each corruption follows the authors' arithmetic step by step
(float64 or float32 where they used each, their clipping, and their final
`np.uint8(x)` which *truncates* the 0..255 float). The library calls they
made are replaced by equivalents from numpy, OpenCV and Pillow (scipy and
scikit-image are not runtime dependencies of this package):

* skimage/scipy Gaussian filter, scipy `zoom(order=1)` and
  `map_coordinates(order=1, mode='reflect')` -> re-implemented below with the
  same kernel radius, boundary modes and sample grid (tests compare them with
  scipy when it is installed);
* skimage `rgb2hsv`/`hsv2rgb` -> the same formulas, vectorised;
* ImageMagick (Wand) motion blur -> ImageMagick's own MotionBlurImage
  algorithm (as the `imagecorruptions` package re-implements it): a one-sided
  line kernel of width 2*radius+1 with Gaussian(sigma) weights, sampled at
  integer offsets rounded along the angle, edge pixels replicated; the result
  goes through ImageMagick's 8-bit PNG output as the authors' did (a 16-bit
  quantum rounded half up, then scaled to 8 bits: see _imagemagick_8bit);
* PIL BOX resize (pixelate) and PIL JPEG (quality c, PIL's default 4:2:0
  chroma subsampling) -> the same Pillow calls; frost's cv2.imread and
  cv2.resize -> the same OpenCV calls, on the authors' five photographs
  shipped as package data (cnnstress.robustness.frost).

Deliberate deviations, all documented where they happen: random numbers come
from a numpy Generator seeded from (seed, name, severity) and are drawn for
the whole batch at once, so an image's noise depends on its position in the
batch and on the batch size (same inputs -> same outputs; a different
batching gives another, equally valid, draw). Glass blur reproduces what the
authors' "swap" line actually does in numpy (a copy, see _glass_shuffle).
Contrast takes the channel mean from the exact integer sum rather than numpy's
float mean, so that a constant image is not truncated one level down (see
_contrast).

Speed. Work is done in slices of _SLICE images (random draws are still made
for the whole batch first, in the authors' order), which keeps temporaries in
cache and changes no pixel. corrupt_cells makes many (type, severity) cells in
worker processes, again with the same pixels as corrupt():

    for x in corrupt_cells(images, [("fog", 1), ("fog", 2)], seed=0, workers=4): ...
"""
from __future__ import annotations

import io
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from ..errors import CnnstressError, ConfigError
from ..runtime import usable_cpus
from .frost import frost_overlays

__all__ = ["CORRUPTIONS", "FAMILIES", "SEVERITIES", "corrupt", "corrupt_cells", "resolve_workers",
           "severity_parameter"]

IMSIZE = 32  # the CIFAR parameters (kernel sizes, shuffle ranges, fog map) assume 32x32
SEVERITIES = (1, 2, 3, 4, 5)

# CIFAR parameters from make_cifar_c.py, severity 1..5.
_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, .08, .09, .10),                       # std on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),                               # Poisson photons per unit
    "impulse_noise": (.01, .02, .03, .05, .07),                          # s&p amount per value
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, max_delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),         # radius, sigma (make_cifar_c.py)
    # The authors' np.arange(1, 1.06, 0.01) has 7 elements (1.00..1.06): float
    # rounding puts 1.06 just below the stop. Kept as theirs: 7, 12, 16, 21, 26 zooms.
    "zoom_blur": tuple(tuple(float(z) for z in np.arange(1, stop, 0.01))
                       for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),  # loc, scale, zoom, threshold, blur radius, blur sigma, blend
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)),          # strength, plasma wibble decay
    "brightness": (.05, .1, .15, .2, .3),                                # added to HSV value
    "contrast": (.75, .5, .4, .3, 0.15),                                 # factor about the channel mean
    "elastic_transform": ((IMSIZE * 0, IMSIZE * 0, IMSIZE * 0.08), (IMSIZE * 0.05, IMSIZE * 0.2, IMSIZE * 0.07),
                          (IMSIZE * 0.08, IMSIZE * 0.06, IMSIZE * 0.06), (IMSIZE * 0.1, IMSIZE * 0.04, IMSIZE * 0.05),
                          (IMSIZE * 0.1, IMSIZE * 0.03, IMSIZE * 0.03)),  # alpha, sigma, affine (pixels)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                           # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),                            # JPEG quality
}

# Standard CIFAR-10-C order (noise, blur, weather, digital), as make_cifar_c.py and RobustBench list them.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
FAMILIES: dict[str, str] = {
    **dict.fromkeys(("gaussian_noise", "shot_noise", "impulse_noise"), "noise"),
    **dict.fromkeys(("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"), "blur"),
    **dict.fromkeys(("snow", "frost", "fog", "brightness"), "weather"),
    **dict.fromkeys(("contrast", "elastic_transform", "pixelate", "jpeg_compression"), "digital"),
}


# --- public API ---------------------------------------------------------------

def _check(name: str, severity: int) -> None:
    if not isinstance(name, str) or name not in _PARAMS:
        raise ConfigError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise ConfigError(f"corruption severity must be an integer 0..5 (0 = clean), got {severity!r}")


def severity_parameter(name: str, severity: int) -> object:
    """The CIFAR-10-C parameter of `name` at `severity` (1..5) as used here:
    a number or a tuple, laid out as in make_cifar_c.py (see _PARAMS).
    Severity 0 (clean) has no parameter and returns None."""
    _check(name, severity)
    return None if severity == 0 else _PARAMS[name][severity - 1]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply CIFAR-10-C corruption `name` at `severity` to a batch.

    images: uint8 tensor (N, 3, 32, 32), NCHW, RGB, 0..255, any device (the
    work is done on CPU with numpy/OpenCV/Pillow; the result is returned on
    the input's device). Other sizes are refused with a ValueError: the CIFAR
    parameters are in pixels of a 32x32 image and several steps (glass-blur
    shuffle range, fog map, elastic affine) are defined for that size only.
    Returns a new uint8 tensor (N, 3, 32, 32), NCHW, 0..255; float results
    are clipped to [0, 255] and truncated to uint8 as the authors' np.uint8.

    severity 0 returns an unchanged copy. The output is a deterministic
    function of (images, name, severity, seed): randomness comes only from a
    numpy Generator seeded with (seed, crc32(name), severity), drawn for the
    whole batch at once (so an image's draw depends on its batch position).
    Raises ConfigError for an unknown name, a severity outside 0..5 or a
    negative seed.
    """
    _check(name, severity)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"corruption seed must be a non-negative integer, got {seed!r}")
    _check_images(images)
    if severity == 0 or images.shape[0] == 0:
        return images.clone()
    return torch.from_numpy(_corrupt_nhwc(_to_nhwc(images), name, severity, seed)).to(images.device)


def resolve_workers(workers: int | None, n_images: int, n_cells: int) -> int:
    """The number of processes corrupt_cells uses: `workers` when given (>= 1),
    else the CPUs this process may run on, capped at the number of cells, and
    1 (in-process) for jobs under _MIN_PARALLEL_WORK image-cells, where
    starting the workers (each imports torch, ~2 s) would cost more than the
    whole job (about 0.1-0.15 ms per image and cell on one core)."""
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ConfigError(f"corruption workers must be an integer >= 1 or None (auto), got {workers!r}")
        return int(workers)
    if n_images * n_cells < _MIN_PARALLEL_WORK:
        return 1
    return max(1, min(usable_cpus(), n_cells))


def corrupt_cells(images: torch.Tensor, cells: Sequence[tuple[str, int]], seed: int = 0, *,
                  workers: int | None = None, chunk: int = 1000) -> Iterator[torch.Tensor]:
    """corrupt(images, name, severity, seed) for every (name, severity) in
    `cells`, yielded one tensor at a time in the order of `cells`, each
    bit-identical to that corrupt() call whatever `workers` and `chunk` are.

    images: uint8 (N, 3, 32, 32) NCHW as for corrupt(); results are uint8
    (N, 3, 32, 32) CPU tensors. workers: processes to use (see
    resolve_workers; None = auto, 1 = in this process, no pool). With more
    than one, a spawn-started process pool works through all cells from the
    start, so later cells are generated while the caller uses earlier ones
    (evaluates a model on them). A cell whose corruption draws random numbers
    is one task: its draws are made for the whole batch at once, as corrupt()
    does, so it cannot be split without changing them. The others (blurs,
    digital and colour ones without randomness) act on each image alone and
    are split into tasks of `chunk` images, which balances the load (zoom
    blur at severity 5 is the costliest cell). Every cell is validated
    before any work starts (ConfigError as for corrupt()). Spawned workers
    re-import the caller's main script, so a script must keep its top-level
    work under `if __name__ == "__main__":` (notebooks and `python -m
    cnnstress` need nothing); a worker that dies raises CnnstressError.
    """
    cells = [(name, severity) for name, severity in cells]
    for name, severity in cells:
        _check(name, severity)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"corruption seed must be a non-negative integer, got {seed!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"corruption chunk must be an integer >= 1, got {chunk!r}")
    _check_images(images)
    images = images.detach().cpu()
    workers = resolve_workers(workers, int(images.shape[0]), len(cells))
    return _generate(images, cells, int(seed), workers, int(chunk))


def _generate(images: torch.Tensor, cells: list[tuple[str, int]], seed: int, workers: int,
              chunk: int) -> Iterator[torch.Tensor]:
    """corrupt_cells' generator (arguments validated); the pool starts at the first next()."""
    n = int(images.shape[0])
    if workers == 1 or n == 0:
        for name, severity in cells:
            yield corrupt(images, name, severity, seed)
        return
    x = _to_nhwc(images)
    # spawn, not fork: the parent may hold CUDA and OpenMP/OpenCV thread pools,
    # which a forked child inherits in an unusable state.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(x,))
    try:
        tasks = []
        for name, severity in cells:
            if severity == 0:
                tasks.append(None)
                continue
            step = n if name in _RANDOM else chunk
            tasks.append([pool.submit(_worker_task, name, severity, seed, start, min(start + step, n))
                          for start in range(0, n, step)])
        for futures in tasks:
            if futures is None:
                yield images.clone()
            else:
                yield torch.from_numpy(np.concatenate([f.result() for f in futures]))
    except BrokenProcessPool as exc:
        raise CnnstressError(
            "a corruption worker process died: out of memory, or the main script could not be re-imported "
            "(spawned workers import it: put its top-level code under if __name__ == '__main__'); "
            "set corruption_workers=1 to corrupt in this process") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- batch plumbing and the worker processes ---------------------------------------

_MIN_PARALLEL_WORK = 20_000   # image-cells below which resolve_workers(None, ...) stays in-process
_SLICE = 64  # images per pass of a per-image corruption: 64 x 32x32x3 float64 = 1.5 MB, within a 2 MB L2

# Corruptions that draw random numbers (their _FUNCS use rng); the others are
# per-image functions, so any split of the batch gives the same pixels.
_RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost",
                     "fog", "elastic_transform"})

_WORKER_IMAGES: np.ndarray | None = None  # this worker's copy of the batch (NHWC uint8)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, IMSIZE, IMSIZE):
        raise ValueError(f"images must be uint8 (N, 3, {IMSIZE}, {IMSIZE}) NCHW, got {images.dtype} "
                         f"{tuple(images.shape)}: the CIFAR-10-C parameters are defined for 32x32 RGB")


def _to_nhwc(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.detach().cpu().permute(0, 2, 3, 1).numpy())


def _corrupt_nhwc(x: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """corrupt()'s work on a validated uint8 NHWC batch (severity >= 1, N >= 1);
    returns uint8 NCHW, contiguous."""
    if name not in _RANDOM and x.shape[0] > _SLICE:
        # Per-image corruptions in slices: the same pixels, 1.2-2x faster on
        # large batches than one pass whose float64 temporaries spill the cache.
        return np.concatenate([_corrupt_nhwc(x[i:i + _SLICE], name, severity, seed)
                               for i in range(0, x.shape[0], _SLICE)])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity)]))
    out = _FUNCS[name](x, _PARAMS[name][severity - 1], rng)
    if out.dtype != np.uint8:
        # np.uint8(x) in make_cifar_c.py: truncation toward zero after the clip to [0, 255].
        out = np.clip(out, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _init_worker(x: np.ndarray) -> None:
    global _WORKER_IMAGES
    _WORKER_IMAGES = x
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _worker_task(name: str, severity: int, seed: int, start: int, stop: int) -> np.ndarray:
    return _corrupt_nhwc(_WORKER_IMAGES[start:stop].copy(), name, severity, seed)  # a copy, as corrupt() passes


# --- shared helpers (scipy / skimage / ImageMagick equivalents) ----------------

def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric extension (d c b a | a b c d | d c b a), the
    scipy.ndimage 'reflect' mode and cv2.BORDER_REFLECT, for any integer index."""
    idx = np.mod(idx, 2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx)


def _gaussian_filter(x: np.ndarray, sigma: float, mode: str, truncate: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter over axes 1 and 2 only (H, W of a
    (N, H, W[, C]) batch), as skimage.filters.gaussian(multichannel=True)
    calls it: kernel radius int(truncate*sigma + 0.5), mode 'nearest' (edge
    replicate) or 'reflect' (half-sample symmetric). Returns float64."""
    x = np.asarray(x, dtype=np.float64)
    if sigma <= 1e-15:  # scipy skips such axes: identity
        return x.copy()
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / float(sigma) ** 2 * t ** 2)
    w /= w.sum()
    for axis in (1, 2):
        n = x.shape[axis]
        idx = np.arange(-radius, n + radius)
        idx = np.clip(idx, 0, n - 1) if mode == "nearest" else _reflect_index(idx, n)
        padded = np.take(x, idx, axis=axis)
        acc = np.zeros_like(x)
        for k in range(2 * radius + 1):
            acc += w[k] * np.take(padded, np.arange(k, k + n), axis=axis)
        x = acc
    return x


def _linear_axis(x: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of x along `axis` at in-range coordinates."""
    n = x.shape[axis]
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    f = coords - i0
    shape = [1] * x.ndim
    shape[axis] = -1
    f = f.reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - f) + np.take(x, i1, axis=axis) * f


def _zoom_linear(x: np.ndarray, factor: float) -> np.ndarray:
    """scipy.ndimage.zoom(x, (1, factor, factor[, 1]), order=1) for a
    (N, h, w[, C]) batch: output size round(h*factor); output index o samples
    input coordinate o*(h-1)/(out-1) (scipy's default grid_mode=False, i.e.
    align_corners). Computed in float64, returned in x's dtype like scipy."""
    y = np.asarray(x, dtype=np.float64)
    for axis in (1, 2):
        n = y.shape[axis]
        m = int(round(n * factor))
        coords = np.arange(m) * ((n - 1) / (m - 1)) if m > 1 else np.zeros(1)
        y = _linear_axis(y, coords, axis)
    return y.astype(x.dtype)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c.clipped_zoom on a (N, h, h[, C]) batch: centre crop of
    ceil(h/factor), zoom by factor, trim back to h x h."""
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    z = _zoom_linear(x[:, top:top + ch, top:top + ch], factor)
    trim = (z.shape[1] - h) // 2
    return z[:, trim:trim + h, trim:trim + h]


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick MotionBlurImage on a float (N, H, W, C) batch, one angle
    (degrees) per image; what Wand's motion_blur did in make_cifar_c.py.

    Kernel: width = 2*ceil(radius)+1 taps, weight_i ∝ exp(-i^2 / (2 sigma^2)),
    i = 0..width-1, normalised (one-sided: the blur trails in one direction).
    Tap i reads pixel (y + ceil(i*sin(a) - 0.5), x + ceil(i*cos(a) - 0.5)),
    edge pixels replicated (ImageMagick's default virtual pixels). Same
    construction as the `imagecorruptions` package's Wand-free motion blur.
    Returns float64, not rounded.
    """
    n, h, w = x.shape[:3]
    width = int(2 * np.ceil(radius) + 1)
    k = np.exp(-np.arange(width, dtype=np.float64) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    rad = np.deg2rad(np.asarray(angles, dtype=np.float64))
    px, py = width * np.sin(rad), width * np.cos(rad)      # ImageMagick's point.x, point.y
    hyp = np.hypot(px, py)
    ar = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        oy = np.ceil(i * px / hyp - 0.5).astype(np.int64)  # (N,)
        ox = np.ceil(i * py / hyp - 0.5).astype(np.int64)
        rows = np.clip(np.arange(h)[None, :] + oy[:, None], 0, h - 1)
        cols = np.clip(np.arange(w)[None, :] + ox[:, None], 0, w - 1)
        out += k[i] * x[ar, rows[:, :, None], cols[:, None, :]]
    return out


# ImageMagick's 8-bit PNG output depends on its version and build (checked in its
# sources and against 6.9.11-60, Debian 12's, in both builds):
# - before 6.9.10-69 / 7.0.8-69 (October 2019), and in every HDRI build (IM7's
#   default) since: round to nearest, half up;
# - Q16 non-HDRI builds since then (Debian's and Ubuntu's `imagemagick`): the PNG
#   writer's SetImageDepth goes through a ScaleQuantumToAny that lost its +0.5,
#   so the 16-bit value is truncated and about half the pixels come out one lower.
# CIFAR-10-C was released with the ICLR 2019 paper, before that change, so it was
# made with the rounding kind; its numbers (RobustBench's) are the ones this suite
# is read against. True reproduces make_cifar_c.py run today on a non-HDRI build.
_IM_TRUNCATES = False


def _imagemagick_8bit(x: np.ndarray) -> np.ndarray:
    """A float image on the 0..255 scale as ImageMagick (Q16) writes it to an
    8-bit PNG, which make_cifar_c.py decodes: uint8, same shape.

    Two steps, both ImageMagick's: MotionBlurImage stores the blurred value
    (255-scale x times 257, the Q16 quantum of x) with ClampToQuantum, i.e.
    q = floor(257x + 0.5) clamped to 0..65535; the PNG writer then scales q to
    8 bits: floor(q/257 + 1/2) (ScaleQuantumToChar's ((q+128) - ((q+128) >> 8))
    >> 8 is the same map), or floor(q/257) where _IM_TRUNCATES. The 16-bit step
    is not redundant: it absorbs float error, so a blur of a flat patch that
    lands a hair below an integer keeps that integer under either rule.
    """
    q = np.clip(np.floor(np.asarray(x, dtype=np.float64) * 257.0 + 0.5), 0, 65535).astype(np.int64)
    return (q // 257 if _IM_TRUNCATES else (2 * q + 257) // 514).astype(np.uint8)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.disk: normalised disk mask on a 17x17 grid (radius <= 8),
    anti-aliased by a 3x3 Gaussian of sigma alias_blur; float32."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    d = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    d /= np.sum(d)
    return cv2.GaussianBlur(d, ksize=ksize, sigmaX=alias_blur)


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """make_cifar_c.plasma_fractal (diamond-square) for n maps at once:
    (n, mapsize, mapsize) float64, each scaled to [0, 1]. Same update order
    and the authors' `wibble * uniform(-wibble, wibble)` perturbation."""
    assert mapsize & (mapsize - 1) == 0
    m = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]          # fill squares
        acc = corner + np.roll(corner, -1, axis=1)
        acc += np.roll(acc, -1, axis=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(acc)
        dr = m[:, half:mapsize:step, half:mapsize:step]         # fill diamonds
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on (..., 3) floats in [0, 1]; H, S, V in [0, 1]."""
    v = rgb.max(-1)
    delta = np.ptp(rgb, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        h = np.zeros_like(v)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        # skimage assigns red, then green, then blue: later wins on ties.
        h = np.where(r == v, (g - b) / delta, h)
        h = np.where(g == v, 2.0 + (b - r) / delta, h)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=-1)


def _hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb on (..., 3) floats in [0, 1]."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.astype(np.int64) % 6
    choices = [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = choices[0].copy()
    for i in range(1, 6):
        out = np.where((hi == i)[..., None], choices[i], out)
    return out


def _glass_shuffle(x: np.ndarray, delta: int, iterations: int, offsets: np.ndarray) -> np.ndarray:
    """The local pixel shuffle of make_cifar_c.glass_blur on a uint8
    (N, H, W, C) batch, in place; offsets: int (iterations, P, N, 2) of
    (dx, dy) in [-delta, delta), P = the number of visited positions.

    Visits h, w = H-delta .. delta+1 (descending) like the authors. Their line
    `x[h, w], x[h', w'] = x[h', w'], x[h, w]` does not swap numpy pixels: the
    right side holds views, so x[h, w] receives pixel (h', w') and then
    (h', w') is written back with that same value. The published CIFAR-10-C
    was made with that behaviour, so this copies pixel (h', w') into (h, w).
    """
    n, h_size, w_size = x.shape[:3]
    ar = np.arange(n)
    for it in range(iterations):
        p = 0
        for h in range(h_size - delta, delta, -1):
            for w in range(w_size - delta, delta, -1):
                dx, dy = offsets[it, p, :, 0], offsets[it, p, :, 1]
                x[:, h, w] = x[ar, h + dy, w + dx]
                p += 1
    return x


def _bilinear_reflect(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """scipy.ndimage.map_coordinates(order=1, mode='reflect') per image and
    channel: img (N, H, W, C), rows/cols (N, H, W) float sample coordinates;
    bilinear on the half-sample symmetric extension. Returns float64."""
    n, h, w = img.shape[:3]
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    ra, rb = _reflect_index(r0, h), _reflect_index(r0 + 1, h)
    ca, cb = _reflect_index(c0, w), _reflect_index(c0 + 1, w)
    ar = np.arange(n)[:, None, None]
    img = img.astype(np.float64)
    top = img[ar, ra, ca] * (1 - fc) + img[ar, ra, cb] * fc
    bottom = img[ar, rb, ca] * (1 - fc) + img[ar, rb, cb] * fc
    return top * (1 - fr) + bottom * fr


# --- the corruptions: (uint8 NHWC batch, parameter, rng) -> 0..255 NHWC ----------
# Float results are clipped and truncated by corrupt(); uint8 results pass as is.

def _gaussian_noise(x, c, rng):
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, c, rng):
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, c, rng):
    # skimage random_noise(mode='s&p', amount=c, salt_vs_pepper=0.5): every
    # array element (pixel channel) flips with probability c, to 1 or 0 evenly.
    x = x / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return np.clip(x, 0, 1) * 255


def _defocus_blur(x, c, rng):
    x = x / 255.0
    kernel = _disk(radius=c[0], alias_blur=c[1])
    nz = np.argwhere(kernel != 0)   # the 17x17 kernel is zero outside a small centred box:
    r = int(np.abs(nz - 8).max())   # cropping it changes no sum, only skips zeros
    kernel = kernel[8 - r:8 + r + 1, 8 - r:8 + r + 1]
    # cv2.filter2D per image (all 3 channels in one call), BORDER_REFLECT_101 as theirs.
    return np.clip(np.stack([cv2.filter2D(img, -1, kernel) for img in x]), 0, 1) * 255


def _in_slices(n: int, part: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """part(a, b) for consecutive slices of at most _SLICE of n images,
    concatenated: for corruptions whose random draws are made for the whole
    batch first, then applied image by image."""
    if n <= _SLICE:
        return part(0, n)
    return np.concatenate([part(a, min(a + _SLICE, n)) for a in range(0, n, _SLICE)])


def _glass_blur(x, c, rng):
    sigma, delta, iterations = c
    n, h, w = x.shape[:3]
    positions = len(range(h - delta, delta, -1)) * len(range(w - delta, delta, -1))
    # np.random.randint(-c[1], c[1], size=(2,)) -> (dx, dy) per position, here per image too;
    # the only draw, so making it before the first blur leaves the stream as it was.
    offsets = rng.integers(-delta, delta, size=(iterations, positions, n, 2))

    def part(a, b):
        blurred = _gaussian_filter(x[a:b] / 255.0, sigma, mode="nearest", truncate=4.0)
        xi = np.clip(blurred * 255, 0, 255).astype(np.uint8)  # their np.uint8(...): truncation
        xi = _glass_shuffle(xi, delta, iterations, offsets[:, :, a:b])
        return np.clip(_gaussian_filter(xi / 255.0, sigma, mode="nearest", truncate=4.0), 0, 1) * 255
    return _in_slices(n, part)


def _motion_blur_corruption(x, c, rng):
    angles = rng.uniform(-45, 45, size=x.shape[0])

    def part(a, b):
        return _imagemagick_8bit(_motion_blur(x[a:b].astype(np.float64), c[0], c[1], angles[a:b]))
    return _in_slices(x.shape[0], part)


def _zoom_blur(x, c, rng):
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for factor in c:
        out += _clipped_zoom(x, factor)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def _snow(x, c, rng):
    n, h, w = x.shape[:3]
    # Both draws first, in the authors' order (nothing between them is random).
    flakes = rng.normal(size=(n, h, w), loc=c[0], scale=c[1])
    angles = rng.uniform(-135, -45, size=n)

    def part(a, b):
        img = x[a:b].astype(np.float32) / 255.0
        layer = _clipped_zoom(flakes[a:b], c[2])
        layer[layer < c[3]] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # saved as an 8-bit 'L' PNG for Wand
        layer = _motion_blur(layer[..., None].astype(np.float64), c[4], c[5], angles[a:b])
        layer = _imagemagick_8bit(layer) / 255.0              # read back from ImageMagick's 8-bit PNG
        gray = (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]  # cv2 RGB2GRAY
        img = c[6] * img + (1 - c[6]) * np.maximum(img, gray * 1.5 + 0.5)
        return np.clip(img + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255
    return _in_slices(n, part)


def _frost(x, c, rng):
    overlays = frost_overlays()
    n = x.shape[0]
    heights = np.array([o.shape[0] for o in overlays])
    widths = np.array([o.shape[1] for o in overlays])
    # The authors' draws per image, here for the whole batch: a photograph (np.random.randint(5)),
    # then the crop's top and left (randint(0, size - 32): the last possible start is never drawn).
    which = rng.integers(0, len(overlays), size=n)
    tops = rng.integers(0, heights[which] - IMSIZE)
    lefts = rng.integers(0, widths[which] - IMSIZE)

    def part(a, b):
        crops = _frost_crops(overlays, which[a:b], tops[a:b], lefts[a:b])
        return np.clip(c[0] * x[a:b] + c[1] * crops, 0, 255)  # their np.array(x) is uint8 too: same float64 sums
    return _in_slices(n, part)


def _frost_crops(overlays: Sequence[np.ndarray], which: np.ndarray, tops: np.ndarray,
                 lefts: np.ndarray) -> np.ndarray:
    """The 32x32 crop at (tops[i], lefts[i]) of BGR overlay which[i], for
    every i, converted to RGB: uint8 (N, 32, 32, 3)."""
    out = np.empty((len(which), IMSIZE, IMSIZE, 3), dtype=np.uint8)
    r = np.arange(IMSIZE)
    for k, overlay in enumerate(overlays):
        sel = np.flatnonzero(which == k)
        if sel.size:
            rows = (tops[sel, None] + r)[:, :, None]
            cols = (lefts[sel, None] + r)[:, None, :]
            out[sel] = overlay[rows, cols][..., ::-1]  # BGR -> RGB
    return out


def _fog(x, c, rng):
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)  # per image, as x.max() on one image
    h, w = x.shape[1:3]
    x = x + c[0] * _plasma_fractal(rng, x.shape[0], mapsize=32, wibbledecay=c[1])[:, :h, :w, None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(x, c, rng):
    hsv = _rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(_hsv2rgb(hsv), 0, 1) * 255


def _contrast(x, c, rng):
    # Per image and channel, as np.mean(x, axis=(0, 1)) on one image, but from
    # the exact integer sum: numpy's float mean is a few ulp off for many
    # constant images, which the final truncation turns into a -1 (e.g. a flat
    # 100 would become 99). The exact mean leaves constant images unchanged.
    means = (x.sum(axis=(1, 2), keepdims=True, dtype=np.int64) / (x.shape[1] * x.shape[2])) / 255.0
    x = x / 255.0
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(x, c, rng):
    alpha, sigma, affine = c
    n, h, w = x.shape[:3]
    center = np.float32((h, w)) // 2
    size = min(h, w) // 3
    pts1 = np.float32([center + size, [center[0] + size, center[1] - size], center - size])
    # All three draws first, in the authors' order (the warp between them is not random).
    shifts = rng.uniform(-affine, affine, size=(n, 3, 2)).astype(np.float32)
    noise_x = rng.uniform(-1, 1, size=(n, h, w))
    noise_y = rng.uniform(-1, 1, size=(n, h, w))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")

    def part(a, b):
        img = x[a:b].astype(np.float32) / 255.0
        warped = np.stack([
            cv2.warpAffine(img[i], cv2.getAffineTransform(pts1, pts1 + shifts[a + i]), (w, h),
                           borderMode=cv2.BORDER_REFLECT_101)
            for i in range(b - a)])
        dx = (_gaussian_filter(noise_x[a:b], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        dy = (_gaussian_filter(noise_y[a:b], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        out = _bilinear_reflect(warped, yy[None] + dy, xx[None] + dx).astype(np.float32)
        return np.clip(out, 0, 1) * 255
    return _in_slices(n, part)


def _pixelate(x, c, rng):
    h, w = x.shape[1:3]
    small = (int(w * c), int(h * c))
    return np.stack([np.asarray(Image.fromarray(img).resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))
                     for img in x])


def _jpeg_compression(x, c, rng):
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=c)  # Pillow defaults, as the authors'
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


_FUNCS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}


def tables_consistent() -> bool:
    """Whether every corruption has a function, parameters and a family, and
    every randomised one exists (checked by the tests, not at import)."""
    return set(_FUNCS) == set(CORRUPTIONS) == set(_PARAMS) == set(FAMILIES) and _RANDOM <= set(_FUNCS)
