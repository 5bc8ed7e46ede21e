"""Figures in cnnstress.plots: each returns a Figure, draws into given axes,
copes with one or two models, single epochs, empty top-3, and saves PNGs."""
import sys
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cnnstress import plots  # noqa: E402
from cnnstress.data import CLASSES  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def gradcam_overlay(monkeypatch):
    """The real cnnstress.xai.cam.overlay when present, else a stand-in with its contract."""
    try:
        import cnnstress.xai.cam  # noqa: F401
        return "real"
    except ImportError:
        from matplotlib import colormaps

        def overlay(image, cam, alpha=0.5, colormap="jet"):
            img = np.asarray(image, dtype=np.float32)
            if img.max() > 1:
                img = img / 255.0
            heat = colormaps[colormap](np.asarray(cam, dtype=np.float32))[..., :3]
            return ((1 - alpha) * img + alpha * heat).astype(np.float32)

        fake = types.ModuleType("cnnstress.xai.cam")
        fake.overlay = overlay
        monkeypatch.setitem(sys.modules, "cnnstress.xai.cam", fake)
        return "stand-in"


def _history(n, shift=0.0):
    return [dict(epoch=e, train_loss=2.0 / e, train_acc=0.5 + 0.04 * e + shift,
                 val_loss=2.2 / e, val_acc=0.45 + 0.04 * e + shift) for e in range(1, n + 1)]


def _summary(acc, fails):
    return dict(test_accuracy=acc, high_confidence_failures=fails,
                per_class_accuracy={c: acc - 0.01 * i for i, c in enumerate(CLASSES)})


def _failure_inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    cam_pred = np.exp(-((xx - 10) ** 2 + (yy - 12) ** 2) / 60.0).astype(np.float32)
    cam_true = np.exp(-((xx - 22) ** 2 + (yy - 20) ** 2) / 60.0).astype(np.float32)
    return image, cam_pred / cam_pred.max(), cam_true / cam_true.max()


def _assert_png(path, min_size=(50, 50)):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
    return pixels


# --------------------------------------------------------------------------- training curves

@pytest.mark.parametrize("names", [["baseline"], ["baseline", "improved"]])
def test_training_curves_one_and_two_models(names):
    fig = plots.plot_training_curves({n: _history(5, 0.02 * i) for i, n in enumerate(names)})
    assert isinstance(fig, Figure)
    ax_loss, ax_acc = fig.axes[:2]
    assert len(ax_loss.lines) == 2 * len(names)           # train + validation per model
    colors = {line.get_color() for line in ax_acc.lines}
    assert colors == {plots.MODEL_COLORS[n] for n in names}
    styles = {line.get_linestyle() for line in ax_acc.lines}
    assert styles == {"-", "--"}
    ys = ax_acc.lines[0].get_ydata()
    assert ys.max() > 1.0                                  # accuracy shown as percent
    assert ax_loss.get_legend() is not None and ax_acc.get_title() and ax_loss.get_xlabel() == "Epoch"


def test_training_curves_single_epoch_has_markers():
    fig = plots.plot_training_curves({"baseline": _history(1)})
    line = fig.axes[0].lines[0]
    assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")
    lo, hi = fig.axes[0].get_xlim()
    assert lo < 1 < hi


def test_training_curves_into_given_axes():
    fig, axes = plt.subplots(1, 2)
    out = plots.plot_training_curves({"baseline": _history(3), "improved": _history(3, 0.01)}, axes=axes)
    assert out is fig and fig.axes == list(axes)                      # drawn there, no axes added
    assert [len(ax.lines) for ax in axes] == [4, 4]                    # train + validation per model
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), [2.0, 1.0, 2.0 / 3])   # baseline train loss


def test_training_curves_empty_history_says_so():
    fig = plots.plot_training_curves({"baseline": []})
    assert [len(ax.lines) for ax in fig.axes] == [0, 0]
    assert [[t.get_text() for t in ax.texts] for ax in fig.axes] == [["no training history"]] * 2


def test_training_curves_wrong_axes_count():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="needs 2 axes, got 1"):
        plots.plot_training_curves({"baseline": _history(2)}, axes=[ax])


