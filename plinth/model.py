"""The Transformer: one model definition for pretraining, fine-tuning, loading real weights and serving.

Read top to bottom: RMSNorm, rotary embeddings, the attention mask, the KV cache, attention, MLP,
block, model. Every architecture difference is a `ModelConfig` field (see plinth/config.py).
Shapes in comments: B batch, T new tokens, L keys (past + new), H query heads, K key/value heads,
D head dim, C model width, V vocabulary.

    model = Transformer(config)                      # built on the meta device: no memory yet
    model.to_empty(device="cpu"); model.init_weights()   # or model.load_weights(state_dict)
    logits = model(tokens)                           # (B, T, V)
    loss = model(tokens, targets=next_tokens)        # training: the summed cross-entropy
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from plinth import onednn
from plinth.config import ModelConfig
from plinth.loss import summed_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))

    def forward(self, x):
        # Normalise in float32: bf16 activations lose too much precision in the mean of squares.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, config.norm_eps) if config.norm == "rms" else nn.LayerNorm(dim, config.norm_eps)


def rope_tables(head_dim: int, theta: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair: two (length, head_dim/2) float32 tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin, dtype=None):
    """Rotate (x1, x2) halves of each head (the "rotate_half" layout of Hugging Face checkpoints).

    x: (B, T, heads, D); cos, sin: (B, T, 1, D/2). The result is in `dtype` (default x's).
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype or x.dtype)


def attention_mask(q_pos, key_len: int, causal: bool, window: int | None):
    """Which keys each query may see: (B, 1, T, L) booleans, True = attend.

    q_pos: (B, T) absolute positions of the queries; keys sit at positions 0..key_len-1.
    """
    k_pos = torch.arange(key_len, device=q_pos.device)
    distance = q_pos[:, :, None] - k_pos[None, None, :]  # (B, T, L)
    allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        allowed &= distance < window
    return allowed[:, None]


def positions_in_documents(documents):
    """(B, T) document numbers of packed rows → each token's position within its own document
    (0, 1, 2, ... restarting where the number changes)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


SHORT_ROWS = 512  # bfloat16 rows up to this long: attention by plain matmuls (see Attention._causal_by_matmuls)
KEY_BLOCK = 64  # decoding reads each row's keys in whole blocks of this many positions (see Attention._decode)


def whole_key_blocks(positions: int) -> int:
    """`positions` rounded up to a whole number of KEY_BLOCKs."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


class KVCache:
    """Keys and values of past tokens for up to `slots` sequences.

    k, v: (layers, slots, K, positions, D), positions = max_len rounded up to a whole KEY_BLOCK. A
    forward pass writes the new tokens' keys at their absolute positions and attends over positions
    0..start+T-1 of its rows.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (config.n_layers, slots, config.n_kv_heads, whole_key_blocks(max_len), config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, k, v, where: "Positions"):
        """Store the new tokens' keys and values k, v (B, K, T, D) at their rows and positions."""
        keys, values = self.k[layer], self.v[layer]
        k, v = k.to(keys.dtype), v.to(values.dtype)
        if where.slots is None and isinstance(where.start, int):  # rows 0..B-1 at one offset: slicing
            keys[:k.shape[0], :, where.start:where.key_len] = k
            values[:k.shape[0], :, where.start:where.key_len] = v
        else:  # each row at its own position (and maybe its own slot)
            slots = where.slot_index(k.shape[0])
            keys[slots[:, None], :, where.q_pos] = k.transpose(1, 2)  # indexed view is (B, T, K, D)
            values[slots[:, None], :, where.q_pos] = v.transpose(1, 2)

    def read(self, layer: int, B: int, where: "Positions"):
        """All keys and values of the pass's B rows, positions 0..key_len-1: (B, K, L, D)."""
        end = where.key_len
        if where.slots is None:  # rows 0..B-1: views, no copies
            return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]
        return self.k[layer, where.slots, :, :end], self.v[layer, where.slots, :, :end]


