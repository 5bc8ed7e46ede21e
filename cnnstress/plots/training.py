"""Training stage figures: loss and accuracy curves, sample images."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..data import CLASSES
from .style import TEXT_SIZE, as_hwc, empty_message, given_axes, model_colors, new_axes, show_image, style_axes


# --------------------------------------------------------------------------- training curves

def plot_training_curves(histories: Mapping[str, list[dict]], axes=None) -> Figure:
    """Loss and accuracy per epoch: one colour per model, train solid,
    validation dashed. `axes`: two axes (loss, accuracy)."""
    if axes is None:
        fig, (ax_loss, ax_acc) = new_axes(1, 2, (11, 4.2))
    else:
        ax_loss, ax_acc = given_axes(axes, 2, "plot_training_curves")
        fig = ax_loss.figure

    names = list(histories)
    colors = model_colors(names)
    drawn: list[tuple[str, str]] = []
    all_epochs: list[float] = []
    for name, color in zip(names, colors):
        rows = list(histories[name] or [])
        if not rows:
            continue
        epochs = np.array([r.get("epoch", i + 1) for i, r in enumerate(rows)], dtype=float)

        def col(key: str, scale: float = 1.0) -> np.ndarray:
            return np.array([np.nan if r.get(key) is None else scale * float(r[key]) for r in rows])

        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
            for split, style in (("train", "-"), ("val", "--")):
                ys = col(f"{split}_{key}", scale)
                if np.all(np.isnan(ys)):
                    continue
                ax.plot(epochs, ys, linestyle=style, color=color, marker="o" if split == "train" else "s",
                        markersize=4 if len(rows) > 3 else 7, markevery=max(1, len(rows) // 25), linewidth=1.8,
                        label=f"{name} {split}")
        drawn.append((name, color))
        all_epochs.extend(epochs.tolist())

    style_axes(ax_loss, "Loss", "Epoch", "Cross-entropy loss")
    style_axes(ax_acc, "Accuracy", "Epoch", "Accuracy (%)")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if not drawn:
        for ax in (ax_loss, ax_acc):
            empty_message(ax, "no training history")
        return fig
    lo, hi = min(all_epochs), max(all_epochs)
    if hi - lo < 2:                                    # one or two epochs: whole-number ticks, some margin
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(lo - 0.5, hi + 0.5)
            ax.set_xticks(sorted(set(int(e) for e in all_epochs)))

    handles = [Line2D([], [], color=c, linewidth=2.5, label=n) for n, c in drawn]
    handles += [Line2D([], [], color="#333333", linestyle="-", marker="o", markersize=4, label="train"),
                Line2D([], [], color="#333333", linestyle="--", marker="s", markersize=4, label="validation")]
    for ax, loc in ((ax_loss, "upper right"), (ax_acc, "lower right")):
        ax.legend(handles=handles, loc=loc, fontsize=TEXT_SIZE, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------- sample images

def plot_samples(images, labels, classes: Sequence[str] = CLASSES, n: int = 16, axes=None,
                 ncols: int = 8) -> Figure:
    """The first `n` images (uint8 NCHW or NHWC, array or tensor) in a grid,
    each titled with its class name. `axes`: one axis per image shown
    (min(n, len(images))), row-major."""
    imgs = np.asarray(images)
    labs = np.asarray(labels).reshape(-1)
    if imgs.ndim != 4:
        raise ValueError(f"images must be 4-D (N,C,H,W) or (N,H,W,C), got shape {tuple(imgs.shape)}")
    if labs.shape[0] != imgs.shape[0]:
        raise ValueError(f"{imgs.shape[0]} images but {labs.shape[0]} labels")
    count = min(int(n), imgs.shape[0])
    if axes is None:
        cols = max(1, min(ncols, count))
        rows = max(1, -(-count // cols))
        fig, flat = new_axes(rows, cols, (1.3 * cols, 1.45 * rows))
    else:
        flat = given_axes(axes, count, "plot_samples")
        fig = flat[0].figure if flat else plt.figure()
    for i, ax in enumerate(flat):
        if i >= count:
            ax.set_axis_off()
            continue
        c = int(labs[i])
        show_image(ax, as_hwc(imgs[i]))
        ax.set_title(classes[c] if 0 <= c < len(classes) else str(c), fontsize=TEXT_SIZE)
    if count == 0 and flat:
        empty_message(flat[0], "no images")
    return fig
