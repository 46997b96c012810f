"""Test helpers for the ComfyUI tier: a ComfyUI checkout run in-process.

* `init_comfy`, `load_pack`, `run_prompt`: run a ComfyUI checkout in-process
  (`execution.PromptExecutor` with a stub server, comfyui-notes §5.3).
* `saved_images`: the image files a run's outputs name.

Nothing here imports ComfyUI at module level; `init_comfy` does, when a test asks for it.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def saved_images(env: SimpleNamespace, outputs: dict) -> list[Path]:
    """Files listed as saved images in a history `outputs` dict."""
    files = []
    for node_out in outputs.values():
        for img in node_out.get("images", []):
            base = env.folder_paths.get_directory_by_type(img.get("type", "output"))
            files.append(Path(base) / img.get("subfolder", "") / img["filename"])
    return files
