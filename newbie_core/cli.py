"""Command line: ``python -m newbie_core generate --prompt FILE_OR_TEXT --out out.png [...]``.

Without model paths it runs the embedded default: tiny random-weight checkpoints in the real
layouts, built once into the user cache dir. That exercises every code path in seconds on a CPU
(the image is noise-like, since the weights are random). With paths it runs the real model.

Examples::

    python -m newbie_core generate --prompt "1girl, solo, smile" --out out.png --size 512x512 --steps 8
    python -m newbie_core generate --prompt prompt.xml --out out.png --dit models/NewBie-Image-Exp0.1-bf16.safetensors \\
        --gemma gemma_3_4b_it_bf16.safetensors --jina jina_clip_v2_bf16.safetensors --vae ae.safetensors \\
        --vram-budget 6 --plan
    newbie-generate --prompt "1girl" --out out.png       # the console script: the same, without 'generate'

Order of work: parse, check every input (no torch, no weights), then import the heavy modules,
open the model headers, check that the size fits, and only then read weights. Exit status: 0
done, 2 bad input (one message, no traceback), 1 a run that failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import validate as v

log = logging.getLogger("newbie_core.cli")
STAGE_LOGGERS = ("newbie_core.cli", "newbie_core.pipeline.generate")
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m newbie_core", description="NewBie-image-Exp0.1 on small GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text (or image) to image")
    add_generate_arguments(g)
    return parser


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--prompt", required=True, help="prompt text, or an existing file holding it (XML or plain text)")
    g.add_argument("--out", required=True, help="output image path (.png, .jpg, .webp, ...)")
    g.add_argument("--negative", default="", help="negative prompt (default empty, as the official demo)")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 px (default 1024x1024, or the "
                                                 "init image's size)")
    g.add_argument("--round-up", action="store_true", help="round a size that is not a multiple of 16 up")
    g.add_argument("--steps", type=int, default=28)
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--shift", type=float, default=6.0)
    g.add_argument("--sampler", default="euler", choices=v.SAMPLER_CHOICES)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--denoise", type=float, default=1.0, help="< 1 with --init-image for img2img")
    g.add_argument("--init-image", help="image to start from (img2img)")
    g.add_argument("--cfg-renorm", type=float, default=0.0, help="official CFG renormalisation (0 = off)")
    g.add_argument("--cfg-trunc", type=float, default=1.0, help="CFG only while t < this (1 = always)")
    g.add_argument("--compat", action="store_true", help="send Jina the same text as Gemma, as ComfyUI does")
    g.add_argument("--weighting", choices=["official", "off"], default="official",
                   help="prompt weighting syntax (text:1.2), (text), [text], {text}, \\( as the official NewBie "
                        "nodes read it (default), or off: the prompt goes to the encoders verbatim")
    g.add_argument("--system-prompt", default="auto", metavar="TEXT",
                   help="'auto' (default): the training prefix; '' for none (the official node's default); "
                        "any other text is put in front of both prompts")
    for name in ("dit", "gemma", "jina", "vae"):
        g.add_argument(f"--{name}", help=f"path of the {name} checkpoint (.safetensors file or HF folder"
                       + ("; .gguf files too" if name in ("dit", "gemma") else "") + ")")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a DiT LoRA (.safetensors; PEFT, kohya, LyCORIS LoKr/LoHa); repeatable; strength 1 = "
                        "the trained scale")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8"],
                   help="bf16 (default), fp16 DiT compute, or fp8 weight storage for the DiT and Gemma "
                        "with bf16 compute")
    g.add_argument("--vram-budget", type=float, help="GiB of VRAM each stage may reserve (default: free minus margin)")
    g.add_argument("--ram-budget", type=float, help="GiB of host RAM for the models' host copies (default: auto = "
                                                    "available RAM minus a margin, stated by --plan)")
    g.add_argument("--attention-chunk", type=int, default=0, help="query rows per attention chunk (0 auto, -1 off)")
    g.add_argument("--ffn-chunk", type=int, default=0, help="tokens per FFN chunk (0 auto, -1 off)")
    g.add_argument("--vae-tile", type=int, default=0, help="VAE tile in px, a multiple of 8 (0 auto, -1 never)")
    g.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay DiT blocks as CUDA graphs (auto: where kernel launches bound a step)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the DiT's norms, RoPE, gates and SwiGLU with torch.compile (auto: on a CUDA GPU "
                        "with Triton; the first run compiles, later runs read the on-disk cache)")
    g.add_argument("--fp8-compute", action="store_true",
                   help="run the DiT's big matmuls in fp8 (e4m3, scaled) on Ada/Hopper GPUs: faster, slightly "
                        "different images (BENCHMARKS.md gives the drift); off by default")
    g.add_argument("--link-gbps", type=float, metavar="GBPS",
                   help="host->GPU link in GB/s for planning; default: measured once on this machine and cached")
    g.add_argument("--cache-dir", help="also keep encoded prompts in this folder, so later runs skip the encoders")
    g.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    loud = g.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also show each stage's plan and loader details")
    loud.add_argument("-q", "--quiet", action="store_true", help="show only errors")


@dataclass(frozen=True)
class CheckedArgs:
    """The inputs after :func:`check_args`: every value known good, in the units the library takes."""
    prompt: str
    negative: str
    size: tuple[int, int] | None       # None: the init image's size
    out: Path
    init_image: Path | None
    model_paths: tuple[str, str, str, str] | None
    vram_budget: float | None
    ram_budget: float | None
    cache_dir: Path | None
    link_gbps: float | None = None     # None: the measured link


def check_args(args: argparse.Namespace) -> CheckedArgs:
    """Every check that needs no torch and reads no weights; raises InputError/PromptSyntaxError."""
    prompt = v.check_prompt(v.prompt_text(args.prompt, "--prompt"), "--prompt")
    negative = v.check_prompt(v.prompt_text(args.negative, "--negative") if args.negative else "", "--negative",
                              allow_empty=True)
    size = None
    if args.size is not None or not args.init_image:
        size = v.check_size_text(args.size or "1024x1024", round_up=args.round_up, field="--size")
    out = v.check_output_path(args.out, "--out")
    init = v.check_image_file(args.init_image, "--init-image") if args.init_image else None
    if init is None and args.denoise < 1.0:
        raise v.InputError("--denoise", "below 1 needs --init-image (there is nothing to keep otherwise).")
    v.check_sampling(steps=args.steps, cfg=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed,
                     denoise=args.denoise, cfg_renorm=args.cfg_renorm, cfg_trunc=args.cfg_trunc,
                     names={k: "--" + k.replace("_", "-") for k in ("steps", "cfg", "shift", "sampler", "seed",
                                                                     "denoise", "cfg_renorm", "cfg_trunc")})
    vram = v.check_budget(args.vram_budget, "--vram-budget")
    ram = v.check_budget(args.ram_budget, "--ram-budget")
    v.check_chunk(args.attention_chunk, "--attention-chunk")
    v.check_chunk(args.ffn_chunk, "--ffn-chunk")
    v.check_vae_tile(args.vae_tile, "--vae-tile")
    cache = v.check_folder(args.cache_dir, "--cache-dir") if args.cache_dir else None
    link = v.check_link_gbps(args.link_gbps, "--link-gbps")
    for lora in args.lora:
        v.check_lora(lora)
    paths = (args.dit, args.gemma, args.jina, args.vae)
    models = None
    if any(paths):
        missing = [f"--{n}" for n, p in zip(("dit", "gemma", "jina", "vae"), paths) if not p]
        if missing:
            raise v.InputError(missing[0], f"give all four model paths or none; missing {', '.join(missing)}.")
        models = tuple(str(v.check_model_path(p, f"--{n}")) for n, p in zip(("dit", "gemma", "jina", "vae"), paths))
    return CheckedArgs(prompt, negative, size, out, init, models, vram, ram, cache, link)



def _models(args: argparse.Namespace, checked: CheckedArgs):
    from .pipeline import Models, StorageDType, load_dit_handle, load_text_encoder_handle, load_vae_handle

    paths = checked.model_paths
    if paths is None:
        from .tiny import default_tiny_checkpoints
        tiny = default_tiny_checkpoints()
        log.warning("no model paths given: using the embedded tiny random-weight checkpoints in %s. "
                    "THE IMAGE WILL BE NOISE; pass --dit/--gemma/--jina/--vae for the real model.", tiny.root)
        paths = (tiny.dit, tiny.gemma, tiny.jina, tiny.vae)
    storage = StorageDType.FP8 if args.dtype == "fp8" else StorageDType.BF16
    from .models.lora import LoraSpec

    dit = load_dit_handle(paths[0], storage)
    for text in args.lora:
        spec = LoraSpec.parse(text)
        dit = dit.with_lora(spec.path, spec.strength)
    return Models(dit, load_text_encoder_handle(paths[1], paths[2], storage), load_vae_handle(paths[3]))


def _read_init_image(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]                                  # (1, H, W, 3)


def _request(args: argparse.Namespace, checked: CheckedArgs):
    from .pipeline import GenerationRequest, MemorySettings, SamplingSettings

    memory = MemorySettings(vram_budget_gb=checked.vram_budget, ram_budget_gb=checked.ram_budget,
                            attention_chunk=args.attention_chunk, ffn_chunk=args.ffn_chunk,
                            compute_dtype="fp16" if args.dtype == "fp16" else "bf16", vae_tile_px=args.vae_tile,
                            conditioning_cache_dir=str(checked.cache_dir) if checked.cache_dir else None,
                            cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                            compile={"auto": None, "on": True, "off": False}[args.compile],
                            fp8_compute=args.fp8_compute, link_gbps=checked.link_gbps)
    sampling = SamplingSettings(steps=args.steps, cfg=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed,
                                denoise=args.denoise, cfg_renorm=args.cfg_renorm, cfg_trunc=args.cfg_trunc)
    init = None
    width, height = checked.size or (0, 0)
    if checked.init_image is not None:
        init = _read_init_image(checked.init_image)
        ih, iw = int(init.shape[1]), int(init.shape[2])
        if checked.size is None:
            width, height = v.check_size(iw, ih, round_up=args.round_up, fields=("--init-image", "--init-image"))
        if (iw, ih) != (width, height):
            raise v.InputError("--init-image", f"the image is {iw}x{ih} but the size is {width}x{height}; resize "
                                               "the image or give --size to match it.")
    return GenerationRequest(prompt=checked.prompt, negative=checked.negative, width=width, height=height,
                             sampling=sampling, memory=memory, compat=args.compat, init_image=init,
                             weighting=args.weighting, system_prompt=args.system_prompt)


def save_image_atomic(image, out: Path) -> None:
    """Write next to ``out`` first and rename, so a full disk never leaves half an image behind."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        Image.fromarray(image).save(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_generate(args: argparse.Namespace, checked: CheckedArgs) -> int:
    import numpy as np
    from tqdm import tqdm

    from .pipeline import describe_plan, generate, stage_budget
    from .pipeline.fit import check_size_fits
    from .placement import use_expandable_segments

    # before the first CUDA allocation; PYTORCH_CUDA_ALLOC_CONF, when set, is the user's choice
    use_expandable_segments()
    device = v.check_device(args.device, "--device")
    if args.fp8_compute:
        v.check_fp8_compute(device, "--fp8-compute")
    models = _models(args, checked)
    request = _request(args, checked)
    check_size_fits(models, request, device, stage_budget(request.memory, device))
    if args.plan:
        print(describe_plan(models, request, device))
        return 0
    bars: list = []      # made at the first step, so the encode stage's line comes before the bar

    def progress(i: int, n: int, x, denoised) -> None:
        if not bars:
            bars.append(tqdm(total=request.sampling.steps, desc="sampling", unit="step", disable=args.quiet,
                             leave=False))
        bars[0].update(1)

    try:
        result = generate(models, request, device, callback=progress)
    finally:
        for bar in bars:
            bar.close()
    image = (result.image[0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    save_image_atomic(image, checked.out)
    if not args.quiet:
        steps = result.step_seconds[1:] or result.step_seconds
        print(result.report.render())
        if steps:
            print(f"sampling: {sum(steps) / len(steps):.3f} s/step (mean over steps after the first)")
        print(f"wrote {checked.out} ({request.width}x{request.height})")
    return 0


class _StageFormatter(logging.Formatter):
    """Stage lines plain, warnings and errors with a prefix that stands out."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"WARNING: {msg}"
        return msg if record.name in STAGE_LOGGERS else f"  {record.name.removeprefix('newbie_core.')}: {msg}"


class _TqdmHandler(logging.StreamHandler):
    """Writes above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:   # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(verbose: bool = False, quiet: bool = False) -> logging.Handler:
    """The CLI's handler on the ``newbie_core`` logger (the library itself configures none):
    default: stage lines and warnings; ``-v``: plans and loader details too; ``-q``: errors only."""
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(_StageFormatter())
    root = logging.getLogger("newbie_core")
    for old in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    for name in STAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    return handler


def _describe_failure(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full ({e.filename or 'while writing'}); nothing half-written was left. Free some space."
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return f"{e}" if type(e).__name__ in ("PlacementOOMError",) else f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def generate_main(argv: list[str] | None = None) -> int:
    """The ``newbie-generate`` console script: ``generate`` without the subcommand word."""
    parser = argparse.ArgumentParser(prog="newbie-generate", description="NewBie-image-Exp0.1 text (or image) "
                                                                         "to image on small GPUs.")
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "generate"
    return run(args)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose, args.quiet)
    try:
        checked = check_args(args)
        return run_generate(args, checked)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:   # noqa: BLE001 - the user gets one message, never a traceback
        if isinstance(e, ValueError):   # InputError, CheckpointError, PromptSyntaxError, BudgetTooSmallError, ...
            log.error("%s", e)
            return EXIT_BAD_INPUT
        log.error("%s", _describe_failure(e), exc_info=args.verbose)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
