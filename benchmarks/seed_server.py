"""The loopback server the client benchmarks measure against: the seed model, exported and served in a child process.

A child keeps the server's TensorFlow out of the measured (TensorFlow-free) client process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SERVER_SCRIPT = """
import sys, tempfile
sys.path.insert(0, {tests!r})
import ema_export
from serving.server import start_server
from support.models import LinearModule, write_seed_checkpoints
root = tempfile.mkdtemp(prefix="bench-server-")
write_seed_checkpoints(root + "/ckpt")
ema_export.export(root + "/ckpt", root + "/out", model=LinearModule)
with start_server(model_name="model", model_base_path=root + "/out", port=0, file_system_poll_wait_seconds=0) as s:
    s.wait_until_available(timeout=60)
    print("PORT", s.port, flush=True)
    sys.stdin.read()  # serve until the benchmark closes our stdin
"""


@contextmanager
def seed_server() -> Iterator[str]:
    """Serve the seed model as "model" on a free loopback port; yields the gRPC target `127.0.0.1:PORT`."""
    server = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SERVER_SCRIPT.format(tests=str(ROOT / "tests")))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("PORT"):
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        yield f"127.0.0.1:{line.split()[1]}"
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=60)
