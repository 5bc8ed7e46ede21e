"""The report document model and its two renderers (cnnstress.reporting)."""
from __future__ import annotations

import base64
import textwrap
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from cnnstress.io import remove_stale_temp_files
from cnnstress.reporting import (Document, Figure, Lines, Paragraph, Section, Table, render_html, render_text,
                                 write_html)

LONG = ("Pixels are replaced by those of a blurred copy of the image in order of the map's importance "
        "(deletion), or restored into it (insertion), and the probability of the explained class is recorded.")


def small_doc() -> Document:
    return Document("demo report", ["Created today, profile 'smoke'."], [
        Section("Test results", [
            Table(["model", "accuracy", "failures >80%"], [["baseline", "50.13%", "101"], ["improved", "9.1%", "7"]]),
            Table(["class", "change"], [["cat", "-18.5"]], caption="Per class:"),
            Figure("a.png", "bars"), Figure("b.png"),
        ], "comparison"),
        Section("Trust", [
            Paragraph(LONG),
            Section("Sanity", [Paragraph("PASSED: gradcam.", "verdict-good"), Figure("c.png")]),
            Section("Drift", [Table(["group", "n", "verdict"], [["fixed", "3", "ok"], ["new"]], align="lrl"),
                              Lines(["  kept   as is  ", ""])]),
        ], "explanations"),
    ])


def test_render_text_of_a_small_document():
    expected = "\n".join([
        "demo report",
        "===========",
        "Created today, profile 'smoke'.",
        "",
        "1. Test results",
        "---------------",
        "model     accuracy  failures >80%",
        "baseline    50.13%            101",
        "improved      9.1%              7",
        "",
        "Per class:",
        "class  change",
        "cat     -18.5",
        "Figures: a.png (bars), b.png.",
        "",
        "2. Trust",
        "--------",
        "Pixels are replaced by those of a blurred copy of the image in order of the map's",
        "importance (deletion), or restored into it (insertion), and the probability of the",
        "explained class is recorded.",
        "",
        "2a. Sanity",
        "  PASSED: gradcam.",
        "Figure: c.png.",
        "",
        "2b. Drift",
        "group  n  verdict",
        "fixed  3  ok",
        "new",
        "  kept   as is  ",
        "",
    ]) + "\n"
    assert render_text(small_doc()) == expected


def test_text_paragraphs_wrap_as_textwrap_at_88_columns():
    text = render_text(Document("t", [], [Section("s", [Paragraph(LONG * 3)])]))
    body = text.splitlines()[5:]
    assert body == textwrap.wrap(LONG * 3, 88)
    assert max(map(len, body)) <= 88 and len(body) > 3


def test_text_table_columns_line_up():
    rows = [["a", "1.5%", "x"], ["long name", "100.00%", "yy"], ["b", "", "zzz"]]
    lines = render_text(Document("t", [], [Section("s", [Table(["h", "value", "c"], rows, align="lrc")])])).splitlines()[5:]
    # every right-aligned cell ends in the same column, left-aligned ones start in the same column
    ends = {line.index(cell) + len(cell) for line, cell in zip(lines[1:], ["1.5%", "100.00%"])}
    assert len(ends) == 1 and lines[0].index("value") + len("value") == ends.pop()
    assert {line.index(r[0]) for line, r in zip(lines[1:], rows)} == {0}
    assert all("  " in line for line in lines[:3])


def test_blocks_are_checked():
    with pytest.raises(ValueError, match="kind"):
        Paragraph("x", "verdict")
    with pytest.raises(ValueError, match="align"):
        Table(["a", "b"], [], align="l")
    with pytest.raises(ValueError, match="align"):
        Table(["a", "b"], [], align="lx")
    with pytest.raises(ValueError, match="more cells"):
        Table(["a"], [["1", "2"]])
    with pytest.raises(ValueError, match="subsections"):
        Section("a", [Section("b", [Section("c", [])])])
    late = Section("a", [Section("b", [])])
    late.blocks[0].blocks.append(Section("c", []))
    for render in (render_text, lambda doc: render_html(doc, ".")):
        with pytest.raises(ValueError, match="inside a subsection"):
            render(Document("t", [], [late]))
    with pytest.raises(TypeError, match="not a report block"):
        render_text(Document("t", [], [Section("s", ["a bare string"])]))


