"""Image generation side by side: does plinth's diffusion transformer draw the class it is asked
for, how close are its images to Fashion-MNIST's, and is it fast?

    .venv/bin/python benchmarks/imagine.py quality --model runs/dit-fashion/final \\
        --classifier runs/bench/vision/vit-pretrained-full-1/final
    .venv/bin/python benchmarks/imagine.py quality --model runs/dit-fashion/final \\
        --classifier runs/bench/vision/vit-pretrained-full-1/final --per-class 20 --unseen-per-prompt 1 \\
        --steps 8 --speed-batches 16 --speed-repeats 1                  # a quick check, about a minute
    .venv/bin/python benchmarks/imagine.py speed                        # plinth vs diffusers, images/s

`quality` judges generated images with the Fashion-MNIST classifier of the vision benchmark (a
plinth ViT fine-tuned with a classification head; its accuracy on the real test images is printed
beside, as the ceiling of what it can confirm):
- class consistency: `--per-class` images (default 1,000) from each class's simplest training
  caption ("a t-shirt", the first of the run's captions per class); the share the classifier labels
  as that class, per class and overall (a generator ignoring the prompt scores about 10%);
- prompts worded unlike any training caption, `--unseen-per-prompt` images each: names kept out
  of training in phrasings kept out of training (captions.FASHION_UNSEEN_NAMES in
  UNSEEN_PHRASINGS), and the training names in those phrasings; the same share;
- Fréchet distance in the plinth ViT classifier's features (the pooled class-token features its
  head reads; not FID, which uses an Inception network on natural images) between the images of
  the consistency set and the 10,000 Fashion-MNIST test images, beside the same distance from as
  many training images (the floor: real images of the same distribution) and from as many images
  of independent uniform random pixels, 0-255 (the noise baseline). Every set compared with the
  test images has the same count, because the distance's estimate grows as the count shrinks. The
  matrix square root is scipy.linalg.sqrtm in float64;
- sampling speed: images/s of `ImageGenerator.generate` (what `plinth imagine` and the server
  call: prompt embedding and the sampler, float32) at the run's default steps and guidance (16,
  4.0), at each of `--speed-batches` images per call, median of `--speed-repeats` after a warm-up.
The images are drawn with `--steps` and `--guidance` (default: the run's), in calls of `--batch`
images, the noise seeded per call; a grid of the first 10 per class goes to runs/bench/imagine-samples.png.

`speed` trains and runs the same-size DiT in plinth (`Denoiser`, preset dit-fashion) and in
diffusers (`DiTTransformer2DModel`: width 192 as 3 heads of 64, 6 blocks, 4×4 patches of 28×28
grey images, no learned variance, adaLN-Zero) on the same Fashion-MNIST batches with the same
noise and times. diffusers' DiT is conditioned on a class label (an embedding table, with a null
class it drops 10% of labels to while training); plinth's on a 384-d sentence vector of a caption
(an MLP; the data drop 10% of them to zero, as plinth trains). diffusers' DiT also embeds the time
and class afresh in every block, so the parameter counts differ: both are printed. A training step
is forward, mean squared error of the velocity, backward and a fused AdamW step under bfloat16
autocast and plinth's CPU training settings (`training_runtime`), as `plinth pretrain` runs it;
the moving average of the weights, which plinth's loop updates after each step, is left out of
both. Sampling is one forward pass of `--sample-batch` rows in inference mode (a guided step runs
twice the images: prompted and unprompted) with float32 products on oneDNN (plinth/onednn.py, as
`ImageGenerator.generate` samples; both models run under it), in float32 and under bfloat16
autocast (as training's sample grids are drawn). Interleaved rounds, medians, plinth ÷ diffusers. diffusers is a benchmark dependency only,
installed beside the project (`import_diffusers` says why):

    .venv/bin/pip install --no-deps --target runs/bench/deps diffusers==0.42.1

Both use every core the process may run on and write JSON under runs/bench/.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import plinth  # noqa: E402
from plinth.adapt.classify import pool  # noqa: E402
from plinth.config import preset  # noqa: E402
from plinth.hub import DEFAULT_EMBEDDER  # noqa: E402
from plinth.retrieval.embedder import Embedder  # noqa: E402
from plinth.onednn import float32_on_onednn  # noqa: E402
from plinth.train.loop import training_runtime  # noqa: E402
from plinth.vision.captions import (FASHION_CLASS_NAMES, FASHION_UNSEEN_NAMES, UNSEEN_PHRASINGS,  # noqa: E402
                                    class_captions)
from plinth.vision.diffusion import Denoiser, noised, prompt_dropout, velocity_target  # noqa: E402
from plinth.vision.images import FASHION_MNIST_LABELS, ImagePrep, fashion_mnist  # noqa: E402
from plinth.vision.imagine import ImageGenerator, image_grid, prompt_vectors  # noqa: E402

OUT = ROOT / "runs" / "bench"
DEPS = OUT / "deps"  # diffusers (and the vision benchmark's timm, torchvision) for benchmarks only
FEATURE_BATCH = 256  # images per classifier pass
TORCHVISION_SCHEMAS = None  # see import_diffusers


def use_all_cores():
    torch.set_num_threads(len(os.sched_getaffinity(0)))


def write(name: str, data: dict):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=2))
    print(f"wrote {OUT / name}")


# ---------------------------------------------------------------------------------------- quality

class Judge:
    """The Fashion-MNIST classifier: labels and pooled features (what its head reads) of uint8 images."""

    def __init__(self, path: str):
        loaded = plinth.load(path)
        if not loaded.model.config.is_image or loaded.head is None or loaded.head.labels is None:
            sys.exit(f"{path} is not an image classifier; give a run of `plinth finetune recipes/vit-fashion.yaml` "
                     "(benchmarks/vision.py transfer writes runs/bench/vision/vit-pretrained-full-1)")
        self.net, self.head, self.labels = loaded.model.eval(), loaded.head, loaded.head.labels
        self.prep = ImagePrep.from_config(self.net.config)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 (N, C, S, S) → float64 features (N, dim) and predicted label ids (N,)."""
        features, predicted = [], []
        for i in range(0, len(pixels), FEATURE_BATCH):
            hidden = self.net.features(images=self.prep.normalize(pixels[i:i + FEATURE_BATCH]))
            pooled = pool(hidden, None, self.head.pooling).float()
            features.append(pooled)
            predicted.append(self.head.linear(pooled).argmax(-1))
        return torch.cat(features).double().numpy(), torch.cat(predicted)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between Gaussians fitted to two feature sets."""
    from scipy.linalg import sqrtm
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real  # rounding leaves tiny imaginary parts on a real product
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def draw(generator: ImageGenerator, prompts: list[str], args, seed: int, what: str) -> tuple[torch.Tensor, float]:
    """uint8 images, one per prompt, in calls of `args.batch` (call n's noise from seed + n), and
    the seconds they took."""
    out, start = [], time.perf_counter()
    calls = range(0, len(prompts), args.batch)
    for n, i in enumerate(calls):
        out.append(generator.generate(prompts[i:i + args.batch], seed=seed + n, steps=args.steps,
                                      guidance=args.guidance))
        if (n + 1) % 10 == 0 or n + 1 == len(calls):
            done, seconds = min(i + args.batch, len(prompts)), time.perf_counter() - start
            print(f"  {what}: {done:,}/{len(prompts):,} images, {done / seconds:.1f} img/s", flush=True)
    return torch.cat(out), time.perf_counter() - start


def consistency(hits: torch.Tensor, asked: torch.Tensor, classes: int) -> dict:
    """Share of images labelled as the class they were asked for (`hits`, per image; `asked`, the
    class): overall (± binomial standard error) and per class."""
    hits = hits.double()
    share = float(hits.mean())
    return {"share": share, "stderr": (share * (1 - share) / len(hits)) ** 0.5, "n": len(hits),
            "per_class": [float(hits[asked == c].mean()) for c in range(classes)]}


def sampling_speed(generator: ImageGenerator, prompts: list[str], batches: list[int], repeats: int) -> dict:
    """Images/s of `generate` at the run's default steps and guidance, per batch size: median of
    `repeats` calls after a warm-up call."""
    rates = {}
    for size in batches:
        chosen = [prompts[i % len(prompts)] for i in range(size)]
        generator.generate(chosen, seed=0)
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            generator.generate(chosen, seed=1 + r)
            times.append(time.perf_counter() - start)
        rates[size] = size / statistics.median(times)
    return rates


UNSEEN = {"unseen names, unseen phrasings": FASHION_UNSEEN_NAMES,
          "training names, unseen phrasings": FASHION_CLASS_NAMES}  # each in captions.UNSEEN_PHRASINGS


def quality(args):
    use_all_cores()
    generator, judge = ImageGenerator.load(args.model), Judge(args.classifier)
    settings = generator.settings
    args.steps = settings["steps"] if args.steps is None else args.steps
    args.guidance = settings["guidance"] if args.guidance is None else args.guidance
    classes = settings["classes"]
    if judge.labels != FASHION_MNIST_LABELS or classes != FASHION_MNIST_LABELS:
        sys.exit(f"this benchmark judges Fashion-MNIST generators with a Fashion-MNIST classifier; the classifier "
                 f"has labels {judge.labels}, the generator classes {classes}")
    print(f"generator {args.model}: steps {args.steps}, guidance {args.guidance}; judge {args.classifier}; "
          f"{torch.get_num_threads()} threads", flush=True)
    result = {"model": str(args.model), "classifier": str(args.classifier), "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "batch": args.batch, "per_class": args.per_class,
              "unseen_per_prompt": args.unseen_per_prompt, "threads": torch.get_num_threads(), "classes": classes}

    # Class consistency from each class's simplest training caption; these images also feed the distance.
    simplest = [per_class[0] for per_class in settings["captions"]]
    asked = torch.arange(len(classes)).repeat_interleave(args.per_class)
    images, seconds = draw(generator, [simplest[c] for c in asked], args, args.seed, "training captions")
    features, predicted = judge(images)
    result.update(prompts=simplest, consistency=consistency(predicted == asked, asked, len(classes)),
                  unseen={}, sampling={"consistency_set_img_s": len(images) / seconds, "seconds": seconds})
    first = torch.cat([images[asked == c][:10] for c in range(len(classes))])  # one row per class
    OUT.mkdir(parents=True, exist_ok=True)
    image_grid(first, min(10, args.per_class)).save(OUT / "imagine-samples.png")

    # Prompts worded unlike any training caption (any that matches one is left out).
    trained = {caption for per_class in settings["captions"] for caption in per_class}
    for k, (name, names) in enumerate(UNSEEN.items()):
        wordings = [[p for p in per_class if p not in trained] for per_class in class_captions(names, UNSEEN_PHRASINGS)]
        pairs = [(p, c) for c, per_class in enumerate(wordings) for p in per_class
                 for _ in range(args.unseen_per_prompt)]
        drawn, _ = draw(generator, [p for p, _ in pairs], args, args.seed + 100_000 * (k + 1), name)
        wanted = torch.tensor([c for _, c in pairs])
        result["unseen"][name] = {"prompts": wordings, **consistency(judge(drawn)[1] == wanted, wanted, len(classes))}

    test_pixels, test_labels = (torch.from_numpy(a) for a in fashion_mnist("test"))
    test_features, test_predicted = judge(test_pixels[:, None])
    result["classifier_test_accuracy"] = consistency(test_predicted == test_labels, test_labels, len(classes))
    result["frechet"] = distances(judge, features, test_features, args.seed)
    rates = sampling_speed(generator, simplest, args.speed_batches, args.speed_repeats)
    result["sampling"].update(default_steps=settings["steps"], default_guidance=settings["guidance"],
                              repeats=args.speed_repeats, img_s_by_batch=rates)
    print_quality(result)
    write("imagine-quality.json", result)


def distances(judge: Judge, generated: np.ndarray, test: np.ndarray, seed: int) -> dict:
    """Fréchet distance in the classifier's features from the generated images, as many training
    images and as many images of uniform random pixels to the test images."""
    count = len(generated)
    train = fashion_mnist("train")[0]
    train = torch.from_numpy(train[np.random.default_rng(seed).choice(len(train), count, replace=False)])[:, None]
    noise = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return {"features": "plinth ViT classifier, pooled (class token)", "sqrtm": "scipy.linalg.sqrtm, float64",
            "count": count, "test_images": len(test), "noise": "independent uniform random pixels, 0-255",
            "distance": {"generated": frechet_distance(generated, test),
                         "training images (floor)": frechet_distance(judge(train)[0], test),
                         "uniform random pixels": frechet_distance(judge(noise)[0], test)}}


def print_quality(r: dict):
    print(f"\nClass consistency: share of images the classifier labels as the prompt's class "
          f"({r['per_class']:,} per class from the simplest training caption; {r['unseen_per_prompt']} per unseen "
          f"prompt; {r['steps']} steps, guidance {r['guidance']})")
    columns = [r["consistency"], *r["unseen"].values(), r["classifier_test_accuracy"]]
    print(f"| class | training caption | consistency | {' | '.join(r['unseen'])} | classifier on test images |")
    print("|---" * (2 + len(columns)) + "|")
    for c, name in enumerate(r["classes"]):
        shares = " | ".join(f"{col['per_class'][c]:.1%}" for col in columns)
        print(f"| {name} | \"{r['prompts'][c]}\" | {shares} |")
    print("| **all** | | " + " | ".join(f"**{col['share']:.1%}** ± {col['stderr']:.1%}" for col in columns) + " |")
    f = r["frechet"]
    print(f"\nFréchet distance in the plinth ViT classifier's features ({f['sqrtm']}), {f['count']:,} images "
          f"in each set against the {f['test_images']:,} test images")
    print("| images | distance |\n|---|---|")
    for name, value in f["distance"].items():
        print(f"| {name} | {value:.2f} |")
    s = r["sampling"]
    print(f"\nSampling: {s['consistency_set_img_s']:.1f} img/s over the consistency set ({r['steps']} steps, "
          f"guidance {r['guidance']}, {r['batch']} images per call); generate() at the run's defaults "
          f"({s['default_steps']} steps, guidance {s['default_guidance']}, float32), median of {s['repeats']}:")
    print("| images per call | img/s |\n|---|---|")
    for size, rate in s["img_s_by_batch"].items():
        print(f"| {size} | {rate:.1f} |")


# ------------------------------------------------------------------------------------------ speed

def import_diffusers():
    """diffusers checks for transformers, whose import of torchvision (runs/bench/deps holds the
    vision benchmark's CUDA-built torchvision 0.28.0) fails registering two compiled operators with
    this machine's CPU torch. As in benchmarks/vision.py's import_timm, declaring those two schemas
    first lets the Python parts import; a DiT uses no torchvision operator. Installed into the
    project's environment, that torchvision would break `import transformers`, hence runs/bench/deps."""
    sys.path.insert(0, str(DEPS))
    try:
        importlib.import_module("torchvision")
    except ImportError:
        pass
    except RuntimeError:
        # Kept for the process's life: diffusers imports its models (and so torchvision) lazily,
        # after this returns, and a collected Library takes its definitions with it.
        global TORCHVISION_SCHEMAS
        TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
        TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def flow_batches(count: int, size: int, captions: torch.Tensor, dropout: float = 0.1) -> list[dict]:
    """Fashion-MNIST training batches as flow-matching pairs: noisy images, times, labels, the
    label's caption vector (10% dropped to zero, as plinth trains) and the velocity target."""
    images, labels = fashion_mnist("train")
    prep = ImagePrep.from_config(preset("dit-fashion"))
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        x0 = prep.normalize(torch.from_numpy(images[i * size:(i + 1) * size])[:, None])
        y = torch.from_numpy(labels[i * size:(i + 1) * size])
        noise, t = torch.randn(x0.shape, generator=generator), torch.rand(size, generator=generator)
        out.append({"x": noised(x0, noise, t), "t": t, "labels": y, "v": velocity_target(x0, noise),
                    "prompts": prompt_dropout(captions[y], dropout, generator)})
    return out


def plinth_dit(prompt_dim: int):
    model = Denoiser(preset("dit-fashion"), prompt_dim)
    model.init_weights()
    return (model,
            lambda b: model((b["x"], b["t"], b["prompts"]), targets=b["v"]) / b["v"].numel(),
            lambda b: model.velocity(b["x"], b["t"], b["prompts"]))


def diffusers_dit(diffusers):
    c = preset("dit-fashion")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.n_heads, attention_head_dim=c.dim // c.n_heads, in_channels=c.channels,
        out_channels=c.channels, num_layers=c.n_layers, sample_size=c.image_size, patch_size=c.patch_size,
        num_embeds_ada_norm=10, norm_type="ada_norm_zero", activation_fn="gelu")  # plinth's exact GELU, not tanh

    def forward(b):  # diffusers' timesteps are on DiT's 0..1000 scale, as plinth's time features are
        return model(b["x"], timestep=b["t"] * 1000, class_labels=b["labels"]).sample

    return model, lambda b: torch.nn.functional.mse_loss(forward(b).float(), b["v"]), forward


def train_rate(model, loss_of, data, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    start = time.perf_counter()
    for b in data[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(data[0]["x"]) / (time.perf_counter() - start)


@torch.inference_mode()
def sample_rate(model, forward, data, steps: int, bfloat16: bool) -> float:
    model.eval()
    start = time.perf_counter()
    for b in data[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            forward(b)
    return steps * len(data[0]["x"]) / (time.perf_counter() - start)


PARTS = {"train": "train step, bf16 autocast", "sample-fp32": "sampling forward, float32",
         "sample-bf16": "sampling forward, bf16 autocast"}


def speed(args):
    diffusers = import_diffusers()
    if diffusers is None:
        sys.exit(f"diffusers is not installed (a benchmark-only anchor): "
                 f".venv/bin/pip install --no-deps --target {DEPS} diffusers==0.42.1")
    use_all_cores()
    torch.manual_seed(0)
    embedder = Embedder.load(DEFAULT_EMBEDDER)
    captions = prompt_vectors(embedder, [per_class[0] for per_class in class_captions(FASHION_CLASS_NAMES)])
    train_data = flow_batches(args.steps + 2, args.batch, captions)
    sample_data = flow_batches(args.steps + 2, args.sample_batch, captions, dropout=0.0)
    engines = {"plinth": plinth_dit(embedder.dimensions), "diffusers": diffusers_dit(diffusers)}
    results = {name: {part: [] for part in PARTS} for name in engines}

    def measure(model, loss_of, forward, steps):
        with training_runtime():  # what `plinth pretrain` runs under
            train = train_rate(model, loss_of, train_data, steps)
        with float32_on_onednn():  # what `ImageGenerator.generate` samples under
            return {"train": train,
                    "sample-fp32": sample_rate(model, forward, sample_data, steps, bfloat16=False),
                    "sample-bf16": sample_rate(model, forward, sample_data, steps, bfloat16=True)}

    for engine in engines.values():  # warm-up: first calls pay for kernel set-up
        measure(*engine, 2)
    for _ in range(args.rounds):
        for name, engine in engines.items():
            for part, rate in measure(*engine, args.steps).items():
                results[name][part].append(rate)
    medians = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _, _) in engines.items()}
    print(f"DiT {params['plinth']:,} (plinth, 384-d prompt vector) / {params['diffusers']:,} (diffusers "
          f"{diffusers.__version__}, class labels) parameters; train batch {args.batch}, sampling batch "
          f"{args.sample_batch}; {torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians)")
    print(f"| {'':32} | plinth img/s | diffusers img/s | plinth ÷ diffusers |\n|---|---|---|---|")
    for part, label in PARTS.items():
        p, d = medians["plinth"][part], medians["diffusers"][part]
        print(f"| {label:32} | {p:12.0f} | {d:15.0f} | {p / d:17.2f}× |")
    write("imagine-speed.json", {"diffusers": diffusers.__version__, "batch": args.batch,
                                 "sample_batch": args.sample_batch, "threads": torch.get_num_threads(),
                                 "params": params, "parts": PARTS, "rounds": results, "medians": medians})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("quality", help="class consistency, Fréchet distance in classifier features, sampling img/s")
    p.add_argument("--model", required=True, help="the image generator (e.g. runs/dit-fashion/final)")
    p.add_argument("--classifier", required=True,
                   help="a Fashion-MNIST classifier run (e.g. runs/bench/vision/vit-pretrained-full-1/final)")
    p.add_argument("--per-class", type=int, default=1000, help="images per class from its training caption")
    p.add_argument("--unseen-per-prompt", type=int, default=10, help="images per prompt worded unlike training")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's, 16)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the run's, 4.0)")
    p.add_argument("--batch", type=int, default=64, help="images per generate() call (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-batches", type=int, nargs="+", default=[1, 16, 64],
                   help="images per call for the sampling speed (default 1 16 64)")
    p.add_argument("--speed-repeats", type=int, default=3)
    p.set_defaults(func=quality)
    p = sub.add_parser("speed", help="plinth vs diffusers DiT: training and sampling images/s")
    p.add_argument("--batch", type=int, default=128, help="training batch (the recipe's)")
    p.add_argument("--sample-batch", type=int, default=256, help="rows per sampling forward (128 images, guided)")
    p.add_argument("--steps", type=int, default=10, help="batches per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(func=speed)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
