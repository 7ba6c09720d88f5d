"""GGUF exports checked in llama.cpp: plinth writes SmolLM2-135M (from its Q4_1 file), Gemma 3 270M (from
its Q4_K_M file, where installed) and plinth's own pretrained tiny model (recipes/pretrain-tiny.yaml) as
GGUF files; llama.cpp (llama-cpp-python) loads each export, and plinth and llama.cpp read the same
text teacher-forced. The table gives their top-1 next-token agreement on the export (llama.cpp
quantizes activations, so the two agree by top-1, not bit for bit: see DESIGN.md), whether llama.cpp
tokenizes the text as plinth does, the export's size against its source's, and how often the export
still picks the source model's top-1 token (what re-quantizing cost).

Type "source" is the GGUF file itself, no export: plinth's default inference path (`plinth.load`:
int4/int8 weights) against llama.cpp on the same file, teacher-forced on --source-tokens tokens of
this repository's plinth/model.py; its source_top1 is how often that path picks the float32 model's
(exact dequantization) top-1 token. The source rows also give the float32 model's own agreement with
llama.cpp, and that of transformers' float32 model on the same file (where transformers is
installed): what exact arithmetic reaches against llama.cpp's.

    .venv/bin/python benchmarks/export_check.py                          # the sources, q4_0 exports of all three
    .venv/bin/python benchmarks/export_check.py --types q4_0,q4_1,q8_0 --models smollm2
    .venv/bin/python benchmarks/export_check.py --types source --models gemma3

Results: benchmarks/results/export_check.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import plinth
from plinth import hub
from plinth.files import write_atomic
from plinth.weights.gguf_writer import GGUF_TYPES, write_gguf
from plinth.weights.load import read_model

ROOT = Path(__file__).resolve().parent.parent
# Prose, a little code and a number or two: about 100 tokens for each tokenizer.
TEXT = ("The Eiffel Tower was finished in 1889 for the World's Fair in Paris, and for forty-one years it was "
        "the tallest structure in the world. Engineers at first doubted that its iron frame would stand in "
        "strong wind, but it has stood for well over a century.\n\n"
        "def mean(values):\n    return sum(values) / len(values)\n\n"
        "A good cup of coffee needs fresh beans, clean water just off the boil, and a little patience.")
N_TOKENS = 100
SOURCE_TEXT = (ROOT / "plinth" / "model.py").read_text()  # code and English, fixed for a given commit


def sources(tiny_checkpoint: Path) -> dict[str, Path]:
    """The models to export, each from the file plinth loads it from."""
    found = {"smollm2": hub.resolve("smollm2-135m-instruct"), "tiny": tiny_checkpoint}
    if hub.package_dir(hub.KNOWN_MODELS["gemma3-270m"].module) is not None:
        found["gemma3"] = hub.resolve("gemma3-270m")
    return found


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*.safetensors"))) / 1e6


def llama_cpp_logits(path: Path, ids: list[int], text: str, add_bos: bool) -> tuple[torch.Tensor, bool]:
    """llama.cpp's teacher-forced logits at every position of `ids`, and whether it tokenizes `text` as `ids`."""
    import llama_cpp
    n_ctx = max(256, len(ids))
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=True, verbose=False)
    try:
        same_tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=True)[:len(ids)] == ids
        llm.eval(ids)
        return torch.tensor(llm.scores[:len(ids)]), same_tokens
    finally:
        llm.close()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of positions where two (T, vocab) logit tensors pick the same top-1 token."""
    return round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()), 4)


def check_source(name: str, source: Path, n_tokens: int) -> dict:
    """The GGUF file itself: plinth's default inference path and llama.cpp, teacher-forced."""
    loaded = plinth.load(str(source))
    ids = loaded.tokenizer.encode(SOURCE_TEXT)[:n_tokens]
    ours, add_bos = loaded.logits(ids), loaded.tokenizer.add_bos
    del loaded  # one model in memory at a time
    theirs, same_tokens = llama_cpp_logits(source, ids, SOURCE_TEXT, add_bos)
    row = dict(model=name, type="source", tokens=len(ids), export_mb=round(size_mb(source), 1),
               source_mb=round(size_mb(source), 1), write_s=0.0, llama_cpp_top1=agreement(ours, theirs),
               cosine=cosine(ours, theirs), same_tokens=same_tokens)
    model, _, _ = read_model(source)
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0]
    del model
    row["source_top1"] = agreement(ours, exact)
    # Where exact arithmetic itself stands against llama.cpp, which rounds activations to 8 bits:
    # plinth's float32 model (exact dequantization) and, independently, transformers' on the same file.
    row["float32_llama_cpp_top1"] = agreement(exact, theirs)
    row["transformers_llama_cpp_top1"] = transformers_agreement(source, ids, theirs)
    print(table_row(row), flush=True)
    return row


