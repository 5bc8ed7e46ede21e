"""Failure stage figures: one high-confidence failure explained with Grad-CAM, or the note that there are none."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .style import (CAM_COLORMAP, LABEL_SIZE, OTHER_CLASS_COLOR, TEXT_SIZE, TICK_SIZE, TITLE_SIZE, TRUE_CLASS_COLOR, as_hwc,
                    empty_message, given_axes, new_axes, pct, show_image, show_overlay, style_axes)


def plot_failure_case(image, cam_pred, cam_true, *, true_name: str, pred_name: str, confidence: float,
                      top3: Sequence[tuple[str, float]], title: str | None = None, note: str | None = None,
                      axes=None, cmap: str = CAM_COLORMAP) -> Figure:
    """One misclassified image explained with Grad-CAM.

    Layout (2 x 3, row-major; also the order of `axes` when given):
    image | Grad-CAM predicted | overlay predicted
    top-3 probabilities | Grad-CAM true | overlay true
    `confidence` and the top-3 probabilities are fractions in [0, 1].
    """
    if axes is None:
        fig, flat = new_axes(2, 3, (10, 7))
        own_figure = True
    else:
        flat = given_axes(axes, 6, "plot_failure_case")
        fig = flat[0].figure
        own_figure = False
    ax_img, ax_pcam, ax_pover, ax_bar, ax_tcam, ax_tover = flat

    img = as_hwc(image)
    cam_pred = np.asarray(cam_pred, dtype=np.float32)
    cam_true = np.asarray(cam_true, dtype=np.float32)

    show_image(ax_img, img)
    img_title = f"True: {true_name}\nPredicted: {pred_name} ({pct(confidence)})"
    if not own_figure and (title or note):
        img_title = "\n".join(t for t in (title, note) if t) + "\n" + img_title
    ax_img.set_title(img_title, fontsize=TITLE_SIZE)

    cam_image = None
    for ax_cam, ax_over, cam, which, name in ((ax_pcam, ax_pover, cam_pred, "predicted", pred_name),
                                              (ax_tcam, ax_tover, cam_true, "true", true_name)):
        cam_image = show_image(ax_cam, cam, cmap=cmap, vmin=0.0, vmax=1.0)
        ax_cam.set_title(f"Grad-CAM for {which} ({name})", fontsize=TITLE_SIZE)
        if not np.any(cam > 0):
            # Grad-CAM keeps only positive evidence: a flat panel would look like a drawing fault.
            ax_cam.text(0.5, 0.5, f"all zero:\nno positive evidence\nfor {name} at this layer", ha="center",
                        va="center", fontsize=LABEL_SIZE, color="white", transform=ax_cam.transAxes)
        show_overlay(ax_over, img, cam, cmap=cmap)
        ax_over.set_title(f"Overlay: {which} ({name})", fontsize=TITLE_SIZE)
    cbar = fig.colorbar(cam_image, ax=[ax_pcam, ax_pover, ax_tcam, ax_tover], shrink=0.8, aspect=30)
    cbar.set_label("Grad-CAM importance (0 = none, 1 = most)", fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)

    _plot_top3(ax_bar, top3, true_name)

    if own_figure:
        heading = title or f"High-confidence failure: {true_name} predicted as {pred_name}"
        fig.suptitle(f"{heading}\nNote: {note}" if note else heading, fontsize=TITLE_SIZE + 2)
    return fig


def _plot_top3(ax, top3: Sequence[tuple[str, float]], true_name: str) -> None:
    rows = [(str(n), float(p)) for n, p in (top3 or [])]
    ax.set_title("Top-3 probabilities", fontsize=TITLE_SIZE)
    if not rows:
        ax.set_axis_off()
        empty_message(ax, "no probabilities given")
        return
    names = [n for n, _ in rows]
    probs = np.array([100.0 * p for _, p in rows])
    y = np.arange(len(rows))
    colors = [TRUE_CLASS_COLOR if n == true_name else OTHER_CLASS_COLOR for n in names]
    ax.barh(y, probs, color=colors, edgecolor="#333333", linewidth=0.6, height=0.6)
    ax.set_yticks(y, labels=[f"{n} (true)" if n == true_name else n for n in names])
    for label, name in zip(ax.get_yticklabels(), names):
        if name == true_name:
            label.set_fontweight("bold")
            label.set_color(TRUE_CLASS_COLOR)
    ax.invert_yaxis()                                  # most probable on top
    ax.set_xlim(0, 100)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
    for yi, p in zip(y, probs):
        inside = p > 70                                # long bar: label inside its end, else after it
        ax.text(p - 2 if inside else p + 2, yi, pct(p / 100.0), va="center", ha="right" if inside else "left",
                fontsize=TEXT_SIZE, color="black")
    xlabel = "Probability" if true_name in names else f"Probability\n(true class {true_name} not in top 3)"
    style_axes(ax, xlabel=xlabel)
    ax.set_box_aspect(0.75)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def plot_no_failures(threshold: float, model_name: str, ax=None) -> Figure:
    """A placeholder figure saying `model_name` has no failures with
    confidence at or above `threshold` (a fraction, e.g. 0.9)."""
    if ax is None:
        fig, (ax,) = new_axes(1, 1, (7, 2.6))
    else:
        fig = ax.figure
    ax.set_axis_off()
    ax.text(0.5, 0.62, "No high-confidence failures", ha="center", va="center",
            fontsize=TITLE_SIZE + 4, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.32, f"Model '{model_name}' misclassified no test image\n"
                       f"with confidence \u2265 {pct(threshold)}.",
            ha="center", va="center", fontsize=LABEL_SIZE + 1, transform=ax.transAxes)
    return fig
