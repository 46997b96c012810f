"""Issue 11, item 7: no unpickling, no remote code, no network, safe file names, no XML entities."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from newbie_core.prompt import PromptSyntaxError, parse_prompt
from newbie_core.validate import safe_filename

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("newbie_core", "nodes")
FORBIDDEN = {
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "pickle import": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", re.M),
    "pickle load": re.compile(r"\bpickle\.(load|loads|Unpickler)\b"),
    "trust_remote_code": re.compile(r"trust_remote_code\s*=\s*True"),
    "hub download": re.compile(r"\b(hf_hub_download|snapshot_download|from_pretrained)\s*\("),
    "network client": re.compile(r"^\s*(import|from)\s+(requests|urllib\.request|http\.client|socket)\b", re.M),
}


def test_no_code_path_unpickles_or_fetches():
    hits = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            hits += [f"{path.relative_to(REPO)}: {what}" for what, rx in FORBIDDEN.items() if rx.search(text)]
    assert hits == []


_SITE = textwrap.dedent("""
    import socket, pickle
    def _refuse(*a, **k):
        raise RuntimeError("NETWORK OR PICKLE USED AT RUN TIME")
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
    pickle.load = pickle.loads = _refuse
    import builtins
    _real_import = builtins.__import__
    def _guarded(name, *a, **k):
        module = _real_import(name, *a, **k)
        if name == "torch" and getattr(module, "load", _refuse) is not _refuse:   # once torch is complete
            module.load = _refuse
        return module
    builtins.__import__ = _guarded
""")


def test_cli_generates_offline_with_sockets_and_unpickling_blocked(tmp_path):
    """The tiny default is built and run from scratch (fresh cache dir) with every socket connect,
    name lookup, torch.load and pickle.load(s) replaced by an error."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITE)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", XDG_CACHE_HOME=str(tmp_path / "cache"),
               HOME=str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(var, None)                      # offline because nothing asks, not because a flag says so
    out = tmp_path / "o.png"
    proc = subprocess.run([sys.executable, "-m", "newbie_core", "generate", "--prompt", "1girl, smile",
                           "--out", str(out), "--size", "32x32", "--steps", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    assert "NETWORK OR PICKLE" not in proc.stderr
    assert "THE IMAGE WILL BE NOISE" in proc.stderr          # the warning that matters is shown by default


def test_filenames_are_sanitised():
    assert safe_filename("../../etc/passwd") == "etc_passwd"
    assert safe_filename("a/b\\c:d*e?.png") == "a_b_c_d_e_.png"
    assert safe_filename("...") == "output" and safe_filename("") == "output"
    assert len(safe_filename("x" * 1000)) <= 120
    assert "/" not in safe_filename("\0/\n")


def test_cache_keys_cannot_name_a_path(tmp_path):
    import torch
    from newbie_core.pipeline.conditioning import Conditioning, ConditioningCache, conditioning_key

    cache = ConditioningCache(directory=tmp_path)
    cond = Conditioning(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        cache.put("../../evil", cond)
    f = tmp_path / "enc.safetensors"
    f.write_bytes(b"x")
    key = conditioning_key("a", "a", gemma_max=8, jina_max=8, dtype="bf16", encoder_files=[f])
    cache.put(key, cond)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["enc.safetensors", f"{key}.safetensors"])


@pytest.mark.parametrize("xml", [
    '<!DOCTYPE x [<!ENTITY a "b">]><caption>&a;</caption>',
    '<caption>&xxe;</caption>',
    '<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><caption>&xxe;</caption>',
    '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><caption>&b;</caption>',
])
def test_xml_entities_and_doctype_are_refused(xml):
    with pytest.raises(PromptSyntaxError):
        parse_prompt(xml)
    assert parse_prompt("<caption>a &amp; b &lt;3</caption>").prompt.caption == "a & b <3"
