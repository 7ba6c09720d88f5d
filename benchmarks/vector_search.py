"""Exact numpy search against faiss and hnswlib: why plinth's index searches exactly.

    .venv/bin/python benchmarks/vector_search.py                  # 10k, 100k, 500k vectors
    .venv/bin/python benchmarks/vector_search.py --sizes 1000000 --methods "numpy exact" "faiss flat"

For each size N: N random unit vectors of 384 dimensions (all-MiniLM-L6-v2's width; the shape, not
the values, sets the cost) and 200 queries near stored vectors. Each method builds its index, then
answers the queries one at a time for the top 10:
  numpy exact      `vectors @ query` + `argpartition` (what `plinth.retrieval.index` does)
  faiss flat       `IndexFlatIP`, exact too
  faiss hnsw       `IndexHNSWFlat` (M=32, efSearch=64), approximate
  hnswlib          `Index(space="ip")` (M=32, ef_construction=200, ef=64), approximate
Reported: build seconds, median query milliseconds, recall@10 against the exact answer. faiss and
hnswlib are used when installed (`pip install faiss-cpu hnswlib`) and skipped with the reason
otherwise; they are never plinth dependencies. Results go to benchmarks/results/vector_search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from plinth.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
DIM, K, QUERIES = 384, 10, 200


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_exact(vectors):
    def search(q):
        scores = vectors @ q
        best = np.argpartition(-scores, K - 1)[:K]
        return best[np.argsort(-scores[best])]
    return search


def faiss_flat(vectors):
    import faiss
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    return lambda q: index.search(q[None], K)[1][0]


def faiss_hnsw(vectors):
    import faiss
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 64
    index.add(vectors)
    return lambda q: index.search(q[None], K)[1][0]


def hnswlib_index(vectors):
    import hnswlib
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(vectors), M=32, ef_construction=200)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(64)
    return lambda q: index.knn_query(q[None], k=K)[0][0]


METHODS = {"numpy exact": numpy_exact, "faiss flat": faiss_flat, "faiss hnsw": faiss_hnsw, "hnswlib": hnswlib_index}


def measure(n: int, rng, methods: list[str]) -> list[dict]:
    vectors = unit(rng.standard_normal((n, DIM)))
    queries = unit(vectors[rng.integers(0, n, QUERIES)] + 0.5 * unit(rng.standard_normal((QUERIES, DIM))))
    exact = [set(numpy_exact(vectors)(q).tolist()) for q in queries]
    rows = []
    for name in methods:
        make = METHODS[name]
        try:
            start = time.perf_counter()
            search = make(vectors)
        except ImportError as e:
            rows.append({"n": n, "method": name, "skipped": str(e)})
            continue
        build = time.perf_counter() - start
        times, found = [], 0
        for q, truth in zip(queries, exact):
            start = time.perf_counter()
            ids = search(q)
            times.append(time.perf_counter() - start)
            found += len(truth & set(np.asarray(ids).tolist()))
        rows.append({"n": n, "method": name, "build_s": build, "query_ms": 1000 * statistics.median(times),
                     "recall@10": found / (K * QUERIES)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vector_search.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [row for n in args.sizes for row in measure(n, rng, args.methods)]
    print(f"{'N':>8} {'method':12} {'build s':>8} {'query ms':>9} {'recall@10':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['n']:>8} {r['method']:12} skipped: {r['skipped']}")
        else:
            print(f"{r['n']:>8} {r['method']:12} {r['build_s']:8.2f} {r['query_ms']:9.3f} {r['recall@10']:9.3f}")
    write_atomic(args.out, json.dumps({"load_average_1m": os.getloadavg()[0], "threads": os.cpu_count(),
                                       "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
