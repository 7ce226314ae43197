"""The exporter's exceptions: small `ValueError` subclasses callers can catch broadly or narrowly.

Their base, `HintedError`, is shared with the serving package and lives in `ema_export.contracts`.

Every message follows one shape: what happened, what was expected, how to fix it (naming the flag that fixes it),
and what was received. The CLI prints `str(error)` as one line; `hint` is shown after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ema_export.contracts import HintedError

__all__ = [
    "CheckpointNotFoundError", "CheckpointReadError", "EmaExportError", "FoldError", "HintedError", "LayoutError",
    "ModelLoadError", "OptionsError", "OutputDirError", "OutputWriteError", "RestoreError", "ServingVersionError",
    "VerificationError", "VersionExistsError", "VersionServedError", "naming_the_file",
]


class EmaExportError(HintedError):
    """Base class of every error the exporter raises on purpose."""

    exit_code = 1


class CheckpointNotFoundError(EmaExportError):
    """The training or EMA checkpoint could not be located or read."""


class ModelLoadError(EmaExportError):
    """The fresh model could not be built (bad `--model`, no architecture file, no input signature)."""


class RestoreError(EmaExportError):
    """Live values could not be restored strictly: some model variable would keep its initial value."""


class LayoutError(EmaExportError):
    """No EMA shadows were found, or the checkpoint layout could not be read unambiguously."""


class FoldError(EmaExportError):
    """Shadows do not match the model: missing, extra, mismatched, duplicated or non-finite entries."""


class VersionExistsError(EmaExportError):
    """The requested version directory already exists and `--overwrite` was not given."""


class OptionsError(EmaExportError):
    """An export option has a value outside its choices (`bn_stats`, `default_signature`): a caller's mistake."""


class OutputDirError(EmaExportError):
    """OUT_DIR cannot be used as a TF Serving base path."""


class VerificationError(EmaExportError):
    """The written SavedModel does not reproduce the in-memory models; nothing was published."""


class CheckpointReadError(CheckpointNotFoundError):
    """A checkpoint's files are there but cannot be read: an empty or overwritten `.index`, a truncated or corrupt
    `.data` file. The message says which half (training or EMA) and which file."""


class OutputWriteError(OutputDirError):
    """Writing into OUT_DIR failed: a full disk, a file-size limit, a read-only or unwritable directory. Nothing was
    published."""


class VersionServedError(VersionExistsError):
    """`--overwrite` of a version a TF Serving may already have loaded; it would keep serving the old copy."""


class ServingVersionError(EmaExportError):
    """`--serving-version` is not a TF Serving release number (MAJOR.MINOR)."""


def name_list(names: list[str], limit: int = 8) -> str:
    """`a, b, c and 4 more`: offenders in a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def received_line(error: BaseException, reason: str = "") -> str:
    """The line of a (TensorFlow) error worth quoting after "Received:": the first that names `reason` when given
    (TensorFlow's errors from inside a function begin with "Graph execution error:" and name the file further down),
    else the first; without the `{{function_node ...}}` prefix TensorFlow puts on op errors, which says nothing to a
    user."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    line = next((line.strip() for line in lines if reason and reason in line), first)
    return line.split("}}", 1)[-1].strip() if line.startswith("{{function_node") else line


@contextmanager
def naming_the_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OSError that names no file (Python's write() errors do not) as the same error naming `path`, so
    the export's error message can say which file failed."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
