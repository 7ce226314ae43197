"""`ema-serving canary start | promote | rollback`: move a model config file through a canary, one safe step at a time.

Each command opens a client per serving target, calls one function of `serving.canary` and prints the steps it
took. Errors are one line on stderr (exit 1), no traceback. The commands never load the TensorFlow runtime.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from ema_export.contracts import DEFAULT_GRPC_PORT, DEFAULT_MODEL_NAME, HintedError
from serving.canary import (
    CANARY_LABEL,
    DEFAULT_WAIT_TIMEOUT_S,
    STABLE_LABEL,
    CanaryError,
    CanaryRequest,
    CanaryResult,
    promote_canary,
    rollback_canary,
    start_canary,
)
from serving.client import ServingClient
from serving.protocol import ServingError


def every_address(target: str) -> list[str]:
    """``HOST:PORT`` for each address ``target`` resolves to (a headless Service name gives every Ready pod).

    A ``dns:///`` prefix is accepted, as gRPC targets spell it. A target that does not resolve is kept as is, so the
    wait reports it as unreachable instead of failing here.
    """
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [target]
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"[{address}]:{port}" if ":" in address else f"{address}:{port}" for address in addresses]


@contextmanager
def _clients(targets: Sequence[str], all_addresses: bool, timeout: float) -> Iterator[list[ServingClient]]:
    expanded = [address for target in targets for address in (every_address(target) if all_addresses else [target])]
    with ExitStack() as stack:
        yield [stack.enter_context(ServingClient(address, timeout=timeout)) for address in expanded]


def _after_write(command: str | None) -> Callable[[Path], None] | None:
    """Run ``command`` after each write (no shell; the file's path is appended when the command has ``{}``)."""
    if not command:
        return None

    def run(path: Path) -> None:
        arguments = [str(path) if part == "{}" else part for part in shlex.split(command)]
        finished = subprocess.run(arguments, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            raise CanaryError(
                f"--after-write command {command!r} exited with {finished.returncode}: "
                f"{' '.join((finished.stderr or finished.stdout).split())[:500]}",
                hint="Fix the command (it runs without a shell after every write of the config file)",
            )

    return run


def _common(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="The ModelServerConfig file the servers poll (--model_config_file)."),
        click.option("--model", default=DEFAULT_MODEL_NAME, show_default=True, help="The model's name in the file."),
        click.option("--target", "targets", multiple=True, default=[f"localhost:{DEFAULT_GRPC_PORT}"],
                     show_default=True, help="HOST:PORT of a server reading the file; repeat for each server."),
        click.option("--every-address", is_flag=True,
                     help="Wait on every address each --target resolves to (a headless Service: every pod)."),
        click.option("--stable", "stable_version", type=int, default=None,
                     help="The version serving now (default: the 'stable' label, else the one AVAILABLE version)."),
        click.option("--stable-label", default=STABLE_LABEL, show_default=True),
        click.option("--canary-label", default=CANARY_LABEL, show_default=True),
        click.option("--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT_S, show_default=True,
                     help="Seconds to wait for each step to take effect on every target."),
        click.option("--poll-interval", type=float, default=1.0, show_default=True,
                     help="Seconds between checks of the targets while waiting."),
        click.option("--after-write", default=None,
                     help="Command run after each write, e.g. 'kubectl apply -k k8s/overlays/canary'."),
        click.option("--json", "as_json", is_flag=True, help="Print the steps as one JSON document."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run(action: Callable[..., CanaryResult], canary_version: int | None, **options: Any) -> None:
    request = CanaryRequest(
        config_path=options["config_path"], model=options["model"], canary_version=canary_version,
        stable_version=options["stable_version"], stable_label=options["stable_label"],
        canary_label=options["canary_label"], timeout_s=options["timeout"], poll_interval_s=options["poll_interval"],
    )
    try:
        with _clients(options["targets"], options["every_address"], timeout=10) as clients:
            result = action(request, clients, on_written=_after_write(options["after_write"]))
    except (HintedError, ServingError) as error:
        raise click.ClickException(" ".join(str(error).split())) from None
    if options["as_json"]:
        click.echo(json.dumps(asdict(result), indent=2, sort_keys=True))
        return
    click.echo(f"{result.action} {result.model}: stable {result.stable_version}, canary {result.canary_version}")
    for number, step in enumerate(result.steps, 1):
        labels = ", ".join(f"{label}={version}" for label, version in sorted(step.labels.items())) or "none"
        click.echo(f"  {number}. {step.description}: versions {list(step.versions)}, labels {labels} "
                   f"(took effect after {step.waited_s:.1f} s)")


@click.group()
def canary() -> None:
    """Canary a new version with labels, in the order TF Serving accepts (policy, wait for AVAILABLE, labels).

    TF Serving refuses a label on a version that is not AVAILABLE yet, so one edit that adds a version and its label
    fails on every config poll. These commands rewrite the file (atomically) one step at a time and wait on the
    servers between steps.
    """


@canary.command("start")
@click.option("--version", "canary_version", type=int, required=True, help="The version to canary.")
@_common
def start(canary_version: int, **options: Any) -> None:
    """Serve --version beside the stable version, wait until AVAILABLE everywhere, then label both."""
    _run(start_canary, canary_version, **options)


@canary.command("promote")
@_common
def promote(**options: Any) -> None:
    """Point both labels at the canary version, then stop serving the old stable version."""
    _run(promote_canary, None, **options)


@canary.command("rollback")
@_common
def rollback(**options: Any) -> None:
    """Point the canary label back at the stable version, then stop serving the canary version."""
    _run(rollback_canary, None, **options)
