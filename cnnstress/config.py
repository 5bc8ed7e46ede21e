"""One frozen configuration for a whole run, and the named profiles.

Every hyperparameter lives here, with its unit, so a result saved with its
config can be reproduced. Fields marked ``train=False`` in their metadata do not
change what is learned (device, speed switches, analysis settings): a
checkpoint is reusable when all the *other* fields match.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CnnstressError, ConfigError
from .io import ENV_PROFILE, save_json
from .registry import AUGMENT_PRESETS, BASELINE, MODELS

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")
FAITHFULNESS_BASELINES = ("blur", "mean")
CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")  # the ResNet stages with a spatial map
# torch.compile of the model in the training step: off, or a torch.compile mode
# ("reduce-overhead" adds CUDA graphs). Every mode learns the same function.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FUSED_ADAM = ("auto", "on", "off")  # auto = the fused kernel on CUDA, torch's default elsewhere


# The field groups: which stage a setting belongs to. The CLI makes one flag
# group of each (python -m cnnstress CMD --help) and caches can key on a group.
GROUPS = ("training", "runtime", "failures", "stress", "explanations")


def _learned(default: Any, help: str, **extra: Any) -> Any:
    """A field that changes what is learned (part of Config.training_key)."""
    return field(default=default, metadata={"group": "training", "help": help, **extra})


def _runtime(default: Any, help: str, group: str = "runtime", **extra: Any) -> Any:
    """A field that does not change the trained weights' meaning (train=False)."""
    return field(default=default, metadata={"train": False, "group": group, "help": help, **extra})


