"""NewBie-image-Exp0.1 Next-DiT (``NextDiT_CLIP``), written from spec §2.

Module names equal the official checkpoint's state-dict prefixes, so ``state_dict()`` keys match
the published file one to one (spec §2.14). The 40 heavy blocks run only through
``self.block_runner`` in the order of :meth:`NextDiT.block_sequence` (the placement seam, see
``newbie_core/models/blocks.py``); everything else is a plain resident submodule.

Conventions (spec §2.11): ``x`` is the normalised latent, ``t`` the flow time with 0 = noise and
1 = clean, and the output is the raw velocity (x_clean - noise), not negated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import BlockRunner, run_block_directly
from .attention import KeyPadding, RMSNorm
from .blocks import JointTransformerBlock
from .config import ActivationChunks, DiTConfig
from .fused import EAGER, Kernels
from .embedders import FinalLayer, TimestepEmbedder, patchify, unpatchify
from .rope import caption_positions, image_positions, rope_cos_sin


class NextDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, a, eps = config.dim, config.adaln_dim, config.norm_eps
        self.x_embedder = nn.Linear(config.patch_features, dim)
        self.t_embedder = TimestepEmbedder(a, config.timestep_freq_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(config.cap_feat_dim, eps),
                                          nn.Linear(config.cap_feat_dim, dim))
        self.clip_text_pooled_proj = nn.Sequential(RMSNorm(config.clip_text_dim, eps),
                                                   nn.Linear(config.clip_text_dim, config.clip_text_dim))
        self.time_text_embed = nn.Sequential(nn.SiLU(), nn.Linear(a + config.clip_text_dim, a))
        self.context_refiner = nn.ModuleList(
            JointTransformerBlock(config, modulation=False) for _ in range(config.n_context_refiner))
        self.noise_refiner = nn.ModuleList(
            JointTransformerBlock(config, modulation=True) for _ in range(config.n_noise_refiner))
        self.layers = nn.ModuleList(
            JointTransformerBlock(config, modulation=True) for _ in range(config.n_layers))
        self.norm_final = RMSNorm(dim, eps)     # in the official checkpoint, never used in forward
        self.final_layer = FinalLayer(dim, a, config.patch_features)
        self.block_runner: BlockRunner = run_block_directly
        self._chunking = ActivationChunks()
        self._kernels = EAGER
        self._layout: tuple[torch.Tensor, tuple, TokenLayout] | None = None   # (mask, sizes, layout)

    # -- placement seam ---------------------------------------------------------------------
    def block_sequence(self) -> list[tuple[str, nn.Module]]:
        """The 40 blocks in execution order, named by their state-dict prefixes."""
        return ([(f"context_refiner.{i}", b) for i, b in enumerate(self.context_refiner)]
                + [(f"noise_refiner.{i}", b) for i, b in enumerate(self.noise_refiner)]
                + [(f"layers.{i}", b) for i, b in enumerate(self.layers)])

    def caption_blocks(self) -> tuple[str, ...]:
        """The blocks :meth:`refine_caption` runs: with its output passed to ``forward``, they run
        once per conditioning instead of once per step (placement's ``once`` blocks)."""
        return tuple(f"context_refiner.{i}" for i in range(len(self.context_refiner)))

    @property
    def chunking(self) -> ActivationChunks:
        return self._chunking

    def set_chunking(self, chunks: ActivationChunks) -> None:
        """Apply attention-query / FFN-token chunk sizes to every block."""
        self._chunking = chunks
        for _, block in self.block_sequence():
            block.attention.query_chunk = chunks.attn_query_chunk
            block.feed_forward.token_chunk = chunks.ffn_token_chunk

    @property
    def kernels(self) -> Kernels:
        return self._kernels

    def set_kernels(self, kernels: Kernels) -> None:
        """Use these fused kernels (eager or compiled, see ``fused.py``) in every block."""
        self._kernels = kernels
        for _, block in self.block_sequence():
            block.kernels = block.attention.kernels = block.feed_forward.kernels = kernels

    # -- conditioning -----------------------------------------------------------------------
    def adaln_vector(self, t: torch.Tensor, clip_text_pooled: torch.Tensor | None) -> torch.Tensor:
        """c = time_text_embed(SiLU([t_emb, proj(pooled)])) -> (B, adaln_dim) (spec §2.3).

        Without a pooled vector the official code falls back to c = t_emb; the model was never
        trained that way, so callers should always pass one.
        """
        t_emb = self.t_embedder(t)                                            # (B, A)
        if clip_text_pooled is None:
            return t_emb
        pooled = self.clip_text_pooled_proj(clip_text_pooled.to(t_emb.dtype))  # (B, clip)
        return self.time_text_embed(torch.cat([t_emb, pooled], dim=-1))        # (B, A)

    def _token_layout(self, cap_mask: torch.Tensor, cap_feats: torch.Tensor, batch: int, hp: int, wp: int,
                      device: torch.device) -> TokenLayout:
        """The last layout again when called with the same mask tensor and sizes (the sampler
        passes the same conditioning every step and never modifies it in place)."""
        key = (tuple(cap_feats.shape), batch, hp, wp, device)
        if self._layout is not None and self._layout[0] is cap_mask and self._layout[1] == key:
            return self._layout[2]
        layout = token_layout(self.config, cap_mask, cap_feats, batch, hp, wp, device)
        self._layout = (cap_mask, key, layout)
        return layout

    def to_empty(self, *, device, recurse: bool = True) -> "NextDiT":
        """Also drops the cached token layout, whose RoPE tables live on the old device."""
        self._layout = None
        return super().to_empty(device=device, recurse=recurse)

    # -- caption --------------------------------------------------------------------------
    def refine_caption(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> torch.Tensor:
        """(B,L,cap_dim) Gemma features, (B,L) right-padded mask -> (B,L,dim) caption tokens after
        the cap embedder and the context refiner.

        Those see the conditioning alone (no latent, no time, no modulation), so a sampler makes
        them once per conditioning and passes them to every step's ``forward`` as ``caption``:
        the same code on the same values as a forward that makes them itself, without the two
        refiner blocks (2 x 156 MB in bf16) in every step's compute and copies.
        """
        _, mask, rope = caption_layout(self.config, cap_mask, cap_feats, cap_feats.shape[0], cap_feats.device)
        return self._refined_caption(cap_feats, mask, rope)

    def _refined_caption(self, cap_feats: torch.Tensor, mask: KeyPadding | None,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cap = self.cap_embedder(cap_feats.to(self.x_embedder.weight.dtype))    # (B, L, dim)
        for index, block in enumerate(self.context_refiner):
            cap = self.block_runner(index, block, cap, mask, *rope)
        return cap

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor,
                cap_mask: torch.Tensor, clip_text_pooled: torch.Tensor | None,
                caption: torch.Tensor | None = None) -> torch.Tensor:
        """(B,16,H,W) latent, (B,) time, (B,L,cap_dim) Gemma features, (B,L) right-padded mask,
        (B,clip_dim) Jina pooled -> (B,16,H,W) velocity, in x's dtype. ``caption``: these
        features' :meth:`refine_caption`, made once for every step's forward."""
        cfg, p = self.config, self.config.patch_size
        b, _, h, w = x.shape
        t = _batch_time(t, b)
        dtype = self.x_embedder.weight.dtype
        hp, wp = h // p, w // p
        lay = self._token_layout(cap_mask, cap_feats, b, hp, wp, x.device)
        n_img = hp * wp

        c = self.adaln_vector(t, clip_text_pooled)                               # (B, A)
        if caption is None:
            cap = self._refined_caption(cap_feats, lay.cap_mask, lay.cap_rope)  # (B, L, dim)
        elif caption.shape != (b, cap_feats.shape[1], cfg.dim):
            raise ValueError(f"NextDiT: caption {tuple(caption.shape)} is not the refined caption of cap_feats "
                             f"{tuple(cap_feats.shape)} (expected ({b}, {cap_feats.shape[1]}, {cfg.dim})).")
        else:
            cap = caption
        img = self.x_embedder(patchify(_check_latent(x, cfg).to(dtype), p))      # (B, N, dim)
        img_cos, img_sin = lay.img_rope

        index = len(self.context_refiner)
        for block in self.noise_refiner:
            img = self.block_runner(index, block, img, None, img_cos, img_sin, c)
            index += 1

        cap_lens = lay.cap_lens
        joint = _pack_tokens(cap, img, cap_lens)                                # (B, S, dim)
        joint_mask = lay.joint_mask
        joint_cos, joint_sin = lay.joint_rope
        del cap, img
        for block in self.layers:
            joint = self.block_runner(index, block, joint, joint_mask, joint_cos, joint_sin, c)
            index += 1

        img_tokens = torch.stack([joint[i, n:n + n_img] for i, n in enumerate(cap_lens)])  # (B, N, dim)
        out = self.final_layer(img_tokens, c)                                    # (B, N, p*p*C)
        return unpatchify(out, p, cfg.in_channels, h, w).to(x.dtype)


@dataclass(frozen=True)
class TokenLayout:
    """Where every token of a forward sits, and its RoPE tables: fixed by the caption mask and
    the latent size, so the sampler's steps share one (no host sync, no table rebuild per step)."""
    cap_lens: tuple[int, ...]
    cap_mask: KeyPadding | None            # None when no caption is padded
    joint_mask: KeyPadding | None
    cap_rope: tuple[torch.Tensor, torch.Tensor]
    img_rope: tuple[torch.Tensor, torch.Tensor]
    joint_rope: tuple[torch.Tensor, torch.Tensor]


def token_layout(config: DiTConfig, cap_mask: torch.Tensor, cap_feats: torch.Tensor, batch: int,
                 hp: int, wp: int, device: torch.device) -> TokenLayout:
    cap_lens, cap_mask_keys, cap_rope = caption_layout(config, cap_mask, cap_feats, batch, device)
    n_img = hp * wp
    axes, theta = config.axes_dims, config.rope_theta
    img_pos = image_positions(cap_lens, hp, wp, device)                         # (B, N, 3)
    joint_valid, joint_pos = _joint_positions(cap_lens, img_pos)
    return TokenLayout(
        cap_lens=tuple(cap_lens),
        cap_mask=cap_mask_keys,
        joint_mask=None if joint_valid is None else KeyPadding(tuple(n + n_img for n in cap_lens), joint_valid),
        cap_rope=cap_rope,
        img_rope=rope_cos_sin(img_pos, axes, theta),
        joint_rope=rope_cos_sin(joint_pos, axes, theta))


def caption_layout(config: DiTConfig, cap_mask: torch.Tensor, cap_feats: torch.Tensor, batch: int,
                   device: torch.device) -> tuple[list[int], KeyPadding | None, tuple[torch.Tensor, torch.Tensor]]:
    """The caption's valid lengths, key padding (None when no caption is padded) and RoPE tables:
    all the context refiner needs, shared by the forward's layout and ``refine_caption``."""
    cap_lens, cap_valid = _caption_lengths(cap_mask, cap_feats, batch)
    length = cap_feats.shape[1]
    padding = None if all(n == length for n in cap_lens) else KeyPadding(tuple(cap_lens), cap_valid)
    return cap_lens, padding, rope_cos_sin(caption_positions(batch, length, device), config.axes_dims,
                                           config.rope_theta)


def _batch_time(t: torch.Tensor | float, batch: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"NextDiT: t must have shape ({batch},) or be a scalar, got {tuple(t.shape)}.")
    return t


def _check_latent(x: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"NextDiT: expected a (B, {cfg.in_channels}, H, W) latent, got {tuple(x.shape)}.")
    if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
        raise ValueError(f"NextDiT: latent height and width must be multiples of {cfg.patch_size}, "
                         f"got {tuple(x.shape[2:])}; pad the latent (image sides multiple of 16 px).")
    return x


def _caption_lengths(cap_mask: torch.Tensor, cap_feats: torch.Tensor,
                     batch: int) -> tuple[list[int], torch.Tensor]:
    """Valid caption lengths L_i and the bool mask, checking that padding is on the right."""
    if cap_mask.shape != cap_feats.shape[:2] or cap_mask.shape[0] != batch:
        raise ValueError(f"NextDiT: cap_mask {tuple(cap_mask.shape)} does not match cap_feats "
                         f"{tuple(cap_feats.shape)} and batch {batch}.")
    valid = cap_mask.bool()
    lens = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device)[None] < lens[:, None]
    if not torch.equal(prefix, valid):
        raise ValueError("NextDiT: cap_mask must be right-padded (valid tokens first, then padding).")
    return lens.tolist(), valid


def _joint_positions(cap_lens: list[int], img_pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per sample: [valid caption (L_i)] [image (N)] [padding] (spec §2.6) -> the (B, S) key mask
    (None when nothing is padded) and the (B, S, 3) positions."""
    b, n_img, _ = img_pos.shape
    seq = max(cap_lens) + n_img
    pos = torch.zeros(b, seq, 3, dtype=torch.int64, device=img_pos.device)
    mask = torch.zeros(b, seq, dtype=torch.bool, device=img_pos.device)
    for i, n in enumerate(cap_lens):
        pos[i, :n, 0] = torch.arange(n, device=img_pos.device)
        pos[i, n:n + n_img] = img_pos[i]
        mask[i, :n + n_img] = True
    return (None if min(cap_lens) + n_img == seq else mask), pos


def _pack_tokens(cap: torch.Tensor, img: torch.Tensor, cap_lens: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The joint sequence (B, S, dim) in the order of :func:`_joint_positions`, zeros as padding."""
    b, n_img, dim = img.shape
    joint = img.new_zeros(b, max(cap_lens) + n_img, dim)
    for i, n in enumerate(cap_lens):
        joint[i, :n] = cap[i, :n]
        joint[i, n:n + n_img] = img[i]
    return joint

