"""NewBie DiT LoRAs on tiny checkpoints (CPU): every layout against a hand merge, scale rules,
errors, and LoRAs through placement (strength 0, stacking, streamed == resident, fp8, caching)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from newbie_core.models import checkpoint as checkpoint_module
from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.dit import DiTConfig, build_dit
from newbie_core.models.lora import LORA_READS, LoraSpec, clear_cache, dit_lora_patches
from newbie_core.pipeline import Conditioning, MemorySettings, SamplingSettings, StorageDType, load_dit_handle
from newbie_core.pipeline.lora import to_weight_patch
from newbie_core.pipeline.sample import run_sampling
from newbie_core.placement import HOST_CACHE, Report
from newbie_core.placement.patches import apply_patches
from newbie_core.tiny.dit import tiny_dit_state
from newbie_core.tiny.lora import linear_modules, lora_tensors, write_lora

CPU = torch.device("cpu")
CONFIG = DiTConfig.tiny()
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def meta_model():
    return build_dit(CONFIG, "meta")


def effective_state(specs, model) -> dict[str, torch.Tensor]:
    """The tiny base weights (fp32) with the LoRAs' patches applied, as placement applies them."""
    state = tiny_dit_state(CONFIG)
    patches = dit_lora_patches(specs, model, CONFIG)
    names = [n for n, _ in model.block_sequence()]
    for i, ps in patches.blocks.items():
        for p in ps:
            key = f"{names[i]}.{p.target}"
            apply_patches({p.target: state[key]}, [(to_weight_patch(p), p.factors)])
    for key, ps in patches.non_blocks.items():
        apply_patches({key: state[key]}, [(to_weight_patch(p), p.factors) for p in ps])
    return state


def hand_delta(fmt: str, tensors: dict[str, torch.Tensor], module: str) -> dict[tuple[int, int] | None, torch.Tensor]:
    """The change one module gets, written out per layout: {row range or None: delta}."""
    flat = module.replace(".", "_")
    if fmt == "peft":
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        return {None: ALPHA / RANK * b @ a}
    if fmt == "kohya":
        down, up = tensors[f"lora_unet_{flat}.lora_down.weight"], tensors[f"lora_unet_{flat}.lora_up.weight"]
        return {None: float(tensors[f"lora_unet_{flat}.alpha"]) / down.shape[0] * up @ down}
    if fmt == "lokr":
        w2 = tensors[f"lycoris_{flat}.lokr_w2_a"] @ tensors[f"lycoris_{flat}.lokr_w2_b"]
        return {None: ALPHA / RANK * torch.kron(tensors[f"lycoris_{flat}.lokr_w1"], w2)}
    if fmt == "lokr_full":     # both sides full: LyCORIS fixes the scale at 1
        return {None: torch.kron(tensors[f"lycoris_{flat}.lokr_w1"], tensors[f"lycoris_{flat}.lokr_w2"])}
    if fmt == "loha":
        t = {k: tensors[f"lycoris_{flat}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        return {None: ALPHA / RANK * (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])}
    if fmt == "diffusers":     # no alpha anywhere: scale 1; q/k/v rows from NewBie's GQA widths
        block, _, rest = module.rpartition(".attention.")
        lora = lambda base: tensors[f"transformer.{base}.lora_B.weight"] @ tensors[f"transformer.{base}.lora_A.weight"]
        if rest == "qkv":
            q, kv = CONFIG.n_heads * CONFIG.head_dim, CONFIG.n_kv_heads * CONFIG.head_dim
            return {(0, q): lora(f"{block}.attn.to_q"), (q, q + kv): lora(f"{block}.attn.to_k"),
                    (q + kv, q + 2 * kv): lora(f"{block}.attn.to_v")}
        if rest == "out":
            return {None: lora(f"{block}.attn.to_out.0")}
        if module.endswith("feed_forward.w2"):
            return {None: lora(module[: -len("w2")] + "linear_2")}
        return {}
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["peft", "kohya", "lokr", "lokr_full", "loha", "diffusers"])
def test_every_layout_maps_onto_the_hand_merge(fmt, tmp_path, meta_model):
    path = write_lora(tmp_path / fmt / "adapter_model.safetensors", CONFIG, fmt, RANK, ALPHA, seed=1)
    tensors = lora_tensors(CONFIG, fmt, RANK, ALPHA, seed=1)
    base = tiny_dit_state(CONFIG)
    got = effective_state([LoraSpec(str(path), 0.7)], meta_model)
    changed = 0
    for module in linear_modules(CONFIG):
        key = module + ".weight"
        want = base[key].clone()
        for rows, delta in hand_delta(fmt, tensors, module).items():
            part = want if rows is None else want[rows[0]:rows[1]]
            part += 0.7 * delta
            changed += 1
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6, msg=f"{fmt}: {key}")
    untouched = [k for k in base if k not in {m + ".weight" for m in linear_modules(CONFIG)}]
    assert all(torch.equal(got[k], base[k]) for k in untouched)
    assert changed >= CONFIG.n_blocks * 3          # qkv, out and w2 (q/k/v separately) in every block


