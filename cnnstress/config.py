"""One frozen configuration for a whole run, and the named profiles.

Every hyperparameter lives here, with its unit, so a result saved with its
config can be reproduced. Fields marked ``train=False`` in their metadata do not
change what is learned (device, speed switches, analysis settings): a
checkpoint is reusable when all the *other* fields match.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

AUGMENT_PRESETS = ("baseline", "enhanced")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")
FAITHFULNESS_BASELINES = ("blur", "mean")
CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")  # the ResNet stages with a spatial map
# torch.compile of the model in the training step: off, or a torch.compile mode
# ("reduce-overhead" adds CUDA graphs). Every mode learns the same function.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FUSED_ADAM = ("auto", "on", "off")  # auto = the fused kernel on CUDA, torch's default elsewhere


def _runtime(default: Any) -> Any:
    """A field that does not change the trained weights' meaning."""
    return field(default=default, metadata={"train": False})


@dataclass(frozen=True)
class Config:
    # --- what is learned -------------------------------------------------
    seed: int = 42
    epochs: int = 30
    batch_size: int = 128            # images per optimiser step
    lr: float = 1e-3                 # Adam learning rate at epoch 0
    weight_decay: float = 1e-4       # Adam (L2) weight decay
    schedule: str = "cosine"         # cosine annealing to 0 over `epochs`, stepped per epoch
    augment: str = "baseline"        # augmentation preset, see cnnstress.augment
    val_size: int = 5000             # images held out of the official train set, stratified
    train_subset: int | None = None  # cap on training images (stratified); None = all
    precision: str = "auto"          # autocast dtype: auto = bf16 where the hardware has it
    # --- runtime: does not change what a checkpoint means ----------------
    device: str = _runtime("auto")               # auto | cpu | cuda | cuda:N
    channels_last: bool = _runtime(True)          # NHWC memory layout for conv speed
    compile: str = _runtime("off")                # torch.compile the model in the training step (COMPILE_MODES)
    checkpoint_every: int = _runtime(1)           # epochs between checkpoint writes (the last epoch always)
    fused_adam: str = _runtime("auto")            # Adam's fused kernel: auto (on CUDA) | on | off; same Adam
    eval_batch_size: int = _runtime(512)          # images per inference batch
    test_subset: int | None = _runtime(None)      # cap on test images (smoke only); None = all
    failure_threshold: float = _runtime(0.8)      # confidence above which a wrong prediction is a failure
    top_failures: int = _runtime(3)               # failure cases drawn with Grad-CAM
    profile: str = _runtime("custom")             # the profile this config came from
    # --- stress tests (corruptions, calibration, adversarial): runtime too --
    stress: bool = _runtime(True)                 # run the stress stage as part of `run`
    corruption_subset: int | None = _runtime(None)  # test images per corruption x severity cell (stratified); None = all
    corruption_workers: int | None = _runtime(None)  # corruption generator processes (any count: same pixels); None = auto
    adv_subset: int | None = _runtime(1000)       # test images attacked (stratified); None = all
    adv_eps: tuple[int, ...] = _runtime((1, 2, 4, 8))  # L-inf budgets in grey levels: eps = k/255
    pgd_steps: int = _runtime(10)                 # PGD iterations per budget (step 2.5*eps/steps)
    calibration_bins: int = _runtime(15)          # equal-width confidence bins for ECE/MCE (Guo et al. 2017)
    # --- explanations and failure triage: runtime ---------------------------
    explain: bool = _runtime(True)                # run the explanation stage as part of `run`
    cam_layer: str = _runtime("layer4")           # CAM target layer: layer4 (4x4 map) or layer3 (8x8)
    faithfulness_samples: int = _runtime(500)     # images per group (top failures; a stratified sample)
    faithfulness_steps: int = _runtime(16)        # deletion/insertion steps (pixels changed per step = 1/steps)
    faithfulness_baseline: str = _runtime("blur")  # what removed pixels become: blur | mean
    sanity_samples: int = _runtime(64)            # images in the parameter-randomisation test

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the config hashable and frozen.
        if isinstance(self.adv_eps, list):
            object.__setattr__(self, "adv_eps", tuple(self.adv_eps))
        if isinstance(self.compile, bool):  # configs saved when `compile` was a switch
            object.__setattr__(self, "compile", "default" if self.compile else "off")
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
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
        if any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 255 for k in self.adv_eps):
            problems.append(f"adv_eps must be whole grey levels in 0..255 (got {self.adv_eps})")
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
        if self.calibration_bins < 1:
            problems.append(f"calibration_bins must be >= 1 (got {self.calibration_bins})")
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

    def diff(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# Named profiles. `quick` is sized for a 2-core laptop-class CPU without bf16
# (fp32 AVX2, ~40 training img/s): the whole `run` in ~15 minutes there, about
# half that with AVX-512 BF16. `full` is the seed's setting, for a GPU.
# The stress stage is sized the same way: `quick` adds about 5 minutes on such a
# CPU; `full` corrupts the whole test set and attacks 1,000 images.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(epochs=1, train_subset=512, val_size=256, test_subset=1000, batch_size=64,
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
