"""Where tests find a ComfyUI snapshot, never committed: COMFYUI_PATH, or the benchmark's ignored
out/comfyui (see bench/gpu_visit.sh). Tests that need one skip without it."""

from __future__ import annotations

import os
from pathlib import Path

COMFY_SNAPSHOT = Path(os.environ.get("COMFYUI_PATH") or Path(__file__).resolve().parents[1] / "out" / "comfyui")
