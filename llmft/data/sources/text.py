"""Whole-file text sources: plain text, the visible text of HTML pages, and Project Gutenberg's header, footer and
credits stripped."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from llmft.config.sources import SourceSpec
from llmft.data.sources.base import Document, SourceReport
from llmft.data.sources.files import _decode_text, _read_bytes


def _read_text(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    text = None if data is None else _decode_text(data, str(path), on_error, report)
    if text is None:
        return
    if not text.strip():
        report.bad(str(path), "empty text", on_error)
        return
    yield Document(text=text, where=str(path))


# Not visible, or page furniture repeated on every page of a site: dropped with everything inside them.
_HTML_DROP = {"script", "style", "nav", "header", "footer", "aside", "form", "head", "noscript", "template",
              "svg", "iframe", "object", "button", "select"}


# Elements that start a new paragraph.
_HTML_BLOCKS = {"address", "article", "blockquote", "dd", "details", "div", "dl", "dt", "figcaption", "figure",
                "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "main", "ol", "p", "pre", "section", "summary",
                "table", "tr", "ul", "caption", "body"}


class _VisibleText(HTMLParser):
    """Collects visible text as paragraphs of lines; whitespace inside a line is collapsed later."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[list[list[str]]] = [[[]]]
        self._drop = 0  # depth inside dropped elements
        self._pre = 0

    def _paragraph(self) -> None:
        if any(any(s.strip() for s in line) for line in self.paragraphs[-1]):
            self.paragraphs.append([[]])

    def _line(self) -> None:
        self.paragraphs[-1].append([])

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _HTML_DROP:
            self._drop += 1
        elif self._drop:
            return
        elif tag in _HTML_BLOCKS:
            self._paragraph()
            if tag == "pre":
                self._pre += 1
        elif tag == "br":
            self._line()
        elif tag in ("td", "th"):
            self.paragraphs[-1][-1].append(" ")  # cells of a row stay on one line, apart

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_DROP:
            self._drop = max(0, self._drop - 1)
        elif not self._drop and tag in _HTML_BLOCKS:
            if tag == "pre" and self._pre:
                self._pre -= 1
            self._paragraph()

    def handle_data(self, data: str) -> None:
        if self._drop:
            return
        if self._pre:
            first, *rest = data.split("\n")
            self.paragraphs[-1][-1].append(first)
            for piece in rest:
                self._line()
                self.paragraphs[-1][-1].append(piece)
        else:
            self.paragraphs[-1][-1].append(data)

    def text(self) -> str:
        out = []
        for paragraph in self.paragraphs:
            lines = [" ".join("".join(line).split()) for line in paragraph]
            lines = [line for line in lines if line]
            if lines:
                out.append("\n".join(lines))
        return "\n\n".join(out)


def html_to_text(html: str) -> str:
    """The visible text of an HTML page: one blank line between paragraphs, whitespace collapsed.

    Scripts, styles, the head and page furniture (nav, header, footer, aside, forms) are dropped with their
    contents; ``<br>`` and newlines inside ``<pre>`` become line breaks.

    Args:
        html: the page source.

    Returns:
        The text, stripped ("" when nothing is visible).
    """
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    return parser.text()


def _decode_html(data: bytes) -> str:
    """Decode a page: UTF-8, else the charset its <meta> declares (old pages are often windows-1252).

    Raises:
        UnicodeDecodeError: neither works.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as first:
        declared = re.search(rb"""<meta[^>]*charset\s*=\s*["']?([\w.:-]+)""", data[:4096], re.I)
        if declared:
            try:
                return data.decode(declared.group(1).decode("ascii"))
            except (LookupError, UnicodeDecodeError):
                pass
        raise first


def _read_html(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    if data is None:
        return
    try:
        page = _decode_html(data)
    except UnicodeDecodeError as e:
        report.bad(str(path), f"not UTF-8 and no usable <meta charset> ({e.reason} at byte {e.start})", on_error)
        return
    text = html_to_text(page)
    if not text:
        report.bad(str(path), "no visible text", on_error)
        return
    yield Document(text=text, where=str(path))


_PG_START = re.compile(r"^[ \t]*\*+[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*\n?", re.I | re.M)


_PG_END = re.compile(r"^[ \t]*\*+[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*", re.I | re.M)


# Old e-texts end their header with the "small print" instead of a START line.
_PG_OLD_START = re.compile(r"^[^\n]*\*END\*THE SMALL PRINT[^\n]*\n?", re.I | re.M)


# The line Gutenberg puts just before the END marker, and the end of the text when there is no marker.
_PG_END_LINE = re.compile(r"^[ \t]*End of (?:the |this )?Project Gutenberg[^\n]*", re.I | re.M)


_PG_CREDITS = re.compile(r"\A\s*(?:Produced by|E-?text prepared by|This e-?text was produced by|Transcribed by)"
                         r".*?(?:\r?\n[ \t]*\r?\n|\Z)", re.I | re.S)


def strip_gutenberg(text: str) -> str:
    """Remove the BOM and the Project Gutenberg header and footer of an e-text.

    The body is the text between the ``*** START OF ... PROJECT GUTENBERG ...`` and ``*** END OF ...`` lines
    (spacing and THE/THIS variants tolerated, e.g. ``***START OF THE PROJECT GUTENBERG EBOOK``; old e-texts'
    ``*END*THE SMALL PRINT`` line also counts as a start). With markers, a leading "Produced by ..."
    credits paragraph and a closing "End of the Project Gutenberg EBook of ..." line are dropped too.

    Args:
        text: a whole e-text.

    Returns:
        The body, stripped. Text without any marker is returned stripped and otherwise unchanged.
    """
    text = text.lstrip("\ufeff")
    start = _PG_START.search(text) or _PG_OLD_START.search(text)
    end = _PG_END.search(text, start.end() if start else 0)
    if end is None and start is not None:
        end = _PG_END_LINE.search(text, start.end())
    if start is None and end is None:
        return text.strip()
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    trailer = list(_PG_END_LINE.finditer(body))
    if trailer and not body[trailer[-1].end():].strip():
        body = body[: trailer[-1].start()]
    return _PG_CREDITS.sub("", body, count=1).strip()
