"""CPU tier: the pack's V1 node classes, called directly with the tiny checkpoints.

The pack is imported the way ComfyUI imports it (conftest.load_pack: the repo root as package
``newbie_lowvram_pack``), so its newbie_core is ``newbie_lowvram_pack.newbie_core``: counters
and caches are read from that copy. ComfyUI itself is replaced by the adapter's FallbackAdapter
pointed at the tiny model folders.

What the node test files (tests/test_nodes_*.py) share. The fixtures are module-scoped, as they
were in the one file these were split from; each test file imports them by name, so each file
gets its own adapter, handles and conditioning.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

PACK = "newbie_lowvram_pack"
XML = ("<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n</character_1>\n"
       "<general_tags>\n<count>1girl, solo</count>\n</general_tags>")


def _conftest():
    path = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == path)


@pytest.fixture(scope="module")
def pack():
    return _conftest().load_pack()


def mod(name: str):
    return importlib.import_module(f"{PACK}.{name}")


@pytest.fixture(scope="module")
def adapter(pack, tiny_dir):
    """The fallback adapter with ComfyUI's three model folders pointing at the tiny checkpoints."""
    ad = mod("nodes.comfy_adapter")
    fake = ad.FallbackAdapter({name: [tiny_dir / name] for name in ("diffusion_models", "text_encoders", "vae", "loras")})
    previous = ad.set_adapter(fake)
    yield fake
    ad.set_adapter(previous)


def call(cls, **inputs):
    """Run a node like the executor does; check the result has one value per RETURN_TYPES entry."""
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    result = out["result"] if isinstance(out, dict) else out
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), (cls.__name__, result)
    return out if isinstance(out, dict) else result


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models(nodes, adapter):
    dit, = call(nodes["NewBieDiTLoader"], dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16")
    te, = call(nodes["NewBieTextEncoderLoader"], gemma_name="gemma_3_4b_it_bf16.safetensors",
               jina_name="jina_clip_v2_bf16.safetensors", gemma_storage="bf16")
    vae, = call(nodes["NewBieVAELoader"], vae_name="ae.safetensors", dtype="fp32")
    return dit, te, vae


@pytest.fixture(scope="module")
def conds(nodes, models):
    return call(nodes["NewBieTextEncode"], text_encoders=models[1], positive=XML, negative="lowres", compat=False)


def sample(nodes, models, conds, latent, **kw):
    args = dict(dit=models[0], positive=conds[0], negative=conds[1], latent=latent, seed=1, steps=2, cfg=4.0,
                sampler="euler", shift=6.0, denoise=1.0)
    args.update(kw)
    return call(nodes["NewBieSampler"], **args)


def empty(nodes, w=32, h=32, batch=1):
    latent_mod = mod("nodes.latent_node")
    return call(nodes["NewBieEmptyLatent"], resolution=latent_mod.CUSTOM, width=w, height=h, batch_size=batch)[0]
