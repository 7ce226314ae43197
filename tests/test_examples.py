"""The examples run end to end: the quickstart, and the digits demo `make demo` runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from ema_export.manifest import read_manifest
from support.exporting import launched

pytestmark = pytest.mark.slow  # each runs an example end to end: train, export, serve, compare
ROOT = Path(__file__).resolve().parent.parent


def test_seed_quickstart_trains_exports_serves_and_compares(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_quickstart.py"), str(tmp_path)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "exported version 1" in completed.stdout and "(step 300)" in completed.stdout
    # Served by the embedded server and compared over gRPC with the TensorFlow-free client.
    assert "(TF Serving's gRPC API)" in completed.stdout
    for signature in ("serve_live", "serve_ema"):
        assert re.search(rf"{signature} +accuracy 0\.9\d\d +latency p50", completed.stdout), completed.stdout
    assert "McNemar exact p =" in completed.stdout
    assert "Traceback" not in completed.stderr and "I0000" not in completed.stderr
    version_dir = tmp_path / "models" / "1"
    manifest = read_manifest(version_dir)
    assert manifest["sources"]["training_step"] == manifest["sources"]["ema_step"] == 300
    assert sorted(p.name for p in (tmp_path / "training").glob("*.index")) == [
        "ckpt-100.index", "ckpt-200.index", "ckpt-300.index"]
    assert manifest["verification"]["passed"] and manifest["verification"]["arms_differ"]
    # The training run really updated the averages: they lag the live weights.
    assert all(item["relative_l2"] > 0 for item in manifest["variables"]["folded"])
    assert set(tf.saved_model.load(str(version_dir)).signatures) == {"serve_live", "serve_ema", "serving_default"}


DIGITS_DEMO = ROOT / "examples" / "digits_noisy_labels.py"


def test_digits_demo_trains_exports_serves_compares_and_writes_the_report(tmp_path):
    completed = subprocess.run([sys.executable, str(DIGITS_DEMO), str(tmp_path)], capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    output = completed.stdout
    assert "Traceback" not in completed.stderr and "I0000" not in completed.stderr + output
    # Every stage ran as the command a user would type.
    for command in ("$ ema-export", "$ ema-serving serve", "$ ema-serving status", "$ ema-serving compare"):
        assert command in output, output
    assert f"wrote the report to {tmp_path / 'report.html'}" in completed.stderr
    # The training log has both curves at every saved step, and the export is the last step's pair.
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [record["step"] for record in log["records"]] == list(range(50, 1501, 50))
    assert log["num_flipped"] > 0.35 * log["num_train"]
    assert read_manifest(tmp_path / "models" / "1")["sources"]["training_step"] == 1500
    # The served arms score what the in-process model scored at that step (same weights, same held-out digits).
    page = (tmp_path / "report.html").read_text()
    document = json.loads(page.split('id="compare-document">', 1)[1].split("</script>", 1)[0])
    num_paired = document["num_paired"]
    for key, signature in (("live", "serve_live"), ("ema", "serve_ema")):
        served = document["arms"][signature]["accuracy"]
        assert abs(served - log["records"][-1][key]) <= 2 / num_paired, (key, served, log["records"][-1])
        assert re.search(rf"{signature} +{num_paired} +0 +{served:.4f} ", output), output
    assert "exact McNemar p =" in output
    # The server was stopped, gracefully, and its port is closed.
    stopped = re.search(r"stopped the server \(pid (\d+), exit code (-?\d+)\)", output)
    assert stopped and stopped.group(2) == "0", output
    port = int(re.search(r"--port (\d+)", output).group(1))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_digits_demo_stops_the_server_on_ctrl_c(tmp_path):
    demo = subprocess.Popen(launched([sys.executable, str(DIGITS_DEMO), str(tmp_path), "--steps", "100"],
                                     sigint_default=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in demo.stdout:  # wait until the server runs and the demo polls it
            lines.append(line)
            if "until AVAILABLE" in line:
                break
        demo.send_signal(signal.SIGINT)
        rest, errors = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = "".join(lines) + rest
    assert demo.returncode == 130, output + errors
    stopped = re.search(r"stopped the server \(pid (\d+), exit code (-?\d+)\)", output)
    assert stopped, output
    with pytest.raises(ProcessLookupError):
        os.kill(int(stopped.group(1)), 0)
    assert not (tmp_path / "report.html").exists()
