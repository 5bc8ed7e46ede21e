"""cnnstress.plots.files: a figure file carries the digest of what drew it,
and a FigureSpec is drawn only when the file was drawn from something else."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cnnstress.plots import files  # noqa: E402
from cnnstress.plots.files import FigureSpec, drawn_from, save_figure, write_figure  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


DRAWN: list[tuple] = []


def line_plot(values, *, title="", color="C0"):
    """A small plot function that records each time it is drawn."""
    DRAWN.append((np.asarray(values).tolist(), title, color))
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot(values, color=color)
    ax.set_title(title)
    return fig


def other_plot(values, *, title="", color="C0"):
    DRAWN.append(("other", title))
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar(range(len(values)), values)
    return fig


def _write(path, *args, plot=line_plot, **kwargs):
    """write_figure(FigureSpec(plot, ...)); returns whether it drew."""
    before = len(DRAWN)
    write_figure(FigureSpec(plot, *args, **kwargs), path, dpi=30)
    return len(DRAWN) > before


def _stamp(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_spec_is_drawn_once_and_redrawn_when_what_it_is_drawn_from_changes(tmp_path):
    path = tmp_path / "sub" / "fig.png"
    values = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    assert _write(path, values, title="a")
    assert drawn_from(path) == FigureSpec(line_plot, values, title="a").digest(30)
    stamp = _stamp(path)
    assert not _write(path, values.copy(), title="a")             # equal arguments: the file is left alone
    assert _stamp(path) == stamp
    changed = values.copy()
    changed[1] = np.nextafter(changed[1], np.float32(9))          # one bit of one value
    for args, kwargs, plot in (((changed,), {"title": "a"}, line_plot),
                               ((values,), {"title": "b"}, line_plot),
                               ((values,), {"title": "a", "color": "C1"}, line_plot),
                               ((values,), {"title": "a"}, other_plot)):
        assert _write(path, *args, plot=plot, **kwargs), (args, kwargs, plot.__name__)
        assert not _write(path, *args, plot=plot, **kwargs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fig.png"]   # no temp file left
    assert plt.get_fignums() == []                                        # what it drew it closed


def test_style_dpi_matplotlib_and_the_code_are_part_of_the_digest(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    assert _write(path, [1, 2])
    with matplotlib.rc_context({"font.size": 20}):                # a notebook's style change
        assert _write(path, [1, 2])
    assert _write(path, [1, 2])
    spec = FigureSpec(line_plot, [1, 2])
    assert spec.digest(30) != spec.digest(31)
    monkeypatch.setattr(matplotlib, "__version__", "0.0")
    assert spec.digest(30) != drawn_from(path)
    monkeypatch.undo()
    monkeypatch.setattr(files, "code_digest", lambda: "edited")   # any source file of the package
    assert spec.digest(30) != drawn_from(path)
    # where figures go is not how they look: the backend is left out
    monkeypatch.undo()
    with matplotlib.rc_context({"savefig.directory": str(tmp_path)}):
        assert spec.digest(30) == drawn_from(path)


@dataclass
class Point:
    x: float
    y: float


@pytest.mark.parametrize("a, b", [
    ([1], (1,)), (1, 1.0), (1, True), ("1", 1), (None, "None"), ([1, 2], [2, 1]), ([[1], 2], [1, [2]]),
    ({"a": 1}, {"b": 1}), ({"a": 1}, [("a", 1)]),
    (np.zeros(4, np.float32), np.zeros(4, np.float64)), (np.zeros(4), np.zeros((2, 2))),
    (np.zeros(2, np.int64), [0, 0]), (np.float32(1), 1.0),
    (torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)), (torch.arange(3), torch.arange(3.0)),
    (Point(1.0, 2.0), Point(2.0, 1.0)), (Point(1.0, 2.0), {"x": 1.0, "y": 2.0}),
    (float("nan"), float("inf")), ({1, 2}, [1, 2]),
])
def test_the_digest_tells_arguments_apart(a, b):
    assert FigureSpec(line_plot, a).digest() != FigureSpec(line_plot, b).digest()


@pytest.mark.parametrize("value, same", [
    (np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
    (torch.tensor([0.5, 1.5]), torch.tensor([0.5, 1.5])), (Point(1.0, 2.0), Point(1.0, 2.0)),
    ({2, 1, 3}, {3, 2, 1}), ([float("nan")], [float("nan")]),
])
def test_equal_arguments_give_equal_digests(value, same):
    assert FigureSpec(line_plot, value).digest() == FigureSpec(line_plot, same).digest()


def test_an_argument_the_digest_cannot_read_is_always_drawn(tmp_path):
    path = tmp_path / "fig.png"
    for value in (object(), np.array([object()])):
        spec = FigureSpec(line_plot, [1, 2], title=value)
        assert spec.digest() is None
        before = len(DRAWN)
        write_figure(spec, path)
        write_figure(spec, path)
        assert len(DRAWN) - before == 2 and drawn_from(path) is None


def test_a_foreign_damaged_or_missing_png_is_drawn_again(tmp_path):
    path = tmp_path / "fig.png"
    fig = line_plot([1, 2])
    save_figure(fig, path, dpi=30)                 # ours, but with no digest
    assert drawn_from(path) is None
    assert _write(path, [1, 2])
    good = path.read_bytes()
    path.write_bytes(good[:-20])                   # cut short: the digest chunk is still there
    assert FigureSpec(line_plot, [1, 2]).digest(30) in good.decode("latin-1")
    assert drawn_from(path) is None and _write(path, [1, 2])
    path.write_bytes(b"not a png")
    assert _write(path, [1, 2])
    path.unlink()
    assert _write(path, [1, 2])
    assert path.read_bytes() == good               # the same figure, byte for byte


def test_the_digest_is_read_among_other_text_chunks(tmp_path):
    """A PNG another program wrote, with plain and compressed text chunks
    besides ours: the digest is found; a JPEG under a .png name has none."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "x" * 2000, zip=True)
    info.add_text("cnnstress-figure", "abc123")
    info.add_text("Title", "caf\xe9")
    path = tmp_path / "p.png"
    Image.new("RGB", (4, 3)).save(path, pnginfo=info)
    assert drawn_from(path) == "abc123"
    Image.new("RGB", (4, 3)).save(path, format="JPEG")
    assert drawn_from(path) is None


