"""Sharing the machine: how much of its idle speed plinth keeps with another CPU-bound process
beside it, against llama.cpp in the same situation.

    .venv/bin/python benchmarks/sharing.py          # prints a table, writes benchmarks/results/sharing.json

Workloads (--workloads picks some), each in its own subprocess for --seconds:
  decode     plinth: greedy one-token-a-pass decoding of the default model (`generate_stream`),
             through the compiled programs (plinth's default: built first by `plinth compile`)
             and eagerly (--no-compile);
             llama.cpp: the same GGUF, `Llama.generate` greedy, 2 threads
  train      plinth: training steps (AdamW, forward and backward) of the `tiny` preset on random tokens
Situations: alone; beside a busy loop (one Python process spinning on one core); beside a second
copy of the same workload. Thread settings for plinth: adaptive (plinth's default in its engine,
`generate` and training loop: all cores, one thread fewer while other processes keep a core busy;
plinth/cpu_share.py), a fixed 2 threads (PyTorch's default: OpenMP threads spin-waiting between
kernels), OMP_WAIT_POLICY=PASSIVE (they sleep instead), and a fixed 1 thread.
Compiled decoding is measured at the adaptive setting only, the default's.
Reported: tokens/s and the share of the same setting's idle speed (the issue's target: ≥ 40%).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from plinth.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"adaptive (default)": {"threads": 0, "env": {}},
            "spin, 2 threads": {"threads": 2, "env": {}},
            "passive, 2 threads": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
            "1 thread": {"threads": 1, "env": {}}}


def thread_setting(threads: int):
    """Set a child's torch thread count: `threads`, or for 0 all cores and the `CpuShare` that
    adapts them (returned; None for a fixed count)."""
    import torch
    from plinth.cpu_share import CpuShare, usable_cpus
    most = threads or len(usable_cpus())
    torch.set_num_threads(most)
    return CpuShare(most) if threads == 0 else None


def run_decode(threads: int, seconds: float, compiled: bool = False) -> float:
    share = thread_setting(threads)
    import plinth
    from plinth.generate import SamplingParams, generate_stream
    m = plinth.load()
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompt = m.tokenizer.encode("Once upon a time")
    if compiled:
        m.compile(build=False)
        if not m.decoder.runs(m.model.config.max_seq_len):
            sys.exit("no compiled programs are kept for the default model: run `plinth compile` first")

    def decode():
        return len(list(generate_stream(m.model, m.tokenizer, prompt, params, speculate=False, decoder=m.decoder,
                                        cpu_share=share)))

    decode()  # warm-up
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += decode()
    return tokens / (time.perf_counter() - start)


def run_llama(threads: int, seconds: float) -> float:
    import llama_cpp
    from plinth import hub
    llm = llama_cpp.Llama(str(hub.resolve(hub.DEFAULT_MODEL)), n_ctx=256, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(b"Once upon a time")

    def decode():
        llm.reset()
        n = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            n += 1
            if n == 32:
                return n

    decode()
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += decode()
    return tokens / (time.perf_counter() - start)


def run_train(threads: int, seconds: float) -> float:
    share = thread_setting(threads)
    import torch
    from plinth.config import preset
    from plinth.model import Transformer
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512))
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 512, (8, 129))

    def step():
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if share is not None:  # as plinth's training loop does after each step
            share.adjust()

    step()
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        tokens += 8 * 128
    return tokens / (time.perf_counter() - start)


WORKLOADS = {"plinth decode compiled": functools.partial(run_decode, compiled=True), "plinth decode eager": run_decode,
             "llama.cpp decode": run_llama, "plinth train": run_train}


def child_command(workload: str, threads: int, seconds: float) -> list[str]:
    return [sys.executable, __file__, "--child", workload, "--threads", str(threads), "--seconds", str(seconds)]


def measure(workload: str, setting: dict, beside: str, seconds: float) -> float:
    """The workload's rate alone, beside a busy loop, or beside a copy of itself (both timed; the
    first one's rate is reported)."""
    env = {**os.environ, **setting["env"]}
    others = []
    if beside == "busy loop":
        others.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
    elif beside == "itself":
        others.append(subprocess.Popen(child_command(workload, setting["threads"], seconds + 20), env=env,
                                       stdout=subprocess.DEVNULL))
        time.sleep(8)  # the copy has loaded and runs
    try:
        done = subprocess.run(child_command(workload, setting["threads"], seconds), env=env, stdout=subprocess.PIPE,
                              text=True, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        for other in others:
            other.kill()
            other.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--child", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharing.json"))
    args = parser.parse_args()
    if args.child:
        print(WORKLOADS[args.child](args.threads, args.seconds))
        return
    if "plinth decode compiled" in args.workloads:  # kept programs, as plinth serve would have built them
        subprocess.run([sys.executable, "-m", "plinth", "compile"], check=True)
    rows = []
    for workload in args.workloads:
        settings = ({"2 threads": {"threads": 2, "env": {}}} if workload.startswith("llama") else
                    {"adaptive (default)": SETTINGS["adaptive (default)"]} if workload.endswith("compiled") else SETTINGS)
        for name, setting in settings.items():
            rates = {beside: measure(workload, setting, beside, args.seconds) for beside in ("alone", "busy loop", "itself")}
            row = {"workload": workload, "setting": name, **rates}
            rows.append(row)
            print(f"{workload:22} {name:19} alone {rates['alone']:8.1f} tok/s   beside a busy loop "
                  f"{rates['busy loop']:8.1f} ({rates['busy loop'] / rates['alone']:4.0%})   beside itself "
                  f"{rates['itself']:8.1f} ({rates['itself'] / rates['alone']:4.0%})", flush=True)
    write_atomic(args.out, json.dumps({"seconds": args.seconds, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
