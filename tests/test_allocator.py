"""Which CUDA allocator runs, and expandable segments turned on only where the user chose nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from newbie_core.models.dit import DiTConfig
from newbie_core.placement import Allocator, active_allocator, use_expandable_segments
from newbie_core.placement import allocator as alloc


@pytest.mark.parametrize("settings, expandable", [
    ("", False), ("expandable_segments:True", True), ("backend:native, expandable_segments:true", True),
    ("expandable_segments:False", False), ("max_split_size_mb:128", False),
])
def test_expandable_segments_are_read_from_the_settings(settings, expandable):
    assert alloc._expandable_requested(settings) is expandable


def _fake_settings(monkeypatch, current: str) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: current, raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    return calls


def test_expandable_segments_are_turned_on_when_nothing_was_configured(monkeypatch):
    calls = _fake_settings(monkeypatch, "")
    monkeypatch.setattr(alloc, "_set_here", [])
    assert use_expandable_segments() is True and calls == ["expandable_segments:True"]
    assert alloc._expandable_requested(alloc.allocator_settings())     # even if torch reports nothing


def test_settings_set_here_are_known_where_torch_cannot_report_them(monkeypatch):
    """A torch build that sets allocator settings at run time but cannot read them back."""
    calls: list[str] = []
    monkeypatch.delattr(torch._C, "_accelerator_getAllocatorSettings", raising=False)
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings", raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.setattr(alloc, "_set_here", [])
    for k in alloc._ENV:
        monkeypatch.delenv(k, raising=False)
    assert not alloc._expandable_requested(alloc.allocator_settings())
    assert use_expandable_segments() is True and calls == ["expandable_segments:True"]
    assert alloc._expandable_requested(alloc.allocator_settings())


@pytest.mark.parametrize("user, on", [("backend:cudaMallocAsync", False), ("expandable_segments:False", False),
                                      ("max_split_size_mb:64,expandable_segments:True", True)])
def test_a_users_allocator_settings_stand(monkeypatch, user, on):
    calls = _fake_settings(monkeypatch, user)
    monkeypatch.setattr(alloc, "_set_here", [])
    assert use_expandable_segments() is on and calls == [] and alloc._set_here == []


def test_planning_without_a_gpu_assumes_the_native_allocator(monkeypatch):
    assert active_allocator(torch.device("cpu")) is Allocator.NATIVE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)      # a CUDA plan made on a CPU box
    assert active_allocator(torch.device("cuda")) is Allocator.NATIVE


def test_the_activation_estimate_follows_the_allocator():
    """Expandable segments reuse freed memory whatever its size, so the same forward reserves
    less above its live bytes than under the native allocator; CUDA's pool lies between."""
    from newbie_core.pipeline.sample import dit_activation_estimate
    args = (DiTConfig.tiny(), 2, 40, 256, torch.bfloat16, torch.device("cuda"), False, False)
    native, expandable, pool = (dit_activation_estimate(*args, a)(None, None)
                                for a in (Allocator.NATIVE, Allocator.EXPANDABLE, Allocator.ASYNC))
    assert expandable < pool < native


PROBE = """
import torch
from newbie_core.placement import active_allocator, allocator, use_expandable_segments
print("torch", torch.__version__, "can read settings back:", hasattr(torch._C, "_accelerator_getAllocatorSettings"))
asked = use_expandable_segments()
print("settings:", allocator.allocator_settings() or "-")
MiB = 2**20
torch.cuda.empty_cache()
a = torch.empty(30 * MiB, dtype=torch.uint8, device="cuda")
b = torch.empty(30 * MiB, dtype=torch.uint8, device="cuda")
del a, b
c = torch.empty(50 * MiB, dtype=torch.uint8, device="cuda")   # fits the two freed 30 MiB only if they are one range
print(asked, active_allocator(torch.device("cuda")).value, torch.cuda.memory_reserved() // MiB)
"""


@pytest.mark.cuda
@pytest.mark.parametrize("env, want, reserved", [
    (None, "True expandable", (50, 64)), ("backend:cudaMallocAsync", "False cudaMallocAsync", None),
    ("expandable_segments:False", "False native", (110, 130))])
def test_the_allocator_a_process_runs_is_the_one_planned_for(env, want, reserved):
    """What the plan assumes is what the allocator does: with expandable segments two freed
    neighbours hold a larger request (60 MiB reserved, not 110 as with a segment each)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if env:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = env
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True)
    asked, kind, mib = out.stdout.split("\n")[-2].split()
    assert f"{asked} {kind}" == want, out.stdout
    if reserved:
        assert reserved[0] <= int(mib) <= reserved[1], f"{mib} MiB reserved"
