"""The pipeline's stages, shared by the notebook and the command line.

Each stage reads what earlier stages left under the output folder when it
matches the config, so any stage can be rerun on its own without retraining.

    outputs/
      baseline/checkpoint.pt, history.json     (augment preset "baseline")
      improved/checkpoint.pt, history.json     (augment preset "enhanced")
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .augment import normalize, to_float
from .checkpoint import check_config_matches, read_checkpoint
from .compare import bootstrap_accuracy_diff, compare_failures, mcnemar
from .config import Config
from .data import CLASSES, CifarSplits, load_splits
from .errors import CheckpointError, CnnstressError
from .evaluate import Failure, FailureTable, Predictions, mine_failures, predict, summarize
from .robustness.corruptions import CORRUPTIONS, SEVERITIES
from .io import atomic_write, ensure_writable_dir
from .lock import locks_output
from .schema import explanations_schema, read_cache, stress_schema
from .runtime import resolve_device, resolve_precision
from .train import FitResult, fit, load_model

DEFAULT_DATA_DIR = "data"
DEFAULT_OUT_DIR = "outputs"
ENV_PROFILE, ENV_DATA_DIR, ENV_OUT_DIR = "CNNSTRESS_PROFILE", "CNNSTRESS_DATA_DIR", "CNNSTRESS_OUT_DIR"
RUN_NAMES = {"baseline": "baseline", "enhanced": "improved"}  # augment preset -> model name


def default_data_dir() -> str:
    return os.environ.get(ENV_DATA_DIR, DEFAULT_DATA_DIR)


def default_out_dir() -> str:
    return os.environ.get(ENV_OUT_DIR, DEFAULT_OUT_DIR)


def default_profile(explicit: str | None = None, *, fallback: str | None = None) -> str:
    """The profile to use: `explicit` (a --profile flag) when given, else
    $CNNSTRESS_PROFILE, else `fallback`, else full on a GPU and quick on a CPU.
    The variable sets a default; it never overrides a flag."""
    if explicit:
        return explicit
    if ENV_PROFILE in os.environ:
        return os.environ[ENV_PROFILE]
    if fallback:
        return fallback
    import torch
    return "full" if torch.cuda.is_available() else "quick"


def run_name(config: Config) -> str:
    return RUN_NAMES[config.augment]


def checkpoint_path(out_dir: str | Path, config: Config) -> Path:
    return Path(out_dir) / run_name(config) / "checkpoint.pt"


@dataclass
class Trained:
    """A trained model and what produced it."""
    name: str
    result: FitResult
    checkpoint: Path
    stamp: str | None = None        # a stable identity for caches (published weights: SHA-256s)
    reference: dict | None = None   # published weights: the source run's test numbers

    @property
    def model(self):
        return self.result.model

    @property
    def config(self) -> Config:
        return self.result.config


def load_data(config: Config, data_dir: str | Path | None = None) -> CifarSplits:
    """Stage 3: CIFAR-10 split as `config` says (downloads when missing)."""
    return load_splits(data_dir or default_data_dir(), config)


@locks_output
def train_model(config: Config, splits: CifarSplits, out_dir: str | Path | None = None, *,
                force: bool = False, resume: bool = True, progress: bool | None = None,
                log: Callable[[str], None] | None = print, weights: str | Path | None = None) -> Trained:
    """Stages 5 and 9: train one model, or reuse its finished checkpoint, or
    with weights=DIR load the published model instead (never trains; see
    published_model).

    An unfinished checkpoint with the same training config is continued
    (resume=True) or refused (resume=False); one with another config is
    refused unless force=True, which starts over and replaces it.
    """
    if weights is not None:
        if out_dir is not None and Path(out_dir).resolve() == Path(weights).resolve():
            raise CnnstressError(f"the output folder {out_dir} is the published weights folder; "
                                 "choose another --out-dir (outputs never go beside published weights)")
        trained = published_model(config, weights)
        if log:
            log(f"{trained.name}: published weights {trained.checkpoint.parent} ({trained.result.resumed_from_epoch} "
                f"epochs, {trained.stamp[:19]}...), not trained here")
        return trained
    out_dir = Path(out_dir or default_out_dir())
    path = checkpoint_path(out_dir, config)
    ensure_writable_dir(path.parent)
    if path.exists() and not force:
        ckpt = read_checkpoint(path)
        check_config_matches(ckpt, config, path)
        done = int(ckpt["epoch"])
        if done < config.epochs and not resume:
            raise CheckpointError(f"{path} holds an unfinished run ({done}/{config.epochs} epochs); "
                                  "pass --resume to continue it or --force to start over")
        if done >= config.epochs and log:
            log(f"reusing finished checkpoint {path} ({done} epochs); --force retrains")
    result = fit(config, splits, checkpoint_path=path, resume=not force, progress=progress, log=log)
    return Trained(name=run_name(config), result=result, checkpoint=path)


RETRAIN = "retrain both models with `python -m cnnstress run --force` and the same options"


def load_trained(config: Config, out_dir: str | Path | None = None) -> Trained:
    """A finished model from its checkpoint, without training."""
    path = checkpoint_path(out_dir or default_out_dir(), config)
    try:
        model, ckpt = load_model(path, config, device=resolve_device(config.device))
    except CheckpointError as exc:
        # The advice there is for `train`/`run`, whose --force retrains; name a command that does.
        raise CheckpointError(str(exc).replace("retrain with --force", RETRAIN)) from None
    if int(ckpt["epoch"]) < config.epochs:
        raise CheckpointError(f"{path} is unfinished ({ckpt['epoch']}/{config.epochs} epochs); finish training "
                              "with `python -m cnnstress run` and the same options (it resumes from there)")
    result = FitResult(model=model, history=list(ckpt["history"]), config=config,
                       resumed_from_epoch=int(ckpt["epoch"]), reused=True)
    return Trained(name=run_name(config), result=result, checkpoint=path)


def published_model(config: Config, weights_dir: str | Path) -> Trained:
    """A published model (cnnstress.weights) for `config`'s augmentation
    preset, never trained: its hashes must verify and its training config must
    be config.profile's. The analysis uses `config` (device, sizes)."""
    from .config import PROFILES
    from .errors import ConfigError
    from .weights import METADATA_FILE, load_published

    if config.profile not in PROFILES:
        raise ConfigError(f"published weights need the profile they were trained with (one of {', '.join(PROFILES)}), "
                          f"got {config.profile!r}")
    name = run_name(config)
    pub = load_published(weights_dir, expect_profile=config.profile, device=resolve_device(config.device),
                         names=(name,))[name]
    result = FitResult(model=pub.model, history=pub.history, config=config, resumed_from_epoch=pub.epochs,
                       reused=True)
    return Trained(name=name, result=result, checkpoint=Path(weights_dir) / METADATA_FILE, stamp=pub.stamp,
                   reference=pub.reference)


