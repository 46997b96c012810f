"""CPU tier: the UI -> API workflow converter in tests/comfyui_workflow.py (no ComfyUI needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import comfyui_workflow as cw  # tests/ is on pytest's pythonpath (pyproject)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = list(cw.iter_workflows(REPO_ROOT / "workflows"))


def node_class(required: dict, optional: dict | None = None) -> type:
    spec = {"required": required, "optional": optional or {}}
    return type("Fake", (), {"INPUT_TYPES": classmethod(lambda cls: spec)})


MAPPINGS = {
    "Loader": node_class({"ckpt": (["a.safetensors", "b.safetensors"],)}),
    "Encode": node_class({"model": ("MODEL",), "text": ("STRING", {"multiline": True, "default": "hi"})}),
    "Sampler": node_class({
        "model": ("MODEL",), "positive": ("CONDITIONING",), "latent": ("LATENT",),
        "seed": ("INT", {"default": 0, "control_after_generate": True}),
        "steps": ("INT", {"default": 28}), "cfg": ("FLOAT", {"default": 4.5}),
        "sampler": (["euler", "dpmpp_2m"],)}),
    "Upscale": node_class({"samples": ("LATENT",), "factor": ("FLOAT", {"default": 2.0})}),
    "Decode": node_class({"samples": ("LATENT",)}, {"tile": ("BOOLEAN", {"default": True})}),
    "Save": node_class({"images": ("IMAGE",), "prefix": ("STRING", {"default": "ComfyUI"})}),
    "Empty": node_class({"width": ("INT", {"default": 1024}), "height": ("INT", {"default": 1024})}),
}


def ui_node(nid, typ, inputs=(), widgets=None, mode=0, outputs=()):
    node = {"id": nid, "type": typ, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": nid, "mode": mode,
            "properties": {}, "inputs": [{"name": n, "type": t, "link": l} for n, t, l in inputs],
            "outputs": [{"name": t, "type": t, "links": ls} for t, ls in outputs]}
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def text_to_image(upscale_mode=0) -> dict:
    """Loader -> Encode -> Sampler(<- Empty) -> Upscale -> Decode -> Save, plus a Note."""
    nodes = [
        ui_node(1, "Loader", widgets=["b.safetensors"], outputs=[("MODEL", [1, 2])]),
        ui_node(2, "Encode", [("model", "MODEL", 1)], ["1girl"], outputs=[("CONDITIONING", [3])]),
        ui_node(3, "Empty", widgets=[832, 1216], outputs=[("LATENT", [4])]),
        ui_node(4, "Sampler", [("model", "MODEL", 2), ("positive", "CONDITIONING", 3), ("latent", "LATENT", 4)],
                [123456789, "randomize", 20, 5.0, "dpmpp_2m"], outputs=[("LATENT", [5])]),
        ui_node(5, "Upscale", [("samples", "LATENT", 5)], [1.5], mode=upscale_mode, outputs=[("LATENT", [6])]),
        ui_node(6, "Decode", [("samples", "LATENT", 6)], [False], outputs=[("IMAGE", [7])]),
        ui_node(7, "Save", [("images", "IMAGE", 7)], ["newbie"]),
        ui_node(8, "Note", widgets=["Read me first"]),
        ui_node(9, "MarkdownNote", widgets=["# also ignored"]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 4, 0, "MODEL"], [3, 2, 0, 4, 1, "CONDITIONING"],
             [4, 3, 0, 4, 2, "LATENT"], [5, 4, 0, 5, 0, "LATENT"], [6, 5, 0, 6, 0, "LATENT"],
             [7, 6, 0, 7, 0, "IMAGE"]]
    return {"last_node_id": 9, "last_link_id": 7, "nodes": nodes, "links": links, "version": 0.4}


def test_plain_graph_maps_widgets_by_name_and_drops_notes():
    api = cw.ui_to_api(text_to_image(), MAPPINGS)
    assert set(api) == {"1", "2", "3", "4", "5", "6", "7"}
    assert api["4"] == {"class_type": "Sampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "latent": ["3", 0],
        "seed": 123456789, "steps": 20, "cfg": 5.0, "sampler": "dpmpp_2m"}}
    assert api["2"]["inputs"] == {"model": ["1", 0], "text": "1girl"}
    assert api["6"]["inputs"] == {"samples": ["5", 0], "tile": False}


def test_bypassed_node_is_skipped_and_rewired():
    api = cw.ui_to_api(text_to_image(upscale_mode=cw.MODE_BYPASSED), MAPPINGS)
    assert "5" not in api
    assert api["6"]["inputs"]["samples"] == ["4", 0]


def test_muted_node_is_dropped_with_its_link():
    api = cw.ui_to_api(text_to_image(upscale_mode=cw.MODE_MUTED), MAPPINGS)
    assert "5" not in api and "samples" not in api["6"]["inputs"]


def test_bypass_without_matching_input_drops_the_link():
    wf = text_to_image(upscale_mode=cw.MODE_BYPASSED)
    wf["nodes"][4]["inputs"][0]["type"] = "IMAGE"  # nothing of type LATENT to pass through
    assert "samples" not in cw.ui_to_api(wf, MAPPINGS)["6"]["inputs"]


def test_control_after_generate_variants_take_two_values():
    mappings = {
        "N": node_class({"noise_seed": ("INT", {"default": 1}),                           # legacy name rule
                         "count": ("INT", {"default": 1, "control_after_generate": True}),
                         "pick": (["x", "y"], {"control_after_generate": True}),
                         "plain": ("INT", {"default": 7})})}
    wf = {"nodes": [ui_node(1, "N", widgets=[5, "fixed", 9, "increment", "y", "randomize", 3])], "links": []}
    assert cw.ui_to_api(wf, mappings)["1"]["inputs"] == {"noise_seed": 5, "count": 9, "pick": "y", "plain": 3}


def test_missing_values_take_defaults_and_socket_only_inputs_use_no_value():
    mappings = {"N": node_class({"image": ("IMAGE",), "a": ("INT", {"forceInput": True}),
                                 "up": (["p.png", "q.png"], {"image_upload": True}),
                                 "s": ("STRING", {"default": "d"}), "f": ("FLOAT", {}), "c": (["k", "l"],)})}
    wf = {"nodes": [ui_node(1, "N", widgets=["q.png", "image"])], "links": []}
    assert cw.ui_to_api(wf, mappings)["1"]["inputs"] == {"up": "q.png", "s": "d", "f": 0.0, "c": "k"}


def test_link_objects_and_list_literals():
    wf = text_to_image()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), l))
                   for l in wf["links"]]
    wf["nodes"][1]["widgets_values"] = [["a", "b"]]
    api = cw.ui_to_api(wf, MAPPINGS)
    assert api["4"]["inputs"]["positive"] == ["2", 0]
    assert api["2"]["inputs"]["text"] == {"__value__": ["a", "b"]}


@pytest.mark.parametrize("change, message", [
    (lambda wf: wf["nodes"].append(ui_node(10, "Reroute")), "Reroute"),
    (lambda wf: wf["nodes"].append(ui_node(10, "PrimitiveNode")), "PrimitiveNode"),
    (lambda wf: wf["nodes"].append(ui_node(10, "Unknown")), "unknown node type"),
    (lambda wf: wf.update(definitions={"subgraphs": [{"id": "x"}]}), "subgraphs"),
    (lambda wf: wf["nodes"][0].update(widgets_values={"ckpt": "a"}), "dict widgets_values"),
    (lambda wf: wf["nodes"][0]["widgets_values"].append("extra"), "INPUT_TYPES has room for 1"),
    (lambda wf: wf["links"].pop(), "link 7"),
])
def test_unsupported_or_inconsistent_workflows_fail_loudly(change, message):
    wf = text_to_image()
    change(wf)
    with pytest.raises(cw.ConversionError, match=message):
        cw.ui_to_api(wf, MAPPINGS)


def test_non_strict_ignores_surplus_values():
    wf = text_to_image()
    wf["nodes"][0]["widgets_values"].append("extra")
    assert cw.ui_to_api(wf, MAPPINGS, strict=False)["1"]["inputs"] == {"ckpt": "b.safetensors"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, cw.MODE_BYPASSED]), min_size=1, max_size=6))
def test_chains_of_bypassed_nodes_resolve_to_the_nearest_live_ancestor(modes):
    """Empty -> Upscale x N (some bypassed) -> Decode: Decode reads the last live node."""
    nodes = [ui_node(1, "Empty", widgets=[64, 64])]
    links = []
    for i, mode in enumerate(modes, start=2):
        links.append([i - 1, i - 1, 0, i, 0, "LATENT"])
        nodes.append(ui_node(i, "Upscale", [("samples", "LATENT", i - 1)], [2.0], mode=mode))
    last = len(modes) + 1
    links.append([last, last, 0, last + 1, 0, "LATENT"])
    nodes.append(ui_node(last + 1, "Decode", [("samples", "LATENT", last)], [True]))
    api = cw.ui_to_api({"nodes": nodes, "links": links}, MAPPINGS)
    live = [1] + [i for i, m in enumerate(modes, start=2) if m == 0]
    assert set(api) == {str(i) for i in live} | {str(last + 1)}
    assert api[str(last + 1)]["inputs"]["samples"] == [str(live[-1]), 0]


def _pack_mappings() -> dict:
    conftest = Path(__file__).with_name("conftest.py")
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(conftest))
    return dict(module.load_pack().NODE_CLASS_MAPPINGS)


@pytest.mark.skipif(not WORKFLOWS, reason="workflows/ has no *.json yet")
@pytest.mark.parametrize("wf_path", WORKFLOWS, ids=lambda p: p.stem)
def test_bundled_workflow_converts_against_the_pack(wf_path):
    """widgets_values agree with the pack's INPUT_TYPES; every link lands on a real input."""
    mappings = {**cw.CORE_NODE_STUBS, **_pack_mappings()}
    workflow = json.loads(wf_path.read_text())
    assert workflow.get("version") == 0.4 and workflow["nodes"] and workflow["links"]
    api = cw.ui_to_api(workflow, mappings)
    assert any(n["class_type"] in _pack_mappings() for n in api.values())
    for nid, node in api.items():
        spec = mappings[node["class_type"]].INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(node["inputs"]) <= set(declared), (nid, set(node["inputs"]) - set(declared))
        missing = set(spec.get("required", {})) - set(node["inputs"])
        assert not missing, f"node {nid} ({node['class_type']}) lacks required inputs {missing}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in api, f"node {nid} links to {value[0]}, which is not in the prompt"
