"""Image+text side by side: does the MAE-pretrained image encoder pay, and how fast are image
questions served beside text ones?

    .venv/bin/python benchmarks/vqa.py accuracy --mae runs/mae-shapes/final
    .venv/bin/python benchmarks/vqa.py serve --model runs/bench/vqa/vqa-pretrained/final

`accuracy` trains the recipe's two stages (recipes/vqa-easy-shapes.yaml, then recipes/vqa-easy.yaml
from its checkpoint) twice with the same steps — the image encoder from the MAE run, and the same
encoder from random weights — and evaluates both with `plinth eval --tasks easy-vqa` (exact match
on the 9,673 test questions, and on the shape answers alone); runs already done are reused, and
--override applies to both stages. Training time is both stages' median step time × steps (the
run's own measure, robust to other jobs on the machine) and their wall time.

`serve` starts `plinth serve MODEL` and sends, in rounds, 1 and 8 concurrent streamed image
questions (a test image as a data: URI with its question) mixed with as many text-only chats:
time to first token and tokens/s for each kind. Both write JSON under runs/bench/.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plinth.vision.vqa_data import vqa_records  # noqa: E402
from serve import free_port, one_client, running  # noqa: E402  (the serving benchmark's helpers)
from vision import OUT, run, write  # noqa: E402  (the vision benchmark's)

SHAPES = ("circle", "rectangle", "triangle")


def accuracy(args):
    plinth = [sys.executable, "-m", "plinth"]
    rows = []
    for init in ("pretrained", "random"):
        first, out = OUT / "vqa" / f"shapes-{init}", OUT / "vqa" / f"vqa-{init}"
        stages = [(first, ["recipes/vqa-easy-shapes.yaml", f"--image_encoder={args.mae}", f"--encoder_init={init}"]),
                  (out, ["recipes/vqa-easy.yaml", f"--base={first / 'final'}", f"--image_encoder={first / 'final'}"])]
        for folder, recipe in stages:
            if not (folder / "final").exists():
                start = time.perf_counter()
                run([*plinth, "finetune", *recipe, f"--out_dir={folder}", *(f"--{o}" for o in args.override)])
                (folder / "seconds").write_text(f"{time.perf_counter() - start:.1f}")
        evals = sorted((out / "eval").glob("eval-*/results.json"))
        if not evals:
            run([*plinth, "eval", str(out / "final"), "--tasks", "easy-vqa", "--out", str(out / "eval")])
            evals = sorted((out / "eval").glob("eval-*/results.json"))
        result = json.loads(evals[-1].read_text())["tasks"]["easy-vqa"]
        metrics = [[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                   for folder, _ in stages]
        minutes = [step_minutes(m) for m in metrics]
        walls = [folder / "seconds" for folder, _ in stages]
        rows.append({"init": init, "steps": [len(m) for m in metrics], "accuracy": result["value"],
                     "stderr": result["stderr"], "chance": result["chance"], "eval_seconds": result["seconds"],
                     "shapes": statistics.mean(result["per_answer"][a] for a in SHAPES),
                     "train_minutes_median": None if None in minutes else sum(minutes),
                     "train_minutes_wall": sum(float(w.read_text()) for w in walls) / 60
                     if all(w.is_file() for w in walls) else None,
                     "val_acc": [m[-1].get("val_acc") for m in metrics], "per_answer": result["per_answer"]})
    print("\n| image encoder | easy-VQA test exact match | shape answers | stage 1 val (shapes) | steps (stage 1 + 2) "
          "| training minutes (median step × steps / wall) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        median, wall = (f"{m:.1f}" if m else "–" for m in (r["train_minutes_median"], r["train_minutes_wall"]))
        print(f"| {'MAE-pretrained' if r['init'] == 'pretrained' else 'random init'} | {r['accuracy']:.2%} ± "
              f"{r['stderr']:.2%} | {r['shapes']:.1%} | {r['val_acc'][0]:.1%} | {' + '.join(map(str, r['steps']))} "
              f"| {median} / {wall} |")
    gap = rows[0]["accuracy"] - rows[1]["accuracy"]
    print(f"\npretraining pays {gap * 100:+.1f} ± {(rows[0]['stderr'] ** 2 + rows[1]['stderr'] ** 2) ** 0.5 * 100:.1f} "
          f"points; always answering the most common answer scores {rows[0]['chance']:.1%}")
    write("vqa-accuracy.json", {"mae": str(args.mae), "rows": rows})


def step_minutes(metrics: list[dict]) -> float | None:
    """Training time as the median step's time × steps (evaluations and checkpoints not included);
    None for a run whose metrics predate `step_s`."""
    if any("step_s" not in m for m in metrics):
        return None
    return statistics.median(m["step_s"] for m in metrics) * len(metrics) / 60


def image_messages(path: Path, question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def serve(args):
    records = vqa_records("easy-vqa", "test")
    port = free_port()
    rows = []
    command = [sys.executable, "-m", "plinth", "serve", args.model, "--port", str(port), "--embedding-model", "none"]
    with running(command, port, "/health") as (_, base):
        one_client(base, 0, 4, image_messages(*records[0][:2]))  # warm-up
        for _ in range(args.repeats):
            for clients in args.clients:
                jobs = [("image", image_messages(*records[(i * 97) % len(records)][:2])) for i in range(clients)]
                jobs += [("text", None)] * clients
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                    results = list(pool.map(lambda j: (j[1][0], one_client(base, j[0], args.max_tokens, j[1][1])),
                                            enumerate(jobs)))
                wall = time.perf_counter() - start
                for kind in ("image", "text"):
                    mine = [r for k, r in results if k == kind]
                    rows.append({"clients": clients, "kind": kind, "ttft_p50_s": statistics.median(r["ttft"] for r in mine),
                                 "tokens": sum(r["tokens"] for r in mine), "tok_s": sum(r["tokens"] for r in mine) / wall})
    print("\n| image clients (+ as many text clients) | kind | TTFT p50 s | tokens/s |")
    print("|---|---|---|---|")
    for clients in args.clients:
        for kind in ("image", "text"):
            mine = sorted((r for r in rows if r["clients"] == clients and r["kind"] == kind), key=lambda r: r["tok_s"])
            median = mine[len(mine) // 2]
            print(f"| {clients} | {kind} | {median['ttft_p50_s']:.2f} | {median['tok_s']:.1f} |")
    write("vqa-serve.json", {"model": args.model, "max_tokens": args.max_tokens, "rows": rows})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("accuracy", help="MAE-pretrained vs random-init image encoder, easy-VQA test exact match")
    p.add_argument("--mae", required=True, help="the MAE checkpoint (e.g. runs/mae-shapes/final)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides, for both stages")
    p.set_defaults(func=accuracy)
    p = sub.add_parser("serve", help="TTFT and tokens/s of image questions beside text chats")
    p.add_argument("--model", required=True, help="an image+text model (e.g. runs/bench/vqa/vqa-pretrained/final)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=serve)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
