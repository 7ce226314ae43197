"""Version planning and TF Serving's version-directory rule, on plain directories (no export)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ema_export.errors import OutputDirError, VersionExistsError, VersionServedError
from ema_export.names import TEMP_VERSION_PREFIX
from ema_export.versions import numeric_versions, plan_version, publish, remove_abandoned_staging, staging_directory
from serving.server.manager import list_versions


def _make(base: Path, *names: str) -> Path:
    for name in names:
        (base / name).mkdir(parents=True)
    return base


def _served_versions(base: Path) -> list[int]:
    return sorted(list_versions(base))


# TF Serving reads a child as a version when its whole name parses as an int64 (absl::SimpleAtoi: ASCII digits, an
# optional sign, ASCII whitespace around), directory or not: the exporter, which plans the next number, and the local
# server, which loads versions, must agree.
RULES = [pytest.param(numeric_versions, id="exporter"), pytest.param(_served_versions, id="server")]


@pytest.mark.parametrize("rule", RULES)
def test_only_children_named_by_an_int64_are_versions(tmp_path, rule):
    _make(tmp_path, "1", "007", "12", "temp-3", "3.5", "-4", "v5", f"{TEMP_VERSION_PREFIX}99-abc")
    (tmp_path / "6").write_text("a file: TF Serving lists it as a version too, then fails to load it")
    assert rule(tmp_path) == [-4, 1, 6, 7, 12]


@pytest.mark.parametrize("rule", RULES)
def test_non_ascii_digits_are_not_versions(tmp_path, rule):
    _make(tmp_path, "2", "\u0663", "\u00b2")  # ARABIC-INDIC DIGIT THREE, SUPERSCRIPT TWO
    assert rule(tmp_path) == [2]


def test_the_next_version_is_one_above_the_highest(tmp_path):
    assert plan_version(tmp_path / "not-yet", None, overwrite=False) == 1
    assert plan_version(_make(tmp_path / "empty"), None, overwrite=False) == 1
    assert plan_version(_make(tmp_path / "gaps", "1", "3", "temp-9"), None, overwrite=False) == 4


def test_an_explicit_version_is_taken_as_given(tmp_path):
    base = _make(tmp_path, "1", "3")
    assert plan_version(base, 2, overwrite=False) == 2
    assert plan_version(base, 3, overwrite=True, force=True) == 3
    with pytest.raises(VersionServedError):  # a TF Serving may serve 3 already and would never reload it
        plan_version(base, 3, overwrite=True)


def test_an_existing_version_is_never_replaced_silently(tmp_path):
    base = _make(tmp_path, "1", "3")
    with pytest.raises(VersionExistsError) as raised:
        plan_version(base, 3, overwrite=False)
    assert "--overwrite" in raised.value.hint and "version 4" in raised.value.hint


@pytest.mark.parametrize("version", [0, -2])
def test_versions_start_at_one(tmp_path, version):
    with pytest.raises(OutputDirError, match="--version must be a positive integer"):
        plan_version(tmp_path, version, overwrite=False)


def test_a_file_is_not_a_base_path(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(OutputDirError, match="not a directory"):
        plan_version(tmp_path / "out", None, overwrite=False)


def test_a_published_version_appears_whole_under_its_number(tmp_path):
    with staging_directory(tmp_path) as staging:
        assert numeric_versions(tmp_path) == []  # the staging name is not a version
        (staging / "saved_model.pb").write_text("model")
        target = publish(staging, tmp_path, 1, overwrite=False)
    assert target == tmp_path / "1" and (target / "saved_model.pb").read_text() == "model"
    assert [child.name for child in tmp_path.iterdir()] == ["1"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), staging_directory(tmp_path) as staging:
        (staging / "half-written").write_text("")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_publishing_over_an_existing_version_needs_overwrite(tmp_path):
    _make(tmp_path, "1")
    (tmp_path / "1" / "old").write_text("")
    with staging_directory(tmp_path) as staging:
        (staging / "new").write_text("")
        with pytest.raises(VersionExistsError, match="appeared"):
            publish(staging, tmp_path, 1, overwrite=False)
        publish(staging, tmp_path, 1, overwrite=True, force=True)
    assert [child.name for child in (tmp_path / "1").iterdir()] == ["new"]
    assert [child.name for child in tmp_path.iterdir()] == ["1"]


def test_only_staging_directories_of_finished_processes_are_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead, running = f"{TEMP_VERSION_PREFIX}{finished.pid}-dead", f"{TEMP_VERSION_PREFIX}1-init"  # pid 1 always runs
    _make(tmp_path, dead, running)
    assert remove_abandoned_staging(tmp_path) == [tmp_path / dead]
    assert [child.name for child in tmp_path.iterdir()] == [running]
