"""`ema-export` on the command line: the summary, --json, one-line errors, and interrupted exports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ema_export.names import TEMP_VERSION_PREFIX
from support import models as tm
from support.exporting import SEED_MODEL, launched, run_export

pytestmark = pytest.mark.slow  # exports through the CLI, some in a child process
MODEL = SEED_MODEL


run = run_export


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_summary_names_sources_counts_drifts_checks_and_version(ckpt, tmp_path):
    result = run(ckpt, tmp_path / "models", "--model", MODEL)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "ckpt/ckpt-1" in out and "ckpt/ema/ckpt-1" in out
    assert "2 folded, 0 kept live" in out
    assert "weights" in out and "Largest drifts" in out
    assert "serve_ema/output_0" in out and "Verified" in out
    assert f"Wrote version 1      {tmp_path / 'models' / '1'}" in out


def test_json_output_is_the_manifest_with_version_dir(ckpt, tmp_path):
    result = run(ckpt, tmp_path / "models", "--model", MODEL, "--json", "--default-signature", "live")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["version_dir"] == str(tmp_path / "models" / "1")
    assert data["signatures"]["default_serves"] == "serve_live"
    assert {item["name"] for item in data["variables"]["folded"]} == {"weights", "biases"}


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["{tmp}/nowhere", "{tmp}/models", "--model", MODEL], ["neither a directory nor a checkpoint prefix"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", "no_colon"], ["package.module:factory"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", "no_such_module:build"], ["Cannot import module"]),
        (["{tmp}/ckpt", "{tmp}/models"], ["No model given", "--model"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", "support.models:build_sequential"], ["have no value"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", MODEL, "--ema-checkpoint", "{tmp}/ckpt"],
         ["resolves to the training checkpoint itself"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", "support.models:build_subclassed", "--input-signature", "x:float32"],
         ["NAME:DTYPE:[D0,D1,...]"]),
        (["{tmp}/ckpt", "{tmp}/models", "--model", "support.models:build_subclassed"], ["--input-signature"]),
    ],
    ids=["no-checkpoint", "bad-model-spec", "unimportable-model", "no-model", "wrong-model", "wrong-ema",
         "bad-input-signature", "no-input-signature"],
)
def test_errors_are_one_line_with_a_hint(ckpt, tmp_path, arguments, fragments):
    result = run(*[a.format(tmp=tmp_path) for a in arguments])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_missing_ema_directory_is_explained(tmp_path):
    tm.write_seed_checkpoints(tmp_path / "ckpt")
    for path in sorted((tmp_path / "ckpt" / "ema").iterdir()):
        path.unlink()
    (tmp_path / "ckpt" / "ema").rmdir()
    assert_one_line_error(run(tmp_path / "ckpt", tmp_path / "models", "--model", MODEL), "No EMA shadows found",
                          "Layouts tried: ema-checkpoint", "--ema-checkpoint")


def test_existing_version_is_refused_with_the_fix(ckpt, tmp_path):
    assert run(ckpt, tmp_path / "models", "--model", MODEL).exit_code == 0
    result = run(ckpt, tmp_path / "models", "--model", MODEL, "--version", "1", "--json")
    assert_one_line_error(result, "Version 1 already exists", "--overwrite")
    assert json.loads(result.stdout)["type"] == "VersionExistsError"


def test_help_documents_every_option():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--ema-checkpoint", "--model", "--input-signature", "--allow-missing", "--version",
                   "--overwrite", "--force", "--serving-version", "--default-signature", "--json", "--verbose"):
        assert option in result.output


def _start_export(ckpt: Path, out: Path) -> subprocess.Popen:
    code = "import sys; from ema_export.cli import main; sys.argv[0] = 'ema-export'; main()"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    return subprocess.Popen(launched([sys.executable, "-c", code, str(ckpt), str(out), "--model", MODEL],
                                     sigint_default=True), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_staging(out: Path, process: subprocess.Popen, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        staged = list(out.glob(TEMP_VERSION_PREFIX + "*")) if out.exists() else []
        if staged:
            return staged[0]
        time.sleep(0.002)
    raise AssertionError(f"no staging directory appeared (exit code {process.poll()})")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_export_publishes_nothing_and_the_next_one_succeeds(ckpt, tmp_path, how):
    out = tmp_path / "models"
    process = _start_export(ckpt, out)
    _wait_for_staging(out, process)
    process.send_signal(how)
    process.wait(timeout=60)
    assert process.returncode != 0, "the export finished before it could be interrupted"
    assert not [p for p in out.iterdir() if p.name.isdigit()]
    if how == signal.SIGINT:
        assert not list(out.iterdir()), "Ctrl-C must clean up its staging directory"
        assert b"nothing was published" in process.stderr.read()

    result = run(ckpt, out, "--model", MODEL)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["1"], "the abandoned staging directory is cleaned up"


def test_dry_run_prints_the_matching_table_and_writes_nothing(ckpt, tmp_path):
    result = run(ckpt, tmp_path / "models", "--model", MODEL, "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "variable" in out and "shadow source key" in out and "relative drift" in out
    assert re.search(r"weights +4x3 +float32 +ema_weights/weights:0/.ATTRIBUTES/VARIABLE_VALUE +0\.8852", out)
    assert f"Would write version 1 to {tmp_path / 'models' / '1'}" in out
    assert not (tmp_path / "models").exists()

    data = json.loads(run(ckpt, tmp_path / "models", "--model", MODEL, "--dry-run", "--json").stdout)
    assert data["dry_run"] is True and data["version"] == 1
    assert {item["name"] for item in data["folded"]} == {"weights", "biases"}
    assert not (tmp_path / "models").exists()


def test_unknown_layout_lists_the_known_ones(ckpt, tmp_path):
    assert_one_line_error(run(ckpt, tmp_path / "models", "--model", MODEL, "--layout", "nope"),
                          "Unknown layout 'nope'", "ema-checkpoint", "tf1-names")


def test_help_names_every_registered_layout():
    from ema_export.layouts import LAYOUTS

    help_text = "".join(run("--help").output.split())  # click may wrap a name at its hyphens
    for name in LAYOUTS:
        assert name in help_text


SUBCLASSED_MODULE = '''
import keras

@keras.saving.register_keras_serializable(package="mine")
class Tower(keras.Model):
    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden, self.head = keras.layers.Dense(units, activation="relu"), keras.layers.Dense(2)

    def call(self, inputs):
        return self.head(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}
'''


def test_a_long_error_is_one_short_line_and_whole_in_json_and_verbose(tmp_path):
    """A registered subclassed model's `.keras` without --model: Keras's message pastes the whole config (1.3 kB);
    the terminal line names the class and the fix in at most 300 characters."""
    import keras
    import numpy as np

    (tmp_path / "mine.py").write_text(SUBCLASSED_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import mine
    finally:
        sys.path.remove(str(tmp_path))
    model = mine.Tower()
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True), loss="mse")
    model.train_on_batch(np.ones((4, 4), np.float32), np.ones((4, 2), np.float32))
    model.save(tmp_path / "model.keras")
    keras.saving.get_custom_objects().clear()  # a fresh process, as the command line is: nothing registered

    result = run(tmp_path / "model.keras", tmp_path / "out", "--json")
    assert_one_line_error(result, "Could not locate class 'Tower'", "pass --model package.module:factory")
    line = result.stderr.strip()
    assert len(line) <= len("Error: ") + 300, line
    assert json.loads(result.stdout)["type"] == "ModelLoadError"


def test_an_error_with_many_problems_shows_the_first_and_a_count(tmp_path):
    from ema_export.errors import FoldError

    error = FoldError("The EMA shadows in ckpt do not fit the model (40 problems):", hint="Check --model",
                      problems=[f"missing shadow for layer_{i}/kernel, a variable of the model" for i in range(40)])
    line = error.summary()
    assert len(line) <= 300 and line.startswith(error.message + " missing shadow for layer_0/kernel")
    assert re.search(r" and \d+ more\. Check --model \(all of it: --verbose\)$", line)
    assert len(str(error)) > 1000  # --verbose and --json print it whole
