"""The image half end to end on 8×8 grey images: patches, MAE masks and loss, an image pretraining
run (kill -9 then --resume, 2-process DDP), fine-tuning an image classifier (full, random init,
a class-balanced share of labels, probe, LoRA), classifying images from Python and the command
line, `plinth plot` of an MAE run, and a short real Fashion-MNIST fine-tune."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import plinth
from plinth.adapt.adapted import read_adapted
from plinth.adapt.finetune import FinetuneRecipe, build_image_data, finetune
from plinth.config import preset
from plinth.errors import PlinthError
from plinth.loss import IGNORE
from plinth.model import Transformer
from plinth.vision.images import FASHION_MNIST_LABELS, fashion_mnist_available
from plinth.vision.mae import MaskedAutoencoder, PixelDecoder, decoder_config, random_masks, visible
from plinth.vision.patches import patchify, unpatchify
from plinth.vision.pretrain import MaeRecipe, pretrain_mae
from plinth.weights.native import write_model

CLASSES = ("dark", "left", "right")  # a dark image, a bright left half, a bright right half
# A tiny MAE run: 48 images (8 held out), batches of 8, a one-block decoder; float32 so runs compare.
MAE = dict(objective="mae", preset="vit-tiny", val_images=8, batch_size=8, max_steps=8, warmup_steps=2, lr=3e-3,
           save_every=4, eval_every=4, eval_batches=1, log_every=1000, decoder_dim=32, decoder_layers=1,
           decoder_heads=2, autocast="none")
# Fine-tuning: 36 training and 12 held-out images; a ViT this small at init std 0.02 needs ~100 steps.
FINETUNE = dict(task="classify", method="full", labels=list(CLASSES), val_examples=12, batch_size=8, max_steps=100,
                lr=3e-3, warmup_steps=2, weight_decay=0.0, eval_every=50, save_every=50, log_every=1000,
                activation_checkpointing=False, autocast="none")


def quiet(*_):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread_no_peak_probe():
    """Tiny models on a busy 2-core machine: a second OpenMP thread only waits (steps take 8 ms, not
    up to 1 s). And the loop's MFU denominator (a 2048² matmul timed 6 times, ~1.2 s per run) is
    a constant here: it only scales the logged `mfu`, which no test reads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("plinth.train.loop.measured_peak_flops", lambda *args, **kwargs: 1e11)
        yield
    torch.set_num_threads(threads)


def picture(kind: str, rng, noise: float = 8.0) -> np.ndarray:
    a = np.full((8, 8), 25.0)
    if kind == "left":
        a[:, :4] = 225
    elif kind == "right":
        a[:, 4:] = 225
    return np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)


