"""Soak test of `plinth serve`: many concurrent streams for minutes, some cut mid-stream, and the
server must come out of it as it went in.

    .venv/bin/python benchmarks/soak.py                        # 32 streams, 30% cut, 6 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1 --clients 8

Each of --clients threads sends streamed chat completions back to back (prompts in turn,
`ignore_eos`, 32 to 192 tokens); a --cut share of them close the connection after a few chunks,
while the server still has tokens to send, so each cut stream is a cancelled request. Reported:
- failures: any HTTP error, non-200 status, malformed event, or a finished stream without [DONE];
- the server's counters (`/metrics`: requests finished and cancelled during the soak) against
  the client's counts, once the server is idle again with an empty queue;
- the server's resident memory sampled through the run: growth from the first minute's highest
  value (warmed up: caches and allocator arenas at their working size) to the last minute's;
- one greedy answer before and after the soak, which must be identical.
Results go to benchmarks/results/soak.json; the exit status is 1 when any check fails.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx

from plinth import hub
from plinth.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, free_port, running  # noqa: E402  (the serving benchmark's helpers)

GREEDY = {"model": "m", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32,
          "temperature": 0}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def counters(base: str) -> dict[str, float]:
    """The engine's counters and gauges from /metrics (Prometheus text)."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("plinth_") and "{" not in name:
            values[name.removesuffix("_total")] = float(value)
    return values


class Client:
    """One thread's streams: finished, cut (by us) and failed, counted under a shared lock."""

    def __init__(self, base: str, cut: float, seed: int, tally: dict, lock: threading.Lock):
        self.base, self.cut, self.random, self.tally, self.lock = base, cut, random.Random(seed), tally, lock

    def run(self, until: float):
        # A stream waits in the queue, without a byte, while every slot is busy: a long read timeout.
        with httpx.Client(timeout=httpx.Timeout(30, read=600)) as http:
            while time.monotonic() < until:
                self.stream_once(http)

    def stream_once(self, http: httpx.Client):
        max_tokens = self.random.randrange(32, 193)
        cut_after = self.random.randrange(1, max_tokens // 2) if self.random.random() < self.cut else None
        body = {"model": "m", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": self.random.choice(PROMPTS)}]}
        chunks, done, outcome = 0, False, "failed"
        try:
            with http.stream("POST", f"{self.base}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}")
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"].get("message"))
                        chunks += 1
                        if cut_after is not None and chunks >= cut_after:
                            break  # leaving the block closes the connection mid-stream
            outcome = "cut" if cut_after is not None else ("finished" if done else "failed")
        except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as error:
            with self.lock:
                self.tally.setdefault("errors", []).append(str(error)[:200])
        with self.lock:
            self.tally[outcome] += 1


def greedy(base: str) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", json=GREEDY, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def wait_idle(base: str, limit: float = 60) -> dict:
    """Counters once nothing runs or waits (cancellations land at the engine's next step)."""
    deadline = time.monotonic() + limit
    while True:
        values = counters(base)
        if (values.get("plinth_running", 1) == 0 and values.get("plinth_queue_depth", 1) == 0) \
                or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def soak(base: str, pid: int, args) -> dict:
    before_answer, before = greedy(base), wait_idle(base)
    tally, lock = {"finished": 0, "cut": 0, "failed": 0}, threading.Lock()
    until = time.monotonic() + args.minutes * 60
    threads = [threading.Thread(target=Client(base, args.cut, seed, tally, lock).run, args=(until,))
               for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    samples, start = [], time.monotonic()
    while any(thread.is_alive() for thread in threads):
        samples.append((time.monotonic() - start, rss_mb(pid)))
        time.sleep(5)
    for thread in threads:
        thread.join()
    after = wait_idle(base)
    after_answer = greedy(base)
    first = [mb for t, mb in samples if t < 60] or [samples[0][1]]
    last = [mb for t, mb in samples if t > samples[-1][0] - 60] or [samples[-1][1]]
    server = {name: after.get(f"plinth_requests_{name}", 0) - before.get(f"plinth_requests_{name}", 0)
              for name in ("finished", "cancelled", "failed")}
    return {"client": {k: v for k, v in tally.items() if k != "errors"}, "errors": tally.get("errors", [])[:20],
            "server": server, "queue_depth_after": after.get("plinth_queue_depth"),
            "running_after": after.get("plinth_running"), "rss_first_minute_mb": max(first),
            "rss_last_minute_mb": max(last), "rss_growth_mb": max(last) - max(first), "rss_samples": samples,
            "greedy_same": before_answer == after_answer}


def checks(result: dict, max_growth: float) -> dict[str, bool]:
    client, server = result["client"], result["server"]
    return {"no failures": client["failed"] == 0 and server["failed"] == 0,
            "server finished = client finished": server["finished"] == client["finished"],
            "server cancelled = client cut": server["cancelled"] == client["cut"],
            "queue and running back to 0": result["queue_depth_after"] == 0 and result["running_after"] == 0,
            f"RSS growth ≤ {max_growth:g} MB": result["rss_growth_mb"] <= max_growth,
            "greedy answer unchanged": result["greedy_same"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streams")
    parser.add_argument("--cut", type=float, default=0.3, help="share of streams closed mid-stream")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=16.0, help="what still counts as flat memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "plinth", "serve", args.model, "--port", str(port)]
    with running(command, port, "/health") as (proc, base):
        result = soak(base, proc.pid, args)
    verdict = checks(result, args.max_rss_growth_mb)
    print(f"{args.clients} streams for {args.minutes:g} min, {args.cut:.0%} cut: client {result['client']}, "
          f"server {result['server']}")
    print(f"RSS {result['rss_first_minute_mb']:.0f} MB in the first minute → "
          f"{result['rss_last_minute_mb']:.0f} MB in the last ({result['rss_growth_mb']:+.1f} MB)")
    for name, ok in verdict.items():
        print(f"{'ok ' if ok else 'FAILED'}  {name}")
    for error in result["errors"]:
        print(f"  error: {error}")
    write_atomic(args.out, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                       "result": result, "checks": verdict}, indent=1))
    print(f"wrote {args.out}")
    sys.exit(0 if all(verdict.values()) else 1)


if __name__ == "__main__":
    main()
