"""Version directories of a TF Serving base path, and the atomic way to add one.

TF Serving treats every child of the base path whose name is an integer as a servable version, and loads it as soon
as it appears. So an export is written under a non-numeric temporary name and renamed to its number only when it is
complete: a reader sees the whole version or none of it. An export killed with -9 leaves only a temporary directory,
which the next export in that base path removes once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ema_export.errors import OutputDirError, VersionExistsError
from ema_export.names import TEMP_VERSION_PREFIX


def numeric_versions(base_path: str | os.PathLike) -> list[int]:
    """The versions TF Serving would see in `base_path`, ascending."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(child.name) for child in base.iterdir() if child.name.isdigit() and child.is_dir())


def plan_version(base_path: str | os.PathLike, version: int | None, overwrite: bool) -> int:
    """The version number this export will take: `version`, or one more than the highest present.

    Raises:
        OutputDirError: `base_path` exists but is not a directory, or `version` is not positive.
        VersionExistsError: `version` exists and `overwrite` is false.
    """
    base = Path(base_path)
    if base.exists() and not base.is_dir():
        raise OutputDirError(f"OUT_DIR {base} exists and is not a directory; expected a TF Serving base path",
                             hint="Choose another OUT_DIR")
    existing = numeric_versions(base)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise OutputDirError(f"--version must be a positive integer, got {version}",
                             hint="TF Serving versions are 1, 2, 3, ...")
    if version in existing and not overwrite:
        raise VersionExistsError(
            f"Version {version} already exists in {base}; an existing version is never replaced silently",
            hint=f"Pass --overwrite to replace it, or omit --version to write version {existing[-1] + 1}",
        )
    return version


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
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextlib.contextmanager
def staging_directory(base_path: str | os.PathLike) -> Iterator[Path]:
    """A fresh non-numeric directory inside `base_path`, removed again unless it was published."""
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(base)
    staging = base / f"{TEMP_VERSION_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
    finally:
        # After a successful publish the directory has been renamed away; otherwise nothing of it may remain.
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, base_path: str | os.PathLike, version: int, overwrite: bool) -> Path:
    """Rename a complete staging directory to its version number.

    With `overwrite`, the old version is first renamed out of the way (to a non-numeric name, so TF Serving unloads
    it rather than seeing a mix) and deleted after the new one is in place.

    Raises:
        VersionExistsError: Another export took the number meanwhile, and `overwrite` is false.
    """
    target = Path(base_path) / str(version)
    retired = None
    if target.exists():
        if not overwrite:
            raise VersionExistsError(f"Version {version} appeared in {base_path} while this export ran",
                                     hint="Run the export again to take the next number")
        retired = staging.with_name(staging.name + "-replaced")
        os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError as error:
        if retired is not None:
            os.rename(retired, target)
        raise VersionExistsError(f"Could not publish version {version} in {base_path}: {error}",
                                 hint="Run the export again to take the next number") from error
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target
