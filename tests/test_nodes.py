"""CPU tier: the pack's V1 node classes, called directly with the tiny checkpoints.

The pack is imported the way ComfyUI imports it (conftest.load_pack: the repo root as package
``newbie_lowvram_pack``), so its newbie_core is ``newbie_lowvram_pack.newbie_core``: counters
and caches are read from that copy. ComfyUI itself is replaced by the adapter's FallbackAdapter
pointed at the tiny model folders.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK = "newbie_lowvram_pack"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
XML = ("<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n</character_1>\n"
       "<general_tags>\n<count>1girl, solo</count>\n</general_tags>")


def _conftest():
    path = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == path)


@pytest.fixture(scope="module")
def pack():
    return _conftest().load_pack()


def mod(name: str):
    return importlib.import_module(f"{PACK}.{name}")


@pytest.fixture(scope="module")
def adapter(pack, tiny_dir):
    """The fallback adapter with ComfyUI's three model folders pointing at the tiny checkpoints."""
    ad = mod("nodes.comfy_adapter")
    fake = ad.FallbackAdapter({name: [tiny_dir / name] for name in ("diffusion_models", "text_encoders", "vae", "loras")})
    previous = ad.set_adapter(fake)
    yield fake
    ad.set_adapter(previous)


def call(cls, **inputs):
    """Run a node like the executor does; check the result has one value per RETURN_TYPES entry."""
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    result = out["result"] if isinstance(out, dict) else out
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), (cls.__name__, result)
    return out if isinstance(out, dict) else result


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models(nodes, adapter):
    dit, = call(nodes["NewBieDiTLoader"], dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16")
    te, = call(nodes["NewBieTextEncoderLoader"], gemma_name="gemma_3_4b_it_bf16.safetensors",
               jina_name="jina_clip_v2_bf16.safetensors", gemma_storage="bf16")
    vae, = call(nodes["NewBieVAELoader"], vae_name="ae.safetensors", dtype="fp32")
    return dit, te, vae


@pytest.fixture(scope="module")
def conds(nodes, models):
    return call(nodes["NewBieTextEncode"], text_encoders=models[1], positive=XML, negative="lowres", compat=False)


def sample(nodes, models, conds, latent, **kw):
    args = dict(dit=models[0], positive=conds[0], negative=conds[1], latent=latent, seed=1, steps=2, cfg=4.0,
                sampler="euler", shift=6.0, denoise=1.0)
    args.update(kw)
    return call(nodes["NewBieSampler"], **args)


def empty(nodes, w=32, h=32, batch=1):
    latent_mod = mod("nodes.latent_node")
    return call(nodes["NewBieEmptyLatent"], resolution=latent_mod.CUSTOM, width=w, height=h, batch_size=batch)[0]


# ---------------------------------------------------------------------------------- declarations

def test_every_node_declares_a_consistent_v1_interface(pack, nodes, adapter):
    assert len(nodes) == 14          # 12 + the LoRA Loader (issue 12) + DiT to MODEL (issue 12)
    for node_id, cls in nodes.items():
        assert node_id.startswith("NewBie") and node_id == cls.__name__
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.TITLE and cls.TITLE.startswith("NewBie")
        assert cls.DESCRIPTION and cls.CATEGORY.split("/")[0] == "NewBie"
        fn = getattr(cls, cls.FUNCTION)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        json.dumps(spec)
        assert set(spec) <= {"required", "optional", "hidden"}
        params = inspect.signature(fn).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                typ, opts = entry[0], entry[1]
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
                assert takes_kwargs or name in params, f"{node_id}.{cls.FUNCTION} does not accept {name}"
                if section == "optional":
                    assert takes_kwargs or params[name].default is not inspect.Parameter.empty, (node_id, name)
                if isinstance(typ, list):
                    assert typ, f"{node_id}.{name}: empty combo"
                    assert "default" not in opts or opts["default"] in typ, (node_id, name)
                elif typ in WIDGETS and "default" in opts and typ in ("INT", "FLOAT"):
                    assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), (node_id, name)
    assert nodes["NewBieMemoryReport"].OUTPUT_NODE is True


def test_node_modules_never_import_comfyui_or_absolute_nodes():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|server|execution|nodes|latent_preview)\b", re.M)
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        if path.name == "comfy_adapter.py":
            continue
        assert not pattern.search(path.read_text()), f"{path.name} imports ComfyUI (only comfy_adapter may)"


