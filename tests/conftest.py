"""Shared fixtures: a tiny random model with a byte-level tokenizer (milliseconds), and the real
SmolLM2-135M GGUF with Hugging Face transformers as the independent reference (seconds)."""
import contextlib
import json
import os
import socket
import threading
import time

import numpy as np

import pytest
import torch
from PIL import Image

from plinth.config import preset
from plinth.model import Transformer
from plinth.vision.multimodal import ImageEncoder
from plinth.tokenizer import BYTE_CHARS, Tokenizer

# Servers and `plinth generate` decode eagerly unless a test says otherwise: by default they would
# build compiled programs for each of the suite's models (plinth/compiled_decode.py).
os.environ["PLINTH_COMPILE"] = "0"

# A pretraining recipe small enough for unit tests: 40 stdlib files, a 320-token BPE, a 2-layer model.
TINY = dict(sources=["python-stdlib"], max_docs_per_source=40, val_fraction=0.1, vocab_size=320, seq_len=32, batch_size=4,
            model={"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
            max_steps=300, warmup_steps=10, save_every=10, eval_every=100, log_every=1000, lr=0.01)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> Tokenizer:
    """Every byte is one token (ids 0-255), then three chat specials; <|im_end|> (258) ends a turn."""
    tokens = [BYTE_CHARS[b] for b in range(256)] + SPECIALS
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3] * 3, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 258}
    return Tokenizer.from_gguf(meta)


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=259, **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def program_cache(tmp_path_factory):
    """Compiled decoding programs (plinth/compiled_decode.py) go to the session's own folder, not the
    user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("programs")
        patch.setattr("plinth.compiled_decode.PROGRAM_CACHE", folder)
        patch.setenv("PLINTH_PROGRAM_CACHE", str(folder))
        yield folder


@pytest.fixture
def no_grad():
    """For inference tests; per test, because a global autograd switch would leak into training tests."""
    with torch.no_grad():
        yield


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def smollm2_path():
    from plinth import hub
    return hub.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    """plinth's float32 model: exact dequantisation, so it must match transformers closely."""
    import plinth
    return plinth.load(str(smollm2_path), dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Prepared (cleaned, tokenized) data of the TINY recipe, shared by the training tests."""
    from plinth.data.prepare import prepare
    from plinth.train.recipe import PretrainRecipe
    out = tmp_path_factory.mktemp("run")
    prepare(PretrainRecipe(**TINY, out_dir=str(out / "base")), log=lambda *_: None)
    return out / "base" / "data"


def recipe(tmp_path, data_dir, name, **overrides):
    """A TINY recipe whose run folder `tmp_path/name` reads the shared prepared data."""
    from plinth.train.recipe import PretrainRecipe
    (tmp_path / name).mkdir()
    (tmp_path / name / "data").symlink_to(data_dir)
    return PretrainRecipe(**{**TINY, **overrides}, out_dir=str(tmp_path / name))


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def server_state(model, tokenizer, **engine_options):
    """What a served app shares (plinth/serve/state.py) around a started engine of `model`; the
    engine stops after."""
    from plinth.engine import Engine
    from plinth.serve.state import ServerState
    engine = Engine(model, tokenizer, **engine_options)
    engine.start()
    try:
        yield ServerState(engine, tokenizer, "tiny")
    finally:
        engine.stop()


# ---- a tiny image+text model -------------------------------------------------------------------------
BAR_QUESTION = "Where is the bar?"


def tiny_vision(language_dim: int = 64, seed: int = 0) -> ImageEncoder:
    """A 2-layer ViT on 8×8 grey images (16 patches of 2×2), merged 2×2: 4 image tokens."""
    torch.manual_seed(seed)
    encoder = Transformer(preset("vit-tiny"))
    encoder.to_empty(device="cpu")
    encoder.init_weights()
    # MAE's patch-embedding init (xavier): at plinth's 0.02 a patch's pixels are a few percent of its
    # position vector, and a few dozen steps could not pick them out
    torch.nn.init.xavier_uniform_(encoder.patch_embeddings.weight)
    vision = ImageEncoder(encoder, language_dim, merge=2)
    vision.init_projector(seed)
    return vision.eval()


def bar(i: int) -> Image.Image:
    """A bright bar on black: in the top half for even i ("up"), the bottom half for odd i ("down")."""
    pixels = np.random.default_rng(i).integers(0, 40, (8, 8)).astype(np.uint8)
    row = int(np.random.default_rng(i).integers(0, 3)) + (4 if i % 2 else 0)
    pixels[row:row + 2, 1:7] = 230
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def toy_vlm(tmp_path_factory):
    """A tiny image+text model fine-tuned (full) on a toy set: where the bar is, "up" or "down"."""
    from plinth.adapt.finetune import FinetuneRecipe, finetune
    from plinth.weights.native import write_model
    root = tmp_path_factory.mktemp("vqa")
    language = tiny_model(dim=64, n_heads=4, n_kv_heads=2)
    (root / "lm").mkdir()
    write_model(language, root / "lm")
    byte_tokenizer().save(root / "lm")
    (root / "vit").mkdir()
    write_model(tiny_vision().encoder, root / "vit")
    rows = []
    for i in range(48):
        bar(i).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": BAR_QUESTION, "answer": "down" if i % 2 else "up"})
    (root / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = FinetuneRecipe(base=str(root / "lm"), task="vqa", method="full", data=str(root / "toy.jsonl"),
                       image_encoder=str(root / "vit"), val_examples=4, batch_size=8, max_steps=120, lr=3e-3,
                       warmup_steps=5, eval_every=120, save_every=60, seq_len=64, out_dir=str(root / "run"))
    final = finetune(r, log=lambda *_: None)
    return root, final


def blob(place: str, i: int) -> Image.Image:
    """An 8×8 grey image with a bright 3×3 blob in its top or bottom half (column varying with i)."""
    pixels = np.zeros((8, 8), dtype=np.uint8)
    row, column = (1 if place == "top" else 4) + i % 2, i % 6
    pixels[row:row + 3, column:column + 3] = 255
    return Image.fromarray(pixels)


def top_minus_bottom(pixels) -> float:
    """What tells the two blob classes apart: the top half's mean brightness minus the bottom half's."""
    pixels = pixels.float()
    return float(pixels[..., :4, :].mean() - pixels[..., 4:, :].mean())


@pytest.fixture(scope="session")
def toy_generator(tmp_path_factory):
    """A tiny image generator trained by flow matching on two classes of 8×8 blobs, "top" and "bottom"."""
    from plinth.vision.diffusion_pretrain import DiffusionRecipe, pretrain_diffusion
    root = tmp_path_factory.mktemp("blobs")
    for place in ("top", "bottom"):
        (root / "data" / place).mkdir(parents=True)
        for i in range(48):
            blob(place, i).save(root / "data" / place / f"{i}.png")
    r = DiffusionRecipe(data=str(root / "data"), preset="dit-tiny", val_images=8, batch_size=32, max_steps=300,
                        lr=3e-3, warmup_steps=10, eval_every=300, save_every=150, out_dir=str(root / "run"))
    return pretrain_diffusion(r, log=lambda *_: None)


def live(state):
    """The app of `state` behind a real uvicorn on a loopback port (only a real server has keep-alive
    connections and real disconnects); yields its URL, then stops it."""
    import uvicorn

    from plinth.serve.app import create_app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
