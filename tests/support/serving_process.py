"""A real `ema-serving serve` in a child process, for tests that measure it (RSS) or signal it (SIGTERM).

Why a process: memory growth and signal handling are properties of the server process, which an in-process server
shares with pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerProcess:
    """A started server: the process, its gRPC port and its REST port (None when REST is off)."""

    process: subprocess.Popen
    port: int
    rest_port: int | None

    def rss_bytes(self) -> int:
        """The server's resident set size now, from /proc."""
        return resident_bytes(self.process.pid)

    def terminate(self, timeout: float = 60.0) -> tuple[str, str]:
        """SIGTERM, wait for exit; return (stdout, stderr) still unread."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.communicate(timeout=timeout)


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def serve_process(base_path: Path, *flags: str, rest: bool = False) -> Iterator[ServerProcess]:
    """Run `ema-serving serve` on 127.0.0.1 with free ports until the block ends (then kill it if still alive)."""
    command = [sys.executable, "-c", "from serving.cli import main; main()", "serve", "--model_base_path",
               str(base_path), "--port", "0", "--host", "127.0.0.1", "--file_system_poll_wait_seconds=0", *flags]
    if rest:
        command += ["--rest-api-port", _free_port()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    try:
        first_line = process.stdout.readline()
        if not first_line.startswith("ema-serving: gRPC on 127.0.0.1:"):
            process.kill()
            raise RuntimeError(f"server did not start: {first_line}{process.communicate()[1]}")
        port = int(first_line.split("127.0.0.1:")[1].split()[0].rstrip(","))
        rest_port = int(first_line.split("REST on 127.0.0.1:")[1].split()[0]) if rest else None
        while "Serving." not in process.stdout.readline():
            pass
        yield ServerProcess(process, port, rest_port)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _free_port() -> str:
    """A free loopback port for REST (the command line reads 0 as "REST off", as TF Serving does)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
