"""GGUF: GGML block decoding against the gguf package, the DiT from GGUF files, packed streaming."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.dit import open_dit
from newbie_core.models.gguf import GGUFSource, dequantize
from newbie_core.models.gguf.quantize import K_TYPES, quantize
from newbie_core.pipeline import Models, generate, load_dit_handle
from newbie_core.pipeline.placed import packed_spec
from newbie_core.placement import FakeCopyStream, HostBlockStore, HostMode, Storage, block_sizes, model_layouts, plan_stage, stream_blocks
from newbie_core.tiny.gguf_files import write_gguf, write_tiny_dit_gguf

from test_placement_streaming import N_BLOCKS, ToyModel, inputs, manual_plan

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: thread spin-waits cost more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TYPES = (T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


def random_blocks(qtype: T, rows: int, row_elems: int, seed: int = 0) -> np.ndarray:
    """Every bit pattern the format allows, with finite f16 scales (random bytes elsewhere)."""
    per, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, row_elems // per, size), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (rows, row_elems // per, 2)).astype(np.float16).view(np.uint8)
    fields = {T.Q6_K: [208], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q4_1: [0, 2], T.Q5_1: [0, 2]}.get(qtype, [0])
    for start in fields:
        raw[..., start:start + 2] = scales[..., 2 * fields.index(start):2 * fields.index(start) + 2] \
            if len(fields) == 1 else scales.reshape(rows, -1, 2, 2)[..., fields.index(start), :]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES + (T.BF16,), ids=lambda t: t.name)
def test_dequant_equals_the_gguf_reference_bit_for_bit(qtype):
    raw = random_blocks(qtype, 3, 512) if qtype is not T.BF16 else quantize(
        np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32), T.BF16)
    ours = dequantize(qtype, torch.from_numpy(raw.copy()), (3, 512)).numpy()
    ref = reference_dequantize(raw, qtype)
    assert np.isfinite(ref).all()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantised_weights_decode_close_to_the_originals(qtype):
    """The test/bench quantiser (gguf.quants, our K-quant packer) writes blocks that any GGML
    reader decodes to the weights, within the type's error."""
    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32) * 0.02
    back = reference_dequantize(quantize(x, qtype), qtype)
    rel = np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())
    bound = {T.Q8_0: 0.01, T.Q6_K: 0.04}.get(qtype, 0.12)
    assert rel < bound, f"{qtype.name}: relative RMS error {rel:.4f}"
    if qtype in K_TYPES:   # and it beats the next cruder type: the scales really are used
        assert rel < np.sqrt(((reference_dequantize(quantize(x, T.Q4_0), T.Q4_0) - x) ** 2).mean()
                             / (x ** 2).mean()) * (1.0 if qtype is T.Q4_K else 0.7)


# -- the DiT from GGUF ----------------------------------------------------------------------

def test_dit_gguf_opens_with_official_names_and_reversed_shapes(tmp_path, tiny_models):
    path = write_tiny_dit_gguf(tmp_path / "newbie-Q4_K.gguf", T.Q4_K, prefix="model.diffusion_model.")
    ckpt = open_dit(path)
    ref = tiny_models.dit.ckpt
    assert ckpt.config == ref.config and ckpt.layout == "gguf" and ckpt.is_packed
    assert ckpt.storage == "gguf-q4_k"
    assert ckpt.source.shapes() == ref.source.shapes()
    src = ckpt.source
    # mixed: K-quant where 256 divides the row, F16 fallback elsewhere, refiners and 1-D unquantised
    assert src.qtype("layers.0.feed_forward.w2.weight") is T.Q4_K            # [96, 256]
    assert src.qtype("layers.0.feed_forward.w1.weight") is T.F16             # [256, 96]
    assert src.qtype("noise_refiner.0.feed_forward.w2.weight") is T.F16
    assert src.qtype("layers.0.attention_norm1.weight") is T.F32
    w = src.get("layers.0.feed_forward.w2.weight")
    assert w.dtype == torch.float32 and tuple(w.shape) == (96, 256)
    assert (w - ref.source.get("layers.0.feed_forward.w2.weight").float()).abs().max() < 0.01
    assert src.get_stored("layers.0.feed_forward.w2.weight").dtype == torch.uint8