# ---------------------------------------------------------------------------------- loaders

def test_loaders_return_handles_and_fingerprint_files_not_nan(nodes, models, adapter, tiny_dir):
    pipeline = mod("newbie_core.pipeline")
    dit, te, vae = models
    assert isinstance(dit, pipeline.DiTHandle) and isinstance(te, pipeline.TextEncoderHandle)
    assert isinstance(vae, pipeline.VaeHandle) and vae.dtype == "fp32"
    loader = nodes["NewBieDiTLoader"]
    first = loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16")
    assert isinstance(first, str) and first == loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors",
                                                                storage="fp8")
    path = tiny_dir / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16") != first
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    te_changed = nodes["NewBieTextEncoderLoader"].IS_CHANGED(
        gemma_name="gemma_3_4b_it_bf16.safetensors", jina_name="jina_clip_v2_bf16.safetensors", gemma_storage="bf16")
    assert "gemma_3_4b_it_bf16" in te_changed and "jina_clip_v2_bf16" in te_changed
    assert "NewBie-Image-Exp0.1-bf16.safetensors" in nodes["NewBieDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]


def test_missing_model_file_error_names_the_folder(nodes, adapter):
    with pytest.raises(FileNotFoundError, match=r"'diffusion_models'.*models/diffusion_models"):
        call(nodes["NewBieDiTLoader"], dit_name="nope.safetensors", storage="bf16")
    with pytest.raises(FileNotFoundError, match="text_encoders"):
        call(nodes["NewBieTextEncoderLoader"], gemma_name="gemma_3_4b_it_bf16.safetensors",
             jina_name="missing_jina.safetensors", gemma_storage="fp8")
    assert nodes["NewBieVAELoader"].IS_CHANGED(vae_name="gone.safetensors", dtype="bf16") == "missing:vae/gone.safetensors"


# ---------------------------------------------------------------------------------- settings

def test_memory_settings_node_and_node_overrides(nodes):
    settings_mod = mod("nodes.settings_node")
    memory, = call(nodes["NewBieMemorySettings"], vram_budget_gb=7.0, ram_budget_gb=0.0, attention_slicing="1024",
                   ffn_chunking="off", fp8_streaming=True, vae_tile=512, compute_dtype="fp16")
    assert isinstance(memory, mod("newbie_core.pipeline").MemorySettings)
    assert (memory.vram_budget_gb, memory.ram_budget_gb, memory.attention_chunk, memory.ffn_chunk) == (7.0, None, 1024, -1)
    assert memory.fp8_streaming and memory.vae_tile_px == 512 and memory.compute_dtype == "fp16"
    auto, = call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=12.0, attention_slicing="auto",
                 ffn_chunking="auto", fp8_streaming=False, vae_tile=0, compute_dtype="bf16")
    assert auto.vram_budget_gb is None and auto.ram_budget_gb == 12.0 and auto.attention_chunk == 0
    assert auto.compile is None and auto.cuda_graphs is None              # the optional switches' default
    assert auto.fp8_compute is False
    off, = call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=0.0, attention_slicing="auto",
                ffn_chunking="auto", fp8_streaming=False, vae_tile=0, compute_dtype="bf16", compile="off",
                cuda_graphs="on", fp8_compute=True)
    assert off.compile is False and off.cuda_graphs is True and off.fp8_compute is True
    problem = nodes["NewBieMemorySettings"].VALIDATE_INPUTS(fp8_compute=True)   # the fallback adapter: the CPU
    assert problem.startswith("fp8_compute: fp8 compute needs an NVIDIA GPU")
    # A node's own non-default widget wins; "from settings" / 0 keep the connected settings.
    resolved = settings_mod.resolve_memory(memory, 3.5, "auto", settings_mod.FROM_SETTINGS)
    assert (resolved.vram_budget_gb, resolved.attention_chunk, resolved.ffn_chunk) == (3.5, 0, -1)
    assert settings_mod.resolve_memory(memory, 0.0) == memory
    with pytest.raises(ValueError, match="vae_tile"):
        call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=0.0, attention_slicing="auto",
             ffn_chunking="auto", fp8_streaming=False, vae_tile=100, compute_dtype="bf16")


