"""Retrieval in `/v1/chat/completions`: a request may name an index the server was started with
(`plinth serve --index docs=idx/`); the passages that best match its last user message are added to
that message as numbered sources, and the response carries them in an extra `sources` field.

    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "How do I open a file?"}],
                                   extra_body={"retrieval": {"index": "docs", "k": 4, "where": {"source": "*.md"}}})
    # optional: "mode": "hybrid" (default) | "dense" | "lexical", as `plinth index query --mode`
    # response.sources == [{"id": 1, "citation": "guide.md:12 (Files)", "score": 0.61, "text": ..., ...}, ...]

Streamed responses carry `sources` in their first chunk. The search (an embedding) runs on the
engine thread, like every other model computation. The request's options are
`plinth.serve.schemas.RetrievalOptions`.
"""
from __future__ import annotations

import asyncio

from plinth.errors import PlinthError
from plinth.retrieval.embedder import Embedder
from plinth.retrieval.index import Index
from plinth.retrieval.rag import last_user_turn, with_sources
from plinth.serve.schemas import RetrievalOptions
from plinth.serve.state import ServerState


def load_indexes(indexes: dict[str, str], embedder: Embedder | None) -> dict[str, Index]:
    """{"docs": "idx/", ...} → {"docs": Index}; each must have been built by the server's embedder."""
    loaded = {}
    for name, folder in indexes.items():
        if not name or not folder:
            raise PlinthError(f"--index takes NAME=FOLDER (e.g. --index docs=idx/), got {name}={folder}")
        if embedder is None:
            raise PlinthError("--index needs an embedding model to search with; do not pass --embedding-model none")
        index = Index.load(folder)
        if index.embedder_name != embedder.name:
            raise PlinthError(f"index {name!r} ({folder}) was built with the embedder '{index.embedder_name}', "
                              f"but the server embeds with '{embedder.name}': start it with "
                              f"--embedding-model {index.info.get('embedder_source', index.embedder_name)}")
        index.lexical  # build the BM25 side now rather than during the first request
        loaded[name] = index
    return loaded


async def add_sources(state: ServerState, options: RetrievalOptions, messages: list[dict],
                      completion_tokens: int) -> tuple[list[dict], list[dict]]:
    """The messages with retrieved passages added, and the sources used. The passages fill the
    context window less `completion_tokens` kept for the answer."""
    index = state.indexes.get(options.index)
    if index is None:
        served = ", ".join(sorted(state.indexes)) or "none (start the server with --index NAME=FOLDER)"
        raise PlinthError(f"unknown index {options.index!r} in retrieval.index; this server has: {served}")
    query = messages[last_user_turn(messages)]["content"]
    hits = await asyncio.wrap_future(state.engine.call(index.search, state.embedder, query, options.k, options.where,
                                                       options.mode))
    return with_sources(messages, hits, state.tokenizer, state.engine.max_len - completion_tokens)
