"""Prefix caching: time to first token with and without it, on `plinth serve` with the default model.

    .venv/bin/python benchmarks/prefix_cache.py             # prints a table, writes benchmarks/results/prefix_cache.json

Two workloads, each run against a server started with its defaults and against one started with
`--no-prefix-cache`, in interleaved rounds (with, without, with, ...), the median round reported:
  chat      a conversation of about 1,500 tokens: a system prompt and five turns, each a user message
            quoting part of this repository's docs and the server's own streamed answer (greedy,
            48 tokens); measured: time to the first token of the sixth turn, whose request resends
            the whole history as every OpenAI client does.
  shared    16 clients at once, each with the same ~1,000-token system prompt and its own question;
            measured: the median and the slowest client's time to first token.
Both servers must answer the sixth turn with the same text (greedy): the cache changes time, not
output. Run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from plinth.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, running  # noqa: E402 - the serving benchmark's server helpers

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "serving.md").read_text() + (ROOT / "README.md").read_text()


def first_token(base: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """Time to the first streamed content, and the whole reply."""
    body = {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    start, ttft, text = time.perf_counter(), None, []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                ttft = ttft or time.perf_counter() - start
                text.append(delta)
    return ttft, "".join(text)


def chat(base: str) -> dict:
    messages = [{"role": "system", "content": "You answer questions about the plinth project. " + DOCS[:1200]}]
    for turn in range(6):
        passage = DOCS[1200 + turn * 700: 1200 + (turn + 1) * 700]
        messages.append({"role": "user", "content": f"Here is a passage:\n{passage}\nWhat is it about?"})
        ttft, reply = first_token(base, messages, 48)
        messages.append({"role": "assistant", "content": reply})
    return {"ttft_s": ttft, "reply": reply}


def shared(base: str, clients: int = 16) -> dict:
    system = {"role": "system", "content": "Use this reference to answer. " + DOCS[:4000]}

    def ask(i):
        return first_token(base, [system, {"role": "user", "content": f"Question {i}: what is item {i}?"}], 8)[0]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        ttfts = list(pool.map(ask, range(clients)))
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_max_s": max(ttfts)}


def server(model: str, port: int, cache: bool):
    return running([sys.executable, "-m", "plinth", "serve", model, "--port", str(port), "--embedding-model", "none",
                    *([] if cache else ["--no-prefix-cache"])], port, "/health")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefix_cache.json"))
    args = parser.parse_args()
    from plinth import hub
    model = str(hub.resolve(hub.DEFAULT_MODEL))
    runs = {True: [], False: []}
    for _ in range(args.rounds):
        for cache in (True, False):
            port = free_port()
            with server(model, port, cache) as (_, base):  # a fresh server: nothing cached from the last round
                first_token(base, [{"role": "user", "content": "Hi"}], 4)  # warm-up
                runs[cache].append({"chat": chat(base), "shared": shared(base)})
    summary = {}
    for cache, rounds in runs.items():
        summary["with" if cache else "without"] = {
            "chat_ttft_s": statistics.median(r["chat"]["ttft_s"] for r in rounds),
            "shared_ttft_p50_s": statistics.median(r["shared"]["ttft_p50_s"] for r in rounds),
            "shared_ttft_max_s": statistics.median(r["shared"]["ttft_max_s"] for r in rounds)}
    same = all(a["chat"]["reply"] == b["chat"]["reply"] for a, b in zip(runs[True], runs[False]))
    w, wo = summary["with"], summary["without"]
    print(f"\n{'time to first token':<42}{'without':>10}{'with':>10}{'lower by':>10}")
    for key, label in (("chat_ttft_s", "6th turn of a ~1,500-token chat"),
                       ("shared_ttft_p50_s", "16 clients, 1,000-token system prompt: p50"),
                       ("shared_ttft_max_s", "16 clients, 1,000-token system prompt: max")):
        print(f"{label:<42}{wo[key]:>9.3f}s{w[key]:>9.3f}s{wo[key] / w[key]:>9.1f}×")
    print(f"the 6th turn's reply is the same with and without: {same}")
    write_atomic(args.out, json.dumps({"summary": summary, "same_reply": same, "rounds": {
        "with": runs[True], "without": runs[False]}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