def test_vram_etiquette_frees_registers_and_always_unregisters(pack):
    """On a GPU device the stage first asks ComfyUI for room, then registers a handle sized to the
    plan's weights, and drops it afterwards, also when the stage fails."""
    ad = mod("nodes.comfy_adapter")
    settings_mod = mod("nodes.settings_node")
    MemorySettings = mod("newbie_core.pipeline").MemorySettings

    class Recorder(ad.FallbackAdapter):
        def __init__(self):
            super().__init__()
            self.calls = []

        def free_vram(self, n, device, keep=()):
            self.calls.append(("free", n))
            return 0

        def register_unloadable(self, name, size, fn, device=None):
            self.calls.append(("register", name, size))
            return super().register_unloadable(name, size, fn, device)

        def unregister(self, handle):
            self.calls.append(("unregister", handle.name))
            super().unregister(handle)

    rec = Recorder()
    previous = ad.set_adapter(rec)
    try:
        gpu = torch.device("cuda")
        budgets = []
        with settings_mod.vram_for_stage("stage A", gpu, MemorySettings(vram_budget_gb=2.0), lambda: 10**12,
                                         lambda b: budgets.append(b) or 123) as budget:
            assert rec.calls == [("free", 2 * 2**30), ("register", "stage A", 123)]
            assert len(rec.handles) == 1 and budget == 2 * 2**30 == budgets[0]
        assert rec.calls[-1] == ("unregister", "stage A") and rec.handles == []
        with pytest.raises(RuntimeError, match="boom"):
            with settings_mod.vram_for_stage("stage B", gpu, MemorySettings(vram_budget_gb=1.0), lambda: 5, lambda b: 7):
                raise RuntimeError("boom")
        assert rec.calls[-1] == ("unregister", "stage B") and rec.handles == []
        rec.calls.clear()
        with settings_mod.vram_for_stage("cpu stage", torch.device("cpu"), MemorySettings(), lambda: 1, lambda b: 1) as b:
            assert b is None
        assert rec.calls == []          # no VRAM on the CPU: nothing asked, nothing registered
    finally:
        ad.set_adapter(previous)


# ---------------------------------------------------------------------------------- prompt nodes

def test_chained_characters_and_builder_write_valid_xml(nodes):
    prompt = mod("newbie_core.prompt")
    first, = call(nodes["NewBieCharacter"], name="miku", gender="1girl", appearance="twintails", clothing="",
                  body_type="", expression="smile", action="", interaction="", position="left")
    both, = call(nodes["NewBieCharacter"], previous=first, name="rin", gender="1girl", appearance="short_hair",
                 clothing="", body_type="", expression="", action="waving", interaction="", position="right")
    assert [c.n for c in first] == ["miku"] and [c.n for c in both] == ["miku", "rin"]
    builder = nodes["NewBieXMLPromptBuilder"]
    widgets = {name: "" for name in builder.INPUT_TYPES()["required"]}
    widgets.update(count="2girls", quality="masterpiece", caption="Two idols on stage.")
    xml, = call(builder, characters=both, **widgets)
    assert xml.index("<character_1>") < xml.index("<character_2>") < xml.index("<general_tags>") < xml.index("<caption>")
    parsed = prompt.parse_prompt(xml).prompt
    assert [c.n for c in parsed.characters] == ["miku", "rin"] and parsed.characters[1].action == "waving"
    assert parsed.general_tags.count == "2girls" and parsed.caption == "Two idols on stage."
    # The builder's own character fields add one more character after the chain.
    widgets.update(character_name="len", character_gender="1boy")
    xml3, = call(builder, characters=both, **widgets)
    assert [c.n for c in prompt.parse_prompt(xml3).prompt.characters] == ["miku", "rin", "len"]


def test_builder_rejects_bad_values_naming_the_field(nodes):
    prompt = mod("newbie_core.prompt")
    first, = call(nodes["NewBieCharacter"], name="miku", gender="1girl", appearance="", clothing="", body_type="",
                  expression="", action="", interaction="", position="")
    second, = call(nodes["NewBieCharacter"], previous=first, name="rin", gender="1girl", appearance="bad\x01tag",
                   clothing="", body_type="", expression="", action="", interaction="", position="")
    builder = nodes["NewBieXMLPromptBuilder"]
    widgets = {name: "" for name in builder.INPUT_TYPES()["required"]}
    with pytest.raises(ValueError, match=r"character_2\.appearance") as err:
        call(builder, characters=second, **widgets)
    assert isinstance(err.value, prompt.PromptValueError) and err.value.field == "character_2.appearance"
    with pytest.raises(ValueError, match="empty"):
        call(builder, **widgets)


