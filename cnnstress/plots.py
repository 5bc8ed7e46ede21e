"""Matplotlib figures shared by the notebook and the report.

Every plotting function draws into the caller's `ax` / `axes` when given
(and then returns the caller's figure), or makes its own figure with
constrained layout. `matplotlib.pyplot` is used only for `plt.subplots` and
`plt.close`, so the caller chooses the backend (the CLI uses Agg).

Colours come from the Okabe-Ito palette (colour-blind friendly); each model
keeps one colour across all figures: baseline blue, improved vermillion.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .data import CLASSES

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
MODEL_COLORS: dict[str, str] = {"baseline": BASELINE_COLOR, "improved": IMPROVED_COLOR}
# Colours for models with other names, in order of appearance.
EXTRA_MODEL_COLORS = (OKABE_ITO["bluish_green"], OKABE_ITO["orange"], OKABE_ITO["reddish_purple"],
                      OKABE_ITO["sky_blue"], OKABE_ITO["black"])
TRUE_CLASS_COLOR = OKABE_ITO["bluish_green"]   # highlighted bar of the true class
OTHER_CLASS_COLOR = "#9E9E9E"                  # the other top-3 bars
CAM_COLORMAP = "jet"                           # Grad-CAM convention; same map for heatmap and overlay
CONFUSION_COLORMAP = "Blues"

TITLE_SIZE = 12
LABEL_SIZE = 10
TICK_SIZE = 9
TEXT_SIZE = 9


def model_color(name: str, index: int = 0) -> str:
    """The colour of model `name`; unknown names get a fixed extra colour by `index`."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    return EXTRA_MODEL_COLORS[index % len(EXTRA_MODEL_COLORS)]


def _model_colors(names: Sequence[str]) -> list[str]:
    colors, extra = [], 0
    for name in names:
        if name in MODEL_COLORS:
            colors.append(MODEL_COLORS[name])
        else:
            colors.append(model_color(name, extra))
            extra += 1
    return colors


def _pct(fraction: float, decimals: int = 1) -> str:
    """0.973 -> '97.3%'; 0.9 -> '90%' (trailing zeros dropped)."""
    text = f"{100.0 * float(fraction):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "%"


def _new_axes(nrows: int, ncols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kw)
    return fig, axes.ravel()


def _given_axes(axes: Any, count: int, what: str) -> list:
    flat = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(flat) != count:
        raise ValueError(f"{what} needs {count} axes, got {len(flat)}")
    return flat


def _style(ax, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None) -> None:
    if title is not None:
        ax.set_title(title, fontsize=TITLE_SIZE)
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)


def _empty_message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=LABEL_SIZE, color="#555555",
            transform=ax.transAxes, wrap=True)


# --------------------------------------------------------------------------- training curves

def plot_training_curves(histories: Mapping[str, list[dict]], axes=None) -> Figure:
    """Loss and accuracy per epoch: one colour per model, train solid,
    validation dashed. `axes`: two axes (loss, accuracy)."""
    if axes is None:
        fig, (ax_loss, ax_acc) = _new_axes(1, 2, (11, 4.2))
    else:
        ax_loss, ax_acc = _given_axes(axes, 2, "plot_training_curves")
        fig = ax_loss.figure

    names = list(histories)
    colors = _model_colors(names)
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

    _style(ax_loss, "Loss", "Epoch", "Cross-entropy loss")
    _style(ax_acc, "Accuracy", "Epoch", "Accuracy (%)")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if not drawn:
        for ax in (ax_loss, ax_acc):
            _empty_message(ax, "no training history")
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
        fig, flat = _new_axes(rows, cols, (1.3 * cols, 1.45 * rows))
    else:
        flat = _given_axes(axes, count, "plot_samples")
        fig = flat[0].figure if flat else plt.figure()
    for i, ax in enumerate(flat):
        if i >= count:
            ax.set_axis_off()
            continue
        c = int(labs[i])
        _show_image(ax, _as_hwc(imgs[i]))
        ax.set_title(classes[c] if 0 <= c < len(classes) else str(c), fontsize=TEXT_SIZE)
    if count == 0 and flat:
        _empty_message(flat[0], "no images")
    return fig


