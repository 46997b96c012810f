"""Issue 11, item 6: property tests (hypothesis, small budgets so CI stays fast).

The XML builder -> parser round trip itself is fuzzed in tests/test_prompt.py
(``test_build_parse_round_trip_is_lossless``); here: where an unclosed tag is reported, the
planner's budget bound, the VAE tile blend, and the CLI's parse + validate on random arguments.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from newbie_core.prompt import Character, GeneralTags, Prompt, PromptSyntaxError, build_xml, parse_prompt

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_words = st.text(alphabet=st.sampled_from("abc xyz_,()"), min_size=1, max_size=12).map(str.strip).filter(bool)


@FAST
@given(st.lists(_words, min_size=1, max_size=3), _words, st.data())
def test_a_tag_missing_its_bracket_is_reported_where_the_bracket_belongs(names, caption, data):
    xml = build_xml(Prompt(tuple(Character(n=n, gender="1girl") for n in names), GeneralTags(style="anime"), caption))
    closings = [m for m in re.finditer(r"</[a-z_0-9]+>", xml)]
    victim = data.draw(st.sampled_from(closings))
    broken = xml[:victim.end() - 1] + xml[victim.end():]             # drop that tag's '>'
    with pytest.raises(PromptSyntaxError) as e:
        parse_prompt(broken)
    line = broken.count("\n", 0, victim.end() - 1) + 1
    column = victim.end() - 1 - (broken.rfind("\n", 0, victim.end() - 1) + 1) + 1
    assert (e.value.line, e.value.column) == (line, column), (broken, str(e.value))


@FAST
@given(blocks=st.lists(st.integers(1, 2**28), min_size=1, max_size=12),
       budget=st.integers(2**10, 2**32), resident=st.integers(0, 2**26),
       act_base=st.integers(0, 2**28), storage=st.sampled_from(["bf16", "fp8", "auto"]))
def test_planner_never_plans_above_its_budget(blocks, budget, resident, act_base, storage):
    from newbie_core.placement import BlockSize, BudgetTooSmallError, plan_stage

    sizes = [BlockSize(f"b{i}", n, fp8_bytes=n // 2 + 1) for i, n in enumerate(blocks)]
    chunks = ((None, None), (1024, None), (1024, 4096), (512, 1024))

    def act(a, f):   # smaller chunks, smaller activations
        return act_base // (1 if a is None else 2) // (1 if f is None else 3)
    try:
        plan = plan_stage("fuzz", sizes, budget, always_resident_bytes=resident, activation_bytes=act,
                          chunk_candidates=chunks, storage=storage)
    except BudgetTooSmallError as e:
        assert "too small" in str(e)
        return
    assert plan.predicted_peak <= budget
    assert set(plan.resident) <= set(range(len(blocks)))


@FAST
@given(size=st.integers(1, 300), tile=st.integers(2, 120), overlap=st.integers(0, 60), scale=st.sampled_from([1, 8]))
def test_vae_tile_blend_weights_sum_to_one(size, tile, overlap, scale):
    """Along one axis (a 2-D weight is the product of two such), the tiles' weights add to 1 at
    every output sample wherever at most two tiles meet. ``2 * overlap <= tile`` does not ensure
    that: tile_starts spreads tiles evenly, so size 22, tile 14, overlap 7 gives starts 0, 4, 8
    (found by this test). Where three tiles meet the weights add to about 1.0025-1.02; run_tiled
    divides by the sum, see the next test, so the image is still a true weighted average."""
    import torch
    from newbie_core.models.vae_tiling import BlendMode, _axis_weights, tile_starts

    tile = min(tile, size)
    starts = tile_starts(size, tile, min(overlap, tile - 1))
    assume(all(c >= a + tile for a, c in zip(starts, starts[2:])))      # no sample under three tiles
    total = torch.zeros(size * scale)
    for i, s in enumerate(starts):
        total[s * scale:(s + tile) * scale] += _axis_weights(starts, i, tile, scale, BlendMode.COSINE)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), (starts, total)


@FAST
@given(h=st.integers(1, 40), w=st.integers(1, 40), tile=st.integers(1, 24), overlap=st.integers(0, 23),
       blend=st.sampled_from(["cosine", "linear", "none"]))
def test_tiled_identity_gives_back_its_input(h, w, tile, overlap, blend):
    """The blend is normalised: tiling the identity returns the input for any tile and overlap."""
    import torch
    from newbie_core.models.vae_tiling import run_tiled

    assume(overlap < tile)
    x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h * 41 + w))
    out = run_tiled(lambda t: t, x, tile, overlap, 1, 1, blend)
    assert torch.allclose(out, x, atol=1e-5)


_OPTIONS = ["--size", "--steps", "--cfg", "--shift", "--sampler", "--seed", "--denoise", "--vae-tile",
            "--vram-budget", "--ram-budget", "--attention-chunk", "--ffn-chunk", "--device", "--cache-dir",
            "--init-image", "--out", "--prompt", "--negative", "--dtype", "--cuda-graphs", "--round-up",
            "--compat", "--plan", "-v", "-q", "--dit", "--bogus"]
_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "17", "64", "1e309", "nan", "-inf", "1024x1024", "0x0",
                                      "100000x100000", "1000x1000", "cuda", "cpu", "cuda:7", "x.png", "/", "",
                                      "euler", "fp8", "on", "<a>", "a" * 300, "é", "/dev/null", "~"]),
                     st.text(max_size=20))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(_OPTIONS), _VALUES), max_size=14))
def test_random_cli_arguments_never_give_a_traceback(monkeypatch, capsys, tmp_path, argv):
    """Parse + validate only (the run itself is replaced): every outcome is 0 or a message with exit 2."""
    from newbie_core import cli

    monkeypatch.setattr(cli, "run_generate", lambda args, checked: 0)
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(["generate", "--prompt", "a", "--out", "o.png", *argv])
    except SystemExit as e:          # argparse: usage + one error line, exit 2 (or 0 for --help)
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in err
