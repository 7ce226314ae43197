"""`ema-serving serve`: flags, one-line errors, start-up output, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from serving.cli import main
from serving.server_cli import serve
from support.rpc import MODEL_NAME, connect, output_of, predict_request, sample_inputs
from support.served import expected_output, publish_version

pytestmark = pytest.mark.slow  # starts the server process

FLAGS = ["--model-name", "--model_name", "--model-base-path", "--model_base_path", "--port", "--rest-api-port",
         "--rest_api_port", "--model-config-file", "--model_config_file", "--file-system-poll-wait-seconds",
         "--file_system_poll_wait_seconds", "--model_config_file_poll_wait_seconds", "--enable_model_warmup",
         "--allow_version_labels_for_unavailable_models", "--enable_serialization_as_tensor_content", "--grace-period"]


def test_serve_is_registered_and_documents_tf_serving_flags():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in FLAGS:
        assert flag in result.output


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [(["--model-base-path", "/no/such/dir"], "does not exist"),
     ([], "No model to serve"),
     (["--model_config_file=/no/such.config"], "Could not read the model config file"),
     (["--model-base-path", "x", "--model-config-file", "y"], "exclusive")],
)
def test_errors_are_one_line_with_a_hint_and_no_traceback(arguments, fragment):
    result = CliRunner().invoke(serve, [*arguments, "--port", "0"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]


def test_bad_config_file_names_the_field(tmp_path):
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "m" base_path: "relative" model_platform: "tensorflow" } }')
    result = CliRunner().invoke(serve, ["--model_config_file", str(config), "--port", "0"])
    assert result.exit_code == 1
    assert "base_path must be absolute" in result.output


def test_serve_prints_ports_and_versions_and_exits_0_on_sigterm(seed_library, tmp_path):
    base_path = tmp_path / "models"
    publish_version(seed_library, base_path, 1)
    command = [sys.executable, "-c", "from serving.cli import main; main()", "serve", "--model_base_path",
               str(base_path), "--port", "0", "--host", "127.0.0.1", "--file_system_poll_wait_seconds=0"]
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith("ema-serving: gRPC on 127.0.0.1:"), first_line + process.stderr.read()
        port = int(first_line.split("127.0.0.1:")[1].split()[0])
        assert f"model {MODEL_NAME}: versions [1] AVAILABLE" in process.stdout.readline()
        stubs = connect(port)
        inputs = sample_inputs()
        response = stubs.prediction.Predict(predict_request(inputs), timeout=30)
        assert abs(output_of(response) - expected_output(inputs)).max() < 1e-5
        stubs.channel.close()
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Stopped." in stdout
    assert "oneDNN" not in stderr and "cuda" not in stderr.lower()  # TensorFlow's start-up noise is hidden
    assert "Model model version 1 is AVAILABLE" in stderr  # the server's own events are shown