class StrictParser(HTMLParser):
    """Records every start tag; fails on an end tag that does not close the
    innermost open element, or elements left open."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        self.text.append(data)

    def parse(self, page: str) -> "StrictParser":
        self.feed(page)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")
        return self


def write_png(path, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


@pytest.fixture
def out_dir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_html_embeds_every_figure_as_its_png_bytes(out_dir):
    pngs = {name: write_png(out_dir / name, i) for i, name in enumerate(("a.png", "b.png", "c.png"))}
    p = StrictParser().parse(render_html(small_doc(), out_dir))
    assert p.errors == []
    imgs = [attrs for tag, attrs in p.tags if tag == "img"]
    assert len(imgs) == 3
    for attrs, name in zip(imgs, ("a.png", "b.png", "c.png")):
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix) and attrs["alt"] == name
        assert base64.b64decode(attrs["src"][len(prefix):], validate=True) == pngs[name]
    assert "figure not found" not in "".join(p.text)


def test_html_marks_missing_outside_and_non_png_figures(out_dir, tmp_path):
    write_png(tmp_path / "secret.png", 0)           # exists, but outside the output folder
    (out_dir / "fake.png").write_text("not a png")
    doc = Document("t", [], [Section("s", [Figure("gone.png", "x"), Figure("../secret.png"), Figure("fake.png")])])
    p = StrictParser().parse(render_html(doc, out_dir))
    text = " ".join(p.text)
    assert p.errors == [] and not [t for t, _ in p.tags if t == "img"]
    assert "figure not found: gone.png" in text and "figure not found: ../secret.png" in text
    assert "figure is not a PNG image: fake.png" in text


def test_html_escapes_all_text(out_dir):
    evil = "<script>alert('x')</script> & \"q\""
    doc = Document(evil, [evil], [Section(evil, [Paragraph(evil), Paragraph(evil, "verdict-bad"),
                                                 Table([evil, "b"], [[evil, evil]], caption=evil),
                                                 Lines([evil]), Figure(evil, evil), Section(evil, [])], evil)])
    page = render_html(doc, out_dir)
    assert "<script" not in page.lower()
    p = StrictParser().parse(page)
    assert p.errors == []
    # the text survives escaping intact: <title>, h1, meta, TOC entry, h2, 2 paragraphs, th, td x2,
    # caption, pre, the missing-figure note (the name), h3
    assert sum(t.count(evil) for t in p.text) == 14


def test_html_structure_tables_verdicts_and_toc(out_dir):
    p = StrictParser().parse(render_html(small_doc(), out_dir))
    assert p.errors == []
    tags = [t for t, _ in p.tags]
    assert tags.count("table") == 3 and tags.count("th") == 3 + 2 + 3 and tags.count("td") == 6 + 2 + 6
    assert tags.count("caption") == 1 and tags.count("pre") == 1
    ids = [a["id"] for t, a in p.tags if "id" in a]
    links = [a["href"] for t, a in p.tags if t == "a"]
    assert links == ["#s1", "#s2"] and {"s1", "s2", "s2a", "s2b"} <= set(ids) and len(ids) == len(set(ids))
    assert [a["data-key"] for t, a in p.tags if t == "section"] == ["comparison", "explanations"]
    assert ("p", {"class": "verdict good"}) in p.tags
    assert [a.get("class") for t, a in p.tags if t == "td"][:3] == ["l", "r", "r"]


def test_html_is_self_contained(out_dir):
    for name in ("a.png", "b.png", "c.png"):
        write_png(out_dir / name, 1)
    page = render_html(small_doc(), out_dir)
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<link" not in lowered
    assert "<script" not in lowered and "<style>" in lowered
    srcs = [a["src"] for t, a in StrictParser().parse(page).tags if "src" in a]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_write_html_is_atomic_and_leaves_no_temp_file(out_dir):
    path = write_html(small_doc(), out_dir)
    assert path == out_dir / "report.html"
    assert path.read_text(encoding="utf-8") == render_html(small_doc(), out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html"]
    # a writer killed mid-write leaves a temp file the next run's clean-up knows
    stale = out_dir / ".report.html.abcd1234.tmp"
    stale.write_text("partial")
    assert remove_stale_temp_files(out_dir) == [stale]
