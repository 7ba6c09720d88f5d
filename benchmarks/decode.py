"""Decode benchmark: plinth against Hugging Face transformers and llama.cpp on the same GGUF file.

    .venv/bin/python benchmarks/decode.py                    # all engines, prints a table
    .venv/bin/python benchmarks/decode.py --dtype float32    # plinth without its compact weights
    .venv/bin/python benchmarks/decode.py gemma3-270m        # another known model (`plinth list`)

Model: a known model's GGUF (`plinth.hub.resolve(MODEL)`), by default SmolLM2-135M-Instruct Q4_1;
gemma3-270m is Gemma 3 270M Q4_K_M (`plinth pull gemma3-270m`). Every engine runs in its own
subprocess with 2 threads, so its peak RSS is its own and one engine's allocations do not disturb
the next. Each child prints one JSON line; the parent prints a table, the ratios
plinth/anchor, and writes everything to benchmarks/results/decode.json (decode-MODEL.json for
another model; or --out).

How each figure is measured (all engines get the same token ids, made with plinth's tokenizer):
  load s      wall time of the load call alone (imports excluded): `plinth.load` (a second load:
              the first packs the weights into plinth's cache, timed on its own as "first load"),
              `AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=float32)`
              (transformers dequantises the file to float32), `llama_cpp.Llama(...)`.
  prefill     --prompt-tokens (512) tokens of this repository's source text through one forward,
              logits at the last position only (plinth `last=`, transformers `logits_to_keep=1`,
              llama.cpp's default); one warm-up, then the median of --repeats runs.
  decode      greedy, EOS ignored, from a short --decode-prompt (16 tokens, so the rate is not
              dominated by attention over a long prompt): generate 1 + --new-tokens (128) tokens and
              time from the first token (which only needs the prefill) to the last, so the figure
              covers exactly 128 single-token forwards plus sampling. One short warm-up, then the
              median of --repeats runs. transformers uses its own `generate` (a streamer stamps
              each token); llama.cpp its `Llama.generate` with temp=0. plinth decodes as `plinth
              generate` does by default, through the compiled programs kept for the model
              (`plinth.load(...).compile(build=False)`, plinth/compiled_decode.py), which a first
              child builds from nothing (timed, as `plinth compile` or a first `plinth serve` would);
              its first step is timed on its own: loading what was kept. plinth_eager is
              `plinth generate --no-compile`.
  peak RSS    `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the child at the end (MB = 2**20 bytes).
llama-cpp-python is used when importable and skipped with the reason otherwise. Run on an otherwise
idle machine: each result records the 1-minute load average; well above 2 means it was shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from plinth.files import write_atomic

ENGINES = ("plinth", "plinth_eager", "transformers", "llama_cpp")
THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


# ---- shared helpers ----------------------------------------------------------------------------
def make_job(args) -> dict:
    """The model file and the prompts: --prompt-tokens of natural code/English text (plinth's model
    source, repeated as needed) in plinth's tokenizer, read from the GGUF metadata alone; the decode
    prompt is its first --decode-prompt tokens."""
    from plinth.hub import resolve
    from plinth.tokenizer import Tokenizer
    from plinth.weights.gguf import metadata, open_gguf

    path = resolve(args.model)
    tokenizer = Tokenizer.from_gguf(metadata(open_gguf(path)))
    text = (ROOT / "plinth" / "model.py").read_text()
    repeats = args.prompt_tokens // len(tokenizer.encode(text)) + 1
    ids = tokenizer.encode(text * repeats)[:args.prompt_tokens]  # one encode: a BOS only at the start
    return {"path": str(path), "long": ids, "short": ids[:args.decode_prompt]}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- per engine: load it, return (load s, prefill(), decode(n) → (stamps, tokens), info) ---------
def run_plinth(args, job):
    import torch
    torch.set_num_threads(THREADS)
    import plinth
    import plinth.adapt.adapted, plinth.loaded, plinth.weights.packed  # noqa: E401,F401 - what load imports
    from plinth.generate import SamplingParams, generate_stream

    start = time.perf_counter()
    m = plinth.load(args.model, dtype=args.dtype)
    load = time.perf_counter() - start
    last = torch.tensor([len(job["long"]) - 1])
    compiled = args.engine != "plinth_eager"
    if compiled:  # the first child builds the programs; the others find them kept
        m.compile(build=args.engine == "plinth_build")

    def prefill():
        with torch.inference_mode():
            m.model(torch.tensor([job["long"]]), last=last)

    def decode(n):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        stamps, tokens = [], []
        for step in generate_stream(m.model, m.tokenizer, job["short"], params, speculate=False,  # one token a pass
                                    decoder=m.decoder):
            stamps.append(time.perf_counter())
            tokens.append(step.choice.token)
        return stamps, tokens

    tensors = [*m.model.parameters(), *m.model.buffers()]  # int4/int8 weights are buffers
    info = {"dtype": args.dtype or "default", "weight_dtypes": sorted({str(t.dtype) for t in tensors})}
    if compiled:  # compiling happens at the first step: timed here, before the warm-up the child does
        info["compile_s"] = timed(lambda: decode(2))
        info["compiled"] = m.decoder.runs(len(job["short"]) + args.new_tokens + 1)  # else it decoded eagerly
    return load, prefill, decode, info


def run_transformers(args, job):
    import torch
    torch.set_num_threads(THREADS)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    path = Path(job["path"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - start

    def prefill():
        with torch.inference_mode():
            model(torch.tensor([job["long"]]), logits_to_keep=1)

    class Stamps(BaseStreamer):
        """Records when each new token appears; generate first puts the prompt, which we skip."""
        def __init__(self):
            self.stamps, self.tokens, self.prompt_seen = [], [], False

        def put(self, value):
            if self.prompt_seen:
                self.stamps.append(time.perf_counter())
                self.tokens.extend(value.flatten().tolist())
            self.prompt_seen = True

        def end(self):
            pass

    def decode(n):
        streamer = Stamps()
        ids = torch.tensor([job["short"]])
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=n,
                           max_new_tokens=n, streamer=streamer, pad_token_id=model.config.eos_token_id)
        return streamer.stamps, streamer.tokens

    return load, prefill, decode, {"version": transformers.__version__, "dtype": "float32"}


def run_llama_cpp(args, job):
    import llama_cpp  # plinth is not imported here: importing it would bring torch into this process

    start = time.perf_counter()
    llm = llama_cpp.Llama(job["path"], n_ctx=1024, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)
    load = time.perf_counter() - start

    def prefill():
        llm.reset()  # forget the KV cache so the whole prompt is evaluated again
        llm.eval(job["long"])

    def decode(n):
        llm.reset()  # generate() would otherwise reuse the cached prefix of the previous run
        stamps, tokens = [], []
        for token in llm.generate(job["short"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == n:
                break
        return stamps, tokens

    return load, prefill, decode, {"version": llama_cpp.__version__}


def first_load(args) -> dict:
    """plinth's first load of the file: it reads the GGUF and packs its weights into the cache that
    every later load maps (plinth/weights/packed.py); the parent points the cache at a fresh folder."""
    import plinth
    import plinth.adapt.adapted, plinth.loaded, plinth.weights.packed  # noqa: E401,F401 - what load imports
    start = time.perf_counter()
    plinth.load(args.model, dtype=args.dtype)
    return {"engine": "plinth_first_load", "first_load_s": time.perf_counter() - start}


def child(args) -> dict:
    """Benchmark one engine in this process; returns its JSON-able result. torch is imported only by
    the engines that use it, so the llama.cpp figure does not carry torch's ~200 MB."""
    if args.engine == "plinth_first_load":
        return first_load(args)
    if args.engine == "llama_cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError as error:
            return {"engine": args.engine, "skipped": f"llama_cpp is not importable ({error})"}
    job = json.loads(sys.stdin.read())  # from the parent: the same token ids and file for every engine
    runner = {"plinth": run_plinth, "plinth_eager": run_plinth, "plinth_build": run_plinth, "transformers": run_transformers,
              "llama_cpp": run_llama_cpp}[args.engine]
    load, prefill, decode, info = runner(args, job)

    prefill()  # warm-up: first-call allocations and kernel selection are not part of the rate
    prefill_s = [timed(prefill) for _ in range(args.repeats)]
    decode(8)
    runs = [decode(args.new_tokens + 1) for _ in range(args.repeats)]
    if any(len(tokens) != args.new_tokens + 1 for _, tokens in runs):
        raise RuntimeError(f"{args.engine} did not produce {args.new_tokens + 1} tokens")
    decode_s = [stamps[-1] - stamps[0] for stamps, _ in runs]  # first token → last: new_tokens forwards
    return {"engine": args.engine, "load_s": load,
            "prefill_tok_s": len(job["long"]) / statistics.median(prefill_s), "prefill_runs_s": prefill_s,
            "decode_tok_s": args.new_tokens / statistics.median(decode_s), "decode_runs_s": decode_s,
            "peak_rss_mb": peak_rss_mb(), "tokens": runs[0][1],
            "loadavg_1min": os.getloadavg()[0], **info}  # well above 2 means other work shared the CPUs


