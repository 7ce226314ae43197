"""Keep TensorFlow's native start-up log lines off the user's terminal.

TensorFlow 2.21 logs through absl from C++ (`I0000 ... port.cc] oneDNN custom operations are on`, CUDA probes)
straight to file descriptor 2, before `TF_CPP_MIN_LOG_LEVEL` is consulted for some of them. The only reliable way to
hide them is to point descriptor 2 elsewhere and give Python's own `sys.stderr` a duplicate of the real one, so our
messages still reach the terminal. Only command-line entry points call this, and only without `--verbose`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator


def wants_verbose(argv: list[str]) -> bool:
    """`--verbose`/`-v` anywhere on the command line (decided before click parses it, since TF loads early)."""
    return any(arg in ("--verbose", "-v") for arg in argv)


def hide_native_logs() -> None:
    """Send native stderr to /dev/null while Python keeps writing to the real stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    # TensorFlow's Python-side warnings ("WARNING:tensorflow: ... unrestored values", retracing notices) go through
    # the `tensorflow` logger to stderr; our errors already say what matters.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        sys.stderr.flush()
        real = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # no real descriptor 2 (embedded interpreters)
        return
    sys.stderr = io.TextIOWrapper(os.fdopen(real, "wb", buffering=0), encoding="utf-8", errors="replace",
                                  line_buffering=True, write_through=True)


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool) -> Iterator[None]:
    """Silence native stderr for a block only (TensorFlow's import), then give the descriptor back.

    The scoped form of `hide_native_logs`, for commands that run inside a test runner capturing stderr or that must
    keep native error output (a crashing kernel) visible once TensorFlow is up.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
