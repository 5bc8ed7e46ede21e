"""One writer per output folder: a lock file, outputs/.cnnstress.lock.

Every pipeline function that writes under an output folder holds the lock
while it writes, so two `run`s, or a notebook and a CLI command, cannot
overwrite each other's checkpoints and results: the second one stops with a
one-line error naming the holder. The lock is an `fcntl.flock` on the file,
which the operating system releases when its process ends (even by kill -9),
so a killed run never blocks the next; the file's content (pid, host,
command, start time) only says who holds it. It is re-entrant within a
process (a notebook's or run_pipeline's nested stages) and held only while
a stage writes, so an idle notebook kernel does not block the CLI.

Taking the lock afresh also removes temporary files of our own naming that
a killed writer left behind (see io.remove_stale_temp_files): while
we hold the lock, no other cnnstress process can be writing them.
"""
from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import socket
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import CnnstressError, OutputInUse
from .io import default_out_dir, ensure_writable_dir, remove_stale_temp_files
from .registry import MODEL_NAMES

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are then not locked
    fcntl = None

LOCK_FILE = ".cnnstress.lock"


_held: dict[Path, tuple[int, int]] = {}   # resolved lock path -> (fd, depth), this process


def _describe_self() -> dict:
    from .runtime import in_notebook
    argv = list(sys.argv) or ["python"]
    if in_notebook():
        command = "a Jupyter notebook kernel"
    else:
        command = " ".join(["python -m cnnstress" if argv[0].endswith("__main__.py") else Path(argv[0]).name]
                           + argv[1:])
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError, RecursionError):   # RecursionError: "[[[[..." planted in the file
        return {}
    return holder if isinstance(holder, dict) else {}


def _check_ours(fd: int, path: Path) -> None:
    """Refuse a lock file that is not a plain file of ours: a device, a FIFO,
    a hard link to a file elsewhere, or a file holding anything but a holder
    record (taking the lock empties it)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise CnnstressError(f"{path} is {what}, not a cnnstress lock file; remove it or use another --out-dir")
    if st.st_size > 4096:
        raise CnnstressError(f"{path} holds {st.st_size} bytes, not a cnnstress lock record; remove it or use "
                             "another --out-dir")
    if st.st_size and "pid" not in _read_holder(fd):
        raise CnnstressError(f"{path} holds something that is not a cnnstress lock record; remove it or use "
                             "another --out-dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def output_lock(out_dir: str | Path, log: Callable[[str], None] | None = print) -> Iterator[None]:
    """Hold `out_dir`'s lock for the block (re-entrant in one process).

    Raises OutputInUse, naming the holder, when another live process holds it.
    """
    out = Path(out_dir)
    path = out.resolve() / LOCK_FILE   # not path.resolve(): that would follow a planted link
    if path in _held:                       # a stage nested in another of this process
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
    else:
        _held[path] = (_acquire(out, path, log), 1)
    try:
        yield
    finally:
        fd, depth = _held[path]
        if depth > 1:
            _held[path] = (fd, depth - 1)
        else:
            del _held[path]
            os.ftruncate(fd, 0)  # the file stays (unlinking it would race with a process about to lock it)
            os.close(fd)         # closing releases the flock


def _acquire(out: Path, path: Path, log: Callable[[str], None] | None) -> int:
    """Lock `path` (in folder `out`), say so in it, clear stale temp files; the open fd."""
    ensure_writable_dir(out)
    try:
        # O_NOFOLLOW: a symlink planted as the lock file must not make us truncate its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CnnstressError(f"{path} is a symbolic link, not a cnnstress lock file; remove it (it is not "
                                 "followed) or use another --out-dir") from None
        raise CnnstressError(f"cannot open the lock file {path} ({exc.strerror or exc}); "
                             "remove it or choose another --out-dir") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                h = _read_holder(fd)
                who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')} ({h.get('command', '?')}, "
                       f"since {h.get('started', '?')})") if h else "another process"
                raise OutputInUse(f"output folder {out} is in use by {who}; wait for it to finish, "
                                  "stop it, or use another --out-dir") from None
        _check_ours(fd, path)
        # A holder that released the lock emptied the file; content left means it was killed.
        old, me = _read_holder(fd), _describe_self()
        pid = old.get("pid")
        if isinstance(pid, int) and pid != me["pid"] and old.get("host") == me["host"] \
                and not _pid_alive(pid) and log:
            log(f"taking over {path.name} in {out} from pid {pid} ({old.get('command', '?')}), "
                "which is no longer running")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as exc:
            raise CnnstressError(f"cannot write the lock file {path} ({exc.strerror or exc}); free some space "
                                 "or use another --out-dir") from None
        # A model folder linked in from elsewhere is another folder's (this lock does not cover it: a run
        # there may be mid-write), so only real subfolders are cleaned.
        for folder in [out, *(out / name for name in MODEL_NAMES
                               if (out / name).is_dir() and not (out / name).is_symlink())]:
            removed = remove_stale_temp_files(folder)
            if removed and log:
                log(f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} left by an "
                    f"interrupted write in {folder}: {', '.join(p.name for p in removed)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def locks_output(func: Callable) -> Callable:
    """Decorator: hold the lock of the call's `out_dir` (or `result.outputs`,
    or the default output folder) while `func` runs, unless it is called
    with save=False."""
    sig = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        if bound.arguments.get("save") is False:   # nothing written: no lock needed
            return func(*args, **kwargs)
        out = bound.arguments.get("out_dir")
        if out is None and "result" in bound.arguments:
            out = bound.arguments["result"].outputs
        if out is None:
            out = default_out_dir()
        log = bound.arguments.get("log", print)
        with output_lock(out, log=log):
            return func(*args, **kwargs)
    return wrapper
