"""A Document as one self-contained HTML file: inline CSS, figures embedded
as base64 PNG data, no scripts and no outside resources."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from ..io import atomic_write
from .document import Document, Figure, Lines, Paragraph, Section, Table, letters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BADGES = {"verdict-good": "✓", "verdict-bad": "✗", "note": "note"}

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --band: #f6f8fa; --accent: #0969da;
        --good: #1a7f37; --good-bg: #dafbe1; --bad: #cf222e; --bad-bg: #ffebe9; --note: #59636e; --note-bg: #eff2f5; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; }
body { margin: 0; color: var(--ink); background: #fff; font: 15px/1.55 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; }
main, header.doc > div { max-width: 1100px; margin: 0 auto; padding: 0 24px; }
header.doc { background: var(--band); border-bottom: 1px solid var(--line); padding: 20px 0 12px; }
header.doc h1 { margin: 0 0 6px; font-size: 26px; }
header.doc p { margin: 2px 0; color: var(--muted); font-size: 14px; }
nav.toc { position: sticky; top: 0; z-index: 1; background: rgba(255, 255, 255, .96);
          border-bottom: 1px solid var(--line); }
nav.toc ol { max-width: 1100px; margin: 0 auto; padding: 8px 24px; list-style: none; display: flex;
             flex-wrap: wrap; gap: 4px 18px; font-size: 13.5px; }
nav.toc a { color: var(--accent); text-decoration: none; white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
section { scroll-margin-top: 64px; }
h2 { margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); font-size: 21px; }
h3 { margin: 22px 0 8px; font-size: 17px; scroll-margin-top: 64px; }
.num { color: var(--muted); font-weight: 600; margin-right: .35em; }
p { margin: 6px 0; }
p.verdict, p.note { padding: 6px 10px; border-left: 4px solid; border-radius: 4px; }
p.good { border-color: var(--good); background: var(--good-bg); }
p.bad { border-color: var(--bad); background: var(--bad-bg); }
p.note { border-color: var(--note); background: var(--note-bg); }
.badge { display: inline-block; min-width: 1.6em; margin-right: .5em; padding: 0 .45em; border-radius: 1em;
         color: #fff; font-size: 12px; font-weight: 700; line-height: 1.7; text-align: center; }
p.good .badge { background: var(--good); } p.bad .badge { background: var(--bad); }
p.note .badge { background: var(--note); }
.table-wrap { overflow-x: auto; margin: 10px 0 14px; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 4px; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
/* long headers wrap so that a wide table fits a narrow window before it has to scroll */
th { background: var(--band); border-bottom: 2px solid var(--line); white-space: normal; vertical-align: bottom; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
.l { text-align: left; } .r { text-align: right; } .c { text-align: center; }
figure { margin: 14px 0 18px; }
/* tall figures (a 2x2 grid) would fill several screens at full width: cap the height */
figure img { display: block; width: auto; max-width: 100%; height: auto; max-height: 760px; border: 1px solid var(--line); border-radius: 4px; }
figcaption { margin-top: 4px; color: var(--muted); font-size: 13px; }
figcaption code, p code { font-size: 12.5px; }
.missing { padding: 10px 12px; border: 1px dashed var(--bad); border-radius: 4px; color: var(--bad);
           background: var(--bad-bg); }
.end { height: 40px; }
pre { margin: 8px 0; padding: 8px 10px; overflow-x: auto; background: var(--band); border-radius: 4px;
      font-size: 13px; line-height: 1.4; }
"""


def figure_html(fig: Figure, out_dir: Path) -> str:
    """An <img> with the PNG's bytes inline, or a visible note when the file
    is missing, outside `out_dir` or not a PNG."""
    name = escape(fig.filename)
    caption = f"<figcaption><code>{name}</code>{': ' + escape(fig.caption) if fig.caption else ''}</figcaption>"
    path = (out_dir / fig.filename).resolve()
    if not path.is_relative_to(out_dir.resolve()) or not path.is_file():
        return f'<figure><p class="missing">figure not found: {name}</p></figure>'
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return f'<figure><p class="missing">figure is not a PNG image: {name}</p></figure>'
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{src}" alt="{name}">{caption}</figure>'


def table_html(table: Table) -> str:
    align = table.alignment  # l / r / c: also the CSS classes
    head = "".join(f'<th class="{a}">{escape(c)}</th>' for a, c in zip(align, table.header))
    body = "".join("<tr>" + "".join(f'<td class="{a}">{escape(c)}</td>' for a, c in zip(align, row)) + "</tr>"
                   for row in table.cells())
    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    return (f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def paragraph_html(par: Paragraph) -> str:
    if par.kind == "text":
        return f"<p>{escape(par.text)}</p>"
    css = {"verdict-good": "verdict good", "verdict-bad": "verdict bad", "note": "note"}[par.kind]
    return f'<p class="{css}"><span class="badge">{BADGES[par.kind]}</span>{escape(par.text)}</p>'


def blocks_html(blocks: list, number: str, out_dir: Path) -> list[str]:
    out, subsection = [], 0
    for block in blocks:
        if isinstance(block, Paragraph):
            out.append(paragraph_html(block))
        elif isinstance(block, Table):
            out.append(table_html(block))
        elif isinstance(block, Figure):
            out.append(figure_html(block, out_dir))
        elif isinstance(block, Lines):
            out.append(f"<pre>{escape(chr(10).join(block.lines))}</pre>")
        elif isinstance(block, Section):
            if not number:  # blocks appended after Section() checked them
                raise ValueError(f"subsection {block.title!r} inside a subsection")
            sub = number + letters(subsection)
            subsection += 1
            out.append(f'<h3 id="s{sub}"><span class="num">{sub}.</span>{escape(block.title)}</h3>')
            out += blocks_html(block.blocks, "", out_dir)
        else:
            raise TypeError(f"not a report block: {type(block).__name__}")
    return out


def render_html(doc: Document, out_dir: str | Path) -> str:
    """The whole document as one HTML page; figures are read from `out_dir`."""
    out_dir = Path(out_dir)
    title = escape(doc.title)
    toc = "".join(f'<li><a href="#s{n}"><span class="num">{n}.</span>{escape(s.title)}</a></li>'
                  for n, s in enumerate(doc.sections, 1))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{title}</title><style>{CSS}</style></head><body>",
             f'<header class="doc"><div><h1>{title}</h1>' + "".join(f"<p>{escape(m)}</p>" for m in doc.meta)
             + "</div></header>",
             f'<nav class="toc" aria-label="Contents"><ol>{toc}</ol></nav><main>']
    for n, section in enumerate(doc.sections, 1):
        parts.append(f'<section id="s{n}" data-key="{escape(section.key)}">'
                     f'<h2><span class="num">{n}.</span>{escape(section.title)}</h2>')
        parts += blocks_html(section.blocks, str(n), out_dir)
        parts.append("</section>")
    parts.append("</main><div class=\"end\"></div></body></html>")
    return "\n".join(parts) + "\n"


def write_html(doc: Document, out_dir: str | Path, name: str = "report.html") -> Path:
    """Render `doc` and write it atomically to out_dir/name; returns the path."""
    path = Path(out_dir) / name
    page = render_html(doc, out_dir)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