# --------------------------------------------------------------------------- failure case

def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_failure_case_layout_and_titles(gradcam_overlay):
    image, cam_pred, cam_true = _failure_inputs()
    fig = plots.plot_failure_case(image, cam_pred, cam_true, true_name="cat", pred_name="dog", confidence=0.973,
                                  top3=[("dog", 0.973), ("cat", 0.021), ("deer", 0.003)],
                                  note="suspected label error")
    assert isinstance(fig, Figure)
    titles = _titles(fig)
    assert "True: cat\nPredicted: dog (97.3%)" in titles
    assert "Grad-CAM for predicted (dog)" in titles and "Grad-CAM for true (cat)" in titles
    assert "suspected label error" in fig.get_suptitle()
    assert len(fig.axes) == 7                              # 6 panels + colorbar
    bar_ax = fig.axes[3]
    bars = bar_ax.patches
    assert len(bars) == 3
    assert bars[1].get_facecolor() != bars[0].get_facecolor()   # true class highlighted
    overlay_img = fig.axes[2].images[0].get_array()
    assert overlay_img.shape == (32, 32, 3) and float(np.max(overlay_img)) <= 1.0


def test_failure_case_empty_top3_and_chw_image(gradcam_overlay):
    image, cam_pred, cam_true = _failure_inputs()
    fig = plots.plot_failure_case(image.transpose(2, 0, 1), cam_pred, cam_true, true_name="cat", pred_name="dog",
                                  confidence=0.95, top3=[], title="Custom title")
    assert isinstance(fig, Figure)
    assert fig.get_suptitle() == "Custom title"
    assert len(fig.axes[3].patches) == 0


def test_failure_case_true_class_outside_top3(gradcam_overlay):
    image, cam_pred, cam_true = _failure_inputs()
    fig = plots.plot_failure_case(image, cam_pred, cam_true, true_name="automobile", pred_name="truck",
                                  confidence=0.99, top3=[("truck", 0.99), ("ship", 0.005), ("airplane", 0.002)])
    assert "not in top 3" in fig.axes[3].get_xlabel()


def test_failure_case_says_when_a_map_is_all_zero(gradcam_overlay):
    """A true-class map with no positive evidence is labelled, not left as a flat panel."""
    image, cam_pred, _ = _failure_inputs()
    fig = plots.plot_failure_case(image, cam_pred, np.zeros((32, 32)), true_name="bird", pred_name="cat",
                                  confidence=1.0, top3=[("cat", 1.0), ("dog", 0.0), ("frog", 0.0)])
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    assert texts["Grad-CAM for true (bird)"] == ["all zero:\nno positive evidence\nfor bird at this layer"]
    assert texts["Grad-CAM for predicted (cat)"] == []


def test_sanity_check_grid_says_which_maps_are_all_zero():
    """In the map grid under the curves, a map the randomised model gives no
    positive evidence is labelled "all zero"; the others are not."""
    steps = ["original", "linear", "layer4"]
    summary = {"gradcam": {"steps": steps, "median_ssim": [1.0, 0.2, 0.1],
                           "verdict": {"passed": True, "threshold": 0.5,
                                       "median_per_step": {"original": 1.0, "linear": 0.3, "layer4": 0.2}}}}
    maps = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float32)
    maps[2, 1] = 0.0                                    # image 2 after layer4 is re-initialised
    fig = plots.plot_sanity_check({"baseline": summary}, maps, steps)
    grid = [ax for ax in fig.axes if ax.images]
    assert len(grid) == 6
    labelled = [(ax.get_title(), [t.get_text() for t in ax.texts]) for ax in grid if ax.texts]
    assert labelled == [("", ["all zero"])]
    assert grid[5].texts and np.all(grid[5].images[0].get_array() == 0)   # row 2, column 3


def test_failure_case_into_given_axes(gradcam_overlay):
    image, cam_pred, cam_true = _failure_inputs()
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    out = plots.plot_failure_case(image, cam_pred, cam_true, true_name="cat", pred_name="dog", confidence=0.9,
                                  top3=[("dog", 0.9), ("cat", 0.05), ("frog", 0.01)], title="#1", note="n",
                                  axes=axes)
    assert out is fig
    assert axes[0, 0].get_title().startswith("#1\nn\nTrue: cat")


