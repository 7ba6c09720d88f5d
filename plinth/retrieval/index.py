"""A vector index of document chunks, kept in a folder on disk, searched exactly with numpy.

    index = Index.build("docs/", embedder)           # read, chunk, embed
    index.save("idx/")                               # atomically: a half-written index is never seen
    index = Index.load("idx/")
    hits = index.search(embedder, "how do I open a file?", k=5, where={"source": "library/*"})  # hybrid

Folder layout: `index.json` (which embedder built it, chunking, counts), `vectors.npy` (N, dim)
float32 unit vectors, `chunks.jsonl` (one chunk's text and source position per line).

Search is hybrid by default: the embedding's scores fused with BM25's over stemmed words (see `search`).
Why exact search rather than faiss or hnswlib: one matrix-vector product over every chunk is
exact, filters apply before the top-k instead of after (an approximate index can return fewer than
k filtered hits), and nothing needs building. Up to about 100,000 chunks (a few thousand
documents) exact search costs less than embedding the query (`benchmarks/vector_search.py`
compares it with faiss and hnswlib; docs/benchmarks.md has the figures); an approximate index
is the step to take beyond that.
"""
from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from plinth.retrieval.chunking import Chunk, chunk_documents
from plinth.data.documents import load_folder
from plinth.errors import PlinthError
from plinth.files import atomic_folder

FORMAT = 1
MODES = ("hybrid", "dense", "lexical")
# Hybrid score = DENSE_WEIGHT * dense + (1 - DENSE_WEIGHT) * BM25, each min-max scaled to [0, 1] over the
# chunks: a convex combination, which Bruch, Gai & Ingber (2023, "An analysis of fusion functions for
# hybrid retrieval") found better than reciprocal rank fusion, as benchmarks/rag.py did here: recall@5
# 0.80 against 0.76, MRR 0.62 against 0.55, over the same stemmed BM25; weights 0.5 to 0.7 do as well.
DENSE_WEIGHT = 0.6
FILTERABLE = [f.name for f in fields(Chunk) if f.name != "text"]


@dataclass
class Hit:
    chunk: Chunk
    score: float  # cosine similarity to the query, in [-1, 1]

    def to_dict(self) -> dict:
        return {"score": round(self.score, 4), **self.chunk.to_dict()}


