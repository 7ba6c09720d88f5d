"""Retrieval-augmented generation over the Python documentation: retrieval quality, answers with
and without retrieval, index build time and query latency.

    .venv/bin/python benchmarks/rag.py                      # build (or reuse) the index, then everything
    .venv/bin/python benchmarks/rag.py --answers none       # retrieval figures only (seconds)
    .venv/bin/python benchmarks/rag.py --answers without    # replies without retrieval only (no index)
    .venv/bin/python benchmarks/rag.py --rebuild --index runs/pydocs-idx

Corpus: the Python 3.11 HTML documentation from Debian's `python3.11-doc`
(/usr/share/doc/python3.11/html); without it the benchmark says so and exits. It indexes the user
documentation (tutorial, library, reference, HOWTOs, FAQ, using, extending, glossary) and leaves
out generated pages (the general index, the table of contents, `_sources/` copies), the C API,
what's-new and distutils (`EXCLUDE` below).

Questions: benchmarks/data/rag_questions.jsonl, 50 questions written from the docs; each names the
page (`source`) and an exact sentence of it (`passage`) that answers it, and `answers`: keywords, any
of which in a reply counts as a correct answer.

How each figure is measured:
  recall@5, MRR  a retrieved chunk is relevant when it comes from the question's page and its
                 character span overlaps the passage; recall@5 is the share of questions with a
                 relevant chunk among the first 5, MRR the mean of 1/rank of the first relevant one
                 (0 when none is in the first 10). For each search mode: dense (embeddings), lexical
                 (BM25) and hybrid (both fused, plinth's default, used for the answers). Also
                 "page recall@5", a looser figure: a chunk of the question's page among the first
                 5 (other passages of the page, or of other pages, may answer a question too).
  answers        SmolLM2-135M-Instruct, greedy, at most --max-tokens tokens: once with the question
                 alone, once with the --k best passages (hybrid search) in the prompt, as
                 `plinth.retrieval.rag.ask` does; replies are cached in --replies for later runs. A
                 reply is correct when one of the question's keywords appears in it as a whole word,
                 case-insensitive, after citation marks like [1] are removed.
  build s        wall time of `Index.build` (read, chunk, embed every chunk), from index.json when reused.
  query ms       hybrid search per question (embedding it, the exact vector search, BM25, fusion):
                 median and 95th percentile.
The figures depend on the machine's load: each run records the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plinth.data.documents import load_file  # noqa: E402
from plinth.files import write_atomic  # noqa: E402
from plinth.retrieval.index import Index  # noqa: E402
from plinth.retrieval.rag import with_sources  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html")
EXCLUDE = ["_*/*", "c-api/*", "whatsnew/*", "distutils/*", "install/*", "genindex*", "contents.html",
           "py-modindex.html", "search.html", "bugs.html", "copyright.html", "license.html", "about.html",
           "download.html"]


def load_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def passage_span(docs: Path, question: dict) -> tuple[int, int]:
    text = load_file(docs / question["source"], question["source"]).text
    start = text.find(question["passage"])
    if start < 0:
        raise SystemExit(f"passage of {question['question']!r} not found in {question['source']}: fix the question file")
    return start, start + len(question["passage"])


def first_relevant_rank(hits, question: dict, span: tuple[int, int]) -> int | None:
    for rank, hit in enumerate(hits, 1):
        c = hit.chunk
        if c.source == question["source"] and c.start < span[1] and span[0] < c.end:
            return rank
    return None


def is_correct(reply: str, answers: list[str]) -> bool:
    reply = re.sub(r"\[\d+\]", " ", reply)
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in answers)


def retrieval(index: Index, embedder, questions: list[dict], docs: Path) -> dict:
    """recall@5, recall@1 and MRR for each search mode; query latency of the default (hybrid)."""
    spans = [passage_span(docs, q) for q in questions]
    index.search(embedder, "warm-up", k=1)  # builds the BM25 side once, outside the timings
    results, latencies = {}, []
    for mode in ("dense", "lexical", "hybrid"):
        ranks, pages = [], 0
        for q, span in zip(questions, spans):
            start = time.perf_counter()
            hits = index.search(embedder, q["question"], k=10, mode=mode)
            latencies.append(time.perf_counter() - start)
            q[f"rank_{mode}"] = first_relevant_rank(hits, q, span)
            ranks.append(q[f"rank_{mode}"])
            pages += any(h.chunk.source == q["source"] for h in hits[:5])
        results.update({f"recall@5 {mode}": sum(r is not None and r <= 5 for r in ranks) / len(ranks),
                        f"page recall@5 {mode}": pages / len(ranks),
                        f"recall@1 {mode}": sum(r == 1 for r in ranks) / len(ranks),
                        f"mrr {mode}": sum(1 / r for r in ranks if r) / len(ranks)})
    hybrid = latencies[-len(questions):]
    results.update(query_ms_median=1000 * statistics.median(hybrid), query_ms_p95=1000 * float(np.percentile(hybrid, 95)))
    return results


class Replies:
    """Replies kept in a JSONL file under the model, messages and options that decide them, so that
    a later run reuses what an earlier one generated (the answers without retrieval can be made
    while the index is still being built)."""

    def __init__(self, path: Path | None):
        self.path, self.known = path, {}
        if path and path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.known[entry["key"]] = entry["reply"]

    def get(self, model, name: str, messages: list[dict], options: dict) -> str:
        key = json.dumps([name, messages, options], sort_keys=True)
        if key not in self.known:
            self.known[key] = model.chat(messages, **options)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "reply": self.known[key]}) + "\n")
        return self.known[key]


def answers(model, index: Index | None, embedder, questions: list[dict], args) -> dict:
    """Greedy replies without and (given an index) with retrieved passages, and the share correct."""
    options, replies = dict(max_tokens=args.max_tokens, temperature=0), Replies(args.replies)
    modes = ["without"] + (["with"] if index is not None else [])
    correct = dict.fromkeys(modes, 0)
    for i, q in enumerate(questions, 1):
        question = [{"role": "user", "content": q["question"]}]
        q["reply_without"] = replies.get(model, args.model, question, options)
        if index is not None:  # what `plinth.retrieval.rag.ask` does, with the prompt in view for the cache
            hits = index.search(embedder, q["question"], k=args.k)
            room = min(args.context_tokens, model.model.config.max_seq_len - args.max_tokens)
            messages, q["sources"] = with_sources(question, hits, model.tokenizer, room)
            q["reply_with"] = replies.get(model, args.model, messages, options)
        for mode in modes:
            q[f"correct_{mode}"] = is_correct(q[f"reply_{mode}"], q["answers"])
            correct[mode] += q[f"correct_{mode}"]
        print(f"  {i}/{len(questions)} correct: {correct}", end="\r", flush=True)
    print()
    return {f"accuracy_{mode}_retrieval": n / len(questions) for mode, n in correct.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--index", type=Path, default=ROOT / "runs" / "pydocs-idx", help="reused when present")
    parser.add_argument("--rebuild", action="store_true", help="build the index even if --index exists")
    parser.add_argument("--questions", type=Path, default=ROOT / "benchmarks" / "data" / "rag_questions.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", type=int, default=4, help="passages in the answer prompt")
    parser.add_argument("--context-tokens", type=int, default=1536)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--answers", choices=["both", "without", "none"], default="both",
                        help="'without': only the replies without retrieval (no index needed); 'none': retrieval only")
    parser.add_argument("--replies", type=Path, default=ROOT / "runs" / "rag-replies.jsonl",
                        help="cache of generated replies, reused by later runs with the same settings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rag.json")
    args = parser.parse_args()
    if not args.docs.is_dir():
        print(f"skipped: {args.docs} is not here; install Debian's python3.11-doc (apt-get install python3.11-doc) "
              "or pass --docs FOLDER")
        return
    from plinth.retrieval.embedder import Embedder
    embedder, index, results = Embedder.load(), None, {}
    questions = load_questions(args.questions)[:args.limit]
    if args.answers != "without":
        if args.rebuild or not (args.index / "index.json").is_file():
            print(f"building the index of {args.docs} ...", flush=True)
            Index.build(args.docs, embedder, exclude=EXCLUDE).save(args.index)
        index = Index.load(args.index)
        results = {"documents": index.info["documents"], "chunks": len(index), "build_s": index.info["build_seconds"],
                   **retrieval(index, embedder, questions, args.docs)}
    if args.answers != "none":
        import plinth
        args.replies.parent.mkdir(parents=True, exist_ok=True)
        results.update(answers(plinth.load(args.model), index, embedder, questions, args))
    report(results)
    settings = {**{k: str(v) for k, v in vars(args).items()}, "load_average_1m": os.getloadavg()[0],
                "threads": __import__("torch").get_num_threads(), "machine": platform.platform()}
    write_atomic(args.out, json.dumps({"settings": settings, "results": results, "questions": questions}, indent=1))
    print(f"wrote {args.out}")


def report(results: dict):
    print(f"\n{'measure':28} value")
    for key, value in results.items():
        print(f"{key:28} {value:.3f}" if isinstance(value, float) else f"{key:28} {value}")


if __name__ == "__main__":
    main()
