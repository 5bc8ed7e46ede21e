"""Stage: training both models (or reusing / loading them), and their curves.

    outputs/
      baseline/checkpoint.pt, history.json     (augment preset "baseline")
      improved/checkpoint.pt, history.json     (augment preset "enhanced")
      training_curves.png                      (once both models are trained)

The cache is the checkpoint itself: a finished one with the same training
config is reused, an unfinished one resumed (see cnnstress.train.fit).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..augment import PRESETS
from ..budget import TimeBudget, TimeBudgetReached
from ..checkpoint import check_config_matches, read_checkpoint
from ..config import PROFILES, Config
from ..errors import CheckpointError, ConfigError
from ..io import ensure_writable_dir
from ..plots import FigureSpec, close, plot_training_curves, write_figure
from ..registry import BASELINE, IMPROVED, augment_preset, checkpoint_path, model_of
from ..reporting import Figure, Paragraph, Section, pct, per_model
from ..results import Record, optional
from ..runtime import resolve_device
from ..train import FitResult, fit, load_model
from ..weights import METADATA_FILE, load_published
from .base import Stage, StudyContext


RETRAIN = "retrain both models with `python -m cnnstress run --force` and the same options"
CURVES_FILE = "training_curves.png"


@dataclass
class Trained:
    """A trained model and what produced it (holds the nn.Module: not a Record)."""
    name: str
    result: FitResult
    checkpoint: Path
    stamp: str | None = None        # a stable identity for caches (published weights: SHA-256s)
    reference: dict | None = None   # published weights: the source run's test numbers
    supplied: bool = False          # a model the user supplied (Study.from_models): never trained

    @property
    def model(self):
        return self.result.model

    @property
    def config(self) -> Config:
        return self.result.config


def model_stamp(trained: Trained) -> str:
    """What a cache made from this model is keyed by ("" = no identity, never cached)."""
    if trained.stamp or trained.supplied:
        return trained.stamp or ""
    if not trained.checkpoint.exists():
        return ""
    st = trained.checkpoint.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass
class ModelTraining(Record):
    """One model's training, as metrics.json and the report read it."""
    name: str
    augment: str
    epochs: int
    train_seconds: float
    final_train_loss: float
    final_train_accuracy: float
    final_val_loss: float
    final_val_accuracy: float
    best_val_accuracy: float
    best_val_epoch: int
    checkpoint: str
    reused_checkpoint: bool            # True: loaded, not trained in this run
    published_run: dict[str, Any] | None = optional()
    # The median epoch's wall time: robust to epochs slowed by other work on the machine, which the
    # mean (train_seconds / epochs) is not. None for histories without times.
    median_epoch_seconds: float | None = optional()

    @property
    def gap_points(self) -> float:
        """Train minus validation accuracy after the last epoch, in points."""
        return 100 * (self.final_train_accuracy - self.final_val_accuracy)


@dataclass
class SuppliedInfo(Record):
    """A model the user supplied (Study.from_models; supplied.SuppliedModel.info)."""
    source: str                  # "pkg.module:factory", or "python object"
    weights: str | None          # the weights file read, if any
    sha256: str                  # of the weights file, else of the state_dict
    cam_layer: str
    cam_layer_found: bool        # True: found as the deepest spatial layer, not named
    parameters: int
    preprocessing: str


@dataclass
class TrainingResult(Record):
    models: dict[str, ModelTraining]
    supplied: dict[str, SuppliedInfo] = optional()   # models supplied instead of trained (then `models` is empty)


def describe(trained: Trained) -> ModelTraining:
    history = trained.result.history
    best = max(history, key=lambda h: h["val_acc"])
    last = history[-1]
    return ModelTraining(
        name=trained.name, augment=trained.config.augment, epochs=len(history),
        train_seconds=trained.result.train_seconds, final_train_loss=last["train_loss"],
        final_train_accuracy=last["train_acc"], final_val_loss=last["val_loss"], final_val_accuracy=last["val_acc"],
        best_val_accuracy=best["val_acc"], best_val_epoch=best["epoch"], checkpoint=str(trained.checkpoint),
        reused_checkpoint=bool(trained.result.reused), published_run=trained.reference,
        median_epoch_seconds=median_seconds(history))


