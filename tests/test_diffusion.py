"""Image generation by flow matching on tiny configs: adaLN-Zero blocks, the noising and velocity
formulas, guidance, seeds, a stopped run resumed bit for bit, a tiny generator that learns which
blob a prompt asks for, `plinth imagine` and `plinth.load(...).imagine`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import plinth
from plinth.config import preset
from plinth.errors import PlinthError
from plinth.model import Transformer
from plinth.vision.diffusion import Denoiser, guided_velocity, noised, prompt_dropout, sample, velocity_target
from plinth.vision.diffusion_pretrain import DiffusionRecipe, pretrain_diffusion
from plinth.vision.imagine import ImageGenerator, image_grid
from tests.conftest import blob, top_minus_bottom


def denoiser(seed=0) -> Denoiser:
    torch.manual_seed(seed)
    d = Denoiser(preset("dit-tiny"), prompt_dim=6)
    d.init_weights()
    return d


def perturbed(d: Denoiser, seed=1) -> Denoiser:
    """Every weight nudged, the zero-initialised ones included: a denoiser as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return d


def test_adaln_zero_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    net = Transformer(preset("dit-tiny"))
    net.to_empty(device="cpu")
    net.init_weights()
    width = net.config.dim
    x, condition = torch.randn(3, 16, width), torch.randn(3, width)
    from plinth.model import Positions
    where = Positions(3, 16, 0, x.device)
    for block in net.layers:
        assert torch.equal(block(x, None, where, None, torch.nn.functional.silu(condition)), x)
    # The final norm is unmodulated at init: the plain LayerNorm of the patch embeddings.
    images = torch.randn(3, 1, 8, 8)
    expected = net.norm(net._embed_image(images, None))
    assert torch.allclose(net.features(images=images, condition=condition), expected, atol=1e-6)
    # Once the modulations are trained, the condition changes the output.
    perturbed_net = perturbed(net)
    assert not torch.allclose(perturbed_net.features(images=images, condition=condition),
                              perturbed_net.features(images=images, condition=condition + 1))


def test_a_model_with_adaptive_norm_requires_a_condition_and_others_refuse_one():
    net = Transformer(preset("dit-tiny"))
    net.to_empty(device="cpu")
    net.init_weights()
    with pytest.raises(ValueError, match="condition"):
        net.features(images=torch.randn(1, 1, 8, 8))
    vit = Transformer(preset("vit-tiny"))
    vit.to_empty(device="cpu")
    vit.init_weights()
    with pytest.raises(ValueError, match="condition"):
        vit.features(images=torch.randn(1, 1, 8, 8), condition=torch.randn(1, vit.config.dim))


def test_noising_and_velocity_follow_the_straight_line():
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = noised(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], noise[3])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    # The target is the derivative of the path in t: a finite difference agrees.
    step = 1e-3
    slope = (noised(x0, noise, t + step) - x_t) / step
    assert torch.allclose(slope, velocity_target(x0, noise), atol=1e-3)
    assert torch.equal(velocity_target(x0, noise), noise - x0)


def test_the_denoiser_predicts_zero_at_init_so_its_first_loss_is_the_targets_energy():
    d = denoiser()
    x, t, prompts = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 6)
    assert torch.equal(d.velocity(x, t, prompts), torch.zeros(2, 1, 8, 8))
    target = torch.randn(2, 1, 8, 8)
    assert torch.allclose(d((x, t, prompts), targets=target), target.pow(2).sum())


def test_guidance_zero_is_the_unconditional_model_and_one_the_prompted():
    d = perturbed(denoiser())
    x, t, prompts = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 6)
    plain = d.velocity(x, t, torch.zeros_like(prompts))
    prompted = d.velocity(x, t, prompts)
    assert torch.equal(guided_velocity(d, x, t, prompts, 0.0), plain)
    assert torch.equal(guided_velocity(d, x, t, prompts, 1.0), prompted)
    assert not torch.allclose(plain, prompted)
    assert torch.allclose(guided_velocity(d, x, t, prompts, 3.0), plain + 3.0 * (prompted - plain), atol=1e-5)


