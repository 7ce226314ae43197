"""Version directories of a TF Serving base path, and the atomic way to add one.

TF Serving treats every child of the base path whose name is an integer as a servable version, and loads it as soon
as it appears. So an export is written under a non-numeric temporary name and renamed to its number only when it is
complete: a reader sees the whole version or none of it. An export killed with -9 leaves only a temporary directory,
which the next export in that base path removes once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ema_export.contracts import TEMP_VERSION_PREFIX, version_paths
from ema_export.errors import OutputDirError, VersionExistsError, VersionServedError
from ema_export.out_dir import check_out_dir, write_errors


def numeric_versions(base_path: str | os.PathLike) -> list[int]:
    """The versions TF Serving would see in `base_path`, ascending (`ema_export.contracts.version_paths`)."""
    if not Path(base_path).is_dir():
        return []
    return sorted(version_paths(base_path))


def next_version(base_path: str | os.PathLike) -> int:
    """The number a default-numbered export takes: one more than the highest present, 1 in an empty base path.

    Never below 1: a child named `-3` is a version to TF Serving, but `--version` numbers are positive.
    """
    existing = numeric_versions(base_path)
    return max(existing[-1] + 1, 1) if existing else 1


def plan_version(base_path: str | os.PathLike, version: int | None, overwrite: bool, force: bool = False) -> int:
    """The version number this export will take: `version`, or one more than the highest present.

    Replacing an existing version needs both `overwrite` and `force`: TF Serving never reloads a version number it
    already serves. Its file-system source reports each version by its number (tensorflow_serving/sources/
    storage_path/file_system_storage_path_source.cc 75-79, `AspireVersion`), and the manager loads only numbers it
    does not manage yet (tensorflow_serving/core/aspired_versions_manager.cc 284-353,
    `ProcessAspiredVersionsRequest`: `additions` is the set difference of next and current aspired versions at 322),
    so a server that loaded version N keeps answering with the old N after it is replaced on disk. (Line numbers at
    tensorflow/serving commit 9d981c5c.)

    Raises:
        OutputDirError: `base_path` is a file or lies under one, or `version` is not positive.
        VersionExistsError: `version` exists and `overwrite` is false.
        VersionServedError: `version` exists, `overwrite` is true and `force` is not.
    """
    check_out_dir(base_path)
    if version is None:
        return next_version(base_path)
    if version < 1:
        raise OutputDirError(f"--version must be a positive integer, got {version}",
                             hint="TF Serving versions are 1, 2, 3, ...")
    if version in numeric_versions(base_path):
        refusal = _existing_version_error(Path(base_path), version, overwrite, force)
        if refusal is not None:
            raise refusal
    return version


def _existing_version_error(base: Path, version: int, overwrite: bool, force: bool,
                            appeared: bool = False) -> VersionExistsError | None:
    """The refusal to publish over an existing `version`, or None when it may be replaced (overwrite and force)."""
    exists = (f"Version {version} appeared in {base} while this export ran" if appeared
              else f"Version {version} already exists in {base}")
    instead = f"publish a new number instead (omit --version to write version {next_version(base)})"
    if not overwrite:
        return VersionExistsError(
            f"{exists}; an existing version is never replaced silently",
            hint=f"To keep it, {instead}; to replace it, pass --overwrite",
        )
    if not force:
        return VersionServedError(
            f"{exists}, and a TF Serving that has loaded it never reloads the same number: it would keep serving "
            f"the old version {version}",
            hint=f"{instead.capitalize()}; add --force to --overwrite only if no server has loaded version {version}",
        )
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_staging(base_path: Path) -> list[Path]:
    """Delete temporary directories left by exports whose process no longer runs (killed with -9, power loss)."""
    removed = []
    for child in base_path.glob(TEMP_VERSION_PREFIX + "*"):
        pid_text = child.name[len(TEMP_VERSION_PREFIX):].split("-", 1)[0]
        if not (pid_text.isascii() and pid_text.isdigit()):  # str.isdigit() alone takes '²', which int() refuses
            continue
        if int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextlib.contextmanager
def staging_directory(base_path: str | os.PathLike) -> Iterator[Path]:
    """A fresh non-numeric directory inside `base_path`, removed again unless it was published.

    A write that fails inside the block (full disk, file-size limit, read-only OUT_DIR) is raised as
    `OutputWriteError` naming the file; the staging directory is removed either way, so nothing half-written remains.
    """
    base = Path(base_path)
    staging = base / f"{TEMP_VERSION_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:  # created inside the try, so an interrupt right after mkdir still removes it
        with write_errors(base, staging):
            base.mkdir(parents=True, exist_ok=True)
            remove_abandoned_staging(base)
            staging.mkdir()
            yield staging
    finally:
        # After a successful publish the directory has been renamed away; otherwise nothing of it may remain.
        shutil.rmtree(staging, ignore_errors=True)


MAX_PUBLISH_ATTEMPTS = 100
"""Numbers a default-numbered export tries before giving up, when concurrent exports keep taking them first."""

Stamp = Callable[[Path, int], None]
"""Writes what depends on the version number (the manifest) into the staging directory before it is renamed."""


def publish(staging: Path, base_path: str | os.PathLike, version: int | None, overwrite: bool = False, *,
            force: bool = False, stamp: Stamp | None = None) -> Path:
    """Rename a complete staging directory to its version number.

    With `version` None the export takes the next free number: when concurrent exports into the same base path reach
    this point together, each takes its own number (re-stamped), and none replaces another's version.

    With `overwrite` and `force` an existing `version` is replaced: the old one is first renamed out of the way (to a
    non-numeric name, so TF Serving unloads it rather than seeing a mix) and deleted after the new one is in place.

    Args:
        staging: The complete export, inside `base_path`.
        base_path: The TF Serving base path.
        version: The number asked for, or None for the next free one.
        overwrite: Replace `version` if it exists (needs `force` too, see `plan_version`).
        force: Replace even though a TF Serving may already serve `version`.
        stamp: Called with the staging directory and the number it is about to take, before each rename.

    Returns:
        The published version directory.

    Raises:
        VersionExistsError: `version` exists (or appeared while this export ran) and may not be replaced; or
            `MAX_PUBLISH_ATTEMPTS` free numbers were all taken first.
    """
    base = Path(base_path)
    stamp = stamp or (lambda directory, number: None)
    if version is not None:
        stamp(staging, version)
        return _publish_as(staging, base, version, overwrite, force)
    for _ in range(MAX_PUBLISH_ATTEMPTS):
        number = next_version(base)
        stamp(staging, number)
        if _rename_to_new(staging, base / str(number)):
            return base / str(number)
        # Another export published this number first: take the next one.
    raise VersionExistsError(f"{MAX_PUBLISH_ATTEMPTS} version numbers in {base} were taken by other exports "
                             "while this one tried to publish", hint="Run the export again")


def _rename_to_new(staging: Path, target: Path) -> bool:
    """Rename `staging` to `target` unless `target` exists; False when it did (or appeared meanwhile).

    Linux's rename() replaces only an *empty* target directory and refuses a non-empty one (ENOTEMPTY/EEXIST) or a
    file (ENOTDIR); a published version is never empty, so two exports racing for one number cannot replace each
    other's work. Only an existing target makes this False: any other failure (a read-only or full OUT_DIR, a
    vanished staging directory) is raised, for `write_errors` to name it.
    """
    if os.path.lexists(target):
        return False
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) and os.path.lexists(target):
            return False
        raise
    return True


def _publish_as(staging: Path, base: Path, version: int, overwrite: bool, force: bool) -> Path:
    """Publish as exactly `version`, replacing it only with `overwrite` and `force`."""
    target = base / str(version)
    if _rename_to_new(staging, target):
        return target
    refusal = _existing_version_error(base, version, overwrite, force, appeared=True)
    if refusal is not None:
        raise refusal
    retired = staging.with_name(staging.name + "-replaced")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return target
