"""Fixtures for the reliability tier: tiny checkpoint paths as CLI arguments, and a CLI runner."""

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
