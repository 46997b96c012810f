"""Packed storage kinds: a tensor held as opaque bytes that a registered function decodes.

Placement does not know any file format. A *codec* is a name and a function that fills a
compute-dtype tensor from a 1-D ``uint8`` tensor of packed bytes, on the device both live on
(CPU, or the GPU inside the upcast stream). The packed bytes are what the host store keeps and
what crosses the link, so a block costs its packed size in host RAM and per copy. Callers that
own a format (the GGUF loader in the pipeline) register its codecs once at import.

A decode must be deterministic: the same bytes give the same bits on a device wherever they
land in memory, so a streamed block equals a resident one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (packed bytes, 1-D uint8; out, a compute-dtype tensor of the logical shape) -> None
Decode = Callable[[torch.Tensor, torch.Tensor], None]

_CODECS: dict[str, Decode] = {}


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