def test_alpha_is_applied_once_when_file_and_keys_both_carry_it(tmp_path, meta_model):
    tensors = lora_tensors(CONFIG, "kohya", RANK, ALPHA, seed=2)
    from safetensors.torch import save_file
    path = tmp_path / "both.safetensors"
    save_file(tensors, str(path), metadata={"lora_alpha": "64", "ss_network_alpha": "64"})
    got = effective_state([LoraSpec(str(path))], meta_model)
    key, flat = "layers.1.attention.out.weight", "lora_unet_layers_1_attention_out"
    want = tiny_dit_state(CONFIG)[key] + ALPHA / RANK * tensors[f"{flat}.lora_up.weight"] @ tensors[f"{flat}.lora_down.weight"]
    torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)


def test_metadata_alpha_is_used_where_the_keys_have_none(tmp_path, meta_model):
    tensors = {k: v for k, v in lora_tensors(CONFIG, "kohya", RANK, ALPHA, seed=2).items() if not k.endswith(".alpha")}
    from safetensors.torch import save_file
    path = tmp_path / "meta_alpha.safetensors"
    save_file(tensors, str(path), metadata={"lora_alpha": "1.0"})
    got = effective_state([LoraSpec(str(path))], meta_model)
    key, flat = "layers.0.feed_forward.w2.weight", "lora_unet_layers_0_feed_forward_w2"
    want = tiny_dit_state(CONFIG)[key] + 1.0 / RANK * tensors[f"{flat}.lora_up.weight"] @ tensors[f"{flat}.lora_down.weight"]
    torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)


def test_peft_without_any_alpha_uses_scale_1_and_says_so(tmp_path, meta_model, caplog):
    path = write_lora(tmp_path / "peft" / "adapter_model.safetensors", CONFIG, "peft", RANK, ALPHA, seed=3)
    (path.parent / "adapter_config.json").unlink()
    clear_cache()
    tensors = lora_tensors(CONFIG, "peft", RANK, ALPHA, seed=3)
    with caplog.at_level(logging.WARNING, logger="newbie_core"):
        got = effective_state([LoraSpec(str(path))], meta_model)
    assert "no alpha anywhere" in caplog.text
    m = "layers.2.attention.qkv"
    want = tiny_dit_state(CONFIG)[m + ".weight"] + (tensors[f"base_model.model.{m}.lora_B.weight"]
                                                   @ tensors[f"base_model.model.{m}.lora_A.weight"])
    torch.testing.assert_close(got[m + ".weight"], want, rtol=0, atol=1e-6)


def test_two_stacked_loras_equal_their_sum(tmp_path, meta_model):
    one = write_lora(tmp_path / "a" / "one.safetensors", CONFIG, "kohya", RANK, ALPHA, seed=4)
    two = write_lora(tmp_path / "b" / "two.safetensors", CONFIG, "loha", RANK, ALPHA, seed=5)
    base = tiny_dit_state(CONFIG)
    a = effective_state([LoraSpec(str(one), 0.5)], meta_model)
    b = effective_state([LoraSpec(str(two), 1.5)], meta_model)
    both = effective_state([LoraSpec(str(one), 0.5), LoraSpec(str(two), 1.5)], meta_model)
    for key in base:
        torch.testing.assert_close(both[key], base[key] + (a[key] - base[key]) + (b[key] - base[key]),
                                   rtol=0, atol=2e-6)
    assert not torch.equal(both["layers.0.attention.qkv.weight"], a["layers.0.attention.qkv.weight"])


