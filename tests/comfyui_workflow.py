"""Test helpers for UI-format workflows, shared by the converter tests (CPU tier) and the ComfyUI tier.

* `ui_to_api`: converts a UI-format ("litegraph") workflow into the API prompt the browser
  would post, following the frontend's rules (comfyui-notes §3.1/§3.3). Pure Python.
* `CORE_NODE_STUBS`: stand-ins for the core nodes our workflows use, so the CPU tier can convert them.
* `shrink_for_tiny`, `write_input_images`, `expected_size`, `iter_workflows`: a bundled
  workflow's API prompt made ready for the tiny checkpoints, and what its outputs should be.

Nothing here imports ComfyUI; the converter tests run without it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

# ----------------------------------------------------------------------------------------------
# UI -> API conversion
# ----------------------------------------------------------------------------------------------

VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})       # frontend-only, never sent
UNSUPPORTED_NODES = frozenset({"Reroute", "PrimitiveNode"})  # need the frontend's own logic
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "audio_upload", "video_upload", "file_upload")
TYPE_DEFAULTS: dict[str, Any] = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}
MODE_MUTED, MODE_BYPASSED = 2, 4


class ConversionError(ValueError):
    """The workflow uses something this converter does not handle, or is inconsistent."""


@dataclass(frozen=True)
class WidgetSlot:
    """One widget input: how many `widgets_values` entries it uses and its fallback value."""
    name: str
    width: int
    default: Any


def widget_slots(class_def: Any) -> list[WidgetSlot]:
    """Widget inputs in `widgets_values` order (required, then optional)."""
    spec = class_def.INPUT_TYPES()
    slots = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            combo = isinstance(typ, (list, tuple)) or typ == "COMBO"
            if not (combo or typ in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            width = 1
            # control_after_generate (and, by legacy rule, any seed/noise_seed INT) stores a
            # second value: "fixed" | "increment" | "decrement" | "randomize".
            if (typ == "INT" or combo) and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                width += 1
            if combo and any(opts.get(k) for k in UPLOAD_OPTIONS):
                width += 1
            options = list(typ) if isinstance(typ, (list, tuple)) else list(opts.get("options", []))
            fallback = (options[0] if options else None) if combo else TYPE_DEFAULTS.get(typ)
            slots.append(WidgetSlot(name, width, opts.get("default", fallback)))
    return slots


def _links(workflow: Mapping) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type); accepts list and object link forms."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", "*"))
        else:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else "*")
    return out


def ui_to_api(workflow: Mapping, mappings: Mapping[str, Any], strict: bool = True) -> dict[str, dict]:
    """Convert a UI workflow to an API prompt `{id: {"class_type", "inputs"}}`.

    `mappings` is `NODE_CLASS_MAPPINGS`-like. With `strict`, more `widgets_values` than the
    node's widgets is an error (it means the workflow and INPUT_TYPES have drifted apart).
    """
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)

    def resolve(link_id: int, seen: tuple = ()) -> list | None:
        if link_id not in links:
            raise ConversionError(f"link {link_id} is referenced by a node but missing from 'links'")
        src_id, slot, typ = links[link_id]
        src = nodes[src_id]
        mode = src.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:  # pass through the first input of the same type
            ins = src.get("inputs", [])
            for i in [slot] + list(range(len(ins))):
                if i < len(ins) and ins[i].get("link") is not None and ins[i]["type"] == typ and src_id not in seen:
                    return resolve(ins[i]["link"], seen + (src_id,))
            return None
        if src["type"] in VIRTUAL_NODES or src["type"] in UNSUPPORTED_NODES:
            raise ConversionError(f"node {src_id} ({src['type']}) feeds a link: not supported")
        return [str(src_id), int(slot)]

    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind, mode = node["type"], node.get("mode", 0)
        if kind in VIRTUAL_NODES or mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        if kind in UNSUPPORTED_NODES:
            raise ConversionError(f"node {node['id']}: {kind} is not supported by this converter")
        if kind not in mappings:
            raise ConversionError(f"node {node['id']}: unknown node type {kind!r}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": _node_inputs(node, mappings[kind], resolve, strict)}
    return prompt


def _node_inputs(node: Mapping, class_def: Any, resolve, strict: bool) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        raise ConversionError(f"node {node['id']}: dict widgets_values (frontend extension) not supported")
    inputs: dict[str, Any] = {}
    i = 0
    for slot in widget_slots(class_def):
        value = values[i] if i < len(values) else slot.default
        inputs[slot.name] = {"__value__": value} if isinstance(value, list) else value
        i += slot.width
    if strict and len(values) > i:
        raise ConversionError(
            f"node {node['id']} ({node['type']}): {len(values)} widgets_values but its INPUT_TYPES "
            f"has room for {i}; re-save the workflow or fix INPUT_TYPES")
    for inp in node.get("inputs", []):
        if inp.get("link") is None:
            continue
        src = resolve(inp["link"])
        if src is None:
            inputs.pop(inp["name"], None)
        else:
            inputs[inp["name"]] = src
    return inputs


# ----------------------------------------------------------------------------------------------
# Stand-ins for the core nodes our workflows use, so the CPU tier can convert them
# ----------------------------------------------------------------------------------------------

def _stub(name: str, spec: dict, returns: tuple = ()) -> type:
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: copy.deepcopy(spec)), "RETURN_TYPES": returns})


CORE_NODE_STUBS: dict[str, type] = {
    "EmptySD3LatentImage": _stub("EmptySD3LatentImage", {"required": {
        "width": ("INT", {"default": 1024}), "height": ("INT", {"default": 1024}),
        "batch_size": ("INT", {"default": 1})}}),
    "EmptyLatentImage": _stub("EmptyLatentImage", {"required": {
        "width": ("INT", {"default": 512}), "height": ("INT", {"default": 512}),
        "batch_size": ("INT", {"default": 1})}}),
    "VAELoader": _stub("VAELoader", {"required": {"vae_name": (["ae.safetensors"],)}}),
    "VAEDecode": _stub("VAEDecode", {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}),
    "VAEDecodeTiled": _stub("VAEDecodeTiled", {"required": {
        "samples": ("LATENT",), "vae": ("VAE",), "tile_size": ("INT", {"default": 512}),
        "overlap": ("INT", {"default": 64}), "temporal_size": ("INT", {"default": 64}),
        "temporal_overlap": ("INT", {"default": 8})}}),
    "SaveImage": _stub("SaveImage", {"required": {
        "images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}),
    "PreviewImage": _stub("PreviewImage", {"required": {"images": ("IMAGE",)}}),
    "LoadImage": _stub("LoadImage", {"required": {"image": (["example.png"], {"image_upload": True})}}),
    "ModelSamplingAuraFlow": _stub("ModelSamplingAuraFlow", {"required": {
        "model": ("MODEL",), "shift": ("FLOAT", {"default": 1.73, "min": 0.0, "max": 100.0})}}, ("MODEL",)),
    "KSampler": _stub("KSampler", {"required": {
        "model": ("MODEL",), "seed": ("INT", {"default": 0, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}), "cfg": ("FLOAT", {"default": 8.0}),
        "sampler_name": (["euler", "res_multistep", "dpmpp_2m"],), "scheduler": (["simple", "beta", "karras"],),
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}, ("LATENT",)),
}


# ----------------------------------------------------------------------------------------------
# A bundled workflow's prompt, made ready for the tiny checkpoints
# ----------------------------------------------------------------------------------------------

def iter_workflows(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.json")) if folder.is_dir() else iter(())


def shrink_for_tiny(prompt: dict, mappings: Mapping[str, Any], side: int = 64, steps: int = 2) -> dict:
    """Copy of `prompt` sized for tiny CPU runs: longest width/height side -> `side`, steps capped.

    A `resolution` preset combo is switched to its custom entry so width/height apply.
    """
    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("resolution"), str):
            spec = mappings[node["class_type"]].INPUT_TYPES()["required"].get("resolution", ([],))[0]
            custom = [o for o in spec if isinstance(o, str) and "custom" in o.lower()] if isinstance(spec, list) else []
            if custom:
                inputs["resolution"] = custom[0]
        w, h = inputs.get("width"), inputs.get("height")
        if isinstance(w, int) and isinstance(h, int) and max(w, h) > side:
            scale = side / max(w, h)
            inputs["width"], inputs["height"] = (max(16, round(v * scale / 16) * 16) for v in (w, h))
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], steps)
    return out


def write_input_images(prompt: dict, input_dir: os.PathLike | str, size: tuple[int, int] = (64, 48)) -> None:
    """Create the files LoadImage nodes reference (a small gradient) in `input_dir`."""
    import numpy as np
    from PIL import Image
    input_dir = Path(input_dir)
    for node in prompt.values():
        name = node["inputs"].get("image") if node["class_type"] == "LoadImage" else None
        if isinstance(name, str):
            ramp = np.linspace(0, 255, size[0] * size[1] * 3, dtype=np.float32).reshape(size[1], size[0], 3)
            (input_dir / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ramp.astype(np.uint8)).save(input_dir / name)


def expected_size(prompt: dict, node_id: str) -> tuple[int, int] | None:
    """(width, height) of the first ancestor of `node_id` with literal int width/height inputs."""
    todo, seen = [node_id], set()
    while todo:
        nid = todo.pop(0)
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        inputs = prompt[nid]["inputs"]
        if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int) and nid != node_id:
            return inputs["width"], inputs["height"]
        todo += [v[0] for v in inputs.values() if isinstance(v, list) and len(v) == 2]
    return None
