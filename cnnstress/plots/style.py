"""The look shared by every figure: palette, model colours, font sizes,
colormaps, axes helpers and the CAM overlay (saving: cnnstress.plots.files).

Every plotting function draws into the caller's `ax` / `axes` when given
(and then returns the caller's figure), or makes its own figure with
constrained layout. `matplotlib.pyplot` is used only for `plt.subplots` and
`plt.close`, so the caller chooses the backend (the CLI uses Agg).

Colours come from the Okabe-Ito palette (colour-blind friendly); each model
keeps one colour across all figures: baseline blue, improved vermillion.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..registry import BASELINE, IMPROVED

# Okabe-Ito palette (Okabe & Ito 2008), safe for the common colour-vision deficiencies.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
BASELINE_COLOR = OKABE_ITO["blue"]
IMPROVED_COLOR = OKABE_ITO["vermillion"]
MODEL_COLORS: dict[str, str] = {BASELINE: BASELINE_COLOR, IMPROVED: IMPROVED_COLOR}
# Colours for models with other names, in order of appearance.
EXTRA_MODEL_COLORS = (OKABE_ITO["bluish_green"], OKABE_ITO["orange"], OKABE_ITO["reddish_purple"],
                      OKABE_ITO["sky_blue"], OKABE_ITO["black"])
TRUE_CLASS_COLOR = OKABE_ITO["bluish_green"]   # highlighted bar of the true class
OTHER_CLASS_COLOR = "#9E9E9E"                  # the other top-3 bars
CAM_COLORMAP = "jet"                           # Grad-CAM convention; same map for heatmap and overlay
CONFUSION_COLORMAP = "Blues"

ROBUSTNESS_COLORMAP = "viridis"
DIFFERENCE_COLORMAP = "RdBu"     # diverging: blue = improved is better, red = worse

TITLE_SIZE = 12
LABEL_SIZE = 10
TICK_SIZE = 9
TEXT_SIZE = 9


def model_color(name: str, index: int = 0) -> str:
    """The colour of model `name`; unknown names get a fixed extra colour by `index`."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    return EXTRA_MODEL_COLORS[index % len(EXTRA_MODEL_COLORS)]


def model_colors(names: Sequence[str]) -> list[str]:
    """One colour per name: known models their own, the others the extra colours in order."""
    colors, extra = [], 0
    for name in names:
        if name in MODEL_COLORS:
            colors.append(MODEL_COLORS[name])
        else:
            colors.append(model_color(name, extra))
            extra += 1
    return colors


def pct(fraction: float, decimals: int = 1) -> str:
    """0.973 -> '97.3%'; 0.9 -> '90%' (trailing zeros dropped)."""
    text = f"{100.0 * float(fraction):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "%"


def new_axes(nrows: int, ncols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, np.ndarray]:
    """A new constrained-layout figure and its nrows x ncols axes, flattened row-major."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kw)
    return fig, axes.ravel()


def given_axes(axes: Any, count: int, what: str) -> list:
    """The caller's `axes` flattened; ValueError unless there are `count` of them."""
    flat = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(flat) != count:
        raise ValueError(f"{what} needs {count} axes, got {len(flat)}")
    return flat


def style_axes(ax, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None) -> None:
    """Title, axis labels and tick labels in the shared font sizes (None leaves one unset)."""
    if title is not None:
        ax.set_title(title, fontsize=TITLE_SIZE)
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)


def empty_message(ax, text: str) -> None:
    """`text` centred in `ax`, for a panel with nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=LABEL_SIZE, color="#555555",
            transform=ax.transAxes, wrap=True)


def as_hwc(image: Any) -> np.ndarray:
    """An image as HWC (CHW transposed), or HW for one channel."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))          # CHW -> HWC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return img


def show_image(ax, img: np.ndarray, **kw: Any):
    """`img` (HWC, or HW in grey) drawn pixel for pixel, without ticks; returns the AxesImage."""
    if img.ndim == 2:
        kw.setdefault("cmap", "gray")
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def show_overlay(ax, img: np.ndarray, cam: Any, cmap: str = CAM_COLORMAP):
    """`cam` ((H, W) on [0, 1]) colour-mapped with `cmap`, blended onto `img`
    (HWC) by cnnstress.xai.cam.overlay and drawn into `ax`."""
    from ..xai.cam import overlay   # deferred: xai imports torch

    return show_image(ax, np.clip(overlay(img, np.asarray(cam, dtype=np.float32), colormap=cmap), 0.0, 1.0))


def close(fig: Figure) -> None:
    """Release a figure made here (pyplot keeps a reference until closed)."""
    plt.close(fig)

