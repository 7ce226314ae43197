"""Fixtures and helpers the exporter's command-line tests share: the seed checkpoints and a CliRunner call."""

import signal
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


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: a shell running the suite as a background job
    starts it with SIGINT ignored, which the child would inherit (and then never see Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
