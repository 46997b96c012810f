"""Fixtures for the reliability tier: tiny checkpoint paths as CLI arguments, a CLI runner, an
injected CUDA OOM and the budgets the sampling stage was planned for."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_paths(tiny_dir):
    from newbie_core.tiny import build_tiny_checkpoints
    return build_tiny_checkpoints(tiny_dir)


@pytest.fixture()
def model_args(tiny_paths) -> list[str]:
    p = tiny_paths
    return ["--dit", str(p.dit), "--gemma", str(p.gemma), "--jina", str(p.jina), "--vae", str(p.vae)]


@pytest.fixture()
def cli(capsys):
    """Run ``newbie_core.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    from newbie_core import cli as cli_module

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            rc = cli_module.main(["generate", *argv])
        except SystemExit as e:     # argparse's own errors
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture()
def inject_oom(monkeypatch):
    """``inject_oom(module, name, times=1)``: the first ``times`` calls of ``module.name`` raise
    CUDA OOM, later ones run it; returns the call counter ({"n": calls so far})."""
    import torch

    def inject(module, name: str, times: int = 1) -> dict:
        real, calls = getattr(module, name), {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] <= times:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real(*a, **k)
        monkeypatch.setattr(module, name, flaky)
        return calls
    return inject


@pytest.fixture()
def planned_budgets(monkeypatch) -> list:
    """The budget of every sampling plan made from now on (plan_sampling's last argument)."""
    from newbie_core.pipeline import sample
    budgets, real_plan = [], sample.plan_sampling

    def recording(*a):
        budgets.append(a[-1])
        return real_plan(*a)
    monkeypatch.setattr(sample, "plan_sampling", recording)
    return budgets
