"""Command line: ``python -m newbie_core generate --prompt FILE_OR_TEXT --out out.png [...]``.

Without model paths it runs the embedded default: tiny random-weight checkpoints in the real
layouts, built once into the user cache dir. That exercises every code path in seconds on a CPU
(the image is noise-like, since the weights are random). With paths it runs the real model.

Examples::

    python -m newbie_core generate --prompt "1girl, solo, smile" --out out.png --size 512x512 --steps 8
    python -m newbie_core generate --prompt prompt.xml --out out.png --dit models/NewBie-Image-Exp0.1-bf16.safetensors \\
        --gemma gemma_3_4b_it_bf16.safetensors --jina jina_clip_v2_bf16.safetensors --vae ae.safetensors \\
        --vram-budget 6 --plan
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .models.checkpoint import CheckpointError
from .pipeline import (GenerationRequest, MemorySettings, Models, SamplingSettings, StorageDType, default_device,
                       describe_plan, generate, load_dit_handle, load_text_encoder_handle, load_vae_handle)
from .placement import BudgetTooSmallError, PlacementOOMError
from .prompt import PromptSyntaxError
from .sampling import parse_size, round_up_size, sampler_names, validate_size

log = logging.getLogger("newbie_core.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m newbie_core", description="NewBie-image-Exp0.1 on small GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text (or image) to image")
    g.add_argument("--prompt", required=True, help="prompt text, or a file holding it (XML or plain text)")
    g.add_argument("--out", required=True, help="output PNG path")
    g.add_argument("--negative", default="", help="negative prompt (default empty, as the official demo)")
    g.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 16 px (default 1024x1024)")
    g.add_argument("--round-up", action="store_true", help="round a size that is not a multiple of 16 up")
    g.add_argument("--steps", type=int, default=28)
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--shift", type=float, default=6.0)
    g.add_argument("--sampler", default="euler", choices=sampler_names())
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--denoise", type=float, default=1.0, help="< 1 with --init-image for img2img")
    g.add_argument("--init-image", help="PNG to start from (img2img)")
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
        g.add_argument(f"--{name}", help=f"path of the {name} checkpoint (file or HF folder)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8"],
                   help="DiT: bf16 (default), fp16 compute, or fp8 weight storage with bf16 compute")
    g.add_argument("--vram-budget", type=float, help="GB of VRAM each stage may reserve (default: free minus margin)")
    g.add_argument("--ram-budget", type=float, help="GB of host RAM for cached model copies (default: no limit)")
    g.add_argument("--attention-chunk", type=int, default=0, help="query rows per attention chunk (0 auto, -1 off)")
    g.add_argument("--ffn-chunk", type=int, default=0, help="tokens per FFN chunk (0 auto, -1 off)")
    g.add_argument("--vae-tile", type=int, default=0, help="VAE tile in px (0 auto from the budget, -1 never)")
    g.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay DiT blocks as CUDA graphs (auto: where kernel launches bound a step)")
    g.add_argument("--cache-dir", help="also keep encoded prompts in this folder, so later runs skip the encoders")
    g.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    g.add_argument("-v", "--verbose", action="store_true")
    return parser


def _models(args: argparse.Namespace) -> Models:
    paths = [args.dit, args.gemma, args.jina, args.vae]
    if not any(paths):
        from .tiny import default_tiny_checkpoints
        tiny = default_tiny_checkpoints()
        log.warning("no model paths given: using the embedded tiny random-weight checkpoints in %s "
                    "(the image will be noise; pass --dit/--gemma/--jina/--vae for the real model)", tiny.root)
        paths = [tiny.dit, tiny.gemma, tiny.jina, tiny.vae]
    elif not all(paths):
        missing = [f"--{n}" for n, p in zip(("dit", "gemma", "jina", "vae"), paths) if not p]
        raise CheckpointError(f"give all four model paths or none; missing {', '.join(missing)}.")
    storage = StorageDType.FP8 if args.dtype == "fp8" else StorageDType.BF16
    return Models(load_dit_handle(paths[0], storage), load_text_encoder_handle(paths[1], paths[2]),
                  load_vae_handle(paths[3]))


def _request(args: argparse.Namespace) -> GenerationRequest:
    prompt_path = Path(args.prompt)
    prompt = prompt_path.read_text(encoding="utf-8") if prompt_path.is_file() else args.prompt
    width, height = parse_size(args.size)
    width, height = round_up_size(width, height) if args.round_up else validate_size(width, height)
    memory = MemorySettings(vram_budget_gb=args.vram_budget, ram_budget_gb=args.ram_budget,
                            attention_chunk=args.attention_chunk, ffn_chunk=args.ffn_chunk,
                            compute_dtype="fp16" if args.dtype == "fp16" else "bf16", vae_tile_px=args.vae_tile,
                            conditioning_cache_dir=args.cache_dir,
                            cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs])
    sampling = SamplingSettings(steps=args.steps, cfg=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed,
                                denoise=args.denoise, cfg_renorm=args.cfg_renorm, cfg_trunc=args.cfg_trunc)
    init = None
    if args.init_image:
        pixels = np.asarray(Image.open(args.init_image).convert("RGB"), dtype=np.float32) / 255.0
        init = torch.from_numpy(pixels)[None]                                  # (1, H, W, 3)
        if not args.size or (width, height) != (init.shape[2], init.shape[1]):
            width, height = validate_size(init.shape[2], init.shape[1], round_up=args.round_up)
    elif args.denoise < 1.0:
        raise ValueError("--denoise below 1 needs --init-image (there is nothing to keep otherwise).")
    return GenerationRequest(prompt=prompt, negative=args.negative, width=width, height=height, sampling=sampling,
                             memory=memory, compat=args.compat, init_image=init,
                             weighting=args.weighting, system_prompt=args.system_prompt)


def run_generate(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else default_device()
    models = _models(args)
    request = _request(args)
    if args.plan:
        print(describe_plan(models, request, device))
        return 0
    bar = tqdm(total=request.sampling.steps, desc="sampling", unit="step")

    def progress(i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        bar.update(1)

    try:
        result = generate(models, request, device, callback=progress)
    finally:
        bar.close()
    image = (result.image[0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(args.out)
    steps = result.step_seconds[1:] or result.step_seconds
    print(result.report.render())
    if steps:
        print(f"sampling: {sum(steps) / len(steps):.3f} s/step (mean over steps after the first)")
    print(f"wrote {args.out} ({request.width}x{request.height})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("newbie_core").setLevel(logging.INFO)
    try:
        return run_generate(args)
    except (CheckpointError, PromptSyntaxError, BudgetTooSmallError, PlacementOOMError, ValueError,
            FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