def write_images(root: Path, per_class: int = 16, seed: int = 0) -> Path:
    """root/CLASS/i.png: labelled for fine-tuning, and every image under root for MAE."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(picture(kind, rng)).save(root / kind / f"{i}.png")
    return root


def run(*command, **options):
    """A command in a fresh process (one OpenMP thread, as above)."""
    return subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **options)


def mae_recipe(tmp_path, images, name, **fields) -> dict:
    return {**MAE, "name": name, "data": str(images), "out_dir": str(tmp_path / name), **fields}


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def losses(run_dir: Path, key="loss") -> list:
    return [json.loads(line).get(key) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors(folder: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(folder / name))


def fresh_vit(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("vit-tiny", **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


def finetune_recipe(tmp_path, images, base, **fields) -> FinetuneRecipe:
    return FinetuneRecipe(**{**FINETUNE, "base": str(base), "data": str(images), "out_dir": str(tmp_path / "run"),
                             **fields})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("vision") / "images")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, images) -> Path:
    tmp = tmp_path_factory.mktemp("mae")
    pretrain_mae(MaeRecipe(**mae_recipe(tmp, images, "mae")), log=quiet)
    return tmp / "mae"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, images, mae_run) -> Path:
    """A full fine-tune of the MAE encoder on the three classes."""
    tmp = tmp_path_factory.mktemp("cls")
    return finetune(finetune_recipe(tmp, images, mae_run / "final"), log=quiet)


# ---- patches, masks, the encoder's visible patches ------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip_and_patch_order(channels):
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    p = patchify(x, 2)
    assert p.shape == (2, 16, 4 * channels)
    assert torch.equal(unpatchify(p, 2, channels), x)
    # patch k = 6 is grid row 1, column 2: pixels rows 2-3, columns 4-5, each pixel's channels together
    expected = x[1, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[1, 6], expected)
    assert not torch.equal(p[1, 5], expected)


def test_random_masks_hide_a_fixed_share_per_row_reproducibly():
    masks = random_masks(6, 16, 0.75, torch.Generator().manual_seed(3))
    hidden = masks != IGNORE
    assert hidden.sum(1).tolist() == [12] * 6  # round(16 × 0.75) in every row
    assert torch.equal(masks[hidden], torch.arange(16).expand(6, -1)[hidden])  # a hidden patch's target: its index
    assert len({tuple(row.tolist()) for row in hidden}) == 6  # each row its own draw
    assert torch.equal(masks, random_masks(6, 16, 0.75, torch.Generator().manual_seed(3)))
    assert not torch.equal(masks, random_masks(6, 16, 0.75, torch.Generator().manual_seed(4)))
    assert random_masks(2, 49, 0.5, torch.Generator().manual_seed(0)).ne(IGNORE).sum(1).tolist() == [24, 24]
    keep = visible(masks)
    assert keep.shape == (6, 4)
    for row, kept in zip(hidden, keep):
        assert kept.tolist() == torch.nonzero(~row).flatten().tolist()


@pytest.mark.parametrize("position", ["sincos2d", "learned"])
@torch.no_grad()
def test_encoder_sees_only_the_kept_patches(position):
    model = fresh_vit(position=position)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = random_masks(2, 16, 0.75, torch.Generator().manual_seed(0))
    keep = visible(masks)
    out = model.features(images=x, keep=keep)
    assert out.shape == (2, 1 + 4, 32)
    hidden_patch, visible_patch = int(masks[0][masks[0] != IGNORE][0]), int(keep[0, 0])

    def poked(patch):  # image 0 with one patch's four pixels changed
        y = patchify(x, 2)
        y[0, patch] += 3.0
        return unpatchify(y, 2, 1)

    assert torch.equal(model.features(images=poked(hidden_patch), keep=keep), out)
    changed = model.features(images=poked(visible_patch), keep=keep)
    assert (changed[0] - out[0]).abs().max() > 1e-3 and torch.equal(changed[1], out[1])
    assert model.features(images=x).shape == (2, 17, 32)  # no keep: every patch, after the class token
    # the kept patches carry their own positions: the full embedding's class token and those patches
    full = model._embed_image(x, None)
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)
    assert torch.equal(model._embed_image(x, keep), full[torch.arange(2)[:, None], rows])


@torch.no_grad()
def test_bfloat16_attention_by_matmuls_is_bidirectional_attention():
    model = fresh_vit()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    full = model.features(images=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # short bf16 rows: Attention._by_matmuls
        fast = model.features(images=x).float()
    torch.testing.assert_close(fast, full, atol=0.1, rtol=0.05)
    q, k, v = torch.randn(3, 2, 2, 17, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    attn = model.layers[0].attn
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=attn.scale)
    torch.testing.assert_close(attn._by_matmuls(q, k, v).float(), expected, atol=0.03, rtol=0.03)


# ---- the masked autoencoder -----------------------------------------------------------------------
def stripes(count: int, seed: int = 0) -> torch.Tensor:
    """Normalised (count, 1, 8, 8) images of three kinds (vertical, horizontal stripes, checks):
    each 2×2 patch tells its image's kind, so hidden patches are predictable from visible ones."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    kinds = torch.stack([j % 2, i % 2, (i + j) % 2]).float() * 1.6 - 0.8  # (3, 8, 8)
    return (kinds[torch.arange(count) % 3] + 0.03 * torch.randn(count, 8, 8, generator=g))[:, None]


def tiny_mae(seed=0) -> MaskedAutoencoder:
    encoder = fresh_vit(seed).train()
    decoder = PixelDecoder(decoder_config(encoder.config, 32, 1, 2), encoder.config.dim)
    decoder.init_weights()
    return MaskedAutoencoder(encoder, decoder)


