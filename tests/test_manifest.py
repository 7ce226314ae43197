"""The manifest as a typed value: the JSON a real export writes is exactly `Manifest.to_dict()`, and an export's
results are values nothing changes after they are returned."""

from __future__ import annotations

import dataclasses
import json

import pytest

import ema_export
from ema_export.contracts import ASSETS_EXTRA_DIR, MANIFEST_FILENAME
from ema_export.manifest import Manifest, read_manifest
from support import models as tm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("manifest")
    tm.write_seed_checkpoints(base / "ckpt")
    return ema_export.export(base / "ckpt", base / "models", model=tm.LinearModule, serving_version="2.0")


def test_to_dict_round_trips_the_json_a_real_export_writes(exported):
    text = (exported.version_dir / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).read_text()
    written = json.loads(text)

    manifest = Manifest.from_dict(written)
    assert manifest.to_dict() == written
    assert list(manifest.to_dict()) == list(written)  # the key order users see in the file
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text  # byte for byte
    assert exported.record.to_dict() == written == exported.manifest
    assert written["version"] == exported.version == 1


def test_warnings_come_from_folding_the_export_and_verification_in_order(exported):
    warnings = read_manifest(exported.version_dir)["warnings"]
    assert exported.warnings == warnings
    assert any("2.0" in warning for warning in warnings)  # the --serving-version skew warning


def test_results_cannot_be_changed_after_they_are_returned(exported):
    with pytest.raises(dataclasses.FrozenInstanceError):
        exported.version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        exported.fold.warnings = []  # type: ignore[misc]
    with pytest.raises(TypeError):
        exported.record.sources["model"] = "elsewhere"  # type: ignore[index]
    copy = exported.manifest
    copy["warnings"].append("added by a caller")
    assert "added by a caller" not in exported.manifest["warnings"] and "added by a caller" not in exported.warnings
