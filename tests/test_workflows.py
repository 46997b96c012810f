"""CPU tier: the bundled workflows/*.json are valid UI workflows and run through the node classes.

Static checks follow comfyui-notes §3.1 (links both ways, widgets_values against INPUT_TYPES,
control_after_generate values, combo membership and ranges). Execution converts each workflow to
an API prompt with tests/comfyui_workflow.ui_to_api and runs it node by node (tiny checkpoints,
64x64, 2 steps), with the four core nodes the workflows use replaced by small fakes.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
PACK = "newbie_lowvram_pack"
CNR_ID = "comfyui-newbie-lowvram"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILES = {"diffusion_models": "NewBie-Image-Exp0.1-bf16.safetensors",
               "text_encoders": ("gemma_3_4b_it_bf16.safetensors", "jina_clip_v2_bf16.safetensors"),
               "vae": "ae.safetensors"}
EXPECTED = {"newbie_img2img", "newbie_t2i_16gb_1024", "newbie_t2i_8gb_1024x1536", "newbie_two_characters_xml",
            "newbie_with_core_nodes", "newbie_core_ksampler"}
# Core nodes that only real ComfyUI can run (the ComfyUI tier executes these workflows).
COMFY_ONLY = {"KSampler", "ModelSamplingAuraFlow"}

import comfyui_workflow as cw  # tests/ is on pytest's pythonpath (pyproject)


# ---------------------------------------------------------------------------------- fake core nodes

class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["example.png"], {"image_upload": True})}}

    def load_image(self, image):
        y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
        rgb = torch.stack([x, y, (x + y) / 2], dim=-1)[None]                  # (1, 64, 64, 3)
        return rgb, torch.zeros(1, 64, 64)


class EmptySD3LatentImage:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
                             "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def generate(self, width, height, batch_size=1):
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


class SaveImage:
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    saved: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        type(self).saved.append((filename_prefix, images))
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png"} for i in range(len(images))]},
                "result": ()}


class PreviewImage(SaveImage):
    saved: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images, filename_prefix="preview"):
        return super().save_images(images, filename_prefix)


CORE = {"LoadImage": LoadImage, "EmptySD3LatentImage": EmptySD3LatentImage, "SaveImage": SaveImage,
        "PreviewImage": PreviewImage, **{name: cw.CORE_NODE_STUBS[name] for name in COMFY_ONLY}}
VIRTUAL = {"Note", "MarkdownNote"}


# ---------------------------------------------------------------------------------- fixtures

def _conftest():
    path = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == path)


@pytest.fixture(scope="module")
def ours():
    return _conftest().load_pack().NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def adapter(ours, tiny_dir):
    ad = importlib.import_module(f"{PACK}.nodes.comfy_adapter")
    fake = ad.FallbackAdapter({name: [tiny_dir / name] for name in MODEL_FILES})
    previous = ad.set_adapter(fake)
    yield fake
    ad.set_adapter(previous)


@pytest.fixture(scope="module")
def mappings(ours, adapter):
    return {**CORE, **ours}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def spec_inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


# ---------------------------------------------------------------------------------- static checks

def test_the_six_workflows_and_their_thumbnails_exist():
    from PIL import Image
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    for path in WORKFLOWS:
        with Image.open(path.with_suffix(".jpg")) as img:
            assert img.format == "JPEG" and img.size == (512, 384)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_structure_links_and_widgets(path, mappings, ours):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and wf["links"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(l[0] for l in wf["links"])
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node), node["id"]
        assert node["type"] in mappings or node["type"] in VIRTUAL, f"unknown node type {node['type']}"
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"])
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][sslot], nodes[dst]["inputs"][dslot]
        assert lid in out["links"] and out["type"] == typ, (path.name, lid)
        assert inp["link"] == lid and inp["type"] == typ, (path.name, lid)
        assert nodes[dst]["order"] > nodes[src]["order"], f"link {lid} runs against the execution order"
    for node in wf["nodes"]:
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is not None:
                assert links[inp["link"]][3:5] == [node["id"], slot], (path.name, node["id"], inp["name"])
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                assert links[lid][1:3] == [node["id"], slot], (path.name, node["id"], slot)
        if node["type"] in VIRTUAL:
            continue
        cls = mappings[node["type"]]
        declared = spec_inputs(cls)
        for inp in node.get("inputs", []):                  # socket names and types as declared
            typ = declared[inp["name"]][0]
            assert inp["type"] == (typ if isinstance(typ, str) else "COMBO"), (node["type"], inp["name"])
        for slot, out in enumerate(node.get("outputs", [])):
            assert out["type"] == cls.RETURN_TYPES[slot], (node["type"], slot)
        _check_widgets(node, cls)
        if node["type"] in ours:
            assert node["properties"]["cnr_id"] == CNR_ID
            assert node["properties"]["Node name for S&R"] == node["type"]


def _check_widgets(node: dict, cls) -> None:
    """widgets_values has exactly one value per widget (+ the control/upload companions), each valid."""
    values = node.get("widgets_values", [])
    slots = cw.widget_slots(cls)
    assert len(values) == sum(s.width for s in slots), (node["type"], len(values), [s.name for s in slots])
    declared = spec_inputs(cls)
    i = 0
    for slot in slots:
        value, (typ, opts) = values[i], (declared[slot.name] + ({},))[:2]
        if isinstance(typ, list):
            assert value in typ, f"{node['type']}.{slot.name}: {value!r} is not an option"
        elif typ in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (node["type"], slot.name)
            assert opts.get("min", value) <= value <= opts.get("max", value), (node["type"], slot.name, value)
        elif typ == "BOOLEAN":
            assert isinstance(value, bool), (node["type"], slot.name)
        elif typ == "STRING":
            assert isinstance(value, str), (node["type"], slot.name)
        if slot.width == 2 and not opts.get("image_upload"):
            assert values[i + 1] in CONTROL_VALUES, f"{node['type']}.{slot.name} lacks its control_after_generate value"
        i += slot.width


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_model_note_and_saves_images(path):
    wf = load(path)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in VIRTUAL]
    assert notes, "each workflow explains which model files it needs"
    for folder, names in MODEL_FILES.items():
        for name in (names if isinstance(names, tuple) else (names,)):
            assert f"{folder}/{name}" in notes[0], (folder, name)
    assert any(n["type"] == "SaveImage" for n in wf["nodes"])


def _widget(wf: dict, node_type: str, name: str, mappings):
    node = next(n for n in wf["nodes"] if n["type"] == node_type)
    api = cw.ui_to_api({"nodes": [node], "links": []}, mappings)
    return api[str(node["id"])]["inputs"][name]


def test_each_workflow_shows_what_its_name_promises(mappings):
    wfs = {p.stem: load(p) for p in WORKFLOWS}
    api = {k: cw.ui_to_api(wf, mappings) for k, wf in wfs.items()}

    def nodes_of(name, typ):
        return [n for n in api[name].values() if n["class_type"] == typ]

    assert nodes_of("newbie_t2i_16gb_1024", "NewBieEmptyLatent")[0]["inputs"]["resolution"] == "1024x1024 (1:1)"
    mem = nodes_of("newbie_t2i_8gb_1024x1536", "NewBieMemorySettings")[0]["inputs"]
    assert 0 < mem["vram_budget_gb"] <= 8.0 and mem["fp8_streaming"] is True
    lat = nodes_of("newbie_t2i_8gb_1024x1536", "NewBieEmptyLatent")[0]["inputs"]
    assert (lat["width"], lat["height"]) == (1024, 1536) and lat["resolution"].startswith("custom")
    chars = nodes_of("newbie_two_characters_xml", "NewBieCharacter")
    assert len(chars) == 2 and sum("previous" in c["inputs"] for c in chars) == 1
    builder_id = next(k for k, n in api["newbie_two_characters_xml"].items() if n["class_type"] == "NewBieXMLPromptBuilder")
    assert nodes_of("newbie_two_characters_xml", "NewBieTextEncode")[0]["inputs"]["positive"] == [builder_id, 0]
    sampler = nodes_of("newbie_img2img", "NewBieSampler")[0]["inputs"]
    assert sampler["denoise"] == 0.6
    assert api["newbie_img2img"][sampler["latent"][0]]["class_type"] == "NewBieVAEEncode"
    core = api["newbie_with_core_nodes"]
    assert core[nodes_of("newbie_with_core_nodes", "NewBieSampler")[0]["inputs"]["latent"][0]]["class_type"] == \
        "EmptySD3LatentImage"
    assert {"SaveImage", "PreviewImage"} <= {n["class_type"] for n in core.values()}
    ks = api["newbie_core_ksampler"]
    sampler = nodes_of("newbie_core_ksampler", "KSampler")[0]["inputs"]
    shift = ks[sampler["model"][0]]
    assert shift["class_type"] == "ModelSamplingAuraFlow" and ks[shift["inputs"]["model"][0]]["class_type"] == \
        "NewBieDiTToModel"
    assert ks[sampler["positive"][0]]["class_type"] == "NewBieTextEncode"
    assert not nodes_of("newbie_core_ksampler", "NewBieSampler")


# ---------------------------------------------------------------------------------- execution

# Loader outputs shared across prompts, keyed like ComfyUI's cache (class, inputs, IS_CHANGED):
# a loader whose file did not change is not run again.
LOADER_CACHE: dict[tuple, tuple] = {}


def execute(prompt: dict, mappings: dict, targets: list[str] | None = None) -> dict:
    """Run the output nodes (or ``targets``) and their ancestors once, in dependency order.

    Returns {node id: ui dict} for nodes that returned one."""
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}

    def run(nid: str) -> tuple:
        if nid in results:
            return results[nid]
        node = prompt[nid]
        cls = mappings[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                kwargs[name] = run(value[0])[value[1]]
            else:
                kwargs[name] = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
        key = None
        if getattr(cls, "CATEGORY", "").endswith("/loaders"):
            key = (node["class_type"], tuple(sorted(kwargs.items())), cls.IS_CHANGED(**kwargs))
            if key in LOADER_CACHE:
                results[nid] = LOADER_CACHE[key]
                return results[nid]
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if key is not None:
            LOADER_CACHE[key] = out
        if isinstance(out, dict):
            ui[nid] = out.get("ui", {})
            out = out.get("result", ())
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), (node["class_type"], out)
        results[nid] = out
        return out

    for nid, node in prompt.items():
        if (nid in targets) if targets is not None else getattr(mappings[node["class_type"]], "OUTPUT_NODE", False):
            run(nid)
    return ui


def shrink(prompt: dict) -> dict:
    """64x64, 2 steps and cfg 1 (one DiT forward per step), so every workflow runs in about a
    second with the tiny checkpoints. Guidance itself is covered by test_nodes_sampler."""
    custom = importlib.import_module(f"{PACK}.nodes.latent_node").CUSTOM
    for node in prompt.values():
        inputs = node["inputs"]
        if "steps" in inputs:
            inputs["steps"], inputs["cfg"] = 2, 1.0
        if node["class_type"] == "NewBieEmptyLatent":
            inputs["resolution"] = custom
        if node["class_type"] in ("NewBieEmptyLatent", "EmptySD3LatentImage"):
            inputs["width"] = inputs["height"] = 64
        if node["class_type"] == "NewBieMemorySettings":
            inputs["vram_budget_gb"] = 0.0     # the CPU has no budget to respect; 8 GB would plan the same anyway
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes_through_the_nodes(path, mappings):
    SaveImage.saved.clear()
    PreviewImage.saved.clear()
    prompt = shrink(cw.ui_to_api(load(path), mappings))
    if COMFY_ONLY & {n["class_type"] for n in prompt.values()}:
        pytest.skip("core KSampler runs only inside ComfyUI: "
                    "tests/test_comfyui_tier/test_2_pack_workflows.py::test_workflow_executes runs it")
    ui = execute(prompt, mappings)
    assert SaveImage.saved, "nothing was saved"
    for _, images in SaveImage.saved + PreviewImage.saved:
        assert images.shape == (1, 64, 64, 3) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    reports = [u["text"][0] for nid, u in ui.items() if prompt[nid]["class_type"] == "NewBieMemoryReport"]
    for text in reports:
        assert "== plan: sample ==" in text and "== plan: decode ==" in text
    if path.stem == "newbie_with_core_nodes":
        assert len(PreviewImage.saved) == 1 and torch.equal(PreviewImage.saved[0][1], SaveImage.saved[0][1])


def test_rerunning_a_workflow_does_not_rerun_the_encoders(mappings):
    """A fresh run of the same graph (every node executes again, as after ComfyUI drops its
    output cache) is answered by the conditioning cache: the encoders do not run."""
    pipeline = importlib.import_module(f"{PACK}.newbie_core.pipeline")
    prompt = shrink(cw.ui_to_api(load(WORKFLOW_DIR / "newbie_two_characters_xml.json"), mappings))
    encode = [nid for nid, n in prompt.items() if n["class_type"] == "NewBieTextEncode"]
    execute(prompt, mappings, targets=encode)
    calls = dict(pipeline.ENCODER_CALLS)
    execute(prompt, mappings, targets=encode)
    assert pipeline.ENCODER_CALLS == calls
    prompt[next(n for n, v in prompt.items() if v["class_type"] == "NewBieXMLPromptBuilder")]["inputs"]["caption"] = "new"
    execute(prompt, mappings, targets=encode)
    assert pipeline.ENCODER_CALLS["gemma"] == calls["gemma"] + 1


# The frontend's fit-to-view (litegraph fitToBounds) zooms to 0.75 of the scale that fits the
# graph's bounding box; below about 0.6 node text stops being drawn. Title bars sit above pos.
FIT_VIEW_FACTOR = 0.75
TITLE_HEIGHT = 30
WINDOW = (1600, 1000)


def _boxes(wf: dict) -> list[tuple[int, float, float, float, float]]:
    return [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in wf["nodes"]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_fits_a_1600x1000_window_above_60_percent_zoom(path):
    boxes = _boxes(load(path))
    width = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    height = max(b[4] for b in boxes) - min(b[2] for b in boxes)
    zoom = FIT_VIEW_FACTOR * min(WINDOW[0] / width, WINDOW[1] / height)
    assert zoom > 0.6, f"{path.stem}: {width:.0f}x{height:.0f} px fits at {zoom:.0%} zoom"
    for i, a in enumerate(boxes):                       # and no node hides another
        for b in boxes[i + 1:]:
            overlap = min(a[3], b[3]) > max(a[1], b[1]) and min(a[4], b[4]) > max(a[2], b[2])
            assert not overlap, f"{path.stem}: nodes {a[0]} and {b[0]} overlap"
