"""Training on 2 CPU processes under torchrun (gloo): DDP follows the single-process loss curve,
FSDP2 trains, checkpoints full weights and resumes exactly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.errors import PlinthError
from plinth.train.dist import setup
from plinth.train.loop import pretrain
from tests.conftest import TINY, losses, recipe

SHORT = dict(max_steps=6, warmup_steps=2, save_every=3, eval_every=6, grad_accum=2, autocast="none")


def torchrun(r, mode, *extra):
    overrides = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in r.__dict__.items()
                 if k in TINY or k in SHORT or k == "out_dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    empty = Path(r.out_dir).parent / "empty.yaml"
    empty.write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "plinth", "pretrain", str(empty), "--dist", mode, *overrides, *extra],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("single")
    pretrain(recipe(tmp, data_dir, "single", **SHORT), log=lambda *_: None)
    return losses(tmp / "single")


def test_ddp_loss_curve_equals_single_process(tmp_path, data_dir, single):
    out = torchrun(recipe(tmp_path, data_dir, "ddp", **SHORT), "ddp")
    assert out.count("checkpoint:") == 1  # only rank 0 reports
    assert losses(tmp_path / "ddp") == pytest.approx(single, rel=1e-5)


def test_fsdp2_trains_saves_a_normal_model_and_resumes(tmp_path, data_dir, single):
    import plinth
    r = recipe(tmp_path, data_dir, "fsdp", **SHORT)
    torchrun(r, "fsdp2")
    run = tmp_path / "fsdp"
    full = losses(run)
    assert full == pytest.approx(single, rel=1e-5)
    assert isinstance(plinth.load(str(run / "latest")).generate("def ", max_tokens=3, temperature=0), str)
    # As if killed after step 3's checkpoint: the step-6 checkpoint never finished.
    shutil.rmtree(run / "step-000006")
    (run / "latest").unlink()
    (run / "latest").symlink_to("step-000003")
    torchrun(r, "fsdp2", "--resume")
    assert losses(run) == full


def test_world_size_must_divide_the_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PlinthError, match="batch_size=3 does not split over 2 processes"):
        setup("ddp", 3)
    with pytest.raises(PlinthError, match="--dist is none"):
        setup("none", 4)