@dataclass(frozen=True)
class Config:
    """Field metadata: `group` (one of GROUPS), `help` (unit and meaning; the
    CLI flag's help), `train=False` on fields a checkpoint does not depend on,
    `choices` where only some strings are valid, and `cache=False` on fields
    that never change a stage's numbers (switches, worker counts), which
    `settings` leaves out of cache keys."""
    # --- what is learned -------------------------------------------------
    seed: int = _learned(42, "random seed: split, initialisation, shuffling, augmentation, analysis samples")
    epochs: int = _learned(30, "training epochs")
    batch_size: int = _learned(128, "images per optimiser step")
    lr: float = _learned(1e-3, "Adam learning rate at epoch 0")
    weight_decay: float = _learned(1e-4, "Adam (L2) weight decay")
    schedule: str = _learned("cosine", "learning-rate schedule: cosine annealing to 0 over `epochs`, stepped per "
                                       "epoch, or constant", choices=SCHEDULES)
    augment: str = _learned(MODELS[BASELINE], "augmentation preset, see cnnstress.augment",
                            choices=AUGMENT_PRESETS)
    val_size: int = _learned(5000, "images held out of the official train set, stratified")
    train_subset: int | None = _learned(None, "cap on training images (stratified); none = all")
    precision: str = _learned("auto", "autocast dtype: auto = bf16 where the hardware has it", choices=PRECISIONS)
    width: int = _learned(64, "channels of the ResNet-18's first stage, doubled at each later stage: 64 is the "
                              "published network; the smoke profile's 16 does 1/16 of the convolution work")
    # --- runtime: does not change what a checkpoint means ----------------
    device: str = _runtime("auto", "auto | cpu | cuda | cuda:N")
    channels_last: bool = _runtime(True, "NHWC memory layout for conv speed")
    compile: str = _runtime("off", "torch.compile the model in the training step (reduce-overhead adds CUDA "
                                   "graphs); every mode learns the same function", choices=COMPILE_MODES)
    checkpoint_every: int = _runtime(1, "epochs between checkpoint writes (the last epoch always)")
    fused_adam: str = _runtime("auto", "Adam's fused kernel: auto (on CUDA) | on | off; same Adam",
                               choices=FUSED_ADAM)
    eval_batch_size: int = _runtime(512, "images per inference batch")
    test_subset: int | None = _runtime(None, "cap on test images (smoke only); none = all")
    profile: str = _runtime("custom", "the profile this config came from")
    # --- failure mining ----------------------------------------------------
    failure_threshold: float = _runtime(0.8, "confidence above which a wrong prediction is a failure",
                                        group="failures")
    top_failures: int = _runtime(3, "failure cases drawn with Grad-CAM", group="failures")
    # --- stress tests (corruptions, calibration, adversarial): runtime too --
    stress: bool = _runtime(True, "run the stress stage as part of `run`", group="stress", cache=False)
    corruption_subset: int | None = _runtime(None, "test images per corruption x severity cell (stratified); "
                                                   "none = all", group="stress")
    corruption_workers: int | None = _runtime(None, "corruption generator processes (any count: same pixels); "
                                                    "none = auto", group="stress", cache=False)
    adv_subset: int | None = _runtime(1000, "test images attacked (stratified); none = all", group="stress")
    adv_eps: tuple[int, ...] = _runtime((1, 2, 4, 8), "L-inf budgets in grey levels: eps = k/255", group="stress")
    pgd_steps: int = _runtime(10, "PGD iterations per budget (step 2.5*eps/steps)", group="stress")
    calibration_bins: int = _runtime(15, "equal-width confidence bins for ECE/MCE (Guo et al. 2017)",
                                     group="stress")
    # --- explanations and failure triage: runtime ---------------------------
    explain: bool = _runtime(True, "run the explanation stage as part of `run`", group="explanations",
                             cache=False)
    cam_layer: str = _runtime("layer4", "CAM target layer: layer4 (4x4 map) or layer3 (8x8)",
                              group="explanations", choices=CAM_LAYERS)
    faithfulness_samples: int = _runtime(500, "images per faithfulness group (top failures; a stratified "
                                              "sample)", group="explanations")
    faithfulness_steps: int = _runtime(16, "deletion/insertion steps (pixels changed per step = 1/steps)",
                                       group="explanations")
    faithfulness_baseline: str = _runtime("blur", "what removed pixels become: blur | mean", group="explanations",
                                          choices=FAITHFULNESS_BASELINES)
    sanity_samples: int = _runtime(64, "images in the parameter-randomisation test", group="explanations")

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the config hashable and frozen.
        if isinstance(self.adv_eps, list):
            object.__setattr__(self, "adv_eps", tuple(self.adv_eps))
        if isinstance(self.compile, bool):  # configs saved when `compile` was a switch
            object.__setattr__(self, "compile", "default" if self.compile else "off")
        _check_types(self)
        problems = []
        if not 0 <= self.seed < 2**63:   # torch's and numpy's seeders overflow beyond
            problems.append(f"seed must be in 0..2**63-1 (got {self.seed})")
        for name in ("lr", "weight_decay", "failure_threshold"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.width < 1:
            problems.append(f"width must be >= 1 (got {self.width})")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.augment not in AUGMENT_PRESETS:
            problems.append(f"unknown augmentation preset {self.augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.val_size < 1:
            problems.append(f"val_size must be >= 1 (got {self.val_size})")
        for name in ("train_subset", "test_subset", "corruption_subset", "corruption_workers", "adv_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or None (got {value})")
        if not 0.0 <= self.failure_threshold < 1.0:
            problems.append(f"failure_threshold must be in [0, 1) (got {self.failure_threshold})")
        if self.top_failures < 0:
            problems.append(f"top_failures must be >= 0 (got {self.top_failures})")
        if not self.adv_eps or any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 255
                                   for k in self.adv_eps):
            problems.append(f"adv_eps must be whole grey levels in 0..255, at least one (got {self.adv_eps})")
        if self.corruption_workers is not None and self.corruption_workers > MAX_WORKERS:
            problems.append(f"corruption_workers must be at most {MAX_WORKERS} (got {self.corruption_workers}); "
                            "each is a process importing torch")
        if self.pgd_steps < 1:
            problems.append(f"pgd_steps must be >= 1 (got {self.pgd_steps})")
        for name in ("faithfulness_samples", "faithfulness_steps", "sanity_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.faithfulness_baseline not in FAITHFULNESS_BASELINES:
            problems.append(f"unknown faithfulness_baseline {self.faithfulness_baseline!r}; choose one of "
                            f"{', '.join(FAITHFULNESS_BASELINES)}")
        if self.cam_layer not in CAM_LAYERS:
            problems.append(f"unknown cam_layer {self.cam_layer!r}; choose one of {', '.join(CAM_LAYERS)}")
        if self.compile not in COMPILE_MODES:
            problems.append(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.fused_adam not in FUSED_ADAM:
            problems.append(f"unknown fused_adam {self.fused_adam!r}; choose one of {', '.join(FUSED_ADAM)}")
        if not 1 <= self.calibration_bins <= MAX_BINS:
            problems.append(f"calibration_bins must be in 1..{MAX_BINS} (got {self.calibration_bins})")
        if self.faithfulness_steps > MAX_STEPS:
            problems.append(f"faithfulness_steps must be at most {MAX_STEPS}, one pixel a step (got "
                            f"{self.faithfulness_steps})")
        if problems:
            raise ConfigError("; ".join(problems))

    def replace(self, **changes: Any) -> "Config":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def training_key(self) -> dict[str, Any]:
        """The fields that decide what a checkpoint holds."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("train", True)}

    def _repr_markdown_(self) -> str:
        """Every field as a table row, grouped as the CLI's flags are: value,
        whether it changes the learned weights, and its meaning (a notebook shows it)."""
        fields = sorted(dataclasses.fields(self), key=lambda f: GROUPS.index(f.metadata["group"]))
        rows = [f"| `{f.name}` | `{getattr(self, f.name)!r}` | {f.metadata['group']} | "
                f"{'yes' if f.metadata.get('train', True) else 'no'} | {f.metadata['help'].replace('|', '/')} |"
                for f in fields]
        return ("| field | value | group | changes the learned weights | meaning |\n|---|---|---|---|---|\n"
                + "\n".join(rows))

    def diff(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @classmethod
    def fields_in(cls, group: str) -> tuple[str, ...]:
        """The names of the fields in `group` (one of GROUPS), in declaration order."""
        if group not in GROUPS:
            raise ValueError(f"unknown config group {group!r}; choose one of {', '.join(GROUPS)}")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["group"] == group)

    def values_in(self, *groups: str) -> dict[str, Any]:
        """{name: value} of the fields in `groups`, e.g. a cache key of one stage's settings."""
        return {name: getattr(self, name) for group in groups for name in self.fields_in(group)}

    def settings(self, *groups: str) -> dict[str, Any]:
        """values_in(*groups) without the cache=False fields: what a stage's
        cached numbers depend on, so a new field in a group invalidates them."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        return {k: v for k, v in self.values_in(*groups).items() if fields[k].metadata.get("cache", True)}

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON to `path` atomically; Config.load reads it back."""
        save_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """The config saved at `path` (Config.save, e.g. outputs/config.json).
        A missing, unreadable or malformed file, an unknown field or a bad value
        is a one-line ConfigError; fields missing from the file keep their defaults."""
        path = Path(path)
        fix = "pass the config.json a run wrote (e.g. outputs/config.json)"
        try:
            # A config is a few kilobytes: anything else (/dev/zero, a FIFO, a huge file) is not read.
            if path.exists() and not path.is_file():
                raise ConfigError(f"config file {path} is not a regular file; {fix}")
            if path.exists() and path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file {path} is {path.stat().st_size >> 20} MB, not a config "
                                  f"(at most {MAX_CONFIG_BYTES >> 10} KB); {fix}")
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; {fix}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc}); {fix}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON ({exc}); {fix}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests too deeply to be a config; {fix}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}, not an object of "
                              f"config fields; {fix}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise ConfigError(f"config file {path} has unknown field(s) {', '.join(unknown)}; remove them "
                              f"(the fields are listed by python -m cnnstress run --help)")
        wrong = [f"{name}={value!r} (expected {_type_name(hints[name])})" for name, value in data.items()
                 if not _has_type(value, hints[name])
                 and not (name == "compile" and isinstance(value, bool))]  # saved when compile was a switch
        if wrong:
            raise ConfigError(f"config file {path} has values of the wrong type: {'; '.join(wrong)}; fix them")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None


