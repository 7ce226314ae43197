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


def read_in_parts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Make the restore stage read any model's training checkpoint as it reads a large model's: in parts, one
    `RestoreV2` per variable. Returns the list it records each such read in, as (checkpoint prefix, variables read).

    `restore_in_parts` is called with its default part size, which Python bound when the function was defined, so
    patching `PART_BYTES` alone would leave one part for a small model: the size is passed here instead.
    """
    import ema_export.restore_by_graph as restore_by_graph

    monkeypatch.setattr(restore_by_graph, "IN_PARTS_MIN_BYTES", 0)
    monkeypatch.setattr(restore_by_graph, "IN_PARTS_MIN_MEAN_BYTES", 0)
    reads: list[tuple[str, int]] = []
    restore_in_parts = restore_by_graph.restore_in_parts

    def recorded(prefix: str, targets: list, workers: int | None = None, part_bytes: int = 1) -> None:
        reads.append((prefix, len(targets)))
        restore_in_parts(prefix, targets, workers, part_bytes=1)

    monkeypatch.setattr(restore_by_graph, "restore_in_parts", recorded)
    return reads


def written_in_shards(monkeypatch: pytest.MonkeyPatch, writers: int = 2) -> list[tuple[str, int]]:
    """Make the write stage write any model's variables as it writes a large model's: ema-export's own checkpoint
    writer (`bundle.write_bundle`) on `writers` threads, the object graph in a shard of its own. Returns the list it
    records each bundle written in, as (bundle prefix, tensors written)."""
    import ema_export.bundle as bundle
    import ema_export.write as write

    monkeypatch.setattr(write, "writers_for", lambda sizes, cpus=None: writers)
    written: list[tuple[str, int]] = []
    write_bundle = bundle.write_bundle

    def recorded(prefix: str, tensors: list) -> None:
        written.append((prefix, len(tensors)))
        write_bundle(prefix, tensors)

    monkeypatch.setattr(bundle, "write_bundle", recorded)
    return written
