"""The export's manifest: `<version>/assets.extra/ema_export.json`.

It records where the weights came from, how they were matched, how far each average drifted from its live value
and what verification found, so anyone holding the SavedModel can tell which weights each signature serves.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.contracts import (
    ASSETS_EXTRA_DIR,
    DEFAULT_ARMS,
    MANIFEST_FILENAME,
    SIGNATURE_DEFAULT,
    SIGNATURE_EMA,
    SIGNATURE_LIVE,
)
from ema_export.fold import FoldReport
from ema_export.locate import CheckpointSources
from ema_export.restored import RestoredModel
from ema_export.verify import VerificationReport

MANIFEST_FORMAT = 1


def _versions() -> dict[str, str]:
    from ema_export import __version__

    versions = {"ema_export": __version__, "tensorflow": tf.__version__, "python": platform.python_version()}
    try:
        import keras

        versions["keras"] = keras.__version__
    except ImportError:  # pragma: no cover - keras ships with tensorflow
        pass
    return versions


def build_manifest(
    sources: CheckpointSources,
    restored: RestoredModel,
    report: FoldReport,
    assembly: Assembly,
    version: int,
    policies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything worth knowing about an export, as JSON-ready data; `add_verification` completes it."""
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": version,
        "sources": {
            "training_checkpoint": sources.training.prefix,
            "training_files": list(sources.training.files),
            "training_chosen_by": sources.training.chosen_by,
            "training_step": sources.training.step,
            "training_step_source": sources.training.step_source,
            "ema_checkpoint": sources.ema.prefix if sources.ema else None,
            "ema_files": list(sources.ema.files) if sources.ema else [],
            "ema_chosen_by": sources.ema.chosen_by if sources.ema else None,
            "ema_step": sources.ema.step if sources.ema else None,
            "ema_step_source": sources.ema.step_source if sources.ema else None,
            "steps_match": None if not sources.ema or sources.ema.step is None or sources.training.step is None
            else sources.ema.step == sources.training.step,
            "model": restored.fresh.source,
            "attachment": restored.attachment,
        },
        "layout": {"name": report.layout, "reason": report.layout_reason, "source": report.source},
        "policies": dict(policies or {}),
        "signatures": {
            "live": SIGNATURE_LIVE,
            "ema": SIGNATURE_EMA,
            "default": SIGNATURE_DEFAULT,
            "default_serves": DEFAULT_ARMS[assembly.default_arm],
            "inputs": {spec.name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                       for spec in assembly.input_signature},
        },
        "variables": {
            "folded": [dataclasses.asdict(item) for item in report.folded],
            "kept_live": [dataclasses.asdict(item) for item in report.kept_live],
            "copied_non_averaged": assembly.copied_non_averaged,
        },
        "warnings": list(report.warnings),
        "versions": _versions(),
    }


def add_verification(manifest: dict[str, Any], verification: VerificationReport) -> None:
    """Record what verification found."""
    manifest["verification"] = {
        "passed": verification.passed,
        "batch_size": verification.batch_size,
        "checks": [dict(dataclasses.asdict(c), passed=c.passed) for c in verification.checks],
        "arms_differ": verification.arms_differ,
        "max_arm_difference": verification.max_arm_difference,
    }
    if not verification.arms_differ:
        manifest["warnings"].append("serve_live and serve_ema give identical outputs on the probe batch")


def add_timings(manifest: dict[str, Any], durations: dict[str, float]) -> None:
    """Record how long each stage took, in seconds, so a slow export shows where its time went.

    Publishing (a rename) comes after the manifest is written and is not in it.
    """
    manifest["timings"] = dict(durations, total=round(sum(durations.values()), 3))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest into a version (or staging) directory."""
    path = directory / ASSETS_EXTRA_DIR / MANIFEST_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(version_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported version."""
    return json.loads((Path(version_dir) / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).read_text())
