"""Figure files that know what they were drawn from.

A stage hands `write_figure` a FigureSpec (the plot function and its
arguments) instead of a drawn Figure. The PNG carries a digest of what drew
it (the arguments, the plotting code, matplotlib and its rc settings, the
DPI) in a text chunk, and a spec whose digest matches the file on disk is
not drawn again: a rerun that reads every stage from its caches redraws
nothing (drawing was about 5 of the 7 seconds of a cached smoke rerun),
while a figure whose inputs, code or style changed is redrawn.

In a notebook a written figure is shown from its file, so it is rendered
once (matplotlib's inline backend would render it a second time).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

DPI = 150
DIGEST_KEY = "cnnstress-figure"   # the PNG text chunk holding the digest
DIGEST_VERSION = 1                # bump when the digest's recipe changes
# rc settings that say where figures go, not how they look (the notebook's inline backend differs from Agg)
RC_IGNORED = ("backend", "backend_fallback", "interactive", "savefig.directory")


class Undigestable(TypeError):
    """An argument the digest cannot read reliably: the figure is always drawn."""


class FigureSpec:
    """A figure not drawn yet: `plot(*args, **kwargs)` returns it."""

    def __init__(self, plot: Callable[..., Figure], *args: Any, **kwargs: Any):
        self.plot, self.args, self.kwargs = plot, args, kwargs

    def draw(self) -> Figure:
        return self.plot(*self.args, **self.kwargs)

    def digest(self, dpi: int = DPI) -> str | None:
        """What the figure is drawn from, as a hex digest; None when an
        argument cannot be digested (then it is always drawn)."""
        h = hashlib.sha256()
        _feed(h, (DIGEST_VERSION, dpi, f"{self.plot.__module__}.{self.plot.__qualname__}",
                  code_digest(), matplotlib.__version__, rc_digest()))
        try:
            _feed(h, self.args)
            _feed(h, self.kwargs)
        except Undigestable:
            return None
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"FigureSpec({self.plot.__qualname__})"


@functools.cache
def code_digest() -> str:
    """Every source file of the cnnstress package: a change anywhere redraws every figure once."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def rc_digest() -> str:
    """matplotlib's current rc settings (a notebook may change the style or the font size)."""
    rc = matplotlib.rcParams
    return hashlib.sha256(repr([(k, rc[k]) for k in sorted(rc) if k not in RC_IGNORED
                                and not k.startswith("webagg.")]).encode()).hexdigest()


def _feed(h, value: Any) -> None:
    """Add `value` to the hash `h`. A scalar's repr tells its type (1, 1.0, True, '1');
    containers and arrays are tagged with their type and size, so [1] and (1,),
    [[1], 2] and [1, [2]], an array and its list differ."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(f"{value!r};".encode())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise Undigestable("an object array")
        h.update(f"ndarray:{value.dtype.str}:{value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, np.generic):
        _feed(h, np.asarray(value))
    elif type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        h.update(f"tensor:{value.dtype};".encode())
        _feed(h, value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy())
    elif isinstance(value, Mapping):
        h.update(f"{{{len(value)};".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        h.update(f"{type(value).__name__}[{len(value)};".encode())
        for v in items:
            _feed(h, v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__module__}.{type(value).__qualname__};".encode())
        for f in dataclasses.fields(value):
            _feed(h, f.name)
            _feed(h, getattr(value, f.name))
    else:
        raise Undigestable(type(value).__name__)


def drawn_from(path: str | Path) -> str | None:
    """The digest the figure at `path` was drawn from; None when it is
    missing, not ours, or not a whole PNG (Pillow reads the text chunks and
    checks every chunk through IEND, so a file cut short is drawn again)."""
    try:
        with Image.open(path) as im:
            digest = im.info.get(DIGEST_KEY)
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return digest if isinstance(digest, str) else None


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI, digest: str | None = None) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file, then rename), with
    `digest` in its text chunk when given; returns the path."""
    from ..io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {DIGEST_KEY: digest} if digest else None
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor="white", metadata=metadata))
    return path


def write_figure(figure: FigureSpec | Figure, path: str | Path, *, show: bool = False, dpi: int = DPI,
                 drawn: Figure | None = None) -> Path:
    """Write a figure to `path`: a FigureSpec is drawn only when the file was
    not drawn from the same digest, then closed; a Figure is always saved and
    left open (its caller owns it). drawn: the spec's figure, already drawn by
    a caller that keeps it (saved when the file is stale, never closed).
    show: display the file in a notebook."""
    path = Path(path)
    if isinstance(figure, FigureSpec):
        digest = figure.digest(dpi)
        if digest is None or drawn_from(path) != digest:
            fig = figure.draw() if drawn is None else drawn
            try:
                save_figure(fig, path, dpi=dpi, digest=digest)
            finally:
                if drawn is None:
                    plt.close(fig)
    else:
        save_figure(figure, path, dpi=dpi)
    if show:
        show_png(path, dpi=dpi)
    return path


def show_png(path: str | Path, dpi: int = DPI) -> None:
    """Display the PNG at `path` in a notebook, at the size matplotlib's inline
    backend would give the figure (figure.dpi); nothing elsewhere."""
    from ..runtime import in_notebook

    if not in_notebook():
        return
    from IPython.display import Image as NotebookImage, display

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width = im.size[0]
    display(NotebookImage(data=data, format="png", width=round(width * matplotlib.rcParams["figure.dpi"] / dpi)))
