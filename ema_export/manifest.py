"""The export's manifest: `<version>/assets.extra/ema_export.json`.

It records where the weights came from, how they were matched, how far each average drifted from its live value
and what verification found, so anyone holding the SavedModel can tell which weights each signature serves.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
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
from ema_export.errors import name_list
from ema_export.fold import FoldReport
from ema_export.locate import CheckpointSources
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


def _frozen(value: Any) -> Any:
    """JSON-ready data made read-only: mappings become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _plain(value: Any) -> Any:
    """The inverse of `_frozen`: dicts and lists, as `json` reads and writes them."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Manifest:
    """Everything worth knowing about an export, built once from what the stages returned.

    The version number is the one field known only at publish (concurrent exports take the next free number), so
    the manifest is written with `numbered(number).to_dict()`. Sections are read-only mappings of JSON data.
    """

    created: str
    sources: Mapping[str, Any]
    layout: Mapping[str, Any]
    policies: Mapping[str, Any]
    signatures: Mapping[str, Any]
    variables: Mapping[str, Any]
    warnings: tuple[str, ...]
    versions: Mapping[str, str]
    verification: Mapping[str, Any]
    timings: Mapping[str, float]
    version: int | None = None
    format: int = MANIFEST_FORMAT

    def numbered(self, version: int) -> Manifest:
        return dataclasses.replace(self, version=version)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, keys in the order `ema_export.json` has always had."""
        return {"format": self.format, "created": self.created, "version": self.version,
                **{name: _plain(getattr(self, name)) for name in _SECTIONS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest as read from `ema_export.json` (`read_manifest`)."""
        return cls(format=data["format"], created=data["created"], version=data["version"],
                   **{name: _frozen(data[name]) for name in _SECTIONS})


_SECTIONS = ("sources", "layout", "policies", "signatures", "variables", "warnings", "versions", "verification",
             "timings")


@dataclass(frozen=True)
class AssemblyFacts:
    """What the manifest needs from the assembly, kept once the in-memory models are released."""

    signatures: Mapping[str, Any]
    unread_averages: tuple[str, ...]


def describe_assembly(assembly: Assembly) -> AssemblyFacts:
    return AssemblyFacts(_frozen({
        "live": SIGNATURE_LIVE,
        "ema": SIGNATURE_EMA,
        "default": SIGNATURE_DEFAULT,
        "default_serves": DEFAULT_ARMS[assembly.default_arm],
        "inputs": {spec.name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                   for spec in assembly.input_signature},
    }), assembly.unread_averages)


def _sources(sources: CheckpointSources, model_source: str, attachment: str) -> dict[str, Any]:
    training, ema = sources.training, sources.ema
    return {
        "training_checkpoint": training.prefix,
        "training_files": list(training.files),
        "training_chosen_by": training.chosen_by,
        "training_step": training.step,
        "training_step_source": training.step_source,
        "ema_checkpoint": ema.prefix if ema else None,
        "ema_files": list(ema.files) if ema else [],
        "ema_chosen_by": ema.chosen_by if ema else None,
        "ema_step": ema.step if ema else None,
        "ema_step_source": ema.step_source if ema else None,
        "steps_match": None if not ema or ema.step is None or training.step is None else ema.step == training.step,
        "model": model_source,
        "attachment": attachment,
    }


def _verification(verification: VerificationReport) -> dict[str, Any]:
    return {
        "passed": verification.passed,
        "batch_size": verification.batch_size,
        "checks": [dict(dataclasses.asdict(c), passed=c.passed) for c in verification.checks],
        "arms_differ": verification.arms_differ,
        "max_arm_difference": verification.max_arm_difference,
    }


ARMS_IDENTICAL = "serve_live and serve_ema give identical outputs on the probe batch"


def unread_warning(names: Sequence[str]) -> str:
    return (f"{len(names)} averaged variable(s) are not read by the serving function, so their averages change no "
            f"answer: {name_list(list(names))}")


def build_manifest(*, sources: CheckpointSources, model_source: str, attachment: str, report: FoldReport,
                   assembly: AssemblyFacts, policies: Mapping[str, Any], warnings: Sequence[str],
                   verification: VerificationReport, durations: Mapping[str, float]) -> Manifest:
    """The manifest of a verified export, but for its version number.

    `warnings` are the export's own (beyond folding's); publishing (a rename) comes after the manifest is written,
    so `durations` stop before it.
    """
    identical = [] if verification.arms_differ else [ARMS_IDENTICAL]
    unread = [unread_warning(assembly.unread_averages)] if assembly.unread_averages else []
    return Manifest(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sources=_frozen(_sources(sources, model_source, attachment)),
        layout=_frozen({"name": report.layout, "reason": report.layout_reason, "source": report.source}),
        policies=_frozen(policies),
        signatures=assembly.signatures,
        variables=_frozen({
            "folded": [dataclasses.asdict(item) for item in report.folded],
            "kept_live": [dataclasses.asdict(item) for item in report.kept_live],
        }),
        warnings=(*report.warnings, *warnings, *unread, *identical),
        versions=_frozen(_versions()),
        verification=_frozen(_verification(verification)),
        timings=_frozen(dict(durations, total=round(sum(durations.values()), 3))),
    )


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> Path:
    """Write the manifest into a version (or staging) directory."""
    path = directory / ASSETS_EXTRA_DIR / MANIFEST_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(version_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported version."""
    return json.loads((Path(version_dir) / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).read_text())
