"""Retrieval in `/v1/chat/completions`: a request may name an index the server was started with
(`plinth serve --index docs=idx/`); the passages that best match its last user message are added to
that message as numbered sources, and the response carries them in an extra `sources` field.

    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "How do I open a file?"}],
                                   extra_body={"retrieval": {"index": "docs", "k": 4, "where": {"source": "*.md"}}})
    # optional: "mode": "hybrid" (default) | "dense" | "lexical", as `plinth index query --mode`
    # response.sources == [{"id": 1, "citation": "guide.md:12 (Files)", "score": 0.61, "text": ..., ...}, ...]

Streamed responses carry `sources` in their first chunk. The search (an embedding) runs on the
engine thread, like every other model computation.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from plinth.retrieval.index import Index
from plinth.retrieval.rag import last_user_turn, with_sources
from plinth.errors import PlinthError


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str                                    # a NAME from `plinth serve --index NAME=FOLDER`
    k: int = Field(4, ge=1, le=50)                # passages to retrieve (those that fit the context are used)
    where: dict[str, Any] | None = None           # chunk field → shell pattern or value, as `plinth index query --where`
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"  # ranking, as `Index.search`


def load_indexes(specs: list[str], embedder) -> dict[str, Index]:
    """`["docs=idx/", ...]` → {"docs": Index}; each must have been built by the server's embedder."""
    indexes = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise PlinthError(f"--index takes NAME=FOLDER (e.g. --index docs=idx/), got {spec!r}")
        if embedder is None:
            raise PlinthError("--index needs an embedding model to search with; do not pass --embedding-model none")
        index = Index.load(folder)
        if index.embedder_name != embedder.name:
            raise PlinthError(f"index {name!r} ({folder}) was built with the embedder '{index.embedder_name}', "
                              f"but the server embeds with '{embedder.name}': start it with "
                              f"--embedding-model {index.info.get('embedder_source', index.embedder_name)}")
        index.lexical  # build the BM25 side now rather than during the first request
        indexes[name] = index
    return indexes


async def add_sources(state, options: RetrievalOptions, messages: list[dict],
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


def with_sources_field(response, sources: list[dict]):
    """A chat response with `sources` added: to the body, or to the first event of a stream."""
    if isinstance(response, dict):
        return {**response, "sources": sources}
    response.body_iterator = _first_event_with(response.body_iterator, sources)
    return response


async def _first_event_with(events, sources: list[dict]):
    first = True
    async for event in events:
        if first and event.startswith("data: {"):  # the role chunk, sent before any token
            event = f"data: {json.dumps({**json.loads(event[6:]), 'sources': sources})}\n\n"
            first = False
        yield event
