"""Similarity of two explanation maps: the scores the parameter-randomisation
check (cnnstress.xai.randomisation) uses to compare a map before and after
the model's weights are destroyed.

    spearman  rank correlation (average ranks for ties), signed or on |maps|
    ssim      structural similarity (Wang et al. 2004)

Both take two maps of one shape and return a float (1 = identical ranking /
structure). Implemented with numpy (float64), matching scipy.stats.spearmanr
and skimage.metrics.structural_similarity (checked by the tests), so neither
is a runtime dependency.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..arrays import as_numpy
from ..errors import SanityError

__all__ = ["abs_spearman", "spearman", "ssim"]


def _as_float64(a: object, what: str) -> np.ndarray:
    arr = as_numpy(a)
    real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not real:
        raise SanityError(f"{what} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise SanityError(f"{what} contains NaN or inf")
    return arr


def _pair(a: object, b: object, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float64(a, f"{what}: a"), _as_float64(b, f"{what}: b")
    if x.shape != y.shape:
        raise SanityError(f"{what} needs two maps of one shape; got {x.shape} and {y.shape}")
    return x, y


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array; tied values get the average of their ranks
    (scipy.stats.rankdata(method='average'))."""
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def spearman(a: object, b: object, *, absolute: bool = False) -> float:
    """Spearman rank correlation of two maps of one shape (any shape, e.g.
    (H,W); flattened), average ranks for ties, as scipy.stats.spearmanr.
    absolute=True ranks |a| and |b| (Adebayo et al.'s "absolute" variant; the
    same as signed for non-negative maps such as Grad-CAM's).
    Returns a float on [-1, 1], or nan when either map is constant (the rank
    correlation is undefined: e.g. an all-zero CAM) or has < 2 elements."""
    x, y = _pair(a, b, "spearman")
    x, y = x.ravel(), y.ravel()
    if absolute:
        x, y = np.abs(x), np.abs(y)
    if x.size < 2:
        return float("nan")
    rx, ry = _rankdata(x), _rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if den == 0:
        return float("nan")
    return float(np.clip((rx * ry).sum() / den, -1.0, 1.0))


def abs_spearman(a: object, b: object) -> float:
    """|Spearman| of |a| and |b|: how much of a map's ranking survives, a
    flipped ranking (rho near -1) counting as similar. The default
    similarity of the parameter-randomisation check (and the score its
    verdict reads). On [0, 1]; nan as `spearman`."""
    return abs(spearman(a, b, absolute=True))


SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
_SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)          # 5 -> an 11x11 window


def _gaussian_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, 1.5, truncate=3.5, mode='reflect')
    for 2-D img: separable, half-sample symmetric border (d c b a | a b c d),
    repeated for images smaller than the kernel radius (np.pad 'symmetric')."""
    r = kernel.size // 2
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        windows = sliding_window_view(np.pad(out, pad, mode="symmetric"), kernel.size, axis=axis)
        out = windows @ kernel
    return out


def ssim(a: object, b: object, *, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 2-D maps (H,W),
    as skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range):

        local means/variances/covariance with a Gaussian window (sigma 1.5,
        truncated at 3.5 sigma: radius 5, an 11x11 window; mirrored border),
        C1 = (0.01 R)^2, C2 = (0.03 R)^2,
        S = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
        result = mean of S after cropping 5 pixels (the window radius) from each border.

    data_range R: the value range of the maps (1.0 for maps on [0, 1]). None
    (where skimage raises for float input): the joint range max - min over
    both maps; if that is 0 the maps are one identical constant and 1.0 is
    returned.
    Small maps: skimage raises when a side is shorter than the 11-pixel
    window. Here the filtering itself works at any size (mirrored, repeatedly
    for sides < 6), and the 5-pixel border crop is applied only along axes of
    length >= 11; a shorter axis is averaged over all its positions. So 4x4
    to 10x10 maps get a defined value, and >= 11x11 maps match skimage.
    Returns a float on [-1, 1] (1 for identical maps). SSIM is not sign-aware:
    for a map a on [0, 1], ssim(a, -a) is high (~0.95: the luminance and
    structure terms are both negative), while ssim(a, 1 - a) is strongly
    negative; compare maps on one non-negative range, e.g. [0, 1].
    """
    x, y = _pair(a, b, "ssim")
    if x.ndim != 2:
        raise SanityError(f"ssim needs 2-D maps (H,W); got shape {x.shape}")
    if x.size == 0:
        raise SanityError("ssim got empty maps")
    if data_range is None:
        data_range = float(max(x.max(), y.max()) - min(x.min(), y.min()))
        if data_range == 0:
            return 1.0
    elif not np.isfinite(data_range) or data_range <= 0:
        raise SanityError(f"data_range must be a positive number; got {data_range}")
    r = _SSIM_RADIUS
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / SSIM_SIGMA) ** 2)
    k /= k.sum()
    ux, uy = _gaussian_filter(x, k), _gaussian_filter(y, k)
    uxx, uyy, uxy = _gaussian_filter(x * x, k), _gaussian_filter(y * y, k), _gaussian_filter(x * y, k)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    win = 2 * r + 1
    crop = tuple(slice(r, n - r) if n >= win else slice(None) for n in s.shape)
    return float(s[crop].mean(dtype=np.float64))
