"""CPU tier: the adapter's handle and the MODEL patcher against the ModelPatcher surface of the
newest ComfyUI read (Comfy-Org/ComfyUI comfy/model_patcher.py 08d0e510, model_management.py
02b2b388; README "ComfyUI versions"), with stand-ins for the comfy modules.

What those versions do that 0.3.64 did not, and these tests pin down:
* `clone(disable_dynamic=False, model_override=None, force_deepcopy=False)` builds the copy as
  ``self.__class__(model, load_device, offload_device, size, weight_inplace_update=..., fast_disk=...)``
  and, with force_deepcopy, needs the loader's ``cached_patcher_init`` or raises;
* `partially_unload(device, memory, force_patch_weights=...)`; `is_dynamic()` decides whether
  Dynamic VRAM (comfy-aimdo) manages a model and whether ComfyUI frees pins for it;
* `add_hook_patches` (hook LoRAs) beside `add_patches`.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from conftest import load_pack

CPU = torch.device("cpu")


class NewestModelPatcher:
    """The parts of the newest ModelPatcher these classes rely on, written from its reading."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size, self.weight_inplace_update, self.fast_disk = size, weight_inplace_update, fast_disk
        self.parent, self.cached_patcher_init = None, None
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "model_loaded_weight_memory"):
            model.model_loaded_weight_memory = 0
        if not hasattr(model, "device"):
            model.device = offload_device

    def is_dynamic(self):
        return False

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        if (self.is_dynamic() and disable_dynamic) or force_deepcopy:
            if model_override is None and self.cached_patcher_init is None:
                raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        model = self.model if model_override is None else model_override[0]
        n = self.__class__(model, self.load_device, self.offload_device, self.model_size(),
                           weight_inplace_update=self.weight_inplace_update, fast_disk=self.fast_disk)
        n.parent = self
        return n

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        raise AssertionError("the pack's classes must not reach the base partial unload")

    def detach(self, unpatch_all=True):
        return self.model

    def cleanup(self):
        pass

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return []         # a weightless model matches no key: the base would take nothing, silently

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        return []


@pytest.fixture
def newest_comfy(monkeypatch):
    """`comfy.model_patcher` (and what the MODEL glue builds on) as the newest ComfyUI has them."""
    pack = load_pack()
    adapter = importlib.import_module(f"{pack.__name__}.nodes.comfy_adapter")
    comfy_model = importlib.import_module(f"{pack.__name__}.nodes.comfy_model")

    class BaseModel(torch.nn.Module):
        def __init__(self, config, model_type, device=None):
            super().__init__()
            self.model_config, self.model_type, self.device = config, model_type, device

        def extra_conds(self, **kwargs):
            return {}

    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = NewestModelPatcher
    modules = types.SimpleNamespace(
        model_patcher=mp,
        conds=types.SimpleNamespace(CONDRegular=type("CONDRegular", (), {"__init__": lambda s, c: setattr(s, "cond", c)})),
        model_base=types.SimpleNamespace(BaseModel=BaseModel, ModelType=types.SimpleNamespace(FLOW="flow")),
        supported_models=types.SimpleNamespace(Lumina2=lambda cfg: cfg),
        model_management=types.SimpleNamespace(current_loaded_models=[], unet_offload_device=lambda: CPU))
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.model_patcher = mp
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", mp)
    monkeypatch.setattr(adapter, "comfy_modules", lambda: modules)
    adapter._handle_class.cache_clear()
    comfy_model._classes.cache_clear()
    yield types.SimpleNamespace(adapter=adapter, comfy_model=comfy_model)
    adapter._handle_class.cache_clear()
    comfy_model._classes.cache_clear()


def test_handle_survives_the_newest_patcher_calls(newest_comfy):
    calls = []
    handle = newest_comfy.adapter._handle_class()("DiT", 5 << 20, lambda: calls.append("unload"), CPU, CPU)
    assert handle.is_dynamic() is False                         # Dynamic VRAM leaves it alone
    assert handle.partially_load(CPU, 0, force_patch_weights=True) == 5 << 20 and handle.resident
    assert handle.partially_unload(CPU, 1 << 20, force_patch_weights=False) == 0 and handle.resident
    assert handle.partially_unload_ram(1 << 20, subsets=["weights"]) == 0
    # The newest clone would call ResidentHandle(model, load_device, ...): the handle is its own clone.
    assert handle.clone() is handle and handle.clone(disable_dynamic=True, force_deepcopy=True) is handle
    handle.detach(unpatch_all=False)
    assert calls == [] and handle.resident
    handle.detach()
    assert calls == ["unload"] and not handle.resident


def test_model_patcher_clones_keep_the_class_and_refuse_every_lora_path(newest_comfy):
    classes = newest_comfy.comfy_model._classes()
    placed = types.SimpleNamespace(compute_dtype=torch.float32, close=lambda: None)
    base = classes.BaseModel(placed, device=CPU)
    patcher = classes.Patcher(base, load_device=CPU, offload_device=CPU)
    assert patcher.is_dynamic() is False
    for kwargs in ({}, {"disable_dynamic": True}, {"force_deepcopy": True}):
        clone = patcher.clone(**kwargs)           # force_deepcopy would raise in the base class
        assert type(clone) is classes.Patcher and clone.model is base and clone.parent is patcher, kwargs
    key = "diffusion_model.layers.0.attention.qkv.weight"
    with pytest.raises(ValueError, match="pack's LoRA loader"):
        patcher.add_patches({key: (torch.zeros(1),)}, 1.0)
    with pytest.raises(ValueError, match="pack's LoRA loader"):
        patcher.add_hook_patches(object(), {key: (torch.zeros(1),)}, 0.7)
    assert patcher.add_hook_patches(object(), {key: (torch.zeros(1),)}, 0.0) == []
