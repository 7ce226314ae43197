"""Stage 1, locate: find the training checkpoint and its EMA checkpoint, and say which files they are.

A directory means "the latest checkpoint recorded in its `checkpoint` state file"; anything else is taken as a
checkpoint prefix (`.../ckpt-7`), which must have an `.index` file beside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ema_export.errors import CheckpointNotFoundError
from ema_export.names import EMA_CHECKPOINT_SUBDIR

_STATE_FILENAME = "checkpoint"
KERAS_FILE_SUFFIXES = (".weights.h5", ".keras")
"""Keras's own files, which hold model weights and (when compiled) optimizer variables, EMA averages included."""
_PATH_IN_STATE = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)


@dataclass(frozen=True)
class CheckpointFiles:
    """One TensorFlow checkpoint: its prefix, the files that make it up, and how it was chosen."""

    prefix: str
    files: tuple[str, ...]
    chosen_by: str

    @property
    def is_keras_file(self) -> bool:
        """A `.keras` archive or `.weights.h5` file rather than a TensorFlow checkpoint."""
        return self.prefix.endswith(KERAS_FILE_SUFFIXES)

    @property
    def number(self) -> int | None:
        """The `-N` suffix TensorFlow's `save()` puts on a prefix, if there is one."""
        match = re.search(r"-(\d+)$", self.prefix)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointSources:
    """The pair of checkpoints an export reads."""

    training: CheckpointFiles
    ema: CheckpointFiles | None
    checkpoint_dir: str


def _files_of(prefix: str) -> tuple[str, ...]:
    folder, base = os.path.split(prefix)
    names = sorted(
        name for name in os.listdir(folder or ".") if name == base + ".index" or name.startswith(base + ".data-")
    )
    return tuple(os.path.join(folder, name) for name in names)


def _latest_in_directory(directory: Path, role: str, flag: str) -> CheckpointFiles:
    state = directory / _STATE_FILENAME
    if state.is_file():
        match = _PATH_IN_STATE.search(state.read_text(errors="replace"))
        if match:
            recorded = match.group(1)
            # A state file written on another machine may hold an absolute path that no longer exists: the
            # checkpoint is then looked for beside the state file, which is where TensorFlow wrote it.
            candidates = [recorded] if os.path.isabs(recorded) else []
            candidates.append(str(directory / os.path.basename(recorded)))
            for candidate in candidates:
                if os.path.isfile(candidate + ".index"):
                    return CheckpointFiles(candidate, _files_of(candidate), f"latest in {state}")
            raise CheckpointNotFoundError(
                f"The {role} state file {state} names checkpoint {recorded!r}, but its .index file is missing",
                hint=f"Restore the checkpoint files, or pass a checkpoint prefix directly with {flag}",
            )
    prefixes = sorted({str(p)[: -len(".index")] for p in directory.glob("*.index")})
    if not prefixes:
        keras_files = sorted(str(p) for suffix in KERAS_FILE_SUFFIXES for p in directory.glob("*" + suffix))
        if len(keras_files) == 1:
            return CheckpointFiles(keras_files[0], (keras_files[0],), f"only Keras file in {directory}")
    if len(prefixes) == 1:
        return CheckpointFiles(prefixes[0], _files_of(prefixes[0]), f"only checkpoint in {directory}")
    if prefixes:
        raise CheckpointNotFoundError(
            f"The {role} directory {directory} has {len(prefixes)} checkpoints but no `checkpoint` state file to say "
            "which is latest",
            hint=f"Pass one prefix with {flag}. Received: " + ", ".join(os.path.basename(p) for p in prefixes),
        )
    raise CheckpointNotFoundError(
        f"No {role} checkpoint in {directory}: expected a `checkpoint` state file or `<prefix>.index` files",
        hint=f"Point {flag} at the directory training saved into, or at a checkpoint prefix such as .../ckpt-1",
    )


def resolve_checkpoint(path: str | os.PathLike, role: str, flag: str) -> CheckpointFiles:
    """Resolve a directory or a prefix to one checkpoint.

    Args:
        path: A checkpoint directory (its latest checkpoint is used) or a checkpoint prefix.
        role: "training" or "EMA", for messages.
        flag: The command-line argument that sets this path, for hints.

    Raises:
        CheckpointNotFoundError: Nothing readable is there.
    """
    path = Path(path)
    if path.is_dir():
        return _latest_in_directory(path, role, flag)
    prefix = str(path)
    if path.is_file() and prefix.endswith(KERAS_FILE_SUFFIXES):
        return CheckpointFiles(prefix, (prefix,), "given as a Keras file")
    if prefix.endswith(".index"):
        prefix = prefix[: -len(".index")]
    elif ".data-" in os.path.basename(prefix):
        prefix = prefix[: prefix.rindex(".data-")]
    if os.path.isfile(prefix + ".index"):
        return CheckpointFiles(prefix, _files_of(prefix), "given as a prefix")
    raise CheckpointNotFoundError(
        f"The {role} checkpoint {str(path)!r} is neither a directory nor a checkpoint prefix with an .index file",
        hint=f"Check the path given as {flag}",
    )


def locate(checkpoint: str | os.PathLike, ema_checkpoint: str | os.PathLike | None = None,
           require_ema: bool = False) -> CheckpointSources:
    """Find the training checkpoint and the EMA checkpoint that goes with it.

    Args:
        checkpoint: CKPT_DIR or a training checkpoint prefix.
        ema_checkpoint: Directory or prefix of the EMA checkpoint; default `<CKPT_DIR>/ema/`.
        require_ema: Raise when no separate EMA checkpoint exists; by default its absence is left to the layouts,
            several of which keep the shadows inside the training checkpoint.

    Raises:
        CheckpointNotFoundError: Either checkpoint is missing or ambiguous.
    """
    training = resolve_checkpoint(checkpoint, "training", "CKPT_DIR")
    checkpoint_dir = str(checkpoint) if Path(checkpoint).is_dir() else os.path.dirname(training.prefix)
    if ema_checkpoint is not None:
        ema = resolve_checkpoint(ema_checkpoint, "EMA", "--ema-checkpoint")
        if os.path.realpath(ema.prefix) == os.path.realpath(training.prefix):
            raise CheckpointNotFoundError(
                f"--ema-checkpoint resolves to the training checkpoint itself ({training.prefix}); its values are "
                "the live weights, not their averages",
                hint="Point --ema-checkpoint at the checkpoint the EMA shadows were saved to (by default CKPT_DIR/ema/)",
            )
        return CheckpointSources(training, ema, checkpoint_dir)
    default_ema = Path(checkpoint_dir) / EMA_CHECKPOINT_SUBDIR
    if default_ema.is_dir():
        return CheckpointSources(training, resolve_checkpoint(default_ema, "EMA", "--ema-checkpoint"), checkpoint_dir)
    if require_ema:
        raise CheckpointNotFoundError(
            f"No EMA checkpoint: expected a directory {default_ema} holding the shadows saved beside the training "
            "checkpoint",
            hint="Pass its location with --ema-checkpoint PATH (a directory or a prefix)",
        )
    return CheckpointSources(training, None, checkpoint_dir)
