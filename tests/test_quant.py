"""Compact weights: the int4 layer computes every row on its own, so a prompt's rows, a decoding
step's rows and any batch of them give the same bits, close to the int4 codes' exact values."""
import torch

from plinth.quant import Int4Linear, Int8Linear


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


def test_empty_layers_take_a_compact_state_dict():
    layer, _, x = layer_and_input(Int4Linear, 3)
    with torch.device("meta"):
        shell = Int4Linear(128, 96)
    shell.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(shell(x), layer(x))
