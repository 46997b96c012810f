"""A fast kernel that must give its reference path's bits, checked once per process.

The Triton kernels (fp8 upcast, fp8 row quantiser, GGUF decode) each promise the same bits as a
torch path. Each is run against that path on small inputs the first time it is needed; if the
check fails or raises (an unsupported GPU, a compiler change), the kernel stands down for the
rest of the process with one warning and the torch path runs instead: slower, never different.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CheckedKernel:
    """``usable(device)``: whether the kernel may run, after its one ``check(device)``, which raises
    on any difference from the reference. ``available`` is False where the kernel cannot exist at
    all (no Triton): then nothing is checked and nothing is said."""

    def __init__(self, name: str, available: bool, check: Callable[[torch.device], None], fallback: str):
        self.name, self.check, self.fallback = name, check, fallback
        self.ok: bool | None = None if available else False

    def usable(self, device: torch.device) -> bool:
        if self.ok is None:
            try:
                self.check(device)
                self.ok = True
            except Exception as e:   # noqa: BLE001 - any failure means: use the reference path
                self.ok = False
                log.warning("%s disabled (%s); using %s", self.name, e, self.fallback)
        return self.ok
