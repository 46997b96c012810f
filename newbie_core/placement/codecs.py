"""Packed storage kinds: a tensor held as opaque bytes that a registered function decodes.

Placement does not know any file format. A *codec* is a name and a function that fills a
compute-dtype tensor from a 1-D ``uint8`` tensor of packed bytes, on the device both live on
(CPU, or the GPU inside the upcast stream). The packed bytes are what the host store keeps and
what crosses the link, so a block costs its packed size in host RAM and per copy. Callers that
own a format (the GGUF loader in the pipeline) register its codecs once at import.

A decode must be deterministic: the same bytes give the same bits on a device wherever they
land in memory, so a streamed block equals a resident one.

A format may also register a *block fuser*: given a block's storage and compute layouts, it
returns one function that decodes the whole block (packed and plain entries) in a single launch,
or None when it cannot. Decoding tensor by tensor costs a launch per entry (about 14 per DiT
block); the fused form must give the same bits as the per-entry path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layout import BlockLayout

# (packed bytes, 1-D uint8; out, a compute-dtype tensor of the logical shape) -> None
Decode = Callable[[torch.Tensor, torch.Tensor], None]
# (storage-layout bytes, compute-layout bytes), both 1-D uint8 on one device -> None
BlockDecode = Callable[[torch.Tensor, torch.Tensor], None]
# (storage layout, compute layout, device) -> a whole-block decode, or None
BlockFuser = Callable[["BlockLayout", "BlockLayout", torch.device], BlockDecode | None]

_CODECS: dict[str, Decode] = {}
_FUSERS: list[BlockFuser] = []


def register_codec(name: str, decode: Decode) -> None:
    """Make ``name`` usable in packed layouts (re-registering the same name replaces it)."""
    _CODECS[name] = decode


def decode_into(name: str, src: torch.Tensor, out: torch.Tensor) -> None:
    decode = _CODECS.get(name)
    if decode is None:
        raise KeyError(f"no codec {name!r} is registered (known: {', '.join(sorted(_CODECS)) or 'none'}); "
                       f"the loader that produced this layout must register it.")
    decode(src, out)


def registered() -> tuple[str, ...]:
    return tuple(sorted(_CODECS))


def register_block_fuser(fuser: BlockFuser) -> None:
    """Offer one-launch decodes of whole packed blocks (registering the same fuser twice is a no-op)."""
    if fuser not in _FUSERS:
        _FUSERS.append(fuser)


def fused_block_decode(storage: BlockLayout, compute: BlockLayout, device: torch.device) -> BlockDecode | None:
    """The first registered fuser's decode for this layout pair, or None (decode entry by entry)."""
    for fuser in _FUSERS:
        decode = fuser(storage, compute, device)
        if decode is not None:
            return decode
    return None
