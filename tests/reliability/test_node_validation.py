"""Issue 11: ComfyUI rejects bad widget values when the prompt is queued (VALIDATE_INPUTS), naming the widget."""

from __future__ import annotations

import inspect

import pytest

from conftest import load_pack


@pytest.fixture(scope="module")
def nodes():
    pack = load_pack()
    return pack.NODE_CLASS_MAPPINGS


def _cls(nodes, title_part):
    return next(c for c in nodes.values() if title_part in c.TITLE)


def test_empty_latent_width_1000_is_refused_at_queue_time(nodes):
    latent = _cls(nodes, "Empty Latent")
    from newbie_lowvram_pack.nodes.latent_node import CUSTOM
    msg = latent.VALIDATE_INPUTS(resolution=CUSTOM, width=1000, height=1024, batch_size=1)
    assert isinstance(msg, str) and msg.startswith("width: ") and "992x1024" in msg
    assert latent.VALIDATE_INPUTS(resolution=CUSTOM, width=1024, height=1000, batch_size=1).startswith("height: ")
    assert latent.VALIDATE_INPUTS(resolution=CUSTOM, width=1024, height=1536, batch_size=1) is True
    assert latent.VALIDATE_INPUTS(resolution=CUSTOM, width=1024, height=1024, batch_size=0).startswith("batch_size:")
    preset = latent.INPUT_TYPES()["required"]["resolution"][0][0]
    assert latent.VALIDATE_INPUTS(resolution=preset, width=1000, height=1000, batch_size=1) is True   # unused widgets


def test_sampler_widgets(nodes):
    sampler = _cls(nodes, "Sampler")
    ok = dict(seed=0, steps=28, cfg=5.0, sampler="euler", shift=6.0, denoise=1.0, vram_budget_gb=0.0)
    assert sampler.VALIDATE_INPUTS(**ok) is True
    for bad, widget in (({"steps": 0}, "steps"), ({"steps": 500}, "steps"), ({"denoise": 0.0}, "denoise"),
                        ({"cfg": float("nan")}, "cfg"), ({"sampler": "ddim"}, "sampler"),
                        ({"vram_budget_gb": -1.0}, "vram_budget_gb"), ({"seed": -3}, "seed")):
        msg = sampler.VALIDATE_INPUTS(**{**ok, **bad})
        assert isinstance(msg, str) and msg.startswith(widget + ":"), (bad, msg)
    assert sampler.VALIDATE_INPUTS(**{**ok, "steps": None, "seed": None}) is True      # linked inputs


def test_settings_and_encode_widgets(nodes):
    settings = _cls(nodes, "Memory Settings")
    assert settings.VALIDATE_INPUTS(vram_budget_gb=0.0, ram_budget_gb=0.0, vae_tile=512) is True
    assert settings.VALIDATE_INPUTS(vram_budget_gb=0.0, ram_budget_gb=0.0, vae_tile=64).startswith("vae_tile:")
    assert settings.VALIDATE_INPUTS(vram_budget_gb=999.0, ram_budget_gb=0.0, vae_tile=0).startswith("vram_budget_gb:")
    encode = next(c for c in nodes.values() if hasattr(c, "VALIDATE_INPUTS") and
                  "positive" in inspect.signature(c.VALIDATE_INPUTS).parameters)
    assert encode.VALIDATE_INPUTS(positive="1girl", negative="", vram_budget_gb=0.0) is True
    assert encode.VALIDATE_INPUTS(positive="  ", negative="", vram_budget_gb=0.0).startswith("positive: is empty")
    msg = encode.VALIDATE_INPUTS(positive="<caption>a</caption", negative="", vram_budget_gb=0.0)
    assert "line 1, column 20" in msg and "missing its closing '>'" in msg
    assert encode.VALIDATE_INPUTS(positive=None, negative=None, vram_budget_gb=0.0) is True


def test_validate_inputs_parameters_are_real_widgets(nodes):
    """A VALIDATE_INPUTS parameter that names no input would never be filled by ComfyUI."""
    for cls in nodes.values():
        if not hasattr(cls, "VALIDATE_INPUTS"):
            continue
        spec = cls.INPUT_TYPES()
        widgets = set(spec.get("required", {})) | set(spec.get("optional", {}))
        params = set(inspect.signature(cls.VALIDATE_INPUTS).parameters)
        assert params <= widgets, (cls.__name__, params - widgets)