class Positions:
    """Where a forward pass's tokens sit: absolute positions, cache rows, and which keys to see.

    documents: (B, T) for packed training rows (several examples one after another, see
    plinth/adapt/examples.py `pack`): positions restart at 0 with each document and a token attends
    only within its own. Whole sequences from position 0 only, no cache."""

    def __init__(self, B: int, T: int, start, slots, device, documents=None):
        self.start, self.slots, self.T, self.documents = start, slots, T, documents
        start_t = torch.as_tensor(start, device=device).reshape(-1).expand(B)
        if documents is None:
            self.q_pos = start_t[:, None] + torch.arange(T, device=device)  # (B, T)
        else:
            self.q_pos = positions_in_documents(documents)
        self.key_len = int(start_t.max()) + T if isinstance(start, torch.Tensor) else start + T
        if T == 1:  # decoding: which cache rows and positions the layers read, worked out once for all
            rows = self.slot_index(B)
            self.span = int(rows.min()), int(rows.max()) + 1  # cache rows lo..hi-1 hold every row of the pass
            gaps = not torch.equal(rows, torch.arange(*self.span, device=device))
            self.span_rows = rows - self.span[0] if gaps else None  # where each row sits within the span
            self.decode_len = whole_key_blocks(self.key_len)
            self.span_ends = torch.ones(self.span[1] - self.span[0], dtype=torch.long, device=device)
            self.span_ends[rows - self.span[0]] = start_t + 1  # rows of the span outside the pass see key 0
            self._biases = {}

    def slot_index(self, B: int):
        return torch.arange(B, device=self.q_pos.device) if self.slots is None else self.slots

    def mask(self, causal: bool, window: int | None):
        """None when every query sees every key up to itself in the simple way SDPA understands."""
        if self.documents is not None:  # block-diagonal: the usual mask over row indices, within documents
            index = torch.arange(self.T, device=self.documents.device).expand_as(self.documents)
            same = self.documents[:, :, None] == self.documents[:, None, :]  # (B, T, T)
            return attention_mask(index, self.T, causal, window) & same[:, None]
        uniform = isinstance(self.start, int)
        if uniform and window is None and (self.T == 1 or not causal):
            return None  # a single new token (or bidirectional) attends to all keys so far
        return attention_mask(self.q_pos, self.key_len, causal, window)

    def decode_bias(self, window: int | None, dtype, heads: int) -> torch.Tensor:
        """(S·heads, 1, decode_len) for the S rows of the span, each repeated for its key heads: 0
        where a row's new token may attend (its own keys so far, within `window`), -inf elsewhere;
        added to the attention scores."""
        if window not in self._biases:
            allowed = attention_mask(self.span_ends[:, None] - 1, self.decode_len, True, window)  # (S, 1, 1, L)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            self._biases[window] = bias.repeat_interleave(heads, dim=0).view(-1, 1, self.decode_len)
        return self._biases[window]

    def plain_causal(self, causal: bool, window: int | None) -> bool:
        """True for a causal pass over a whole sequence from position 0 (training, first prefill)."""
        return (causal and window is None and isinstance(self.start, int) and self.start == 0 and self.T > 1
                and self.documents is None)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        C, H, K, D = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer = H, K, D, layer
        bias = config.bias
        self.wq = nn.Linear(C, H * D, bias=bias)
        self.wk = nn.Linear(C, K * D, bias=bias)
        self.wv = nn.Linear(C, K * D, bias=bias)
        self.wqkv = None  # set by `fuse()` for inference: one matmul instead of three
        self.wo = nn.Linear(H * D, C, bias=bias)
        self.q_norm = RMSNorm(D, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(D, config.norm_eps) if config.qk_norm else None
        self.scale = config.attn_scale if config.attn_scale is not None else 1 / math.sqrt(D)
        self.causal = config.causal
        self.window = config.sliding_window if config.is_sliding(layer) else None

    @torch.no_grad()
    def fuse(self):
        """Inference only: concatenate the q, k, v projections into one layer (fewer, larger matmuls)."""
        self.wqkv = fuse_linears(self.wq, self.wk, self.wv)
        self.wq = self.wk = self.wv = None

    def forward(self, x, rope, where: Positions, cache: KVCache | None):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = self.wqkv(x)
        else:
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        qkv = qkv.view(B, T, H + 2 * K, D)
        qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:  # queries and keys rotate together: one pass over (B, T, H+K, D)
            qk = apply_rope(qk, *rope, cache.k.dtype if cache is not None else None)  # the dtype attention runs in
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            cache.write(self.layer, k, v, where)
        if T == 1 and self.causal and cache is not None:
            out = self._decode(q, where, cache)
        else:
            if cache is not None:
                k, v = cache.read(self.layer, B, where)  # (B, K, L, D)
            with onednn.paused():  # its many small block products run faster on the default path
                out = self._prefill(q.to(k.dtype), k, v, where)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))

    def _prefill(self, q, k, v, where: Positions):
        if where.plain_causal(self.causal, self.window):
            if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] <= SHORT_ROWS:
                return self._causal_by_matmuls(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return self._grouped(q, k, v, where.mask(self.causal, self.window))

    def _causal_by_matmuls(self, q, k, v):
        """Causal attention as two batched matmuls and a float32 softmax, the query heads sharing
        a key head folded into the query axis (no copies of keys and values). In bfloat16 on a CPU
        without AMX, PyTorch's fused attention kernel takes twice as long for short rows (forward
        and backward of a layer over 16 rows of 256 tokens: 24.9 against 11.6 ms; 8 rows of 512:
        40.5 against 22.5 ms). Past SHORT_ROWS tokens the (T, T) scores no longer fit in cache
        and the fused kernel wins (4 rows of 1024: 49.5 against 110 ms)."""
        B, H, T, D = q.shape
        K, group = self.n_kv_heads, self.n_heads // self.n_kv_heads
        scores = torch.matmul((q * self.scale).reshape(B, K, group * T, D), k.transpose(-1, -2))
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.view(B, K, group, T, T).masked_fill(future, -math.inf)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(weights.view(B, K, group * T, T), v).view(B, H, T, D)

    def _decode(self, q, where: Positions, cache: KVCache):
        """One new token per row, attending to keys read in place from the cache, all rows at once.

        Every row reads a whole number of KEY_BLOCKs of keys, the positions it may not see masked
        out. The matmul and softmax kernels then sum each row's scores in the same blocks whether
        the row runs alone or in a batch, so batching never changes a sequence's output (padding to
        the batch's exact longest row, or calling SDPA, changes low bits with the batch). Rows whose
        cache slots have gaps between them run as the whole span of slots; the extra rows are
        dropped after."""
        B, H, _, D = q.shape
        K = self.n_kv_heads
        (lo, hi), length = where.span, where.decode_len
        # (span rows · K) batches of the `group` queries sharing a key head: views, no copies
        keys = cache.k[self.layer, lo:hi, :, :length].flatten(0, 1)
        values = cache.v[self.layer, lo:hi, :, :length].flatten(0, 1)
        q = q.reshape(B, K, H // K, D).to(keys.dtype)
        if where.span_rows is not None:
            q = q.new_zeros(hi - lo, *q.shape[1:]).index_copy_(0, where.span_rows, q)
        bias = where.decode_bias(self.window, keys.dtype, K)
        scores = torch.baddbmm(bias, q.flatten(0, 1), keys.transpose(1, 2), alpha=self.scale)
        out = torch.bmm(torch.softmax(scores, dim=-1), values).view(hi - lo, H, 1, D)
        return out if where.span_rows is None else out.index_select(0, where.span_rows)

    def _grouped(self, q, k, v, mask):
        """Attention where the H/K query heads sharing a key head are folded into the query axis,
        so keys and values are never copied H/K times (what matters when decoding)."""
        B, H, T, D = q.shape
        K, group = self.n_kv_heads, self.n_heads // self.n_kv_heads
        q = q.reshape(B, K, group * T, D)
        if mask is not None:  # (B, 1, T, L) -> (B, 1, group*T, L), same rows for each head of a group
            mask = mask.repeat(1, 1, group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.view(B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_, bias = config.dim, config.ffn_dim, config.bias
        self.kind = config.mlp
        self.w_gate = nn.Linear(C, F_, bias=bias) if self.kind != "gelu" else None
        self.w_up = nn.Linear(C, F_, bias=bias)
        self.w_gate_up = None  # set by `fuse()` for inference
        self.w_down = nn.Linear(F_, C, bias=bias)

    @torch.no_grad()
    def fuse(self):
        """Inference only: one matmul for the gate and up projections."""
        if self.w_gate is not None:
            self.w_gate_up = fuse_linears(self.w_gate, self.w_up)
            self.w_gate = self.w_up = None

    def forward(self, x):
        if self.kind == "gelu":
            return self.w_down(F.gelu(self.w_up(x)))
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        gate = F.gelu(gate, approximate="tanh") if self.kind == "geglu" else F.silu(gate)
        return self.w_down(gate * up)


def fused_parts(config: ModelConfig) -> dict[str, dict[str, int]]:
    """What `Transformer.fuse` joins: each fused layer's parts, in the order its output holds them,
    with each part's output width."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"wqkv": {"wq": q, "wk": kv, "wv": kv}, "w_gate_up": {"w_gate": config.ffn_dim, "w_up": config.ffn_dim}}


def fuse_linears(*layers: nn.Linear) -> nn.Linear:
    """One linear layer computing the given layers' outputs side by side."""
    weight = torch.cat([layer.weight for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=layers[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight)
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.dim)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.dim)
        self.mlp = MLP(config)
        # Gemma-style "sandwich": the sublayer outputs are normalised again before the residual add.
        self.post_attn_norm = make_norm(config, config.dim) if config.sandwich_norm else None
        self.post_mlp_norm = make_norm(config, config.dim) if config.sandwich_norm else None
        self.post_norm = config.post_norm

    def forward(self, x, rope, where, cache):
        if self.post_norm:  # original Transformer / BERT: normalise the sum
            x = self.attn_norm(x + self.attn(x, rope, where, cache))
            return self.mlp_norm(x + self.mlp(x))
        h = self.attn(self.attn_norm(x), rope, where, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            learned = config.position == "learned"
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim) if learned else None
            self.embed_norm = make_norm(config, config.dim) if config.embed_norm else None
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = make_norm(config, config.dim) if not config.post_norm else None
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._tie()
        # Set by the training loop: keep only each block's input and recompute the rest in backward.
        self.activation_checkpointing = False

    def _tie(self):
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """Fresh weights for training from scratch:
        - token embeddings and every linear layer: normal(0, 0.02);
        - the last projection of each sublayer (attention `wo`, MLP `w_down`): normal(0, 0.02/sqrt(2 n_layers)),
          so the residual stream's variance does not grow with depth (GPT-2);
        - learned position embeddings (if any): normal(0, 0.02);
        - every norm weight: 1, and LayerNorm and linear biases: 0;
        - rotary tables: recomputed (see `init_buffers`).
        """
        std, depth_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                last = name.endswith(("attn.wo", "mlp.w_down"))
                nn.init.normal_(module.weight, 0.0, depth_std if last else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self._tie()
        self.init_buffers()

    def init_buffers(self):
        """Rotary tables are derived data, not weights: rebuilt after loading, never saved."""
        c, device = self.config, self.tok_embeddings.weight.device
        global_rope = rope_tables(c.head_dim, c.rope_theta, c.max_seq_len)
        local_theta = c.rope_local_theta or c.rope_theta
        local_rope = global_rope if local_theta == c.rope_theta else rope_tables(c.head_dim, local_theta, c.max_seq_len)
        self.rope = {False: tuple(t.to(device) for t in global_rope), True: tuple(t.to(device) for t in local_rope)}

    def load_weights(self, state_dict: dict[str, torch.Tensor]):
        """Load a full state dict (strict: a missing or unexpected key is an error naming it)."""
        if self.config.tie_embeddings and "output.weight" not in state_dict:
            state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
        if self.tok_embeddings.weight.is_meta:
            self.to_empty(device="cpu")
        result = self.load_state_dict(state_dict, strict=False, assign=True)
        problems = [f"missing: {', '.join(result.missing_keys)}" if result.missing_keys else "",
                    f"unexpected: {', '.join(result.unexpected_keys)}" if result.unexpected_keys else ""]
        if any(problems):
            raise KeyError("weights do not fit the model config; " + "; ".join(p for p in problems if p))
        self._tie()
        self.init_buffers()

    def fuse(self) -> "Transformer":
        """For inference: fuse q/k/v and gate/up projections (fewer kernel calls per token). The
        state dict changes names, so fuse after loading and never before training or saving."""
        for block in self.layers:
            block.attn.fuse()
            block.mlp.fuse()
        return self

    # ---- running -------------------------------------------------------------------------------
    def new_cache(self, slots: int, max_len: int | None = None) -> KVCache:
        """On CPU the cache, and so attention over it, is float32 even for bfloat16 or int4 weights:
        without AMX, float32 attention is faster than bfloat16 (320 against 580 µs a layer for 16
        decoding rows of 256 keys) and its batched kernels give a row the same bits in any batch."""
        weight = self.tok_embeddings.weight
        dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        return KVCache(self.config, slots, max_len or self.config.max_seq_len, dtype, weight.device)

    def features(self, tokens=None, *, embeds=None, cache: KVCache | None = None, start_pos=0, slots=None,
                 documents=None):
        """Final normalised hidden states (B, T, C).

        tokens: (B, T) ids, or embeds: (B, T, C) input vectors (image patches, soft prompts);
        start_pos: absolute position of the first token, an int or a (B,) tensor;
        slots: (B,) rows of `cache` these sequences use (default: rows 0..B-1);
        documents: (B, T) for packed training rows: which example each token belongs to (positions
        restart and attention stays within each; see `Positions`).
        """
        if embeds is None:
            embeds = self.tok_embeddings(tokens)
        x = embeds.to(self.tok_embeddings.weight.dtype)
        if self.config.embed_scale:
            x = x * torch.tensor(math.sqrt(self.config.dim), dtype=x.dtype)
        B, T, _ = x.shape
        if documents is not None and (cache is not None or isinstance(start_pos, torch.Tensor) or start_pos != 0):
            raise ValueError("packed rows (documents) are whole sequences: no cache, start_pos 0")
        where = Positions(B, T, start_pos, slots, x.device, documents)
        if where.key_len > self.config.max_seq_len:
            raise ValueError(f"position {where.key_len - 1} is past the context window "
                             f"({self.config.max_seq_len} tokens)")
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(where.q_pos)
            ropes = {False: None, True: None}
        else:
            tables = {id(t): (t[0][where.q_pos][:, :, None], t[1][where.q_pos][:, :, None])  # (B, T, 1, D/2)
                      for t in self.rope.values()}
            ropes = {local: tables[id(t)] for local, t in self.rope.items()}
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.layers:
            rope = ropes[block.attn.window is not None]
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, where, cache, use_reentrant=False)
            else:
                x = block(x, rope, where, cache)
        return self.norm(x) if self.norm is not None else x

    def forward(self, tokens=None, *, embeds=None, cache=None, start_pos=0, slots=None, last=None, documents=None,
                targets=None):
        """Logits (B, T, V); with `last` (B,) indices, only at those positions: (B, V).
        With `targets` (B, T) instead: the cross-entropy summed over targets other than IGNORE.

        Computing the output layer only where a next token is sampled saves most of the work of a
        long prompt (the vocabulary projection is the largest matrix in a small model). The loss
        is computed inside forward, where FSDP2's hooks have the output weights gathered.
        """
        h = self.features(tokens, embeds=embeds, cache=cache, start_pos=start_pos, slots=slots, documents=documents)
        if targets is not None:
            return self.output_loss(h.flatten(0, -2), targets.flatten())
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last]
        return self.project(h)

    def output_loss(self, h, targets):
        """Σ cross-entropy of the logits at final hidden states h (N, C) against targets (N,),
        IGNORE taking no part."""
        return summed_loss(self.project(h), targets)

    def project(self, h):
        """Final hidden states (..., C) → logits (..., V): the output layer, soft-capped if configured."""
        logits = self.output(h)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
