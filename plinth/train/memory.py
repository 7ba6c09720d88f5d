"""Will a training step fit in memory? Checked before any work, so a too-large batch is a clear
message naming the setting to lower instead of a swap storm or an out-of-memory kill an hour in.

The estimate is deliberately rough (within a factor of ~1.5 of the measured peak for plinth's
models) and errs low: it stops runs that cannot fit, never runs that might.
"""
from __future__ import annotations

import torch

from plinth.errors import PlinthError

GiB = 2**30


def training_bytes(config, params: int, trainable: int, rows: int, seq_len: int, checkpointing: bool,
                   shards: int = 1) -> int:
    """Peak bytes of one micro-batch step on one process.

    - float32 weights, 4 bytes each, and for trainable ones a gradient and AdamW's two moments,
      12 more (all split over `shards` processes under FSDP2);
    - activations kept for backward, per token and block: the block input and normed input twice,
      q/k/v, rotated q/k, attention output, and the MLP's gate, up, activation and product;
      with activation checkpointing only each block's input is kept, plus one block recomputed;
    - the logits: float32 logits, their log-softmax and its gradient (12 bytes per entry).
    """
    kv_dim = config.n_kv_heads * config.head_dim
    per_block = 7 * config.dim + 3 * kv_dim + 4 * config.ffn_dim
    tokens = rows * seq_len
    blocks = config.dim * config.n_layers + per_block if checkpointing else per_block * config.n_layers
    activations = 4 * tokens * blocks
    logits = 12 * tokens * config.vocab_size
    return (4 * params + 12 * trainable) // shards + activations + logits


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:  # Linux; MemAvailable counts reclaimable page cache as free
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_fits(config, params: int, trainable: int, r, rows: int, device: torch.device, shards: int = 1):
    need = training_bytes(config, params, trainable, rows, r.seq_len, r.activation_checkpointing, shards)
    try:
        have = available_bytes(device)
    except (OSError, KeyError, ValueError):  # no way to tell on this system: let the run try
        return
    if need > have:
        hint = "" if r.activation_checkpointing else ", or set activation_checkpointing: true"
        raise PlinthError(f"a training step needs about {need / GiB:.1f} GiB but {have / GiB:.1f} GiB is free on "
                          f"{device.type}: lower batch_size (now {r.batch_size}; raise grad_accum to keep the tokens "
                          f"per step) or seq_len (now {r.seq_len}){hint}")
