"""One whole generation, staged the classic way: encode, release; sample, release; decode.

Each stage plans for the budget that is free when it starts, so the encoders' memory is back
before the DiT loads and the DiT's before the VAE decodes. The CLI calls :func:`generate`; the
ComfyUI nodes call the same stage functions one node at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..placement import BudgetTooSmallError, Report, StagePlan, active_allocator, auto_budget
from ..prompt import AUTO_SYSTEM_PROMPT, EncoderTexts, WeightingMode, prepare_weighted_texts
from ..sampling import validate_size
from .encode import ENCODER_DTYPE, encode_texts, plan_gemma, plan_jina
from .handles import DiTHandle, TextEncoderHandle, VaeHandle
from ..placement.host_budget import HostPlan
from .host_ram import describe_host, host_model, host_tensor_bytes
from .sample import StepCallback, plan_sampling, planning_link, run_sampling
from .settings import MemorySettings, SamplingSettings
from .vae_stage import decode_latent, encode_image, plan_vae, vae_host_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Models:
    dit: DiTHandle
    encoders: TextEncoderHandle
    vae: VaeHandle


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    batch: int = 1
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    compat: bool = False
    init_image: torch.Tensor | None = None    # IMAGE (1, H, W, 3) in [0, 1], for img2img
    weighting: str = WeightingMode.OFFICIAL.value     # prompt weighting syntax: "official" or "off"
    system_prompt: str = AUTO_SYSTEM_PROMPT           # "auto" = training prefix, "" = none

    def __post_init__(self) -> None:
        validate_size(self.width, self.height)
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}.")


@dataclass
class GenerationResult:
    image: torch.Tensor                        # IMAGE (B, H, W, 3) float32 in [0, 1], CPU
    latent: torch.Tensor                       # raw latent (B, 16, H/8, W/8), CPU
    report: Report
    step_seconds: list[float]
    sample_plan: StagePlan | None = None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def stage_budget(memory: MemorySettings, device: torch.device) -> int | None:
    """The budget for the stage about to start: the user's, or what is free now (auto).

    On the CPU there is nothing to budget unless one is given (tests do, to exercise streaming)."""
    if memory.vram_budget_bytes is not None:
        return memory.vram_budget_bytes
    return auto_budget(device) if device.type == "cuda" else None


def generate(models: Models, request: GenerationRequest, device: torch.device | None = None,
             callback: StepCallback | None = None) -> GenerationResult:
    device = device or default_device()
    memory = request.memory
    texts, weights = prepare_weighted_texts(request.prompt, request.negative, compat=request.compat,
                                            weighting=request.weighting, system_prompt=request.system_prompt)
    report = Report()
    plan = host_plan(models, request, device)     # refuses a RAM budget the run cannot fit, before reading
    log.info("host RAM plan:\n%s", plan.render())
    log.info("encoding the prompt (Gemma 3 + Jina CLIP v2)")
    pos, neg = encode_texts(models.encoders, texts, memory, device, report, stage_budget(memory, device),
                            weights=weights)
    raw = start_latent(models.vae, request, device, report)
    log.info("sampling %d steps at %dx%d (%s, cfg %g)", request.sampling.steps, request.width, request.height,
             request.sampling.sampler, request.sampling.cfg)
    result = run_sampling(models.dit, pos, neg, raw, request.sampling, memory, device, report,
                          stage_budget(memory, device), callback)
    log.info("decoding with the VAE")
    image = decode_latent(models.vae, result.latent, memory, device, report, stage_budget(memory, device))
    return GenerationResult(image, result.latent, report, result.step_seconds, result.plan)


def start_latent(vae: VaeHandle, request: GenerationRequest, device: torch.device, report: Report) -> torch.Tensor:
    """Zeros for text-to-image (the noise replaces them at denoise 1), the encoded image for img2img."""
    if request.init_image is None:
        return torch.zeros(request.batch, 16, request.height // 8, request.width // 8)
    image = request.init_image
    if tuple(image.shape[1:3]) != (request.height, request.width):
        raise ValueError(f"the init image is {image.shape[2]}x{image.shape[1]} but the requested size is "
                         f"{request.width}x{request.height}; give --size to match the image.")
    log.info("encoding the init image with the VAE")
    raw = encode_image(vae, image, request.memory, device, report, stage_budget(request.memory, device))
    return raw.expand(request.batch, -1, -1, -1).contiguous()


def _stage_plans(models: Models, request: GenerationRequest, device: torch.device, budget: int | None):
    """Every stage's plan and its host-RAM needs, from the analytic model alone: nothing is read."""
    memory = request.memory
    texts: EncoderTexts = prepare_weighted_texts(request.prompt, request.negative, compat=request.compat,
                                                 weighting=request.weighting,
                                                 system_prompt=request.system_prompt)[0]
    enc = models.encoders
    g_model, g_inputs, gemma, gemma_tokens = plan_gemma(enc, [texts.gemma_pos, texts.gemma_neg], memory, budget)
    j_model, j_inputs, jina, _ = plan_jina(enc, [texts.jina_pos, texts.jina_neg], memory, budget)
    cap = int(gemma_tokens.attention_mask.sum(1).max())
    guided = request.sampling.cfg != 1.0
    batch = request.batch * (2 if guided else 1)
    d_model, d_inputs, plan = plan_sampling(models.dit, memory, batch, cap, request.width, request.height, device,
                                            budget)
    vae = plan_vae(models.vae, memory, request.batch, request.height // 8, request.width // 8, budget, device)
    # Host tensors beside the blocks: each encoder's embedding table (and on the CPU every
    # non-block weight) stays in host RAM while its stage runs; the VAE's weights pass through it.
    dit_src = models.dit.ckpt.source
    host = [host_model("encode:gemma", g_model, g_inputs, gemma, enc.gemma.source, extra_bytes=host_tensor_bytes(
                g_model, enc.gemma.source, device, ENCODER_DTYPE, ("model.embed_tokens.",))),
            host_model("encode:jina", j_model, j_inputs, jina, enc.jina.source, extra_bytes=host_tensor_bytes(
                j_model, enc.jina.source, device, ENCODER_DTYPE, ("embeddings.word_embeddings.",))),
            host_model("sample", d_model, d_inputs, plan, dit_src, forwards_per_step=1,
                       extra_bytes=host_tensor_bytes(d_model, dit_src, device, d_inputs.compute_dtype))]
    if request.init_image is not None:
        host.insert(0, vae_host_model(models.vae, device))
    host.append(vae_host_model(models.vae, device))
    return budget, [gemma, jina, plan, vae], host


def host_plan(models: Models, request: GenerationRequest, device: torch.device | None = None) -> HostPlan:
    """The whole generation's host-RAM plan; raises HostBudgetTooSmallError, naming --ram-budget
    and the node widget, when the budget cannot hold it (before any weights are read)."""
    device = device or default_device()
    try:
        host = _stage_plans(models, request, device, stage_budget(request.memory, device))[2]
    except BudgetTooSmallError:
        # The VRAM budget now is not the one each stage will get (and a cached prompt skips the
        # encoders): the host copies are sized without it, which holds every block's storage.
        host = _stage_plans(models, request, device, None)[2]
    return describe_host(host, request.memory, device)


def describe_plan(models: Models, request: GenerationRequest, device: torch.device | None = None) -> str:
    """Every stage's plan, from the analytic model alone: nothing is loaded or run."""
    device = device or default_device()
    budget, stages, host = _stage_plans(models, request, device, stage_budget(request.memory, device))
    link = disk = None
    if device.type == "cuda":     # the roofline from this machine's measured bandwidths (cached)
        from ..placement.bandwidth import disk_bandwidth
        link, disk = planning_link(request.memory, device), disk_bandwidth(models.dit.files[0])
    given = request.memory.link_gbps is not None
    parts = [p.render() for p in stages] + [describe_host(host, request.memory, device).render(link, disk, given)]
    header = f"device {device}, VRAM budget " + ("none (CPU)" if budget is None else f"{budget / 2**30:.2f} GiB")
    if device.type == "cuda":     # its fragmentation is part of the activation estimates (placement/allocator.py)
        header += f", allocator {active_allocator(device).value}"
    return "\n\n".join([header] + parts)
