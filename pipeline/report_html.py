"""The report as one self-contained HTML page (``report.html``): the Markdown the report writes,
its figures embedded as base64 data URIs, no script and nothing fetched, so that MLflow's
artifact view (and a browser offline) shows the figures. Reads only the Markdown the report
itself writes: headings, paragraphs, pipe tables, images, links, bold and code spans."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = ["markdown_to_html"]

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1250px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; height: auto; display: block; margin: 0.4em 0 1em; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 0.2em; }
.missing { color: #a00; }
"""


def _image(alt: str, src: str, folder: Path) -> str:
    """``<img>`` with the file's bytes as a data URI; a file that is not there is said so."""
    path = folder / src
    mime = _MIME.get(path.suffix.lower())
    if mime is None or "/" in src or not path.is_file():
        return f'<span class="missing">[figure {html.escape(src)} missing]</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt, src = html.escape(alt, quote=True), html.escape(src, quote=True)
    return f'<img alt="{alt}" title="{src}" src="data:{mime};base64,{data}">'


def _inline(text: str, folder: Path) -> str:
    """One line's Markdown: images (embedded), links (their text and target), **bold**, `code`."""
    out, pos = [], 0
    for m in _IMAGE.finditer(text):
        out += [_spans(text[pos : m.start()]), _image(m.group(1), m.group(2), folder)]
        pos = m.end()
    return "".join(out + [_spans(text[pos:])])


def _spans(text: str) -> str:
    parts = text.split("`")
    for i, part in enumerate(parts):
        if i % 2:  # inside a code span
            parts[i] = f"<code>{html.escape(part)}</code>"
        else:
            part = html.escape(part, quote=False)
            part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
            # a link's target is shown, not followed: the page lives in an iframe, the target beside report.md
            parts[i] = _LINK.sub(lambda m: f"{m.group(1)} (<code>{m.group(2)}</code>)", part)
    return "".join(parts)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str], folder: Path) -> str:
    head, body = _cells(lines[0]), [_cells(x) for x in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{_inline(c, folder)}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{_inline(c, folder)}</td>" for c in r) + "</tr>" for r in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def markdown_to_html(markdown: str, folder: Path, title: str) -> str:
    """The page of ``markdown`` (the report's), its images read from ``folder``."""
    blocks, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    parts = []
    for block in blocks:
        first = block[0]
        heading = re.match(r"(#{1,6}) (.*)", first)
        if heading and len(block) == 1:
            level = len(heading.group(1))
            parts.append(f"<h{level}>{_inline(heading.group(2), folder)}</h{level}>")
        elif first.startswith("|") and len(block) > 1 and set(block[1].replace("|", "").strip()) <= set("-: "):
            parts.append(_table(block, folder))
        else:
            parts.append("<p>" + "<br>\n".join(_inline(x, folder) for x in block) + "</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
