"""Split documents into overlapping windows of tokens, each remembering where it came from.

    chunks = chunk_documents(docs, embedder.tokenizer, size=160, overlap=32)
    chunks[0].source, chunks[0].line, chunks[0].section, chunks[0].text

Windows are counted in the embedder's own tokens, so a chunk always fits the embedder's input and
none of it is silently truncated. A window ends at a line break when there is one in its last
quarter, so passages start and end on whole lines where the text allows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer as HFTokenizer

from plinth.data.documents import Document
from plinth.errors import PlinthError


@dataclass
class Chunk:
    source: str
    kind: str
    title: str
    section: str   # heading in force where the chunk starts
    line: int      # line of its first character (1-based), in the document's text
    start: int     # character offsets into the document's text: text == document.text[start:end]
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    def cite(self) -> str:
        """`path:line (section)`: enough for a reader to find the passage."""
        return f"{self.source}:{self.line}" + (f" ({self.section})" if self.section else "")


def plain_tokenizer(tokenizer: HFTokenizer) -> HFTokenizer:
    """A copy that neither truncates nor pads nor adds [CLS]/[SEP]: whole documents are counted."""
    plain = HFTokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def windows(offsets: list[tuple[int, int]], text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [first, last) of at most `size` tokens, each starting `overlap` tokens before
    the previous one ended; a window is cut back to its last line break in its final quarter."""
    spans, first, n = [], 0, len(offsets)
    while first < n:
        last = min(first + size, n)
        if last < n:
            for cut in range(last - 1, first + size * 3 // 4, -1):
                if "\n" in text[offsets[cut - 1][1]:offsets[cut][0]]:  # a line break before token `cut`
                    last = cut
                    break
        spans.append((first, last))
        if last == n:
            break
        first = max(last - overlap, first + 1)
    return spans


def chunk_document(doc: Document, tokenizer: HFTokenizer, size: int, overlap: int) -> list[Chunk]:
    offsets = [span for span in tokenizer.encode(doc.text, add_special_tokens=False).offsets if span[1] > span[0]]
    chunks = []
    for first, last in windows(offsets, doc.text, size, overlap):
        start, end = offsets[first][0], offsets[last - 1][1]
        chunks.append(Chunk(doc.source, doc.kind, doc.title, doc.section_at(start), doc.line_at(start),
                            start, end, doc.text[start:end]))
    return chunks


def chunk_documents(docs: list[Document], tokenizer: HFTokenizer, size: int = 160, overlap: int = 32) -> list[Chunk]:
    if size < 8 or not 0 <= overlap < size // 2:
        raise PlinthError(f"chunk size {size} / overlap {overlap}: use a size of at least 8 tokens and an overlap "
                          "below half the size (e.g. --chunk-tokens 160 --overlap 32)")
    plain = plain_tokenizer(tokenizer)
    return [chunk for doc in docs for chunk in chunk_document(doc, plain, size, overlap)]
