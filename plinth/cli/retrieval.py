"""`plinth index build|query` and `plinth rag`: the command-line face of `plinth.retrieval.index` and
`plinth.retrieval.rag`.

    plinth index build docs/ --out idx/
    plinth index query idx/ "how do I open a file?" --k 5 --where kind=markdown
    plinth rag smollm2-135m-instruct idx/ "How do I read a file line by line in Python?"
"""
from __future__ import annotations

import json
import sys

from plinth import hub
from plinth.cli.common import (add_model_args, add_sampling_args, add_subcommands, load_model, name_values,
                               print_stream, sampling)
from plinth.retrieval.index import MODES


def where_filter(items: list[str]) -> dict | None:
    """`--where source=library/*.html --where line=1` → {"source": "library/*.html", "line": 1}."""
    where = name_values(items, "--where takes FIELD=VALUE (e.g. --where 'source=docs/*.md'), got {}",
                        empty_values=True)
    return {key: int(value) if value.isdigit() else value for key, value in where.items()} or None


def cmd_index_build(args):
    from tqdm import tqdm

    from plinth.retrieval.embedder import Embedder
    from plinth.retrieval.index import Index
    embedder = Embedder.load(args.embedder)
    source = args.embedder if args.embedder in hub.KNOWN_MODELS else str(hub.resolve(args.embedder).resolve())
    with tqdm(desc="embedding", unit="chunk", disable=args.quiet) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        index = Index.build(args.folder, embedder, args.chunk_tokens, args.overlap, args.exclude, source, progress)
    path = index.save(args.out)
    print(f"indexed {index.info['documents']} documents as {len(index)} chunks in {index.info['build_seconds']} s "
          f"-> {path}")
    if not len(index):
        print(f"plinth: warning: {args.folder} had no readable documents; the index is empty", file=sys.stderr)


def cmd_index_query(args):
    from plinth.retrieval.index import Index
    index = Index.load(args.index)
    hits = index.search(index.load_embedder(args.embedder), args.question, k=args.k, where=where_filter(args.where),
                        mode=args.mode)
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, **hit.to_dict()}, ensure_ascii=False))
        else:
            print(f"{rank}. {hit.score:.3f}  {hit.chunk.cite()}")
            print("   " + " ".join(hit.chunk.text.split())[:args.width])


def cmd_rag(args):
    from plinth.retrieval.index import Index
    from plinth.retrieval.rag import ask
    index = Index.load(args.index)
    embedder = index.load_embedder(args.embedder)
    reply = ask(load_model(args), index, embedder, args.question, k=args.k, where=where_filter(args.where),
                mode=args.mode, max_prompt_tokens=args.context_tokens, stream=True, **sampling(args))
    print_stream(reply.text)
    print("\n\nSources:")
    for s in reply.sources:
        print(f"[{s['id']}] {s['citation']}  (score {s['score']:.3f})")


def add_search_args(p, k: int):
    """What `index query` and `rag` both take: the index, the question and how to search."""
    p.add_argument("index", help="an index folder from `plinth index build`")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=k, help="passages to retrieve")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE", help="only chunks whose "
                   "field matches (source, kind, title, section: shell patterns; repeatable)")
    p.add_argument("--mode", choices=MODES, default="hybrid", help="rank by embeddings and words fused "
                   "(hybrid), by embeddings alone (dense) or by words alone (lexical, BM25)")
    p.add_argument("--embedder", help="embedding model (default: the one that built the index)")


def register(sub):
    index_sub = add_subcommands(sub, "index", help="build and query a retrieval index",
                                description="Retrieval index commands.")
    p = index_sub.add_parser("build", help="chunk, embed and store a folder of documents",
                             description="Read .txt/.md/.html/.py (and .pdf with pypdf) files under FOLDER, split "
                             "them into overlapping token windows, embed them and write an index folder. "
                             "Example: plinth index build docs/ --out idx/")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--chunk-tokens", type=int, default=160, help="tokens per chunk, in the embedder's tokens")
    p.add_argument("--overlap", type=int, default=32, help="tokens each chunk shares with the previous one")
    p.add_argument("--exclude", action="append", default=[], help="skip paths (relative to FOLDER) matching "
                   "this pattern, e.g. '_sources/*' (repeatable)")
    p.add_argument("--embedder", default=hub.DEFAULT_EMBEDDER, help="embedding model: a name or folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_build)

    p = index_sub.add_parser("query", help="top-k chunks for a question, with scores and sources",
                             description="Search an index. Example: plinth index query idx/ \"how do I open a file?\"")
    add_search_args(p, k=5)
    p.add_argument("--json", action="store_true", help="one JSON object per hit (with the full text)")
    p.add_argument("--width", type=int, default=240, help="characters of each chunk to show")
    p.set_defaults(func=cmd_index_query)

    p = sub.add_parser("rag", help="answer a question from an index, citing sources",
                       description="Retrieve passages, add them to the prompt and answer with cited sources. "
                       "Example: plinth rag smollm2-135m-instruct idx/ \"How do I read a file line by line?\"")
    add_model_args(p)
    add_search_args(p, k=4)
    p.add_argument("--context-tokens", type=int, default=1536, help="most prompt tokens (sources included)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_rag)
