"""The Memory Settings node, and how every other node turns its inputs into one policy.

One ``MemorySettings`` object (kijai-style typed settings) is optional on every GPU node. A
node's own override widgets win where set (a non-zero budget, a chunk choice other than
"from settings"). ``vram_for_stage`` is the ComfyUI etiquette around one stage: ask ComfyUI to
free what the plan needs, and register a weightless handle for the weights we place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from ..newbie_core.pipeline import MemorySettings, stage_budget
from ..newbie_core.placement import HOST_CACHE, StagePlan, fmt_bytes, free_device_memory
from . import comfy_adapter as adapter
from ..newbie_core.validate import check_budget, check_fp8_compute, check_vae_tile
from .types import CATEGORY, NEWBIE_MEMORY
from .validation import queue_check

log = logging.getLogger(__name__)

FROM_SETTINGS = "from settings"
ATTENTION_CHOICES = ["auto", "off", "4096", "2048", "1024", "512", "256"]
FFN_CHOICES = ["auto", "off", "8192", "4096", "2048", "1024", "512"]
SWITCHES = {"auto": None, "on": True, "off": False}
SWITCH_CHOICES = list(SWITCHES)


def parse_chunk(choice: str, what: str) -> int:
    """'auto' -> 0 (planner picks), 'off' -> -1, a number -> that chunk (MemorySettings convention)."""
    if choice == "auto":
        return 0
    if choice == "off":
        return -1
    try:
        value = int(choice)
    except ValueError:
        raise ValueError(f"{what} must be 'auto', 'off' or a positive number, got {choice!r}.") from None
    if value <= 0:
        raise ValueError(f"{what} must be 'auto', 'off' or a positive number, got {choice!r}.")
    return value


def resolve_memory(memory: MemorySettings | None, vram_budget_gb: float = 0.0,
                   attention_slicing: str = FROM_SETTINGS, ffn_chunking: str = FROM_SETTINGS,
                   vae_tile: int = 0, vae_overlap: int = 0) -> MemorySettings:
    """The connected settings (or defaults) with this node's non-default widgets applied."""
    if memory is not None and not isinstance(memory, MemorySettings):
        raise ValueError(f"the memory input must come from a NewBie Memory Settings node, got {type(memory).__name__}.")
    settings = memory or MemorySettings()
    if vram_budget_gb < 0:
        raise ValueError(f"vram_budget_gb must be 0 (use the memory settings / auto) or positive, "
                         f"got {vram_budget_gb}.")
    if vram_budget_gb > 0:
        settings = settings.with_budget(float(vram_budget_gb))
    if attention_slicing != FROM_SETTINGS:
        settings = replace(settings, attention_chunk=parse_chunk(attention_slicing, "attention_slicing"))
    if ffn_chunking != FROM_SETTINGS:
        settings = replace(settings, ffn_chunk=parse_chunk(ffn_chunking, "ffn_chunking"))
    if vae_tile:
        settings = replace(settings, vae_tile_px=int(vae_tile))
    if vae_overlap:
        settings = replace(settings, vae_overlap_px=int(vae_overlap))
    return settings


def plan_weight_bytes(plan: StagePlan) -> int:
    """Bytes a plan keeps for weights (resident blocks, small modules, ring): its peak minus activations."""
    return sum(b for label, b in plan.breakdown if not label.startswith("activations"))


def budget_note(stage: str, device: torch.device, budget: int | None) -> str:
    return f"{stage}: device {device}, VRAM budget " + ("none (everything resident)" if budget is None
                                                        else fmt_bytes(budget))


@contextmanager
def vram_for_stage(name: str, device: torch.device, memory: MemorySettings, ideal_peak: Callable[[], int],
                   weight_bytes: Callable[[int | None], int], keep: Sequence = (),
                   host_files: Sequence = ()) -> Iterator[int | None]:
    """Yield the stage's VRAM budget, with ComfyUI told about the memory the stage will use.

    On a GPU: ask ComfyUI to evict its models until the stage's need is free (the explicit budget,
    or with an auto budget the all-resident peak), measure the budget, then register a weightless
    handle sized to the weights the plan places (so ComfyUI's accounting sees them). The stage
    frees its own weights when it ends (stage_guard on failure), so the handle is dropped after.
    On the CPU there is no VRAM to share: nothing is asked or registered. ``keep``: ComfyUI
    models that must stay loaded while freeing (the pack's own MODEL during a core sampler run).
    ``host_files``: the stage's model files; their host copies stay unloadable by ComfyUI after
    the stage (:func:`keep_host_copies_unloadable`), and an unload during the stage frees them
    when it ends (the stage is still streaming from them until then).
    """
    if device.type == "cpu":
        yield stage_budget(memory, device)
        return
    need = memory.vram_budget_bytes if memory.vram_budget_bytes is not None else ideal_peak()
    adapter.free_vram(need, device, keep)
    budget = stage_budget(memory, device)

    unloaded = []

    def evicted() -> None:
        log.info("ComfyUI asked %s to unload; its weights are released when the stage ends", name)
        unloaded.append(True)
        free_device_memory(device)

    handle = adapter.register_unloadable(name, weight_bytes(budget), evicted, device)
    try:
        yield budget
    finally:
        adapter.unregister(handle)
        if unloaded:
            release_host_copies(name, host_files)
        elif host_files:
            keep_host_copies_unloadable(name, host_files, device)


# One unloadable handle per model's host copies (by file set), so ComfyUI's "Unload models" and
# its memory pressure free the pack's pinned host RAM too.
_HOST_HANDLES: dict[tuple[str, ...], object] = {}


def release_host_copies(name: str, files: Sequence) -> int:
    """Free the host copies (pinned buffers included) read from ``files``; returns bytes freed."""
    freed = HOST_CACHE.drop_files(files)
    if freed:
        log.info("%s: freed %s of host copies", name, fmt_bytes(freed))
    return freed