def evaluate_split(trained: Trained, split) -> Predictions:
    """Predictions of a trained model on one split (test set for the analysis)."""
    config = trained.config
    device = resolve_device(config.device)
    return predict(trained.model, split.images, split.labels, device=device,
                   batch_size=config.eval_batch_size,
                   amp_dtype=resolve_precision(config.precision, device),
                   channels_last=config.channels_last)


# --- analysis stages ---------------------------------------------------------

def _checkpoint_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def model_stamp(trained: Trained) -> str:
    """What a cache made from this model is keyed by ("" = no identity, never cached)."""
    if trained.stamp:
        return trained.stamp
    return _checkpoint_stamp(trained.checkpoint) if trained.checkpoint.exists() else ""


def predictions_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"predictions_{name}.npz"


@locks_output
def evaluate_model(trained: Trained, split, out_dir: str | Path | None = None, *,
                   force: bool = False, log: Callable[[str], None] | None = print) -> Predictions:
    """Stage 7: test-set predictions, cached as predictions_<name>.npz (probs
    (N,10) float32, labels, preds, logits, dataset indices). The cache is used
    when it was made from this very checkpoint file and these test images; an
    unreadable or malformed one is recomputed (with a line to `log`)."""
    out_dir = Path(out_dir or default_out_dir())
    path = predictions_path(out_dir, trained.name)
    stamp = model_stamp(trained)
    indices = split.indices.numpy()
    if path.exists() and not force and stamp:
        cached = _read_predictions(path, stamp, indices, log)
        if cached is not None:
            return cached
    preds = evaluate_split(trained, split)
    ensure_writable_dir(out_dir)
    arrays = dict(probs=preds.probs.numpy(), labels=preds.labels.numpy(), preds=preds.preds.numpy(),
                  logits=preds.logits.numpy(), dataset_indices=indices,
                  checkpoint_stamp=np.array(stamp), classes=np.array(CLASSES))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)
    return preds


