"""Model configuration: one flat dataclass for every architecture plinth runs, plus named presets.

Architecture differences are fields named for what they do (``mlp``, ``qk_norm``, ``embed_scale``,
``sliding_window``), never subclasses or checks on a model's name, so that a new model family is
new data, not new code.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from plinth.errors import PlinthError

MLP_KINDS = ("swiglu", "geglu", "gelu")
NORM_KINDS = ("rms", "layer")
POSITION_KINDS = ("rope", "learned", "sincos2d")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64                        # width of the residual stream
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None        # grouped-query attention; None = n_heads (plain MHA)
    head_dim: int | None = None          # None = dim // n_heads
    ffn_dim: int | None = None           # None = 4 * dim
    max_seq_len: int = 2048              # context window
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # theta of sliding-window layers; None = rope_theta
    tie_embeddings: bool = True          # output projection shares the token embedding
    mlp: str = "swiglu"                  # "swiglu" (SiLU gate), "geglu" (tanh-GELU gate), "gelu" (no gate, BERT)
    norm: str = "rms"                    # "rms" (RMSNorm) or "layer" (LayerNorm with bias, BERT)
    bias: bool = False                   # biases in the attention and MLP linear layers
    position: str = "rope"               # "rope" (rotary) or "learned" (absolute position embeddings)
    post_norm: bool = False              # normalise after each residual add (BERT) instead of before
    embed_norm: bool = False             # normalise the embeddings before the first block
    qk_norm: bool = False                # RMSNorm on each query/key head before RoPE
    sandwich_norm: bool = False          # extra RMSNorm on the attention and MLP outputs
    embed_scale: bool = False            # multiply token embeddings by sqrt(dim)
    attn_scale: float | None = None      # softmax scale; None = 1/sqrt(head_dim)
    sliding_window: int | None = None    # local attention span of sliding-window layers
    global_every: int = 1                # with sliding_window: every Nth layer attends globally
    causal: bool = True                  # False: bidirectional (encoders, ViT)
    final_softcap: float | None = None   # tanh soft-capping of the output logits
    # Images (a ViT): with patch_size set, inputs are square patches of an image, embedded by one
    # linear layer, instead of token ids; the text-only fields (vocab_size, tie_embeddings) go unused.
    patch_size: int = 0                  # side of each square patch in pixels; 0 = a text model
    image_size: int = 0                  # images are resized to image_size × image_size (no crop)
    channels: int = 1                    # 1 (grey) or 3 (RGB); other images are converted
    pixel_mean: list[float] = field(default_factory=lambda: [0.5])  # per channel: (pixel/255 - mean) / std
    pixel_std: list[float] = field(default_factory=lambda: [0.5])
    class_token: bool = False            # prepend a learned vector that heads read (else they average the patches)
    # Conditioning (a diffusion transformer): each block's norms are scaled and shifted, and its residual
    # branches gated, by vectors computed from a (B, dim) conditioning input (adaLN-Zero, DiT).
    adaptive_norm: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        self.validate()

    def validate(self):
        def bad(message):
            raise PlinthError(f"invalid model config: {message}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_dim", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(f"{name}={value!r}; it must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve the same number of query heads")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} is odd; rotary embeddings need an even head_dim")
        for name, kinds in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("position", POSITION_KINDS)):
            if getattr(self, name) not in kinds:
                bad(f"{name}={getattr(self, name)!r}; choose one of {', '.join(kinds)}")
        if self.adaptive_norm and self.post_norm:
            bad("adaptive_norm modulates the norms before each sublayer; it does not combine with post_norm")
        if self.is_image:
            self.validate_image(bad)
        elif self.position == "sincos2d" or self.class_token:
            bad("position=sincos2d and class_token are for images; set patch_size and image_size too")

    def validate_image(self, bad):
        if self.image_size <= 0 or self.image_size % self.patch_size:
            bad(f"image_size={self.image_size} must be a positive multiple of patch_size={self.patch_size}")
        if self.channels not in (1, 3):
            bad(f"channels={self.channels}; images have 1 (grey) or 3 (RGB) channels")
        if len(self.pixel_mean) != self.channels or len(self.pixel_std) != self.channels:
            bad(f"pixel_mean and pixel_std need one value per channel ({self.channels}), got "
                f"{self.pixel_mean} and {self.pixel_std}")
        if not all(s > 0 for s in self.pixel_std):
            bad(f"pixel_std={self.pixel_std}; every value must be positive")
        if self.position == "rope" or self.causal:
            bad("an image model attends both ways with learned or sincos2d positions: set causal: false and "
                "position: learned or sincos2d")
        if self.position == "sincos2d" and self.dim % 4:
            bad(f"dim={self.dim}: 2-D sin-cos positions need a width divisible by 4")
        if self.max_seq_len < self.n_patches + self.class_token:
            bad(f"max_seq_len={self.max_seq_len} is shorter than the {self.n_patches} patches"
                f"{' and class token' if self.class_token else ''} of an image")

    @property
    def is_image(self) -> bool:
        return self.patch_size > 0

    @property
    def grid(self) -> int:
        """Patches along each side of an image."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        """Pixels in one patch, over all channels: the width of the patch embedding's input."""
        return self.channels * self.patch_size ** 2

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses local (sliding-window) attention."""
        return self.sliding_window is not None and (layer + 1) % self.global_every != 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PlinthError(f"unknown model config field(s): {', '.join(unknown)}; "
                              f"known fields are: {', '.join(sorted(known))}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    # Unit tests: small enough that a forward pass takes milliseconds.
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=256),
    # Unit tests of image models: 8×8 grey images in 2×2 patches.
    "vit-tiny": dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=17, causal=False, norm="layer",
                     mlp="gelu", bias=True, position="sincos2d", patch_size=2, image_size=8, class_token=True),
    # Fashion-MNIST: 28×28 grey images in 49 patches of 4×4, a class token, ViT's pre-norm blocks.
    "vit-fashion": dict(dim=192, n_layers=6, n_heads=3, ffn_dim=768, max_seq_len=50, causal=False, norm="layer",
                        mlp="gelu", bias=True, position="sincos2d", patch_size=4, image_size=28, class_token=True,
                        pixel_mean=[0.286], pixel_std=[0.353]),
    # easy-VQA's shapes: 64×64 colour images in 64 patches of 8×8, the image encoder of an image+text model.
    "vit-shapes": dict(dim=192, n_layers=6, n_heads=3, ffn_dim=768, max_seq_len=65, causal=False, norm="layer",
                       mlp="gelu", bias=True, position="sincos2d", patch_size=8, image_size=64, channels=3,
                       class_token=True, pixel_mean=[0.904, 0.901, 0.895], pixel_std=[0.188, 0.195, 0.211]),
    # Unit tests of diffusion: 8×8 grey images in 2×2 patches, conditioned through adaptive norms.
    "dit-tiny": dict(dim=64, n_layers=2, n_heads=2, ffn_dim=128, max_seq_len=16, causal=False, norm="layer",
                     mlp="gelu", bias=True, position="sincos2d", patch_size=2, image_size=8, adaptive_norm=True),
    # Fashion-MNIST generation: 28×28 grey images in 49 patches of 4×4, DiT blocks (adaLN-Zero).
    "dit-fashion": dict(dim=192, n_layers=6, n_heads=3, ffn_dim=768, max_seq_len=49, causal=False, norm="layer",
                        mlp="gelu", bias=True, position="sincos2d", patch_size=4, image_size=28, adaptive_norm=True),
    # SmolLM2-135M (llama architecture), as shipped in the default GGUF.
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise PlinthError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


__all__ = ["ModelConfig", "PRESETS", "preset"]
