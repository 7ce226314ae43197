"""Each mistake raises the error of its kind: an option is an options error, an existing version is the only
`VersionExistsError`, a client setting is no gRPC status, and the server's load failure is not the exporter's."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

import ema_export
from ema_export import errors
from ema_export.contracts import HintedError
from ema_export.versions import publish, staging_directory
from serving import server
from serving.client import RetryPolicy
from serving.protocol import ClientConfigError, InvalidRequestError, ServingError
from serving.server.errors import ServableLoadError, ServerError


@pytest.mark.parametrize("option, value, flag", [("bn_stats", "median", "--bn-stats"),
                                                 ("default_signature", "both", "--default-signature")])
@pytest.mark.parametrize("run", [ema_export.export, ema_export.dry_run], ids=["export", "dry_run"])
def test_an_invalid_option_is_an_options_error_and_touches_nothing(tmp_path, run, option, value, flag):
    out = tmp_path / "out"
    with pytest.raises(errors.OptionsError) as raised:
        run(tmp_path / "no-checkpoint-needed", out, **{option: value})
    assert not isinstance(raised.value, errors.OutputDirError)
    assert isinstance(raised.value, errors.EmaExportError) and raised.value.exit_code == 1
    assert repr(value) in str(raised.value) and flag in raised.value.hint and "\n" not in str(raised.value)
    assert not out.exists()


def test_exporter_errors_share_the_contract_base():
    assert errors.HintedError is HintedError
    assert issubclass(errors.EmaExportError, HintedError) and issubclass(ServerError, HintedError)


# --- Publishing: only an existing target is VersionExistsError ---------------------------------------------------

def test_a_rename_that_fails_for_another_reason_is_not_version_exists(tmp_path):
    with staging_directory(tmp_path) as staging:
        staging.rmdir()  # the staging directory vanished: rename() fails with ENOENT, no target exists
        with pytest.raises(FileNotFoundError) as raised:
            publish(staging, tmp_path, 1)
    assert not isinstance(raised.value, errors.VersionExistsError) and raised.value.errno == errno.ENOENT
    assert not (tmp_path / "1").exists()


@contextlib.contextmanager
def _unwritable(directory: Path):
    """Make `directory` refuse new entries for real: remount its tmpfs read-only (root ignores modes), or chmod."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "is not writable by this user"
        finally:
            directory.chmod(0o755)
        return
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(directory)], capture_output=True, text=True,
                               check=False)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {remounted.stderr.strip()}")
    try:
        yield "is on a read-only file system"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=False)


@pytest.fixture
def out_dir(tmp_path):
    """OUT_DIR on its own tmpfs for root (so it can be remounted read-only), a plain directory otherwise."""
    directory = tmp_path / "out"
    directory.mkdir()
    if os.geteuid() != 0:
        yield directory
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_rename_refused_by_the_file_system_is_a_named_write_error(out_dir):
    with pytest.raises(errors.OutputWriteError) as raised, staging_directory(out_dir) as staging:
        (staging / "saved_model.pb").write_text("model")
        with _unwritable(out_dir) as why:
            publish(staging, out_dir, 1)
    assert why in str(raised.value) and "Choose another OUT_DIR" in str(raised.value)
    assert not isinstance(raised.value, errors.VersionExistsError)
    assert not (out_dir / "1").exists()


def test_an_existing_target_is_version_exists(tmp_path):
    (tmp_path / "1" / "old").mkdir(parents=True)
    with staging_directory(tmp_path) as staging, pytest.raises(errors.VersionExistsError, match="--overwrite"):
        publish(staging, tmp_path, 1)
    assert [path.name for path in (tmp_path / "1").iterdir()] == ["old"]


# --- The client and the server -----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"max_attempts": 0}, {"max_attempts": 6}, {"initial_backoff_s": 0},
                                      {"max_backoff_s": -1}])
def test_a_retry_policy_mistake_is_a_client_config_error(settings):
    with pytest.raises(ClientConfigError, match="Invalid retry policy") as raised:
        RetryPolicy(**settings)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, ServingError)
    assert not isinstance(raised.value, InvalidRequestError) and raised.value.code is None


def test_the_server_and_the_exporter_have_distinct_load_errors():
    assert issubclass(ServableLoadError, ServerError)
    assert server.ServableLoadError is ServableLoadError
    assert server.ModelLoadError is ServableLoadError  # the former name still catches it
    assert not issubclass(ServableLoadError, errors.ModelLoadError)
    assert not issubclass(errors.ModelLoadError, ServableLoadError)


@pytest.mark.slow  # starts the local server, which imports TensorFlow
def test_a_server_with_no_loadable_version_raises_servable_load_error(tmp_path):
    (tmp_path / "1").mkdir()  # a version directory without a SavedModel
    with pytest.raises(ServableLoadError) as raised:
        server.start_server(model_base_path=tmp_path, port=0)
    assert type(raised.value).__name__ == "ServableLoadError" and "could be loaded" in str(raised.value)