def test_mae_loss_is_over_hidden_patches_only():
    model = tiny_mae().eval()
    x = stripes(4)
    masks = random_masks(4, 16, 0.75, torch.Generator().manual_seed(0))
    hidden = masks != IGNORE
    with torch.no_grad():
        loss = model(x, targets=masks)
        by_hand = (model.predict(x, masks) - model.targets(x)).pow(2).mean(-1)[hidden].sum()
        torch.testing.assert_close(loss, by_hand)
        targets = model.targets(x)
        model.targets = lambda images: torch.where(hidden[..., None], targets, targets + 5.0)  # visible ones moved
        assert torch.equal(model(x, targets=masks), loss)
        model.targets = lambda images: torch.where(hidden[..., None], targets + 5.0, targets)  # hidden ones moved
        assert model(x, targets=masks) > loss + 1.0


def test_mae_learns_a_toy_set():
    torch.manual_seed(0)
    model = tiny_mae()
    x = stripes(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g, curve = torch.Generator().manual_seed(0), []
    for _ in range(150):
        masks = random_masks(32, 16, 0.75, g)
        loss = model(x, targets=masks) / (masks != IGNORE).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(float(loss.detach()))
    # A blinded encoder (the decoder predicting the mean patch of the three kinds) ends at 0.65 of the
    # start; this ends near 0.001 of it.
    assert sum(curve[-10:]) / 10 <= 0.25 * curve[0], curve[::15]


# ---- image pretraining runs -----------------------------------------------------------------------
def test_image_run_killed_then_resumed_is_bit_exact(tmp_path, images):
    from plinth.cli import main
    steps = dict(max_steps=80, save_every=5, eval_every=10)
    pretrain_mae(MaeRecipe(**mae_recipe(tmp_path, images, "full", **steps)), log=quiet)
    recipe = write_recipe(tmp_path / "killed.yaml", **mae_recipe(tmp_path, images, "killed", **steps))
    proc = subprocess.Popen([sys.executable, "-m", "plinth", "pretrain", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = tmp_path / "killed" / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(tmp_path / "killed")) < 80
    assert main(["pretrain", str(recipe), "--resume"]) == 0  # the command picks the MAE recipe (objective: mae)
    full, resumed = tmp_path / "full" / "final", tmp_path / "killed" / "final"
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # exactly, step for step
    assert losses(tmp_path / "killed", "val_loss") == losses(tmp_path / "full", "val_loss")
    for name in ("model.safetensors", "mae_decoder.safetensors"):
        a, b = tensors(full, name), tensors(resumed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ddp_image_run_equals_one_process(tmp_path, images, mae_run):
    recipe = write_recipe(tmp_path / "ddp.yaml", **mae_recipe(tmp_path, images, "ddp"))
    done = run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "plinth", "pretrain",
               recipe, "--dist", "ddp")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("checkpoint:") == 1  # only rank 0 reports
    ddp = tmp_path / "ddp"
    assert losses(ddp) == pytest.approx(losses(mae_run), rel=1e-5)
    assert [v for v in losses(ddp, "val_loss") if v] == pytest.approx([v for v in losses(mae_run, "val_loss") if v],
                                                                       rel=1e-5)
    for name in ("model.safetensors", "mae_decoder.safetensors"):
        a, b = tensors(ddp / "final", name), tensors(mae_run / "final", name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_plot_of_an_mae_run_draws_curves_and_reconstructions(mae_run):
    from plinth.cli import main
    from plinth.vision.pretrain import read_mae
    assert main(["plot", str(mae_run)]) == 0
    for name in ("curves.png", "reconstructions.png"):
        with Image.open(mae_run / name) as png:
            assert png.format == "PNG" and png.width > 100 and png.height > 100
    model, settings = read_mae(mae_run / "final")
    assert settings["mask_ratio"] == 0.75
    x = stripes(2)
    masks = random_masks(2, 16, 0.75, torch.Generator().manual_seed(0))
    masked, rebuilt = model.reconstruct(x, masks)
    hidden = (masks != IGNORE)[..., None]
    assert torch.equal(patchify(masked, 2), patchify(x, 2).masked_fill(hidden, 0.0))  # hidden patches blanked
    assert torch.equal(torch.where(hidden, 0.0, patchify(rebuilt, 2)), torch.where(hidden, 0.0, patchify(x, 2)))
    assert not torch.equal(patchify(rebuilt, 2)[hidden.expand(-1, -1, 4)], patchify(x, 2)[hidden.expand(-1, -1, 4)])


# ---- fine-tuning an image classifier --------------------------------------------------------------
def test_full_finetune_of_the_mae_encoder_classifies(classifier, mae_run):
    metrics = [json.loads(line) for line in (classifier.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 100 and metrics[-1]["val_acc"] >= 0.9  # 12 held-out images; chance is 1/3
    assert metrics[-1]["val_loss"] < 0.5 * metrics[0]["loss"]
    files = {p.name for p in classifier.iterdir()}
    assert {"model.safetensors", "config.json", "head.safetensors", "head.json", "finetune.json"} <= files
    assert json.loads((classifier / "finetune.json").read_text())["base"] == str((mae_run / "final").resolve())
    assert json.loads((classifier / "head.json").read_text())["pooling"] == "first"  # auto: the class token
    before = tensors(mae_run / "final")["patch_embeddings.weight"]
    assert not torch.equal(tensors(classifier)["patch_embeddings.weight"], before)  # the encoder trained too


def test_random_init_keeps_its_init_as_the_base(tmp_path, images, mae_run):
    r = finetune_recipe(tmp_path, images, mae_run / "final", init="random", method="probe", max_steps=2)
    final = finetune(r, log=quiet)
    init = tmp_path / "run" / "init"
    assert {p.name for p in init.iterdir()} >= {"model.safetensors", "config.json"}
    assert json.loads((final / "finetune.json").read_text())["base"] == str(init.resolve())
    fresh, pretrained = tensors(init), tensors(mae_run / "final")
    assert fresh.keys() == pretrained.keys() and not torch.equal(fresh["layers.0.attn.wq.weight"],
                                                                 pretrained["layers.0.attn.wq.weight"])
    net = read_adapted(final)[0]  # a probe's checkpoint holds only the head: the backbone is init/
    assert torch.equal(net.state_dict()["layers.0.attn.wq.weight"], fresh["layers.0.attn.wq.weight"])


def test_labels_fraction_takes_a_class_balanced_share(tmp_path, images):
    config = preset("vit-tiny")
    whole = build_image_data(finetune_recipe(tmp_path, images, "unused"), config)
    half = build_image_data(finetune_recipe(tmp_path, images, "unused", labels_fraction=0.5), config)
    assert torch.equal(half.val, whole.val) and len(whole.train) == 48 - 12
    available, taken = torch.bincount(whole.labels, minlength=3), torch.bincount(half.labels, minlength=3)
    assert len(half.train) == int(taken.sum()) < len(whole.train)
    assert ((taken - 0.5 * available).abs() <= 0.5).all(), (taken, available)
    held = {bytes(image.numpy()) for image in whole.val}
    assert not any(bytes(image.numpy()) in held for image in half.train)  # never a held-out image


def test_keep_patches_trains_on_a_drawn_share_of_each_image_and_evaluates_on_all(tmp_path, images):
    from plinth.adapt.finetune import build_model
    r = finetune_recipe(tmp_path, images, "unused", keep_patches=0.5)
    data = build_image_data(r, preset("vit-tiny"))  # 16 patches: 8 run per training image
    x, y = data.batch(step=3, micro=0)
    kept = y[:, 1:]
    assert kept.shape == (8, 8) and data.tokens_per_image == 8 + 1
    assert ((kept >= 0) & (kept < 16)).all() and (kept.diff(dim=1) > 0).all()  # distinct patches, in order
    assert len({tuple(row) for row in kept.tolist()}) > 1  # drawn per image
    assert torch.equal(data.batch(step=3, micro=0)[1], y)  # drawn from the step: a resumed run draws the same
    val_x, val_y = next(data.val_batches())
    assert val_y.shape[1] == 1  # evaluation sees whole images
    model = build_model(r, fresh_vit())
    # The patches that do not run cannot change the loss: overwrite them with noise.
    patches = patchify(x, 2)
    dropped = torch.ones(8, 16, dtype=torch.bool).scatter_(1, kept, False)
    noisy = unpatchify(torch.where(dropped[..., None], torch.randn_like(patches), patches), 2, 1)
    with torch.no_grad():
        loss = model(x, targets=y)
        assert torch.equal(model(noisy, targets=y), loss)
        assert not torch.equal(model(noisy, targets=y[:, :1]), model(x, targets=y[:, :1]))  # all patches: it does
    with pytest.raises(PlinthError, match="keep_patches"):
        finetune_recipe(tmp_path, images, "unused", keep_patches=0)


def test_shift_moves_each_training_image_by_its_own_offset_within_the_limit(tmp_path, images):
    r = finetune_recipe(tmp_path, images, "unused", shift=2)
    data = build_image_data(r, preset("vit-tiny"))
    plain = build_image_data(finetune_recipe(tmp_path, images, "unused"), preset("vit-tiny"))
    offsets = set()
    for step in range(40):
        moved, originals = data.batch(step, 0)[0], plain.batch(step, 0)[0]
        C, S = originals.shape[1], originals.shape[-1]
        black = plain.prep.normalize(torch.zeros(1, C, S, S, dtype=torch.uint8))[0, :, :1, :1]
        for image, original in zip(moved, originals):
            padded = black.expand(C, S + 4, S + 4).clone()
            padded[:, 2:S + 2, 2:S + 2] = original
            found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(image, padded[:, dy:dy + S, dx:dx + S])]
            assert found, "each image is its original, moved by at most 2 pixels each way"
            offsets.add(found[0])
    assert len(offsets) == 25  # every offset occurs: drawn per image
    assert torch.equal(data.batch(5, 0)[0], data.batch(5, 0)[0])  # drawn from the step: a resumed run draws the same
    val_x, _ = next(data.val_batches())
    assert torch.equal(val_x, next(plain.val_batches())[0])  # evaluation sees the images where they are
    with pytest.raises(PlinthError, match="shift"):
        finetune_recipe(tmp_path, images, "unused", shift=-1)


def test_layer_decay_gives_each_block_its_share_of_the_learning_rate(tmp_path, images):
    from plinth.adapt.finetune import build_model
    from plinth.train.loop import build_optimizer
    r = finetune_recipe(tmp_path, images, "unused", layer_decay=0.5)
    model = build_model(r, fresh_vit())  # vit-tiny: 2 blocks
    optimizer = build_optimizer(model, r)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"head.linear.weight": 1.0, "backbone.norm.weight": 1.0, "backbone.layers.1.attn.wq.weight": 0.5,
                "backbone.layers.0.mlp.w_up.weight": 0.25, "backbone.patch_embeddings.weight": 0.125,
                "backbone.class_token": 0.125}
    named = dict(model.named_parameters())
    assert {name: scale[id(named[name])] for name in expected} == expected
    assert len(scale) == len(named)  # every parameter is in a group
    with pytest.raises(PlinthError, match="layer_decay"):
        finetune_recipe(tmp_path, images, "unused", layer_decay=1.5)


@pytest.mark.parametrize("method, saved, absent", [
    ("probe", {"head.safetensors", "head.json", "finetune.json"}, {"model.safetensors", "adapter.safetensors"}),
    ("lora", {"adapter.safetensors", "head.safetensors", "finetune.json"}, {"model.safetensors"})])
def test_probe_and_lora_save_only_what_they_train(tmp_path, images, mae_run, method, saved, absent):
    r = finetune_recipe(tmp_path, images, mae_run / "final", method=method, lora_rank=4, max_steps=6)
    final = finetune(r, log=quiet)
    files = {p.name for p in final.iterdir()}
    assert saved <= files and not absent & files, files
    base = tensors(mae_run / "final")
    state = read_adapted(final)[0].state_dict()
    assert state.keys() == base.keys()
    same = all(torch.equal(state[k], base[k]) for k in base)
    assert same == (method == "probe")  # a probe leaves the encoder as it was; LoRA merges its update in
    assert set(plinth.load(str(final)).classify([str(images / "left" / "0.png")])) <= set(CLASSES)


def test_classifier_reads_pil_images_and_paths_alike(classifier, images):
    loaded = plinth.load(str(classifier))
    paths = [str(images / kind / "15.png") for kind in ("left", "right", "dark")]
    by_path = loaded.classify(paths)
    assert by_path == ["left", "right", "dark"]
    assert loaded.classify([Image.open(p) for p in paths]) == by_path
    assert loaded.classify([Image.open(paths[1]), paths[1], np.asarray(Image.open(paths[1]))]) == ["right"] * 3
    top = loaded.head.top_labels(loaded, paths, k=3)
    assert [row[0][0] for row in top] == by_path
    for row in top + loaded.head.top_labels(loaded, paths, k=2):
        probabilities = [p for _, p in row]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    assert all(abs(sum(p for _, p in row) - 1) < 1e-5 for row in top)  # all three labels: the whole softmax


# ---- the command line -----------------------------------------------------------------------------
def test_classify_command_prints_top_labels_and_names_a_bad_file(tmp_path, classifier, images, capsys):
    from plinth.cli import main
    a, b = images / "left" / "14.png", images / "right" / "14.png"
    done = run("-m", "plinth", "classify", classifier, a, b, "--top-k", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(a), str(b)]
    ranked = [line.split("\t")[1].split("  ") for line in lines]  # "LABEL P  LABEL P"
    assert all(len(row) == 2 for row in ranked)
    assert [row[0].split()[0] for row in ranked] == ["left", "right"]
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all\n")
    assert main(["classify", str(classifier), str(a), str(notes)]) == 2
    out = capsys.readouterr()
    assert "notes.png" in out.err and out.out == ""  # named, and nothing printed for the good image either


def test_eval_fashion_mnist_of_a_text_model_is_a_clear_error(tmp_path, capsys):
    from plinth.cli import main
    from tests.conftest import byte_tokenizer, tiny_model
    folder = tmp_path / "text-model"
    folder.mkdir()
    write_model(tiny_model(), folder)
    byte_tokenizer().save(folder)
    assert main(["eval", str(folder), "--tasks", "fashion-mnist", "--out", str(tmp_path / "evals")]) == 2
    assert "is not an image classifier" in capsys.readouterr().err
    assert not (tmp_path / "evals").exists() or not any((tmp_path / "evals").iterdir())  # nothing half-written


def test_settings_that_leave_nothing_to_learn_from_are_clear_errors(tmp_path, images, mae_run, classifier, capsys):
    from plinth.cli import main
    with pytest.raises(PlinthError, match="hides 0 of an image's 16 patches"):
        MaeRecipe(**mae_recipe(tmp_path, images, "none-hidden", mask_ratio=0.02)).config()
    with pytest.raises(PlinthError, match="val_examples=48 holds them all out"):
        finetune(finetune_recipe(tmp_path, images, mae_run / "final", val_examples=48), log=quiet)
    assert main(["classify", str(classifier), str(images / "left" / "0.png"), "--top-k", "0"]) == 2
    assert "--top-k 0" in capsys.readouterr().err


# ---- real data ------------------------------------------------------------------------------------
@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_short_finetune_beats_chance(tmp_path):
    from plinth.eval.tasks import EvalOptions, run_task
    base = tmp_path / "base"  # vit-tiny's blocks on 28×28 images in 16 patches of 7×7
    base.mkdir()
    write_model(fresh_vit(image_size=28, patch_size=7, pixel_mean=[0.286], pixel_std=[0.353]), base)
    r = finetune_recipe(tmp_path, "fashion-mnist", base, labels=FASHION_MNIST_LABELS, max_examples=2000,
                        val_examples=500, batch_size=32, max_steps=200, lr=1e-2, warmup_steps=10, eval_every=200,
                        save_every=200)
    final = finetune(r, log=quiet)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_acc"] > 0.5, record  # ten classes: chance is 0.1 (this run measured 0.62)
    result = run_task("fashion-mnist", plinth.load(str(final)), EvalOptions(limit=500))  # the test split
    assert result["n"] == 500 and result["chance"] == 0.1 and result["value"] > 0.5, result
    assert set(result["per_class"]) == set(FASHION_MNIST_LABELS) and 0 < result["stderr"] < 0.05