# ---- the parent: one child per engine, then the table ------------------------------------------
def run_child(engine: str, args, job: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, args.model, "--engine", engine, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--decode-prompt", str(args.decode_prompt),
           "--repeats", str(args.repeats)] + (["--dtype", args.dtype] if args.dtype else [])
    print(f"running {engine} …", file=sys.stderr, flush=True)
    # stderr passes through (library warnings, progress bars); stdout's last line is the result.
    done = subprocess.run(cmd, input=json.dumps(job), stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"engine": engine, "error": f"child exited with status {done.returncode}"}
    return json.loads(lines[-1])


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def report(results: list[dict], first: dict):
    print(f"\nplinth's first load of the file (reads the GGUF, packs the weights it keeps): "
          f"{first.get('first_load_s', float('nan')):.2f} s; the rows below load what it kept")
    compiled = next((r for r in results if r["engine"] == "plinth" and "compile_s" in r), {})
    print(f"plinth: building its compiled programs took {first.get('first_compile_s', float('nan')):.1f} s the first "
          f"time; loading the programs kept took {compiled.get('compile_s', float('nan')):.2f} s; decoded compiled: "
          f"{compiled.get('compiled')}")
    print(f"\n{'engine':<16}{'load s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for r in results:
        if "load_s" in r:
            print(f"{r['engine']:<16}{r['load_s']:>9.2f}{r['prefill_tok_s']:>15.1f}"
                  f"{r['decode_tok_s']:>14.1f}{r['peak_rss_mb']:>13.0f}")
        else:
            print(f"{r['engine']:<16}  {r.get('skipped') or r.get('error')}")
    for ours in [r for r in results if r["engine"].startswith("plinth") and "load_s" in r]:
        name = ours["engine"]
        print(f"\n{name} vs anchor (×, above 1 = plinth better; load = anchor s / plinth s):")
        for r in results:
            if r["engine"].startswith("plinth") or "load_s" not in r:
                continue
            v = r.setdefault("vs_plinth", {})[name] = {
                "decode": ours["decode_tok_s"] / r["decode_tok_s"], "prefill": ours["prefill_tok_s"] / r["prefill_tok_s"],
                "load": r["load_s"] / ours["load_s"], "greedy_tokens_agreeing": same_prefix(ours["tokens"], r["tokens"])}
            print(f"  vs {r['engine']:<13} decode {v['decode']:.2f}×  prefill {v['prefill']:.2f}×  load {v['load']:.2f}×"
                  f"  (greedy outputs agree for the first {v['greedy_tokens_agreeing']}/{len(ours['tokens'])} tokens)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=MODEL, help=f"a known model name (default: {MODEL})")
    parser.add_argument("--dtype", default=None, help="plinth weight dtype (default: plinth's own default)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill rate")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed")
    parser.add_argument("--decode-prompt", type=int, default=16, help="prompt length for the decode rate")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median taken)")
    parser.add_argument("--engine", choices=ENGINES + ("job", "plinth_first_load", "plinth_build"),
                        help=argparse.SUPPRESS)  # internal: a child
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/decode[-MODEL].json)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / ("decode.json" if args.model == MODEL
                                                             else f"decode-{args.model}.json")
    if args.engine:
        print(json.dumps(make_job(args) if args.engine == "job" else child(args)))
        return

    # The parent imports neither torch nor plinth, even to tokenize: Linux carries a parent's peak
    # RSS into ru_maxrss of the children it spawns, which would put a floor under every figure.
    job = run_child("job", args, {})
    with tempfile.TemporaryDirectory() as cache:  # plinth's packed weights: made by the first load, mapped after
        env = {"PLINTH_PACKED_CACHE": cache, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
               "PLINTH_PROGRAM_CACHE": f"{cache}/programs"}
        first = run_child("plinth_first_load", args, job, env)
        # The programs are built from nothing first; the reported rows load what was kept, as any
        # later process would.
        first["first_compile_s"] = run_child("plinth_build", args, job, env).get("compile_s", float("nan"))
        results = [run_child(engine, args, job, env) for engine in ENGINES]
    report(results, first)
    write(args, [first] + results)


def write(args, results: list[dict]):
    settings = {k: v for k, v in vars(args).items() if k not in ("engine", "out")}
    settings.update(threads=THREADS, torch=version("torch"), machine=platform.platform(),
                    python=platform.python_version())
    write_atomic(args.out, json.dumps({"settings": settings, "results": results}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