def test_a_written_figure_is_shown_from_its_file_in_a_notebook(tmp_path, monkeypatch):
    """In a notebook the file is displayed at the size the inline backend would
    give the figure (figure.dpi); elsewhere nothing is displayed."""
    shown = []
    display = types.ModuleType("IPython.display")
    display.Image = lambda **kw: kw
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    path = tmp_path / "fig.png"
    monkeypatch.setattr("cnnstress.runtime.in_notebook", lambda: False)
    write_figure(FigureSpec(line_plot, [1, 2]), path, show=True, dpi=30)
    assert shown == []
    monkeypatch.setattr("cnnstress.runtime.in_notebook", lambda: True)
    with matplotlib.rc_context({"figure.dpi": 72}):
        write_figure(FigureSpec(line_plot, [1, 2]), path, show=True, dpi=30)   # not redrawn, still shown
    (image,) = shown
    assert image["data"] == path.read_bytes() and image["format"] == "png"
    assert Image.open(path).size == (60, 45) and image["width"] == round(60 * 72 / 30)


def test_a_drawn_figure_is_always_saved_and_left_to_its_caller(tmp_path):
    path = tmp_path / "fig.png"
    fig = line_plot([1, 2])
    path.write_bytes(b"an older file")
    write_figure(fig, path, dpi=30)
    assert Image.open(path).size == (60, 45) and drawn_from(path) is None
    assert plt.fignum_exists(fig.number)


def test_a_figure_its_caller_drew_is_saved_for_its_spec_and_left_open(tmp_path):
    """write_figure(spec, drawn=fig): a caller that keeps the Figure (Study.curves)
    has it saved under the spec's digest when the file is stale, not drawn twice."""
    path = tmp_path / "fig.png"
    spec = FigureSpec(line_plot, [1, 2])
    fig = spec.draw()
    before = len(DRAWN)
    write_figure(spec, path, dpi=30, drawn=fig)
    assert len(DRAWN) == before and drawn_from(path) == spec.digest(30) and plt.fignum_exists(fig.number)
    stamp = _stamp(path)
    write_figure(spec, path, dpi=30, drawn=fig)                  # up to date: left alone
    assert _stamp(path) == stamp and plt.fignum_exists(fig.number)