def _read_predictions(path: Path, stamp: str, indices: np.ndarray,
                      log: Callable[[str], None] | None) -> Predictions | None:
    """The cached Predictions when `path` holds this checkpoint's predictions
    for these test images, with the shapes and dtypes evaluate_model writes."""
    n = indices.shape[0]
    try:
        with np.load(path, allow_pickle=False) as cached:
            if (str(cached["checkpoint_stamp"]) != stamp
                    or not np.array_equal(cached["dataset_indices"], indices)):
                return None
            arrays = {k: cached[k] for k in ("logits", "probs", "preds", "labels")}
    except Exception as exc:  # truncated, not a zip, not numpy, a missing array: all a cache miss
        if log:
            log(f"predictions: {path} is unreadable ({type(exc).__name__}); recomputing")
        return None
    shapes = {"logits": (n, len(CLASSES)), "probs": (n, len(CLASSES)), "preds": (n,), "labels": (n,)}
    bad = [k for k, a in arrays.items()
           if a.shape != shapes[k] or a.dtype.kind != ("f" if k in ("logits", "probs") else "i")]
    if bad:
        if log:
            log(f"predictions: {path} holds a malformed {bad[0]} array; recomputing")
        return None
    return Predictions(**{k: torch.from_numpy(a) for k, a in arrays.items()})


@locks_output
def find_failures(preds: Predictions, split, config: Config, name: str,
                  out_dir: str | Path | None = None, threshold: float | None = None,
                  save: bool = True) -> FailureTable:
    """Stage 7: wrong predictions above the confidence threshold, ranked, saved
    as failures_<name>.csv."""
    threshold = config.failure_threshold if threshold is None else threshold
    table = mine_failures(preds.probs, preds.labels, threshold, dataset_indices=split.indices)
    if save:
        table.to_csv(Path(out_dir or default_out_dir()) / f"failures_{name}.csv")
    return table


@dataclass
class FailureCase:
    """One explained failure: which image, and where each class's Grad-CAM lies."""
    rank: int
    failure: Failure
    image: np.ndarray            # HWC uint8 RGB
    cam_pred: np.ndarray         # (H,W) in [0,1], Grad-CAM for the predicted class
    cam_true: np.ndarray         # (H,W) in [0,1], Grad-CAM for the true class
    where_pred: dict
    where_true: dict
    figure: Path | None = None
    label_suspect: bool = False   # confident learning flags the label as possibly wrong


SUSPECT_NOTE = "suspected label error (confident learning)"
SUSPECT_NOTE_WEAK = "label suspect (confident learning; unreliable for this model, see report)"


@locks_output
def explain_failures(trained: Trained, split, failures: FailureTable, out_dir: str | Path | None = None, *,
                     k: int | None = None, layer: str = "layer4", save: bool = True,
                     show: bool = False, suspects=(), suspects_reliable: bool = True) -> list[FailureCase]:
    """Stage 8: Grad-CAM for the predicted and the true class of the top-k
    failures; writes failure_case_<i>.png (or a 'no failures' figure).
    `suspects`: positions flagged as possible label errors (suspects_for);
    their figures and cases say so (with a caveat unless suspects_reliable)."""
    import matplotlib.pyplot as plt

    from .xai.cam import GradCAM, describe_cam, get_layer
    from .plots import plot_failure_case, plot_no_failures, save_figure

    out = Path(out_dir or default_out_dir())
    k = trained.config.top_failures if k is None else k
    rows = failures.rows[:k]
    if save:
        for stale in out.glob("failure_case_*.png"):
            stale.unlink()
    if not rows:
        fig = plot_no_failures(failures.threshold if failures.threshold is not None
                               else trained.config.failure_threshold, trained.name)
        if save:
            save_figure(fig, out / "failure_case_1.png")
        if not show:
            plt.close(fig)
        return []
    device = resolve_device(trained.config.device)
    positions = torch.tensor([f.position for f in rows])
    images = split.images[positions]
    x = normalize(to_float(images)).to(device)
    model = trained.model
    cam = GradCAM(model, get_layer(model, layer) if isinstance(layer, str) else layer)
    pred_maps = cam(x, [f.pred for f in rows]).cpu().numpy()
    true_maps = cam(x, [f.true for f in rows]).cpu().numpy()
    cases = []
    for i, f in enumerate(rows):
        image = images[i].permute(1, 2, 0).numpy()
        suspect = f.position in set(suspects)
        case = FailureCase(rank=i + 1, failure=f, image=image, cam_pred=pred_maps[i], cam_true=true_maps[i],
                           where_pred=describe_cam(pred_maps[i]), where_true=describe_cam(true_maps[i]),
                           label_suspect=suspect)
        fig = plot_failure_case(
            image, pred_maps[i], true_maps[i], true_name=CLASSES[f.true], pred_name=CLASSES[f.pred],
            confidence=f.confidence, top3=[(CLASSES[c], p) for c, p in f.top3],
            title=f"{trained.name} failure #{i + 1}: test image {f.dataset_index}",
            note=(SUSPECT_NOTE if suspects_reliable else SUSPECT_NOTE_WEAK) if suspect else None)
        if save:
            case.figure = save_figure(fig, out / f"failure_case_{i + 1}.png")
        if not show:
            plt.close(fig)
        cases.append(case)
    return cases


