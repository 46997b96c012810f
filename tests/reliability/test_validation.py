"""Issue 11, item 1: every bad input gets one message in the user's units, exit 2, before any weights.

"Before any weights" is checked directly: the checkpoint reader is replaced by one that fails,
so a check that came late would show that failure instead of its own message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from newbie_core import validate as v
from newbie_core.prompt import PromptSyntaxError, parse_prompt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def no_weights(monkeypatch):
    """Any weight read fails loudly: the checks must all come before it."""
    from newbie_core.models import checkpoint

    def refuse(self, raw_key):
        raise AssertionError(f"weights were read ({raw_key}) before the inputs were checked")
    monkeypatch.setattr(checkpoint.TensorSource, "_get_raw", refuse)


BAD = [
    (["--out", "o"], "--out: 'o' has no image extension"),
    (["--size", "100000x100000"], "--size: 100000 px is beyond the model's position range: the largest side is 8192"),
    (["--size", "0x0", "--round-up"], "--size: must be at least 16 px, got 0"),
    (["--size", "1000x1000"], "Nearest valid sizes: 992x992 (rounded down) or 1008x1008"),
    (["--size", "1024"], "--size: '1024' is not WIDTHxHEIGHT"),
    (["--vae-tile", "17"], "--vae-tile: 17 px is not a usable tile: give a multiple of 8 px of at least 128"),
    (["--steps", "0"], "--steps: must be a whole number from 1 to 1000"),
    (["--cfg", "nan"], "--cfg: must be a finite number"),
    (["--shift", "0"], "--shift: must be above 0"),
    (["--denoise", "0.5"], "--denoise: below 1 needs --init-image"),
    (["--vram-budget", "-1"], "--vram-budget: must be a positive number of GiB"),
    (["--ram-budget", "inf"], "--ram-budget: must be a finite number"),
    (["--attention-chunk", "-5"], "--attention-chunk: must be 0 (auto), -1 (off)"),
    (["--seed", "-1"], "--seed: must be a whole number from 0 to 2**64-1"),
    (["--cfg-trunc", "0"], "--cfg-trunc: must be above 0"),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_message_and_exit_2(cli, no_weights, tmp_path, extra, message):
    args = ["--prompt", "1girl", "--out", str(tmp_path / "o.png"), *extra]
    rc, out, err = cli(*args)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and len([l for l in err.splitlines() if l.startswith("error:")]) == 1


def test_files_and_folders(cli, no_weights, tmp_path, model_args):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notimage.png").write_text("not an image")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    (tmp_path / "raw.pt").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    base = ["--prompt", "a", "--out", str(tmp_path / "o.png")]
    rc, _, err = cli(*base, "--cache-dir", str(tmp_path / "afile"))
    assert rc == 2 and "--cache-dir:" in err and "is a file, not a folder" in err
    rc, _, err = cli(*base, "--init-image", str(tmp_path / "notimage.png"))
    assert rc == 2 and "--init-image:" in err and "is not an image" in err
    rc, _, err = cli(*base, "--out", str(tmp_path / "afile" / "o.png"))
    assert rc == 2 and "is a file, so" in err
    for slot, name in (("--dit", "model.ckpt"), ("--vae", "raw.pt")):
        args = list(model_args)
        args[args.index(slot) + 1] = str(tmp_path / name)
        rc, _, err = cli(*base, *args)
        assert rc == 2 and f"{slot}:" in err and "pickle" in err and "truncated" not in err
    rc, _, err = cli(*base, "--dit", model_args[1])
    assert rc == 2 and "give all four model paths or none; missing --gemma, --jina, --vae" in err


def test_cuda_device_without_cuda_is_a_message(cli, no_weights, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = cli("--prompt", "a", "--out", str(tmp_path / "o.png"), "--device", "cuda")
    assert rc == 2 and "--device: 'cuda' asked for, but this PyTorch sees no CUDA GPU" in err


def test_empty_prompt_is_refused(cli, no_weights, tmp_path):
    rc, _, err = cli("--prompt", "   ", "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "--prompt: is empty" in err


def test_xml_error_points_at_the_unclosed_tag(cli, no_weights, tmp_path):
    xml = "<character_1>\n<n>a</n>\n<gender>1girl</gender\n</character_1>\n"
    prompt = tmp_path / "p.xml"
    prompt.write_text(xml)
    rc, _, err = cli("--prompt", str(prompt), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "line 3, column 22: the tag '</gender' is missing its closing '>'" in err
    with pytest.raises(PromptSyntaxError) as e:
        parse_prompt(xml)
    assert (e.value.line, e.value.column) == (3, 22)


def test_long_inline_prompt_is_text_and_only_an_existing_file_is_read(tmp_path):
    long = ", ".join(["1girl, solo, long hair, looking at viewer"] * 20)      # > 255 bytes
    assert v.prompt_text(long) == long
    assert v.prompt_text("x" * 300) == "x" * 300                           # one over-long "file name"
    assert v.prompt_text(str(tmp_path / "missing.txt")) == str(tmp_path / "missing.txt")
    (tmp_path / "p.txt").write_text("a cat", encoding="utf-8")
    assert v.prompt_text(str(tmp_path / "p.txt")) == "a cat"
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(v.InputError, match="not UTF-8"):
        v.prompt_text(str(tmp_path / "bin.txt"))


def test_long_inline_prompt_generates(cli, tmp_path, model_args):
    long = ", ".join(["1girl, solo, long hair, looking at viewer"] * 20)
    out = tmp_path / "o.png"
    rc, _, err = cli("--prompt", long, "--out", str(out), "--size", "32x32", "--steps", "1", *model_args)
    assert rc == 0, err
    assert out.is_file() and not list(tmp_path.glob(".*partial*"))


def test_size_beyond_what_host_ram_holds_names_the_largest_that_fits(tiny_models):
    from newbie_core.pipeline import GenerationRequest, SamplingSettings
    from newbie_core.pipeline.fit import check_size_fits
    import torch

    request = GenerationRequest(prompt="a", width=2048, height=1024, sampling=SamplingSettings(steps=1))
    check_size_fits(tiny_models, request, torch.device("cpu"), None, host_bytes=2**40)     # fits: no error
    with pytest.raises(v.InputError) as e:
        check_size_fits(tiny_models, request, torch.device("cpu"), None, host_bytes=200 * 2**20)
    msg = str(e.value)
    assert "2048x1024 does not fit the free host RAM" in msg and "the largest size of this shape that fits is" in msg
    w, h = (int(x) for x in msg.rsplit("fits is ", 1)[1].rstrip(".").split("x"))
    assert w % 16 == 0 and h % 16 == 0 and w < 2048 and abs(w / h - 2.0) < 0.2
    check_size_fits(tiny_models, GenerationRequest(prompt="a", width=w, height=h, sampling=SamplingSettings(steps=1)),
                    torch.device("cpu"), None, host_bytes=200 * 2**20)       # the size it names does fit


def test_size_beyond_the_vram_budget_names_the_largest_that_fits(tiny_models):
    from newbie_core.pipeline import GenerationRequest, MemorySettings, SamplingSettings
    from newbie_core.pipeline.fit import check_size_fits
    import torch

    request = GenerationRequest(prompt="a", width=4096, height=4096, sampling=SamplingSettings(steps=1),
                                memory=MemorySettings(vram_budget_gb=0.25))
    with pytest.raises(v.InputError, match=r"4096x4096 does not fit the VRAM budget of .*fits is \d+x\d+"):
        check_size_fits(tiny_models, request, torch.device("cpu"), request.memory.vram_budget_bytes)


def test_sampler_choices_match_the_samplers():
    from newbie_core.sampling import sampler_names
    assert list(v.SAMPLER_CHOICES) == sampler_names()


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from newbie_core import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['generate', '--help'])\n"
            "    except SystemExit: pass\n"
            "    try: cli.main(['generate', '--prompt', 'a', '--out', 'x.txt'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "--out: 'x.txt' has no image extension" in proc.stderr


def test_console_script_needs_no_subcommand(capsys, tmp_path):
    from newbie_core import cli
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["newbie-generate"] == "newbie_core.cli:generate_main"
    assert cli.generate_main(["--prompt", "a", "--out", str(tmp_path / "o.gif")]) == 2
    assert "--out:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.generate_main(["--help"])
    assert e.value.code == 0 and "usage: newbie-generate" in capsys.readouterr().out


def test_fp8_dtype_stores_gemma_in_fp8(tmp_path, model_args, monkeypatch):
    from newbie_core import cli
    from newbie_core.pipeline import StorageDType
    args = cli.build_parser().parse_args(["generate", "--prompt", "a", "--out", str(tmp_path / "o.png"),
                                          "--dtype", "fp8", *model_args])
    models = cli._models(args, cli.check_args(args))
    assert models.dit.storage is StorageDType.FP8 and models.encoders.gemma_storage is StorageDType.FP8
