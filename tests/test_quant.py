"""Compact weights: the int4 layer computes every row on its own, so a prompt's rows, a decoding
step's rows and any batch of them give the same bits, close to the int4 codes' exact values; an
output layer that is most of the weights goes int4 too, its top logits recomputed from the tied
embedding."""
import pytest
import torch

from plinth.config import preset
from plinth.model import Transformer
from plinth.quant import Int4Head, Int4Linear, Int8Head, Int8Linear, compact_
from plinth.weights.packed import read_packed, write_packed
from tests.conftest import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def layer_and_input(kind, tokens):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator)
    return kind.of(weight), weight, torch.randn(2, tokens, 128, generator=generator).bfloat16()


def relative_error(out, reference):
    return float((out.float() - reference).norm() / reference.norm())


def test_prompt_and_decoding_rows_give_the_same_bits_close_to_the_codes_values():
    layer, weight, x = layer_and_input(Int4Linear, 24)
    codes_values = layer(torch.eye(128).bfloat16()).float()  # row i: the weights' column i as the kernel reads them
    assert relative_error(codes_values.t(), weight) < 0.1    # 4 bits: close to the float weights, not equal
    prompt = layer(x)                                          # (2, 24, 128): two prompts of 24 tokens
    decoding = layer(x.reshape(-1, 1, 128)).reshape(prompt.shape)  # the same rows, one token each
    assert torch.equal(prompt, decoding)
    assert relative_error(prompt, x.float() @ codes_values) < 5e-3


def test_decoding_rows_give_the_same_bits_alone_or_together():
    for kind in (Int4Linear, Int8Linear):
        layer, _, x = layer_and_input(kind, 12)
        rows = x.reshape(-1, 1, 128)  # 24 sequences feeding one token each
        together = layer(rows)
        assert all(torch.equal(layer(rows[i:i + 1]), together[i:i + 1]) for i in range(len(rows)))


def test_the_int8_head_gives_each_row_the_same_bits_in_any_batch_close_to_float_products():
    """The vocabulary projection multiplies in integers: a row's logits do not depend on its batch,
    and stay close to the float32 product of the codes even for rows with one large element (as
    hidden states have), where one int8 term per row would not."""
    head, _, x = layer_and_input(Int8Head, 12)
    rows = x.reshape(-1, 128).float()
    rows[:, 7] *= 30  # one outlying element per row
    together = head(rows)
    assert all(torch.equal(head(rows[i:i + 1]), together[i:i + 1]) for i in range(len(rows)))
    exact = rows @ (head.q.float() * head.scale.float()[:, None]).t()
    assert relative_error(together, exact) < 1e-3
    top = exact.argmax(-1, keepdim=True)  # the best candidates are recomputed in float32
    torch.testing.assert_close(together.gather(-1, top), exact.gather(-1, top))


def test_empty_layers_take_a_compact_state_dict():
    layer, _, x = layer_and_input(Int4Linear, 3)
    with torch.device("meta"):
        shell = Int4Linear(128, 96)
    shell.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(shell(x), layer(x))


# ---- the output layer ---------------------------------------------------------------------------
def gemma_shaped(**overrides):
    """A tied model whose output layer is most of its linear weights, as Gemma 3 270M's (262,144
    rows of 640: 63%) is: a 4,096-token vocabulary over one 64-wide block (88%). Embeddings scaled
    up so that logits are a few units apart and top-1 choices mean something."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=4096, n_layers=1, **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(10)
    return model.eval()


IDS = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))


def test_a_large_tied_output_layer_goes_int4_and_its_top_logits_are_the_embeddings():
    model = gemma_shaped()
    reference, embedding = model(IDS), model.tok_embeddings.weight.detach().clone()
    compact_(model, "int4")
    assert isinstance(model.output, Int4Head)
    # The input layer still looks up the embedding's rows (bfloat16), which the head shares, not copies.
    assert torch.equal(model.tok_embeddings.weight, embedding.bfloat16())
    assert model.output.rows.data_ptr() == model.tok_embeddings.weight.data_ptr()
    logits = model(IDS)
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.9
    assert relative_error(logits, reference) < 0.1  # 4 bits over the whole vocabulary (measured 0.078)
    best = reference.topk(16, dim=-1).indices       # the candidates that matter: bfloat16-close (0.0016)
    assert relative_error(logits.gather(-1, best), reference.gather(-1, best)) < 0.01
    # Each row's best candidates are recomputed in float32 from the embedding's rows: its top-1 and
    # that logit are a bfloat16 output layer's.
    exact = model.features(IDS).float() @ model.tok_embeddings.weight.float().t()
    top = logits.argmax(-1, keepdim=True)
    assert torch.equal(top, exact.argmax(-1, keepdim=True))
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top))


def test_a_small_or_untied_output_layer_keeps_the_int8_head_and_int8_blocks_keep_the_int4_one():
    for model in (tiny_model(), gemma_shaped(tie_embeddings=False)):
        compact_(model, "int4")
        assert type(model.output) is Int8Head, (model.config.vocab_size, model.config.tie_embeddings)
    model = compact_(gemma_shaped(), "int8")
    assert type(model.output) is Int4Head and type(model.layers[0].attn.wo) is Int8Linear


def test_an_int4_head_is_kept_and_mapped_back_sharing_the_embedding(tmp_path):
    model = compact_(gemma_shaped(), "int4")
    write_packed(tmp_path / "packed", tmp_path / "source.gguf", "int4", model, byte_tokenizer())
    back, _, dtype = read_packed(tmp_path / "packed")
    assert dtype == "int4" and isinstance(back.output, Int4Head)
    assert back.output.rows.data_ptr() == back.tok_embeddings.weight.data_ptr()
    embedding_bytes = back.tok_embeddings.weight.nbytes
    assert (tmp_path / "packed" / "model.pt").stat().st_size < 1.5 * embedding_bytes  # the shared rows once
    assert torch.equal(back(IDS), model(IDS))