# --------------------------------------------------------------------------- failure cases

def _as_hwc(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))          # CHW -> HWC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return img


def _show_image(ax, img: np.ndarray, **kw: Any):
    if img.ndim == 2:
        kw.setdefault("cmap", "gray")
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_failure_case(image, cam_pred, cam_true, *, true_name: str, pred_name: str, confidence: float,
                      top3: Sequence[tuple[str, float]], title: str | None = None, note: str | None = None,
                      axes=None, cmap: str = CAM_COLORMAP) -> Figure:
    """One misclassified image explained with Grad-CAM.

    Layout (2 x 3, row-major; also the order of `axes` when given):
    image | Grad-CAM predicted | overlay predicted
    top-3 probabilities | Grad-CAM true | overlay true
    `confidence` and the top-3 probabilities are fractions in [0, 1].
    """
    from .xai.cam import overlay

    if axes is None:
        fig, flat = _new_axes(2, 3, (10, 7))
        own_figure = True
    else:
        flat = _given_axes(axes, 6, "plot_failure_case")
        fig = flat[0].figure
        own_figure = False
    ax_img, ax_pcam, ax_pover, ax_bar, ax_tcam, ax_tover = flat

    img = _as_hwc(image)
    cam_pred = np.asarray(cam_pred, dtype=np.float32)
    cam_true = np.asarray(cam_true, dtype=np.float32)

    _show_image(ax_img, img)
    img_title = f"True: {true_name}\nPredicted: {pred_name} ({_pct(confidence)})"
    if not own_figure and (title or note):
        img_title = "\n".join(t for t in (title, note) if t) + "\n" + img_title
    ax_img.set_title(img_title, fontsize=TITLE_SIZE)

    cam_image = None
    for ax_cam, ax_over, cam, which, name in ((ax_pcam, ax_pover, cam_pred, "predicted", pred_name),
                                              (ax_tcam, ax_tover, cam_true, "true", true_name)):
        cam_image = _show_image(ax_cam, cam, cmap=cmap, vmin=0.0, vmax=1.0)
        ax_cam.set_title(f"Grad-CAM for {which} ({name})", fontsize=TITLE_SIZE)
        _show_image(ax_over, np.clip(overlay(img, cam, colormap=cmap), 0.0, 1.0))
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
        _empty_message(ax, "no probabilities given")
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
        ax.text(p - 2 if inside else p + 2, yi, _pct(p / 100.0), va="center", ha="right" if inside else "left",
                fontsize=TEXT_SIZE, color="black")
    xlabel = "Probability" if true_name in names else f"Probability\n(true class {true_name} not in top 3)"
    _style(ax, xlabel=xlabel)
    ax.set_box_aspect(0.75)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def plot_no_failures(threshold: float, model_name: str, ax=None) -> Figure:
    """A placeholder figure saying `model_name` has no failures with
    confidence at or above `threshold` (a fraction, e.g. 0.9)."""
    if ax is None:
        fig, (ax,) = _new_axes(1, 1, (7, 2.6))
    else:
        fig = ax.figure
    ax.set_axis_off()
    ax.text(0.5, 0.62, "No high-confidence failures", ha="center", va="center",
            fontsize=TITLE_SIZE + 4, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.32, f"Model '{model_name}' misclassified no test image\n"
                       f"with confidence \u2265 {_pct(threshold)}.",
            ha="center", va="center", fontsize=LABEL_SIZE + 1, transform=ax.transAxes)
    return fig


# --------------------------------------------------------------------------- model comparison

def _bar_labels(ax, bars, labels: Sequence[str]) -> None:
    ax.bar_label(bars, labels=labels, padding=3, fontsize=TEXT_SIZE)


# Where the high-confidence failures went / came from (cnnstress.compare.compare_failures' groups):
# the first model's bar splits into its first three, the second model's into the last three.
FAILURE_GROUPS = (("fixed", "fixed", OKABE_ITO["bluish_green"]),
                  ("wrong_low_confidence", "wrong, less sure", OKABE_ITO["sky_blue"]),
                  ("still_high_confidence", "in both", "#777777"),
                  ("newly_confident", "newly confident", OKABE_ITO["yellow"]),
                  ("new", "new (baseline right)", OKABE_ITO["vermillion"]))


