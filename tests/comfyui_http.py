"""Test helpers for the ComfyUI tier: ComfyUI's HTTP server and its frontend.

* `ComfyServer`, `post_prompt`, `wait_history`: start `main.py` headless and talk HTTP.
* `frontend_check`: load a workflow into the real frontend in headless Chromium, list
  unregistered node types and save a screenshot; `frontend_run_and_read`: queue a prompt from
  the UI and read a node's widget (playwright, imported only when used).

Nothing here imports ComfyUI; the server is a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

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