class Index:
    def __init__(self, vectors: np.ndarray, chunks: list[Chunk], info: dict):
        self.vectors, self.chunks, self.info = vectors, chunks, info

    @property
    def embedder_name(self) -> str:
        return self.info["embedder"]

    def __len__(self) -> int:
        return len(self.chunks)

    # ---- build ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, folder, embedder, chunk_tokens: int = 160, overlap: int = 32, exclude=(),
              embedder_source: str | None = None, progress=None) -> "Index":
        """Read every supported file under `folder` (less `exclude` patterns), chunk it and embed each
        chunk. `embedder_source` is the name or folder to load the embedder from again (default: its
        name). `progress`, if given, is called with (chunks embedded, chunks in all) as embedding goes on."""
        start = time.perf_counter()
        docs = load_folder(folder, exclude)
        chunks = chunk_documents(docs, embedder.tokenizer, chunk_tokens, overlap)
        parts = []
        for i in range(0, len(chunks), 64):
            parts.append(embedder.embed([embedding_text(c) for c in chunks[i:i + 64]]).numpy())
            if progress:
                progress(min(i + 64, len(chunks)), len(chunks))
        vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), dtype=np.float32)
        info = {"format": FORMAT, "embedder": embedder.name,
                "embedder_source": embedder_source or embedder.name, "dim": int(vectors.shape[1]) if parts else None,
                "chunk_tokens": chunk_tokens, "overlap": overlap, "documents": len(docs), "chunks": len(chunks),
                "build_seconds": round(time.perf_counter() - start, 2)}
        return cls(vectors, chunks, info)

    # ---- disk ----------------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """Write to a temporary folder beside `folder`, then swap it in with renames."""
        final = Path(folder).expanduser().resolve()
        if final.exists() and not (final / "index.json").is_file():
            raise PlinthError(f"{final} exists and is not a plinth index; choose another --out")
        with atomic_folder(final) as tmp:
            np.save(tmp / "vectors.npy", self.vectors)
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                for chunk in self.chunks:
                    f.write(json.dumps(chunk.to_dict(), ensure_ascii=False) + "\n")
            (tmp / "index.json").write_text(json.dumps(self.info, indent=2))  # last: marks the folder complete
        return final

    @classmethod
    def load(cls, folder) -> "Index":
        path = Path(folder).expanduser()
        if not (path / "index.json").is_file():
            raise PlinthError(f"{folder} is not a plinth index (no index.json); build one with "
                              f"`plinth index build DOCS --out {folder}`")
        info = json.loads((path / "index.json").read_text())
        if info.get("format") != FORMAT:
            raise PlinthError(f"{folder} has index format {info.get('format')}; this plinth reads format {FORMAT}: "
                              "rebuild it with `plinth index build`")
        with open(path / "chunks.jsonl", encoding="utf-8") as f:
            chunks = [Chunk(**json.loads(line)) for line in f]
        vectors = np.load(path / "vectors.npy", allow_pickle=False)
        if len(vectors) != len(chunks):
            raise PlinthError(f"{folder} is damaged: {len(vectors)} vectors for {len(chunks)} chunks; rebuild it")
        return cls(vectors, chunks, info)

    # ---- search --------------------------------------------------------------------------------
    def load_embedder(self, name_or_folder: str | None = None):
        """The embedder this index was built with (or the one named, which must be the same)."""
        from plinth.retrieval.embedder import Embedder
        embedder = Embedder.load(name_or_folder or self.info.get("embedder_source") or self.embedder_name)
        self.check_embedder(embedder)
        return embedder

    def check_embedder(self, embedder):
        if embedder.name != self.embedder_name:
            raise PlinthError(f"this index was built with the embedder '{self.embedder_name}', not "
                              f"'{embedder.name}': query it with '{self.embedder_name}' or rebuild it")

    def search(self, embedder, query: str, k: int = 5, where: dict | None = None, mode: str = "hybrid",
               distinct: bool = True) -> list[Hit]:
        """The k best chunks for `query` among those matching `where`, best first. `mode`: "dense" ranks
        by the cosine similarity of embeddings, "lexical" by BM25 over stemmed words, "hybrid" by a
        weighted sum of the two scores, so that an exact name (`KeyError`, `lru_cache`) found by its
        words and a paraphrase found by its meaning both rise. With `distinct`, a chunk that overlaps
        a better hit of the same document is left out: its text would repeat in the prompt, and the
        place is worth more to another passage. A hit's score is its cosine similarity."""
        self.check_embedder(embedder)
        if not self.chunks:
            raise PlinthError("this index holds no chunks (its folder had no readable documents): rebuild it "
                              "from a folder with .txt, .md, .html, .py or .pdf files")
        if k < 1:
            raise PlinthError(f"k must be at least 1, got {k}")
        if mode not in MODES:
            raise PlinthError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        similarity = self.vectors @ embedder.embed(query).numpy()[0]  # (N,): cosine, all vectors are unit length
        if mode == "dense":
            ranking = similarity
        elif mode == "lexical":
            ranking = self.lexical_scores(query)
        else:
            ranking = fuse(similarity, self.lexical_scores(query))
        if where:
            ranking = np.where(self.matching(where), ranking, -np.inf)
        candidates = np.flatnonzero(np.isfinite(ranking))
        ranked = candidates[np.argsort(-ranking[candidates], kind="stable")]
        best = self.without_overlaps(ranked, k) if distinct else ranked[:k]
        return [Hit(self.chunks[i], float(similarity[i])) for i in best]

    def without_overlaps(self, ranked: np.ndarray, k: int) -> list[int]:
        """The first k chunks of `ranked` whose character spans overlap no earlier one's in the same document."""
        kept: list[int] = []
        spans: dict[str, list[tuple[int, int]]] = {}  # source -> character spans kept so far
        for i in ranked:
            chunk = self.chunks[i]
            taken = spans.setdefault(chunk.source, [])
            if not any(start < chunk.end and chunk.start < end for start, end in taken):
                kept.append(i)
                taken.append((chunk.start, chunk.end))
                if len(kept) == k:
                    break
        return kept

    @cached_property
    def lexical(self):
        """BM25 over the chunks' words (`bm25s`), built from the chunks on first use (a few seconds
        for ten thousand chunks), so the folder on disk holds only what embedding produced."""
        import bm25s
        retriever = bm25s.BM25()
        retriever.index(word_stems([embedding_text(c) for c in self.chunks]), show_progress=False)
        return retriever

    def lexical_scores(self, query: str) -> np.ndarray:
        words = word_stems([query], return_ids=False)[0]
        return self.lexical.get_scores(words) if words else np.zeros(len(self.chunks), dtype=np.float32)

    def matching(self, where: dict) -> np.ndarray:
        """Boolean mask of chunks whose fields match every condition: a string is a shell-style
        pattern (`library/*.html`), a list means any of its values, anything else must be equal."""
        unknown = sorted(set(where) - set(FILTERABLE))
        if unknown:
            raise PlinthError(f"cannot filter on {', '.join(unknown)}: filterable fields are {', '.join(FILTERABLE)}")
        mask = np.ones(len(self.chunks), dtype=bool)
        for key, wanted in where.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            mask &= np.array([any(matches(getattr(c, key), o) for o in options) for c in self.chunks], dtype=bool)
        return mask


def word_stems(texts: list[str], return_ids: bool = True):
    """Lower-cased words less English stop words, reduced to their Snowball stems (PyStemmer), so
    that "lines" finds "line" and "sorting" finds "sorted"."""
    import bm25s
    import Stemmer
    return bm25s.tokenize(texts, stemmer=Stemmer.Stemmer("english"), return_ids=return_ids, show_progress=False)


def fuse(similarity: np.ndarray, lexical: np.ndarray) -> np.ndarray:
    """DENSE_WEIGHT of the cosine similarities plus the rest of the BM25 scores, each scaled to [0, 1]
    by its lowest and highest value, so that neither score's units decide."""
    return DENSE_WEIGHT * scaled(similarity) + (1 - DENSE_WEIGHT) * scaled(lexical)


def scaled(scores: np.ndarray) -> np.ndarray:
    low, high = float(scores.min()), float(scores.max())
    return (scores - low) / (high - low) if high > low else np.zeros(len(scores))


def matches(value, wanted) -> bool:
    if isinstance(wanted, str):
        return fnmatch.fnmatchcase(str(value), wanted)
    return value == wanted


def embedding_text(chunk: Chunk) -> str:
    """What is embedded for a chunk: its text under its document title and section, so that a
    passage deep in a page still carries what the page is about."""
    heading = " — ".join(part for part in (chunk.title, chunk.section) if part and part not in chunk.text[:200])
    return f"{heading}\n{chunk.text}" if heading else chunk.text
