"""The quickstart example runs end to end, as `make demo` runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from ema_export.manifest import read_manifest

pytestmark = pytest.mark.slow  # runs the quickstart end to end: train, export, serve, compare
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
