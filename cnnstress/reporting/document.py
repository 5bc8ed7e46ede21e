"""The blocks of a report. The sections decide every number: table cells and
paragraphs arrive as formatted strings, the renderers only lay them out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

KINDS = ("text", "verdict-good", "verdict-bad", "note")
ALIGNS = "lrc"


@dataclass(frozen=True)
class Paragraph:
    """Running text; `kind` styles it ("verdict-good" / "verdict-bad": a
    check's outcome, "note": an aside)."""
    text: str
    kind: str = "text"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Paragraph kind {self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Table:
    """Rows of formatted cells. `align`: one of l/r/c per column (default: the
    first column left, the others right). A row may be shorter than the
    header (its missing cells are empty), never longer."""
    header: list[str]
    rows: list[list[str]]
    align: str | None = None
    caption: str = ""

    def __post_init__(self) -> None:
        if self.align is not None and (len(self.align) != len(self.header) or set(self.align) - set(ALIGNS)):
            raise ValueError(f"Table align {self.align!r} needs one of l/r/c per column ({len(self.header)} columns)")
        for row in self.rows:
            if len(row) > len(self.header):
                raise ValueError(f"Table row {row!r} has more cells than the header ({len(self.header)})")

    @property
    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.header) - 1)

    def cells(self) -> list[list[str]]:
        """The rows, each padded with empty cells to the header's width."""
        return [list(row) + [""] * (len(self.header) - len(row)) for row in self.rows]


@dataclass(frozen=True)
class Figure:
    """A PNG in the output folder: `filename` relative to it."""
    filename: str
    caption: str = ""


@dataclass(frozen=True)
class Lines:
    """Preformatted text, kept line by line as is."""
    lines: list[str]


Block = Union[Paragraph, Table, Figure, Lines, "Section"]


@dataclass(frozen=True)
class Section:
    """One stage's part of the report (`key`: the stage name). A Section among
    the blocks is a subsection (numbered 7a, 7b, ... by position)."""
    title: str
    blocks: list[Block] = field(default_factory=list)
    key: str = ""

    def __post_init__(self) -> None:
        for block in self.blocks:
            if isinstance(block, Section) and any(isinstance(b, Section) for b in block.blocks):
                raise ValueError(f"section {self.title!r}: subsections cannot have subsections")


@dataclass(frozen=True)
class Document:
    title: str
    meta: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


def letters(index: int) -> str:
    """0 -> "a", 25 -> "z", 26 -> "aa": a subsection's letters."""
    out = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        out = chr(ord("a") + r) + out
    return out