def test_lumina2_gguf_and_other_architectures_are_refused_with_what_they_are(tmp_path):
    lumina = write_tiny_dit_gguf(tmp_path / "lumina.gguf", T.Q8_0, drop=("clip_text_pooled_proj.",))
    with pytest.raises(CheckpointError, match="Lumina-Image 2.0.*no clip_text_pooled_proj"):
        open_dit(lumina)
    gemma = write_gguf(tmp_path / "gemma.gguf", "gemma3",
                       {"blk.0.attn_q.weight": torch.zeros(64, 64)}, {"blk.0.attn_q.weight": T.F16})
    with pytest.raises(CheckpointError, match="architecture 'gemma3', not a NewBie DiT"):
        open_dit(gemma)
    renamed = write_tiny_dit_gguf(tmp_path / "renamed.gguf", T.Q8_0, arch="flux")
    with pytest.raises(CheckpointError, match="architecture 'flux'.*convert it again"):
        open_dit(renamed)


def test_unsupported_ggml_type_is_refused_with_the_supported_list(tmp_path):
    path = write_gguf(tmp_path / "q2.gguf", "x", {"w": torch.zeros(4, 256)}, {"w": T.F16})
    src = GGUFSource(path)
    src._tensors["w"] = src._tensors["w"]._replace(tensor_type=T.IQ2_XS)
    with pytest.raises(CheckpointError, match="IQ2_XS.*supported: F32"):
        src.get("w")


def test_generate_from_a_gguf_dit_matches_the_bf16_file_closely(tmp_path, tiny_models):
    from test_pipeline import _request
    path = write_tiny_dit_gguf(tmp_path / "newbie-Q8_0.gguf", T.Q8_0)
    gguf_models = Models(load_dit_handle(path), tiny_models.encoders, tiny_models.vae)
    request = _request(width=32, height=32, sampling=dataclasses.replace(_request().sampling, steps=2))
    ours = generate(gguf_models, request, torch.device("cpu"))
    ref = generate(tiny_models, request, torch.device("cpu"))
    drift = (ours.latent - ref.latent).abs().max() / ref.latent.abs().max()
    assert 0 < drift < 0.05
    assert ours.sample_plan.storage[0] is Storage.PACKED and len(ours.sample_plan.materialized) == 7


# -- packed storage streams like any other ----------------------------------------------------

def toy_gguf(tmp_path, model: ToyModel, qtype: T):
    """The toy model's blocks written to a GGUF file: matrices in ``qtype`` where its block
    divides the rows (else F16), norms F32. Returns the source and its packed spec."""
    tensors, types = {}, {}
    for name, block in model.block_sequence():
        for k, v in block.named_parameters():
            key = f"{name}.{k}"
            tensors[key] = v.detach()
            types[key] = T.F32 if v.ndim == 1 else (qtype if v.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16)
    source = GGUFSource(write_gguf(tmp_path / f"toy-{qtype.name}.gguf", "toy", tensors, types))
    return source, packed_spec(model, source)


def packed_run(model, plan, source, spec, steps=1, mode=HostMode.PINNED):
    from newbie_core.pipeline.placed import block_reader
    store = HostBlockStore([l.storage for l in model_layouts(model, plan, packed=spec)], block_reader(model, source),
                           mode, pin=False)
    with stream_blocks(model, plan, store, "cpu", engine=FakeCopyStream(), packed=spec) as session:
        outs = [model(*inputs(s)) for s in range(steps)]
    return outs, session