def _failure_stacks(ax, x: np.ndarray, fails: np.ndarray, groups: Mapping[str, int]) -> None:
    """The two failure bars stacked by group; checks the groups add up to the bars."""
    stacks = (("fixed", "wrong_low_confidence", "still_high_confidence"),
              ("still_high_confidence", "newly_confident", "new"))
    style = {key: (label, color) for key, label, color in FAILURE_GROUPS}
    for xi, total, keys in zip(x, fails, stacks):
        if sum(int(groups[k]) for k in keys) != total:
            raise ValueError(f"failure_groups {dict(groups)} do not add up to the failure counts {fails.tolist()}")
        bottom = 0
        for key in keys:
            label, color = style[key]
            v = int(groups[key])
            shown = label if label not in ax.get_legend_handles_labels()[1] else None
            ax.bar(xi, v, bottom=bottom, color=color, width=0.6, edgecolor="#333333", linewidth=0.6, label=shown)
            if v and v >= 0.08 * max(1, int(fails.max())):
                ax.text(xi, bottom + v / 2, str(v), ha="center", va="center", fontsize=TEXT_SIZE - 1)
            bottom += v
    ax.legend(fontsize=TICK_SIZE - 2, loc="upper left", framealpha=0.9)


def plot_model_comparison(summaries: Mapping[str, dict], classes: Sequence[str] = CLASSES, axes=None,
                          failure_groups: Mapping[str, int] | None = None) -> Figure:
    """Test accuracy, high-confidence failure count and per-class accuracy
    per model. `axes`: three axes in that order. `failure_groups`: for two
    models (baseline, improved), compare_failures' counts; the failure bars
    are then stacked: the baseline's into fixed / still wrong with less
    confidence / in both tables, the improved model's into in both tables /
    newly confident / new."""
    if axes is None:
        fig, (ax_acc, ax_fail, ax_cls) = _new_axes(1, 3, (15, 4.8),
                                                   gridspec_kw={"width_ratios": [1, 1, 3.6]})
    else:
        ax_acc, ax_fail, ax_cls = _given_axes(axes, 3, "plot_model_comparison")
        fig = ax_acc.figure

    names = list(summaries)
    colors = _model_colors(names)
    x = np.arange(len(names))

    acc = np.array([100.0 * float(summaries[n].get("test_accuracy", np.nan)) for n in names])
    bars = ax_acc.bar(x, acc, color=colors, width=0.6, edgecolor="#333333", linewidth=0.6)
    _bar_labels(ax_acc, bars, ["n/a" if np.isnan(a) else _pct(a / 100.0) for a in acc])
    ax_acc.set_ylim(0, 110)
    ax_acc.set_yticks([0, 20, 40, 60, 80, 100])
    ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    _style(ax_acc, "Test accuracy", None, "Accuracy (%)")

    fails = np.array([int(summaries[n].get("high_confidence_failures", 0)) for n in names])
    if failure_groups is not None and len(names) != 2:
        raise ValueError(f"failure_groups needs exactly two models, got {len(names)}")
    bars = ax_fail.bar(x, fails, color="none" if failure_groups is not None else colors, width=0.6,
                       edgecolor="#333333", linewidth=0.6)
    _bar_labels(ax_fail, bars, [str(f) for f in fails])
    if failure_groups is not None:
        _failure_stacks(ax_fail, x, fails, failure_groups)
    ax_fail.set_ylim(0, max(1, int(fails.max(initial=0))) * (1.6 if failure_groups is not None else 1.18))
    ax_fail.yaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax_fail, "High-confidence failures", None, "Test images")

    for ax in (ax_acc, ax_fail):
        ax.set_xticks(x, labels=names)
        pad = 0.6 if len(names) > 1 else 1.0           # keep a lone bar from filling the panel
        ax.set_xlim(-pad, len(names) - 1 + pad)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)

    cx = np.arange(len(classes))
    width = 0.8 / max(1, len(names))
    for i, (name, color) in enumerate(zip(names, colors)):
        per = summaries[name].get("per_class_accuracy") or {}
        vals = np.array([100.0 * float(per[c]) if per.get(c) is not None else np.nan for c in classes])
        ax_cls.bar(cx - 0.4 + width * (i + 0.5), vals, width=width, color=color, label=name,
                   edgecolor="#333333", linewidth=0.4)
    ax_cls.set_xticks(cx, labels=list(classes), rotation=30, ha="right", rotation_mode="anchor")
    ax_cls.set_ylim(0, 118)                            # headroom for the legend above the bars
    ax_cls.set_yticks([0, 20, 40, 60, 80, 100])
    ax_cls.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax_cls.grid(True, axis="y", alpha=0.3)
    ax_cls.set_axisbelow(True)
    _style(ax_cls, "Per-class test accuracy", None, "Accuracy (%)")
    if names:
        ax_cls.legend(loc="upper center", ncol=len(names), fontsize=TEXT_SIZE, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------- confusion matrix

def plot_confusion_matrix(cm, classes: Sequence[str] = CLASSES, title: str = "Confusion matrix",
                          normalize: bool = True, ax=None) -> Figure:
    """Confusion matrix (rows = true, columns = predicted). Colours are
    row-normalised when `normalize`; every cell shows its count."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classes):
        raise ValueError(f"confusion matrix must be ({len(classes)}, {len(classes)}), got {cm.shape}")
    if ax is None:
        fig, (ax,) = _new_axes(1, 1, (8, 7))
    else:
        fig = ax.figure

    counts = cm.astype(np.int64)
    if normalize:
        sums = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, sums, out=np.zeros(counts.shape, dtype=float), where=sums > 0)
        vmax, label = 1.0, "Fraction of true class"
    else:
        values = counts.astype(float)
        vmax, label = max(1.0, float(values.max(initial=0))), "Count"
    im = ax.imshow(values, cmap=CONFUSION_COLORMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
    n = len(classes)
    size = TEXT_SIZE if n <= 12 else max(6, TEXT_SIZE - 2)
    for i in range(n):
        for j in range(n):
            dark = values[i, j] > 0.5 * vmax
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=size,
                    color="white" if dark else "#222222")
    ax.set_xticks(np.arange(n), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(n), labels=list(classes))
    _style(ax, title, "Predicted class", "True class")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(label, fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    return fig


# --------------------------------------------------------------------------- calibration

def plot_reliability_diagram(bins: Mapping[str, Any], axes=None, ncols: int | None = None) -> Figure:
    """One reliability diagram per entry: accuracy per equal-width confidence
    bin (bars) against the diagonal of perfect calibration, the gap to the
    diagonal hatched, ECE and MCE in the title and the number of images in
    each bin under its bar (a big gap in a near-empty bin says little).
    `bins` maps a title -> cnnstress.robustness.calibration.CalibrationBins; a title
    "model, ..." (e.g. "baseline, T=1.04") takes the model's colour. `axes`,
    when given, one per entry; else `ncols` panels per row (default: all)."""
    names = list(bins)
    count = max(len(names), 1)
    if axes is None:
        ncols = min(ncols or count, count)
        nrows = -(-count // ncols)
        fig, axes = _new_axes(nrows, ncols, (5.0 * ncols, 4.8 * nrows))
        axes = list(axes)
    else:
        axes = _given_axes(axes, len(names), "plot_reliability_diagram")
        fig = axes[0].figure
    for ax, name, color in zip(axes, names, _model_colors([n.split(",")[0] for n in names])):
        b = bins[name]
        width = float(b.edges[1] - b.edges[0])
        centres = b.edges[:-1] + width / 2
        filled = b.count > 0
        acc = np.where(filled, b.accuracy, 0.0)
        conf = np.where(filled, b.confidence, 0.0)
        ax.bar(centres, acc, width=width, color=color, edgecolor="white", linewidth=0.8, label="accuracy")
        ax.bar(centres[filled], (conf - acc)[filled], bottom=acc[filled], width=width, color="none",
               edgecolor=OKABE_ITO["vermillion"] if color != OKABE_ITO["vermillion"] else OKABE_ITO["blue"],
               hatch="//", linewidth=0.8, label="gap to confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="#444444", linewidth=1.2, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        for x, n, a in zip(centres[filled], b.count[filled], acc[filled]):
            ax.text(x, 0.01, str(int(n)), rotation=90, ha="center", va="bottom", fontsize=TICK_SIZE - 2,
                    color="white" if a > 0.12 else "#333333")  # white on a tall bar, dark on the background
        _style(ax, f"{name}: ECE {_pct(b.ece)}, MCE {_pct(b.mce)}", "Confidence (top-class probability)",
               "Accuracy in bin (bar labels: images)")
        ax.legend(loc="upper left", fontsize=TICK_SIZE)
    return fig


# --------------------------------------------------------------------------- stress tests

ROBUSTNESS_COLORMAP = "viridis"
DIFFERENCE_COLORMAP = "RdBu"     # diverging: blue = improved is better, red = worse


def _heatmap(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, cmap: str,
             vmin: float, vmax: float, title: str, fmt: str = "{:.0f}", scale: float = 100.0):
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    mid = (vmin + vmax) / 2
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            dark = (v < mid) if cmap == ROBUSTNESS_COLORMAP else abs(v) > 0.6 * max(abs(vmin), abs(vmax))
            ax.text(j, i, fmt.format(scale * v), ha="center", va="center", fontsize=TICK_SIZE - 1,
                    color="white" if dark else "#222222")
    ax.set_xticks(np.arange(len(cols)), labels=list(cols))
    ax.set_yticks(np.arange(len(rows)), labels=list(rows))
    _style(ax, title, "Severity")
    return im


def plot_robustness(results: Mapping[str, Mapping[str, Any]], axes=None) -> Figure:
    """Accuracy (%) per corruption type (rows) and severity (columns), one
    heatmap per model on one colour scale, plus improved - baseline in points
    when both are present. A last row gives the mean over types; the title the
    mean corruption accuracy and the clean accuracy on the same images.
    `results`: model name -> the 'corruptions' dict of cnnstress.robustness.suite."""
    names = list(results)
    with_diff = "baseline" in results and "improved" in results
    panels = len(names) + int(with_diff)
    if axes is None:
        fig, axes = _new_axes(1, panels, (4.6 * panels + 0.6, 6.8))
        axes = list(axes)
    else:
        axes = _given_axes(axes, panels, "plot_robustness")
        fig = axes[0].figure
    first = results[names[0]]
    types = list(first["accuracy"])
    severities = [str(i + 1) for i in range(len(first["accuracy"][types[0]]))]
    rows = [t.replace("_", " ") for t in types] + ["mean"]

    def table(r):
        acc = np.array([r["accuracy"][t] for t in types])
        return np.vstack([acc, acc.mean(0, keepdims=True)])
    tables = {n: table(results[n]) for n in names}
    for i, (ax, name) in enumerate(zip(axes, names)):
        r = results[name]
        im = _heatmap(ax, tables[name], rows, severities, cmap=ROBUSTNESS_COLORMAP, vmin=0.0, vmax=1.0,
                      title=f"{name}: mean {_pct(r['mean_corruption_accuracy'])}\n"
                            f"(clean {_pct(r['clean_accuracy'])} on these {r['n']} images)")
        ax.axhline(len(types) - 0.5, color="white", linewidth=2)
        if i:
            ax.set_yticklabels([])
    cbar = fig.colorbar(im, ax=axes[:len(names)], fraction=0.04, pad=0.02)
    cbar.set_label("Accuracy (%)", fontsize=LABEL_SIZE)
    cbar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if with_diff:
        ax = axes[-1]
        diff = tables["improved"] - tables["baseline"]
        span = max(float(np.abs(diff).max()), 0.01)
        d = results["improved"]["mean_corruption_accuracy"] - results["baseline"]["mean_corruption_accuracy"]
        im = _heatmap(ax, diff, rows, severities, cmap=DIFFERENCE_COLORMAP, vmin=-span, vmax=span,
                      title=f"improved - baseline: mean {100 * d:+.1f} points", fmt="{:+.0f}")
        ax.axhline(len(types) - 0.5, color="black", linewidth=1)
        ax.set_yticklabels([])
        cbar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
        cbar.set_label("Accuracy change (points)", fontsize=LABEL_SIZE)
        cbar.ax.yaxis.set_major_formatter(lambda v, _pos: f"{100 * v:+.0f}")
    fig.suptitle("Accuracy under common corruptions (CIFAR-10-C types, generated)", fontsize=TITLE_SIZE + 1)
    return fig


def plot_corruption_examples(grid: Mapping[str, Sequence[Any]], title: str | None = None, axes=None) -> Figure:
    """One image at every severity of every corruption: rows = types,
    columns = clean, severity 1..5. `grid`: type -> [HWC uint8 images]."""
    types = list(grid)
    ncols = len(grid[types[0]])
    if axes is None:
        fig, axes = _new_axes(len(types), ncols, (1.15 * ncols + 1.2, 1.15 * len(types) + 0.6))
    else:
        axes = _given_axes(axes, len(types) * ncols, "plot_corruption_examples")
        fig = axes[0].figure
    axes = np.asarray(axes, dtype=object).reshape(len(types), ncols)
    for i, name in enumerate(types):
        for j, img in enumerate(grid[name]):
            ax = axes[i, j]
            ax.imshow(np.asarray(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if j == 0 else f"severity {j}", fontsize=LABEL_SIZE)
            if j == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=LABEL_SIZE - 1, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_adversarial(results: Mapping[str, Mapping[str, Any]], ax=None) -> Figure:
    """Accuracy against the L-infinity budget (grey levels, eps = k/255) for
    FGSM (dashed) and PGD (solid), one colour per model; budget 0 is the clean
    accuracy on the same images. `results`: model name -> the 'adversarial'
    dict of cnnstress.robustness.suite / cnnstress.robustness.adversarial."""
    if ax is None:
        fig, axs = _new_axes(1, 1, (6.4, 4.6))
        ax = axs[0]
    else:
        fig = ax.figure
    names = list(results)
    for name, color in zip(names, _model_colors(names)):
        r = results[name]
        eps = [0] + [round(255 * e) for e in r["eps"]]
        for attack, style, marker in (("fgsm", "--", "s"), ("pgd", "-", "o")):
            ax.plot(eps, [r["clean_accuracy"]] + list(r[attack]), linestyle=style, marker=marker, color=color,
                    label=f"{name} {attack.upper()}" + (f" ({r['steps']} steps)" if attack == "pgd" else ""))
    first = results[names[0]]
    ax.set_xticks([0] + [round(255 * e) for e in first["eps"]])
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    _style(ax, f"Adversarial accuracy on {first['n']} test images (L-inf)", "Budget eps (x/255)", "Accuracy")
    ax.legend(fontsize=TICK_SIZE)
    return fig


# --------------------------------------------------------------------------- saving

def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file, then rename) and return the path."""
    from .io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor="white"))
    return path


