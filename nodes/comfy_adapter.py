"""The one seam between the pack and ComfyUI.

Every call into ComfyUI (`comfy.model_management`, `comfy.utils`, `folder_paths`,
`latent_preview`) goes through this module, and those imports happen inside functions only,
so the node classes import and run in plain pytest. Two implementations share one surface:

* `ComfyAdapter` talks to a running ComfyUI. It is chosen automatically when ComfyUI's
  modules are already imported (`folder_paths` and `comfy.model_management` in `sys.modules`);
  the adapter never initialises ComfyUI itself.
* `FallbackAdapter` is used everywhere else (CPU tests, the CLI): model folders come from
  `add_folder`, memory calls are no-ops, handles are kept in a plain list, and a cancel can be
  simulated with `request_interrupt`.

Tests install their own implementation with `set_adapter(...)`; `set_adapter(None)` restores
automatic selection. Node code calls the module-level functions (`full_path`, `progress_bar`,
...), which forward to `get_adapter()`.

Memory etiquette (see comfyui-notes §2): placement owns the weights. ComfyUI only ever sees a
weightless `ResidentHandle` sized to the bytes a plan keeps resident; when ComfyUI needs the
memory it unloads the handle, and the handle calls the pack's `unload_fn`.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, Sequence

import torch

# Re-exported: tests and nodes use these names from this module.
from .adapter_fallback import (MODEL_EXTENSIONS, FallbackAdapter, FallbackHandle, Handle,  # noqa: F401
                               ProcessingInterrupted, Progress, RecordingProgress, not_found)

log = logging.getLogger(__name__)

# Name shown by ComfyUI's "Requested to load ..." / "Unloading ..." log lines for our handles.
HANDLE_MODULE_NAME = "NewBieResidentWeights"


# --------------------------------------------------------------------------------------------
# Real ComfyUI
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _handle_class() -> type:
    """Build the ModelPatcher subclass lazily, so this module imports without ComfyUI.

    Subclassing (instead of duck typing) keeps every ModelPatcher method ComfyUI might call on
    a loaded model working: they act on an empty module and do nothing. Only the methods that
    decide sizes and residency are overridden.
    """
    from comfy.model_patcher import ModelPatcher

    class ResidentWeights(torch.nn.Module):
        """Weightless module: ComfyUI moves it around, our weights never go near it."""

    ResidentWeights.__name__ = ResidentWeights.__qualname__ = HANDLE_MODULE_NAME

    class ResidentHandle(ModelPatcher):
        """ComfyUI-visible stand-in for placement-owned weights of `size` bytes."""

        def __init__(self, name: str, size: int, unload_fn: Callable[[], None],
                     load_device: torch.device, offload_device: torch.device):
            super().__init__(ResidentWeights(), load_device, offload_device, size=max(int(size), 1))
            self.name = name
            self.unload_fn = unload_fn
            self.unload_calls = 0

        @property
        def resident(self) -> bool:
            return self.model.model_loaded_weight_memory > 0

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, **kwargs):
            # All or nothing: the pack already placed (or is about to place) the weights.
            if self.resident:
                return 0
            self.model.model_loaded_weight_memory = self.size
            self.model.device = device_to
            return self.size

        def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
            # Never partial: LoadedModel.model_unload then detaches us fully. Newer ComfyUI
            # passes force_patch_weights too; whatever comes is accepted.
            return 0

        def is_dynamic(self) -> bool:
            # Dynamic VRAM (comfy-aimdo) must not manage these bytes: they are not in this module.
            return False

        def partially_unload_ram(self, *args, **kwargs) -> int:
            return 0  # no pinned host copies of ours are ComfyUI's to free

        def clone(self, *args, **kwargs):
            # A handle stands for weights ComfyUI never holds; newer ComfyUI builds clones as
            # class_(model, load_device, offload_device, size, ...), which this class cannot take.
            return self

        def detach(self, unpatch_all=True):
            # unpatch_all=False comes from re-loading the same handle and from __del__:
            # the weights stay where they are in both cases.
            if unpatch_all and self.resident:
                self.model.model_loaded_weight_memory = 0
                self.model.device = self.offload_device
                self.unload_calls += 1
                log.info("ComfyUI unloads %s (%.1f MiB)", self.name, self.size / 2**20)
                self.unload_fn()
            return self.model

        def __del__(self):
            pass  # ModelPatcher.__del__ would detach; an unreferenced handle has nothing to free

        def __repr__(self) -> str:
            return f"ResidentHandle({self.name!r}, {self.size} bytes, resident={self.resident})"

    return ResidentHandle


class ComfyAdapter:
    """Forwards to a running ComfyUI."""

    def models_dir_list(self, folder_name: str) -> list[str]:
        import folder_paths
        if folder_name not in folder_paths.folder_names_and_paths:
            log.warning("ComfyUI has no model folder named %r", folder_name)
            return []
        paths, extensions = folder_paths.folder_names_and_paths[folder_name]
        if ".gguf" not in extensions:   # ComfyUI lists only .safetensors/.pt-style files; we load GGUF too
            folder_paths.folder_names_and_paths[folder_name] = (paths, set(extensions) | {".gguf"})
            folder_paths.filename_list_cache.pop(folder_name, None)
        return list(folder_paths.get_filename_list(folder_name))

    def full_path(self, folder_name: str, filename: str) -> str:
        import folder_paths
        path = folder_paths.get_full_path(folder_name, filename) if filename else None
        if path is None:
            dirs = folder_paths.get_folder_paths(folder_name) if folder_name in folder_paths.folder_names_and_paths else []
            raise not_found(folder_name, filename, list(dirs))
        return path

    def compute_device(self) -> torch.device:
        import comfy.model_management as mm
        return mm.get_torch_device()

    def intermediate_device(self) -> torch.device:
        import comfy.model_management as mm
        return mm.intermediate_device()

    def free_vram(self, bytes_needed: int, device: torch.device, keep: Sequence[Handle] = ()) -> int:
        import comfy.model_management as mm
        keep_loaded = [lm for lm in mm.current_loaded_models if any(lm.model is h for h in keep)]
        return len(mm.free_memory(int(bytes_needed), torch.device(device), keep_loaded=keep_loaded))

    def soft_empty_cache(self) -> None:
        import comfy.model_management as mm
        mm.soft_empty_cache()

    def register_unloadable(self, name: str, size_bytes: int, unload_fn: Callable[[], None],
                            device: torch.device | None = None) -> Handle:
        """Register before moving the weights: ComfyUI first evicts others to make room."""
        import comfy.model_management as mm
        load_device = torch.device(device) if device is not None else mm.get_torch_device()
        handle = _handle_class()(name, size_bytes, unload_fn, load_device, mm.unet_offload_device())
        mm.load_models_gpu([handle], force_full_load=True)
        return handle

    def unregister(self, handle: Handle) -> None:
        """Forget a handle without calling its unload function (the pack freed the weights)."""
        import comfy.model_management as mm
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[i]
            if loaded.model is handle:
                mm.current_loaded_models.pop(i)
                if loaded.model_finalizer is not None:
                    loaded.model_finalizer.detach()
                    loaded.model_finalizer = None
        if hasattr(handle, "model"):
            handle.model.model_loaded_weight_memory = 0

    def is_registered(self, handle: Handle) -> bool:
        import comfy.model_management as mm
        return any(lm.model is handle for lm in mm.current_loaded_models)

    def unload_all(self) -> None:
        import comfy.model_management as mm
        mm.unload_all_models()

    def progress_bar(self, total: int, node_id: str | None = None) -> Progress:
        import comfy.utils
        return comfy.utils.ProgressBar(int(total), node_id=node_id)

    def check_interrupted(self) -> None:
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()

    def preview_image_from_latent(self, latent: torch.Tensor) -> Any:
        """`latent`: [B,16,h,w] in the DiT's normalised space ((z-0.1159)*0.3611).

        Returns what `ProgressBar.update_absolute(preview=...)` expects, or None when
        previews are off (ComfyUI's default `--preview-method none`).
        """
        import latent_preview
        previewer = latent_preview.get_previewer(latent.device, _flux_latent_format())
        if previewer is None:
            return None
        return previewer.decode_latent_to_preview_image("JPEG", latent[:1])

    def comfy_modules(self) -> Any:
        """ComfyUI's modules the MODEL glue builds on (nodes/comfy_model.py imports none itself)."""
        import types
        import comfy.conds
        import comfy.model_base
        import comfy.model_management
        import comfy.model_patcher
        import comfy.model_sampling
        import comfy.samplers
        import comfy.supported_models
        return types.SimpleNamespace(conds=comfy.conds, model_base=comfy.model_base,
                                     model_management=comfy.model_management, model_patcher=comfy.model_patcher,
                                     model_sampling=comfy.model_sampling, samplers=comfy.samplers,
                                     supported_models=comfy.supported_models)


@functools.lru_cache(maxsize=1)
def _flux_latent_format():
    import comfy.latent_formats
    return comfy.latent_formats.Flux()


# --------------------------------------------------------------------------------------------
# Selection and the module-level surface the nodes call
# --------------------------------------------------------------------------------------------

_override: Any = None
_comfy: ComfyAdapter | None = None
_fallback: FallbackAdapter | None = None


def comfy_running() -> bool:
    """True inside a ComfyUI process (its modules are imported before any custom node)."""
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


def set_adapter(adapter: Any) -> Any:
    """Install `adapter` for every call (tests); None restores automatic choice. Returns the old one."""
    global _override
    previous, _override = _override, adapter
    return previous


def get_adapter() -> Any:
    global _comfy, _fallback
    if _override is not None:
        return _override
    if comfy_running():
        _comfy = _comfy or ComfyAdapter()
        return _comfy
    _fallback = _fallback or FallbackAdapter()
    return _fallback


def models_dir_list(folder_name: str) -> list[str]:
    """Model files in a ComfyUI model folder (relative paths, sorted) for COMBO options."""
    return get_adapter().models_dir_list(folder_name)


def full_path(folder_name: str, filename: str) -> str:
    """Absolute path of `filename`; FileNotFoundError naming the folders searched otherwise."""
    return get_adapter().full_path(folder_name, filename)


def compute_device() -> torch.device:
    return get_adapter().compute_device()


def intermediate_device() -> torch.device:
    """Device for tensors a node returns (IMAGE, LATENT, CONDITIONING): the CPU normally."""
    return get_adapter().intermediate_device()


def free_vram(bytes_needed: int, device: torch.device, keep: Sequence[Handle] = ()) -> int:
    """Ask ComfyUI to evict its models until `bytes_needed` are free; `keep` handles stay."""
    return get_adapter().free_vram(bytes_needed, device, keep)


def soft_empty_cache() -> None:
    get_adapter().soft_empty_cache()


def register_unloadable(name: str, size_bytes: int, unload_fn: Callable[[], None],
                        device: torch.device | None = None) -> Handle:
    """Register a weightless handle ComfyUI may evict; eviction calls `unload_fn()` once."""
    return get_adapter().register_unloadable(name, size_bytes, unload_fn, device)


def unregister(handle: Handle) -> None:
    get_adapter().unregister(handle)


def is_registered(handle: Handle) -> bool:
    return get_adapter().is_registered(handle)


def unload_all() -> None:
    get_adapter().unload_all()


def progress_bar(total: int, node_id: str | None = None) -> Progress:
    return get_adapter().progress_bar(total, node_id)


def check_interrupted() -> None:
    """Raise if the user pressed Cancel (call once per sampler step)."""
    get_adapter().check_interrupted()


def preview_image_from_latent(latent: torch.Tensor) -> Any:
    return get_adapter().preview_image_from_latent(latent)


def comfy_modules() -> Any:
    """The comfy.* modules for the MODEL glue; raises outside ComfyUI (there is no MODEL there)."""
    impl = get_adapter()
    if not hasattr(impl, "comfy_modules"):
        raise RuntimeError("a ComfyUI MODEL exists only inside ComfyUI; use the NewBie sampler outside it.")
    return impl.comfy_modules()
