"""The study's two models, named once: each one's name, the augmentation
preset it trains with (the one training difference between them) and where
its files live under an output folder.

Base layer: imports nothing but errors, so config, the lock, the engine and
the stages can all read it. What a preset does is cnnstress.augment's.
"""
from __future__ import annotations

from pathlib import Path

from .errors import CnnstressError

BASELINE = "baseline"   # the reference model
IMPROVED = "improved"   # the reference with one change: its augmentation

# model name -> augmentation preset, the reference first (the order of the
# Study's models, metrics.json and the figures). A model's name is also its
# folder under the output folder and its key in every result.
MODELS: dict[str, str] = {BASELINE: "baseline", IMPROVED: "enhanced"}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
AUGMENT_PRESETS: tuple[str, ...] = tuple(MODELS.values())   # the valid Config.augment values
MODEL_OF_PRESET: dict[str, str] = {preset: name for name, preset in MODELS.items()}

CHECKPOINT_FILE = "checkpoint.pt"


def augment_preset(name: str) -> str:
    """Model `name`'s augmentation preset; an unknown name is a one-line error."""
    if name not in MODELS:
        raise CnnstressError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def model_of(preset: str) -> str:
    """The model that trains with augmentation preset `preset`."""
    if preset not in MODEL_OF_PRESET:
        raise CnnstressError(f"no model trains with augmentation preset {preset!r}; the presets are "
                             f"{', '.join(MODEL_OF_PRESET)}")
    return MODEL_OF_PRESET[preset]


def checkpoint_path(out_dir: str | Path, name: str) -> Path:
    """Model `name`'s checkpoint under output folder `out_dir` (its
    history.json lies beside it: cnnstress.train.fit)."""
    return Path(out_dir) / name / CHECKPOINT_FILE
