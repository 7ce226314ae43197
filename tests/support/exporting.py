"""Fixtures and helpers the exporter's command-line tests share: the seed checkpoints and a CliRunner call."""

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ema_export.cli import cli
from support import models

SEED_MODEL = "support.models:LinearModule"
"""The `--model` of the seed checkpoints."""


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A training checkpoint directory with its EMA half in `ema/`, written by the seed training loop."""
    models.write_seed_checkpoints(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def run_export(*args: object) -> Result:
    """`ema-export ARGS...` through click's CliRunner (stdout and stderr kept apart)."""
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def launched(command: list[str], *, sigint_default: bool = False, file_size_limit: int | None = None) -> list[str]:
    """`command` started through `launch.py`, which first resets SIGINT to its default (for a child a test interrupts
    with SIGINT) or sets RLIMIT_FSIZE, instead of a `preexec_fn` (launch.py says why)."""
    options = ["--sigint-default"] if sigint_default else []
    if file_size_limit is not None:
        options += ["--file-size-limit", str(file_size_limit)]
    return [sys.executable, str(Path(__file__).with_name("launch.py")), *options, "--", *command]
