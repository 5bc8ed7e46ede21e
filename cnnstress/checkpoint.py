"""Checkpoints, written atomically (cnnstress.io).

A checkpoint is one ``torch.save`` dict: format version, architecture, class
count, epochs done, config, model/optimizer/scheduler states, RNG states and
the history so far. It is written to a temporary file beside the target and
renamed over it, so an interrupted write never leaves a half checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .augment import DRAWS_VERSION, PRESETS
from .config import Config
from .errors import CheckpointError, ConfigError
from .io import atomic_write, ensure_writable_dir, remove_stale_temp_files, save_json  # noqa: F401 (re-exported)
from .model import ARCH

FORMAT_VERSION = 2  # 2: RNG states as tensors (weights_only-loadable); 1: numpy's as an ndarray


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT_VERSION, "arch": ARCH, **state}, tmp))


class _UnsafeCheckpoint(Exception):
    """torch.load(weights_only=True) refused a global outside its allow-list."""


def _numpy_array_globals() -> list:
    """What format-1 checkpoints (numpy's RNG state as an ndarray) need beyond
    tensors: numpy's array reconstructor, ndarray and the uint32 dtype."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    import numpy as np
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_safely(path: Path, map_location) -> Any:
    """torch.load with weights_only=True (tensors, containers, numbers,
    strings: nothing can run code); format-1 checkpoints additionally hold a
    numpy array, which is allow-listed for them alone."""
    import pickle
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused is None:
            raise  # not a refusal: a damaged file
        if not refused.startswith("numpy"):
            raise _UnsafeCheckpoint(refused) from None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused is None:
            raise
        raise _UnsafeCheckpoint(refused) from None


def _refused_global(message: str) -> str | None:
    """The `module.name` torch's weights-only unpickler names in its refusal, if any."""
    import re
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", message)
    return found.group(1) if found else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict, checking it is one of ours for this architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train first (python -m cnnstress train)")
    try:
        ckpt = _load_safely(path, map_location)
    except _UnsafeCheckpoint as exc:
        raise CheckpointError(f"checkpoint {path} was not read: it asks to run code ({exc}), which a cnnstress "
                              "checkpoint never does; delete it and retrain with --force") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                              "it is truncated or not a cnnstress checkpoint: delete it or retrain with --force") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a cnnstress checkpoint; delete it or retrain with --force")
    if ckpt.get("arch") != ARCH:
        raise CheckpointError(f"checkpoint {path} holds architecture {ckpt.get('arch')!r}, expected {ARCH!r}; "
                              "retrain with --force or use another --out-dir")
    problem = malformed_fields(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path} is malformed ({problem}); it is damaged or not a cnnstress "
                              "checkpoint: delete it or retrain with --force")
    classes = ckpt["model"].get("linear.weight", torch.empty(0, 0)).shape[0]
    if classes != ckpt.get("num_classes", classes) or classes != 10:
        raise CheckpointError(f"checkpoint {path} has {classes} output classes, expected 10 (CIFAR-10); "
                              "retrain with --force or use another --out-dir")
    return ckpt


# What every history entry holds (cnnstress.train.fit writes them; the report reads them).
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def malformed_history(history: Any, epochs: int | None = None) -> str | None:
    """None when `history` is a list of per-epoch records (numbers; at least
    `epochs` of them when given), else what is wrong with it."""
    if not isinstance(history, list):
        return f"history is a {type(history).__name__}, expected a list"
    if epochs is not None and len(history) < min(epochs, 1):
        return f"history is empty for {epochs} epochs"
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            return f"history[{i}] is a {type(h).__name__}, expected an object"
        for key in HISTORY_FIELDS:
            value = h.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"history[{i}].{key} is {value!r}, expected a number"
    return None


def malformed_weights(state: dict[str, torch.Tensor]) -> str | None:
    """None when a ResNet state_dict's tensors are usable: floating point and
    finite, BatchNorm's batch counters whole numbers; else the first that is not.
    (load_state_dict would copy integers into float parameters, and NaN weights
    predict one class, then break temperature scaling.)"""
    for key, t in state.items():
        counter = key.endswith("num_batches_tracked")
        if counter == t.is_floating_point() or t.is_complex():
            return f"{key} has dtype {str(t.dtype).replace('torch.', '')}"
        if not counter and not bool(torch.isfinite(t).all()):
            return f"{key} holds NaN or infinite values"
    return None


def malformed_fields(ckpt: dict[str, Any]) -> str | None:
    """None when a checkpoint's fields have the types the readers use, else
    the first field that does not (a one-line description)."""
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return "model is not a dict of tensors"
    problem = malformed_weights(model)
    if problem:
        return problem
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"epoch is {epoch!r}, expected a whole number >= 0"
    if not isinstance(ckpt["config"], dict):
        return f"config is a {type(ckpt['config']).__name__}, expected a dict"
    try:
        Config.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as exc:
        return f"its config is invalid: {exc}"
    problem = malformed_history(ckpt.get("history"), epoch)
    if problem:
        return problem
    for key in ("optimizer", "scheduler", "rng"):   # what resuming restores
        if not isinstance(ckpt.get(key), dict):
            return f"{key} is {type(ckpt.get(key)).__name__}, expected a dict"
    optimizer, rng = ckpt["optimizer"], ckpt["rng"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        return "optimizer lacks its state or param_groups"
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8 \
            or not isinstance(rng.get("numpy"), (dict, tuple)) or not isinstance(rng.get("python"), tuple):
        return "rng lacks the torch, numpy or python generator state"
    for key, kind in (("finished", bool), ("num_classes", int)):
        if key in ckpt and not isinstance(ckpt[key], kind):
            return f"{key} is a {type(ckpt[key]).__name__}, expected a {kind.__name__}"
    return None


def check_config_matches(ckpt: dict[str, Any], config: Config, path: str | Path) -> None:
    """Raise CheckpointError when the checkpoint was trained with other
    training hyperparameters than `config` (runtime fields may differ)."""
    saved = Config.from_dict(ckpt["config"]).training_key()
    wanted = config.training_key()
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {path} was trained with a different config ({shown}); "
                              "retrain with --force or use another --out-dir")
    # A checkpoint without the key predates the versioning: its draws cannot be told apart.
    draws = ckpt.get("augment_draws")
    if not PRESETS[config.augment].is_identity and draws != DRAWS_VERSION:
        made = "unversioned (older)" if draws is None else f"version-{draws}"
        raise CheckpointError(f"checkpoint {path} was trained with the {config.augment!r} augmentation's {made} "
                              f"random draws, not version {DRAWS_VERSION}; retrain with --force or use another --out-dir")