def keep_host_copies_unloadable(name: str, files: Sequence, device: torch.device):
    """Register a weightless handle whose unload (ComfyUI evicting it) frees the host copies of
    ``files``; an older handle for the same files is replaced. Returns the handle."""
    key = tuple(sorted(str(f) for f in files))
    old = _HOST_HANDLES.pop(key, None)
    if old is not None:
        adapter.unregister(old)
    handle = adapter.register_unloadable(f"{name} (host copies)", 0, lambda: release_host_copies(name, files),
                                         device)
    _HOST_HANDLES[key] = handle
    return handle


class NewBieMemorySettings:
    TITLE = "NewBie Memory Settings"
    DESCRIPTION = ("One VRAM policy for the whole graph. Connect it to the text encode, sampler and VAE nodes; "
                   "a node's own override widgets win where they are set.")
    CATEGORY = f"{CATEGORY}/memory"
    RETURN_TYPES = (NEWBIE_MEMORY,)
    RETURN_NAMES = ("memory",)
    OUTPUT_TOOLTIPS = ("Memory settings for the NewBie nodes' optional 'memory' input.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.25, "tooltip":
                               "Most VRAM (GiB) one stage may reserve. 0 = auto: what is free when the stage starts, "
                               "minus a margin. 8 GB cards: 7.0 leaves room for the desktop."}),
            "ram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                              "Most host RAM (GiB) for cached weights (the bf16 DiT is ~7 GB, Gemma ~8 GB). "
                              "0 = auto: the RAM available when a model loads, minus a margin. Below what a "
                              "model needs, its blocks are read from disk as they are used."}),
            "attention_slicing": (ATTENTION_CHOICES, {"default": "auto", "tooltip":
                                  "Query rows per attention chunk. auto = the planner picks the largest that fits; "
                                  "off = never slice; a number forces it (smaller = less memory, slower)."}),
            "ffn_chunking": (FFN_CHOICES, {"default": "auto", "tooltip":
                             "Tokens per feed-forward chunk. auto = the planner's choice; off = never; a number "
                             "forces it."}),
            "fp8_streaming": ("BOOLEAN", {"default": False, "tooltip":
                              "Store streamed DiT/Gemma blocks as fp8 (half the traffic and RAM), upcast to bf16 "
                              "on the GPU before use. Small quality cost; helps most on 4-8 GB cards."}),
            "vae_tile": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                         "VAE tile size in pixels. 0 = untiled when it fits the budget, else the largest tile "
                         "that does."}),
            "compute_dtype": (["bf16", "fp16"], {"default": "bf16", "tooltip":
                              "DiT compute precision. bf16 on RTX 30xx and newer; fp16 for older cards without bf16."}),
        }, "optional": {
            "compile": (SWITCH_CHOICES, {"default": "auto", "tooltip":
                        "Fuse the DiT's norms, RoPE, gates and SwiGLU into Triton kernels with torch.compile. "
                        "auto = on with a CUDA GPU and Triton. The first run compiles (under a minute, then cached "
                        "on disk); off runs the same maths with torch's own ops (slower)."}),
            "cuda_graphs": (SWITCH_CHOICES, {"default": "auto", "tooltip":
                            "Replay DiT blocks as CUDA graphs. auto = where kernel launches, not the GPU, bound a "
                            "step (small images); off if a driver misbehaves."}),
            "fp8_compute": ("BOOLEAN", {"default": False, "tooltip":
                            "Run the DiT's big matmuls in fp8 (scaled e4m3) on Ada/Hopper GPUs (RTX 40xx, H100): "
                            "faster, slightly different images. Refused on older cards."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vram_budget_gb=None, ram_budget_gb=None, vae_tile=None, fp8_compute=None):
        checks = [lambda: check_budget(vram_budget_gb, "vram_budget_gb", zero_is_auto=True),
                  lambda: check_budget(ram_budget_gb, "ram_budget_gb", zero_is_auto=True)]
        if fp8_compute:
            checks.append(lambda: check_fp8_compute(adapter.get_adapter().compute_device(), "fp8_compute"))
        if vae_tile is not None:
            checks.append(lambda: check_vae_tile(vae_tile, "vae_tile"))
        return queue_check(cls, {"vram_budget_gb": vram_budget_gb, "ram_budget_gb": ram_budget_gb,
                                 "vae_tile": vae_tile}, *checks)

    def build(self, vram_budget_gb: float, ram_budget_gb: float, attention_slicing: str, ffn_chunking: str,
              fp8_streaming: bool, vae_tile: int, compute_dtype: str, compile: str = "auto",
              cuda_graphs: str = "auto", fp8_compute: bool = False) -> tuple[MemorySettings]:
        if vram_budget_gb < 0 or ram_budget_gb < 0:
            raise ValueError(f"budgets must be 0 (auto/unlimited) or positive, got vram {vram_budget_gb}, "
                             f"ram {ram_budget_gb}.")
        if vae_tile % 8:
            raise ValueError(f"vae_tile must be a multiple of 8 px (0 = auto), got {vae_tile}.")
        return (MemorySettings(
            vram_budget_gb=float(vram_budget_gb) or None, ram_budget_gb=float(ram_budget_gb) or None,
            attention_chunk=parse_chunk(attention_slicing, "attention_slicing"),
            ffn_chunk=parse_chunk(ffn_chunking, "ffn_chunking"), fp8_streaming=bool(fp8_streaming),
            compute_dtype=compute_dtype, vae_tile_px=int(vae_tile), compile=SWITCHES[compile],
            cuda_graphs=SWITCHES[cuda_graphs], fp8_compute=bool(fp8_compute)),)
