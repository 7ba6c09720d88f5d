"""Vision side by side: does masked-autoencoder pretraining pay, and is plinth's ViT fast?

    .venv/bin/python benchmarks/vision.py speed                      # plinth vs timm, images/s
    .venv/bin/python benchmarks/vision.py transfer --mae runs/mae-fashion/final

`speed` trains and runs the same-size ViT (recipes' `vit-fashion` preset: 28×28 grey images in 4×4
patches, width 192, 6 blocks, 3 heads, class token) in plinth and in timm's `VisionTransformer`
on the same Fashion-MNIST batches: one training step is forward, cross-entropy, backward and a
fused AdamW step under bfloat16 autocast (as `plinth finetune` runs it), in interleaved rounds,
and it reports images/s and plinth ÷ timm. timm is a benchmark dependency only, installed beside
the project rather than into its environment (`import_timm` says why):

    .venv/bin/pip install --no-deps --target runs/bench/deps timm==1.0.31 torchvision==0.28.0

`transfer` fine-tunes the MAE-pretrained ViT and the same network from random weights with the
same steps, at each share of the labels and with each method, through `plinth finetune` and
`plinth eval --tasks fashion-mnist` (the 10,000 test images), and prints the table the README shows.
Both write JSON under runs/bench/.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plinth.adapt.classify import Finetuned, Head  # noqa: E402
from plinth.config import preset  # noqa: E402
from plinth.model import Transformer  # noqa: E402
from plinth.train.loop import training_runtime  # noqa: E402
from plinth.vision.images import FASHION_MNIST_LABELS, ImagePrep, fashion_mnist  # noqa: E402

OUT = ROOT / "runs" / "bench"
DEPS = OUT / "deps"  # timm and torchvision for this benchmark only (see the module docstring)


def import_timm():
    """timm imports torchvision, and PyPI's torchvision 0.28.0 (the release for torch 2.13) is built
    against CUDA torch: its compiled ops do not load with this machine's CPU torch, and torchvision's
    Python then fails registering two of them (nms, qnms). Declaring those two operator schemas first
    lets the pure-Python parts import; a ViT uses none of torchvision's compiled ops. Installed into
    the project's environment, that torchvision would break `import transformers` (which the tests
    use), hence runs/bench/deps."""
    sys.path.insert(0, str(DEPS))
    try:
        importlib.import_module("torchvision")
    except RuntimeError:
        library = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive by torch's registry
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    try:
        import timm
    except ImportError:
        return None
    return timm


def batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = fashion_mnist("train")
    prep = ImagePrep.from_config(preset("vit-fashion"))
    pixels = torch.from_numpy(images[:count * size])[:, None]
    return [(prep.normalize(pixels[i * size:(i + 1) * size]), torch.from_numpy(labels[i * size:(i + 1) * size]))
            for i in range(count)]


def plinth_vit():
    config = preset("vit-fashion")
    net = Transformer(config)
    net.to_empty(device="cpu")
    net.init_weights()
    model = Finetuned(net, Head(config.dim, FASHION_MNIST_LABELS, "first"))
    return model, lambda x, y: model(x, targets=y[:, None]) / len(y)


def timm_vit(timm):
    from timm.models.vision_transformer import VisionTransformer
    c = preset("vit-fashion")
    model = VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.channels, num_classes=10,
                              embed_dim=c.dim, depth=c.n_layers, num_heads=c.n_heads, mlp_ratio=c.ffn_dim / c.dim,
                              class_token=True, global_pool="token")
    return model, lambda x, y: torch.nn.functional.cross_entropy(model(x).float(), y)


def train_rate(model, loss_of, data, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    start = time.perf_counter()
    for x, y in data[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(data[0][0]) / (time.perf_counter() - start)


@torch.inference_mode()
def inference_rate(model, data, steps: int) -> float:
    model.eval()
    start = time.perf_counter()
    for x, _ in data[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    return steps * len(data[0][0]) / (time.perf_counter() - start)


def speed(args):
    timm = import_timm()
    if timm is None:
        sys.exit(f"timm is not installed: .venv/bin/pip install --no-deps --target {DEPS} timm==1.0.31 torchvision==0.28.0")
    torch.manual_seed(0)
    data = batches(args.steps + 2, args.batch)
    engines = {"plinth": plinth_vit(), "timm": timm_vit(timm)}
    results = {name: {"train": [], "infer": []} for name in engines}
    with training_runtime():
        for name, (model, loss_of) in engines.items():  # warm-up: first calls pay for kernel set-up
            train_rate(model, loss_of, data, 2)
            inference_rate(model, data, 2)
        for _ in range(args.rounds):
            for name, (model, loss_of) in engines.items():
                results[name]["train"].append(train_rate(model, loss_of, data, args.steps))
                results[name]["infer"].append(inference_rate(model, data, args.steps))
    medians = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in engines.items()}
    print(f"ViT {params['plinth']:,} (plinth) / {params['timm']:,} (timm) parameters, batch {args.batch}, "
          f"bfloat16 autocast, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians)")
    print(f"{'':10}{'plinth img/s':>14}{'timm img/s':>12}{'ratio':>8}")
    for part in ("train", "infer"):
        p, t = medians["plinth"][part], medians["timm"][part]
        print(f"{part:10}{p:14.0f}{t:12.0f}{p / t:7.2f}×")
    write("vision-speed.json", {"timm": timm.__version__, "batch": args.batch, "params": params,
                                "rounds": results, "medians": medians})


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def transfer(args):
    plinth = [sys.executable, "-m", "plinth"]
    rows = []
    for fraction in args.fractions:
        steps = args.steps[str(fraction)] if str(fraction) in args.steps else args.default_steps
        for method in args.methods:
            for init in ("pretrained", "random"):
                name = f"vit-{init}-{method}-{fraction:g}"
                out = OUT / "vision" / name
                if not (out / "final").exists():
                    start = time.perf_counter()
                    run([*plinth, "finetune", "recipes/vit-fashion.yaml", f"--base={args.mae}", f"--out_dir={out}",
                         f"--method={method}", f"--init={init}", f"--labels_fraction={fraction}",
                         f"--max_steps={steps}", f"--eval_every={steps}", f"--save_every={steps}",
                         f"--lr={args.lr[method]}", f"--keep_patches={args.keep.get(str(fraction), 1.0)}",
                         *(f"--{o}" for o in args.override)])
                    (out / "seconds").write_text(f"{time.perf_counter() - start:.1f}")
                evals = sorted((out / "eval").glob("eval-*/results.json"))
                if not evals:
                    run([*plinth, "eval", str(out / "final"), "--tasks", "fashion-mnist", "--out", str(out / "eval")])
                    evals = sorted((out / "eval").glob("eval-*/results.json"))
                result = json.loads(evals[-1].read_text())["tasks"]["fashion-mnist"]
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                rows.append({"fraction": fraction, "method": method, "init": init, "steps": steps,
                             "keep_patches": args.keep.get(str(fraction), 1.0),
                             "accuracy": result["value"], "stderr": result["stderr"],
                             "seconds": float((out / "seconds").read_text()),
                             "img_s": statistics.median(m["img_s"] for m in metrics)})
    saved = OUT / "vision-transfer.json"  # rows of earlier invocations (other shares or methods) are kept
    earlier = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    ran = {(r["fraction"], r["method"], r["init"]) for r in rows}
    rows = [r for r in earlier if (r["fraction"], r["method"], r["init"]) not in ran] + rows
    rows.sort(key=lambda r: (r["fraction"], ["probe", "lora", "full"].index(r["method"])))
    print_table(rows)
    write("vision-transfer.json", {"mae": str(args.mae), "rows": rows})


def print_table(rows: list[dict]):
    print("\n| labels | method | MAE-pretrained | from scratch | difference | steps | patches kept | minutes (MAE / scratch) |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["fraction"], r["method"], r["init"]): r for r in rows}
    for fraction, method in dict.fromkeys((r["fraction"], r["method"]) for r in rows):
        mae, scratch = by[(fraction, method, "pretrained")], by[(fraction, method, "random")]
        gap = mae["accuracy"] - scratch["accuracy"]
        gap_se = (mae["stderr"] ** 2 + scratch["stderr"] ** 2) ** 0.5
        print(f"| {fraction:.0%} | {method} | {mae['accuracy']:.2%} ± {mae['stderr']:.2%} | "
              f"{scratch['accuracy']:.2%} ± {scratch['stderr']:.2%} | {gap * 100:+.1f} ± {gap_se * 100:.1f} points | "
              f"{mae['steps']} | {mae.get('keep_patches', 1.0):.0%} | {mae['seconds'] / 60:.1f} / {scratch['seconds'] / 60:.1f} |")


def write(name: str, data: dict):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=2))
    print(f"wrote {OUT / name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("speed", help="plinth vs timm: training and inference images/s")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="batches per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(func=speed)
    p = sub.add_parser("transfer", help="MAE-pretrained vs from scratch, by labels share and method")
    p.add_argument("--mae", required=True, help="the MAE checkpoint (e.g. runs/mae-fashion/final)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--methods", nargs="+", default=["probe", "lora", "full"])
    p.add_argument("--steps", type=json.loads, default={"0.01": 300, "0.1": 1000, "1.0": 1200},
                   help='fine-tuning steps per labels share, as JSON (default {"0.01": 300, "0.1": 1000, "1.0": 1200})')
    p.add_argument("--default-steps", type=int, default=1000)
    # With 600 labelled images, training on half of each image's patches (another view of each image
    # at every step) lifts the pretrained encoder and not the one from random weights (docs/vision.md).
    p.add_argument("--keep", type=json.loads, default={"0.01": 0.5},
                   help='share of each training image\'s patches that runs, per labels share, as JSON (default '
                   '{"0.01": 0.5}; 1 where not given)')
    # A probe's single layer and LoRA's small adapters take larger steps than the whole network does.
    p.add_argument("--lr", type=json.loads, default={"probe": 0.01, "lora": 0.003, "full": 0.001},
                   help='learning rate per method, as JSON (default {"probe": 0.01, "lora": 0.003, "full": 0.001})')
    p.add_argument("--override", nargs="*", default=[], help="more recipe overrides, e.g. lr=0.002")
    p.set_defaults(func=transfer)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
