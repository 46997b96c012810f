"""Block calls replayed as CUDA graphs: the host cost of a block becomes one launch.

Why: at 512² without CFG a Next-DiT block is ~0.75 ms of GPU work but ~100 small kernels, and
launching them from Python took longer than running them (measured on an H200: a resident step
of 66 ms held 30 ms of kernels). A CUDA graph launches them all at once.

How it fits placement. A graph is bound to addresses, so each block call is keyed by where its
weights live (a resident buffer, or ring slot ``s``) and by the signature of its inputs (shapes,
dtypes, key-padding lengths). Inputs are copied into *static* buffers shared by every graph of
that signature; the block's result is written back into the static buffer of its first argument
and that buffer is returned. A model that passes each block's output straight into the next
block (``x = runner(i, block, x, ...)``) therefore pays no copies at all between blocks; the
contract is that a returned tensor is only valid until the next call with the same signature.

The whole first forward runs eagerly (it warms up cuBLAS/cuDNN for every shape); from the second
forward on, the first call of each key captures and every later one replays. All graphs share
one memory pool: they run one after another on the compute stream and nothing they allocate
outlives a call, so the pool holds one block's worth of activations. The eager forward's cached
activations are handed back before the first capture, so they are not reserved twice. Weight waits and ``compute_done``
events stay outside the graphs, recorded by the runner around each replay.

:class:`ReplayBackend` is the CPU stand-in used by the tests: "capture" runs the call once on the
static buffers and "replay" runs it again on them, so a missed input copy or a stale static buffer
shows up as a different result.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], None]) -> Any: ...
    def replay(self, graph: Any) -> None: ...
    def release(self) -> None: ...


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _clear_cublas_workspaces() -> None:
    """cuBLAS caches a workspace per stream. One first allocated during a capture would sit in
    the graph pool for good (32 MiB per stage, never given back); cleared around each capture,
    it is scratch memory of the pool like any other (what torch's inductor does too)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class CudaGraphBackend:
    """Captures on a private stream into one shared pool; replays on the current stream."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device not in _CAPTURE_STREAMS:
            _CAPTURE_STREAMS[self.device] = torch.cuda.Stream(self.device)
        self.stream = _CAPTURE_STREAMS[self.device]
        self.pool = torch.cuda.graph_pool_handle()
        self._emptied = False

    def capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        if not self._emptied:
            # The eager warm-up forward left its activations in the ordinary cache; the graph
            # pool cannot reuse them, so hand them back once instead of reserving them twice.
            torch.cuda.empty_cache()
            self._emptied = True
        graph = torch.cuda.CUDAGraph()
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        _clear_cublas_workspaces()
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                try:
                    fn()
                finally:
                    graph.capture_end()
        finally:
            _clear_cublas_workspaces()
        main.wait_stream(self.stream)
        return graph

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()

    def release(self) -> None:
        self.pool = None
        _clear_cublas_workspaces()


class ReplayBackend:
    """CPU stand-in: a "graph" is the call itself, run again on the static buffers each replay.

    Like a real capture, capturing runs nothing: only replays compute.
    """

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        return fn

    def replay(self, graph: Callable[[], None]) -> None:
        self.replays += 1
        graph()

    def release(self) -> None:
        pass


class _Static:
    """One signature's static input buffers, and which caller tensor each copy came from."""

    def __init__(self, args: Sequence[Any]):
        self.args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self._last: list[tuple[weakref.ref, int] | None] = [None] * len(args)   # (source, its version)

    def load(self, args: Sequence[Any]) -> None:
        """Copy each caller tensor in, unless it is the static buffer itself or was just copied."""
        for j, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            static = self.args[j]
            if a is static:
                continue
            last, version = self._last[j], _version(a)
            if last is not None and last[0]() is a and last[1] == version:
                continue
            static.copy_(a)
            self._last[j] = (weakref.ref(a), version)


def _version(t: torch.Tensor) -> int:
    """In-place changes bump a tensor's version; inference tensors (the sampler runs under
    ``inference_mode``) have none, and the contract is that callers do not modify a tensor in
    place between two block calls that receive it (the models here never do)."""
    return -1 if t.is_inference() else t._version


def signature(args: Sequence[Any]) -> Hashable | None:
    """What a graph depends on besides addresses; None when a call cannot be graphed."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.shape, a.dtype, a.device))
        elif a is None or isinstance(a, (int, float, bool, str)):
            sig.append(a)
        elif hasattr(a, "lengths"):                  # KeyPadding: lengths are Python ints
            sig.append(("padding", a.lengths))
        else:
            return None
    return tuple(sig)


class BlockGraphs:
    """Runs block calls as graphs keyed by (weights key, input signature); see module docstring."""

    def __init__(self, backend: GraphBackend):
        self.backend = backend
        self._static: dict[Hashable, _Static] = {}
        self._graphs: dict[tuple[Hashable, Hashable], Any] = {}
        self.enabled = True
        self.forwards = 0

    def new_forward(self) -> None:
        """The runner calls this when the model starts a forward (block 0 again)."""
        self.forwards += 1

    def run(self, key: Hashable, call: Callable[..., torch.Tensor], args: Sequence[Any]) -> torch.Tensor:
        """``call(*args)`` runs the block eagerly with its weights bound (used for warm-up and capture)."""
        sig = signature(args) if self.enabled else None
        if sig is None:
            return call(*args)
        static = self._static.get(sig)
        graph = self._graphs.get((key, sig))
        if static is None or (graph is None and self.forwards < 2):    # eager warm-up
            out = call(*args)
            if static is None and isinstance(out, torch.Tensor) and _same_kind(out, args[0]):
                self._static[sig] = _Static(args)
            return out
        static.load(args)
        if graph is None:
            graph = self._capture(key, sig, call, static)
            if graph is None:
                return call(*args)
        self.backend.replay(graph)
        return static.args[0]

    def _capture(self, key, sig, call, static: _Static) -> Any:
        def body() -> None:
            static.args[0].copy_(call(*static.args))
        try:
            graph = self.backend.capture(body)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:    # noqa: BLE001 - an uncapturable block still runs, eagerly
            self.enabled = False
            log.warning("CUDA graphs turned off for this stage: capturing a block failed (%s: %s); "
                        "blocks run eagerly (same results, more host time).", type(e).__name__, e)
            return None
        self._graphs[(key, sig)] = graph
        return graph

    def release(self) -> None:
        self._graphs.clear()
        self._static.clear()
        self.backend.release()


def _same_kind(out: torch.Tensor, first: Any) -> bool:
    return isinstance(first, torch.Tensor) and out.shape == first.shape and out.dtype == first.dtype


def module_structure(module: torch.nn.Module) -> Hashable:
    """A key for "runs the same code": class and plain attributes of every submodule.

    Two blocks with equal structure and the same weight addresses record the same graph, so
    ring slots need one graph per structure instead of one per block.
    """
    parts = []
    for name, m in module.named_modules():
        plain = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None), tuple))))
        parts.append((name, type(m).__qualname__, plain))
    return tuple(parts)