def test_no_failures_figure(tmp_path):
    fig = plots.plot_no_failures(0.95, "improved")
    assert isinstance(fig, Figure)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "No high-confidence failures" in texts and "95%" in texts and "improved" in texts
    _assert_png(plots.save_figure(fig, tmp_path / "none.png"))
    fig2, ax = plt.subplots()
    assert plots.plot_no_failures(0.9, "baseline", ax=ax) is fig2


# --------------------------------------------------------------------------- comparison

@pytest.mark.parametrize("names", [["baseline"], ["baseline", "improved"]])
def test_model_comparison_one_and_two_models(names):
    summaries = {n: _summary(0.93 + 0.01 * i, 100 - 20 * i) for i, n in enumerate(names)}
    fig = plots.plot_model_comparison(summaries)
    assert isinstance(fig, Figure)
    ax_acc, ax_fail, ax_cls = fig.axes[:3]
    assert len(ax_acc.patches) == len(names) and len(ax_fail.patches) == len(names)
    assert len(ax_cls.patches) == len(names) * len(CLASSES)
    acc_labels = [t.get_text() for t in ax_acc.texts]
    assert "93%" in acc_labels
    assert [t.get_text() for t in ax_fail.texts] == [str(100 - 20 * i) for i in range(len(names))]
    assert [tuple(p.get_facecolor()[:3]) for p in ax_acc.patches] == \
        [matplotlib.colors.to_rgb(plots.MODEL_COLORS[n]) for n in names]


def test_model_comparison_into_given_axes_and_missing_class():
    fig, axes = plt.subplots(1, 3)
    summary = _summary(0.9, 3)
    del summary["per_class_accuracy"]["cat"]
    assert plots.plot_model_comparison({"baseline": summary}, axes=axes) is fig and fig.axes == list(axes)
    heights = [p.get_height() for p in axes[2].patches]
    want = [100 * (0.9 - 0.01 * i) for i in range(len(CLASSES))]
    want[CLASSES.index("cat")] = np.nan                              # a gap, not a zero bar
    np.testing.assert_allclose(heights, want)
    assert [t.get_text() for t in axes[2].get_xticklabels()] == list(CLASSES)


# --------------------------------------------------------------------------- confusion matrix

def test_confusion_matrix_counts_and_text_colours():
    cm = np.full((10, 10), 5, dtype=int)
    np.fill_diagonal(cm, 900)
    cm[3] = 0                                             # a class never seen: no division by zero
    fig = plots.plot_confusion_matrix(cm)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert texts["900"] == "white" and texts["5"] != "white"
    assert len(ax.texts) == 100
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert ax.get_xticklabels()[0].get_rotation() == 45
    assert ax.images[0].get_array().max() <= 1.0          # row-normalised


def test_confusion_matrix_raw_counts_into_ax_and_bad_shape():
    fig, ax = plt.subplots()
    out = plots.plot_confusion_matrix(np.eye(3, dtype=int) * 7, classes=("a", "b", "c"), normalize=False, ax=ax)
    assert out is fig
    assert ax.images[0].get_array().max() == 7
    with pytest.raises(ValueError, match=r"must be \(3, 3\), got \(3, 4\)"):
        plots.plot_confusion_matrix(np.zeros((3, 4), dtype=int), classes=("a", "b", "c"))


# --------------------------------------------------------------------------- saving