def test_sampling_follows_euler_steps_from_noise():
    d = perturbed(denoiser())
    noise, prompts = torch.randn(2, 1, 8, 8), torch.randn(2, 6)
    one_step = sample(d, prompts, noise, steps=1, guidance=1.0)
    assert torch.allclose(one_step, noise - d.velocity(noise, torch.ones(2), prompts), atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        sample(d, prompts, noise, steps=0)


def test_prompt_dropout_zeroes_whole_rows_at_its_rate():
    prompts = torch.ones(4000, 3)
    dropped = prompt_dropout(prompts, 0.1, torch.Generator().manual_seed(0))
    rows = (dropped == 0).all(dim=1)
    assert ((dropped == 0) | (dropped == 1)).all() and ((dropped == 0).any(dim=1) == rows).all()
    assert 0.08 < rows.float().mean() < 0.12


def test_the_moving_average_trails_the_weights_and_is_what_sampling_uses():
    d = denoiser()
    start = d.pixels.weight.detach().clone()
    with torch.no_grad():
        d.pixels.weight.add_(1.0)
    d.after_step()  # first update: decay (1 + 0) / (10 + 0) = 0.1, so the average moves 90% of the way
    average = d.average_of("pixels.weight")
    assert torch.allclose(average, start + 0.9)
    assert int(d.ema_updates) == 1
    d.use_average()
    assert torch.allclose(d.pixels.weight, start + 0.9)


def small_recipe(tmp_path, data, name, **overrides) -> DiffusionRecipe:
    values = dict(data=str(data), preset="dit-tiny", val_images=8, batch_size=16, max_steps=20, lr=3e-3,
                  warmup_steps=2, eval_every=10, save_every=5, log_every=1, out_dir=str(tmp_path / name))
    return DiffusionRecipe(**{**values, **overrides})


@pytest.fixture
def blobs(tmp_path):
    for place in ("top", "bottom"):
        (tmp_path / "blobs" / place).mkdir(parents=True)
        for i in range(16):
            blob(place, i).save(tmp_path / "blobs" / place / f"{i}.png")
    return tmp_path / "blobs"


def test_a_stopped_run_resumes_bit_for_bit(tmp_path, blobs):
    full = pretrain_diffusion(small_recipe(tmp_path, blobs, "full"), log=lambda *_: None)

    def stop_at_13(line):
        if line.startswith("step 13/"):
            raise KeyboardInterrupt  # as a Ctrl-C or kill between checkpoints would
    with pytest.raises(KeyboardInterrupt):
        pretrain_diffusion(small_recipe(tmp_path, blobs, "stopped"), log=stop_at_13)
    resumed = pretrain_diffusion(small_recipe(tmp_path, blobs, "stopped"), resume=True, log=lambda *_: None)
    rows = [[json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()]
            for run in (full, resumed)]
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in rows[0]] == \
        [(r["step"], r["loss"], r.get("val_loss")) for r in rows[1]]
    a, b = load_file(str(full / "denoiser.safetensors")), load_file(str(resumed / "denoiser.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema-") for k in a)  # the moving average is saved
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Each evaluation wrote a sample grid: one row of 8 per class.
    grids = sorted((full.parent / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000010.png", "step-000020.png"]
    assert Image.open(grids[-1]).size == (8 * 8 + 7 * 2, 2 * 8 + 2)


def test_a_two_process_ddp_run_equals_one_process(tmp_path, blobs):
    fields = dict(objective="flow", grad_accum=2, autocast="none", max_steps=6, eval_every=6, save_every=3)
    one = pretrain_diffusion(small_recipe(tmp_path, blobs, "one", **fields), log=lambda *_: None)
    recipe = small_recipe(tmp_path, blobs, "ddp", **fields)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(recipe.__dict__))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "plinth", "pretrain", str(tmp_path / "ddp.yaml"), "--dist", "ddp"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("checkpoint:") == 1  # only rank 0 reports
    assert [p.name for p in (tmp_path / "ddp" / "samples").iterdir()] == ["step-000006.png"]  # written once
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (one.parent, tmp_path / "ddp")]
    for key in ("loss", "val_loss"):
        assert [r[key] for r in rows[1] if key in r] == pytest.approx([r[key] for r in rows[0] if key in r], rel=1e-5)
    a, b = load_file(str(one / "denoiser.safetensors")), load_file(str(tmp_path / "ddp" / "final" / "denoiser.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema-") for k in a)  # the moving average too
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_training_flops_count_the_conditioning_once_per_image():
    """The loop's FLOP estimate (its MFU) against torch's own count of a training step's matmuls:
    the timestep and prompt MLPs and the adaLN modulations run once per image, not per patch."""
    from torch.utils.flop_counter import FlopCounterMode
    from plinth.train.loop import flops_per_token
    d = denoiser()
    c, B = d.config, 8
    x, t, prompts = torch.randn(B, 1, 8, 8), torch.rand(B), torch.randn(B, 6)
    with FlopCounterMode(display=False) as counter:
        d((x, t, prompts), targets=torch.randn(B, 1, 8, 8)).backward()
    params = sum(p.numel() for p in d.parameters())
    estimate = flops_per_token(params, c.n_layers, c.dim, c.n_patches, per_row=d.per_row_parameters()) * B * c.n_patches
    assert d.per_row_parameters() > params / 3  # what counting them per patch would overstate
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.15)
    assert flops_per_token(params, c.n_layers, c.dim, c.n_patches) * B * c.n_patches > 1.5 * counter.get_total_flops()


