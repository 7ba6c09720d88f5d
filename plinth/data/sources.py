"""Where pretraining text comes from: built-in sources (found on every machine) or user paths.

    for doc in read_source("python-stdlib", limit=100): print(doc.source, doc.id, len(doc.text))

A source is a name in SOURCES, or a path: a .txt/.md/.py file, a .jsonl file (one {"text": ...}
per line), a .parquet file (a `text` column), an .html page, or a folder of such files. Built-in sources: Python's
own source and docs (on every machine), and where their Debian packages are installed the HTML
documentation (python3.11-doc), the GCIDE dictionary (dict-gcide), WordNet glosses (wordnet-base)
and quotations (fortunes), and with PyPI's chitchat-dataset human conversations.
"""
from __future__ import annotations

import gzip
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plinth.data.documents import read_html  # the reader retrieval indexes pages with
from plinth.errors import PlinthError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}


@dataclass
class CorpusText:
    source: str
    id: str
    text: str


def python_stdlib() -> Iterator[CorpusText]:
    """The standard library's Python source (tests left out: they are repetitive)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or rel.startswith(("idlelib", "lib2to3/tests")):
            continue
        yield CorpusText("python-stdlib", rel, path.read_text(encoding="utf-8", errors="replace"))


def python_docs() -> Iterator[CorpusText]:
    """Language-reference prose shipped with Python (pydoc's topic texts)."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield CorpusText("python-docs", name, topics[name])


def debian_file(path: str, package: str) -> Path:
    found = Path(path)
    if not found.exists():
        raise PlinthError(f"{found} is missing; install it with `apt-get install {package}` or drop the source")
    return found


GCIDE_INDEX_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def gcide() -> Iterator[CorpusText]:
    """The GCIDE dictionary (Webster 1913 + additions), one document per entry, from the dictd
    files: the index gives each headword's offset and length (base-64 numbers) in the data."""
    data = gzip.open(debian_file("/usr/share/dictd/gcide.dict.dz", "dict-gcide")).read()
    index = debian_file("/usr/share/dictd/gcide.index", "dict-gcide").read_text(encoding="utf-8")
    seen = set()

    def number(digits: str) -> int:
        value = 0
        for c in digits:
            value = value * 64 + GCIDE_INDEX_DIGITS.index(c)
        return value

    for line in index.splitlines():
        word, offset, length = line.split("\t")[:3]
        # headwords not starting with a letter are the file's own metadata; variants share an entry
        if not word[:1].isalpha() or (offset, length) in seen:
            continue
        seen.add((offset, length))
        start = number(offset)
        text = data[start:start + number(length)].decode("utf-8", errors="replace")
        text = re.sub(r"[ \t]*\[[^\]\n]*(Webster|WordNet|PJC|Century)[^\]\n]*\]", "", text)  # source tags
        yield CorpusText("gcide", f"{word}@{offset}", re.sub(r"\n{3,}", "\n\n", text.replace("{", "").replace("}", "")).strip())


def fortunes() -> Iterator[CorpusText]:
    """Quotations from the `fortunes` package: each category file holds quotes split by '%' lines."""
    folder = debian_file("/usr/share/games/fortunes", "fortunes")
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file():  # .dat indexes and .u8 copies
            continue
        for n, quote in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n%\n")):
            yield CorpusText("fortunes", f"{path.name}:{n}", quote.strip())


PYTHON_HTML_DOCS = "/usr/share/doc/python3.11/html"


def python_html_docs() -> Iterator[CorpusText]:
    """Python's HTML documentation (tutorial, library reference, HOWTOs, FAQ) as the text a reader sees."""
    root = debian_file(PYTHON_HTML_DOCS, "python3.11-doc")
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(("_", "genindex", "py-modindex", "search")):  # assets and generated indexes
            yield CorpusText("python-html-docs", rel, read_html(path, rel).text)


def wordnet() -> Iterator[CorpusText]:
    """WordNet glosses as dictionary prose: `words: definition; "example"`."""
    from plinth.data.wordnet import synsets
    for synset in synsets():
        yield CorpusText("wordnet", synset.id, f"{', '.join(synset.words)}: {synset.gloss}")


def chitchat() -> Iterator[CorpusText]:
    """Human–human chats (PyPI chitchat-dataset) as dialogue text, one speaker per line."""
    from plinth.data.chitchat import chitchat_conversations
    for n, conversation in enumerate(chitchat_conversations()):
        lines = [f"{'AB'[i % 2]}: {m['content']}" for i, m in enumerate(conversation)]
        yield CorpusText("chitchat", str(n), "\n".join(lines))


SOURCES = {"python-stdlib": python_stdlib, "python-docs": python_docs, "python-html-docs": python_html_docs,
           "gcide": gcide, "wordnet": wordnet, "fortunes": fortunes, "chitchat": chitchat}


def from_path(path: Path) -> Iterator[CorpusText]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PlinthError(f"{f}:{n}: each line must be a JSON object with a 'text' field ({e})") from e
                yield CorpusText(str(path), f"{f.name}:{n}", text)
        elif f.suffix == ".parquet":
            yield from from_parquet(f, str(path))
        elif f.suffix in (".html", ".htm"):
            yield CorpusText(str(path), f.name, read_html(f, f.name).text)
        elif f.suffix in TEXT_SUFFIXES:
            yield CorpusText(str(path), f.name, f.read_text(encoding="utf-8", errors="replace"))


def from_parquet(f: Path, source: str) -> Iterator[CorpusText]:
    """A Parquet file's `text` column, read a row group at a time (files can be far larger than memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PlinthError(f"{f}: reading Parquet needs pyarrow; pip install 'plinth[parquet]' (or pyarrow)") from e
    table = pq.ParquetFile(f)
    if "text" not in table.schema_arrow.names:
        raise PlinthError(f"{f}: needs a 'text' column; it has {', '.join(table.schema_arrow.names)}")
    row = 0
    for group in range(table.num_row_groups):
        for text in table.read_row_group(group, columns=["text"]).column("text").to_pylist():
            if text:
                yield CorpusText(source, f"{f.name}:{row}", text)
            row += 1


def read_source(name: str, limit: int = 0) -> Iterator[CorpusText]:
    if name in SOURCES:
        docs = SOURCES[name]()
    elif Path(name).exists():
        docs = from_path(Path(name))
    else:
        raise PlinthError(f"unknown data source {name!r}: not one of {', '.join(SOURCES)} and no such path")
    for i, doc in enumerate(docs):
        if limit and i >= limit:
            return
        yield doc
