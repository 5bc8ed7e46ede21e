"""Checkpoints and small JSON results, written atomically.

A checkpoint is one ``torch.save`` dict: format version, architecture, class
count, epochs done, config, model/optimizer/scheduler states, RNG states and
the history so far. It is written to a temporary file beside the target and
renamed over it, so an interrupted write never leaves a half checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .augment import DRAWS_VERSION, PRESETS
from .config import Config
from .errors import CheckpointError, CnnstressError
from .model import ARCH

FORMAT_VERSION = 2  # 2: RNG states as tensors (weights_only-loadable); 1: numpy's as an ndarray


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove a file can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CnnstressError(f"cannot write to output folder {path} ({exc.strerror or exc}); "
                             "choose another --out-dir") from None
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over
    `path`; on any failure the old `path` is untouched and tmp removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if not _disk_full(exc, path, _size(path)):
            raise
        _raise_disk_full(path, _size(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        needed = max(_size(Path(tmp)), _size(path))
        Path(tmp).unlink(missing_ok=True)
        if not _disk_full(exc, path, needed):
            raise
    else:
        return
    # Out here the failed writer (torch's holds the unlinked temp file open) is gone: free space is true.
    _raise_disk_full(path, needed)


# mkstemp's names above: "." + target name + "." + 8 random characters + ".tmp", for the kinds of file we write
_TEMP_NAME = re.compile(r"^\..+\.(pt|json|npz|png|csv|txt)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic_write in `folder` (left by a
    writer killed mid-write); returns them. Call only while holding the
    folder's lock (cnnstress.lock), so that none of them is being written."""
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        if _TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


DISK_SLACK = 16 << 20  # bytes: free space this close to a failed write's size counts as a full disk


def _disk_full(exc: BaseException, path: Path, needed: int) -> bool:
    """Whether a write of `path` failed for want of space. `needed`: the bytes
    known to be needed (the old file's size or what was written before the
    failure; a lower bound). torch.save reports a full disk as a RuntimeError
    of its stream writer without an errno, so that one counts as full when the
    folder has hardly more room than `needed`."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, RuntimeError) and re.search(r"PytorchStreamWriter|file write failed|unexpected pos", str(exc)):
        return _free_bytes(path.parent) < needed + DISK_SLACK
    return False


def _raise_disk_full(path: Path, needed: int) -> None:
    need = f"needs at least {needed / 2**20:.0f} MB, " if needed >= 2**20 else ""
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    raise CnnstressError(f"no space left on device writing {path.name} in {path.parent} ({need}"
                         f"{_free_bytes(path.parent) / 2**20:.0f} MB free){kept}; free some space or use "
                         "another --out-dir")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
    classes = ckpt["model"].get("linear.weight", torch.empty(0, 0)).shape[0]
    if classes != ckpt.get("num_classes", classes) or classes != 10:
        raise CheckpointError(f"checkpoint {path} has {classes} output classes, expected 10 (CIFAR-10); "
                              "retrain with --force or use another --out-dir")
    return ckpt


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
