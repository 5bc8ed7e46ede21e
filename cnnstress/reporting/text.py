"""A Document as plain text in the style of analysis_report.txt: 88 columns,
numbered sections underlined with '-', fixed-width tables."""
from __future__ import annotations

import textwrap

from .document import Document, Figure, Lines, Paragraph, Section, Table, letters

WIDTH = 88
GAP = "  "  # between table columns
INDENT = {"text": "", "verdict-good": "  ", "verdict-bad": "  ", "note": "  "}


def wrap(text: str, indent: str = "") -> list[str]:
    """`text` wrapped at WIDTH columns (an empty text is one empty line)."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent) or [""]


def table_lines(table: Table) -> list[str]:
    """The caption (wrapped), the header and the rows in columns as wide as
    their widest cell, GAP apart; trailing blanks stripped."""
    rows = [list(table.header)] + table.cells()
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.header))]
    pad = {"l": str.ljust, "r": str.rjust, "c": str.center}
    out = wrap(table.caption) if table.caption else []
    for row in rows:
        out.append(GAP.join(pad[a](c, w) for a, c, w in zip(table.alignment, row, widths)).rstrip())
    return out


def figure_lines(figures: list[Figure]) -> list[str]:
    """"Figure: a.png (caption)." or, for several, "Figures: a.png, b.png (caption)."."""
    named = ", ".join(f.filename + (f" ({f.caption})" if f.caption else "") for f in figures)
    return wrap(f"Figure{'s' if len(figures) > 1 else ''}: {named}.")


def block_lines(blocks: list, number: str) -> list[str]:
    """The blocks of the section numbered `number`; consecutive figures share
    one line, consecutive tables are a blank line apart."""
    out: list[str] = []
    i = subsection = 0
    while i < len(blocks):
        block = blocks[i]
        if isinstance(block, Figure):
            j = i
            while j < len(blocks) and isinstance(blocks[j], Figure):
                j += 1
            out += figure_lines(blocks[i:j])
            i = j
            continue
        if isinstance(block, Paragraph):
            out += wrap(block.text, INDENT[block.kind])
        elif isinstance(block, Table):
            if i and isinstance(blocks[i - 1], Table):
                out.append("")
            out += table_lines(block)
        elif isinstance(block, Lines):
            out += list(block.lines)
        elif isinstance(block, Section):
            if not number:  # blocks appended after Section() checked them
                raise ValueError(f"subsection {block.title!r} inside a subsection")
            out += ["", f"{number}{letters(subsection)}. {block.title}"] + block_lines(block.blocks, "")
            subsection += 1
        else:
            raise TypeError(f"not a report block: {type(block).__name__}")
        i += 1
    return out


def render_text(doc: Document) -> str:
    """The whole document; ends with a newline."""
    lines = [doc.title, "=" * len(doc.title)]
    for meta in doc.meta:
        lines += wrap(meta)
    for n, section in enumerate(doc.sections, 1):
        heading = f"{n}. {section.title}"
        lines += ["", heading, "-" * len(heading)] + block_lines(section.blocks, str(n))
    return "\n".join(lines) + "\n"