MAX_CONFIG_BYTES = 1 << 20   # a saved config is about 2 KB
MAX_WORKERS = 256            # corruption generator processes (each ~200 MB); the pixels are the same for any count
MAX_BINS = 1000        # calibration bins: each costs memory per model; 15 is the convention
MAX_STEPS = 32 * 32    # deletion/insertion steps: beyond one pixel per step they repeat


def _check_types(config: Config) -> None:
    """Raise ConfigError for a field of the wrong type (a notebook's 2.5 epochs,
    True as a batch size, a string seed); NumPy scalars become Python numbers."""
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    wrong = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = tuple(_plain(v) for v in value)
        else:
            value = _plain(value)
        object.__setattr__(config, f.name, value)
        if not _has_type(value, _HINTS[f.name]):
            wrong.append(f"{f.name}={value!r} (expected {_type_name(_HINTS[f.name])})")
    if wrong:
        raise ConfigError(f"values of the wrong type: {'; '.join(wrong)}")


_HINTS: dict[str, Any] | None = None


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds; anything else unchanged."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a Config field's type (int | None, tuple[int, ...], ...)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_has_type(v, args[0]) for v in value)
    if args:  # a union
        return any(_has_type(value, a) for a in args)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


# Named profiles. `quick` is sized for a 2-core laptop-class CPU without bf16
# (fp32 AVX2, ~40 training img/s): the whole `run` in ~15 minutes there, about
# half that with AVX-512 BF16. `full` is the seed's setting, for a GPU.
# The stress stage is sized the same way: `quick` adds about 5 minutes on such a
# CPU; `full` corrupts the whole test set and attacks 1,000 images.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(epochs=1, width=16, train_subset=512, val_size=256, test_subset=1000, batch_size=64,
                  corruption_subset=10, adv_subset=16, adv_eps=(2, 8), pgd_steps=2,
                  faithfulness_samples=8, faithfulness_steps=4, sanity_samples=4),
    "quick": dict(epochs=4, train_subset=4000, val_size=1000, corruption_subset=64, adv_subset=64,
                  faithfulness_samples=32, sanity_samples=16),
    "full": dict(epochs=30),
}


def get_config(profile: str = "quick", **overrides: Any) -> Config:
    """The config of a named profile, with `overrides` (None values ignored)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {**PROFILES[profile], "profile": profile}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config(**values)
    except TypeError as exc:  # an unknown keyword
        raise ConfigError(f"bad config override: {exc}") from None


def default_profile(explicit: str | None = None, *, fallback: str | None = None) -> str:
    """The profile to use: `explicit` (a --profile flag) when given, else
    $CNNSTRESS_PROFILE, else `fallback`, else full on a GPU and quick on a CPU.
    The variable sets a default; it never overrides a flag."""
    if explicit:
        return explicit
    if ENV_PROFILE in os.environ:
        if os.environ[ENV_PROFILE] not in PROFILES:
            raise CnnstressError(f"${ENV_PROFILE} is {os.environ[ENV_PROFILE]!r}, not a profile; set it to one of "
                                 f"{', '.join(PROFILES)} or unset it")
        return os.environ[ENV_PROFILE]
    if fallback:
        return fallback
    import torch
    return "full" if torch.cuda.is_available() else "quick"
