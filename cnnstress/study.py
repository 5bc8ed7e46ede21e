"""The Study: one object holding a study's config, data, output folder and results.

The notebook and the command line drive the same object::

    study = Study("quick")             # or Study(config=Config.load("outputs/config.json"))
    study.train("baseline")            # trains, or reuses the finished checkpoint
    study.curves()
    study.failures("baseline")         # test predictions + high-confidence failures
    study.gradcam()                    # Grad-CAM figures of the top failures
    study.train("improved"); study.compare(); study.stress(); study.explain(); study.label_review()
    study.report(); study.findings()   # the report files; what was found, in sentences

or all of it with `study.run()` (what `python -m cnnstress run` calls). Every
step takes what it needs from earlier steps, loading it from the output
folder's caches when it was not computed in this process, so any notebook
cell can be rerun after a kernel restart without retraining.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .budget import TimeBudget, TimeBudgetReached
from .config import Config, default_profile, get_config
from .errors import CheckpointError, CnnstressError
from .io import DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, ENV_DATA_DIR, ENV_OUT_DIR, check_folder_arg, check_writable_dir
from .lock import output_lock
from .registry import BASELINE, MODEL_NAMES, MODELS, augment_preset, checkpoint_path  # noqa: F401  (study.MODELS)
from .runlog import StageTimer

CONFIG_FILE = "config.json"   # the resolved config of the last run, re-runnable with --config


class Study:
    """A study of two models that differ only in augmentation.

    profile / config: the settings (a named profile plus `overrides`, or a
    whole Config). data_dir, out_dir: default $CNNSTRESS_DATA_DIR / data and
    $CNNSTRESS_OUT_DIR / outputs. weights: a published-weights folder (the
    models are loaded from it, never trained; analysis-sized config).
    train=False never trains (both models need finished checkpoints).
    force: retrain and recompute everything. log: where stage lines go.
    time_budget: minutes, an end time ("04:43", ISO 8601) or a
    cnnstress.budget.TimeBudget: training stops after the last epoch that fits
    and no stage starts after it (cnnstress.budget.TimeBudgetReached); the
    same call continues later."""

    def __init__(self, profile: str | None = None, *, config: Config | None = None,
                 data_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 weights: str | Path | None = None, train: bool = True, force: bool = False,
                 progress: bool | None = None, log: Callable[[str], None] | None = print,
                 timer: StageTimer | None = None, time_budget: "TimeBudget | str | float | None" = None,
                 **overrides: Any) -> None:
        if config is None:
            if weights is not None:
                from .weights import analysis_config
                config = analysis_config(default_profile(profile, fallback="full"), **overrides)
            else:
                config = get_config(default_profile(profile), **overrides)
        elif overrides:
            config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.config = config
        self.data_dir = Path(check_folder_arg(data_dir, "--data-dir", DEFAULT_DATA_DIR, ENV_DATA_DIR))
        out = Path(check_folder_arg(out_dir, "--out-dir", DEFAULT_OUT_DIR, ENV_OUT_DIR))
        self.weights = None if weights is None else Path(weights)
        if self.weights is not None and (out.resolve() == self.weights.resolve()
                                         or self.weights.resolve() in out.resolve().parents):
            raise CnnstressError(f"the output folder {out} is inside the published weights folder {self.weights}; "
                                 "choose another --out-dir (a published folder is verified by its hashes: "
                                 "nothing is written into it)")
        from .runtime import resolve_device
        resolve_device(config.device)   # a device this machine lacks is refused before anything is written
        if self.weights is not None:
            from .weights import check_published
            check_published(self.weights, expect_profile=self.config.profile)
        self.out = check_writable_dir(out)   # made by the first write, under the lock
        self.allow_training = train
        self.force = force
        self.progress = progress
        self.log = log
        self.budget = time_budget if time_budget is None or isinstance(time_budget, TimeBudget) else \
            TimeBudget.parse(str(time_budget))
        self.timer = timer if timer is not None else StageTimer(log=None)  # the CLI's run logs its laps
        self.started = time.perf_counter()
        self.models: tuple[str, ...] = MODEL_NAMES
        self.supplied: dict[str, Any] = {}    # model name -> supplied.SuppliedModel (Study.from_models)
        # One memo: what each stage made, with the fingerprint of what it was made from
        # (Study.fingerprint); a result whose fingerprint no longer matches is recomputed.
        self.results: dict[str, Any] = {}     # stage name -> its typed result (current)
        self._fingerprints: dict[str, str] = {}
        self.skipped: set[str] = set()        # analysis stages left out (nothing cached)
        self.trained: dict[str, Any] = {}     # model name -> stages.training.Trained
        self._kept: dict[str, tuple[tuple, Any]] = {}   # a stage's per-model steps: slot -> (key, value)
        self._splits = None

    @classmethod
    def from_models(cls, models: Any, *, cam_layer: Any = None, preprocess: Any = None,
                    profile: str | None = None, data_dir: str | Path | None = None,
                    out_dir: str | Path | None = None, log: Callable[[str], None] | None = print,
                    sources: dict[str, dict] | None = None, config: Config | None = None, force: bool = False,
                    progress: bool | None = None, timer: StageTimer | None = None, **overrides: Any) -> "Study":
        """A study of classifiers you supply instead of the two it trains:
        every analysis stage runs on them (failures and Grad-CAM, stress,
        explanations, label review, report; with two models also the
        comparison, the first as the reference). Nothing is trained.

        models:     {name: nn.Module} (one or two), or one nn.Module (named "model").
                    Each takes float images (N,3,32,32) normalised with the
                    CIFAR mean/std, as ours do, and returns logits (N, 10).
        cam_layer:  the Grad-CAM layer: a dotted name or the module, per model
                    as {name: layer}; None finds the deepest spatial layer
                    (supplied.find_cam_layer) and says which.
        preprocess: the model's own input preparation instead of ours: (mean,
                    std) on [0, 1] images, or a callable on [0, 1] images; per
                    model as {name: ...}. With a callable nothing is cached.
        profile:    the analysis sizes of that profile (CPU-sized samples, the
                    whole test set: weights.analysis_config); default quick.
        sources:    {name: {"source": ..., "weights": path, "sha256": ...}},
                    what the command line read (shown in the report).
        config:     the whole analysis config instead of profile + overrides.
        """
        import torch
        from torch import nn

        from .runtime import resolve_device
        from .stages.training import Trained
        from .supplied import SuppliedModelError, supply
        from .train import FitResult
        from .weights import analysis_config

        if isinstance(models, nn.Module):
            models = {"model": models}
        if not isinstance(models, dict) or not 1 <= len(models) <= 2:
            raise SuppliedModelError("from_models takes one or two models: {name: nn.Module}")
        if config is None:
            config = analysis_config(default_profile(profile, fallback="quick"), **overrides)
        study = cls(config=config, data_dir=data_dir, out_dir=out_dir, train=False, log=log, force=force,
                    progress=progress, timer=timer)
        device = resolve_device(config.device)

        def per_model(value: Any, name: str) -> Any:
            return value.get(name) if isinstance(value, dict) else value

        for name, model in models.items():
            src = (sources or {}).get(name, {})
            sup = supply(name, model, cam_layer=per_model(cam_layer, name), preprocess=per_model(preprocess, name),
                         source=src.get("source", "python object"), weights=src.get("weights"),
                         sha256=src.get("sha256"), device=device)
            study.say(f"{name}: {sup.source}, {sup.parameters:,} parameters, Grad-CAM at {sup.cam_layer!r}"
                      + (" (the deepest spatial layer; name another with cam_layer=)" if sup.cam_found else "")
                      + (f", preprocessing {sup.preprocessing}" if sup.module is not model else ""))
            if config.channels_last:   # as our models are evaluated (the same numbers through either path)
                sup.module.to(memory_format=torch.channels_last)
            study.supplied[name] = sup
            result = FitResult(model=sup.module, history=[], config=config, reused=True)
            study.trained[name] = Trained(name=name, result=result, checkpoint=Path(sup.weights or name),
                                          stamp=sup.stamp, supplied=True)
        study.models = tuple(models)
        return study

    def cam_layer(self, name: str) -> str:
        """Model `name`'s Grad-CAM layer: a supplied model's own, else config.cam_layer."""
        return self.supplied[name].cam_layer if name in self.supplied else self.config.cam_layer

    # --- what the stages share ---------------------------------------------
    @property
    def stage_list(self) -> list:
        """The stages this study runs, in order: cnnstress.stages.STAGES."""
        from . import stages
        return stages.STAGES

    def get_stage(self, name: str):
        from . import stages
        return stages.get_stage(name)

    def say(self, message: str) -> None:
        if self.log:
            self.log(message)

    def model_config(self, name: str) -> Config:
        """The config a model is trained with: the study's, with its augmentation
        preset (a supplied model: the study's, nothing is trained)."""
        if name in self.supplied:
            return self.config
        return self.config.replace(augment=augment_preset(name))

    def set(self, **changes: Any) -> "Study":
        """Change analysis settings (e.g. failure_threshold, cam_layer) for the
        steps that follow; None values are ignored. Training settings are
        refused: they would not match the trained models."""
        changes = {k: v for k, v in changes.items() if v is not None}
        new = self.config.replace(**changes)
        learned = {k for k in new.training_key() if new.training_key()[k] != self.config.training_key()[k]}
        if learned and self.trained:
            raise CnnstressError(f"{', '.join(sorted(learned))} changes what the models learn; start a new Study")
        if new != self.config:
            self.config = new
            # What the old settings made stays only where its fingerprint still matches.
            for name in list(self.results):
                if self._fingerprints.get(name) != self.fingerprint(self.get_stage(name)):
                    self.results.pop(name)
            self.skipped.clear()
        return self

    def fingerprint(self, stage) -> str:
        """What `stage`'s result depends on in this session: its settings (the
        version, seed and Config groups its cache key uses), the models it
        was made from (a retrained model is another object) and the
        fingerprints of the stages it requires."""
        return json.dumps({"settings": stage.settings(self),
                           "models": {n: id(t) for n, t in self.trained.items()},
                           "requires": {r: self.fingerprint(self.get_stage(r)) for r in stage.requirements(self)}},
                          sort_keys=True, default=repr)

    def recall(self, slot: str, key: tuple) -> Any:
        """What a stage kept under `slot` (e.g. "predictions:baseline") when it
        was made with `key`; None otherwise. Key items compare by identity
        when they are objects (a Trained model), by value otherwise."""
        kept = self._kept.get(slot)
        return kept[1] if kept is not None and _same_key(kept[0], key) else None

    def keep(self, slot: str, key: tuple, value: Any) -> Any:
        """Keep `value` under `slot`, made with `key` (see recall); returns it."""
        self._kept[slot] = (key, value)
        return value

    @property
    def splits(self):
        """The data, loaded on first use (cnnstress.data.CifarSplits)."""
        if self._splits is None:
            from .data import load_splits
            self._splits = load_splits(self.data_dir, self.model_config(self.models[0]))
            s = self._splits
            self.say(f"data: {len(s.train)} train / {len(s.val)} val / {len(s.test)} test images")
            self.timer.lap("data", len(s.train) + len(s.val) + len(s.test), "images loaded")
        return self._splits

    def model(self, name: str):
        """The trained model `name` (stages.training.Trained): from this
        session, else trained or loaded as the study allows."""
        if name not in self.trained:
            from .stages import training
            training.stage.train_one(self, name)
        return self.trained[name]

    def model_stamp(self, name: str) -> str:
        """What a cache made from model `name` is keyed by ("" = never cached)."""
        from .stages.training import model_stamp
        return model_stamp(self.model(name))

    def result(self, stage_name: str, *, show: bool = False):
        """Stage `stage_name`'s result: this session's while its fingerprint
        matches, else the stage run now, an analysis stage only from its cache
        (None when nothing is cached or the stage is switched off)."""
        stage = self.get_stage(stage_name)
        if stage_name in self.results and self._fingerprints.get(stage_name) == self.fingerprint(stage):
            return self.results[stage_name]
        if stage_name in self.skipped or not stage.enabled(self):
            return None
        with output_lock(self.out, log=self.log):
            result = stage.run(self, self.inputs(stage), show=show, cached_only=stage.analysis)
        if result is None:
            self.skipped.add(stage_name)
        else:
            self._store(stage, result)
        return result

    def _store(self, stage, result) -> None:
        self.results[stage.name] = result
        self._fingerprints[stage.name] = self.fingerprint(stage)

    def inputs(self, stage) -> dict[str, Any]:
        """What `stage` requires, {stage name: result}: the one place a stage's
        inputs are found (a required analysis that never ran is left out)."""
        found = {name: self.result(name) for name in stage.requirements(self)}
        return {name: result for name, result in found.items() if result is not None}

    def run_stage(self, stage_name: str, *, force: bool = False, show: bool = False, cached_only: bool = False):
        """Run one stage now (force: recompute even when cached; cached_only: an
        analysis only from its cache), log its summary line; its result, or
        None (an analysis with nothing cached)."""
        stage = self.get_stage(stage_name)
        with output_lock(self.out, log=self.log):
            result = stage.run(self, self.inputs(stage), force=force or self.force, show=show,
                               cached_only=cached_only)
        if result is None:
            self.results.pop(stage_name, None)
            self.skipped.add(stage_name)
            return None
        self._store(stage, result)
        self.skipped.discard(stage_name)
        line = stage.summary(self, result)
        if line:
            self.say(line)
        return result

    def run(self, *, only: str | None = None, force_only: bool = False) -> "Study":
        """Every stage in order (cnnstress.stages.STAGES), what `python -m
        cnnstress run` does. only="stress" or "explanations" (the commands of
        those names): run that stage, recomputed when force_only, and take the
        other analysis stages from their caches only. Each stage is timed
        (cnnstress.runlog); the report stage writes run_log.json."""
        analyses = [s.name for s in self.stage_list if s.analysis]
        if only is not None and only not in analyses:
            raise ValueError(f"only must be one of {', '.join(analyses)} or None, got {only!r}")
        self.timer.restart()
        self.splits  # noqa: B018  (load, check and log the data first: bad data leaves the output folder alone)
        with output_lock(self.out, log=self.log):
            try:
                done = None
                for stage in self.stage_list:
                    if stage.name != only and not stage.enabled(self):
                        continue
                    if self.budget is not None and done is not None and self.budget.spent:
                        left = [s.name for s in self.stage_list[self.stage_list.index(stage):] if s.enabled(self)]
                        raise TimeBudgetReached(f"time budget reached ({self.budget.ends_at()}) after the {done} "
                                                f"stage; {', '.join(left)} not run yet (finished stages are cached)")
                    if stage.analysis:
                        self.say(f"== {stage.banner or stage.title} ==")
                    if self.run_stage(stage.name, force=stage.name == only and force_only,
                                      cached_only=stage.analysis and only is not None and stage.name != only) is not None:
                        done = stage.name
            finally:
                # config.json once a model was trained or loaded with the config: a run refused
                # before that (data, device, checkpoint) leaves the previous one, which matches metrics.json.
                if self.trained:
                    self.save_config()
        return self

    # --- the notebook's steps: each returns a result that displays itself --------
    def describe(self) -> "Setup":
        """The version, profile, device, data and output folders (the setup cell)."""
        from .runtime import describe_hardware, resolve_device
        from .version import __version__
        c = self.config
        device = resolve_device(c.device)
        return Setup(version=__version__, profile=c.profile, epochs=c.epochs, seed=c.seed,
                     weights=None if self.weights is None else str(self.weights), device=str(device),
                     hardware=describe_hardware(device), data_dir=str(self.data_dir), out_dir=str(self.out),
                     supplied=tuple(self.supplied))

    def describe_model(self):
        """The architecture's size and one forward pass's shapes (model.ModelSummary)."""
        from .model import resnet18_for, summarise
        return summarise(resnet18_for(self.config))

    def show_data(self, n: int = 16):
        """Images per split and class (data.SplitCounts), with a grid of `n`
        training images as its `figure`."""
        from .data import CLASSES
        from .plots import plot_samples
        counts = self.splits.counts()
        counts.figure = plot_samples(self.splits.train.images, self.splits.train.labels, CLASSES, n=n)
        return counts

    def failure_examples(self, k: int = 3):
        """The failure groups' counts and `k` test images of each group
        (stages.comparison.FailureExamples, a table in a notebook)."""
        from .stages import comparison
        return comparison.stage.examples(self, self.result("comparison"), self.result("failures"), k=k)

    def train(self, name: str):
        """Train model `name` (or reuse its finished checkpoint); returns its
        Trained. A supplied model (from_models) is returned as it is."""
        from .stages import training
        if name in self.supplied:
            self.say(f"{name}: supplied ({self.supplied[name].source}), not trained here")
            return self.trained[name]
        with output_lock(self.out, log=self.log):
            return training.stage.train_one(self, name, force=self.force)

    def curves(self, show: bool = True):
        """training_curves.png for the models trained so far; returns the Figure
        (None for supplied models: they have no training history here)."""
        from .stages import training
        if self.supplied:
            self.say("supplied models: no training curves")
            return None
        with output_lock(self.out, log=self.log):
            return training.stage.curves(self, show=show)

    def failures(self, name: str | None = None, threshold: float | None = None):
        """Test predictions and high-confidence failures of model `name`
        (default the first: the baseline), stages.failures.ModelFailures,
        shown as a table in a notebook."""
        from .stages import failures
        self.set(failure_threshold=threshold)
        with output_lock(self.out, log=self.log):
            return failures.stage.evaluate_one(self, name or self.models[0])

    def gradcam(self, threshold: float | None = None, layer: str | None = None, show: bool = True):
        """Grad-CAM figures of the first model's (the baseline's) top failures (failure_case_<i>.png)."""
        from .stages import failures
        self.set(failure_threshold=threshold, cam_layer=layer)
        with output_lock(self.out, log=self.log):
            return failures.stage.explain_cases(self, show=show)

    def compare(self, show: bool = True):
        return self.run_stage("comparison", show=show)

    def stress(self, force: bool = False, show: bool = True):
        return self.run_stage("stress", force=force, show=show)

    def explain(self, force: bool = False, show: bool = True):
        return self.run_stage("explanations", force=force, show=show)

    def label_review(self, show: bool = True):
        """The failures triaged against the human review of the test labels
        (stages.label_review.LabelReview, shown as a table in a notebook)."""
        return self.run_stage("label_review", show=show)

    def report(self):
        """metrics.json, analysis_report.txt and report.html from every stage run so far."""
        return self.run_stage("report")

    def findings(self):
        """What the study found, in sentences built from the stages' results
        (the report's summary): a list of strings, shown as a bulleted list
        in a notebook. Stages not run in this session come from their caches."""
        from .stages import report
        with output_lock(self.out, log=self.log):
            return report.stage.findings(self, self.inputs(report.stage))

    def save_config(self) -> Path:
        """The resolved config as out/config.json (`--config` repeats the run)."""
        path = self.out / CONFIG_FILE
        self.config.save(path)
        return path

    def __repr__(self) -> str:
        return (f"Study(profile={self.config.profile!r}, out={str(self.out)!r}, "
                f"stages done={list(self.results)})")


@dataclass(frozen=True)
class Setup:
    """What a Study runs with (Study.describe()); a notebook shows it as a table."""
    version: str
    profile: str
    epochs: int
    seed: int
    weights: str | None     # the published-weights folder, or None (trained here)
    device: str
    hardware: str
    data_dir: str
    out_dir: str
    supplied: tuple[str, ...] = ()   # models supplied by the user (Study.from_models): nothing trained

    def models_words(self) -> str:
        if self.supplied:
            return "supplied: " + ", ".join(self.supplied) + " (not trained here)"
        return f"published weights {self.weights}" if self.weights else "trained here"

    def __str__(self) -> str:
        return "\n".join([
            f"cnnstress {self.version}: profile {self.profile!r}, "
            + (f"{self.epochs} epoch(s), " if not self.supplied else "") + f"seed {self.seed}"
            + (f", {self.models_words()}" if self.weights or self.supplied else ""),
            f"device: {self.device} - {self.hardware}",
            f"data: {self.data_dir}   outputs: {self.out_dir}"])

    def _repr_markdown_(self) -> str:
        models = f"published weights `{self.weights}`" if self.weights and not self.supplied else self.models_words()
        epochs = f"{self.epochs} epoch(s), " if not self.supplied else ""
        rows = [("cnnstress", self.version), ("profile", f"`{self.profile}`: {epochs}seed {self.seed}"),
                ("models", models), ("device", f"`{self.device}`: {self.hardware}"),
                ("data", f"`{self.data_dir}`"), ("outputs", f"`{self.out_dir}`")]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _same_key(a: tuple, b: tuple) -> bool:
    plain = (str, int, float, bool, type(None))
    return len(a) == len(b) and all(x == y if isinstance(x, plain) and isinstance(y, plain) else x is y
                                    for x, y in zip(a, b))


def require_checkpoints(study: Study) -> None:
    """For commands that never train: both finished checkpoints must exist."""
    for name in study.models:
        path = checkpoint_path(study.out, name)
        if study.weights is None and not path.exists():
            raise CheckpointError(f"no trained {name} model: checkpoint {path} not found; "
                                  f"train both models first (python -m cnnstress run) or pass the right --out-dir")
