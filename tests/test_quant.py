"""Compact weights: the int4 layer's two paths (kernel for decoding rows, bfloat16 copy for prompts)."""
import torch

from plinth.quant import Int4Linear


def layer_and_input(tokens):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator)
    return Int4Linear(weight), torch.randn(2, tokens, 128, generator=generator).bfloat16()


def relative_error(out, reference):
    return float((out.float() - reference).norm() / reference.norm())


def test_prompt_rows_use_the_same_weights_as_the_int4_kernel():
    layer, x = layer_and_input(Int4Linear.PROMPT_ROWS)
    reference = x.float() @ layer.dense.float().t()  # the int4 codes' values, in float32
    prompt = layer(x)                                # a prompt: the bfloat16 copy
    decoding = layer(x.reshape(-1, 1, 128)).reshape(prompt.shape)  # the same rows one token each: the kernel
    assert relative_error(prompt, reference) < 5e-3 and relative_error(decoding, reference) < 5e-3


def test_decoding_rows_give_the_same_bits_alone_or_together():
    layer, x = layer_and_input(12)
    rows = x.reshape(-1, 1, 128)  # 24 sequences feeding one token each
    together = layer(rows)
    assert all(torch.equal(layer(rows[i:i + 1]), together[i:i + 1]) for i in range(len(rows)))
