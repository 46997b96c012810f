"""Test helpers shared by the converter tests (CPU tier) and the ComfyUI tier.

* `ui_to_api`: converts a UI-format ("litegraph") workflow into the API prompt the browser
  would post, following the frontend's rules (comfyui-notes §3.1/§3.3). Pure Python.
* `init_comfy`, `load_pack`, `run_prompt`: run a ComfyUI checkout in-process
  (`execution.PromptExecutor` with a stub server, comfyui-notes §5.3).
* `ComfyServer`, `post_prompt`, `wait_history`: start `main.py` headless and talk HTTP.
* `frontend_check`: load a workflow into the real frontend in headless Chromium, list
  unregistered node types and save a screenshot.

Nothing here imports ComfyUI at module level; the converter tests run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
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
# In-process ComfyUI
# ----------------------------------------------------------------------------------------------

def init_comfy(comfy_root: os.PathLike | str, out_dir: os.PathLike | str, cpu: bool | None = None) -> SimpleNamespace:
    """Import ComfyUI from `comfy_root` into this process, once; built-in nodes loaded.

    Returns a namespace with the modules tests need. Outputs and temp files go to `out_dir`.
    """
    root = str(Path(comfy_root).resolve())
    stale = sys.modules.get("nodes")
    if stale is not None and not str(getattr(stale, "__file__", "")).startswith(root):
        # Our repo's `nodes/` package is importable as `nodes` via pythonpath=["."]; ComfyUI's
        # nodes.py must win, so drop our copy from the module cache.
        for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
            del sys.modules[name]
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        import torch
        args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        args.disable_all_custom_nodes = True
    import utils.extra_config  # noqa: F401  (must precede `nodes`: comfyui-notes §5.4)
    import folder_paths
    import nodes
    import execution
    import comfy.model_management as mm
    import comfy.utils
    folder_paths.set_output_directory(str(out_dir))
    folder_paths.set_temp_directory(str(out_dir))
    (Path(out_dir) / "input").mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(Path(out_dir) / "input"))
    if not getattr(nodes, "_newbie_tests_initialised", False):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        nodes._newbie_tests_initialised = True
    return SimpleNamespace(root=root, nodes=nodes, execution=execution, folder_paths=folder_paths,
                           mm=mm, comfy_utils=comfy.utils, out_dir=Path(out_dir))


def load_pack(env: SimpleNamespace, pack_dir: os.PathLike | str) -> tuple[bool, Any, str]:
    """`nodes.load_custom_node(pack_dir)`; returns (ok, package module, captured log text)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        ok = asyncio.run(env.nodes.load_custom_node(str(pack_dir)))
    finally:
        logging.getLogger().removeHandler(handler)
    module = sys.modules.get(str(pack_dir).replace(".", "_x_"))
    return bool(ok), module, stream.getvalue()


