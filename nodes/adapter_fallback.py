"""What the nodes use when ComfyUI is not running: plain folders, no-op memory calls, recorded progress.

Split from ``comfy_adapter`` (which picks this or the real ComfyUI implementation) so that file holds
only the ComfyUI side. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf")


class ProcessingInterrupted(Exception):
    """Raised by the fallback adapter's `check_interrupted` after `request_interrupt`.

    Inside ComfyUI the real `comfy.model_management.InterruptProcessingException` is raised
    instead, so that the executor reports `execution_interrupted`.
    """


class Progress(Protocol):
    """What `progress_bar` returns: ComfyUI's `ProgressBar` or a stand-in."""

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None: ...


class Handle(Protocol):
    """A registered, unloadable stand-in for weights the pack keeps on a device."""

    name: str

    @property
    def resident(self) -> bool: ...


# --------------------------------------------------------------------------------------------
# Fallback (no ComfyUI)
# --------------------------------------------------------------------------------------------


@dataclass
class FallbackHandle:
    """Handle kept by `FallbackAdapter`; `release()` plays ComfyUI's eviction."""

    name: str
    size_bytes: int
    unload_fn: Callable[[], None]
    device: torch.device
    registered: bool = True
    unload_calls: int = 0

    @property
    def resident(self) -> bool:
        return self.registered

    def release(self) -> None:
        """Evict as ComfyUI would: unregister, then call the pack's unload function once."""
        if not self.registered:
            return
        self.registered = False
        self.unload_calls += 1
        self.unload_fn()


@dataclass
class RecordingProgress:
    """Progress bar stand-in that remembers every update (tests read `updates`)."""

    total: int
    node_id: str | None = None
    updates: list[tuple[int, int, Any]] = field(default_factory=list)

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.updates.append((min(value, self.total), self.total, preview))


class FallbackAdapter:
    """ComfyUI-free implementation: explicit model folders, no-op memory management."""

    def __init__(self, folders: dict[str, Sequence[os.PathLike | str]] | None = None):
        self.folders: dict[str, list[Path]] = {k: [Path(p) for p in v] for k, v in (folders or {}).items()}
        self.handles: list[FallbackHandle] = []
        self.progress_bars: list[RecordingProgress] = []
        self.freed: list[tuple[int, torch.device]] = []
        self._interrupt = False

    # models ---------------------------------------------------------------------------------
    def add_folder(self, folder_name: str, path: os.PathLike | str) -> None:
        self.folders.setdefault(folder_name, []).append(Path(path))

    def models_dir_list(self, folder_name: str) -> list[str]:
        names: set[str] = set()
        for root in self.folders.get(folder_name, []):
            if not root.is_dir():
                continue
            for path in root.rglob("*"):
                if path.is_file() and path.suffix.lower() in MODEL_EXTENSIONS:
                    names.add(path.relative_to(root).as_posix())
        return sorted(names)

    def full_path(self, folder_name: str, filename: str) -> str:
        roots = self.folders.get(folder_name, [])
        for root in roots:
            candidate = root / filename
            if candidate.is_file():
                return str(candidate)
        raise not_found(folder_name, filename, [str(r) for r in roots])

    # devices and memory ---------------------------------------------------------------------
    def compute_device(self) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")

    def free_vram(self, bytes_needed: int, device: torch.device, keep: Sequence[Handle] = ()) -> int:
        self.freed.append((int(bytes_needed), torch.device(device)))
        return 0

    def soft_empty_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def register_unloadable(self, name: str, size_bytes: int, unload_fn: Callable[[], None],
                            device: torch.device | None = None) -> FallbackHandle:
        handle = FallbackHandle(name, int(size_bytes), unload_fn, torch.device(device or self.compute_device()))
        self.handles.append(handle)
        return handle

    def unregister(self, handle: Handle) -> None:
        if isinstance(handle, FallbackHandle):
            handle.registered = False
        self.handles = [h for h in self.handles if h is not handle]

    def is_registered(self, handle: Handle) -> bool:
        return any(h is handle for h in self.handles) and bool(getattr(handle, "registered", False))

    def unload_all(self) -> None:
        """What ComfyUI's 'Unload models' does: evict every registered handle."""
        for handle in list(self.handles):
            handle.release()
        self.handles.clear()

    # progress and cancel --------------------------------------------------------------------
    def progress_bar(self, total: int, node_id: str | None = None) -> RecordingProgress:
        bar = RecordingProgress(int(total), node_id)
        self.progress_bars.append(bar)
        return bar

    def request_interrupt(self) -> None:
        """Simulate the Cancel button: the next `check_interrupted` raises once."""
        self._interrupt = True

    def check_interrupted(self) -> None:
        if self._interrupt:
            self._interrupt = False
            raise ProcessingInterrupted("processing interrupted")

    def preview_image_from_latent(self, latent: torch.Tensor) -> Any:
        return None


def not_found(folder_name: str, filename: str, dirs: list[str]) -> FileNotFoundError:
    where = ", ".join(dirs) if dirs else "(no folder registered under that name)"
    return FileNotFoundError(
        f"Model file {filename!r} was not found in the {folder_name!r} model folder(s): {where}. "
        f"Put the file into models/{folder_name}/ (or a path mapped in extra_model_paths.yaml) "
        "and press Refresh.")