def test_unmatched_keys_are_counted_and_named(tmp_path, meta_model, caplog):
    tensors = lora_tensors(CONFIG, "kohya", RANK, ALPHA, seed=6)
    tensors["lora_unet_layers_0_not_a_layer.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_unet_layers_0_not_a_layer.lora_up.weight"] = torch.zeros(8, RANK)
    tensors["some_stray_tensor"] = torch.zeros(3)
    from safetensors.torch import save_file
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="newbie_core"):
        dit_lora_patches([LoraSpec(str(path))], meta_model, CONFIG)
    assert "2 of its keys/modules match no NewBie DiT layer" in caplog.text
    assert "lora_unet_layers_0_not_a_layer" in caplog.text and "some_stray_tensor" in caplog.text


@pytest.mark.parametrize("keys, looks_like", [
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"], "FLUX"),
    (["lora_unet_input_blocks_4_1_proj_in", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "SDXL"),
    (["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], "text-encoder"),
])
def test_a_lora_that_matches_nothing_says_what_it_looks_like(keys, looks_like, tmp_path, meta_model):
    from safetensors.torch import save_file
    tensors = {}
    for k in keys:
        tensors[k + ".lora_down.weight"] = torch.zeros(2, 8)
        tensors[k + ".lora_up.weight"] = torch.zeros(8, 2)
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=f"matches the NewBie DiT; it looks like .*{looks_like}"):
        dit_lora_patches([LoraSpec(str(path))], meta_model, CONFIG)


def test_wrong_size_and_wrong_kind_of_file_are_refused(tmp_path, meta_model):
    from safetensors.torch import save_file
    path = tmp_path / "big.safetensors"
    save_file({"lora_unet_layers_0_attention_out.lora_down.weight": torch.zeros(4, 2304),
               "lora_unet_layers_0_attention_out.lora_up.weight": torch.zeros(2304, 4)}, str(path))
    with pytest.raises(CheckpointError, match="model of another size"):
        dit_lora_patches([LoraSpec(str(path))], meta_model, CONFIG)
    pt = tmp_path / "lora.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        dit_lora_patches([LoraSpec(str(pt))], meta_model, CONFIG)
    dora = tmp_path / "dora.safetensors"
    save_file({"lora_unet_layers_0_attention_out.lora_down.weight": torch.zeros(4, 96),
               "lora_unet_layers_0_attention_out.lora_up.weight": torch.zeros(96, 4),
               "lora_unet_layers_0_attention_out.dora_scale": torch.ones(96, 1)}, str(dora))
    with pytest.raises(CheckpointError, match="DoRA"):
        dit_lora_patches([LoraSpec(str(dora))], meta_model, CONFIG)


def test_lora_spec_parses_file_and_strength():
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec("a/b.safetensors", 1.0)
    assert LoraSpec.parse("a/b.safetensors:0.6") == LoraSpec("a/b.safetensors", 0.6)
    assert LoraSpec.parse(r"C:\loras\x.safetensors") == LoraSpec(r"C:\loras\x.safetensors", 1.0)
    assert LoraSpec.parse(r"C:\loras\x.safetensors:-1") == LoraSpec(r"C:\loras\x.safetensors", -1.0)


# -- through placement and the sampler ---------------------------------------------------------
@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(0)
    pos = Conditioning(torch.randn(7, CONFIG.cap_feat_dim, generator=gen), torch.randn(CONFIG.clip_text_dim, generator=gen))
    neg = Conditioning(torch.randn(3, CONFIG.cap_feat_dim, generator=gen), torch.randn(CONFIG.clip_text_dim, generator=gen))
    return pos, neg


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return write_lora(root / "peft" / "adapter_model.safetensors", CONFIG, "peft", RANK, ALPHA, seed=7, std=0.1)


def _sample(handle, conds, budget=None, steps=2):
    start = torch.zeros(1, 16, 8, 8)
    return run_sampling(handle, *conds, start, SamplingSettings(steps=steps, seed=3), MemorySettings(), CPU,
                        Report(), budget)


def test_strength_0_is_identical_to_no_lora_and_strength_1_is_not(tiny_models, conds, lora_file):
    plain = _sample(tiny_models.dit, conds).latent
    zero = _sample(tiny_models.dit.with_lora(lora_file, 0.0), conds).latent
    one = _sample(tiny_models.dit.with_lora(lora_file, 1.0), conds).latent
    assert torch.equal(plain, zero)
    assert (one - plain).abs().max() > 1e-3


def _tight(result) -> int:
    block = result.plan.slot_bytes or 2 * 2**20
    return result.plan.predicted_peak - 3 * block


@pytest.mark.parametrize("storage", [StorageDType.BF16, StorageDType.FP8])
def test_streamed_with_a_lora_is_bitwise_equal_to_resident(tiny_models, conds, lora_file, storage):
    handle = load_dit_handle(tiny_models.dit.ckpt.path, storage).with_lora(lora_file, 0.8)
    resident = _sample(handle, conds)
    streamed = _sample(handle, conds, _tight(resident))
    assert len(streamed.plan.resident) < streamed.plan.n_blocks, "the budget must force streaming"
    assert (streamed.plan.attn_chunk, streamed.plan.ffn_chunk) == (resident.plan.attn_chunk, resident.plan.ffn_chunk)
    assert torch.equal(streamed.latent, resident.latent)
    assert not torch.equal(resident.latent, _sample(load_dit_handle(tiny_models.dit.ckpt.path, storage), conds).latent)


# Measured on the tiny DiT (3 steps, relative L2 of the latent): fp8 + LoRA vs bf16 + LoRA 1.2 %,
# fp8 vs bf16 without a LoRA 1.1 %, while the LoRA itself moves the latent 9 %. The delta is added
# after the upcast at compute precision, so the LoRA is not quantised; the bound leaves room.
FP8_LORA_DRIFT = 0.03


def test_fp8_with_a_lora_stays_within_the_stated_drift(tiny_models, conds, lora_file):
    path = tiny_models.dit.ckpt.path
    bf16 = _sample(load_dit_handle(path).with_lora(lora_file), conds, steps=3).latent
    fp8 = _sample(load_dit_handle(path, StorageDType.FP8).with_lora(lora_file), conds, steps=3).latent
    base_bf16 = _sample(load_dit_handle(path), conds, steps=3).latent
    base_fp8 = _sample(load_dit_handle(path, StorageDType.FP8), conds, steps=3).latent
    drift = float((fp8 - bf16).norm() / bf16.norm())
    base_drift = float((base_fp8 - base_bf16).norm() / base_bf16.norm())
    assert 0 < drift < FP8_LORA_DRIFT
    assert drift < 2 * base_drift + 1e-3, "the LoRA must not add its own quantisation error"


def test_changing_only_the_strength_reads_nothing_of_the_dit_file_nor_the_lora(tiny_models, conds, lora_file,
                                                                                monkeypatch):
    handle = tiny_models.dit
    _sample(handle.with_lora(lora_file, 1.0), conds)          # warm: host store and LoRA cache
    reads: list[str] = []
    original = checkpoint_module.TensorSource._get_raw
    monkeypatch.setattr(checkpoint_module.TensorSource, "_get_raw",
                        lambda self, key: (reads.append(key), original(self, key))[1])
    misses, lora_reads = HOST_CACHE.misses, LORA_READS["files"]
    _sample(handle.with_lora(lora_file, 0.3), conds)
    assert HOST_CACHE.misses == misses, "the block store must come from the host cache"
    assert LORA_READS["files"] == lora_reads, "the LoRA file must come from the LoRA cache"
    assert reads == [], f"the DiT file was read again: {reads[:5]}"      # blocks and non-block tensors alike


def test_the_plan_counts_the_lora_on_the_device(tiny_models, conds, lora_file):
    plain = _sample(tiny_models.dit, conds).plan
    with_lora = _sample(tiny_models.dit.with_lora(lora_file), conds).plan
    tensors = lora_tensors(CONFIG, "peft", RANK, ALPHA, seed=7)
    block_factor_bytes = sum(v.numel() * 4 for k, v in tensors.items()
                             if k.split(".")[2] in ("layers", "noise_refiner", "context_refiner"))
    assert with_lora.predicted_peak - plain.predicted_peak >= block_factor_bytes > 0
    assert math.isfinite(with_lora.predicted_peak)


# -- ComfyUI's own patches (core LoraLoaderModelOnly on the pack's MODEL) ----------------------
class _Adapter:
    """Stands in for comfy.weight_adapter's LoRAAdapter: a name and the weights tuple."""
    def __init__(self, name, weights):
        self.name, self.weights = name, weights


def _comfy_lora_patches(tensors, strength, as_object):
    patches = {}
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        flat = key[len("lora_unet_"): -len(".lora_down.weight")]
        module = next(m for m in linear_modules(CONFIG) if m.replace(".", "_") == flat)
        weights = (tensors[f"lora_unet_{flat}.lora_up.weight"], tensors[key], float(tensors[f"lora_unet_{flat}.alpha"]),
                   None, None, None)
        v = _Adapter("lora", weights) if as_object else ("lora", weights)
        patches[f"diffusion_model.{module}.weight"] = [(strength, v, 1.0, None, None)]
    return patches


@pytest.mark.parametrize("as_object", [True, False])
def test_comfy_lora_patches_give_the_same_latent_as_the_file(tiny_models, conds, tmp_path, meta_model, as_object):
    from newbie_core.pipeline.comfy_lora import comfy_patches_to_lora
    path = write_lora(tmp_path / "k.safetensors", CONFIG, "kohya", RANK, ALPHA, seed=8, std=0.1)
    tensors = lora_tensors(CONFIG, "kohya", RANK, ALPHA, seed=8, std=0.1)
    shapes = {n: tuple(p.shape) for n, p in meta_model.named_parameters()}
    converted = comfy_patches_to_lora(_comfy_lora_patches(tensors, 0.6, as_object), CONFIG, shapes)
    from_file = _sample(tiny_models.dit.with_lora(path, 0.6), conds).latent
    from_comfy = _sample(tiny_models.dit.with_param_patches(converted), conds).latent
    assert torch.equal(from_file, from_comfy)


def test_comfy_qkv_slices_must_be_newbies_gqa_rows(meta_model):
    from newbie_core.pipeline.comfy_lora import UnsupportedComfyPatch, comfy_patches_to_lora
    shapes = {n: tuple(p.shape) for n, p in meta_model.named_parameters()}
    dim, kv = CONFIG.dim, CONFIG.n_kv_heads * CONFIG.head_dim
    up, down = torch.zeros(kv, 2), torch.zeros(2, dim)
    key = "diffusion_model.layers.0.attention.qkv.weight"
    ok = comfy_patches_to_lora({key: [(1.0, ("lora", (up, down, None, None, None, None)), 1.0, (0, dim, kv), None)]},
                               CONFIG, shapes)
    assert ok["layers.0.attention.qkv.weight"][0].rows == (dim, dim + kv)
    lumina_k = (0, dim, dim)           # ComfyUI's Lumina-2 map: k as wide as the model
    with pytest.raises(UnsupportedComfyPatch, match="KV heads.*NewBie LoRA Loader"):
        comfy_patches_to_lora({key: [(1.0, ("lora", (torch.zeros(dim, 2), down, None, None, None, None)), 1.0,
                                      lumina_k, None)]}, CONFIG, shapes)
    with pytest.raises(UnsupportedComfyPatch, match="DoRA.*NewBie LoRA Loader"):
        comfy_patches_to_lora({key: [(1.0, ("lora", (up, down, None, None, torch.ones(3), None)), 1.0, None, None)]},
                              CONFIG, shapes)
    with pytest.raises(UnsupportedComfyPatch, match="does not have"):
        comfy_patches_to_lora({"diffusion_model.double_blocks.0.img_attn.qkv.weight": []}, CONFIG, shapes)


def test_resident_blocks_are_patched_once_per_stage_streamed_ones_at_every_use(tiny_models, conds, lora_file,
                                                                               monkeypatch):
    from newbie_core.placement.patches import BlockPatches
    calls: list[int] = []
    original = BlockPatches.apply
    monkeypatch.setattr(BlockPatches, "apply", lambda self, i, views: (calls.append(i), original(self, i, views))[1])
    handle = tiny_models.dit.with_lora(lora_file)
    resident = _sample(handle, conds, steps=3)
    assert sorted(calls) == list(range(CONFIG.n_blocks))          # every block has patches; each once
    calls.clear()
    streamed = _sample(handle, conds, _tight(resident), steps=3)
    plan = streamed.plan
    per_forward = len(plan.streamed_per_forward)
    once = len(plan.streamed) - per_forward                       # the caption refiners: one use per stage
    assert per_forward and once == CONFIG.n_context_refiner
    forwards = 3                                                  # one batched (cond + uncond) forward per step
    assert len(calls) == len(plan.resident) + once + per_forward * forwards