def median_seconds(history: list[dict[str, float]]) -> float | None:
    """The median of the epochs' recorded wall times (None when none is recorded)."""
    seconds = [float(h["seconds"]) for h in history if isinstance(h.get("seconds"), (int, float))]
    return statistics.median(seconds) if seconds else None


def trained_images(result: FitResult, train_size: int) -> tuple[int | None, str]:
    """(images trained in this call, what) for a train stage's timing: epochs
    run now x training images (validation and checkpoints are in the time)."""
    epochs = len(result.history) - result.resumed_from_epoch
    if result.reused or epochs <= 0:
        return None, "finished checkpoint reused"
    return epochs * train_size, (f"{epochs} epoch{'s' if epochs != 1 else ''} x {train_size} training images, "
                                 "incl. validation")


def train_model(config: Config, splits, out_dir: str | Path, *, force: bool = False, resume: bool = True,
                progress: bool | None = None, log=print, budget: TimeBudget | None = None) -> Trained:
    """Train one model, or reuse its finished checkpoint. An unfinished
    checkpoint with the same training config is continued (resume=True) or
    refused (resume=False); one with another config is refused unless
    force=True, which starts over and replaces it. budget: stop after the last
    epoch that fits (result.budget_stopped; the checkpoint is saved)."""
    path = checkpoint_path(out_dir, model_of(config.augment))
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
    result = fit(config, splits, checkpoint_path=path, resume=not force, progress=progress, log=log, budget=budget)
    return Trained(name=path.parent.name, result=result, checkpoint=path)


def epochs_done(study: StudyContext) -> dict[str, tuple[int, int]]:
    """model name -> (epochs trained, epochs wanted), from this session's
    models, else each checkpoint's history.json (0 when there is none)."""
    done = {}
    for name in study.models:
        cfg = study.model_config(name)
        if name in study.trained:
            done[name] = (study.trained[name].result.epochs_done, cfg.epochs)
            continue
        try:
            path = checkpoint_path(study.out, name).with_name("history.json")
            history = json.loads(path.read_text())["history"]
            done[name] = (len(history), cfg.epochs)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):   # a readable copy only
            done[name] = (0, cfg.epochs)
    return done


