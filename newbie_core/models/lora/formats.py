"""LoRA-family tensor formats: key suffixes -> one adapter per module, and each kind's delta.

Kinds (the math follows the published formats; see spec lora-gguf-prompt.md §1):
- ``lora``: PEFT ``lora_A``/``lora_B`` or kohya ``lora_down``/``lora_up``; delta = up @ down,
  rank = rows of down.
- ``loha``: LyCORIS ``hada_w1_a/b``, ``hada_w2_a/b``; delta = (w1a @ w1b) * (w2a @ w2b),
  rank = rows of w1b.
- ``lokr``: LyCORIS ``lokr_w1`` (or ``_a``/``_b``) and ``lokr_w2`` (or ``_a``/``_b``);
  delta = kron(w1, w2). LyCORIS scales by alpha / rank where a side is factorised (rank = the
  factor's inner size) and by exactly 1 when both sides are full matrices.
- ``diff``: a full-size difference (``.diff`` for the weight, ``.diff_b`` for the bias).

The scale (alpha / rank) is not decided here: ``build.py`` resolves alpha once per module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checkpoint import CheckpointError

# key suffix -> (kind, factor name); ``None`` kind: belongs to whatever kind the module has.
SUFFIXES: dict[str, tuple[str | None, str]] = {
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora_A.default.weight": ("lora", "down"), ".lora_B.default.weight": ("lora", "up"),
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    "_lora.down.weight": ("lora", "down"), "_lora.up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"),
    ".hada_w2_a": ("loha", "w2_a"), ".hada_w2_b": ("loha", "w2_b"),
    ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1_a"), ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t1": ("lokr", "t1"), ".lokr_t2": ("lokr", "t2"),
    ".diff": ("diff", "diff"), ".diff_b": ("diff", "diff_b"),
    ".alpha": (None, "alpha"), ".dora_scale": (None, "dora_scale"),
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
# Factors that change the math in ways this pack does not apply: refuse, never skip silently.
UNSUPPORTED = {"mid": "a LoCon/Tucker mid factor (lora_mid)", "t1": "Tucker factors (hada_t1/lokr_t1)",
               "t2": "Tucker factors (hada_t2/lokr_t2)", "dora_scale": "DoRA (dora_scale)"}


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """(module name, kind, factor) of one LoRA tensor key, or None for a key of no known kind."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix):
            kind, factor = SUFFIXES[suffix]
            return key[: -len(suffix)], kind, factor
    return None


@dataclass
class Adapter:
    """One module's tensors of one file, grouped by :func:`group_modules`."""
    module: str                       # the module name as written in the file
    kind: str
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None        # the per-key ``.alpha``, when the file has one

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None where the format fixes the scale at 1."""
        f = self.factors
        if self.kind == "lora":
            return int(f["down"].shape[0])
        if self.kind == "loha":
            return int(f["w1_b"].shape[0])
        if self.kind == "lokr":
            if "w1_a" in f:
                return int(f["w1_a"].shape[1])
            if "w2_a" in f:
                return int(f["w2_a"].shape[1])
        return None                   # full LoKr, diff: scale 1

    @property
    def delta_shape(self) -> tuple[int, ...]:
        f = self.factors
        if self.kind == "lora":
            return (int(f["up"].shape[0]), int(f["down"].shape[1]))
        if self.kind == "loha":
            return (int(f["w1_a"].shape[0]), int(f["w1_b"].shape[1]))
        if self.kind == "lokr":
            w1 = _kron_side(f, "w1")
            w2 = _kron_side(f, "w2")
            return (w1[0] * w2[0], w1[1] * w2[1])
        return tuple(next(iter(f.values())).shape)

    @property
    def param(self) -> str:
        """Which parameter of the module the delta goes to."""
        return "bias" if "diff_b" in self.factors else "weight"


def _kron_side(f: Mapping[str, torch.Tensor], side: str) -> tuple[int, int]:
    if side in f:
        return int(f[side].shape[0]), int(f[side].shape[1])
    return int(f[side + "_a"].shape[0]), int(f[side + "_b"].shape[1])


REQUIRED = {"lora": ({"up", "down"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
            "lokr": ({"w1", "w2"}, {"w1_a", "w1_b", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b"}),
            "diff": ({"diff"}, {"diff_b"})}


def group_modules(tensors: Mapping[str, torch.Tensor], path: str) -> tuple[list[Adapter], list[str]]:
    """Adapters by module, and the keys of no known kind. Unsupported factors raise."""
    modules: dict[str, Adapter] = {}
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        module, kind, factor = parts
        if factor in UNSUPPORTED:
            raise CheckpointError(f"{path}: {key} uses {UNSUPPORTED[factor]}, which this pack does not apply; "
                                  f"merge it into a plain LoRA/LoKr/LoHa first.")
        if factor == "alpha":
            alphas[module] = float(tensor.float().item())
            continue
        adapter = modules.setdefault(module, Adapter(module, kind))
        if adapter.kind != kind:
            raise CheckpointError(f"{path}: module {module} mixes {adapter.kind} and {kind} tensors.")
        adapter.factors[factor] = tensor
    for module, alpha in alphas.items():
        if module in modules:
            modules[module].alpha = alpha
    out = []
    for adapter in modules.values():
        have = set(adapter.factors)
        if have not in [set(r) for r in REQUIRED[adapter.kind]]:
            raise CheckpointError(f"{path}: module {adapter.module} has {adapter.kind} tensors "
                                  f"{sorted(have)}, not a complete set.")
        if any(t.ndim != 2 for t in adapter.factors.values()) and adapter.kind != "diff":
            raise CheckpointError(f"{path}: module {adapter.module} holds convolution factors; NewBie's "
                                  f"LoRA targets are linear layers.")
        out.append(adapter)
    return out, unknown


# -- deltas (fp32), called with the factors on the device --------------------------------------
def lowrank_delta(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return f["up"].float() @ f["down"].float()


def hadamard_delta(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return (f["w1_a"].float() @ f["w1_b"].float()) * (f["w2_a"].float() @ f["w2_b"].float())


def kron_delta(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1 = f["w1"].float() if "w1" in f else f["w1_a"].float() @ f["w1_b"].float()
    w2 = f["w2"].float() if "w2" in f else f["w2_a"].float() @ f["w2_b"].float()
    return torch.kron(w1, w2)


def diff_delta(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return next(iter(f.values())).float()


DELTAS = {"lora": lowrank_delta, "loha": hadamard_delta, "lokr": kron_delta, "diff": diff_delta}


def lowrank_factors(f: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with delta = left @ right: lets placement add a LoRA with one GEMM (addmm)."""
    return f["up"], f["down"]


# The kinds whose delta is a plain product of two factors.
LOW_RANK = {"lora": lowrank_factors}

