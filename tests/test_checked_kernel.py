"""The once-per-process check that lets a Triton kernel run only while it gives its reference's bits."""

from __future__ import annotations

import logging

import torch

from newbie_core.checked_kernel import CheckedKernel

CPU = torch.device("cpu")


def test_a_passing_check_runs_once_and_allows_the_kernel():
    calls = []
    kernel = CheckedKernel("k", True, calls.append, "the torch path")
    assert kernel.usable(CPU) and kernel.usable(CPU) and calls == [CPU]


def test_a_failing_check_stands_the_kernel_down_with_one_warning(caplog):
    def differs(device):
        raise RuntimeError("result differs from the torch path")

    kernel = CheckedKernel("fp8 thing", True, differs, "the torch path")
    with caplog.at_level(logging.WARNING):
        assert not kernel.usable(CPU) and not kernel.usable(CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "fp8 thing disabled (result differs from the torch path); using the torch path"]


def test_an_unavailable_kernel_is_never_checked():
    kernel = CheckedKernel("k", False, lambda d: (_ for _ in ()).throw(AssertionError("checked")), "x")
    assert not kernel.usable(CPU)
