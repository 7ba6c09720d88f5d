"""The packed-weights cache: a GGUF file's compact weights kept by its first load and mapped by later
ones, giving the same model bit for bit; a changed file, a folder from another layout or an
unwritable cache never give a wrong or failed load."""
import pytest
import torch

import plinth
from plinth.weights import packed
from plinth.weights.gguf_writer import write_gguf
from tests.conftest import byte_tokenizer, tiny_model

PROMPT = torch.tensor([[104, 105, 32, 116, 104, 101, 114, 101]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "PACKED_CACHE", tmp_path / "packed")
    return tmp_path / "packed"


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model(), byte_tokenizer(), path, dtype="q8_0")
    return path


def logits(loaded):
    with torch.inference_mode():
        return loaded.model(PROMPT)


def no_file_reading(monkeypatch):
    def refuse(*args):
        raise AssertionError("the GGUF file was read again instead of the kept weights")
    monkeypatch.setattr(plinth.adapt.adapted, "read_adapted", refuse)


@pytest.mark.parametrize("dtype", [None, "int4"])
def test_a_second_load_maps_the_kept_weights_and_gives_the_same_model(cache, gguf_file, monkeypatch, dtype):
    first = plinth.load(str(gguf_file), dtype=dtype)
    assert len(list(cache.iterdir())) == 1
    no_file_reading(monkeypatch)
    second = plinth.load(str(gguf_file), dtype=dtype)
    assert torch.equal(logits(second), logits(first))
    kinds = {type(m).__name__ for m in second.model.modules()}
    assert ("Int4Linear" in kinds) == (dtype == "int4") and "Int8Head" in kinds
    assert second.tokenizer.encode("hi<|im_end|>") == first.tokenizer.encode("hi<|im_end|>") == [104, 105, 258]
    assert second.tokenizer.stop_ids == first.tokenizer.stop_ids
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert second.generate("hi", max_tokens=8, temperature=0) == first.generate("hi", max_tokens=8, temperature=0)


def test_a_changed_file_is_packed_again(cache, gguf_file):
    plinth.load(str(gguf_file))
    gguf_file.unlink()
    write_gguf(tiny_model(seed=1), byte_tokenizer(), gguf_file, dtype="q8_0")
    reloaded = plinth.load(str(gguf_file))
    assert len(list(cache.iterdir())) == 2
    fresh = tiny_model(seed=1)
    assert torch.equal(logits(reloaded).argmax(-1), fresh(PROMPT).argmax(-1))


def test_a_folder_of_another_layout_is_ignored_and_replaced(cache, gguf_file, monkeypatch):
    plinth.load(str(gguf_file))
    monkeypatch.setattr(packed, "FORMAT", packed.FORMAT + 1)  # as a newer plinth would see it
    folder = next(cache.iterdir())
    assert packed.read_packed(folder) is None
    plinth.load(str(gguf_file))
    assert packed.read_packed(folder) is not None


def test_an_unwritable_cache_costs_only_time(tmp_path, gguf_file, monkeypatch, capsys):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setattr(packed, "PACKED_CACHE", blocked / "packed")
    loaded = plinth.load(str(gguf_file))
    assert loaded.generate("hi", max_tokens=4, temperature=0) is not None
    assert "could not keep the compact weights" in capsys.readouterr().err


def test_a_damaged_folder_is_read_past_and_replaced(cache, gguf_file, capsys):
    expected = logits(plinth.load(str(gguf_file)))
    weights = next(cache.iterdir()) / packed.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    assert torch.equal(logits(plinth.load(str(gguf_file))), expected)
    assert "unreadable" in capsys.readouterr().err
    assert torch.equal(logits(plinth.load(str(gguf_file))), expected) and weights.stat().st_size > 1000