def close(fig: Figure) -> None:
    """Release a figure made here (pyplot keeps a reference until closed)."""
    plt.close(fig)


# --------------------------------------------------------------------------- explanations

METHOD_STYLES = {"gradcam": ("-", "o"), "gradcam++": ("--", "s"), "random": (":", "^"),
                 "random_smooth": ("-.", "v")}
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "random": "random (pixel noise)",
                 "random_smooth": "random (smooth)"}
METHOD_COLORS = {"gradcam": OKABE_ITO["blue"], "gradcam++": OKABE_ITO["orange"], "random": "#777777",
                 "random_smooth": "#222222"}


def _short_verdict(verdict: str) -> str:
    """'better than random' -> 'better', 'not distinguishable from random' -> 'n.s.', ..."""
    if verdict == "not distinguishable from random":
        return "n.s."
    return verdict.replace(" than random", "").replace("deletion", "del.").replace("insertion", "ins.")


def plot_faithfulness(results: Mapping[str, Mapping[str, Any]], axes=None) -> Figure:
    """Mean deletion and insertion curves (target-class probability against
    the fraction of pixels removed / inserted in order of importance) per
    method, with mean AUCs in the legend and, in the insertion panel, each
    CAM method's verdicts against the pixel-noise and the smooth random map.
    One row per model; columns: deletion and insertion for each image group
    ('failures', 'sample').
    `results`: model -> group -> cnnstress.xai.checks.faithfulness_group output."""
    names = list(results)
    groups = [g for g in ("failures", "sample") if any(results[n].get(g, {}).get("n") for n in names)] or ["sample"]
    ncols = 2 * len(groups)
    if axes is None:
        fig, flat = _new_axes(len(names), ncols, (4.0 * ncols, 3.4 * len(names) + 0.4))
    else:
        flat = _given_axes(axes, len(names) * ncols, "plot_faithfulness")
        fig = flat[0].figure
    grid = np.asarray(flat, dtype=object).reshape(len(names), ncols)
    for i, name in enumerate(names):
        for j, group in enumerate(groups):
            r = results[name].get(group, {"n": 0})
            for k, kind in enumerate(("deletion", "insertion")):
                ax = grid[i, 2 * j + k]
                better = "lower" if kind == "deletion" else "higher"
                _style(ax, f"{name}, {group} (n={r['n']}): {kind}", "Fraction of pixels "
                       + ("removed" if kind == "deletion" else "inserted"), "Target-class probability")
                if not r.get("n"):
                    _empty_message(ax, "no images in this group")
                    continue
                for method, m in r["methods"].items():
                    style, marker = METHOD_STYLES.get(method, ("-", None))
                    label = f"{METHOD_LABELS.get(method, method)} AUC {m[f'{kind}_auc']:.3f}"
                    if kind == "insertion" and "verdict" in m:
                        label += f" [{_short_verdict(m['verdict'])} | {_short_verdict(m['verdict_smooth'])}]"
                    ax.plot(r["fractions"], m[f"{kind}_curve"], linestyle=style, marker=marker, markersize=3,
                            color=METHOD_COLORS.get(method), label=label)
                ax.set_ylim(0, 1)
                ax.grid(alpha=0.3)
                title = f"{better} AUC = more faithful"
                if kind == "insertion":
                    title += "\n[verdict vs pixel noise | vs smooth random]"
                ax.legend(fontsize=TICK_SIZE - 1, title=title, title_fontsize=TICK_SIZE - 1)
    return fig


