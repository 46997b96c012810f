"""CUDA tier: packed (GGUF) blocks streamed through the real copy engine equal resident ones, bit
for bit, for Q8_0 and Q4_K; the Triton decode equals the torch decode on the GPU."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from newbie_core.models.gguf import dequantize
from newbie_core.models.gguf.triton_dequant import try_decode_into
from newbie_core.placement import HostBlockStore, HostMode, model_layouts, stream_blocks
from newbie_core.pipeline.placed import block_reader

from test_gguf_dit import packed_plan, toy_gguf
from test_placement_streaming import N_BLOCKS, ToyModel, inputs

pytestmark = pytest.mark.cuda
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(model, plan, source, spec, steps=3):
    store = HostBlockStore([l.storage for l in model_layouts(model, plan, packed=spec)], block_reader(model, source),
                           HostMode.PINNED)
    outs = []
    with stream_blocks(model, plan, store, "cuda", packed=spec):
        for s in range(steps):
            x, c = inputs(s)
            outs.append(model(x.cuda(), c.cuda()).cpu())
    store.close()
    return outs


@cuda
@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K), ids=lambda t: t.name)
def test_packed_streamed_equals_resident_on_cuda(tmp_path, qtype):
    model = ToyModel()
    source, spec = toy_gguf(tmp_path, model, qtype)
    everything = tuple(range(N_BLOCKS))
    ref = _run(model, packed_plan(model, spec, everything, 2, 1, materialized=everything), source, spec)
    for resident, slots, depth in [((), 2, 1), ((1, 4), 3, 2), (everything, 2, 1)]:
        outs = _run(model, packed_plan(model, spec, resident, slots, depth), source, spec)
        for a, b in zip(ref, outs):
            assert torch.equal(a, b), f"{qtype.name} resident={resident} slots={slots}"


@cuda
@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K), ids=lambda t: t.name)
def test_triton_decode_equals_torch_decode(qtype):
    size, per = {T.Q8_0: (34, 32), T.Q4_K: (144, 256)}[qtype]
    raw = torch.randint(0, 256, (4096, size), dtype=torch.uint8)
    raw[:, 0:4] = (torch.rand(4096, 2) * 0.02).half().view(torch.uint8)
    src = raw.reshape(-1).cuda()
    out = torch.empty(4096 * per, dtype=torch.bfloat16, device="cuda")
    assert try_decode_into(qtype, src, out), "the Triton kernel stood down (see the log warning)"
    assert torch.equal(out, dequantize(qtype, src, (4096 * per,)).to(torch.bfloat16))


@cuda
@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K), ids=lambda t: t.name)
@pytest.mark.parametrize("form", ("bytes", "words"))
@pytest.mark.parametrize("offset", (0, 1), ids=("aligned", "odd-address"))
def test_each_kernel_form_equals_torch_decode(qtype, form, offset):
    """Both kernel forms at the production launch shape, on a block count that leaves the last
    program partly empty, and on packed bytes at an odd address (words then runs bytes)."""
    from newbie_core.models.gguf.triton_dequant import LAUNCH, _launch
    size, per = {T.Q8_0: (34, 32), T.Q4_K: (144, 256)}[qtype]
    n = 3 * LAUNCH[qtype][1] + 5
    raw = torch.randint(0, 256, (n, size), dtype=torch.uint8)
    raw[:, 0:4] = (torch.rand(n, 2) * 0.02).half().view(torch.uint8)
    buffer = torch.zeros(n * size + 1, dtype=torch.uint8, device="cuda")
    buffer[offset:offset + n * size] = raw.reshape(-1).cuda()
    src = buffer[offset:offset + n * size]
    out = torch.full((n * per,), float("nan"), dtype=torch.bfloat16, device="cuda")
    _launch(qtype, src, out, form)
    assert torch.equal(out, dequantize(qtype, src, (n * per,)).to(torch.bfloat16))


@cuda
@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K), ids=lambda t: t.name)
def test_the_one_launch_block_decode_runs_and_equals_the_per_tensor_path(qtype):
    """Placement's upcast takes the whole-block kernel for a DiT-like packed block, and its bits
    equal decoding tensor by tensor (the path streamed == resident was first proven on)."""
    from newbie_core.placement.fp8 import upcast_block
    from newbie_core.placement.fp8_cuda import FusedUpcast
    from test_gguf_block_decode import dit_like_layouts

    storage, compute = dit_like_layouts(qtype)
    upcast = FusedUpcast([(storage, compute)], "cuda")
    assert (storage, compute) in upcast._fused, "the block kernel stood down (see the log warning)"
    src = torch.randint(0, 256, (storage.nbytes,), dtype=torch.uint8)
    per, nbytes = {T.Q8_0: (32, 34), T.Q4_K: (256, 144)}[qtype]
    for e in storage.entries:
        if e.codec:
            blocks = src[e.offset:e.offset + e.shape[0]].view(-1, nbytes)
            blocks[:, 0:4] = (torch.rand(blocks.shape[0], 2) * 0.02).half().view(torch.uint8)
        else:
            src[e.offset:e.offset + e.nbytes] = torch.randn(e.nbytes // 2).to(torch.bfloat16).view(torch.uint8)
    src = src.cuda()
    want = torch.zeros(compute.nbytes, dtype=torch.uint8, device="cuda")
    got = torch.full_like(want, 0xFF)
    upcast_block(storage, compute, src, want)
    upcast(storage, compute, src, got)
    for c in compute.entries:
        assert torch.equal(got[c.offset:c.offset + c.nbytes], want[c.offset:c.offset + c.nbytes]), c.name
    upcast.release()