# ---------------------------------------------------------------------------------- encode

def test_encode_outputs_native_conditioning_layout(conds, models):
    dit = models[0]
    for cond in conds:
        assert isinstance(cond, list) and len(cond) == 1
        feats, extra = cond[0]
        assert feats.ndim == 3 and feats.shape[0] == 1 and feats.shape[2] == dit.ckpt.config.cap_feat_dim
        assert feats.device.type == "cpu" and torch.isfinite(feats).all()
        assert extra["attention_mask"].shape == (1, feats.shape[1]) and bool(extra["attention_mask"].all())
        assert extra["pooled_output"].shape == (1, dit.ckpt.config.clip_text_dim)
    assert not torch.equal(conds[0][0][0][0, :1], torch.zeros_like(conds[0][0][0][0, :1]))


def test_encode_skips_encoders_for_an_unchanged_prompt(nodes, models):
    pipeline = mod("newbie_core.pipeline")
    pipeline.CONDITIONING_CACHE.clear()
    args = dict(text_encoders=models[1], positive="a cat on a sofa", negative="", compat=False)
    first = call(nodes["NewBieTextEncode"], **args)
    counted = dict(pipeline.ENCODER_CALLS)
    second = call(nodes["NewBieTextEncode"], **args)                    # a new node instance, same prompt
    assert pipeline.ENCODER_CALLS == counted, "an unchanged prompt ran the encoders again"
    assert torch.equal(first[0][0][0], second[0][0][0]) and torch.equal(first[1][0][1]["pooled_output"],
                                                                        second[1][0][1]["pooled_output"])
    call(nodes["NewBieTextEncode"], **{**args, "compat": True})         # compat changes Jina's text: a miss
    assert pipeline.ENCODER_CALLS["jina"] == counted["jina"] + 1


def test_encode_reports_malformed_xml_with_line_and_column(nodes, models):
    pipeline = mod("newbie_core.pipeline")
    before = dict(pipeline.ENCODER_CALLS)
    with pytest.raises(ValueError, match=r"line 2, column \d+"):
        call(nodes["NewBieTextEncode"], text_encoders=models[1], positive="<character_1>\n<n>miku</gender>\n</character_1>",
             negative="", compat=False)
    assert pipeline.ENCODER_CALLS == before


# ---------------------------------------------------------------------------------- sampler

def test_sampler_returns_raw_latent_report_progress_and_is_deterministic(nodes, models, conds, adapter):
    adapter.progress_bars.clear()
    start = empty(nodes, 48, 32, batch=2)
    latent, report = sample(nodes, models, conds, start)
    assert latent["samples"].shape == (2, 16, 4, 6) and latent["samples"].device.type == "cpu"
    assert torch.isfinite(latent["samples"]).all() and latent["samples"].std() > 1e-3
    assert [u[0] for u in adapter.progress_bars[-1].updates] == [1, 2]
    again, _ = sample(nodes, models, conds, start)
    assert torch.equal(latent["samples"], again["samples"])
    other, _ = sample(nodes, models, conds, start, seed=2)
    assert not torch.equal(latent["samples"], other["samples"])
    text = report.render()
    assert "sample" in text and "predicted peak" in text and "blocks resident / streamed" in text


def test_sampler_cancel_stops_within_one_step(nodes, models, conds, adapter):
    ad = mod("nodes.comfy_adapter")
    adapter.progress_bars.clear()
    original = ad.FallbackAdapter.progress_bar

    def bar_that_cancels(self, total, node_id=None):
        bar = original(self, total, node_id)
        update = bar.update_absolute

        def update_and_cancel(value, total=None, preview=None):
            update(value, total, preview)
            self.request_interrupt()        # the user presses Cancel during the first step
        bar.update_absolute = update_and_cancel
        return bar

    adapter.progress_bar = bar_that_cancels.__get__(adapter)
    try:
        with pytest.raises(ad.ProcessingInterrupted):
            sample(nodes, models, conds, empty(nodes), steps=5)
    finally:
        del adapter.progress_bar
    assert [u[0] for u in adapter.progress_bars[-1].updates] == [1]


