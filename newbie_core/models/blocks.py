"""The seam through which placement reaches into a model without the model knowing.

A model that wants its heavy blocks placed (streamed, kept resident, upcast from fp8, ...)
exposes two things and nothing more:

1. ``block_sequence()``: the ordered list of ``(name, module)`` pairs it runs, named by their
   state-dict prefixes (``"layers.3"``). Everything outside that list is small and stays
   wherever the caller put it.
2. A ``block_runner`` attribute: the one function through which ``forward`` calls every block
   of that list, as ``runner(index, block, *args, **kwargs)``. The default runs the block as is.

Placement swaps in a runner that waits for the block's weights, runs it with them, and starts
the next prefetch. Because the model's own forward is the only code path, a streamed run
executes the same kernels on the same values as a resident one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


class BlockRunner(Protocol):
    def __call__(self, index: int, block: nn.Module, *args: Any, **kwargs: Any) -> Any: ...


def run_block_directly(index: int, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The default runner: the block's weights are already where its inputs are."""
    return block(*args, **kwargs)


@runtime_checkable
class BlockSequenceModel(Protocol):
    block_runner: BlockRunner

    def block_sequence(self) -> list[tuple[str, nn.Module]]: ...
