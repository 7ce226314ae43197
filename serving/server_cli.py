"""`ema-serving serve`: the local model server on the command line, with ``tensorflow_model_server``'s flags.

Each flag has TF Serving's underscore spelling as an alias (``--model_base_path``), so a TF Serving command line works
here unchanged; boolean flags also take ``=true``/``=false`` as TF Serving's do.

This module is imported whenever ``ema-serving`` starts (the command group registers it), so it must not import
TensorFlow at module level: the server is imported inside the command, after TensorFlow's log noise is silenced.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from ema_export.console import quiet_native_stderr
from ema_export.contracts import DEFAULT_GRPC_PORT, DEFAULT_MODEL_NAME, DEFAULT_REST_PORT

_LOGGER_NAME = "serving.server"


def _bool_flag(*names: str, default: bool, help: str) -> Any:  # noqa: A002 (click's keyword)
    """A boolean flag that also takes a value, as TF Serving's do: ``--flag``, ``--flag=true``, ``--flag=false``."""
    return click.option(
        *names, type=click.BOOL, default=default, is_flag=False, flag_value=True, show_default=True, help=help
    )


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model-name", "--model_name", default=DEFAULT_MODEL_NAME, show_default=True,
              help="Name the model from --model-base-path is served under.")
@click.option("--model-base-path", "--model_base_path", default=None, metavar="DIR",
              help="TF Serving base path: an ema-export OUT_DIR holding numeric version directories (1/, 2/, ...).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_GRPC_PORT, show_default=True,
              help="gRPC port (0 picks a free one).")