def test_encode_cancel_stops_within_one_block(nodes, models, adapter, monkeypatch):
    """ComfyUI's Cancel is a flag: the encode node polls it before every encoder block."""
    ad = mod("nodes.comfy_adapter")
    pipeline = mod("newbie_core.pipeline")
    checks = []
    original = ad.FallbackAdapter.check_interrupted

    def cancel_during_the_first_block(self):
        checks.append(1)
        if len(checks) == 2:              # the user presses Cancel while block 0 runs
            self.request_interrupt()
        original(self)
    monkeypatch.setattr(ad.FallbackAdapter, "check_interrupted", cancel_during_the_first_block)
    counted = dict(pipeline.ENCODER_CALLS)
    args = dict(text_encoders=models[1], positive="a prompt cancelled mid-encode", negative="", compat=False)
    with pytest.raises(ad.ProcessingInterrupted):
        call(nodes["NewBieTextEncode"], **args)
    assert len(checks) == 2                                   # block 1 never started
    assert pipeline.ENCODER_CALLS == counted                  # neither encoder finished; Jina never started
    monkeypatch.undo()
    call(nodes["NewBieTextEncode"], **args)                   # the next run works
    assert pipeline.ENCODER_CALLS["gemma"] == counted["gemma"] + 1


def test_sampler_streams_under_a_small_budget_and_matches_resident(nodes, models, conds):
    start = empty(nodes)
    resident, rep = sample(nodes, models, conds, start, cfg=1.0)     # cfg 1: one forward per step
    plan_text = rep.plans[0][1]
    assert re.search(r"blocks resident / streamed\s+(\d+) / 0", plan_text)
    # The all-resident plan's peak minus three blocks: fits the ring, but not every block.
    plan = mod("newbie_core.pipeline.sample").plan_sampling(
        models[0], mod("newbie_core.pipeline").MemorySettings(), 1, conds[0][0][0].shape[1], 32, 32,
        torch.device("cpu"), None)[2]
    block = max(plan.slot_bytes, 2 * 2**20)
    tight_gb = (plan.predicted_peak - 3 * block) / 2**30
    streamed, rep2 = sample(nodes, models, conds, start, cfg=1.0, vram_budget_gb=tight_gb)
    assert re.search(r"blocks resident / streamed\s+\d+ / [1-9]", rep2.plans[0][1]), rep2.plans[0][1]
    assert torch.equal(resident["samples"], streamed["samples"])


