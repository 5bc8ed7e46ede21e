"""Label-review stage figures: the confirmed label errors the models fail on,
and precision at k of the failures ranked by the confident-learning score."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .style import (LABEL_SIZE, OKABE_ITO, TICK_SIZE, TITLE_SIZE, empty_message, given_axes, model_colors, new_axes,
                    pct, show_image, style_axes)

CONFIRMED_COLOR = OKABE_ITO["reddish_purple"]   # frame of a confirmed label error


def plot_confirmed_label_errors(entries: Sequence[Mapping[str, Any]], *, title: str = "", ncols: int = 5,
                                empty_text: str = "none of the confirmed label errors is a high-confidence "
                                                  "failure of either model", axes=None) -> Figure:
    """The confirmed label errors the models fail on, one tile each: the image
    with its official test index, the given label, the reviewers' label with
    their votes, and each model's prediction and confidence ('(fails)': a
    high-confidence failure of that model). Each entry: image (HWC uint8), dataset_index, given, guessed
    (class names), votes (reviewers choosing `guessed`), workers (reviewers in
    all), predictions {model: (class name, confidence in [0, 1], failure: bool)}.
    No entries: one panel saying `empty_text`. axes: len(entries) axes (or one
    when empty), row-major."""
    n = len(entries)
    cells = max(n, 1)
    rows = -(-cells // ncols)
    cols = min(cells, ncols)
    if axes is None:
        if n:
            fig, flat = new_axes(rows, cols, (2.35 * cols, 3.5 * rows + 0.7))
        else:
            fig, flat = new_axes(1, 1, (8, 2.4))
    else:
        flat = given_axes(axes, cells, "plot_confirmed_label_errors")
        fig = flat[0].figure
    if not n:
        flat[0].set_axis_off()
        flat[0].text(0.5, 0.62, "No confirmed label error among the failures", ha="center", va="center",
                     fontsize=TITLE_SIZE + 2, fontweight="bold", transform=flat[0].transAxes)
        flat[0].text(0.5, 0.3, empty_text, ha="center", va="center", fontsize=LABEL_SIZE + 1,
                     transform=flat[0].transAxes, wrap=True)
        if title:
            fig.suptitle(title, fontsize=TITLE_SIZE)
        return fig
    for ax in flat[n:]:
        ax.set_axis_off()
    for ax, e in zip(flat, entries):
        show_image(ax, np.asarray(e["image"]))
        for spine in ax.spines.values():
            spine.set_edgecolor(CONFIRMED_COLOR)
            spine.set_linewidth(3)
        ax.set_title(f"test image #{e['dataset_index']}\nlabel: {e['given']}\n"
                     f"{e['votes']} of {e['workers']} reviewers: {e['guessed']}", fontsize=TICK_SIZE)
        # An x label (not free text) so that constrained layout makes room for it.
        ax.set_xlabel("\n".join(f"{name}: {pred} {pct(conf, 0)}" + (" (fails)" if failure else "")
                                for name, (pred, conf, failure) in e["predictions"].items()), fontsize=TICK_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_precision_at_k(curves: Mapping[str, Sequence[tuple[int, float]]], *, title: str = "",
                        flagged: Mapping[str, int] | None = None, ax=None) -> Figure:
    """Precision at k of each model's high-confidence failures ranked by the
    confident-learning score (most suspicious first): the share of the first
    k that are confirmed label errors, in [0, 1]. curves: model -> [(k,
    precision), ...] for k = 1..failures; flagged: model -> how many of its
    failures confident learning flags (a dotted line at that k, unless all).
    The y axis stops at 1.2 x the highest precision (at least 0.1, at most 1)."""
    if ax is None:
        fig, (ax,) = new_axes(1, 1, (7, 4.2))
    else:
        fig = ax.figure
    names = list(curves)
    colors = dict(zip(names, model_colors(names)))
    drawn, top = False, 0.0
    for name in names:
        points = list(curves[name])
        if not points:
            continue
        k, p = np.array(points, dtype=float).T
        ax.step(k, p, where="post", color=colors[name], label=f"{name} ({int(k[-1])} failures; "
                                                              f"{pct(p[-1])} at all)")
        top = max(top, float(p.max()))
        if flagged and 0 < flagged.get(name, 0) < len(k):   # all failures flagged: no line worth drawing
            ax.axvline(flagged[name], color=colors[name], linestyle=":", linewidth=1,
                       label=f"{name}: {flagged[name]} flagged by confident learning")
        drawn = True
    if not drawn:
        empty_message(ax, "no high-confidence failures to rank")
    top = min(1.0, max(0.1, 1.2 * top))       # low precision stays readable; the axis says where it stops
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlim(left=0.5)
    ax.grid(alpha=0.3)
    style_axes(ax, title or "Failures ranked by the confident-learning score",
               "k (failures, most suspicious first)", "Precision at k (confirmed label errors / k)")
    if drawn:
        ax.legend(fontsize=TICK_SIZE - 1)
    return fig
