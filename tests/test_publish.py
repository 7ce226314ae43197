"""Publishing a version: concurrent exports each get their own number, an existing number is replaced only when
forced (TF Serving never reloads a number it serves), and `--serving-version` warns about version skew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import ServingVersionError, VersionExistsError
from ema_export.manifest import read_manifest, write_manifest
from ema_export.serving_version import parse_release, skew_warning
from ema_export.versions import publish, staging_directory
from support import models as tm
from support.exporting import SEED_MODEL, run_export

MODEL = SEED_MODEL
WRITER = ".".join(tf.__version__.split(".")[:2])


run = run_export


# --- Concurrent default-numbered exports ------------------------------------------------------------------------

def test_exports_reaching_publish_together_take_the_next_free_numbers(tmp_path):
    """Four staged exports held at a barrier until each has chosen its number (all choose 1), then renamed at once:
    each ends up published under its own number, with a manifest that says so, and none replaced another."""
    base = tmp_path / "models"
    num_exports = 4
    barrier = threading.Barrier(num_exports, timeout=30)
    published: dict[str, Path] = {}
    errors: list[BaseException] = []

    def export_one(name: str) -> None:
        first_try = [True]

        def stamp(directory: Path, number: int) -> None:
            write_manifest(directory, {"version": number, "export": name})
            if first_try[0]:  # every export has picked the same next number before any renames
                first_try[0] = False
                barrier.wait()

        try:
            with staging_directory(base) as staging:
                (staging / "payload").write_text(name)
                published[name] = publish(staging, base, None, stamp=stamp)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=export_one, args=(f"export-{i}",)) for i in range(num_exports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(path.name for path in published.values()) == [str(n) for n in range(1, num_exports + 1)]
    for name, version_dir in published.items():
        assert (version_dir / "payload").read_text() == name, "a version holds the export that published it"
        assert read_manifest(version_dir) == {"version": int(version_dir.name), "export": name}
    assert sorted(p.name for p in base.iterdir()) == [str(n) for n in range(1, num_exports + 1)], "no leftovers"


@pytest.mark.slow
def test_concurrent_export_processes_all_publish(ckpt, tmp_path):
    """Real `ema-export` processes into one OUT_DIR: every one succeeds with its own number."""
    out = tmp_path / "models"
    code = "import sys; from ema_export.cli import main; sys.argv[0] = 'ema-export'; main()"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    processes = [subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(out), "--model", MODEL, "--json"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [stderr for _, stderr in outputs]
    versions = sorted(json.loads(stdout)["version"] for stdout, _ in outputs)
    assert versions == [1, 2]
    for version in versions:
        assert read_manifest(out / str(version))["version"] == version
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]


def test_an_explicit_version_taken_meanwhile_is_refused_not_replaced(tmp_path):
    base = tmp_path / "models"
    with staging_directory(base) as staging:
        (staging / "payload").write_text("new")
        (base / "3").mkdir()
        (base / "3" / "payload").write_text("published first")
        with pytest.raises(VersionExistsError, match="Version 3 appeared in .* while this export ran"):
            publish(staging, base, 3)
    assert (base / "3" / "payload").read_text() == "published first"
    assert sorted(p.name for p in base.iterdir()) == ["3"]


# --- --overwrite of a version TF Serving may serve ---------------------------------------------------------------

def test_overwrite_of_a_published_version_is_refused_unless_forced(ckpt, tmp_path):
    out = tmp_path / "models"
    assert run(ckpt, out, "--model", MODEL).exit_code == 0
    (out / "1" / "marker").write_text("the copy a server may have loaded")

    refused = run(ckpt, out, "--model", MODEL, "--version", "1", "--overwrite", "--json")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    line = refused.stderr.strip()
    assert "\n" not in line and "TF Serving that has loaded it never reloads the same number" in line
    assert "Publish a new number instead (omit --version to write version 2)" in line and "--force" in line
    assert json.loads(refused.stdout)["type"] == "VersionServedError"
    assert (out / "1" / "marker").exists()

    forced = run(ckpt, out, "--model", MODEL, "--version", "1", "--overwrite", "--force")
    assert forced.exit_code == 0, forced.output
    assert not (out / "1" / "marker").exists() and sorted(p.name for p in out.iterdir()) == ["1"]


def test_overwrite_is_refused_before_any_work(ckpt, tmp_path):
    out = tmp_path / "models"
    ema_export.export(ckpt, out, model=tm.LinearModule)
    stages: list[str] = []
    with pytest.raises(VersionExistsError):
        ema_export.export(ckpt, out, model=tm.LinearModule, version=1, overwrite=True, progress=stages.append)
    assert stages == ["locate"]


# --- --serving-version ---------------------------------------------------------------------------------------------

def test_serving_version_older_than_the_writer_warns_in_summary_and_manifest(ckpt, tmp_path):
    result = run(ckpt, tmp_path / "models", "--model", MODEL, "--serving-version", "2.0")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert f"written by TensorFlow {tf.__version__}, newer than TF Serving 2.0 (--serving-version)" in warnings[0]
    assert f"tensorflow/serving:{WRITER} or newer" in warnings[0]
    manifest = read_manifest(tmp_path / "models" / "1")
    assert manifest["policies"]["serving_version"] == "2.0"
    assert any("newer than TF Serving 2.0" in warning for warning in manifest["warnings"])


@pytest.mark.parametrize("serving", [WRITER, f"{WRITER}.3", "99.0"])
def test_serving_version_as_new_as_the_writer_does_not_warn(serving):
    assert skew_warning(serving, tf.__version__) is None
    assert skew_warning(None, tf.__version__) is None


def test_skew_is_judged_on_major_and_minor():
    assert skew_warning("2.20", "2.21.0") is not None
    assert skew_warning("2.20.0", "2.20.5") is None
    assert skew_warning("2.20", "2.21.0-rc1") is not None
    assert skew_warning("1.15", "2.0.0") is not None
    assert parse_release(" 2.20.1 ") == (2, 20)


@pytest.mark.parametrize("text", ["two", "2", "2.x", "v2.20", "2.20.0.1"])
def test_malformed_serving_version_is_one_line_before_any_work(ckpt, tmp_path, text):
    with pytest.raises(ServingVersionError, match="--serving-version must be a TF Serving release"):
        parse_release(text)
    result = run(ckpt, tmp_path / "models", "--model", MODEL, "--serving-version", text)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("Error: --serving-version must be") and "\n" not in result.stderr.strip()
    assert f"Received: {text!r}" in result.stderr
    assert not (tmp_path / "models").exists()
