"""OUT_DIR as a place to write: the pre-flight check, and one named error for each way writing into it fails.

Restoring and folding a large model takes minutes; finding out afterwards that OUT_DIR is read-only, sits under a
file or is on a full disk wastes them. `ensure_writable` checks first, by creating and removing a small probe where
the export will be written. Writes can still fail later (the disk fills, a file-size limit is hit): `write_errors`
turns those failures, whether Python's `OSError` or TensorFlow's op errors that carry the same text, into
`OutputWriteError` naming the file and the fix.

Nothing here imports TensorFlow: TensorFlow's errors are recognised by the system error text they carry
("<path>; No space left on device").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ema_export.contracts import TEMP_VERSION_PREFIX
from ema_export.errors import EmaExportError, OutputDirError, OutputWriteError, received_line

_PROBE_BYTES = 4096  # one page: enough for a full disk to refuse it

# The write failures with a message of their own, most specific first.
_KNOWN_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)

# TensorFlow's temporary names for files it writes atomically (saved_model.pb.tmp<hex>, ....tempstate<digits>).
_TENSORFLOW_TEMP_SUFFIX = re.compile(r"(\.tmp[0-9a-f]{32}|\.tempstate\d+)$")


def check_out_dir(base_path: str | os.PathLike) -> None:
    """Refuse an OUT_DIR that is a file or lies under one, without writing anything.

    Raises:
        OutputDirError: `base_path` or one of its parents exists and is not a directory.
    """
    base = Path(base_path)
    if base.exists() and not base.is_dir():
        raise OutputDirError(f"OUT_DIR {base} exists and is not a directory; expected a TF Serving base path",
                             hint="Choose another OUT_DIR")
    ancestor = _nearest_existing(base)
    if not ancestor.is_dir():
        raise OutputDirError(f"OUT_DIR {base} lies under {ancestor}, which is a file, not a directory; expected a "
                             "path where a directory can be created", hint="Choose another OUT_DIR")


def ensure_writable(base_path: str | os.PathLike) -> None:
    """Check that an export can be written into `base_path`, before any expensive work.

    Creates a small non-numeric probe (TF Serving ignores it) in `base_path`, or in its nearest existing parent when
    `base_path` does not exist yet, writes one page into it and removes it again.

    Raises:
        OutputDirError: OUT_DIR is a file or lies under one.
        OutputWriteError: The probe cannot be written: read-only, not permitted, full disk, file-size limit.
    """
    check_out_dir(base_path)
    base = Path(base_path)
    where = base if base.is_dir() else _nearest_existing(base)
    probe = where / f"{TEMP_VERSION_PREFIX}{os.getpid()}-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        (probe / "probe").write_bytes(b"\0" * _PROBE_BYTES)
    except OSError as error:
        named = output_write_error(error, base, file=f"a probe file in {where} (the pre-flight check)")
        if named is None:
            raise
        raise named from error
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def write_errors(base_path: str | os.PathLike, staging: Path | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into `OutputWriteError`; other exceptions pass unchanged."""
    try:
        yield
    except EmaExportError:
        raise
    except Exception as error:
        translated = output_write_error(error, Path(base_path), staging)
        if translated is None:
            raise
        raise translated from error


def output_write_error(error: BaseException, base: Path, staging: Path | None = None,
                       file: str | None = None) -> OutputWriteError | None:
    """The named error for a failed write into OUT_DIR `base`, or None when `error` is no known write failure.

    Args:
        error: What the write raised.
        base: OUT_DIR.
        staging: The staging directory, to name files relative to the export.
        file: What was being written, when `error` does not say (Python's write() errors carry no file name).
    """
    code = _errno_of(error)
    if code is None:
        return None
    where = file or _describe_file(_path_of(error), staging)
    received = f"Received: {received_line(error, os.strerror(code))}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is exhausted"
        return OutputWriteError(f"Writing {where} failed: {what} holding OUT_DIR {base}; nothing was published. "
                                f"{received}", hint="Free space there, or choose another OUT_DIR")
    if code == errno.EFBIG:
        return OutputWriteError(f"Writing {where} failed: the file exceeds this process's file-size limit "
                                f"({_file_size_limit()}); nothing was published. {received}",
                                hint="Raise the limit (`ulimit -f unlimited`) and run the export again")
    if code == errno.ENOTDIR:
        return OutputWriteError(f"OUT_DIR {base} lies under a file, not a directory. {received}",
                                hint="Choose another OUT_DIR")
    why = "is on a read-only file system" if code == errno.EROFS else "is not writable by this user"
    return OutputWriteError(f"OUT_DIR {base} {why} (writing {where}); expected a directory the export can create "
                            f"versions in. {received}",
                            hint="Choose another OUT_DIR, or make it writable (mount it read-write, fix permissions)")


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.absolute().parents]:
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or "/")


def _errno_of(error: BaseException) -> int | None:
    if isinstance(error, OSError) and error.errno in _KNOWN_ERRNOS:
        return error.errno
    text = str(error)
    return next((code for code in _KNOWN_ERRNOS if os.strerror(code) in text), None)


def _path_of(error: BaseException) -> str | None:
    if isinstance(error, OSError) and error.filename:
        return os.fspath(error.filename)
    # TensorFlow: "<optional op prefix> /some/path; No space left on device"
    match = re.search(r"(/[^\s;]+);\s", str(error))
    return match.group(1) if match else None


def _describe_file(path: str | None, staging: Path | None) -> str:
    if path is None:
        return "the export"
    path = _TENSORFLOW_TEMP_SUFFIX.sub("", path)
    if staging is not None:
        with contextlib.suppress(ValueError):
            return f"{Path(path).relative_to(staging)} of the export"
    return path


def _file_size_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"RLIMIT_FSIZE {soft} bytes"
