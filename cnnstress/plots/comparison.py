"""Comparison stage figures: the two models side by side, confusion matrices."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..data import CLASSES
from .style import (CONFUSION_COLORMAP, LABEL_SIZE, OKABE_ITO, TEXT_SIZE, TICK_SIZE, given_axes, model_colors, new_axes,
                    pct, style_axes)


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


def _failure_stacks(ax, x: np.ndarray, fails: np.ndarray, groups: Mapping[str, int], first: str = "baseline") -> None:
    """The two failure bars stacked by group; checks the groups add up to the bars.
    `first`: the reference model, named in the "new" group's label."""
    stacks = (("fixed", "wrong_low_confidence", "still_high_confidence"),
              ("still_high_confidence", "newly_confident", "new"))
    style = {key: (label.replace("baseline", first), color) for key, label, color in FAILURE_GROUPS}
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
        fig, (ax_acc, ax_fail, ax_cls) = new_axes(1, 3, (15, 4.8),
                                                   gridspec_kw={"width_ratios": [1, 1, 3.6]})
    else:
        ax_acc, ax_fail, ax_cls = given_axes(axes, 3, "plot_model_comparison")
        fig = ax_acc.figure

    names = list(summaries)
    colors = model_colors(names)
    x = np.arange(len(names))

    acc = np.array([100.0 * float(summaries[n].get("test_accuracy", np.nan)) for n in names])
    bars = ax_acc.bar(x, acc, color=colors, width=0.6, edgecolor="#333333", linewidth=0.6)
    _bar_labels(ax_acc, bars, ["n/a" if np.isnan(a) else pct(a / 100.0) for a in acc])
    ax_acc.set_ylim(0, 110)
    ax_acc.set_yticks([0, 20, 40, 60, 80, 100])
    ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    style_axes(ax_acc, "Test accuracy", None, "Accuracy (%)")

    fails = np.array([int(summaries[n].get("high_confidence_failures", 0)) for n in names])
    if failure_groups is not None and len(names) != 2:
        raise ValueError(f"failure_groups needs exactly two models, got {len(names)}")
    bars = ax_fail.bar(x, fails, color="none" if failure_groups is not None else colors, width=0.6,
                       edgecolor="#333333", linewidth=0.6)
    _bar_labels(ax_fail, bars, [str(f) for f in fails])
    if failure_groups is not None:
        _failure_stacks(ax_fail, x, fails, failure_groups, first=names[0])
    ax_fail.set_ylim(0, max(1, int(fails.max(initial=0))) * (1.6 if failure_groups is not None else 1.18))
    ax_fail.yaxis.set_major_locator(MaxNLocator(integer=True))
    style_axes(ax_fail, "High-confidence failures", None, "Test images")

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
    style_axes(ax_cls, "Per-class test accuracy", None, "Accuracy (%)")
    if names:
        ax_cls.legend(loc="upper center", ncol=len(names), fontsize=TEXT_SIZE, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------- confusion matrix

def plot_confusion_matrices(summaries: Mapping[str, Mapping]) -> Figure:
    """One confusion-matrix panel per model, side by side ({name: the
    evaluate.summarize dict of its test results}), titled with its test accuracy."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(7.5 * len(summaries), 6.5), squeeze=False,
                             constrained_layout=True)
    for ax, (name, s) in zip(axes[0], summaries.items()):
        plot_confusion_matrix(np.array(s["confusion_matrix"]), title=f"{name}: confusion matrix "
                              f"(test accuracy {100 * s['test_accuracy']:.2f}%)", ax=ax)
    return fig


def plot_confusion_matrix(cm, classes: Sequence[str] = CLASSES, title: str = "Confusion matrix",
                          normalize: bool = True, ax=None) -> Figure:
    """Confusion matrix (rows = true, columns = predicted). Colours are
    row-normalised when `normalize`; every cell shows its count."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classes):
        raise ValueError(f"confusion matrix must be ({len(classes)}, {len(classes)}), got {cm.shape}")
    if ax is None:
        fig, (ax,) = new_axes(1, 1, (8, 7))
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
    style_axes(ax, title, "Predicted class", "True class")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(label, fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    return fig
