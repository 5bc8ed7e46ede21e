"""Files written safely: atomic replacement (a temporary file beside the
target, renamed over it), small JSON results, writable output folders and the
clean-up of temporary files a killed writer left behind."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import CnnstressError


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


def check_writable_dir(path: str | Path) -> Path:
    """Refuse, in one line, an output folder that could not be made or written,
    without making it: a refused run leaves nothing behind (the lock makes the
    folder and proves a file can be written there, see ensure_writable_dir)."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        reason = "File exists" if probe == path else f"{probe} is not a folder"
        raise CnnstressError(f"cannot write to output folder {path} ({reason}); choose another --out-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CnnstressError(f"cannot write to output folder {path} ({probe} is not writable); "
                             "choose another --out-dir")
    return path


def check_folder_arg(value: str | Path | None, what: str, default: str, variable: str) -> str:
    """`value` (a --data-dir/--out-dir argument), else $`variable`, else
    `default`; an empty path (which would mean the current folder, or
    silently the default) is refused."""
    if value is None:
        value = os.environ.get(variable, default)
        if not str(value).strip():
            raise CnnstressError(f"${variable} is set but empty; unset it or name a folder")
    if not str(value).strip():
        raise CnnstressError(f"{what} is an empty path; name a folder (default: {default})")
    return str(value)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over
    `path`; on any failure the old `path` is untouched and tmp removed. A
    failure to write (full disk, no permission, `path` a folder) is a one-line
    CnnstressError."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if not _disk_full(exc, path, _size(path)):
            _raise_cannot_write(path, exc)
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
            if isinstance(exc, OSError):
                _raise_cannot_write(path, exc)
            raise
    else:
        return
    # Out here the failed writer (torch's holds the unlinked temp file open) is gone: free space is true.
    _raise_disk_full(path, needed)


def _raise_cannot_write(path: Path, exc: OSError) -> None:
    if isinstance(exc, IsADirectoryError) and path.is_dir():
        fix = f"{path} is a folder: move it out of the way"
    else:
        fix = "check the folder's permissions or use another --out-dir"
    raise CnnstressError(f"cannot write {path.name} in {path.parent} ({exc.strerror or exc}); {fix}") from None


def remove_file(path: str | Path) -> None:
    """Delete an output file of ours if it exists; failing to is a one-line CnnstressError."""
    path = Path(path)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise CnnstressError(f"cannot remove {path.name} in {path.parent} ({exc.strerror or exc}); check the "
                             "folder's permissions or use another --out-dir") from None


# mkstemp's names above: "." + target name + "." + 8 random characters + ".tmp", for the kinds of file we write
_TEMP_NAME = re.compile(r"^\..+\.(pt|json|npz|png|csv|txt|html)\.[a-z0-9_]{8}\.tmp$")


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


# --- where things live -------------------------------------------------------
DEFAULT_DATA_DIR = "data"
DEFAULT_OUT_DIR = "outputs"
ENV_PROFILE, ENV_DATA_DIR, ENV_OUT_DIR = "CNNSTRESS_PROFILE", "CNNSTRESS_DATA_DIR", "CNNSTRESS_OUT_DIR"


def default_data_dir() -> str:
    return os.environ.get(ENV_DATA_DIR, DEFAULT_DATA_DIR)


def default_out_dir() -> str:
    return os.environ.get(ENV_OUT_DIR, DEFAULT_OUT_DIR)


def predictions_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"predictions_{name}.npz"


def stress_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"stress_{name}.json"


EXPLANATIONS_FILE = "explanations.json"
RUN_LOG = "run_log.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "analysis_report.txt"
HTML_REPORT_FILE = "report.html"


MAX_CACHE_BYTES = 64 * 2**20   # our JSON caches are kilobytes to a few megabytes: larger is not read


def read_json_cache(path: str | Path, key: dict, log: Callable[[str], None] | None = None) -> dict | None:
    """The "results" of a JSON cache {"key": ..., "results": ...} when its key
    equals `key`; None when it is missing, made otherwise, unreadable or not
    such an object (the last two logged: the caller recomputes). A cache file
    is untrusted: its results are checked by the caller's Record type."""
    path = Path(path)
    try:
        size = path.stat().st_size
        cached = json.loads(path.read_text()) if size <= MAX_CACHE_BYTES else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:   # RecursionError: JSON nested too deep
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if size > MAX_CACHE_BYTES:
            problem = f"{size >> 20} MB, far more than a cache of ours: not read"
        elif not isinstance(cached, dict):
            problem = f"the file is {'null' if cached is None else type(cached).__name__}, expected an object"
        else:
            problem = next((f"the file.{k} is missing" if k not in cached else
                            f"the file.{k} is {type(cached[k]).__name__}, expected an object"
                            for k in ("key", "results") if not isinstance(cached.get(k), dict)), None)
        if problem is None:
            return cached["results"] if cached["key"] == key else None
    if log:
        log(f"{path.name}: not a valid cache ({problem}); recomputing")
    return None