class StubServer:
    """The parts of `server.PromptServer` that the executor and progress reporting touch."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self) -> None:
        self.sockets_metadata: dict = {}
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    messages: list[tuple[str, dict]]
    outputs: dict
    cached: set[str] = field(default_factory=set)

    def message(self, event: str) -> dict | None:
        return next((d for e, d in self.messages if e == event), None)


def run_prompt(env: SimpleNamespace, executor: Any, prompt: dict, extra_data: dict | None = None) -> RunResult:
    """Validate, then execute a deep copy of `prompt` (the executor writes into its input)."""
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(env.execution.validate_prompt(pid, prompt, None))
    if not ok:
        raise AssertionError(f"prompt failed validation: {err} {json.dumps(node_errors, default=str)[:2000]}")
    executor.execute(copy.deepcopy(prompt), pid, extra_data or {}, outputs)
    cached = (next((d for e, d in executor.status_messages if e == "execution_cached"), {}) or {}).get("nodes", [])
    return RunResult(pid, bool(executor.success), list(executor.status_messages),
                     executor.history_result.get("outputs", {}), set(map(str, cached)))


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


def saved_images(env: SimpleNamespace, outputs: dict) -> list[Path]:
    """Files listed as saved images in a history `outputs` dict."""
    files = []
    for node_out in outputs.values():
        for img in node_out.get("images", []):
            base = env.folder_paths.get_directory_by_type(img.get("type", "output"))
            files.append(Path(base) / img.get("subfolder", "") / img["filename"])
    return files


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


# ----------------------------------------------------------------------------------------------
# HTTP: main.py as a child process
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`main.py --cpu` on a free loopback port; stopped by the PID this object started."""

    def __init__(self, comfy_root: os.PathLike | str, base_dir: os.PathLike | str, yaml_path: os.PathLike | str,
                 python: str = sys.executable, extra_args: tuple[str, ...] = ()):
        self.comfy_root, self.base_dir, self.yaml_path = Path(comfy_root), Path(base_dir), Path(yaml_path)
        self.python, self.extra_args = python, extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)  # main.py lists it unguarded
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--base-directory", str(self.base_dir), "--extra-model-paths-config", str(self.yaml_path),
               *self.extra_args]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                http_json(self.url + "/system_stats", timeout=2)
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within 180 s:\n{self.log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_json(url: str, payload: Any = None, timeout: float = 30) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def post_prompt(url: str, prompt: dict, workflow: dict | None = None) -> str:
    body = {"prompt": prompt, "client_id": "newbie-tests",
            "extra_data": {"extra_pnginfo": {"workflow": workflow}} if workflow else {}}
    return http_json(url + "/prompt", body)["prompt_id"]


def wait_history(url: str, prompt_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = http_json(f"{url}/history/{prompt_id}")
        if prompt_id in (hist or {}) and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s")


def write_server_config(path: Path, custom_nodes_dir: Path, model_dirs: Mapping[str, Path]) -> Path:
    """extra-model-paths YAML: one custom_nodes dir plus one dir per model folder."""
    lines = ["newbie_tests:", f"    custom_nodes: {custom_nodes_dir}"]
    lines += [f"    {name}: {folder}" for name, folder in model_dirs.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Headless Chromium against the real frontend
# ----------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]

_CHECK_JS = """async (wf) => {
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
  const registered = LG ? LG.registered_node_types : {};
  const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
  const missing = nodes.filter(n => !(n.type in registered) || n.has_errors).map(n => n.type);
  const prompt = (await window.app.graphToPrompt()).output;
  return {count: nodes.length, missing, prompt, have_registry: !!LG};
}"""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def frontend_check(url: str, workflow: dict, png_path: os.PathLike | str) -> dict:
    """Load `workflow` in the UI; return node count, unregistered types and the API prompt."""
    with frontend_page(url) as page:
        result = page.evaluate(_CHECK_JS, workflow)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(png_path))
    return result


@contextlib.contextmanager
def frontend_page(url: str) -> Iterator[Any]:
    """The ComfyUI frontend loaded in headless Chromium (1600x1000), its graph ready."""
    import tempfile
    from playwright.sync_api import sync_playwright
    # Skip the first-run template gallery, which would cover the graph in the screenshot.
    http_json(url + "/settings/Comfy.TutorialCompleted", True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium_path(), args=CHROMIUM_FLAGS,
                                                    headless=True, viewport={"width": 1600, "height": 1000})
        try:
            page = ctx.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph && window.app.graph.nodes !== undefined",
                                   timeout=120_000)
            page.keyboard.press("Escape")
            yield page
        finally:
            ctx.close()


def iter_workflows(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.json")) if folder.is_dir() else iter(())


_RUN_JS = """async (prompt) => {
  await window.app.loadApiJson(prompt, "tier.json");
  await new Promise(r => setTimeout(r, 300));
  await window.app.queuePrompt(0, 1);
  return true;
}"""

_WIDGET_JS = """([type, name]) => {
  const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
  const node = nodes.find(n => n.type === type);
  const w = node?.widgets?.find(w => w.name === name);
  return w ? String(w.value ?? "") : null;
}"""


def frontend_run_and_read(url: str, prompt: dict, node_type: str, widget: str, png_path: os.PathLike | str,
                          timeout_ms: int = 240_000) -> str:
    """Queue an API prompt from the real UI, wait until `node_type` shows a non-empty `widget`
    (a frontend extension fills it from the node's ui output), screenshot, return the text."""
    with frontend_page(url) as page:
        page.evaluate(_RUN_JS, prompt)
        page.wait_for_function(f"(() => {{ const f = {_WIDGET_JS}; const v = f({json.dumps([node_type, widget])});"
                               f" return v && v.length > 0; }})()", timeout=timeout_ms)
        text = page.evaluate(_WIDGET_JS, [node_type, widget])
        page.evaluate("""(type) => {
          const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
          const node = nodes.find(n => n.type === type);
          window.app.canvas.centerOnNode?.(node); window.app.canvas.setDirty(true, true);
        }""", node_type)
        page.wait_for_timeout(500)
        page.screenshot(path=str(png_path))
    return text