def plot_sanity_check(summaries: Mapping[str, Mapping[str, Any]], maps: np.ndarray | None = None,
                      steps: Sequence[str] | None = None, map_title: str = "") -> Figure:
    """Cascading randomisation: median |Spearman| (solid) and median SSIM
    (dotted) of the randomised maps against the originals, per step, per
    method, one panel per model, with the pass threshold; and, when `maps`
    (steps, images, H, W) on [0,1] is given, those maps in a grid below.
    `summaries`: model -> method -> cnnstress.xai.checks.sanity_report's entry
    (steps, verdict with its median_per_step, median_ssim)."""
    from .xai.randomisation import verdict_word

    names = list(summaries)
    n_img = 0 if maps is None else maps.shape[1]
    fig = plt.figure(figsize=(max(5.2 * len(names), 1.3 * (len(steps or []) + 1)), 4.2 + 1.35 * n_img),
                     layout="constrained")
    top, bottom = (fig.subfigures(2, 1, height_ratios=[4.2, 1.35 * n_img]) if n_img else (fig, None))
    axes = np.ravel(top.subplots(1, len(names), squeeze=False))
    for ax, name in zip(axes, names):
        s = summaries[name]
        for method in ("gradcam", "gradcam++"):
            if method not in s:
                continue
            m = s[method]
            x = np.arange(len(m["steps"]))
            color = METHOD_COLORS[method]
            v = m["verdict"]
            ok = verdict_word(v["passed"])
            ax.plot(x, [v["median_per_step"][t] for t in m["steps"]], "-o", color=color,
                    label=f"{METHOD_LABELS[method]} |Spearman| ({ok})")
            ax.plot(x, m["median_ssim"], ":", marker="s", color=color, label=f"{METHOD_LABELS[method]} SSIM")
            ax.set_xticks(x, labels=["original" if t == "original" else f"+{t}" for t in m["steps"]],
                          rotation=30, ha="right")
        thr = next(iter(s[k]["verdict"]["threshold"] for k in ("gradcam", "gradcam++") if k in s))
        ax.axhline(thr, color="#444444", linestyle="--", linewidth=1, label=f"pass threshold {thr}")
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
        _style(ax, f"{name}: similarity to the original maps", "Layers re-initialised (cumulative, head first)",
               "Median over images")
        ax.legend(fontsize=TICK_SIZE - 1)
    if n_img:
        cells = bottom.subplots(n_img, maps.shape[0], squeeze=False)
        for i in range(n_img):
            for j in range(maps.shape[0]):
                ax = cells[i, j]
                ax.imshow(maps[j, i], cmap=CAM_COLORMAP, vmin=0, vmax=1, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and steps is not None:
                    ax.set_title("original" if steps[j] == "original" else f"+{steps[j]}", fontsize=TICK_SIZE)
        if map_title:
            bottom.suptitle(map_title, fontsize=LABEL_SIZE)
    return fig


def plot_label_suspects(entries: Sequence[Mapping[str, Any]], title: str = "", ncols: int = 6,
                        totals: Mapping[bool, int] | None = None) -> Figure:
    """High-confidence failures as image tiles, split into two labelled
    groups. Each entry: image (HWC uint8), given, predicted (class names),
    confidence (0-1), suspect (bool), dataset_index. Suspected label errors get
    an orange frame, model errors a blue one. `totals` {suspect: count}: the
    group sizes when `entries` shows only some of each."""
    groups = [("Suspected label errors", [e for e in entries if e["suspect"]], OKABE_ITO["orange"], True),
              ("Model errors (label looks right)", [e for e in entries if not e["suspect"]], OKABE_ITO["blue"], False)]
    rows = [-(-len(g[1]) // ncols) for g in groups]
    heights = [r if r else 0.35 for r in rows]       # an empty group keeps only its heading
    fig = plt.figure(figsize=(1.9 * ncols, 2.35 * sum(heights) + 0.9), layout="constrained")
    subs = fig.subfigures(2, 1, height_ratios=heights)
    for sub, (heading, items, color, flag), nrows in zip(subs, groups, rows):
        total = len(items) if totals is None else totals[flag]
        shown = f" ({len(items)} shown)" if total > len(items) else ""
        sub.suptitle(f"{heading}: {total}{shown}", fontsize=TITLE_SIZE, color=color)
        if not nrows:
            continue
        axs = np.ravel(sub.subplots(nrows, ncols, squeeze=False))
        for ax in axs:
            ax.axis("off")
        for ax, e in zip(axs, items):
            ax.axis("on")
            ax.imshow(np.asarray(e["image"]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_title(f"#{e['dataset_index']}\nlabel: {e['given']}\npred: {e['predicted']} {_pct(e['confidence'], 0)}",
                         fontsize=TICK_SIZE - 1)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE + 1)
    return fig


def plot_cam_methods(image, maps: Mapping[str, Any], title: str | None = None, axes=None) -> Figure:
    """One image and its maps side by side (e.g. Grad-CAM and Grad-CAM++ at
    layer3 and layer4), each overlaid on the image. `maps`: label -> (H,W) on [0,1]."""
    from .xai.cam import overlay

    labels = list(maps)
    if axes is None:
        fig, flat = _new_axes(1, len(labels) + 1, (2.6 * (len(labels) + 1), 3.0))
    else:
        flat = _given_axes(axes, len(labels) + 1, "plot_cam_methods")
        fig = flat[0].figure
    img = _as_hwc(image)
    _show_image(flat[0], img)
    flat[0].set_title("image", fontsize=LABEL_SIZE)
    for ax, label in zip(flat[1:], labels):
        _show_image(ax, np.clip(overlay(img, np.asarray(maps[label], dtype=np.float32)), 0, 1))
        ax.set_title(label, fontsize=LABEL_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig
