"""Hyperparameters of the NewBie Next-DiT (spec §2.1).

Every field can be inferred from a checkpoint's tensor shapes except the RoPE split of the head
dimension (``axes_dims``), which for the real model is fixed at [32, 32, 32] and for tiny test
checkpoints is recorded in the safetensors metadata (see ``loading.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    n_layers: int
    n_noise_refiner: int
    n_context_refiner: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int                      # SwiGLU hidden size (w1/w3 rows)
    cap_feat_dim: int                 # Gemma hidden size (2560 for Gemma 3 4B)
    clip_text_dim: int                # Jina CLIP v2 pooled size (1024)
    adaln_dim: int                    # = min(dim, 1024): timestep / adaLN vector size
    in_channels: int = 16             # FLUX VAE latent channels
    patch_size: int = 2
    axes_dims: tuple[int, ...] = (32, 32, 32)   # RoPE head-dim split: caption/seq, row, column
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    timestep_freq_dim: int = 256      # sinusoidal timestep features (§2.3)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"DiTConfig: dim {self.dim} is not a multiple of n_heads {self.n_heads}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"DiTConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}.")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"DiTConfig: axes_dims {list(self.axes_dims)} must be even and sum to the head dim "
                f"{self.head_dim}.")
        object.__setattr__(self, "axes_dims", tuple(int(d) for d in self.axes_dims))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_features(self) -> int:
        """Length of one patch vector: p * p * C (64 for NewBie)."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def qkv_rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def n_blocks(self) -> int:
        return self.n_context_refiner + self.n_noise_refiner + self.n_layers

    @classmethod
    def newbie_exp01(cls) -> "DiTConfig":
        """The published NewBie-image-Exp0.1 transformer (3,486,636,096 parameters)."""
        return cls(dim=2304, n_layers=36, n_noise_refiner=2, n_context_refiner=2, n_heads=24,
                   n_kv_heads=8, ffn_dim=9216, cap_feat_dim=2560, clip_text_dim=1024, adaln_dim=1024)

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """The test-sized model written by ``newbie_core.tiny.dit`` (fits the tiny Gemma/Jina)."""
        return cls(dim=96, n_layers=3, n_noise_refiner=2, n_context_refiner=2, n_heads=3,
                   n_kv_heads=1, ffn_dim=256, cap_feat_dim=64, clip_text_dim=32, adaln_dim=96,
                   axes_dims=(8, 12, 12))


@dataclass(frozen=True)
class ActivationChunks:
    """Activation-peak controls that placement chooses (``None`` = no chunking).

    attn_query_chunk: query rows per SDPA call (all keys each time); bounds the attention
        score workspace of the math/mem-efficient kernels.
    ffn_token_chunk: tokens (batch * sequence, flattened) per SwiGLU pass; bounds the two
        (tokens, ffn_dim) hidden products.
    """
    attn_query_chunk: int | None = None
    ffn_token_chunk: int | None = None

    def __post_init__(self) -> None:
        for name in ("attn_query_chunk", "ffn_token_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ActivationChunks.{name} must be a positive int or None, got {value}.")
