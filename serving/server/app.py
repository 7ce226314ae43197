"""Start and stop the local model server in-process: `start_server` returns a running `LocalServer`.

Start-up follows ``tensorflow_model_server``: build the config (one model from ``model_name``/``model_base_path``,
or a ``--model_config_file``), load every model's aspired versions, and only then open the gRPC (and REST) ports,
so the first request already finds a model. Unlike TF Serving, a missing or empty base path stops start-up with a
clear error instead of waiting forever for a version to appear.

Shutdown is graceful and bounded by ``grace`` seconds, whatever clients do: the health service turns NOT_SERVING,
every call gRPC delivers from then on is answered UNAVAILABLE (safe to retry: it was not run), every call already
admitted runs to its answer, and only when none is left (and no new call arrived for a moment) does gRPC's own
shutdown start. gRPC cancels the calls its transport holds when it shuts down, and CANCELLED is not retried by
clients, so the transport must be empty by then. REST stops accepting at once, lets requests being answered
finish and closes idle connections. Then the pollers stop and the versions are released.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from ema_export.contracts import DEFAULT_MODEL_NAME
from serving.config import (
    ModelServerConfig,
    describe_policy,
    load_model_server_config,
    single_model_config,
    validate_model_server_config,
)
from serving.server.errors import ModelLoadError, ModelPathError, RpcStatus, ServerStartError
from serving.server.grpc_service import add_services, make_health_servicer
from serving.server.manager import ManagerOptions, ModelManager, ModelsUnavailable, list_versions
from serving.server.rest import RestServer
from serving.server.tensors import DEFAULT_MAX_BROADCAST_BYTES, MAX_MESSAGE_BYTES, RequestLimits

logger = logging.getLogger("serving.server")

QUIET_SECONDS = 0.2
"""How long no new call may arrive before gRPC's shutdown starts: calls still in the transport then would be
CANCELLED, so draining waits for a lull (never past the grace period)."""


@dataclass(frozen=True)
class ServerOptions:
    """Everything `start_server` needs; field names mirror ``tensorflow_model_server`` flags.

    Attributes:
        model_name: Name of the single model served from ``model_base_path``.
        model_base_path: A TF Serving base path (numeric version directories). Exclusive with ``model_config_file``.
        port: gRPC port; 0 picks a free one (read it back from `LocalServer.port`).
        rest_api_port: REST port; None disables REST, 0 picks a free one. (On the command line 0 means off, as
            in TF Serving.)
        model_config_file: A ModelServerConfig text file (several models, version policies, labels).
        file_system_poll_wait_seconds: Seconds between polls of the base paths; 0 or less polls once, at start.
        host: Interface to bind.
        model_config_file_poll_wait_seconds: Seconds between re-reads of ``model_config_file``; 0 reads it once.
        enable_model_warmup: Replay ``assets.extra/tf_serving_warmup_requests`` when a version loads.
        allow_version_labels_for_unavailable_models: Let a label point at a version that is not AVAILABLE yet
            (TF Serving's flag; without it, labels in the start-up config fail, since nothing is loaded then).
        enable_serialization_as_tensor_content: Answer with ``tensor_content`` instead of typed fields.
        grpc_max_threads: Worker threads answering gRPC requests concurrently.
        enable_signature_method_name_check: Refuse Predict on a signature whose method is not predict, classify or
            regress, as TF Serving does with this flag (off by default there too).
        max_num_load_retries: More attempts after a version's load fails (TF Serving's default, 5).
        load_retry_interval_micros: Microseconds between load attempts (TF Serving's default, one minute).
        enable_grpc_healthcheck_service: Register the standard gRPC health service (off by default, as in TF
            Serving, where it needs ``--enable_grpc_healthcheck_service``).
        max_request_bytes: Largest gRPC message, REST body and decoded inputs of one request (`RequestLimits`);
            TF Serving's INT32_MAX by default.
        max_broadcast_bytes: Largest expansion of repeated values (one ``float_val`` filling a large shape) in
            one request; 0 = no limit, as in TF Serving (`RequestLimits`).
    """

    model_name: str = DEFAULT_MODEL_NAME
    model_base_path: str | os.PathLike[str] | None = None
    port: int = 0
    rest_api_port: int | None = None
    model_config_file: str | os.PathLike[str] | None = None
    file_system_poll_wait_seconds: float = 1.0
    host: str = "127.0.0.1"
    model_config_file_poll_wait_seconds: float = 0.0
    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
    enable_serialization_as_tensor_content: bool = False
    grpc_max_threads: int = 16
    enable_signature_method_name_check: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60 * 1000 * 1000
    enable_grpc_healthcheck_service: bool = False
    max_request_bytes: int = MAX_MESSAGE_BYTES
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES

    @property
    def limits(self) -> RequestLimits:
        """What one request may cost, as the front ends check it."""
        return RequestLimits(self.max_request_bytes, self.max_broadcast_bytes)


class _Admission(grpc.ServerInterceptor):
    """Admits calls until draining starts, then answers them UNAVAILABLE; knows when no admitted call is left.

    Calls are counted where gRPC hands them to Python: every call becomes one task of the worker pool (`pool`),
    queued or running, including one whose client gave up before a worker took it. gRPC runs interceptors on its
    serving thread as each call arrives, so a refusal is decided at arrival. Health checks are never refused and do
    not count as arrivals: a probe polling every few milliseconds must see NOT_SERVING and must not hold the stop
    back. (The health service's Watch is non-blocking: its task ends at once.)
    """

    def __init__(self, max_workers: int) -> None:
        self._condition = threading.Condition()
        self._draining = False
        self._last_arrival = time.monotonic()
        self.pool = _CountingPool(self._condition, max_workers=max_workers, thread_name_prefix="ema-serving-grpc")

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if details.method.startswith(_HEALTH_METHOD_PREFIX):
            return continuation(details)  # probes keep working while draining, and see NOT_SERVING
        with self._condition:
            self._last_arrival = time.monotonic()
            if self._draining:
                return _UNAVAILABLE_HANDLER
        return continuation(details)

    def drain(self, deadline: float) -> None:
        """Refuse new calls from now on; return when admitted calls finished and arrivals paused, or at deadline."""
        with self._condition:
            self._draining = True
            while time.monotonic() < deadline:
                quiet_for = time.monotonic() - self._last_arrival
                if self.pool.num_tasks == 0 and quiet_for >= QUIET_SECONDS:
                    return
                wait = QUIET_SECONDS - quiet_for if self.pool.num_tasks == 0 else QUIET_SECONDS
                self._condition.wait(max(min(wait, deadline - time.monotonic()), 0.001))
            if self.pool.num_tasks:
                logger.warning("%d request(s) still running after the grace period are cancelled", self.pool.num_tasks)


class _CountingPool(futures.ThreadPoolExecutor):
    """gRPC's worker pool, counting its unfinished tasks (one per call) under ``condition``, notified at each end."""

    def __init__(self, condition: threading.Condition, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._condition = condition
        self.num_tasks = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        with self._condition:
            self.num_tasks += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._task_done(None)
            raise
        future.add_done_callback(self._task_done)
        return future

    def _task_done(self, future: futures.Future | None) -> None:
        with self._condition:
            self.num_tasks -= 1
            self._condition.notify_all()


def _refuse_while_draining(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(
        grpc.StatusCode.UNAVAILABLE, "The server is shutting down and takes no new requests; send it elsewhere"
    )


_UNAVAILABLE_HANDLER: grpc.RpcMethodHandler = grpc.unary_unary_rpc_method_handler(_refuse_while_draining)
_HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


class _Periodic:
    """Calls a function every ``interval`` seconds on a daemon thread until stopped; logs (never raises) errors."""

    def __init__(self, interval: float, function: Callable[[], None], name: str) -> None:
        self._interval = interval
        self._function = function
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._function()
            except Exception:  # a poll that fails is retried next interval; the server keeps serving
                logger.exception("Periodic %s failed", self._thread.name)


class LocalServer:
    """A running local model server. Create it with `start_server`.

    Attributes:
        port: The bound gRPC port.
        rest_port: The bound REST port, or None when REST is off.
        host: The interface both are bound to.
    """

    def __init__(
        self,
        options: ServerOptions,
        manager: ModelManager,
        grpc_server: grpc.Server,
        port: int,
        health_servicer: Any,
        rest_server: RestServer | None,
        admission: _Admission,
    ) -> None:
        self.options = options
        self.host = options.host
        self.port = port
        self.rest_port = rest_server.port if rest_server else None
        self._manager = manager
        self._grpc_server = grpc_server
        self._health = health_servicer
        self._rest_server = rest_server
        self._admission = admission
        self._pollers: list[_Periodic] = []
        self._config_text: str | None = None
        self._config_problem: str | None = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def manager(self) -> ModelManager:
        """The model manager (versions, states, labels), for inspection."""
        return self._manager

    def model_versions(self) -> dict[str, list[int]]:
        """Every configured model with its AVAILABLE versions, ascending."""
        return self._manager.available_versions()

    def describe_models(self) -> list[str]:
        """One line per model: name, available versions, version policy, labels (for start-up output)."""
        labels = self._manager.labels()
        lines = []
        for name, config in self._manager.model_configs().items():
            versions = self._manager.available_versions().get(name, [])
            line = f"{name}: versions {versions or 'none'} AVAILABLE (policy {describe_policy(config)})"
            if labels.get(name):
                line += ", labels " + ", ".join(f"{label}={version}" for label, version in sorted(labels[name].items()))
            lines.append(f"{line}, base path {config.base_path}")
        return lines

    def wait_until_available(self, timeout: float = 30.0) -> None:
        """Block until every configured model has an AVAILABLE version.

        Raises:
            TimeoutError: some model still has none after ``timeout`` seconds (named in the message).
        """
        deadline = time.monotonic() + timeout
        while True:
            missing = [name for name, versions in self.model_versions().items() if not versions]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Models {missing} have no AVAILABLE version after {timeout:g} s")
            time.sleep(0.05)

    def poll_now(self) -> None:
        """Look at the base paths right away instead of waiting for the next poll."""
        self._manager.poll()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting requests, answer every admitted one (up to ``grace`` seconds), release every model.

        New gRPC calls get UNAVAILABLE and health NOT_SERVING at once; no admitted call is CANCELLED unless it runs
        past the grace period. Returns within about ``grace`` seconds whatever clients do (idle REST connections
        are closed). Safe to call more than once and from any thread.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            deadline = time.monotonic() + grace
            self._health.enter_graceful_shutdown()
            if self._rest_server is not None:
                self._rest_server.stop_accepting()
            self._admission.drain(deadline)
            done = self._grpc_server.stop(max(deadline - time.monotonic(), 0.0))
            if self._rest_server is not None:
                self._rest_server.stop(deadline)
            done.wait(max(deadline - time.monotonic(), 0.0) + 1.0)
            for poller in self._pollers:
                poller.stop()
            self._manager.close()
            self._stopped.set()
            logger.info("Server stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until `stop` has completed (or ``timeout`` passed); True when stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _start_pollers(self) -> None:
        if self.options.file_system_poll_wait_seconds > 0:
            self._pollers.append(
                _Periodic(self.options.file_system_poll_wait_seconds, self._manager.poll, "ema-serving-fs-poll")
            )
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self._config_text = _read_text(self.options.model_config_file)
            self._pollers.append(
                _Periodic(
                    self.options.model_config_file_poll_wait_seconds, self._reload_config_file, "ema-serving-config"
                )
            )
        for poller in self._pollers:
            poller.start()

    def _reload_config_file(self) -> None:
        """Re-read and re-apply ``model_config_file`` on every poll, as TF Serving does (server.cc:165-180).

        Applying the same config again is what lets a label that failed because its version was still loading take
        effect on a later poll. An error is logged when it first appears (TF Serving logs it every poll).
        """
        path = self.options.model_config_file
        assert path is not None
        text = _read_text(path)
        try:
            self._manager.apply_config(load_model_server_config(path, allow_empty=True))
        except (ValueError, RpcStatus) as error:
            problem = f"{text!r}:{error}"
            if problem != self._config_problem:
                logger.error("Could not apply the model config file %s: %s", path, error)
            self._config_problem = problem
            return
        if text != self._config_text or self._config_problem:
            logger.info("Applied the model config file %s", path)
        self._config_text, self._config_problem = text, None


def start_server(options: ServerOptions | None = None, /, **fields: Any) -> LocalServer:
    """Load the configured models and serve them over TF Serving's gRPC API (and REST, if asked).

    Args:
        options: A `ServerOptions`; keyword arguments override its fields (or replace it entirely).
        **fields: `ServerOptions` fields, e.g. ``model_base_path``, ``port``, ``rest_api_port``.

    Returns:
        The running server; ``server.port`` is the bound gRPC port. Use it as a context manager to stop it.

    Raises:
        ModelConfigError: the config file is unreadable or breaks TF Serving's rules.
        ModelPathError: a base path is missing or holds no numeric version directory.
        ModelLoadError: a model has no version that loads.
        ServerStartError: a port cannot be bound, or the options contradict each other.

    Example::

        with start_server(model_base_path="/tmp/models", port=0) as server:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    """
    options = dataclasses.replace(options or ServerOptions(), **fields)
    config = _initial_config(options)
    _check_base_paths(config)
    manager = ModelManager(
        ManagerOptions(
            enable_model_warmup=options.enable_model_warmup,
            allow_version_labels_for_unavailable_models=options.allow_version_labels_for_unavailable_models,
            enable_signature_method_name_check=options.enable_signature_method_name_check,
            max_num_load_retries=options.max_num_load_retries,
            load_retry_interval_micros=options.load_retry_interval_micros,
        )
    )
    try:
        _load_initial_models(manager, config)
        server = _open_ports(options, manager)
    except BaseException:
        manager.close()
        raise
    server._start_pollers()
    return server


def _initial_config(options: ServerOptions) -> ModelServerConfig:
    if options.model_config_file is not None and options.model_base_path is not None:
        raise ServerStartError(
            "Both a model base path and a model config file were given; they are exclusive",
            hint="Pass --model-base-path (one model) or --model-config-file (several), not both",
        )
    if options.model_config_file is not None:
        return load_model_server_config(options.model_config_file)
    if options.model_base_path is None:
        raise ServerStartError(
            "No model to serve: neither a model base path nor a model config file was given",
            hint="Pass --model-base-path OUT_DIR (an ema-export output directory) or --model-config-file FILE",
        )
    config = single_model_config(options.model_name, options.model_base_path)
    validate_model_server_config(config)
    return config


def _check_base_paths(config: ModelServerConfig) -> None:
    problems = []
    for model in config.model_config_list.config:
        try:
            versions = list_versions(model.base_path)
        except FileNotFoundError:
            problems.append(f"model {model.name!r}: base path {model.base_path} does not exist")
            continue
        except OSError as error:
            problems.append(f"model {model.name!r}: base path {model.base_path} cannot be read ({error.strerror})")
            continue
        if not versions:
            problems.append(
                f"model {model.name!r}: base path {model.base_path} holds no numeric version directory "
                "(such as 1/); temporary or non-numeric directories are ignored"
            )
    if problems:
        raise ModelPathError(
            "Cannot serve:",
            hint="Point the base path at an ema-export OUT_DIR (run `ema-export` first): it holds <N>/saved_model.pb",
            problems=problems,
        )


def _load_initial_models(manager: ModelManager, config: ModelServerConfig) -> None:
    try:
        manager.apply_config(config)
    except ModelsUnavailable as unavailable:
        raise ModelLoadError(
            f"No version of model(s) {', '.join(unavailable.names)} could be loaded:",
            hint="Check those SavedModel directories (and their assets.extra/tf_serving_warmup_requests); "
            "--enable-model-warmup=false skips warmup",
            problems=unavailable.problems,
        ) from None
    except RpcStatus as status:
        raise ServerStartError(
            status.message,
            hint="TF Serving checks labels before it loads anything, so start-up labels need "
            "--allow-version-labels-for-unavailable-models (TF Serving needs it too), or add the labels later "
            "with a config reload",
        ) from None


def _open_ports(options: ServerOptions, manager: ModelManager) -> LocalServer:
    admission = _Admission(options.grpc_max_threads)
    grpc_server = grpc.server(
        admission.pool,
        interceptors=[admission],
        options=[
            # A larger message is refused by gRPC (RESOURCE_EXHAUSTED) from its length prefix, before it is read.
            ("grpc.max_receive_message_length", min(options.max_request_bytes, MAX_MESSAGE_BYTES)),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = make_health_servicer()
    add_services(
        grpc_server,
        manager,
        health_servicer if options.enable_grpc_healthcheck_service else None,
        as_tensor_content=options.enable_serialization_as_tensor_content,
        limits=options.limits,
    )
    address = f"[{options.host}]:{options.port}" if ":" in options.host else f"{options.host}:{options.port}"
    try:
        port = grpc_server.add_insecure_port(address)
    except RuntimeError as error:
        raise ServerStartError(
            f"Could not bind the gRPC port {address}: {error}", hint="Choose another --port"
        ) from None
    if port == 0:
        raise ServerStartError(f"Could not bind the gRPC port {address}", hint="Choose another --port")
    rest_server = None
    if options.rest_api_port is not None:
        if options.rest_api_port and options.rest_api_port == port:
            raise ServerStartError("--rest-api-port must differ from --port", hint="Choose two different ports")
        try:
            rest_server = RestServer(manager, options.host, options.rest_api_port, limits=options.limits)
        except OSError as error:
            raise ServerStartError(
                f"Could not bind the REST port {options.host}:{options.rest_api_port}: {error.strerror}",
                hint="Choose another --rest-api-port, or 0 to turn REST off",
            ) from None
    grpc_server.start()
    if rest_server is not None:
        rest_server.start()
    return LocalServer(options, manager, grpc_server, port, health_servicer, rest_server, admission)


def _read_text(path: str | os.PathLike[str]) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:
        return None
