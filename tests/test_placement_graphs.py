"""Block graphs on CPU: the replay stand-in runs each "graph" again on its static buffers, so a
missed input copy, a stale static buffer or a graph shared by blocks that differ changes the
result. The tiny DiT exercises every shape family of the real forward (caption refiner with
key padding, noise refiner, joint layers, CFG pairs)."""

from __future__ import annotations

import logging

import pytest
import torch

from newbie_core.pipeline import MemorySettings, Models, SamplingSettings
from newbie_core.pipeline.encode import encode_texts
from newbie_core.pipeline.sample import run_sampling
from newbie_core.placement import Report
from newbie_core.placement import graphs as graphs_mod
from newbie_core.placement.graphs import BlockGraphs, ReplayBackend, signature
from newbie_core.placement.session import StreamingSession
from newbie_core.prompt import prepare_texts

CPU = torch.device("cpu")
XML = "<character_1>\n<n>kagamine_rin</n>\n<gender>1girl</gender>\n</character_1>"


@pytest.fixture(scope="module")
def models(tiny_models) -> Models:
    return tiny_models


@pytest.fixture(scope="module")
def conditioning(models):
    texts = prepare_texts(XML, "lowres, bad hands, worst quality")   # negative longer: key padding
    return encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)


@pytest.fixture
def replay_graphs(monkeypatch):
    """Every session gets graphs on the CPU replay backend; the backends are collected."""
    backends: list[ReplayBackend] = []

    def block_graphs(self):
        backends.append(ReplayBackend())
        return BlockGraphs(backends[-1])
    monkeypatch.setattr(StreamingSession, "_block_graphs", block_graphs)
    return backends


def sample(models, conditioning, budget, steps=4, cfg=5.0):
    pos, neg = conditioning
    return run_sampling(models.dit, pos, neg, torch.zeros(1, 16, 8, 8), SamplingSettings(steps=steps, cfg=cfg, seed=5),
                        MemorySettings(), CPU, Report(), budget)


def tight_budget(models, conditioning) -> int:
    plan = sample(models, conditioning, None, steps=1).plan
    return plan.predicted_peak - 3 * (plan.slot_bytes or 2 * 2**20)


@pytest.mark.parametrize("streamed", [False, True])
def test_graph_replays_equal_eager_bitwise(models, conditioning, replay_graphs, streamed):
    budget = tight_budget(models, conditioning) if streamed else None
    graphed = sample(models, conditioning, budget)
    assert replay_graphs[-1].replays > 0, "the graph path must have run"
    if streamed:
        assert len(graphed.plan.resident) < graphed.plan.n_blocks
    ref = _eager(models, conditioning, budget)        # the same plan without graphs
    assert torch.equal(graphed.latent, ref.latent)


def _eager(models, conditioning, budget):
    original = StreamingSession.__dict__["_block_graphs"]
    try:
        StreamingSession._block_graphs = lambda self: None
        return sample(models, conditioning, budget)
    finally:
        StreamingSession._block_graphs = original


def test_ring_slots_share_graphs_by_structure(models, conditioning, replay_graphs):
    budget = tight_budget(models, conditioning)
    result = sample(models, conditioning, budget, steps=3)
    plan = result.plan
    backend = replay_graphs[-1]
    # Three signatures (caption refiner, noise refiner, joint layers), one structure each: at
    # most one graph per resident block and one per (slot, signature). Keying ring graphs by
    # (slot, block) would need one per pair seen, here every pair of 4 ring blocks x 3 slots.
    assert len(plan.resident) < plan.n_blocks and plan.slots > 1
    assert backend.captures <= len(plan.resident) + plan.slots * 3


def test_a_missed_input_copy_is_visible(models, conditioning, replay_graphs, monkeypatch):
    """The check above has teeth: skipping the copy of fresh inputs changes the latent."""
    ref = _eager(models, conditioning, None)
    monkeypatch.setattr(graphs_mod._Static, "load", lambda self, args: None)
    broken = sample(models, conditioning, None)
    assert not torch.equal(broken.latent, ref.latent)


def test_capture_failure_falls_back_to_eager(models, conditioning, monkeypatch, caplog):
    class Failing(ReplayBackend):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(StreamingSession, "_block_graphs", lambda self: BlockGraphs(Failing()))
    ref = _eager(models, conditioning, None)
    with caplog.at_level(logging.WARNING):
        out = sample(models, conditioning, None)
    assert "CUDA graphs turned off" in caplog.text
    assert torch.equal(out.latent, ref.latent)


def test_signature_covers_shapes_padding_and_refuses_unknown_objects():
    x = torch.zeros(2, 3)
    assert signature([x, None, 1.5]) == signature([torch.ones(2, 3), None, 1.5])
    assert signature([x]) != signature([torch.zeros(2, 4)])
    assert signature([x]) != signature([x.to(torch.bfloat16)])

    class Padding:
        def __init__(self, lengths):
            self.lengths = lengths
    assert signature([x, Padding((3, 2))]) != signature([x, Padding((3, 3))])
    assert signature([x, object()]) is None


