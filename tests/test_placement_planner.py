"""The planner is a pure function: budgets in, plans out, no GPU."""

from __future__ import annotations

import re

import pytest

from newbie_core.placement import (BlockSize, BudgetTooSmallError, GiB, MiB, Plan, Storage, parse_bytes,
                                   plan_stage)
from newbie_core.placement.budget import activation_reserved, segment_bytes

BLOCK = 175 * 10**6          # a full-size DiT block in bf16
BLOCKS = [BlockSize(f"layers.{i}", BLOCK, BLOCK // 2 + 4 * MiB) for i in range(36)]
CHUNKS = [(None, None), (4096, 8192), (2048, 4096), (1024, 2048), (512, 1024)]


def activations(attn, ffn) -> int:
    """A made-up but monotone estimate: unchunked 3 GiB, shrinking with the chunks."""
    return int(3 * GiB) if attn is None else attn * 256 * 1024 + ffn * 64 * 1024


def plan(budget, **kw):
    kw.setdefault("activation_bytes", activations)
    kw.setdefault("chunk_candidates", CHUNKS)
    kw.setdefault("always_resident_bytes", 300 * MiB)
    return plan_stage("sample", BLOCKS, budget, **kw)


def sweep(**kw):
    out = []
    for budget in [int(b * GiB) for b in (64, 24, 16, 12, 10, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1.2, 1, 0.8, 0.5)]:
        try:
            out.append(plan(budget, **kw))
        except BudgetTooSmallError:
            break
    return out


@pytest.mark.parametrize("kw", [{}, {"storage": "fp8"}, {"storage": "auto"},
                                {"bandwidth": 10e9, "block_compute_s": 3.5e-3},
                                {"bandwidth": 55e9, "block_compute_s": 3.5e-3},
                                {"storage": "fp8", "bandwidth": 10e9, "block_compute_s": 3.5e-3},
                                {"storage": "fp8", "staged_slots": 3},
                                {"storage": "fp8", "staged_slots": 3, "bandwidth": 10e9, "block_compute_s": 3.5e-3}])
def test_plans_are_monotone_in_the_budget_and_fit(kw):
    plans = sweep(**kw)
    assert len(plans) >= 5, "the sweep should cover several regimes"
    assert len(plans[0].resident) == 36 and not plans[0].streamed or kw.get("storage") == "fp8"
    for big, small in zip(plans, plans[1:]):
        assert len(small.resident) <= len(big.resident)
        assert activations(small.attn_chunk, small.ffn_chunk) <= activations(big.attn_chunk, big.ffn_chunk)
        if big.streamed:
            assert small.slots <= big.slots, "once blocks stream, the ring only gets shallower"
    for p in plans:
        assert p.predicted_peak <= p.budget
        assert p.predicted_peak == sum(b for _, b in p.breakdown)
        gaps = [b - a for a, b in zip(p.resident, p.resident[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1, "residents are spread evenly"
        if p.slots:
            assert p.prefetch_depth == p.slots - 1
    assert len(plans[-1].resident) < 36, "small budgets stream"


def test_residents_go_before_chunks_when_copies_hide_and_after_when_they_do_not():
    hidden = plan(5 * GiB, bandwidth=55e9, block_compute_s=3.5e-3)
    exposed = plan(5 * GiB, bandwidth=10e9, block_compute_s=3.5e-3)
    assert hidden.attn_chunk is None, "streaming is free here, so chunks stay large"
    assert exposed.attn_chunk is not None and len(exposed.resident) > len(hidden.resident)
    assert hidden.predicted_step_s < exposed.predicted_step_s


def test_budget_too_small_names_the_minimum():
    minimum = (300 * MiB + segment_bytes(2 * BLOCK) + activation_reserved(activations(512, 1024)))
    assert plan(minimum).resident == ()
    with pytest.raises(BudgetTooSmallError) as err:
        plan(minimum - 1)
    msg = str(err.value)
    assert f"{minimum:,} bytes" in msg and "layers.0" in msg and "2 copies" in msg
    assert isinstance(err.value, ValueError)


def test_fp8_blocks_stay_at_compute_dtype_while_the_budget_allows():
    roomy = plan(64 * GiB, storage="fp8")
    assert roomy.materialized == tuple(range(36)) and roomy.slots == 0 and not roomy.ring_blocks
    assert "upcast once" in roomy.reason and "36 fp8 kept at compute dtype" in roomy.render()
    plans = sweep(storage="fp8")
    counts = [len(p.materialized) for p in plans]
    assert counts == sorted(counts, reverse=True), "fewer blocks kept at compute dtype as the budget shrinks"
    partial = [p for p in plans if 0 < len(p.materialized) < 36]
    assert partial, "some budget keeps part of the blocks at compute dtype"
    for p in partial:
        assert len(p.resident) == 36 and p.slots == 2 and not p.streamed
        assert set(p.ring_blocks) == set(range(36)) - set(p.materialized)
    # Keeping a block at compute dtype costs its full compute size in the prediction.
    one = plan_stage("sample", BLOCKS[:1], 64 * GiB, storage="fp8")
    assert dict(one.breakdown)["1 resident block(s) (fp8, 1 kept at compute dtype)"] == segment_bytes(BLOCK)


def test_with_graphs_kept_blocks_count_their_upcast_staging():
    """The staging segment of the one-time upcast stays reserved; a graph's private pool cannot
    reuse it, so with graphs it is part of the peak, and without graphs (or with nothing kept) not."""
    plain = plan_stage("sample", BLOCKS, 64 * GiB, storage="fp8")
    graphs = plan_stage("sample", BLOCKS, 64 * GiB, storage="fp8", activations_in_own_pool=True)
    label = "one-time upcast staging (the graph pool cannot reuse it)"
    assert graphs.materialized == plain.materialized == tuple(range(36))
    assert dict(graphs.breakdown)[label] == segment_bytes(max(b.storage_bytes(Storage.FP8) for b in BLOCKS))
    assert graphs.predicted_peak - plain.predicted_peak == dict(graphs.breakdown)[label]
    assert label not in dict(plan_stage("sample", BLOCKS, 64 * GiB, activations_in_own_pool=True).breakdown)


def test_fp8_halves_streamed_bytes_and_lowers_the_minimum():
    bf16 = plan(6 * GiB)
    fp8 = plan(6 * GiB, storage="fp8")
    assert all(s is Storage.FP8 for s in fp8.storage)
    assert fp8.staging_bytes == BLOCK // 2 + 4 * MiB
    assert len(fp8.resident) > len(bf16.resident)
    with pytest.raises(BudgetTooSmallError) as err:
        plan(100 * MiB, storage="fp8")
    need = int(re.search(r"minimum is .*?\(([\d,]+) bytes\)", str(err.value)).group(1).replace(",", ""))
    assert plan(need, storage="fp8").predicted_peak <= need


def test_auto_storage_prefers_bf16_when_everything_fits():
    assert plan(64 * GiB, storage="auto").storage[0] is Storage.BF16
    assert plan(4 * GiB, storage="auto").storage[0] is Storage.FP8


def test_render_and_plan_lookup():
    p = plan(4 * GiB)
    text = p.render()
    assert "predicted peak" in text and "sample" in text and "ring" in text and p.reason in text
    both = Plan((p, plan_stage("encode", BLOCKS[:4], 2**40)))
    assert both["encode"].stage == "encode" and "encode" in both.render()
    with pytest.raises(KeyError, match="decode"):
        both["decode"]


def test_predicted_peak_is_analytic_not_measured():
    assert plan(8 * GiB) == plan(8 * GiB)


def test_allocator_model():
    assert segment_bytes(100) == 2 * MiB          # small pool
    assert segment_bytes(3 * MiB) == 20 * MiB     # 1-10 MiB requests share 20 MiB segments
    assert segment_bytes(175 * 10**6) == 168 * MiB  # large: rounded up to 2 MiB
    assert parse_bytes("6GiB") == 6 * GiB and parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(ValueError, match="GiB"):
        parse_bytes("lots")


def test_blocks_stored_in_compute_layout_among_packed_ones_go_resident_first_and_stay_as_stored():
    """A GGUF DiT's F16 refiners (stored bytes = compute bytes) among Q4_K layers: residency goes
    to them first, a resident one is kept (no decode, no slot), and once none of those that run
    per forward streams, staging shrinks to the packed blocks' size. The once ones (caption
    refiners) copy straight into their slot and never size staging."""
    full, packed = 40 * MiB, 12 * MiB
    plain = {0, 1, 2, 3}            # 0, 1 run once; 2, 3 every forward
    blocks = [BlockSize(f"b{i}", full, full // 2, full if i in plain else packed) for i in range(12)]
    def plan(budget):
        return plan_stage("s", blocks, budget, storage="packed", once=(0, 1),
                          activation_bytes=lambda a, f: 100 * MiB)
    budget = plan(2**40).predicted_peak
    small = plan(budget)
    while len(small.resident) > 4:                       # walk down to a plan with a few residents
        budget -= 4 * MiB
        small = plan(budget)
    assert len(small.resident) >= 2 and {2, 3} <= set(small.resident) and {2, 3} <= set(small.materialized)
    assert not {2, 3} & set(small.ring_blocks) and not {0, 1} & set(small.resident)
    assert small.staging_bytes == packed
    fewer = plan(small.predicted_peak - 1)
    while len(fewer.resident) >= 2:
        fewer = plan(fewer.predicted_peak - 1)
    # with a plain block streaming, staging must hold it: one plain block resident would cost more
    # than both, so the next plan down keeps none
    assert fewer.resident == () and fewer.staging_bytes == full


def test_a_plan_names_the_allocator_its_activations_were_estimated_for():
    blocks = [BlockSize(f"b{i}", 10 * MiB) for i in range(4)]
    assert "allocator planned for" not in plan_stage("s", blocks, 2**40).render()
    plan = plan_stage("s", blocks, 2**40, allocator="cudaMallocAsync")
    line = next(row for row in plan.render().splitlines() if row.startswith("allocator planned for"))
    assert plan.allocator == "cudaMallocAsync" and line.split()[-1] == "cudaMallocAsync"
