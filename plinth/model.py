"""The Transformer: one model definition for pretraining, fine-tuning, loading real weights and serving.

Read top to bottom: RMSNorm, rotary embeddings, the attention mask, positions, attention, MLP,
block, model. Every architecture difference is a `ModelConfig` field (see plinth/config.py). A KV
cache reaches attention through the small interface of a per-pass cache view (plinth/kv_cache.py):
the model knows nothing of who owns the cache or which cache rows (slots) a pass's rows use.
Shapes in comments: B batch, T new tokens, L keys (past + new), H query heads, K key/value heads,
D head dim, C model width, V vocabulary.

    model = Transformer(config)                      # built on the meta device: no memory yet
    model.to_empty(device="cpu"); model.init_weights()   # or model.load_weights(state_dict)
    logits = model(tokens)                           # (B, T, V)
    loss = model(tokens, targets=next_tokens)        # training: the summed cross-entropy
"""
from __future__ import annotations

import math
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from plinth import onednn
from plinth.config import ModelConfig
from plinth.loss import summed_loss
from plinth.vision.patches import patchify, sincos_2d


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


def attention_mask(q_pos, key_len: int | torch.Tensor, causal: bool, window: int | None):
    """Which keys each query may see: (B, 1, T, L) booleans, True = attend.

    q_pos: (B, T) absolute positions of the queries; keys sit at positions 0..key_len-1, or, for a
    (B, L) tensor key_len, at those positions (a ring of the KV cache's; negative: no key there).
    """
    ordered = not isinstance(key_len, torch.Tensor)
    k_pos = torch.arange(key_len, device=q_pos.device)[None] if ordered else key_len  # (B or 1, L)
    distance = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, L)
    allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        allowed &= distance < window
    if not ordered:
        allowed &= k_pos[:, None, :] >= 0
    return allowed[:, None]