@locks_output
def save_training_curves(histories: dict, out_dir: str | Path | None = None, show: bool = False):
    """Stage 6: training_curves.png for every model trained so far."""
    import matplotlib.pyplot as plt

    from .plots import plot_training_curves, save_figure
    fig = plot_training_curves(histories)
    path = save_figure(fig, Path(out_dir or default_out_dir()) / "training_curves.png")
    if not show:
        plt.close(fig)
    return path


def compare_models(preds: dict[str, Predictions], failures: dict[str, FailureTable],
                   config: Config, n_boot: int = 2000) -> dict:
    """Stages 10-11: paired comparison of baseline and improved on the same
    test images: accuracy difference with a bootstrap CI, McNemar's test, and
    which baseline failures were fixed or persist, and which of the improved
    model's are new (the baseline was right) or newly confident."""
    a, b = preds["baseline"], preds["improved"]
    if not torch.equal(a.labels, b.labels):
        raise ValueError("the two models were evaluated on different test images")
    correct_a = (a.preds == a.labels).numpy()
    correct_b = (b.preds == b.labels).numpy()
    return {
        "accuracy_diff": bootstrap_accuracy_diff(correct_a, correct_b, n_boot=n_boot, seed=config.seed),
        "mcnemar": mcnemar(correct_a, correct_b),
        "failures": compare_failures(failures["baseline"], failures["improved"], b.preds, b.labels, preds_a=a.preds),
        "threshold": failures["baseline"].threshold,
    }


@locks_output
def save_comparison_figures(summaries: dict[str, dict], out_dir: str | Path | None = None,
                            show: bool = False, comparison: dict | None = None) -> list[Path]:
    """model_comparison.png (failure bars split by group when `comparison`,
    compare_models' result, is given) and confusion_matrix.png (a panel per model)."""
    import matplotlib.pyplot as plt

    from .plots import plot_confusion_matrix, plot_model_comparison
    out = Path(out_dir or default_out_dir())
    fig, axes = plt.subplots(1, len(summaries), figsize=(7.5 * len(summaries), 6.5), squeeze=False,
                             constrained_layout=True)
    for ax, (name, s) in zip(axes[0], summaries.items()):
        plot_confusion_matrix(np.array(s["confusion_matrix"]), title=f"{name}: confusion matrix "
                              f"(test accuracy {100 * s['test_accuracy']:.2f}%)", ax=ax)
    groups = comparison["failures"]["counts"] if comparison is not None else None
    figures = {"model_comparison.png": plot_model_comparison(summaries, failure_groups=groups), "confusion_matrix.png": fig}
    return _save_figures(figures, out, save=True, show=show)


def _save_figures(figures: dict, out: Path, *, save: bool, show: bool) -> list[Path]:
    """Save {file name: Figure} under `out` (when save) and close each figure
    unless it is to be shown (a notebook displays it)."""
    import matplotlib.pyplot as plt

    from .plots import save_figure
    paths = []
    for filename, fig in figures.items():
        if save:
            paths.append(save_figure(fig, out / filename))
        if not show:
            plt.close(fig)
    return paths


# --- stress tests ------------------------------------------------------------

def stress_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"stress_{name}.json"


