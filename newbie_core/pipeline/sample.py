"""The sampling stage: the DiT under a placement plan, driven by a flow sampler with CFG.

Cond and uncond run as one batch (splitting them would double the weight traffic when blocks
stream). Noise is drawn on the CPU from the seed, so it does not depend on placement. Latents
come in and go out *raw* (ComfyUI's LATENT convention); NewBie's normalisation is applied on
entry and undone on exit, here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.dit import (ActivationChunks, AttentionKernel, DiTConfig, NextDiT, build_dit,
                          estimate_activation_bytes)
from ..models.dit.fused import kernels
from ..models.dit.estimate import joint_block_flops
from ..placement.bandwidth import link_bandwidth, matmul_throughput
from ..placement import (HOST_CACHE, Allocator, Report, StagePlan, StorageChoice, active_allocator, measure_stage,
                         run_with_oom_retry, stage_guard)
from ..sampling import (GuidanceConfig, GuidedVelocity, denormalize_latent, flow_sigmas, initial_noise,
                        noise_latent, normalize_latent, sample)
from .conditioning import Conditioning, batch_conditionings
from .handles import DiTHandle
from .host_ram import check_stage, host_model, host_tensor_bytes
from .lora import dit_patches
from .placed import PlacementInputs, materialize_non_blocks, non_block_parameters, placed_blocks, plan_for
from .refined_caption import RefinedCaptions
from .settings import MemorySettings, SamplingSettings, StorageDType

log = logging.getLogger(__name__)

# (callback) step index, total steps, current x (normalised), denoised estimate (normalised)
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

# The smallest chunks the planner may go down to (query rows; flattened tokens).
ATTN_CHUNK_FLOOR = 512
FFN_CHUNK_FLOOR = 1024
CHUNK_ALIGN = 128


def even_chunks(total: int, floor: int, align: int = CHUNK_ALIGN) -> list[int]:
    """Chunk sizes that split ``total`` rows into 2, 3, 4, 6, 8, 12, 18, 24, 36, ... nearly equal
    parts, largest first, down to the first one at or below ``floor``. Equal parts, not fixed powers of two: a
    fixed 8192-token FFN chunk over 2 x 4396 tokens (1024² with CFG) leaves a 600-token tail, a
    whole extra pass over the FFN weights for 7 % of the tokens, with GEMMs too small to fill
    the GPU; two 4480-token halves need less memory than the 8192 chunk."""
    out: list[int] = []
    parts = 2
    while True:
        size = -(-total // parts)
        size = -(-size // align) * align
        if size < total and size not in out:
            out.append(size)
        if size <= floor or parts >= total:
            return out
        # 2, 3, 4, then x1.5 from a multiple of 4, else x4/3: 6, 8, 12, 18, 24, 36, 54, 72, ...
        parts = parts + 1 if parts < 4 else parts * 3 // 2 if parts % 4 == 0 else parts * 4 // 3


# A slow link trades chunks for resident blocks only down to this many pieces per attention or
# FFN (planner.py says why): 12-piece chunks at 1024² with CFG ran up to 2.2x their projection.
TRANSFER_MAX_PIECES = 4


def transfer_chunks(candidates, batch: int, tokens: int) -> tuple[tuple[int | None, int | None], ...]:
    """The candidates whose attention (over ``tokens`` query rows) and FFN (over batch x tokens)
    split into at most TRANSFER_MAX_PIECES pieces."""
    def pieces(chunk: int | None, total: int) -> int:
        return 1 if chunk is None else -(-total // chunk)
    return tuple((a, f) for a, f in candidates
                 if pieces(a, tokens) <= TRANSFER_MAX_PIECES and pieces(f, batch * tokens) <= TRANSFER_MAX_PIECES)


@dataclass
class SampleResult:
    latent: torch.Tensor                      # raw latent (B, 16, H/8, W/8), float32, CPU
    plan: StagePlan
    step_seconds: list[float] = field(default_factory=list)


def chunk_candidates(memory: MemorySettings, batch: int, tokens: int) -> tuple[tuple[int | None, int | None], ...]:
    """The (attention query chunk, FFN token chunk) pairs the planner may pick from."""
    def options(setting: int, total: int, floor: int) -> list[int | None]:
        if setting < 0:
            return [None]
        if setting > 0:
            return [setting]
        return [None] + even_chunks(total, floor)
    attn = options(memory.attention_chunk, tokens, ATTN_CHUNK_FLOOR)
    ffn = options(memory.ffn_chunk, batch * tokens, FFN_CHUNK_FLOOR)
    return tuple((a, f) for a in attn for f in ffn)


# The live activations reserve more than the analytic sum of the largest tensors (estimate.py):
# the allocator's segments, inductor's buffers, cuDNN's workspace. So the estimate is the count
# times a factor per allocator (placement/allocator.py says how they differ). Measured on an
# H200 on 2026-12-03 with the in-place FFN (bench/activation_memory.py; 1024² CFG fp8 and Q4_K
# under 2 GB, bf16 resident, 512² CFG fp8 under 2 GB with CUDA graphs), every stage peak stayed
# under its prediction:
# native by 148-174 MiB at 1024² and 106 MiB at 512², expandable segments by 126-164 and 49,
# cudaMallocAsync by 156-218 at 1024² (its 512² graph row was not measured). The native factor
# was 1.9 on the old formula, which counted a third (tokens x ffn) tensor (1.38-1.79 needed then).
DIT_ACTIVATION_FACTOR = {Allocator.NATIVE: 2.1, Allocator.EXPANDABLE: 1.35, Allocator.ASYNC: 1.8}
# With CUDA graphs the blocks' temporaries live in the graph pool and the code between blocks
# (embedders, packing, RoPE tables, final layer) keeps its own cache beside it, plus one static
# copy of each block input. Measured on an H200 (eager vs graphs, same plan): +0.06 GiB at 512²
# without CFG, +0.26 GiB at 1024² with CFG; modelled as a constant plus a multiple of one
# joint-sequence activation (batch x tokens x dim), fitted on those two points.
GRAPH_FIXED_BYTES = 32 * 2**20
GRAPH_SEQUENCE_FACTOR = 7


# Above this many tokens per forward (batch x (caption + image)) a block keeps the GPU busier
# than it takes to launch, and graphs stop paying for their captures. Measured on an H200:
# 512² without CFG (1.3 k tokens) runs 40.5 ms per step with graphs, 70.2 ms without;
# 1024² with CFG (8.8 k tokens) gains 1.3 % per step but its 40 captures cost about 0.4 s.
GRAPH_TOKEN_LIMIT = 6144


def use_graphs(memory: MemorySettings, batch: int, tokens: int, device: torch.device) -> bool:
    """Whether the sampler replays blocks as CUDA graphs (``MemorySettings.cuda_graphs``)."""
    if device.type != "cuda":
        return False
    if memory.cuda_graphs is not None:
        return memory.cuda_graphs
    return batch * tokens <= GRAPH_TOKEN_LIMIT


def dit_activation_estimate(config: DiTConfig, batch: int, cap_tokens: int, image_tokens: int,
                            dtype: torch.dtype, device: torch.device,
                            graphs: bool = False, fp8_compute: bool = False,
                            allocator: Allocator = Allocator.NATIVE) -> Callable[[int | None, int | None], int]:
    kernel = AttentionKernel.FLASH if device.type == "cuda" else AttentionKernel.MATH
    latent = batch * config.in_channels * image_tokens * config.patch_size ** 2 * 4   # fp32 x, v, denoised
    sequence = batch * (cap_tokens + image_tokens) * config.dim * dtype.itemsize
    graph_extra = GRAPH_FIXED_BYTES + GRAPH_SEQUENCE_FACTOR * sequence if graphs and device.type == "cuda" else 0
    factor = DIT_ACTIVATION_FACTOR[allocator]

    def estimate(attn: int | None, ffn: int | None) -> int:
        act = estimate_activation_bytes(config, batch, cap_tokens, image_tokens, dtype, attn, ffn, kernel, fp8_compute)
        return int(factor * act) + 4 * latent + graph_extra
    return estimate


# How much of the square-matmul peak (placement.bandwidth.matmul_throughput) a whole forward
# reaches, measured on an H200 on 2026-12-02 at 1024² CFG: bf16 529 TFLOP/s against an 803 TFLOP/s
# probe; fp8 compute 634 against 1378 (attention, the elementwise kernels and, with fp8, the
# quantisers run below the peak). Dividing by the bare peak instead called the H200's own 1024²
# bf16 copies (3.2 ms a block against 3.1 ms of compute, hidden as measured) transfer-bound.
FORWARD_EFFICIENCY = {False: 0.66, True: 0.46}


def planning_link(memory: MemorySettings, device: torch.device) -> float:
    """The host -> GPU bytes/s plans assume: the user's ``link_gbps``, else this machine's,
    measured once and cached."""
    return memory.link_bytes_per_s or link_bandwidth(device)


def block_rates(config: DiTConfig, memory: MemorySettings, batch: int, tokens: int, dtype: torch.dtype,
                device: torch.device) -> tuple[float | None, float | None]:
    """This GPU's link (bytes/s; the user's ``link_gbps`` or measured once and cached) and one joint
    block's compute time (s) at this batch and sequence: the planner's time per forward and its
    order of sacrifices. None on the CPU, where nothing streams, or when a probe fails."""
    if device.type != "cuda":
        return None, None
    try:
        bandwidth = planning_link(memory, device)
        peak = matmul_throughput(device, torch.float8_e4m3fn if memory.fp8_compute else dtype)
    except RuntimeError as e:       # a failed probe (no room, no fp8 kernel) only costs the prediction
        log.warning("could not measure this GPU's link or matmul rate (%s); planning without them", e)
        return None, None
    return bandwidth, joint_block_flops(config, batch, tokens) / (peak * FORWARD_EFFICIENCY[memory.fp8_compute])


def _storage(handle: DiTHandle, memory: MemorySettings) -> StorageChoice:
    if handle.ckpt.is_packed:      # GGUF: the blocks stay in the file's quantised form
        return StorageChoice.PACKED
    return StorageChoice.FP8 if (memory.fp8_streaming or handle.storage is StorageDType.FP8) else StorageChoice.BF16


def load_non_blocks(handle: DiTHandle, model: NextDiT, device: torch.device, dtype: torch.dtype) -> None:
    """The DiT's tensors outside the blocks onto ``device``, with the LoRAs' patches of them
    (time_text_embed, clip_text_pooled_proj, ...); read from the file once per checkpoint."""
    _, non_block_patches = dit_patches(handle.loras, model, handle.ckpt.config, handle.param_patches)
    materialize_non_blocks(model, handle.ckpt.source, device, dtype, optional=lambda name, shape: torch.ones(shape),
                           patches=non_block_patches, host_copies=handle.ckpt.non_block_copies)


def plan_sampling(handle: DiTHandle, memory: MemorySettings, batch: int, cap_tokens: int,
                  width: int, height: int, device: torch.device, budget: int | None) -> tuple:
    """Build the meta model and its plan (no weights read). Returns (model, inputs, plan)."""
    config = handle.ckpt.config
    dtype = memory.torch_compute_dtype
    model = build_dit(config, "meta", dtype)
    model.set_kernels(kernels(memory.compile if device.type == "cuda" else False, memory.fp8_compute))
    image_tokens = (height // 16) * (width // 16)
    small = sum(p.numel() for _, p in non_block_parameters(model)) * dtype.itemsize
    # LoRA files are read (cached) and mapped here, before any DiT weight is read.
    patches, _ = dit_patches(handle.loras, model, config, handle.param_patches)
    if patches is not None:
        small += patches.device_bytes            # factors on the device + one application's temporaries
    tokens = cap_tokens + image_tokens
    graphs = use_graphs(memory, batch, tokens, device)
    candidates = chunk_candidates(memory, batch, tokens)
    bandwidth, block_compute_s = block_rates(config, memory, batch, tokens, dtype, device)
    allocator = active_allocator(device)
    inputs = PlacementInputs(
        stage="sample", files=tuple(handle.files), storage=_storage(handle, memory), compute_dtype=dtype,
        always_resident_bytes=small,
        activation_bytes=dit_activation_estimate(config, batch, cap_tokens, image_tokens, dtype, device, graphs,
                                                 memory.fp8_compute, allocator),
        chunk_candidates=candidates, transfer_chunks=transfer_chunks(candidates, batch, tokens), graphs=graphs,
        patches=patches, bandwidth=bandwidth, block_compute_s=block_compute_s, once=model.caption_blocks(),
        allocator=allocator.value if device.type == "cuda" else None)
    return model, inputs, plan_for(model, inputs, budget, handle.ckpt.source)


def run_sampling(handle: DiTHandle, positive: Conditioning, negative: Conditioning, raw_latent: torch.Tensor,
                 sampling: SamplingSettings, memory: MemorySettings, device: torch.device, report: Report,
                 budget: int | None, callback: StepCallback | None = None,
                 sigmas: torch.Tensor | None = None) -> SampleResult:
    """Sample a raw latent. ``raw_latent`` is the start (zeros for text-to-image, a VAE-encoded
    image for img2img with ``denoise < 1``); its shape fixes batch and size. ``sigmas`` (e.g. from a
    ComfyUI scheduler node) replaces the schedule built from steps, shift and denoise; a first
    sigma below 1 then re-noises the input latent that far, as img2img does."""
    b, c, h, w = raw_latent.shape
    width, height = w * 8, h * 8
    guided = sampling.cfg != 1.0
    batch = 2 * b if guided else b
    cap_tokens = max(positive.length, negative.length) if guided else positive.length

    def attempt(budget_now: int | None) -> SampleResult:
        model, inputs, plan = plan_sampling(handle, memory, batch, cap_tokens, width, height, device, budget_now)
        log.info("sampling plan:\n%s", plan.render())
        store_budget = dit_store_budget(handle, model, inputs, plan, memory, device)
        with stage_guard("sample", device) as guard, measure_stage(report, "sample", device, plan.predicted_peak) as rec:
            guard.on_release(lambda: model.to_empty(device="meta"))
            load_non_blocks(handle, model, device, inputs.compute_dtype)
            model.set_chunking(ActivationChunks(plan.attn_chunk, plan.ffn_chunk))
            with placed_blocks(model, handle.ckpt.source, inputs, plan, device, store_budget) as session:
                guard.hold(session)
                latent, steps = _sample_loop(model, positive, negative, raw_latent, sampling, device,
                                             inputs.compute_dtype, callback, sigmas)
            rec.bytes_h2d = session.bytes_h2d     # resident loads + streamed copies, complete once closed
            model.to_empty(device="meta")
        return SampleResult(latent, plan, steps)

    return run_with_oom_retry(attempt, budget, stage="sample", device=device)


def _sample_loop(model, positive: Conditioning, negative: Conditioning, raw_latent: torch.Tensor,
                 sampling: SamplingSettings, device: torch.device, dtype: torch.dtype,
                 callback: StepCallback | None, sigmas: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[float]]:
    """The sampler loop; returns the raw latent (CPU, fp32) and the per-step seconds. The caption
    refiners run once per conditioning (refined_caption.py), as the plan expects."""
    b = raw_latent.shape[0]
    pair = batch_conditionings([positive] * b + [negative] * b, device, dtype)
    single = batch_conditionings([positive] * b, device, dtype)
    captions = RefinedCaptions(model)

    def batched_model(x2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        return model(x2.to(dtype), t2, *pair, caption=captions(*pair[:2]))

    def single_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype), t, *single, caption=captions(*single[:2]))

    trunc = sampling.cfg_trunc if sampling.cfg_trunc < 1.0 else None
    velocity = GuidedVelocity(batched_model, single_model,
                              GuidanceConfig(scale=sampling.cfg, renorm=sampling.cfg_renorm, trunc=trunc))
    if sigmas is None:
        sigmas = flow_sigmas(sampling.steps, sampling.shift, sampling.denoise)
        partial = sampling.denoise < 1.0
    else:
        sigmas = sigmas.detach().float().cpu()
        partial = float(sigmas[0]) < 1.0
    noise = initial_noise(sampling.seed, tuple(raw_latent.shape)).to(device)
    x0 = normalize_latent(raw_latent.to(device=device, dtype=torch.float32))
    x = noise_latent(x0, noise, float(sigmas[0])) if partial else noise

    clock = _StepClock(device)

    def on_step(i: int, n: int, x_now: torch.Tensor, denoised: torch.Tensor) -> None:
        clock.mark()
        if callback is not None:
            callback(i, n, x_now, denoised)

    with torch.inference_mode():
        clock.mark()
        out = sample(sampling.sampler, velocity, x, sigmas, callback=on_step)
    latent = denormalize_latent(out.float()).cpu()
    return latent, clock.intervals()


class _StepClock:
    """Per-step times without a host sync in the loop: CUDA events, read once at the end.

    A mark is set before sampling and at each step's callback, which fires once the step's
    (first) model call is done, so consecutive marks bracket one step's model work.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def dit_store_budget(handle: DiTHandle, model, inputs: PlacementInputs, plan: StagePlan, memory: MemorySettings,
                     device: torch.device) -> int | None:
    """The host cache's budget for the DiT stage; refuses (before reading) a RAM budget it cannot
    fit and evicts older copies (the encoders') to make room for its non-block weights."""
    extra = host_tensor_bytes(model, handle.ckpt.source, device, inputs.compute_dtype)
    store_budget = check_stage(host_model("sample", model, inputs, plan, handle.ckpt.source, extra_bytes=extra), memory,
                               device)
    HOST_CACHE.make_room(store_budget)
    return store_budget
