"""The report as a document model (document.py) rendered as plain text
(text.py) and as one self-contained HTML file (html.py)."""
from .document import Document, Figure, Lines, Paragraph, Section, Table
from .html import render_html, write_html
from .numbers import pct, per_model
from .text import render_text

__all__ = ["Document", "Figure", "Lines", "Paragraph", "Section", "Table", "pct", "per_model", "render_html",
           "render_text", "write_html"]
