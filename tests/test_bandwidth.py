"""Measured bandwidths: measured once per key, then read from the cache file; the roofline uses them."""

from __future__ import annotations

import json

from newbie_core.placement import bandwidth as bw
from newbie_core.placement.budget import GiB
from newbie_core.placement.host_budget import HostModel, plan_host


def test_the_link_is_measured_once_per_gpu_and_driver_then_read_from_the_cache(tmp_path):
    calls = []

    def fake_measure(device):
        calls.append(device)
        return 12e9

    key = lambda d: f"link:{d}:driver 1"     # noqa: E731
    assert bw.link_bandwidth("gpu-a", fake_measure, key, tmp_path) == 12e9
    assert bw.link_bandwidth("gpu-a", fake_measure, key, tmp_path) == 12e9
    assert calls == ["gpu-a"]
    assert bw.link_bandwidth("gpu-b", lambda d: 25e9, key, tmp_path) == 25e9
    stored = json.loads((tmp_path / bw.CACHE_FILE).read_text())
    assert stored == {"link:gpu-a:driver 1": 12e9, "link:gpu-b:driver 1": 25e9}


def test_a_corrupt_cache_file_is_measured_again(tmp_path):
    (tmp_path / bw.CACHE_FILE).write_text("not json")
    assert bw.cached("link:x", lambda: 5e9, tmp_path) == 5e9
    assert bw.cached("link:x", lambda: 1.0, tmp_path) == 5e9


def test_the_disk_probe_reads_the_file_and_is_cached_by_file_system(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\\0" * (3 * 2**20))
    measured = bw.disk_bandwidth(f, folder=tmp_path / "cache")
    assert measured > 0
    assert bw.disk_bandwidth(f, lambda p: -1.0, folder=tmp_path / "cache") == measured
    assert bw.disk_key(f).startswith("disk:dev ")


def test_the_host_roofline_uses_the_measured_link_and_disk():
    dit = HostModel("dit", 7 * GiB, 175 * 2**20, streamed_bytes_per_step=6 * GiB)
    pinned = plan_host([dit], 16 * GiB).rows[0]
    staged = plan_host([dit], 4 * GiB).rows[0]
    assert pinned.disk_bytes_per_step == 0 and staged.disk_bytes_per_step == 6 * GiB
    assert pinned.roofline_s(12e9, 3e9) == 6 * GiB / 12e9
    assert pinned.roofline_s(50e9, 3e9) == 6 * GiB / 50e9
    assert staged.roofline_s(50e9, 3e9) == 6 * GiB / 3e9        # the disk bounds a disk-streamed row
    text = plan_host([dit], 4 * GiB).render(12e9, 3e9)
    assert "measured link 12.0 GB/s, disk 3.00 GB/s" in text and f"{6 * GiB / 3e9:.3f}" in text


import pytest  # noqa: E402


@pytest.mark.cuda
def test_the_real_link_probe_gives_a_plausible_figure(tmp_path):
    import torch
    gbps = bw.link_bandwidth(torch.device("cuda"), folder=tmp_path) / 1e9
    assert 1 < gbps < 200, gbps       # PCIe 3.0 x4 .. NVLink-C2C
    assert bw.link_key(torch.device("cuda")) in json.loads((tmp_path / bw.CACHE_FILE).read_text())