def test_returned_buffer_is_reused_and_fresh_inputs_are_copied():
    """x = run(x) chains pay no copies; a new caller tensor is copied in; the result is correct."""
    backend = ReplayBackend()
    graphs = BlockGraphs(backend)
    weight = torch.tensor(2.0)

    def block(x, c):
        return x * weight + c

    x0, c = torch.ones(4), torch.full((4,), 0.5)
    graphs.new_forward()
    y = graphs.run("a", block, (x0, c))                # first forward: eager warm-up
    assert torch.equal(y, torch.full((4,), 2.5)) and backend.captures == 0
    graphs.new_forward()
    y = graphs.run("a", block, (y, c))                 # capture + replay into the static buffer
    assert torch.equal(y, torch.full((4,), 5.5)) and backend.replays == 1
    z = graphs.run("a", block, (y, c))                 # the returned buffer itself: no copy needed
    assert z is y and torch.equal(z, torch.full((4,), 11.5))
    c2 = torch.zeros(4)
    w = graphs.run("a", block, (torch.ones(4), c2))    # fresh tensors are copied in
    assert torch.equal(w, torch.full((4,), 2.0))
    c2 += 1                                            # an in-place change is noticed (tensor version)
    w = graphs.run("a", block, (torch.ones(4), c2))
    assert torch.equal(w, torch.full((4,), 3.0))
    assert graphs.run("b", block, (torch.ones(4), c2)) is w, "another key shares the static buffers"


def test_graphs_auto_follows_tokens_per_forward_and_settings_override():
    from newbie_core.pipeline.sample import GRAPH_TOKEN_LIMIT, use_graphs
    cuda = torch.device("cuda")
    assert not use_graphs(MemorySettings(cuda_graphs=True), 1, 100, CPU), "never on the CPU"
    assert use_graphs(MemorySettings(), 1, 1024 + 300, cuda)                 # 512² without CFG
    assert not use_graphs(MemorySettings(), 2, 4096 + 300, cuda)             # 1024² with CFG
    assert use_graphs(MemorySettings(), 1, GRAPH_TOKEN_LIMIT, cuda)
    assert use_graphs(MemorySettings(cuda_graphs=True), 2, 4396, cuda)
    assert not use_graphs(MemorySettings(cuda_graphs=False), 1, 100, cuda)


def test_graph_memory_is_in_the_sampling_estimate_only_with_graphs():
    from newbie_core.models.dit import DiTConfig
    from newbie_core.pipeline.sample import GRAPH_FIXED_BYTES, GRAPH_SEQUENCE_FACTOR, dit_activation_estimate
    cfg = DiTConfig.newbie_exp01()
    cuda = torch.device("cuda")
    args = (cfg, 1, 300, 1024, torch.bfloat16, cuda)
    eager, graphed = dit_activation_estimate(*args)(None, None), dit_activation_estimate(*args, True)(None, None)
    assert graphed - eager == GRAPH_FIXED_BYTES + GRAPH_SEQUENCE_FACTOR * 1 * (300 + 1024) * cfg.dim * 2
    on_cpu = (cfg, 1, 300, 1024, torch.bfloat16, CPU)
    assert dit_activation_estimate(*on_cpu, True)(None, None) == dit_activation_estimate(*on_cpu)(None, None)


def test_fused_upcast_uses_the_torch_path_off_cuda():
    from newbie_core.placement.fp8 import pack_block, upcast_block
    from newbie_core.placement.fp8_cuda import FusedUpcast
    from newbie_core.placement.layout import compute_layout, fp8_layout
    compute = compute_layout([("w.weight", (8, 300), torch.bfloat16), ("norm.weight", (300,), torch.bfloat16)])
    storage = fp8_layout(compute)
    src = torch.zeros(storage.nbytes, dtype=torch.uint8)
    pack_block({"w.weight": torch.randn(8, 300), "norm.weight": torch.randn(300)}, storage, src)
    fused, ref = torch.zeros(compute.nbytes, dtype=torch.uint8), torch.zeros(compute.nbytes, dtype=torch.uint8)
    FusedUpcast([(storage, compute)], CPU)(storage, compute, src, fused)
    upcast_block(storage, compute, src, ref)
    assert torch.equal(fused, ref) and fused.any()


def test_upcast_rows_are_padded_to_16_and_stay_inside_each_entry_padding():
    from newbie_core.placement.budget import ALIGN, align_up
    from newbie_core.placement.fp8_cuda import build_table
    from newbie_core.placement.layout import compute_layout, fp8_layout
    compute = compute_layout([("a.weight", (3, 4099), torch.bfloat16), ("norm.weight", (37,), torch.bfloat16),
                              ("b.weight", (5, 7), torch.bfloat16)])
    storage = fp8_layout(compute)
    table = build_table(storage, compute, CPU, row=4096)
    for src, dst, n, scale in table.tolist():
        assert n % 16 == 0
        c = next(e for e in compute.entries if e.offset // 2 <= dst < (e.offset + e.nbytes) // 2)
        s = next(e for e in storage.entries if e.name == c.name)
        assert (dst + n) * 2 <= align_up(c.offset + c.nbytes, ALIGN), "writes stay in the entry's padding"
        width = 1 if scale >= 0 else 2
        assert (src + n) * width <= align_up(s.offset + s.nbytes, ALIGN), "reads stay in the entry's padding"