def test_a_recipe_that_is_not_a_denoiser_is_refused(tmp_path, blobs):
    with pytest.raises(PlinthError, match="adaptive_norm"):
        small_recipe(tmp_path, blobs, "x", preset="vit-tiny").config()
    with pytest.raises(PlinthError, match="prompt_dropout"):
        small_recipe(tmp_path, blobs, "x", prompt_dropout=1.0)


def test_a_tiny_generator_draws_the_blob_its_prompt_asks_for(toy_generator):
    generator = ImageGenerator.load(toy_generator)
    top = generator.generate(["top"] * 16, seed=0)
    bottom = generator.generate(["a photo of bottom"] * 16, seed=0)
    assert top.shape == (16, 1, 8, 8) and top.dtype == torch.uint8
    # The real images score about +90 (top) and -90 (bottom); noise scores 0.
    assert top_minus_bottom(top) > 30 and top_minus_bottom(bottom) < -30
    per_image = [top_minus_bottom(image) for image in top]
    assert sum(score > 0 for score in per_image) >= 14


def test_seeds_make_images_reproducible_and_guidance_zero_ignores_the_prompt(toy_generator):
    generator = ImageGenerator.load(toy_generator)
    first, again = generator.generate(["top"] * 4, seed=3), generator.generate(["top"] * 4, seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, generator.generate(["top"] * 4, seed=4))
    assert torch.equal(generator.generate(["top"] * 4, seed=3, guidance=0.0),
                       generator.generate([""] * 4, seed=3, guidance=1.0))
    with pytest.raises(PlinthError, match="steps"):
        generator.generate(["top"], steps=0)
    with pytest.raises(PlinthError, match="guidance"):
        generator.generate(["top"], guidance=float("nan"))


def test_plinth_load_gives_a_model_that_imagines_and_does_not_chat(toy_generator):
    m = plinth.load(str(toy_generator))
    images = m.imagine("bottom", n=3, seed=1)
    assert len(images) == 3 and images[0].size == (8, 8) and images[0].mode == "L"
    assert top_minus_bottom(torch.from_numpy(np.stack([np.asarray(i) for i in images]))) < 0
    with pytest.raises(PlinthError, match="generates images"):
        m.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(PlinthError, match="generates images"):
        m.generate("hi")


def test_plinth_imagine_writes_a_png_grid(toy_generator, tmp_path, capsys):
    from plinth.cli import main
    out = tmp_path / "out" / "tops.png"
    assert main(["imagine", str(toy_generator), "top", "--n", "4", "--seed", "2", "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 8 + 2, 2 * 8 + 2)
    expected = image_grid(ImageGenerator.load(toy_generator).generate(["top"] * 4, seed=2))
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
    assert main(["imagine", str(toy_generator), "top", "--n", "0", "--out", str(out)]) == 2
    assert main(["imagine", str(toy_generator), "top", "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["imagine", str(toy_generator.parent), "top", "--out", str(out)]) == 2  # the run, not a checkpoint
    err = capsys.readouterr().err
    assert "--n 0" in err and ".png" in err and "image generator" in err