def test_sampler_accepts_native_masked_conditioning_and_rejects_foreign(nodes, models, conds):
    enc = mod("nodes.encode_node")
    feats, extra = conds[0][0]
    padded = torch.cat([feats, torch.full((1, 3, feats.shape[2]), 99.0)], dim=1)      # (1, L+3, C)
    mask = torch.cat([extra["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    native = [[padded, {"pooled_output": extra["pooled_output"], "attention_mask": mask}]]
    back = enc.from_comfy_conditioning(native, "positive")
    assert torch.equal(back.cap_feats, feats[0].float()) and back.pooled.shape == (extra["pooled_output"].shape[1],)
    start = empty(nodes)
    a, _ = sample(nodes, models, conds, start, cfg=1.0)
    b, _ = sample(nodes, models, conds, start, cfg=1.0, positive=native)
    assert torch.equal(a["samples"], b["samples"])
    with pytest.raises(ValueError, match="pooled_output"):
        sample(nodes, models, conds, start, positive=[[feats, {}]])
    with pytest.raises(ValueError, match="expects"):
        sample(nodes, models, conds, start, negative=[[torch.zeros(1, 5, 2048), {"pooled_output": torch.zeros(1, 1280)}]])


def test_sampler_rejects_bad_inputs_clearly(nodes, models, conds):
    start = empty(nodes)
    with pytest.raises(ValueError, match="denoise"):
        sample(nodes, models, conds, start, denoise=0.0)
    with pytest.raises(ValueError, match="16 channels"):
        sample(nodes, models, conds, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(nodes, models, conds, {"samples": torch.zeros(1, 16, 9, 8)})
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(nodes, models, conds, start, sampler="nope")
    with pytest.raises(ValueError, match="DiT Loader"):
        sample(nodes, models, conds, start, dit="not a handle")


# ---------------------------------------------------------------------------------- latent, VAE, report

def test_empty_latent_presets_custom_and_errors(nodes):
    cls = nodes["NewBieEmptyLatent"]
    presets = cls.INPUT_TYPES()["required"]["resolution"][0]
    assert presets[0] == "1024x1024 (1:1)" and len(presets) == 52
    latent, = call(cls, resolution="1024x1024 (1:1)", width=16, height=16, batch_size=2)
    assert latent["samples"].shape == (2, 16, 128, 128) and not latent["samples"].any()
    wide = next(p for p in presets if p.startswith("2048x512"))
    assert call(cls, resolution=wide, width=64, height=64, batch_size=1)[0]["samples"].shape == (1, 16, 64, 256)
    assert empty(nodes, 80, 48)["samples"].shape == (1, 16, 6, 10)
    with pytest.raises(ValueError, match="multiple of 16"):
        empty(nodes, 100, 64)


def test_vae_decode_encode_and_memory_report(nodes, models, conds):
    _, _, vae = models
    latent, s_report = sample(nodes, models, conds, empty(nodes, 48, 32))
    image, v_report = call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=0, overlap=64)
    assert image.shape == (1, 32, 48, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and image.std() > 1e-4
    tiled, _ = call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=32, overlap=8)
    assert tiled.shape == image.shape and "32 px tiles" in _.plans[0][1]
    encoded, = call(nodes["NewBieVAEEncode"], vae=vae, image=image)
    assert encoded["samples"].shape == (1, 16, 4, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        call(nodes["NewBieVAEEncode"], vae=vae, image=torch.rand(1, 40, 64, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=100, overlap=64)
    out = call(nodes["NewBieMemoryReport"], sampler_report=s_report, vae_report=v_report)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "== plan: sample ==" in text and "== plan: decode ==" in text and "== measured ==" in text
    assert text.index("plan: sample") < text.index("plan: decode")
    assert re.search(r"^sample\s", text, re.M) and re.search(r"^decode\s", text, re.M)
    assert call(nodes["NewBieMemoryReport"])["result"][0].startswith("(connect")


def test_lora_loader_chains_and_changes_the_sample(nodes, models, conds, adapter):
    loader = nodes["NewBieLoraLoader"]
    peft, lokr = "newbie_tiny_peft/adapter_model.safetensors", "newbie_tiny_lokr.safetensors"
    assert loader.INPUT_TYPES()["required"]["lora_name"][0] == [lokr, peft]
    one, = call(loader, dit=models[0], lora_name=peft, strength=0.8)
    two, = call(loader, dit=one, lora_name=lokr, strength=0.5)
    assert [(Path(s.path).name, s.strength) for s in two.loras] == [("adapter_model.safetensors", 0.8),
                                                                     (lokr, 0.5)]
    assert models[0].loras == ()                      # the input handle is left as it was
    latent = empty(nodes)
    plain = sample(nodes, models, conds, latent)[0]["samples"]
    patched = sample(nodes, (two,) + models[1:], conds, latent)[0]["samples"]
    assert (plain - patched).abs().max() > 1e-3


def test_comfyui_unloading_the_pack_frees_its_host_copies(pack, adapter, tiny_dir):
    """After a stage, the host copies stay behind a weightless handle: ComfyUI's unload (here the
    fallback's 'Unload models') frees them, the pinned buffers with them."""
    settings_node = mod("nodes.settings_node")
    placement = importlib.import_module(f"{PACK}.newbie_core.placement")
    layout_mod = importlib.import_module(f"{PACK}.newbie_core.placement.layout")
    memory = importlib.import_module(f"{PACK}.newbie_core.pipeline").MemorySettings(vram_budget_gb=1.0)
    files = sorted((tiny_dir / "diffusion_models").iterdir())[:1]
    layout = layout_mod.compute_layout([("w", (64, 64), torch.float32)])
    cache = placement.HOST_CACHE
    cache.clear()                       # earlier tests' copies
    cache.get(placement.cache_key(files, ["w"], "bf16"), [layout] * 3, lambda i: {"w": torch.ones(64, 64)}, None,
              pin=False)
    other = tiny_dir / "vae"
    kept = cache.get(placement.cache_key(sorted(other.iterdir())[:1], ["w"], "bf16"), [layout],
                     lambda i: {"w": torch.ones(64, 64)}, None, pin=False)
    before = cache.used()
    assert before == 4 * layout.nbytes
    gpu = torch.device("cuda")          # a device object only: the fallback adapter calls no CUDA
    with settings_node.vram_for_stage("NewBie DiT", gpu, memory, lambda: 0, lambda b: 0, host_files=files):
        pass
    handle = next(h for h in adapter.handles if h.name == "NewBie DiT (host copies)")
    assert cache.used() == before
    adapter.unload_all()
    assert handle.unload_calls == 1
    assert cache.used() == before - 3 * layout.nbytes == kept.host_bytes
    cache.clear()
