"""Host side: the process-wide cache, host-budget modes, staging reuse and the one-copy rule."""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from newbie_core.models.checkpoint import TensorSource
from newbie_core.placement import (FakeCopyStream, HostBlockStore, HostCache, HostMode, Storage, cache_key,
                                   host_ram_peak, model_layouts, stream_blocks)
from newbie_core.placement.host_store import choose_host_mode

_spec = importlib.util.spec_from_file_location("placement_toys", Path(__file__).with_name("test_placement_streaming.py"))
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)


# The toy model and the one-thread setting are the streaming tests' fixtures.
one_thread = toys.one_thread
model = toys.model


@pytest.fixture()
def checkpoint(model, tmp_path) -> Path:
    path = tmp_path / "toy.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def source_reader(path: Path):
    """read_block backed by TensorSource (lazy safe_open), counting calls."""
    src = TensorSource([path])

    def read_block(index: int) -> dict[str, torch.Tensor]:
        read_block.calls += 1
        prefix = f"layers.{index}."
        return {k[len(prefix):]: src.get(k) for k in src.keys() if k.startswith(prefix)}
    read_block.calls = 0
    return read_block


def layouts(model, storage=Storage.BF16):
    return [l.storage for l in model_layouts(model, storage)]


def test_second_load_is_a_cache_hit(model, checkpoint):
    cache, reader = HostCache(), source_reader(checkpoint)
    key = cache_key([checkpoint], model.state_dict().keys(), "bf16")
    first = cache.get(key, layouts(model), reader, pin=False)
    assert reader.calls == toys.N_BLOCKS and first.mode is HostMode.PINNED
    again = cache.get(cache_key([checkpoint], model.state_dict().keys(), "bf16"), layouts(model), reader, pin=False)
    assert again is first and reader.calls == toys.N_BLOCKS and cache.hits == 1
    plan = toys.manual_plan(model, (), 2, 1, Storage.BF16)
    with stream_blocks(model, plan, again, "cpu", engine=FakeCopyStream()):
        model(*toys.inputs(0))
    assert reader.calls == toys.N_BLOCKS, "a pinned store never re-reads the file"


def test_key_changes_with_mtime_size_keys_and_storage(checkpoint):
    base = cache_key([checkpoint], ["a"], "bf16")
    assert cache_key([checkpoint], ["a"], "fp8") != base
    assert cache_key([checkpoint], ["a", "b"], "bf16") != base
    st = checkpoint.stat()
    os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key([checkpoint], ["a"], "bf16") != base
    moved = cache_key([checkpoint], ["a"], "bf16")
    with checkpoint.open("ab") as f:
        f.write(b"\0")
    os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key([checkpoint], ["a"], "bf16") != moved


def test_host_budget_picks_pinned_staging_or_disk(model):
    ls = layouts(model)
    total, biggest = sum(l.nbytes for l in ls), max(l.nbytes for l in ls)
    assert choose_host_mode(total, biggest, None) is HostMode.PINNED
    assert choose_host_mode(total, biggest, total) is HostMode.PINNED
    assert choose_host_mode(total, biggest, total - 1) is HostMode.STAGING
    assert choose_host_mode(total, biggest, 2 * biggest - 1) is HostMode.DISK
    cache = HostCache()
    store = cache.get(cache_key([], ["x"], "bf16"), ls, toys.CountingReader(model), host_budget=3 * biggest, pin=False)
    assert store.mode is HostMode.STAGING and store.host_bytes == 2 * biggest <= 3 * biggest


def test_lru_eviction_keeps_the_cache_under_budget(model):
    ls = layouts(model)
    total = sum(l.nbytes for l in ls)
    cache = HostCache()
    a = cache.get(cache_key([], ["a"], "bf16"), ls, toys.CountingReader(model), host_budget=total, pin=False)
    b = cache.get(cache_key([], ["b"], "bf16"), ls, toys.CountingReader(model), host_budget=total, pin=False)
    assert a.mode is b.mode is HostMode.PINNED
    assert cache.used() == total and a.host_bytes == 0, "the older model was evicted"


def test_one_host_copy_per_model_across_storage_layouts(model, checkpoint):
    cache = HostCache()
    keys = model.state_dict().keys()
    bf16 = cache.get(cache_key([checkpoint], keys, "bf16"), layouts(model), source_reader(checkpoint), pin=False)
    fp8 = cache.get(cache_key([checkpoint], keys, "fp8"), layouts(model, Storage.FP8), source_reader(checkpoint),
                    pin=False)
    assert bf16.host_bytes == 0, "the bf16 copy of the same file was released"
    assert cache.used() == fp8.host_bytes < sum(l.nbytes for l in layouts(model))


@pytest.mark.parametrize("mode", [HostMode.STAGING, HostMode.DISK])
@pytest.mark.parametrize("storage", [Storage.BF16, Storage.FP8])
def test_staging_and_disk_modes_stream_the_same_bits(model, mode, storage):
    ref = toys.reference(model, storage)
    plan = toys.manual_plan(model, (5,), 3, 2, storage)
    outs, _, reader = toys.run(model, plan, steps=3, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert reader.calls > 3 * 5, "staging re-reads every streamed block each forward"


def test_staging_buffer_reuse_needs_the_host_wait(model, monkeypatch):
    """Without waiting for the copy that read a staging buffer, the CPU overwrites it first."""
    monkeypatch.setattr(FakeCopyStream, "host_wait", lambda self, event: None)
    ref = toys.reference(model, Storage.BF16)
    outs, _, _ = toys.run(model, toys.manual_plan(model, (), 3, 2, Storage.BF16), steps=1, mode=HostMode.STAGING)
    assert not torch.equal(ref[0], outs[0])


def test_never_two_copies_while_packing(model):
    """Each block's source tensors are dropped before the next block is read."""
    alive: list[weakref.ref] = []
    peak = 0

    def read_block(index):
        nonlocal peak
        gc.collect()
        peak = max(peak, sum(r() is not None for r in alive))
        block = model.layers[index]
        tensors = {k: v.detach().clone() for k, v in block.named_parameters()}
        alive.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    HostBlockStore(layouts(model, Storage.FP8), read_block, HostMode.PINNED, pin=False)
    gc.collect()
    assert peak == 0 and all(r() is None for r in alive)


def test_host_ram_peak_reads_vmhwm():
    peak = host_ram_peak()
    assert peak is None or peak > 10 * 2**20
