"""3-axis rotary position embedding of the Next-DiT (spec §2.6).

Each token carries integer positions (p0, p1, p2): caption index, patch row, patch column. The
head dimension is split into ``axes_dims`` pieces; piece ``a`` rotates adjacent pairs
(x[2j], x[2j+1]) by ``p_a * theta ** (-2k / d_a)``. Angles are computed on the fly (float64, then
float32), so unlike the official precomputed tables there is no 1023-token caption limit. The
rotation itself is fused with the QK-norm (``fused.norm_rope``).
"""

from __future__ import annotations

import torch


def caption_positions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, L, 3) positions of caption tokens: (j, 0, 0). Padding gets harmless positions too."""
    pos = torch.zeros(batch, length, 3, dtype=torch.int64, device=device)
    pos[:, :, 0] = torch.arange(length, device=device)
    return pos


def image_positions(cap_lens: list[int], h_tokens: int, w_tokens: int,
                    device: torch.device) -> torch.Tensor:
    """(B, N, 3) positions of image tokens: (L_i, row, col), row-major over the patch grid."""
    rows = torch.arange(h_tokens, device=device).repeat_interleave(w_tokens)   # (N,)
    cols = torch.arange(w_tokens, device=device).repeat(h_tokens)              # (N,)
    pos = torch.empty(len(cap_lens), h_tokens * w_tokens, 3, dtype=torch.int64, device=device)
    pos[:, :, 0] = torch.tensor(cap_lens, dtype=torch.int64, device=device)[:, None]
    pos[:, :, 1] = rows
    pos[:, :, 2] = cols
    return pos


def rope_cos_sin(positions: torch.Tensor, axes_dims: tuple[int, ...],
                 theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, 3) integer positions -> cos, sin of shape (B, S, head_dim / 2), float32.

    Pair j of the head vector belongs to axis a = the axis whose slice of pairs contains j; the
    angle is p_a * inv_freq_k. float64 for the product (positions can be large), float32 result.
    """
    pos = positions.to(torch.float64)
    angles = []
    for axis, d in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        angles.append(pos[..., axis, None] * inv_freq)                    # (B, S, d/2)
    angle = torch.cat(angles, dim=-1).to(torch.float32)                   # (B, S, head_dim/2)
    return torch.cos(angle), torch.sin(angle)
