"""The one-launch decode of a whole packed block: its row table tiles every tensor, placement's
layouts reach it as the right pieces, and it stays out of the way where it does not apply
(the CUDA tier checks its bits against the per-tensor path: test_gguf_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from newbie_core.models.gguf import codec_name, packed_nbytes
from newbie_core.models.gguf.triton_dequant import BLOCK_ROW, Piece, block_decoder, block_table
from newbie_core.pipeline import placed
from newbie_core.placement.fp8_cuda import FusedUpcast
from newbie_core.placement.layout import PackedTensor, compute_layout, packed_layout

BF16 = torch.bfloat16


def dit_like_layouts(qtype: T, width: int = 512, hidden: int = 1536):
    """A joint block's tensors at small sizes: the matrices packed, norms and bias plain."""
    shapes = {"attention.qkv.weight": (3 * width, width), "attention.out.weight": (width, width),
              "attention.q_norm.weight": (64,), "feed_forward.w1.weight": (hidden, width),
              "feed_forward.w2.weight": (width, hidden), "attention_norm1.weight": (width,),
              "adaLN_modulation.1.weight": (4 * width, 256), "adaLN_modulation.1.bias": (4 * width,)}
    compute = compute_layout([(n, s, BF16) for n, s in shapes.items()])
    packed = {n: PackedTensor(codec_name(qtype), packed_nbytes(qtype, s[0] * s[1]))
              for n, s in shapes.items() if len(s) == 2}
    return packed_layout(compute, packed), compute


def pieces_of(qtype: T) -> list[Piece]:
    storage, compute = dit_like_layouts(qtype)
    return [Piece(qtype if s.codec else None, s.offset, c.offset, c.nbytes // 2)
            for s, c in zip(storage.entries, compute.entries)]


@pytest.mark.parametrize("qtype", tuple(BLOCK_ROW), ids=lambda t: t.name)
def test_the_row_table_tiles_every_tensor_once_and_pads_plain_rows_only_into_alignment_gaps(qtype):
    pieces = pieces_of(qtype)
    table = block_table(pieces, BF16, "cpu").tolist()
    per, nbytes = GGML_QUANT_SIZES[qtype]
    rows_per_program = BLOCK_ROW[qtype][0]
    covered = []
    for packed, src, dst, count in table:
        if packed:
            assert 0 < count <= rows_per_program
            covered.append((dst, dst + count * per, src, src + count * nbytes, True))
        else:
            assert count % 16 == 0 and 0 < count <= rows_per_program * per
            covered.append((dst, dst + count, src, src + count, False))
    covered.sort()
    for p in pieces:
        start, end = p.dst // 2, p.dst // 2 + p.elements
        mine = [c for c in covered if start <= c[0] < end]
        assert mine[0][0] == start
        for a, b in zip(mine, mine[1:]):
            assert a[1] == b[0], "rows follow each other without gap or overlap"
        last = mine[-1][1]
        if p.qtype is None:
            assert end <= last < end + 16 and last <= -(-end // 128) * 128, "padding stays in the gap"
            assert [c[2] - p.src // 2 for c in mine] == [c[0] - start for c in mine], "copied from itself"
        else:
            assert last == end, "packed rows decode exactly the tensor"
            assert mine[0][2] == p.src and mine[-1][3] == p.src + packed_nbytes(qtype, p.elements)


def test_placement_layouts_reach_the_block_kernel_as_pieces(monkeypatch):
    seen = {}
    monkeypatch.setattr(placed, "block_decoder", lambda pieces, dtype, device: seen.setdefault("p", (pieces, dtype)))
    storage, compute = dit_like_layouts(T.Q8_0)
    placed.gguf_block_fuser(storage, compute, torch.device("cuda"))
    pieces, dtype = seen["p"]
    assert dtype is BF16 and pieces == pieces_of(T.Q8_0)
    assert sum(p.qtype is T.Q8_0 for p in pieces) == 5 and sum(p.qtype is None for p in pieces) == 3


def test_the_fuser_declines_blocks_it_cannot_decode_in_one_launch():
    storage, compute = dit_like_layouts(T.Q8_0)
    assert placed.gguf_block_fuser(storage, compute, torch.device("cpu")) is None, "CPU: the torch path"
    mixed = [Piece(T.Q8_0, 0, 0, 1024), Piece(T.Q4_K, 2048, 4096, 1024)]
    assert block_decoder(mixed, BF16, torch.device("cuda")) is None, "one packed type per launch"
    assert block_decoder([Piece(T.Q6_K, 0, 0, 256)], BF16, torch.device("cuda")) is None, "no Q6_K kernel"
    assert block_decoder([Piece(T.Q8_0, 0, 0, 1024)], torch.float32, torch.device("cuda")) is None
    assert block_decoder([Piece(T.Q8_0, 34, 0, 1024)], BF16, torch.device("cuda")) is None, "unaligned"


def test_packed_blocks_on_the_cpu_decode_tensor_by_tensor():
    storage, compute = dit_like_layouts(T.Q8_0)
    upcast = FusedUpcast([(storage, compute)], "cpu")
    assert not upcast._fused and not upcast._tables