@click.option("--rest-api-port", "--rest_api_port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help=f"REST port; 0 turns REST off (TF Serving's Docker image uses {DEFAULT_REST_PORT}).")
@click.option("--model-config-file", "--model_config_file", default=None, metavar="FILE",
              help="ModelServerConfig text file: several models, version policies, version labels. "
                   "Exclusive with --model-base-path.")
@click.option("--model-config-file-poll-wait-seconds", "--model_config_file_poll_wait_seconds", type=float,
              default=0.0, show_default=True, help="Re-read --model-config-file this often; 0 reads it once.")
@click.option("--file-system-poll-wait-seconds", "--file_system_poll_wait_seconds", type=float, default=1.0,
              show_default=True, help="Look for new or removed versions this often; 0 looks once, at start.")
@_bool_flag("--enable-model-warmup", "--enable_model_warmup", default=True,
            help="Replay <version>/assets.extra/tf_serving_warmup_requests when a version loads.")
@_bool_flag("--allow-version-labels-for-unavailable-models", "--allow_version_labels_for_unavailable_models",
            default=False, help="Let version_labels point at versions that are not AVAILABLE yet (needed for labels "
                                "in the start-up config, as in TF Serving).")
@_bool_flag("--enable-serialization-as-tensor-content", "--enable_serialization_as_tensor_content", default=False,
            help="Answer with tensor_content bytes instead of typed fields such as float_val.")
@_bool_flag("--enable-signature-method-name-check", "--enable_signature_method_name_check", default=False,
            help="Refuse Predict on signatures whose method_name is not predict, classify or regress (TF Serving's "
                 "flag, off by default there too).")
@click.option("--max-num-load-retries", "--max_num_load_retries", type=click.IntRange(0), default=5,
              show_default=True, help="More attempts after a version fails to load (e.g. a version still being "
                                      "copied in); 0 tries once. TF Serving's default.")
@click.option("--load-retry-interval-micros", "--load_retry_interval_micros", type=int, default=60_000_000,
              show_default=True, help="Microseconds between load attempts; negative means no wait. TF Serving's "
                                      "default is one minute.")
@_bool_flag("--enable-grpc-healthcheck-service", "--enable_grpc_healthcheck_service", default=False,
            help="Register the standard gRPC health service (names \"\", ModelService, PredictionService), as "
                 "TF Serving does with this flag.")
@click.option("--grpc-max-threads", "--grpc_max_threads", type=click.IntRange(1), default=16, show_default=True,
              help="Requests answered concurrently.")
@click.option("--max-request-bytes", "--max_request_bytes", type=click.IntRange(1), default=2**31 - 1,
              show_default=True, help="Largest gRPC message, REST body and decoded inputs of one request "
                                      "(TF Serving's INT32_MAX by default).")
@click.option("--max-broadcast-bytes", "--max_broadcast_bytes", type=click.IntRange(0), default=16 << 20,
              show_default=True, help="Largest expansion of repeated values (one float_val filling a large shape) "
                                      "in one request; 0 = no limit, as in TF Serving.")
@click.option("--host", default="0.0.0.0", show_default=True,
              help="Interface to listen on (TF Serving listens on all of them; 127.0.0.1 keeps it local).")
@click.option("--grace-period", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds in-flight requests get to finish on SIGTERM or Ctrl-C.")
@click.option("--verbose", "-v", is_flag=True, help="Show TensorFlow's own log and debug messages.")
def serve(
    model_name: str,
    model_base_path: str | None,
    port: int,
    rest_api_port: int,
    model_config_file: str | None,
    model_config_file_poll_wait_seconds: float,
    file_system_poll_wait_seconds: float,
    enable_model_warmup: bool,
    allow_version_labels_for_unavailable_models: bool,
    enable_serialization_as_tensor_content: bool,
    enable_signature_method_name_check: bool,
    max_num_load_retries: int,
    load_retry_interval_micros: int,
    enable_grpc_healthcheck_service: bool,
    grpc_max_threads: int,
    max_request_bytes: int,
    max_broadcast_bytes: int,
    host: str,
    grace_period: float,
    verbose: bool,
) -> None:
    """Serve ema-export SavedModels over TF Serving's gRPC API (and REST), like tensorflow_model_server.

    \b
    Examples:
      ema-serving serve --model-base-path models/classifier --rest-api-port 8501
      ema-serving serve --model_config_file=serving/configs/models.config --allow_version_labels_for_unavailable_models
    """
    _configure_logging(verbose)
    with quiet_native_stderr(enabled=not verbose):
        from serving.config import ModelConfigError
        from serving.server import ServerError, ServerOptions, start_server
    if not verbose:  # TensorFlow's Python warnings (deprecations) too
        logging.getLogger("tensorflow").setLevel(logging.ERROR)

    options = ServerOptions(
        model_name=model_name,
        model_base_path=model_base_path,
        port=port,
        rest_api_port=rest_api_port or None,
        model_config_file=model_config_file,
        file_system_poll_wait_seconds=file_system_poll_wait_seconds,
        host=host,
        model_config_file_poll_wait_seconds=model_config_file_poll_wait_seconds,
        enable_model_warmup=enable_model_warmup,
        allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
        enable_serialization_as_tensor_content=enable_serialization_as_tensor_content,
        grpc_max_threads=grpc_max_threads,
        enable_signature_method_name_check=enable_signature_method_name_check,
        max_num_load_retries=max_num_load_retries,
        load_retry_interval_micros=load_retry_interval_micros,
        enable_grpc_healthcheck_service=enable_grpc_healthcheck_service,
        max_request_bytes=max_request_bytes,
        max_broadcast_bytes=max_broadcast_bytes,
    )
    try:
        server = start_server(options)
    except (ServerError, ModelConfigError) as error:
        raise click.ClickException(str(error)) from None

    rest = f", REST on {host}:{server.rest_port}" if server.rest_port else " (REST off: --rest-api-port)"
    click.echo(f"ema-serving: gRPC on {host}:{server.port}{rest}")
    for line in server.describe_models():
        click.echo(f"  model {line}")
    stop = _catch_stop_signals()  # before "Serving.": a supervisor may signal as soon as it reads that line
    click.echo("Serving. Stop with Ctrl-C or SIGTERM.", nl=True)
    sys.stdout.flush()

    _wait_for_stop_signal(stop)
    click.echo(f"Stopping: in-flight requests get up to {grace_period:g} s to finish...")
    server.stop(grace=grace_period)
    click.echo("Stopped.")
    # Everything is released; skip the interpreter's teardown, which spends seconds collecting TensorFlow's objects
    # and would carry the exit past the grace period.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _catch_stop_signals() -> tuple[threading.Event, dict[int, Any]]:
    """Route SIGTERM and SIGINT to an event, so a stop signal always means a graceful stop; return the previous
    handlers too."""
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    return stop, {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def _wait_for_stop_signal(caught: tuple[threading.Event, dict[int, Any]]) -> None:
    """Block until SIGTERM or SIGINT, then restore the previous handlers."""
    stop, previous = caught
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_logging(verbose: bool) -> None:
    """Show the server's own events (loads, unloads, failures) on stderr; TensorFlow's only with --verbose."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