def positions_in_documents(documents):
    """(B, T) document numbers of packed rows → each token's position within its own document
    (0, 1, 2, ... restarting where the number changes)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


SHORT_ROWS = 512  # bfloat16 rows up to this long: attention by plain matmuls (see Attention._by_matmuls)
# Passes of fewer new tokens per row than this attend as decoding does, token by token (see
# Attention._decode): speculative decoding checks its guesses in such passes (plinth/speculative.py),
# and must get the bits decoding gets. Longer passes (prompts) take the faster prompt kernels.
DECODE_TOKENS = 16
ADAPTER_ROWS: ContextVar[torch.Tensor | None] = ContextVar("adapter_rows", default=None)
"""During a forward pass with `adapters`: (B,) which LoRA adapter each row uses (0 = none), read by
layers that serve several adapters at once (plinth/adapt/multi_lora.py)."""


class Positions:
    """Where a forward pass's tokens sit: absolute positions, and which keys each may see.

    start: the absolute position of each row's first new token, an int or (B,) (from the KV cache
    view; 0 without a cache). documents: (B, T) for packed training rows (several examples one
    after another, see plinth/adapt/examples.py `pack`): positions restart at 0 with each document
    and a token attends only within its own. Whole sequences from position 0 only, no cache."""

    def __init__(self, B: int, T: int, start, device, documents=None):
        self.start, self.T, self.documents = start, T, documents
        if documents is None:
            start_t = torch.as_tensor(start, device=device).reshape(-1).expand(B)
            self.q_pos = start_t[:, None] + torch.arange(T, device=device)  # (B, T)
        else:
            self.q_pos = positions_in_documents(documents)
        self.key_len = int(start.max()) + T if isinstance(start, torch.Tensor) else start + T

    def mask(self, causal: bool, window: int | None, k_pos=None):
        """None when every query sees every key up to itself in the simple way SDPA understands.
        k_pos: (B, L) the keys' positions where they are not 0..key_len-1 (see `attention_mask`)."""
        if k_pos is not None:
            return attention_mask(self.q_pos, k_pos, causal, window)
        if self.documents is not None:  # block-diagonal: the usual mask over row indices, within documents
            index = torch.arange(self.T, device=self.documents.device).expand_as(self.documents)
            same = self.documents[:, :, None] == self.documents[:, None, :]  # (B, T, T)
            return attention_mask(index, self.T, causal, window) & same[:, None]
        uniform = isinstance(self.start, int)
        if uniform and window is None and (self.T == 1 or not causal):
            return None  # a single new token (or bidirectional) attends to all keys so far
        return attention_mask(self.q_pos, self.key_len, causal, window)

    def whole(self, window: int | None) -> bool:
        """True for a pass over whole sequences from position 0 without a window (training, a
        first prefill, an encoder): every query sees every key, or every key up to itself."""
        return window is None and isinstance(self.start, int) and self.start == 0 and self.T > 1 and self.documents is None


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

    def forward(self, x, rope, where: Positions, cache):
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
            qk = apply_rope(qk, *rope, cache.dtype if cache is not None else None)  # the dtype attention runs in
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if T < DECODE_TOKENS and self.causal and cache is not None:
            cache.write(self.layer, k, v)
            out = self._decode(q, cache)
        else:
            k_pos = None  # the keys' positions, where they are not 0..L-1 (a ring's)
            if cache is not None:
                k, v, k_pos = cache.update(self.layer, k, v)  # (B, K, L, D)
            with onednn.paused():  # its many small block products run faster on the default path
                out = self._prefill(q.to(k.dtype), k, v, where, k_pos)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))

    def _prefill(self, q, k, v, where: Positions, k_pos=None):
        if where.whole(self.window):
            if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] <= SHORT_ROWS:
                return self._by_matmuls(q, k, v)
            if self.causal:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return self._grouped(q, k, v, where.mask(self.causal, self.window, k_pos))

    def _by_matmuls(self, q, k, v):
        """Attention over whole sequences as two batched matmuls and a float32 softmax, the query
        heads sharing a key head folded into the query axis (no copies of keys and values). In
        bfloat16 on a CPU without AMX, PyTorch's fused attention kernel is slower than these two
        matmuls for short rows, forward and much more so backward (causal text and bidirectional
        ViT alike); past SHORT_ROWS tokens the (T, T) scores no longer fit in the CPU's cache and
        the fused kernel wins (benchmarks/train.py and benchmarks/vision.py measure the step)."""
        B, H, T, D = q.shape
        K, group = self.n_kv_heads, self.n_heads // self.n_kv_heads
        scores = torch.matmul((q * self.scale).reshape(B, K, group * T, D), k.transpose(-1, -2))
        scores = scores.view(B, K, group, T, T)
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), -math.inf)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(weights.view(B, K, group * T, T), v).view(B, H, T, D)

    def _decode(self, q, cache):
        """A few new tokens per row (one when decoding), attending to keys read in place from the
        cache, all rows at once: each key head's `group` queries form one batch of a batched matmul
        over that head's keys. The cache's view decides which rows (S ≥ B) and how many keys the
        batch spans, and masks what a row may not see, so that a row gets the same bits alone or in
        any batch (see plinth/kv_cache.py). Several new tokens go one after another through the
        same products, so each gets the bits it would get decoded alone (speculative decoding)."""
        B, H, T, D = q.shape
        K = self.n_kv_heads
        keys, values = cache.decode_keys(self.layer, B, T)  # (S·K, L, D)
        out = []
        for t in range(T):
            q_t = cache.spread(q[:, :, t].reshape(B, K, H // K, D).to(keys.dtype))  # (S, K, group, D)
            bias = cache.decode_bias(self.layer, K, t)
            scores = torch.baddbmm(bias, q_t.flatten(0, 1), keys.transpose(1, 2), alpha=self.scale)
            out.append(torch.bmm(torch.softmax(scores, dim=-1), values).view(q_t.shape[0], H, 1, D))
        return cache.gather(torch.cat(out, dim=2))  # (B, H, T, D)

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
    first = layers[0].weight
    fused = nn.Linear(first.shape[1], sum(layer.out_features for layer in layers), bias=layers[0].bias is not None,
                      device=first.device, dtype=first.dtype)
    if first.is_meta:  # a model built to receive its weights from a file has none to join yet
        return fused
    fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
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
        # adaLN-Zero (DiT): shift, scale and gate of each sublayer from the conditioning vector; zero
        # at init, so the block starts as the identity.
        self.modulation = nn.Linear(config.dim, 6 * config.dim) if config.adaptive_norm else None

    def forward(self, x, rope, where, cache, condition=None):
        """condition: (B, C) with adaptive_norm, already through its SiLU (see Transformer._features)."""
        if self.post_norm:  # original Transformer / BERT: normalise the sum
            x = self.attn_norm(x + self.attn(x, rope, where, cache))
            return self.mlp_norm(x + self.mlp(x))
        if self.modulation is not None:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(condition)[:, None].chunk(6, dim=-1)
            x = x + gate_a * self.attn(modulate(self.attn_norm(x), shift_a, scale_a), rope, where, cache)
            return x + gate_m * self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))
        h = self.attn(self.attn_norm(x), rope, where, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


def modulate(x, shift, scale):
    """Adaptive norm: normalised x (B, T, C) scaled and shifted per row by (B, 1, C) vectors."""
    return x * (1 + scale) + shift


def embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised (`init_weights` or loading fills it): on the meta
    device, nn.Embedding's own random init costs a second of one-time setup in PyTorch."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Transformer(nn.Module):
    """Text in (token ids → embeddings, logits out) or, with `config.patch_size`, images in (a ViT:
    each patch's pixels → one linear layer, an optional class token, features out for a head or a
    pixel decoder). The blocks are the same."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        text = not config.is_image
        with torch.device("meta"):
            self.tok_embeddings = embedding(config.vocab_size, config.dim) if text else None
            self.patch_embeddings = None if text else nn.Linear(config.patch_dim, config.dim)
            self.class_token = nn.Parameter(torch.empty(1, 1, config.dim)) if config.class_token else None
            learned = config.position == "learned"
            self.pos_embeddings = embedding(config.max_seq_len, config.dim) if learned else None
            self.embed_norm = make_norm(config, config.dim) if config.embed_norm else None
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = make_norm(config, config.dim) if not config.post_norm else None
            self.norm_modulation = nn.Linear(config.dim, 2 * config.dim) if config.adaptive_norm else None
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False) if text else None
        self._tie()
        # Set by the training loop: keep only each block's input and recompute the rest in backward.
        self.activation_checkpointing = False

    @property
    def input_layer(self) -> nn.Module:
        """The token embedding, or an image model's patch embedding: its dtype is the model's."""
        return self.tok_embeddings if self.tok_embeddings is not None else self.patch_embeddings

    def _tie(self):
        if self.config.tie_embeddings and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """Fresh weights for training from scratch:
        - token embeddings and every linear layer: normal(0, 0.02);
        - the last projection of each sublayer (attention `wo`, MLP `w_down`): normal(0, 0.02/sqrt(2 n_layers)),
          so the residual stream's variance does not grow with depth (GPT-2);
        - learned position embeddings and the class token (if any): normal(0, 0.02);
        - every norm weight: 1, and LayerNorm and linear biases: 0;
        - with adaptive_norm, the modulation layers (each block's and the final norm's): 0, so every
          block starts as the identity and the final norm unmodulated (adaLN-Zero);
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
        for name, module in self.named_modules():
            if name.endswith("modulation"):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, 0.0, std)
        self._tie()
        self.init_buffers()

    def init_buffers(self):
        """Rotary tables and 2-D sin-cos positions are derived data, not weights: rebuilt after
        loading, never saved."""
        c, device = self.config, self.input_layer.weight.device
        self.patch_positions = sincos_2d(c.grid, c.dim).to(device) if c.position == "sincos2d" else None
        global_rope = rope_tables(c.head_dim, c.rope_theta, c.max_seq_len)
        local_theta = c.rope_local_theta or c.rope_theta
        local_rope = global_rope if local_theta == c.rope_theta else rope_tables(c.head_dim, local_theta, c.max_seq_len)
        self.rope = {False: tuple(t.to(device) for t in global_rope), True: tuple(t.to(device) for t in local_rope)}

    def load_weights(self, state_dict: dict[str, torch.Tensor]):
        """Load a full state dict (strict: a missing or unexpected key is an error naming it)."""
        if self.config.tie_embeddings and self.output is not None and "output.weight" not in state_dict:
            state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
        if self.input_layer.weight.is_meta:
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

    def per_row_parameters(self) -> int:
        """How many parameters act once per row rather than at every position: the adaptive-norm
        modulations, fed one conditioning vector per row (what training's FLOP estimate needs)."""
        return sum(p.numel() for name, p in self.named_parameters() if name.rsplit(".", 1)[0].endswith("modulation"))

    # ---- running -------------------------------------------------------------------------------
    def features(self, tokens=None, *, embeds=None, images=None, keep=None, cache=None, documents=None,
                 adapters=None, condition=None):
        """Final normalised hidden states (B, T, C).

        tokens: (B, T) ids, or embeds: (B, T, C) input vectors (soft prompts, projected image
        features), or, for an image model, images: (B, channels, S, S) normalised pixels, of which
        only the patches `keep` (B, n) run when given (a masked autoencoder's visible patches); the
        class token, if any, comes first;
        cache: a KV cache view for this pass (plinth/kv_cache.py `KVCache.view`): where each row's
        new tokens start, and where past keys and values are kept; None = whole sequences from 0;
        documents: (B, T) for packed training rows: which example each token belongs to (positions
        restart and attention stays within each; see `Positions`);
        adapters: (B,) the LoRA adapter each row uses, where several are served (see ADAPTER_ROWS);
        condition: (B, C) with adaptive_norm: what modulates every norm (a diffusion model's timestep
        and prompt, embedded by plinth/vision/diffusion.py).
        """
        if (condition is None) == self.config.adaptive_norm:
            raise ValueError("a model with adaptive_norm needs a condition (B, dim), and only such a model takes one")
        selected = ADAPTER_ROWS.set(adapters)
        try:
            x = self._embed_image(images, keep) if images is not None else \
                (embeds if embeds is not None else self.tok_embeddings(tokens))
            return self._features(x, cache, documents, positioned=images is not None, condition=condition)
        finally:
            ADAPTER_ROWS.reset(selected)

    def _embed_image(self, images, keep):
        """(B, channels, S, S) → (B, [1 +] n, C): each patch embedded and given its position, then
        the `keep` patches only, after the class token."""
        layer = self.patch_embeddings
        x = layer(patchify(images, self.config.patch_size).to(layer.weight.dtype))  # (B, N, C)
        first = int(self.class_token is not None)  # learned positions: the class token has the first
        if self.patch_positions is not None:
            x = x + self.patch_positions.to(x.dtype)
        elif self.pos_embeddings is not None:
            x = x + self.pos_embeddings.weight[first:first + x.shape[1]]
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        if self.class_token is not None:
            cls = self.class_token.to(x.dtype)
            if self.pos_embeddings is not None:
                cls = cls + self.pos_embeddings.weight[0]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def _features(self, embeds, cache, documents, positioned: bool, condition=None):
        """positioned: the inputs already carry their positions (image patches)."""
        x = self.scaled_input(embeds)
        B, T, _ = x.shape
        if documents is not None and cache is not None:
            raise ValueError("packed rows (documents) are whole sequences: no cache")
        where = Positions(B, T, cache.start if cache is not None else 0, x.device, documents)
        if where.key_len > self.config.max_seq_len:
            raise ValueError(f"position {where.key_len - 1} is past the context window "
                             f"({self.config.max_seq_len} tokens)")
        ropes = {False: None, True: None}
        if self.pos_embeddings is not None and not positioned:
            x = x + self.pos_embeddings(where.q_pos)
        elif self.config.position == "rope":
            ropes = self.ropes_at(where.q_pos)
        return self.blocks(x, ropes, where, cache, condition)

    def scaled_input(self, embeds):
        """Input vectors in the model's dtype, scaled where the architecture scales them (Gemma: √width)."""
        x = embeds.to(self.input_layer.weight.dtype)
        if self.config.embed_scale:
            x = x * torch.tensor(math.sqrt(self.config.dim), dtype=x.dtype)
        return x

    def ropes_at(self, q_pos) -> dict:
        """The rotary tables at positions q_pos (B, T): {sliding-window layer?: (cos, sin) (B, T, 1, D/2)}."""
        tables = {id(t): (t[0][q_pos][:, :, None], t[1][q_pos][:, :, None]) for t in self.rope.values()}
        return {local: tables[id(t)] for local, t in self.rope.items()}

    def blocks(self, x, ropes: dict, where, cache, condition=None):
        """The positioned inputs x (B, T, C) through the blocks and the final norm."""
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if condition is not None:
            condition = F.silu(condition.to(x.dtype))  # DiT's adaLN input: SiLU once, then each block's linear
        for block in self.layers:
            rope = ropes[block.attn.window is not None]
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, where, cache, condition, use_reentrant=False)
            else:
                x = block(x, rope, where, cache, condition)
        if self.norm_modulation is not None:
            shift, scale = self.norm_modulation(condition)[:, None].chunk(2, dim=-1)
            return modulate(self.norm(x), shift, scale)
        return self.norm(x) if self.norm is not None else x

    def forward(self, tokens=None, *, embeds=None, cache=None, last=None, documents=None, targets=None,
                adapters=None):
        """Logits (B, T, V); with `last` (B,) indices, only at those positions: (B, V).
        With `targets` (B, T) instead: the cross-entropy summed over targets other than IGNORE.
        The other keywords are those of `features`.

        Computing the output layer only where a next token is sampled saves most of the work of a
        long prompt (the vocabulary projection is the largest matrix in a small model). The loss
        is computed inside forward, where FSDP2's hooks have the output weights gathered.
        """
        h = self.features(tokens, embeds=embeds, cache=cache, documents=documents, adapters=adapters)
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