@locks_output
def stress_test(trained: dict[str, Trained], splits: CifarSplits, preds: dict[str, Predictions],
                out_dir: str | Path | None = None, config: Config | None = None, *, force: bool = False,
                save: bool = True, show: bool = False, progress: bool | None = None, cached_only: bool = False,
                log: Callable[[str], None] | None = print) -> dict[str, dict] | None:
    """Stage 12: calibration, corruption robustness and adversarial accuracy
    for every model (see cnnstress.robustness.suite). Results are cached per model in
    stress_<name>.json, reused when made from the same checkpoint, test images
    and stress settings. Writes corruption_accuracy.csv and the figures
    robustness.png, corruption_examples.png, reliability_diagram.png and
    adversarial.png. Returns {model name: results}; with cached_only, None
    unless every model's results are cached."""
    from .robustness.adversarial import adversarial_accuracy
    from .io import save_json
    from .robustness.suite import calibration_report, corruption_report, count_failures, sample_positions, stress_settings
    from .runtime import progress_bar, progress_enabled

    out = ensure_writable_dir(out_dir or default_out_dir())
    config = config or next(iter(trained.values())).config
    settings = stress_settings(config)
    say = log or (lambda _msg: None)
    test_indices = splits.test.indices.tolist()
    keys = {name: {"checkpoint_stamp": model_stamp(t),
                   "test_indices": test_indices, "settings": settings} for name, t in trained.items()}
    results: dict[str, dict] = {}
    for name in trained:
        cached = None if force or not keys[name]["checkpoint_stamp"] else read_cache(
            stress_path(out, name), keys[name], stress_schema(len(config.adv_eps)), say)
        if cached is not None:
            results[name] = cached
            say(f"stress: reusing {stress_path(out, name)}")
    todo = [name for name in trained if name not in results]
    if todo and cached_only:
        say("stress: no cached results match these models and settings; `python -m cnnstress stress` computes them")
        return None
    if todo:
        device = resolve_device(config.device)
        show_bar = progress_enabled(progress)
        t0 = time.perf_counter()
        for name in todo:
            t = trained[name]
            val_logits = evaluate_split(t, splits.val).logits
            results[name] = {"calibration": calibration_report(val_logits, splits.val.labels, preds[name], config)}
        temperatures = {name: results[name]["calibration"]["temperature"] for name in todo}
        bar = progress_bar(len(CORRUPTIONS), "corruptions (5 severities each)", show_bar)
        try:
            corr = corruption_report({name: trained[name].model for name in todo}, splits.test, config,
                                     device=device, temperatures=temperatures,
                                     progress=(lambda _type: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        t_corr = time.perf_counter() - t0
        adv_pos = sample_positions(splits.test.labels, config.adv_subset, config.seed + 1)
        for name in todo:
            results[name]["corruptions"] = corr[name]
            t1 = time.perf_counter()
            results[name]["adversarial"] = adversarial_accuracy(
                trained[name].model, splits.test.images[adv_pos], splits.test.labels[adv_pos],
                eps_list=[k / 255 for k in config.adv_eps], steps=config.pgd_steps, seed=config.seed,
                device=device, batch_size=config.eval_batch_size, progress=show_bar)
            results[name]["adversarial"]["eps_255"] = list(config.adv_eps)
            results[name]["seconds"] = {"calibration_and_corruptions": t_corr / len(todo),
                                        "adversarial": time.perf_counter() - t1}
            if save:
                save_json(stress_path(out, name), {"key": keys[name], "results": results[name]})
    for name, r in results.items():
        count_failures(r["calibration"], preds[name], config.failure_threshold)
        say(f"stress {name}: ECE {100 * r['calibration']['uncalibrated']['ece']:.2f}% -> "
            f"{100 * r['calibration']['calibrated']['ece']:.2f}% (T={r['calibration']['temperature']:.3f}), "
            f"mean corruption accuracy {100 * r['corruptions']['mean_corruption_accuracy']:.2f}%, "
            f"PGD {config.adv_eps[-1]}/255 accuracy {100 * r['adversarial']['pgd'][-1]:.1f}%")
    if save or show:
        save_stress_outputs(results, preds, splits, config, out, save=save, show=show)
    return results


@locks_output
def save_stress_outputs(results: dict[str, dict], preds: dict[str, Predictions], splits: CifarSplits,
                        config: Config, out_dir: str | Path, *, save: bool = True, show: bool = False) -> list[Path]:
    """corruption_accuracy.csv and the four stress figures."""
    from .robustness.calibration import apply_temperature, calibration_bins
    from .plots import plot_adversarial, plot_corruption_examples, plot_reliability_diagram, plot_robustness
    from .robustness.suite import sample_grid_images, write_corruption_csv

    out = Path(out_dir)
    paths = []
    if save:
        paths.append(write_corruption_csv(out / "corruption_accuracy.csv",
                                          {n: r["corruptions"] for n, r in results.items()}))
    bins = {}
    for name, r in results.items():
        t = r["calibration"]["temperature"]
        bins[name] = calibration_bins(preds[name].probs, preds[name].labels, config.calibration_bins)
        bins[f"{name}, T={t:.2f}"] = calibration_bins(apply_temperature(preds[name].logits, t),
                                                       preds[name].labels, config.calibration_bins)
    index, grid = sample_grid_images(splits.test, config)
    figures = {
        "robustness.png": plot_robustness({n: r["corruptions"] for n, r in results.items()}),
        "corruption_examples.png": plot_corruption_examples(grid, title=f"Test image {index} under each corruption"),
        "reliability_diagram.png": plot_reliability_diagram(bins, ncols=2),
        "adversarial.png": plot_adversarial({n: r["adversarial"] for n, r in results.items()}),
    }
    return paths + _save_figures(figures, out, save=save, show=show)


# --- explanations and failure triage -----------------------------------------

EXPLANATIONS_FILE = "explanations.json"
SANITY_FIGURE_IMAGES = 3    # images whose maps are drawn at every randomisation step
SUSPECT_TILES = 12          # tiles per group in label_suspects.png


def suspects_for(preds: Predictions, failures: FailureTable) -> dict:
    """Confident-learning label suspects among the failures (cheap: probabilities only)."""
    from .xai.checks import label_suspects
    return label_suspects(preds, failures)


@locks_output
def explain_models(trained: dict[str, Trained], splits: CifarSplits, preds: dict[str, Predictions],
                   failures: dict[str, FailureTable], comparison: dict, out_dir: str | Path | None = None,
                   config: Config | None = None, *, force: bool = False, save: bool = True, show: bool = False,
                   cached_only: bool = False, log: Callable[[str], None] | None = print) -> dict | None:
    """Stage 13: faithfulness (deletion/insertion AUC of Grad-CAM, Grad-CAM++
    and a random map), the parameter-randomisation sanity check, explanation
    drift between the two models and confident-learning label suspects (see
    cnnstress.xai.checks). Cached in explanations.json (reused when made from the
    same checkpoints, test images and settings); writes faithfulness.png,
    sanity_check.png, label_suspects.png and cam_methods.png. With
    cached_only, returns None unless the cache matches."""
    from .io import save_json
    from .xai.checks import (agreed_suspects, drift_report, explanation_settings, faithfulness_report,
                          label_suspects, sanity_report)
    from .xai.randomisation import verdict_word

    out = ensure_writable_dir(out_dir or default_out_dir())
    config = config or next(iter(trained.values())).config
    say = log or (lambda _msg: None)
    key = {"checkpoint_stamps": {n: model_stamp(t) for n, t in trained.items()},
           "test_indices": splits.test.indices.tolist(), "settings": explanation_settings(config)}
    path = out / EXPLANATIONS_FILE
    result = None
    if not force and all(key["checkpoint_stamps"].values()):
        result = read_cache(path, key, explanations_schema(list(trained)), say)
        if result is not None:
            say(f"explanations: reusing {path}")
    if result is None and cached_only:
        say("explanations: no cached results match these models and settings; `python -m cnnstress explain` computes them")
        return None
    if result is None:
        device = resolve_device(config.device)
        t0 = time.perf_counter()
        result = {"faithfulness": {}, "sanity": {}, "label_suspects": {}, "seconds": {}}
        sanity_maps = None
        for name, t in trained.items():
            t1 = time.perf_counter()
            result["faithfulness"][name] = faithfulness_report(t.model, splits.test.images, preds[name],
                                                               failures[name], config, device)
            summary, raw = sanity_report(t.model, splits.test.images, preds[name], config, device)
            result["sanity"][name] = summary
            if sanity_maps is None:
                g = raw["gradcam"]
                sanity_maps = {"model": name, "steps": list(g.steps),
                               "maps": np.round(g.maps[:, :SANITY_FIGURE_IMAGES], 3).tolist()}
            result["label_suspects"][name] = label_suspects(preds[name], failures[name])
            result["seconds"][name] = time.perf_counter() - t1
        if {"baseline", "improved"} <= set(trained):
            result["label_agreement"] = agreed_suspects(result["label_suspects"], preds)
            result["drift"] = drift_report({n: trained[n].model for n in ("baseline", "improved")},
                                           splits.test.images, preds, comparison["failures"], config, device)
        result["sanity_maps"] = sanity_maps
        result["seconds"]["total"] = time.perf_counter() - t0
        if save:
            save_json(path, {"key": key, "results": result})
    for name in trained:
        f = result["faithfulness"][name]
        ls = result["label_suspects"][name]
        verdicts = ", ".join(f"{m} {f['sample']['methods'][m]['verdict']} (pixel noise) / "
                             f"{f['sample']['methods'][m]['verdict_smooth']} (smooth)" for m in ("gradcam", "gradcam++"))
        sanity = ", ".join(f"{m} {verdict_word(result['sanity'][name][m]['verdict']['passed'])}"
                           for m in ("gradcam", "gradcam++"))
        say(f"explanations {name}: faithfulness (sample) {verdicts}; sanity check {sanity}; "
            f"{ls['suspect_failures']} of {ls['failures']} failures are suspected label errors")
    if save or show:
        save_explanation_figures(result, trained, splits, preds, failures, config, out, save=save, show=show)
    return result


@locks_output
def save_explanation_figures(result: dict, trained: dict[str, Trained], splits: CifarSplits,
                             preds: dict[str, Predictions], failures: dict[str, FailureTable], config: Config,
                             out_dir: str | Path, *, save: bool = True, show: bool = False) -> list[Path]:
    """faithfulness.png, sanity_check.png, label_suspects.png, cam_methods.png."""
    from .xai.checks import cam_maps
    from .plots import plot_cam_methods, plot_faithfulness, plot_label_suspects, plot_sanity_check

    out = Path(out_dir)
    sm = result.get("sanity_maps") or {}
    figures = {
        "faithfulness.png": plot_faithfulness(result["faithfulness"]),
        "sanity_check.png": plot_sanity_check(
            result["sanity"], np.asarray(sm["maps"], dtype=np.float32) if sm else None, sm.get("steps"),
            map_title=f"{sm.get('model')}: Grad-CAM ({config.cam_layer}) of {SANITY_FIGURE_IMAGES} test images "
                      "as the layers are re-initialised"),
    }
    name = "baseline" if "baseline" in trained else next(iter(trained))
    ls = result["label_suspects"][name]
    entries = []
    for group, positions in (("suspect", ls["suspect_failure_positions"]), ("model", ls["model_error_positions"])):
        for pos in positions[:SUSPECT_TILES]:
            p = preds[name]
            entries.append({"image": splits.test.images[pos].permute(1, 2, 0).numpy(),
                            "given": CLASSES[int(p.labels[pos])], "predicted": CLASSES[int(p.preds[pos])],
                            "confidence": float(p.confidence[pos]), "suspect": group == "suspect",
                            "dataset_index": int(splits.test.indices[pos])})
    title = (f"{name}: high-confidence failures (>{failures[name].threshold:.0%}) triaged by confident "
             f"learning ({ls['suspect_failures']} suspects of {ls['failures']}; at most {SUSPECT_TILES} shown each)")
    if not ls["reliable"]:
        title += (f"\nUNRELIABLE: {ls['flagged_fraction']:.0%} of all test images flagged; the model is too weak "
                  "to tell wrong labels from its own mistakes")
    figures["label_suspects.png"] = plot_label_suspects(
        entries, title=title, totals={True: ls["suspect_failures"], False: ls["failures"] - ls["suspect_failures"]})
    rows = failures[name].rows
    pos = rows[0].position if rows else 0
    model = trained[name].model
    device = resolve_device(config.device)
    x = normalize(to_float(splits.test.images[pos:pos + 1])).to(device)
    target = preds[name].preds[pos:pos + 1]
    maps = {f"{label} {layer}": cam_maps(model, x, target, method, layer)[1][0].numpy()
            for layer in ("layer3", "layer4") for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"))}
    figures["cam_methods.png"] = plot_cam_methods(
        splits.test.images[pos].permute(1, 2, 0).numpy(), maps,
        title=f"{name}, test image {int(splits.test.indices[pos])}: predicted {CLASSES[int(target[0])]}, "
              f"label {CLASSES[int(preds[name].labels[pos])]} (layer3: 8x8 map, layer4: 4x4)")
    return _save_figures(figures, out, save=save, show=show)


@dataclass
class RunResult:
    config: Config
    trained: dict[str, Trained]
    predictions: dict[str, Predictions]
    failures: dict[str, FailureTable]
    summaries: dict[str, dict]
    cases: list[FailureCase]
    comparison: dict
    outputs: Path
    seconds: float
    stress: dict[str, dict] | None = None   # stress_test's results; None when the stage was off
    explanations: dict | None = None        # explain_models' results; None when the stage was off


ANALYSIS_STAGES = ("stress", "explain")


@locks_output
def run_pipeline(config: Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
                 force: bool = False, train: bool = True, focus: str | None = None, force_focus: bool = False,
                 weights: str | Path | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = print, timer=None) -> RunResult:
    """The whole study in one call: baseline, curves, evaluation, failures,
    Grad-CAM, improved model (only the augmentation preset changed),
    comparison, figures, the stress stage (config.stress), the explanation
    stage (config.explain), metrics.json and analysis_report.txt.

    train=False never trains: both models must already have finished
    checkpoints. weights=DIR never trains either: it analyses the models
    published in DIR (cnnstress.weights). force retrains (not with weights)
    and recomputes everything. focus="stress" or
    "explain" (the commands of those names) runs that stage, recomputed when
    force_focus, and includes the other analysis stage only from its cache.
    Each stage is timed (cnnstress.runlog; pass a StageTimer to share one) and
    the timings, hardware and versions are written to run_log.json."""
    if focus is not None and focus not in ANALYSIS_STAGES:
        raise ValueError(f"focus must be one of {ANALYSIS_STAGES} or None, got {focus!r}")

    def mode(stage: str) -> dict:
        return {"force": force or (focus == stage and force_focus), "cached_only": focus not in (None, stage)}
    from .report import write_report
    from .runlog import StageTimer

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    timer = timer if timer is not None else StageTimer(log=log)
    timer.restart()
    out = ensure_writable_dir(out_dir or default_out_dir())
    config.save(out / "config.json")   # the resolved config: `python -m cnnstress run --config` repeats this run
    configs = {"baseline": config.replace(augment="baseline"), "improved": config.replace(augment="enhanced")}
    if weights is not None:  # check the published files (hashes, profile) before reading any data
        from .weights import check_published
        check_published(weights, expect_profile=config.profile)
    splits = load_data(configs["baseline"], data_dir)
    say(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images")
    timer.lap("data", len(splits.train) + len(splits.val) + len(splits.test), "images loaded")
    trained, preds, failures, summaries = {}, {}, {}, {}
    cases: list[FailureCase] = []
    for name, cfg in configs.items():
        say(f"== {name} model (augment preset {cfg.augment!r}) ==")
        if weights is None and not train and not checkpoint_path(out, cfg).exists():
            raise CheckpointError(f"no trained {name} model: checkpoint {checkpoint_path(out, cfg)} not found; "
                                  f"train both models first (python -m cnnstress run) or pass the right --out-dir")
        trained[name] = (train_model(cfg, splits, out, force=force, progress=progress, log=log, weights=weights)
                         if train or weights is not None else load_trained(cfg, out))
        timer.lap(f"train {name}", *(trained_images(trained[name].result, len(splits.train)) if weights is None
                                     else (None, f"published weights loaded from {weights}")))
        if len(trained) == len(configs):  # only complete curves: a failed run must not leave a one-model figure
            save_training_curves({n: t.result.history for n, t in trained.items()}, out)
        preds[name] = evaluate_model(trained[name], splits.test, out, force=force, log=log)
        timer.lap(f"evaluate {name}", len(splits.test), "test images, or read from the cache")
        failures[name] = find_failures(preds[name], splits.test, cfg, name, out)
        summaries[name] = summarize(preds[name], cfg.failure_threshold)
        say(f"{name}: test accuracy {100 * preds[name].accuracy:.2f}%, "
            f"{len(failures[name])} failures above {cfg.failure_threshold:.0%} confidence")
        if trained[name].reference:
            from .weights import describe_reference
            device = resolve_device(cfg.device)
            precision = resolve_precision(cfg.precision, device)
            say(f"{name}: " + describe_reference(trained[name].reference, summaries[name],
                                                 f"{device}, {str(precision or 'fp32').replace('torch.', '')}"))
        if name == "baseline":
            suspects = suspects_for(preds[name], failures[name])
            cases = explain_failures(trained[name], splits.test, failures[name], out, layer=config.cam_layer,
                                     suspects=suspects["suspect_failure_positions"],
                                     suspects_reliable=suspects["reliable"])
        timer.lap(f"failures {name}", what="failure mining" + (", Grad-CAM figures" if name == "baseline" else ""))
    comparison = compare_models(preds, failures, config)
    save_comparison_figures(summaries, out, comparison=comparison)
    timer.lap("compare")
    stress = None
    if config.stress:
        say("== stress tests: calibration, corruptions, adversarial ==")
        stress = stress_test(trained, splits, preds, out, config, progress=progress, log=log, **mode("stress"))
        timer.lap("stress", *stress_images(config, len(splits.test), len(trained)))
    explanations = None
    if config.explain:
        say("== explanations: faithfulness, sanity check, drift, label suspects ==")
        explanations = explain_models(trained, splits, preds, failures, comparison, out, config,
                                      log=log, **mode("explain"))
        timer.lap("explain")
    result = RunResult(config=config, trained=trained, predictions=preds, failures=failures,
                       summaries=summaries, cases=cases, comparison=comparison, outputs=out,
                       seconds=time.perf_counter() - t0, stress=stress, explanations=explanations)
    report = write_report(result)
    timer.lap("report", what="metrics.json, analysis_report.txt")
    timer.write(out / RUN_LOG, resolve_device(config.device), profile=config.profile, config=config.to_dict())
    say(f"report: {report}  ({result.seconds:.0f}s in all)")
    return result


RUN_LOG = "run_log.json"


def trained_images(result: FitResult, train_size: int) -> tuple[int | None, str]:
    """(images trained in this call, what) for a train stage's timing: epochs
    run now x training images (validation and checkpoints are in the time)."""
    epochs = len(result.history) - result.resumed_from_epoch
    if result.reused or epochs <= 0:
        return None, "finished checkpoint reused"
    return epochs * train_size, (f"{epochs} epoch{'s' if epochs != 1 else ''} x {train_size} training images, "
                                 "incl. validation")


def stress_images(config: Config, test_size: int, models: int) -> tuple[int | None, str]:
    """(corrupted images classified, what) for the stress stage's timing: the
    count the stage classifies when it computes (a cached stage takes less)."""
    per_cell = min(config.corruption_subset or test_size, test_size)
    return models * len(CORRUPTIONS) * len(SEVERITIES) * per_cell, (
        f"{models} models x {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} severities x {per_cell} images; "
        f"attacks and calibration in the time too")