def describe_progress(done: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{name} {n}/{total} epochs" for name, (n, total) in done.items())


def load_trained(config: Config, out_dir: str | Path) -> Trained:
    """A finished model from its checkpoint, without training."""
    path = checkpoint_path(out_dir, model_of(config.augment))
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
    return Trained(name=path.parent.name, result=result, checkpoint=path)


def published_model(config: Config, weights_dir: str | Path) -> Trained:
    """A published model (cnnstress.weights) for `config`'s augmentation
    preset, never trained: its hashes must verify and its training config must
    be config.profile's. The analysis uses `config` (device, sizes)."""

    if config.profile not in PROFILES:
        raise ConfigError(f"published weights need the profile they were trained with (one of {', '.join(PROFILES)}), "
                          f"got {config.profile!r}")
    name = model_of(config.augment)
    pub = load_published(weights_dir, expect_profile=config.profile, device=resolve_device(config.device),
                         names=(name,))[name]
    result = FitResult(model=pub.model, history=pub.history, config=config, resumed_from_epoch=pub.epochs,
                       reused=True)
    return Trained(name=name, result=result, checkpoint=Path(weights_dir) / METADATA_FILE, stamp=pub.stamp,
                   reference=pub.reference)


class TrainingStage(Stage):
    name = "training"
    title = "Training"

    def train_one(self, study: StudyContext, name: str, *, force: bool = False) -> Trained:
        """Train (or reuse, or load published / finished) model `name` into study.trained."""
        cfg = study.model_config(name)
        study.say(f"== {name} model (augment preset {cfg.augment!r}) ==")
        if name != study.models[0]:
            study.say(f"configuration change: {study.model_config(study.models[0]).diff(cfg)}")
        if study.weights is not None:
            trained = published_model(cfg, study.weights)
            study.say(f"{name}: published weights {trained.checkpoint.parent} ({trained.result.resumed_from_epoch} "
                      f"epochs, {trained.stamp[:19]}...), not trained here")
            images, what = None, f"published weights loaded from {study.weights}"
        elif study.allow_training:
            trained = train_model(cfg, study.splits, study.out, force=force, progress=study.progress, log=study.log,
                                  budget=study.budget)
            images, what = trained_images(trained.result, len(study.splits.train))
            if trained.result.budget_stopped:
                study.timer.lap(f"train {name}", images, what + ", stopped by the time budget")
                done = {**epochs_done(study), name: (trained.result.epochs_done, cfg.epochs)}
                raise TimeBudgetReached(f"time budget reached ({study.budget.ends_at()}): {describe_progress(done)}, "
                                        "checkpoints saved")
        else:
            path = checkpoint_path(study.out, name)
            if not path.exists():
                raise CheckpointError(f"no trained {name} model: checkpoint {path} not found; train both models "
                                      "first (python -m cnnstress run) or pass the right --out-dir")
            trained = load_trained(cfg, study.out)
            images, what = None, "finished checkpoint loaded"
        study.trained[name] = trained   # a new object: what was made from the old one no longer matches
        study.timer.lap(f"train {name}", images, what)
        if set(study.models) <= set(study.trained) and study.weights is None:
            self.write_curves(study)  # only complete curves: a failed run leaves no one-model figure
        return trained

    def curves_spec(self, study: StudyContext) -> FigureSpec:
        return FigureSpec(plot_training_curves, {n: t.result.history for n, t in study.trained.items()})

    def write_curves(self, study: StudyContext, drawn=None) -> None:
        """training_curves.png of both models (redrawn only when a history
        changed; `drawn`: the figure of curves_spec, when a caller has it)."""
        write_figure(self.curves_spec(study), study.out / CURVES_FILE, drawn=drawn)

    def curves(self, study: StudyContext, show: bool = False):
        """The training curves of every model trained so far, as a Figure
        (closed unless shown); training_curves.png once both are trained."""
        fig = self.curves_spec(study).draw()
        if set(study.models) <= set(study.trained):
            self.write_curves(study, drawn=fig)
        if not show:
            close(fig)
        return fig

    def run(self, study: StudyContext, inputs: Mapping[str, Any], *, force: bool = False, show: bool = False,
            cached_only: bool = False) -> TrainingResult:
        if study.supplied:   # nothing to train: what was supplied, for the report
            return TrainingResult(models={}, supplied={n: SuppliedInfo.from_dict(study.supplied[n].info())
                                                       for n in study.models})
        for name in study.models:
            if name not in study.trained or force:
                self.train_one(study, name, force=force)
        return TrainingResult(models={n: describe(study.trained[n]) for n in study.models})

    def summary(self, study: StudyContext, result: TrainingResult) -> str:
        if result.supplied:
            return "supplied models: " + "; ".join(
                f"{n} ({m.source}, {m.parameters:,} parameters, Grad-CAM at {m.cam_layer})"
                for n, m in result.supplied.items())
        return "; ".join(f"{n}: {m.epochs} epochs, final validation accuracy {100 * m.final_val_accuracy:.2f}%"
                         + (" (reused)" if m.reused_checkpoint else f" ({m.train_seconds:.0f} s)")
                         for n, m in result.models.items())

    def finding(self, study: StudyContext, result: TrainingResult) -> str:
        if result.supplied:
            return ("Supplied, not trained here: " + "; ".join(
                f"{n} ({m.source}{', weights ' + Path(m.weights).name if m.weights else ''}, "
                f"SHA-256 {m.sha256[:12]}..., {m.parameters:,} parameters)" for n, m in result.supplied.items())
                + ".")
        ms = result.models
        epochs = {n: f"{m.epochs} epoch{'s' if m.epochs != 1 else ''}" for n, m in ms.items()}
        after = next(iter(epochs.values())) if len(set(epochs.values())) == 1 else per_model(epochs)
        return (f"After {after}, training accuracy was {per_model({n: pct(m.final_train_accuracy) for n, m in ms.items()})}"
                f" and validation accuracy {per_model({n: pct(m.final_val_accuracy) for n, m in ms.items()})}.")

    def model_metrics(self, study: StudyContext, result: TrainingResult, model: str) -> dict[str, Any]:
        if result.supplied:
            return {"supplied": result.supplied[model].to_dict()}
        m = result.models[model]
        return {"train_seconds": m.train_seconds, "median_epoch_seconds": m.median_epoch_seconds, "epochs": m.epochs,
                "final_val_accuracy": m.final_val_accuracy,
                "best_val_accuracy": m.best_val_accuracy, "best_val_epoch": m.best_val_epoch, "augment": m.augment,
                "checkpoint": m.checkpoint, "reused_checkpoint": m.reused_checkpoint,
                **({"published_run": m.published_run} if m.published_run else {})}

    def sections(self, study: StudyContext, result: TrainingResult) -> list:
        if result.supplied:
            return [Section("The models", [Paragraph(
                f"{n}: supplied as {m.source}" + (f", weights {m.weights}" if m.weights else "")
                + f" (SHA-256 {m.sha256}); {m.parameters:,} parameters; inputs prepared with {m.preprocessing}; "
                f"Grad-CAM at {m.cam_layer!r}" + (" (found: the deepest layer with a spatial feature map)"
                                                   if m.cam_layer_found else "") + ". Not trained here.")
                for n, m in result.supplied.items()], key="training")]
        cfg = study.model_config(BASELINE)
        shown = ["seed", "epochs", "batch_size", "lr", "weight_decay", "schedule", "val_size", "train_subset",
                 "precision", "device", "failure_threshold"]
        diff = cfg.diff(study.model_config(IMPROVED))
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        spec = PRESETS[augment_preset(IMPROVED)]
        config_blocks = [
            Paragraph("Baseline: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in shown) + "."),
            Paragraph(f"Improved model = baseline with exactly one change ({changes}); everything else, "
                      "the seed included, is identical."),
            Paragraph(f"Enhanced augmentation: RandomCrop(32, padding={spec.crop_padding}), "
                      f"HorizontalFlip(p={spec.flip_p}), Rotation(+/-{spec.rotation_deg:g} deg), "
                      f"ColorJitter(brightness={spec.brightness}, contrast={spec.contrast}, "
                      f"saturation={spec.saturation}, hue={spec.hue}), RandomErasing(p={spec.erase_p}, "
                      f"scale={spec.erase_scale}, ratio={spec.erase_ratio})."),
        ]
        blocks = []
        for name, m in result.models.items():
            blocks.append(Paragraph(
                f"{name}: {m.epochs} epochs in {m.train_seconds:.0f} s ({m.train_seconds / max(m.epochs, 1):.1f} "
                f"s/epoch on average" + (f", median {m.median_epoch_seconds:.1f} s" if m.median_epoch_seconds else "")
                + f"); final train loss {m.final_train_loss:.3f} / accuracy {100 * m.final_train_accuracy:.2f}%, "
                f"validation loss {m.final_val_loss:.3f} / accuracy {100 * m.final_val_accuracy:.2f}% (best "
                f"{100 * m.best_val_accuracy:.2f}% at epoch {m.best_val_epoch}). Gap train-validation accuracy: "
                f"{m.gap_points:+.1f} points."))
        blocks.append(Figure(CURVES_FILE, "loss and accuracy per epoch, training solid, validation dashed"))
        return [Section("Configuration", config_blocks, key="training"), Section(self.title, blocks, key="training")]


stage = TrainingStage()
