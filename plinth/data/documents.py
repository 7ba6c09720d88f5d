"""Documents for retrieval (and HTML pages for pretraining): read a folder of files into plain text,
remembering where each section starts, so that a retrieved passage can be cited by file, section and line.

    docs = load_folder("docs/")        # every readable file under docs/, sorted by path
    docs[0].source, docs[0].kind, docs[0].title, docs[0].text

One reader per file kind, chosen by suffix from `READERS`. Plain text, Markdown and Python source
are kept as they are (so offsets and line numbers are those of the file); HTML and PDF become the
text a reader sees, and their positions refer to that text.
"""
from __future__ import annotations

import ast
import bisect
import fnmatch
import importlib.util
import re
from dataclasses import dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path

from plinth.errors import PlinthError


@dataclass
class Document:
    source: str                  # path relative to the folder indexed (or as given)
    kind: str                    # "text", "markdown", "html", "python", "pdf"
    title: str
    text: str
    sections: list[tuple[int, str]] = field(default_factory=list)  # (character offset, heading), ascending

    def section_at(self, offset: int) -> str:
        """The heading in force at a character offset ('' before the first one)."""
        i = bisect.bisect_right(self._section_starts, offset) - 1
        return self.sections[i][1] if i >= 0 else ""

    def line_at(self, offset: int) -> int:
        """1-based line number of a character offset."""
        return bisect.bisect_right(self._newlines, offset - 1) + 1

    @cached_property
    def _section_starts(self) -> list[int]:
        return [start for start, _ in self.sections]

    @cached_property
    def _newlines(self) -> list[int]:
        return [m.start() for m in re.finditer("\n", self.text)]


def read_text(path: Path, source: str) -> Document:
    text = path.read_text(encoding="utf-8", errors="replace")
    return Document(source, "text", path.stem, text)


MARKDOWN_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def read_markdown(path: Path, source: str) -> Document:
    text = path.read_text(encoding="utf-8", errors="replace")
    sections = [(m.start(), m.group(2)) for m in MARKDOWN_HEADING.finditer(text)]
    title = sections[0][1] if sections else path.stem
    return Document(source, "markdown", title, text, sections)


def read_python(path: Path, source: str) -> Document:
    """Source as it is; each top-level function and class (and each method) is a section."""
    text = path.read_text(encoding="utf-8", errors="replace")
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    try:
        tree = ast.parse(text)
    except SyntaxError:  # still worth indexing as text
        return Document(source, "python", path.stem, text)
    sections = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            sections.append((line_starts[start - 1], node.name))
    title = (ast.get_docstring(tree) or path.stem).strip().splitlines()[0]
    return Document(source, "python", title, text, sorted(sections))


class _HTMLText(HTMLParser):
    """Visible text of a page, one block element per paragraph. Skips what is not content: scripts,
    styles, the head, and ARIA navigation/search landmarks (sidebars, breadcrumbs, search boxes)."""
    SKIP = {"script", "style", "head", "nav", "template", "noscript"}
    SKIP_ROLES = {"navigation", "search"}
    VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}
    BLOCK = {"p", "div", "section", "article", "li", "tr", "pre", "blockquote", "dt", "dd", "table", "ul", "ol",
             "dl", "br", "h1", "h2", "h3", "h4", "h5", "h6", "title", "figcaption"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped) for each open non-void element
        self.sections: list[tuple[int, str]] = []
        self.heading: list[str] | None = None
        self.heading_start = 0
        self.title = ""
        self.h1 = ""  # the page's own name; <title> often adds the site's ("Page — Site documentation")
        self.in_title = False
        self.in_pre = 0

    def skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def emit(self, text: str):
        self.parts.append(text)
        self.length += len(text)

    def newline(self):
        if self.parts and not self.parts[-1].endswith("\n"):
            self.emit("\n")

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in self.VOID:
            if tag == "br" and not self.skipping():
                self.newline()
            return
        skip = self.skipping() or tag in self.SKIP or dict(attrs).get("role") in self.SKIP_ROLES
        self.stack.append((tag, skip))
        if skip:
            return
        if tag in self.BLOCK:
            self.newline()
        if tag == "pre":
            self.in_pre += 1
        if tag in self.HEADINGS:
            self.heading, self.heading_start = [], self.length

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if not any(open_tag == tag for open_tag, _ in self.stack):
            return  # a stray end tag
        while self.stack:  # close elements left open inside this one, as browsers do
            open_tag, skipped = self.stack.pop()
            if not skipped:
                self.end_element(open_tag)
            if open_tag == tag:
                break

    def end_element(self, tag):
        if tag == "pre":
            self.in_pre -= 1
        if tag in self.HEADINGS and self.heading is not None:
            heading = " ".join("".join(self.heading).split())
            if heading:
                self.sections.append((self.heading_start, heading))
                if tag == "h1" and not self.h1:
                    self.h1 = heading
            self.heading = None
        if tag in self.BLOCK:
            self.newline()

    def handle_data(self, data):
        if self.in_title:
            self.title += data
            return
        if self.skipping():
            return
        data = data.replace("¶", "")  # Sphinx's permalink marks; dropped here so that offsets stay right
        if not self.in_pre:  # HTML collapses whitespace outside <pre>
            data = re.sub(r"\s+", " ", data)
            if self.parts and self.parts[-1].endswith(("\n", " ")):
                data = data.lstrip()
        if data:
            self.emit(data)
            if self.heading is not None:
                self.heading.append(data)


def read_html(path: Path, source: str) -> Document:
    parser = _HTMLText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    text = "".join(parser.parts)
    title = parser.h1 or " ".join(parser.title.split()) or path.stem
    return Document(source, "html", title, text, parser.sections)


def read_pdf(path: Path, source: str) -> Document:
    """Text of each page (needs `pypdf`); each page is a section, 'page N'."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError) as e:
        raise PlinthError(f"{path} is not a readable PDF ({e}); fix or remove it") from e
    text, sections = "", []
    for number, page in enumerate(pages, 1):
        sections.append((len(text), f"page {number}"))
        text += page.rstrip() + "\n\n"
    title = (reader.metadata.title if reader.metadata and reader.metadata.title else None) or path.stem
    return Document(source, "pdf", title, text, sections)


READERS = {".txt": read_text, ".text": read_text, ".rst": read_text, ".md": read_markdown,
           ".markdown": read_markdown, ".html": read_html, ".htm": read_html, ".py": read_python}
if importlib.util.find_spec("pypdf") is not None:  # PDF text only where a parser is installed
    READERS[".pdf"] = read_pdf


def load_file(path: Path, source: str | None = None) -> Document:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PlinthError(f"cannot read {path}: supported file types are {', '.join(sorted(READERS))}"
                          + ("" if ".pdf" in READERS else " (install pypdf for .pdf)"))
    return reader(path, source or path.name)


def load_folder(folder, exclude: list[str] | tuple = ()) -> list[Document]:
    """Every file of a supported kind under `folder` (or the one file given), in path order. Hidden
    files and folders are skipped, and so are paths (relative to `folder`) matching an `exclude`
    pattern such as `_sources/*` or `genindex*.html`."""
    root = Path(folder).expanduser()
    if root.is_file():
        return [load_file(root)]
    if not root.is_dir():
        raise PlinthError(f"{folder} is not a file or folder; give the folder of documents to index")
    sources = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()
               and p.suffix.lower() in READERS and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return [load_file(sources[s], s) for s in sorted(sources)
            if not any(fnmatch.fnmatchcase(s, pattern) for pattern in exclude)]
