"""Stress stage figures: reliability diagrams, corruption heatmaps and examples, adversarial accuracy."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .style import (DIFFERENCE_COLORMAP, LABEL_SIZE, OKABE_ITO, ROBUSTNESS_COLORMAP, TICK_SIZE, TITLE_SIZE, given_axes,
                    model_colors, new_axes, pct, style_axes)


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
        fig, axes = new_axes(nrows, ncols, (5.0 * ncols, 4.8 * nrows))
        axes = list(axes)
    else:
        axes = given_axes(axes, len(names), "plot_reliability_diagram")
        fig = axes[0].figure
    for ax, name, color in zip(axes, names, model_colors([n.split(",")[0] for n in names])):
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
        style_axes(ax, f"{name}: ECE {pct(b.ece)}, MCE {pct(b.mce)}", "Confidence (top-class probability)",
               "Accuracy in bin (bar labels: images)")
        ax.legend(loc="upper left", fontsize=TICK_SIZE)
    return fig



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
    style_axes(ax, title, "Severity")
    return im


def plot_robustness(results: Mapping[str, Mapping[str, Any]], axes=None) -> Figure:
    """Accuracy (%) per corruption type (rows) and severity (columns), one
    heatmap per model on one colour scale, plus improved - baseline in points
    when both are present. A last row gives the mean over types; the title the
    mean corruption accuracy and the clean accuracy on the same images.
    `results`: model name -> the 'corruptions' dict of cnnstress.robustness.suite."""
    names = list(results)
    with_diff = len(names) == 2   # the second minus the first (improved - baseline)
    panels = len(names) + int(with_diff)
    if axes is None:
        fig, axes = new_axes(1, panels, (4.6 * panels + 0.6, 6.8))
        axes = list(axes)
    else:
        axes = given_axes(axes, panels, "plot_robustness")
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
                      title=f"{name}: mean {pct(r['mean_corruption_accuracy'])}\n"
                            f"(clean {pct(r['clean_accuracy'])} on these {r['n']} images)")
        ax.axhline(len(types) - 0.5, color="white", linewidth=2)
        if i:
            ax.set_yticklabels([])
    cbar = fig.colorbar(im, ax=axes[:len(names)], fraction=0.04, pad=0.02)
    cbar.set_label("Accuracy (%)", fontsize=LABEL_SIZE)
    cbar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if with_diff:
        ax = axes[-1]
        first, second = names
        diff = tables[second] - tables[first]
        span = max(float(np.abs(diff).max()), 0.01)
        d = results[second]["mean_corruption_accuracy"] - results[first]["mean_corruption_accuracy"]
        im = _heatmap(ax, diff, rows, severities, cmap=DIFFERENCE_COLORMAP, vmin=-span, vmax=span,
                      title=f"{second} - {first}: mean {100 * d:+.1f} points", fmt="{:+.0f}")
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
        fig, axes = new_axes(len(types), ncols, (1.15 * ncols + 1.2, 1.15 * len(types) + 0.6))
    else:
        axes = given_axes(axes, len(types) * ncols, "plot_corruption_examples")
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
        fig, axs = new_axes(1, 1, (6.4, 4.6))
        ax = axs[0]
    else:
        fig = ax.figure
    names = list(results)
    for name, color in zip(names, model_colors(names)):
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
    style_axes(ax, f"Adversarial accuracy on {first['n']} test images (L-inf)", "Budget eps (x/255)", "Accuracy")
    ax.legend(fontsize=TICK_SIZE)
    return fig
