"""Explanation stage figures: faithfulness curves, the sanity check, label suspects, CAM methods side by side."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .style import (CAM_COLORMAP, LABEL_SIZE, OKABE_ITO, TICK_SIZE, TITLE_SIZE, as_hwc, empty_message, given_axes, new_axes,
                    pct, show_image, show_overlay, style_axes)


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
        fig, flat = new_axes(len(names), ncols, (4.0 * ncols, 4.6 * len(names) + 0.4))
    else:
        flat = given_axes(axes, len(names) * ncols, "plot_faithfulness")
        fig = flat[0].figure
    grid = np.asarray(flat, dtype=object).reshape(len(names), ncols)
    for i, name in enumerate(names):
        for j, group in enumerate(groups):
            r = results[name].get(group, {"n": 0})
            for k, kind in enumerate(("deletion", "insertion")):
                ax = grid[i, 2 * j + k]
                better = "lower" if kind == "deletion" else "higher"
                style_axes(ax, f"{name}, {group} (n={r['n']}): {kind}", "Fraction of pixels "
                       + ("removed" if kind == "deletion" else "inserted"), "Target-class probability")
                if not r.get("n"):
                    empty_message(ax, "no images in this group")
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
                # Below the panel: the curves span the whole panel, so any spot inside hides some.
                ax.legend(fontsize=TICK_SIZE - 1, title=title, title_fontsize=TICK_SIZE - 1, loc="upper center",
                          bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0)
    return fig


def plot_sanity_check(summaries: Mapping[str, Mapping[str, Any]], maps: np.ndarray | None = None,
                      steps: Sequence[str] | None = None, map_title: str = "") -> Figure:
    """Cascading randomisation: median |Spearman| (solid) and median SSIM
    (dotted) of the randomised maps against the originals, per step, per
    method, one panel per model, with the pass threshold; and, when `maps`
    (steps, images, H, W) on [0,1] is given, those maps in a grid below.
    `summaries`: model -> method -> cnnstress.xai.checks.sanity_report's entry
    (steps, verdict with its median_per_step, median_ssim)."""
    from ..xai.cam import CAM_METHODS
    from ..xai.randomisation import verdict_word

    names = list(summaries)
    n_img = 0 if maps is None else maps.shape[1]
    fig = plt.figure(figsize=(max(5.2 * len(names), 1.3 * (len(steps or []) + 1)), 4.2 + 1.35 * n_img),
                     layout="constrained")
    top, bottom = (fig.subfigures(2, 1, height_ratios=[4.2, 1.35 * n_img]) if n_img else (fig, None))
    axes = np.ravel(top.subplots(1, len(names), squeeze=False))
    for ax, name in zip(axes, names):
        s = summaries[name]
        for method in CAM_METHODS:
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
        thr = next(iter(s[k]["verdict"]["threshold"] for k in CAM_METHODS if k in s))
        ax.axhline(thr, color="#444444", linestyle="--", linewidth=1, label=f"pass threshold {thr}")
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
        style_axes(ax, f"{name}: similarity to the original maps", "Layers re-initialised (cumulative, head first)",
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
                if not np.any(maps[j, i] > 0):   # no positive evidence left: say so, not a flat panel
                    ax.text(0.5, 0.5, "all zero", ha="center", va="center", fontsize=TICK_SIZE, color="white",
                            transform=ax.transAxes)
                if i == 0 and steps is not None:
                    ax.set_title("original" if steps[j] == "original" else f"+{steps[j]}", fontsize=TICK_SIZE)
        if map_title:
            bottom.suptitle(map_title, fontsize=LABEL_SIZE)
    return fig


def plot_label_suspects(entries: Sequence[Mapping[str, Any]], title: str = "", ncols: int = 6,
                        totals: Mapping[bool, int] | None = None) -> Figure:
    """High-confidence failures as image tiles, split into two labelled
    groups. Each entry: image (HWC uint8), given, predicted (class names),
    confidence (0-1), suspect (bool), dataset_index, and optionally review
    (a short line drawn under the tile, e.g. '5 of 5 reviewers: frog') with
    label_error (bool: the line is drawn in the confirmed-error colour).
    Suspected label errors get an orange frame, model errors a blue one. `totals` {suspect: count}: the
    group sizes when `entries` shows only some of each."""
    groups = [("Suspected label errors", [e for e in entries if e["suspect"]], OKABE_ITO["orange"], True),
              ("Model errors (label looks right)", [e for e in entries if not e["suspect"]], OKABE_ITO["blue"], False)]
    # Laid out by hand, in inches from the top: a layout engine gives fixed-aspect tiles no room
    # for a line under some of them, which then ran into the next row's titles.
    tile, gap, margin = 1.7, 0.2, 0.1
    line = (TICK_SIZE - 1) / 72 * 1.25                              # one line of tile text
    title_block = 3 * line + 0.06                                   # number, label, prediction
    review_block = line + 0.08 if any(e.get("review") for e in entries) else 0.0
    heading, row_pitch = TITLE_SIZE / 72 * 1.6, title_block + tile + review_block + gap
    top = margin + ((len(title.splitlines()) * TITLE_SIZE / 72 * 1.35 + 0.1) if title else 0.0)
    rows = [-(-len(g[1]) // ncols) for g in groups]
    width = 2 * margin + ncols * tile + (ncols - 1) * gap
    height = top + sum(heading + r * row_pitch for r in rows) + margin
    fig = plt.figure(figsize=(width, height))
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE + 1, y=1 - margin / height, va="top")
    y = top                                                          # inches from the top
    for (name, items, color, flag), nrows in zip(groups, rows):
        total = len(items) if totals is None else totals[flag]
        shown = f" ({len(items)} shown)" if total > len(items) else ""
        fig.text(0.5, 1 - (y + heading / 2) / height, f"{name}: {total}{shown}", ha="center", va="center",
                 fontsize=TITLE_SIZE, color=color)
        y += heading
        for i, e in enumerate(items):
            row, col = divmod(i, ncols)
            tile_top = y + row * row_pitch + title_block
            ax = fig.add_axes([(margin + col * (tile + gap)) / width, 1 - (tile_top + tile) / height,
                               tile / width, tile / height])
            ax.imshow(np.asarray(e["image"]), interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_title(f"#{e['dataset_index']}\nlabel: {e['given']}\npred: {e['predicted']} {pct(e['confidence'], 0)}",
                         fontsize=TICK_SIZE - 1)
            if e.get("review"):
                ax.set_xlabel(e["review"], fontsize=TICK_SIZE - 1, fontweight="bold", labelpad=3,
                              color=OKABE_ITO["reddish_purple"] if e.get("label_error") else "#333333")
        y += nrows * row_pitch
    return fig


def plot_cam_methods(image, maps: Mapping[str, Any], title: str | None = None, axes=None) -> Figure:
    """One image and its maps side by side (e.g. Grad-CAM and Grad-CAM++ at
    layer3 and layer4), each overlaid on the image. `maps`: label -> (H,W) on [0,1]."""
    labels = list(maps)
    if axes is None:
        fig, flat = new_axes(1, len(labels) + 1, (2.6 * (len(labels) + 1), 3.0))
    else:
        flat = given_axes(axes, len(labels) + 1, "plot_cam_methods")
        fig = flat[0].figure
    img = as_hwc(image)
    show_image(flat[0], img)
    flat[0].set_title("image", fontsize=LABEL_SIZE)
    for ax, label in zip(flat[1:], labels):
        show_overlay(ax, img, maps[label])
        ax.set_title(label, fontsize=LABEL_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig
