"""Retrieval-augmented generation: find the passages of an index that answer a question, put them
in the prompt as numbered sources that fit the context window, and answer citing them.

    from plinth.retrieval.index import Index
    from plinth.retrieval.rag import ask
    from plinth.retrieval.embedder import Embedder
    model, index, embedder = plinth.load("smollm2-135m-instruct"), Index.load("idx/"), Embedder.load()
    reply = ask(model, index, embedder, "How do I read a file line by line?")
    print(reply.text); [print(s["id"], s["source"], s["line"]) for s in reply.sources]

The sources go into the last user message (instructions, then the passages, then the question
last), which is where small instruction-tuned models follow them best; earlier turns stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from plinth.retrieval.index import Hit, Index
from plinth.errors import PlinthError

INSTRUCTIONS = ("Answer the question using the sources below. Cite the sources you use by number, like [1]. "
                "If the sources do not answer it, say so.")


@dataclass
class Answer:
    text: str
    sources: list[dict]  # the passages given to the model, numbered as cited: see `source_entry`


def source_entry(number: int, hit: Hit) -> dict:
    """A citation as the CLI prints it and the API returns it."""
    return {"id": number, "citation": hit.chunk.cite(), **hit.to_dict()}


def last_user_turn(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise PlinthError("retrieval needs a user message to search for; the conversation has none")


def with_sources(messages: list[dict], hits: list[Hit], tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[dict]]:
    """The conversation with the best-ranked passages that fit in `max_prompt_tokens` (the rendered
    prompt, chat template included) added to its last user message, and the sources used.
    A passage too long for the room left is skipped in favour of shorter, lower-ranked ones."""
    turn = last_user_turn(messages)
    question = messages[turn].get("content") or ""

    def render(blocks: list[str]) -> list[dict]:
        content = (INSTRUCTIONS + "\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}") if blocks else question
        return messages[:turn] + [{**messages[turn], "content": content}] + messages[turn + 1:]

    def length(candidate: list[dict]) -> int:
        return len(tokenizer.encode(tokenizer.apply_chat_template(candidate), add_bos=False))

    if length(render([])) > max_prompt_tokens:
        raise PlinthError(f"the conversation alone is over {max_prompt_tokens} prompt tokens, leaving no room for "
                          "retrieved sources: shorten it or allow a longer context")
    blocks, used = [], []
    for hit in hits:
        block = f"[{len(blocks) + 1}] {hit.chunk.cite()}\n{hit.chunk.text.strip()}"
        if length(render(blocks + [block])) <= max_prompt_tokens:
            blocks.append(block)
            used.append(source_entry(len(blocks), hit))
    return render(blocks), used


def ask(model, index: Index, embedder, question: str, k: int = 4, where: dict | None = None, mode: str = "hybrid",
        max_prompt_tokens: int = 1536, stream: bool = False, **sampling) -> Answer:
    """Answer `question` from the `k` best passages of `index` (filtered by `where`, ranked by `mode`,
    see `Index.search`). With stream=True, `Answer.text` is an iterator of text pieces.
    `sampling`: `SamplingParams` fields."""
    hits = index.search(embedder, question, k=k, where=where, mode=mode)
    max_tokens = sampling.setdefault("max_tokens", 256)
    room = min(max_prompt_tokens, model.model.config.max_seq_len - max_tokens)
    messages, sources = with_sources([{"role": "user", "content": question}], hits, model.tokenizer, room)
    return Answer(model.chat(messages, stream=stream, **sampling), sources)