def transformers_agreement(source: Path, ids: list[int], theirs: torch.Tensor) -> float | None:
    """Top-1 agreement with llama.cpp of transformers' float32 model read from the same GGUF file."""
    try:
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=torch.float32)
    with torch.no_grad():
        return agreement(model(torch.tensor([ids])).logits[0], theirs)


def check(name: str, source: Path, types: list[str], out: Path) -> list[dict]:
    model, tokenizer, _ = read_model(source)
    ids = tokenizer.encode(TEXT)[:N_TOKENS]
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0]
    rows = []
    for dtype in types:
        path = out / f"{name}-{dtype}.gguf"
        start = time.perf_counter()
        write_gguf(model, tokenizer, path, dtype=dtype)
        written_s = time.perf_counter() - start
        back, _, _ = read_model(path)
        with torch.no_grad():
            ours = back(torch.tensor([ids]))[0]
        theirs, same_tokens = llama_cpp_logits(path, ids, TEXT, tokenizer.add_bos)
        rows.append(dict(
            model=name, type=dtype, tokens=len(ids), export_mb=round(size_mb(path), 1), source_mb=round(size_mb(source), 1),
            write_s=round(written_s, 1), llama_cpp_top1=agreement(ours, theirs), cosine=cosine(ours, theirs),
            same_tokens=same_tokens, source_top1=agreement(ours, reference)))
        print(table_row(rows[-1]), flush=True)
        path.unlink()
    return rows


COLUMNS = ("model", "type", "tokens", "export_mb", "source_mb", "llama_cpp_top1", "cosine", "same_tokens", "source_top1",
           "float32_llama_cpp_top1", "transformers_llama_cpp_top1")


def table_row(row: dict) -> str:
    return "  ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) and c.endswith(("top1", "cosine"))
                     else str(row.get(c, "-")) for c in COLUMNS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="source,q4_0",
                   help=f"comma-separated: source (the GGUF file itself), GGUF types of {', '.join(GGUF_TYPES)}")
    p.add_argument("--source-tokens", type=int, default=512, help="teacher-forced tokens of the source rows")
    p.add_argument("--models", default="smollm2,gemma3,tiny", help="comma-separated: smollm2, gemma3, tiny")
    p.add_argument("--tiny-checkpoint", type=Path, default=ROOT / "runs/pretrain-tiny/latest")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/export_check.json")
    args = p.parse_args()
    found = sources(args.tiny_checkpoint)
    wanted = args.models.split(",")
    for missing in [m for m in wanted if m not in found or not found[m].exists()]:
        print(f"skipping {missing}: not installed (gemma3: `plinth pull gemma3-270m`; tiny: "
              "`plinth pretrain recipes/pretrain-tiny.yaml`, or pass --tiny-checkpoint)")
    print("  ".join(COLUMNS))
    types = args.types.split(",")
    exports = [t for t in types if t != "source"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            if name not in found or not found[name].exists():
                continue
            if "source" in types and found[name].suffix == ".gguf":  # llama.cpp reads only the GGUF sources
                rows.append(check_source(name, found[name], args.source_tokens))
            if exports:
                rows += check(name, found[name], exports, Path(tmp))
    write_atomic(args.out, json.dumps({"text": TEXT, "source_text": "plinth/model.py", "rows": rows}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