def packed_plan(model, spec, resident, slots, depth, materialized=()):
    plan = manual_plan(model, resident, slots, depth, Storage.BF16)
    sizes = block_sizes(model, packed=spec)
    ring = [i for i in range(N_BLOCKS) if i not in resident or i not in materialized]
    streamed = [i for i in range(N_BLOCKS) if i not in resident]
    return dataclasses.replace(plan, storage=(Storage.PACKED,) * N_BLOCKS, materialized=materialized,
                               slots=slots if ring else 0,
                               slot_bytes=max((sizes[i].compute_bytes for i in ring), default=0),
                               staging_bytes=max((sizes[i].packed_bytes for i in streamed), default=0))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_streamed_equals_resident_bitwise(tmp_path, qtype):
    model = ToyModel()
    source, spec = toy_gguf(tmp_path, model, qtype)
    assert any(spec), "the toy must hold some tensors packed"
    everything = tuple(range(N_BLOCKS))
    ref, _ = packed_run(model, packed_plan(model, spec, everything, 2, 1, materialized=everything), source, spec)
    for resident, slots, depth, mode in [((), 2, 1, HostMode.STAGING), ((1, 4), 3, 2, HostMode.PINNED)]:
        outs, session = packed_run(model, packed_plan(model, spec, resident, slots, depth), source, spec, mode=mode)
        for a, b in zip(ref, outs):
            assert not torch.isnan(b).any()
            assert torch.equal(a, b), f"{qtype.name}: resident={resident} slots={slots} differs"
    # and the decoded weights are the reference decode of the file's bytes
    key = "layers.0.w2.weight"
    want = reference_dequantize(np.asarray(source._tensors[key].data), qtype)
    assert np.array_equal(source.get(key).numpy().view(np.uint32), want.reshape(source.shape(key)).view(np.uint32))


def test_planner_sizes_packed_blocks_by_their_packed_bytes(tmp_path):
    model = ToyModel()
    source, spec = toy_gguf(tmp_path, model, T.Q4_0)
    sizes = block_sizes(model, packed=spec)
    fp8 = sizes[0].fp8_bytes
    assert sizes[0].packed_bytes < fp8 < sizes[0].compute_bytes
    per_block = sizes[0].packed_bytes
    plan = plan_stage("toy", sizes, 2**40, storage="packed")
    assert plan.storage == (Storage.PACKED,) * N_BLOCKS and len(plan.materialized) == N_BLOCKS
    # a budget that holds the packed blocks plus one slot, not the blocks decoded
    tight = plan_stage("toy", sizes, N_BLOCKS * (2 * 2**20) + 2 * 20 * 2**20 + 40 * 2**20, storage="packed")
    assert "packed" in tight.render()
    assert per_block * N_BLOCKS < sum(s.compute_bytes for s in sizes) / 3


def test_unquantised_blocks_among_packed_ones_stay_resident_as_stored_and_stream_bitwise(tmp_path):
    """Blocks 1 and 4 all F16 among Q8_0 ones (a GGUF DiT's refiners): the planner keeps them
    resident first, as stored (no decode, no ring slot); the run equals the all-resident one."""
    model = ToyModel()
    tensors, types = {}, {}
    for name, block in model.block_sequence():
        for k, v in block.named_parameters():
            key = f"{name}.{k}"
            tensors[key] = v.detach()
            plain = name.endswith((".1", ".4")) or v.ndim == 1 or v.shape[-1] % GGML_QUANT_SIZES[T.Q8_0][0]
            types[key] = (T.F32 if v.ndim == 1 else T.F16) if plain else T.Q8_0
    source = GGUFSource(write_gguf(tmp_path / "toy-mixed.gguf", "toy", tensors, types))
    spec = packed_spec(model, source)
    sizes = block_sizes(model, packed=spec)
    assert sizes[1].packed_bytes == sizes[1].compute_bytes > sizes[0].packed_bytes
    everything = tuple(range(N_BLOCKS))
    ref, _ = packed_run(model, packed_plan(model, spec, everything, 2, 1, materialized=everything), source, spec,
                        steps=2)
    budget = plan_stage("toy", sizes, 2**40, storage="packed").predicted_peak
    plan = plan_stage("toy", sizes, budget, storage="packed")
    while len(plan.resident) > 2:
        budget -= 2**20
        plan = plan_stage("toy", sizes, budget, storage="packed")
    assert plan.resident == (1, 4) and plan.materialized == (1, 4) and not {1, 4} & set(plan.ring_blocks)
    assert plan.staging_bytes == max(sizes[i].packed_bytes for i in plan.streamed)
    outs, session = packed_run(model, plan, source, spec, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