def test_save_figure_writes_png_atomically(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "sub" / "fig.png"
    assert plots.save_figure(fig, path, dpi=50) == path
    pixels = _assert_png(path)
    assert pixels.shape[:2] == (150, 200)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fig.png"]   # no temp file left


def test_save_every_figure(tmp_path, gradcam_overlay):
    image, cam_pred, cam_true = _failure_inputs()
    figs = {
        "curves": plots.plot_training_curves({"baseline": _history(3)}),
        "failure": plots.plot_failure_case(image, cam_pred, cam_true, true_name="cat", pred_name="dog",
                                           confidence=0.97, top3=[("dog", 0.97)]),
        "none": plots.plot_no_failures(0.9, "baseline"),
        "compare": plots.plot_model_comparison({"baseline": _summary(0.9, 4), "improved": _summary(0.92, 2)}),
        "cm": plots.plot_confusion_matrix(np.eye(10, dtype=int) * 10),
    }
    for name, fig in figs.items():
        _assert_png(plots.save_figure(fig, tmp_path / f"{name}.png", dpi=40))


def test_model_color_fallbacks():
    assert plots.model_color("baseline") == plots.BASELINE_COLOR
    assert plots.model_color("improved") == plots.IMPROVED_COLOR
    assert plots.model_color("other", 0) not in (plots.BASELINE_COLOR, plots.IMPROVED_COLOR)


def test_plot_samples_grid_titles_and_given_axes():
    images = np.zeros((20, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = 200                                   # NCHW red
    labels = np.arange(20) % 10
    fig = plots.plot_samples(images, labels, CLASSES, n=16)
    assert isinstance(fig, Figure) and len(fig.axes) == 16
    assert [ax.get_title() for ax in fig.axes[:3]] == list(CLASSES[:3])
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (32, 32, 3) and shown[0, 0, 0] == 200   # drawn as HWC
    # NHWC input, fewer images than n, and the caller's axes
    fig2, axes = plt.subplots(1, 3)
    out = plots.plot_samples(np.zeros((3, 32, 32, 3), dtype=np.uint8), [9, 0, 1], n=16, axes=axes)
    assert out is fig2 and [ax.get_title() for ax in axes] == ["truck", "airplane", "automobile"]
    with pytest.raises(ValueError, match=r"must be 4-D .* got shape \(2, 32, 32\)"):
        plots.plot_samples(np.zeros((2, 32, 32), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match=f"{len(images)} images but 5 labels"):
        plots.plot_samples(images, labels[:5])


def test_reliability_diagram_one_panel_per_model_and_given_axes():
    import matplotlib.pyplot as plt
    from cnnstress.robustness.calibration import calibration_bins
    from cnnstress.plots import plot_reliability_diagram
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=200)
    labels = rng.integers(0, 10, size=200)
    bins = {"baseline": calibration_bins(probs, labels), "improved": calibration_bins(probs ** 2 / (probs ** 2).sum(1, keepdims=True), labels)}
    fig = plot_reliability_diagram(bins)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 and titles[0].startswith("baseline: ECE") and "MCE" in titles[1]
    plt.close(fig)
    fig2, axes = plt.subplots(1, 2)
    assert plot_reliability_diagram(bins, axes=axes) is fig2
    with pytest.raises(ValueError, match="needs 2 axes"):
        plot_reliability_diagram(bins, axes=axes[:1])
    plt.close(fig2)


def test_faithfulness_shows_both_random_baselines_and_both_verdicts():
    curve = [0.9, 0.5, 0.1]

    def method(auc, **verdicts):
        return {"deletion_auc": auc, "insertion_auc": auc, "deletion_curve": curve, "insertion_curve": curve[::-1],
                **verdicts}

    group = {"n": 8, "fractions": [0.0, 0.5, 1.0], "methods": {
        "gradcam": method(0.2, verdict="better than random", verdict_smooth="not distinguishable from random"),
        "gradcam++": method(0.3, verdict="better on deletion only", verdict_smooth="worse than random"),
        "random": method(0.5), "random_smooth": method(0.45)}}
    fig = plots.plot_faithfulness({"baseline": {"failures": {"n": 0}, "sample": group}})
    assert isinstance(fig, Figure)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    insertion = [t.get_text() for t in by_title["baseline, sample (n=8): insertion"].get_legend().get_texts()]
    assert insertion == ["Grad-CAM AUC 0.200 [better | n.s.]", "Grad-CAM++ AUC 0.300 [better on del. only | worse]",
                         "random (pixel noise) AUC 0.500", "random (smooth) AUC 0.450"]
    deletion = [t.get_text() for t in by_title["baseline, sample (n=8): deletion"].get_legend().get_texts()]
    assert "random (smooth) AUC 0.450" in deletion and not any("[" in t for t in deletion)


def test_model_comparison_stacks_the_failure_groups():
    summaries = {"baseline": _summary(0.9, 10), "improved": _summary(0.92, 9)}
    groups = {"a": 10, "b": 9, "fixed": 4, "persisting": 6, "still_high_confidence": 5, "wrong_low_confidence": 1,
              "new": 3, "newly_confident": 1}
    fig = plots.plot_model_comparison(summaries, failure_groups=groups)
    ax_fail = fig.axes[1]
    heights = [round(p.get_height()) for p in ax_fail.patches]
    assert heights == [10, 9, 4, 1, 5, 5, 1, 3]          # two outlines, then the stacked segments
    labels = ax_fail.get_legend_handles_labels()[1]
    assert labels == ["fixed", "wrong, less sure", "in both", "newly confident", "new (baseline right)"]
    with pytest.raises(ValueError, match="add up"):
        plots.plot_model_comparison(summaries, failure_groups={**groups, "new": 4})
    with pytest.raises(ValueError, match="two models"):
        plots.plot_model_comparison({"baseline": summaries["baseline"]}, failure_groups=groups)


def test_show_overlay_draws_the_clipped_gradcam_overlay(gradcam_overlay):
    """plots.style.show_overlay is cnnstress.xai.cam.overlay, clipped to [0, 1], drawn pixel for pixel."""
    import cnnstress.xai.cam
    from cnnstress.plots.style import show_overlay
    image, cam, _ = _failure_inputs()
    fig, ax = plt.subplots()
    im = show_overlay(ax, image, cam, cmap="viridis")
    expected = np.clip(cnnstress.xai.cam.overlay(image, cam, colormap="viridis"), 0.0, 1.0)
    assert np.array_equal(im.get_array(), expected)
    assert ax.get_xticks().size == 0 and im.get_interpolation() == "nearest"


# --------------------------------------------------------------------------- label suspects

def _suspect_entries(n_suspect, n_model, reviewed=()):
    rng = np.random.default_rng(3)
    entries = []
    for i in range(n_suspect + n_model):
        e = {"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "given": "automobile",
             "predicted": "airplane", "confidence": 0.99, "suspect": i < n_suspect, "dataset_index": 9000 + i}
        if i in reviewed:
            e.update(review="1 of 5 reviewers: automobile", label_error=i % 2 == 0)
        entries.append(e)
    return entries


@pytest.mark.parametrize("n_suspect, n_model, reviewed, title", [
    (12, 12, (0, 5, 10, 15, 21, 23), "one\ntwo\nthree"),     # review lines on every row, the last one too
    (7, 0, (6,), "a title"),                                    # an empty group keeps its heading
    (0, 3, (), ""),
    (0, 0, (), "nothing to show"),
])
def test_label_suspects_text_never_overlaps_and_stays_inside(n_suspect, n_model, reviewed, title):
    """Every piece of text (the title, the group headings, each tile's three
    lines and its review line) lies inside the figure and overlaps no other
    text or another tile's image; the review line sits under its own tile."""
    entries = _suspect_entries(n_suspect, n_model, reviewed)
    fig = plots.plot_label_suspects(entries, title=title, totals={True: n_suspect + 40, False: n_model})
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    boxes = [t.get_window_extent(r) for t in texts]
    inside = fig.bbox.padded(0.5)
    for t, b in zip(texts, boxes):
        assert inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1, t.get_text()
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    images = {ax: ax.get_window_extent(r) for ax in fig.axes}
    assert len(images) == n_suspect + n_model
    for t, b in zip(texts, boxes):
        for ax, img in images.items():
            if t in (ax.title, ax.xaxis.label):
                assert (b.y0 >= img.y1) if t is ax.title else (b.y1 <= img.y0), t.get_text()
            else:
                assert not b.overlaps(img), (t.get_text(), ax.get_title())
    shown = [t.get_text() for t in texts]
    assert shown.count("1 of 5 reviewers: automobile") == len(reviewed)
    assert f"Suspected label errors: {n_suspect + 40} ({n_suspect} shown)" in shown
