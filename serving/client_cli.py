"""`ema-serving predict | compare | merge | metadata | status`: the client side of the command line.

Each command opens a ``ServingClient``, calls one library function and prints the result as a table for people or,
with ``--json``, as one JSON document for scripts. Library errors become one line on stderr saying what was wrong,
what was expected and how to fix it, with no traceback. Exit codes: 1 other server errors (and mixed model versions),
2 bad input data or arguments, 3 server unreachable or too slow, 4 unknown model, version or signature, 5 more rows
failed than ``--max-failure-rate`` allows (the report is printed first).

These commands never load the TensorFlow runtime (``serving.protocol``), so they start in a fraction of a second.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from ema_export.contracts import DEFAULT_GRPC_PORT, DEFAULT_MODEL_NAME, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from serving import report as page
from serving.ab import (
    CompareOptions,
    CompareReport,
    IncompleteComparisonError,
    PredictionWriter,
    Progress,
    compare as compare_arms,
    load_dataset,
    merge_reports,
)
from serving.data import DataOptions, Shard, open_data
from serving.client import DEFAULT_TIMEOUT_S, ModelMetadata, Prediction, ServingClient, TlsOptions, VersionStatus
from serving.protocol import (
    DataError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    SignatureNotFoundError,
)

_EXIT_CODES: tuple[tuple[type[ServingError], int], ...] = (
    (DataError, 2),
    (InvalidRequestError, 2),
    (ServerUnavailableError, 3),
    (DeadlineExceededError, 3),
    (ModelNotFoundError, 4),
    (SignatureNotFoundError, 4),
)


class _CommandError(click.ClickException):
    """A ClickException with a chosen exit code: click prints ``Error: <message>`` and exits, no traceback."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def _client(options: dict[str, Any]) -> Iterator[ServingClient]:
    """Open the client described by the shared options, turning library errors into one-line CLI errors."""
    tls = None
    if options["tls"] or options["tls_ca"] or options["tls_cert"]:
        tls = TlsOptions.from_files(
            options["tls_ca"], options["tls_key"], options["tls_cert"], options["tls_server_name"]
        )
    try:
        # Round robin spreads calls over every address the target resolves to (a headless Service's pods); gRPC's
        # default, pick_first, sends them all down one connection to one pod.
        balancing = (("grpc.lb_policy_name", "round_robin"),) if options["round_robin"] else ()
        with ServingClient(options["target"], timeout=options["timeout"], tls=tls, channel_options=balancing) as client:
            yield client
    except ServingError as error:
        code = next((code for kind, code in _EXIT_CODES if isinstance(error, kind)), 1)
        raise _CommandError(" ".join(str(error).split()), code) from error


def _shared_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the connection, model and output options every client command takes, collected in ``options``."""
    decorators = [
        click.option(
            "--target",
            default=f"localhost:{DEFAULT_GRPC_PORT}",
            show_default=True,
            envvar="EMA_SERVING_TARGET",
            help="HOST:PORT of the TF Serving gRPC endpoint (env EMA_SERVING_TARGET).",
        ),
        click.option("--model", default=DEFAULT_MODEL_NAME, show_default=True, help="Served model name."),
        click.option("--version", type=int, default=None, help="Pin a version number (default: the server's choice)."),
        click.option("--version-label", default=None, help="Pin a version label, e.g. 'stable' (not with --version)."),
        click.option(
            "--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True, help="Per-call deadline, seconds."
        ),
        click.option("--tls", is_flag=True, help="Use TLS with the system's root certificates."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="PEM CA bundle (implies --tls)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM client certificate (mTLS)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM client key (mTLS)."),
        click.option("--tls-server-name", default=None, help="Name expected in the server certificate."),
        click.option("--round-robin", is_flag=True,
                     help="Spread calls over every address the target resolves to, e.g. a headless Kubernetes "
                          "Service: --target dns:///ema-serving-grpc.NAMESPACE.svc.cluster.local:8500."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table."),
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        names = ("target", "model", "version", "version_label", "timeout", "tls", "tls_ca", "tls_cert", "tls_key",
                 "tls_server_name", "round_robin", "as_json")  # fmt: skip
        options = {name: kwargs.pop(name) for name in names}
        command(options=options, **kwargs)

    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


def _emit(document: Any, as_json: bool, table: Callable[[], str]) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=_json_default) if as_json else table())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}  # TF Serving REST's convention for bytes
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _rows(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A plain aligned text table."""
    cells = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------ commands
@click.command()
@_shared_options
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".npz with arrays named like the inputs (others are ignored), or .npy.")  # fmt: skip
@click.option("--signature", default=SIGNATURE_DEFAULT, show_default=True,
              help=f"Signature to run ({SIGNATURE_LIVE}, {SIGNATURE_EMA}, {SIGNATURE_DEFAULT}...).")  # fmt: skip
def predict(options: dict[str, Any], data_path: str, signature: str) -> None:
    """Run one signature on the inputs in --data and print its outputs."""
    with _client(options) as client:
        spec = client.metadata(options["model"], version=options["version"], version_label=options["version_label"])
        dataset = load_dataset(data_path, spec.signature(signature), ignore_extra=True)
        result = client.predict(
            options["model"],
            dataset.inputs,
            signature=signature,
            version=options["version"],
            version_label=options["version_label"],
        )
    _emit(_prediction_document(options["model"], result), options["as_json"], lambda: _prediction_table(result))


def _prediction_document(model: str, result: Prediction) -> dict[str, Any]:
    return {
        "model": model,
        "model_version": result.model_version,
        "signature": result.signature,
        "latency_ms": result.latency_s * 1000.0,
        "outputs": {
            name: {"dtype": str(array.dtype), "shape": list(array.shape), "values": array}
            for name, array in result.outputs.items()
        },
    }


def _prediction_table(result: Prediction) -> str:
    rows = [
        (name, array.dtype, list(array.shape), np.array2string(array, threshold=12, edgeitems=2).replace("\n", " "))
        for name, array in sorted(result.outputs.items())
    ]
    title = f"{result.signature} (version {result.model_version}, {result.latency_s * 1000:.1f} ms)"
    return title + "\n" + _rows(("output", "dtype", "shape", "values"), rows)


@click.command()
@_shared_options
@click.option("--data", "data_paths", required=True, multiple=True,
              help="TFRecord files of tf.Example (repeat the flag or use a glob: 'val-*.tfrecord.gz'; plain or GZIP) "
                   "with features named like the inputs; or one .npz (arrays named like the inputs) or .npy.")
@click.option("--labels", "labels_key", default=None,
              help="Name of the labels array (.npz) or feature (TFRecord).")
@click.option("--baseline", default=SIGNATURE_LIVE, show_default=True, help="Baseline arm (diff = candidate - it).")
@click.option("--candidate", default=SIGNATURE_EMA, show_default=True, help="Candidate arm.")
@click.option("--batch-size", type=click.IntRange(min=1), default=CompareOptions.batch_size, show_default=True,
              help="Examples per request.")
@click.option("--output", "output_name", default=None, help="Output to compare when the signature has several.")
@click.option("--task", type=click.Choice(["auto", "classification", "regression"]), default="auto", show_default=True,
              help="How to read the output: argmax class scores, or regression values.")
@click.option("--in-flight", "in_flight", type=click.IntRange(min=1), default=CompareOptions.max_in_flight_batches,
              show_default=True, help="Batches in flight; 1 times each request alone.")
@click.option("--shard", "shard_text", default="0/1", show_default=True,
              help="Take rows (records) r with r % N == I, for N processes splitting one data set; merge their --json "
                   "reports with `ema-serving merge`.")
@click.option("--compression", type=click.Choice(["auto", "none", "gzip"]), default="auto", show_default=True,
              help="TFRecord compression (auto: GZIP when the file starts like one).")
@click.option("--skip-corrupt", is_flag=True,
              help="Count and skip corrupt TFRecord records instead of stopping at the first.")
@click.option("--save-predictions", "predictions_path", type=click.Path(dir_okay=False), default=None,
              help="Write every row's outputs as JSON lines, as they come (published when the run ends).")
@click.option("--max-failure-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of rows allowed to go unanswered by an arm before the exit status is non-zero (5).")
@click.option("--progress/--no-progress", "show_progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison as one self-contained HTML page (plots, intervals, verdict).")
@click.option("--manifest", "manifest_path", type=click.Path(exists=True), default=None,
              help="With --report: the export's ema_export.json, its version directory or the model base path; "
                   "adds live-vs-EMA drift per variable.")  # fmt: skip
@click.option("--training-log", "training_log_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --report: a training log JSON ({records: [{step, live, ema}]}); adds learning curves.")
def compare(
    options: dict[str, Any],
    data_paths: tuple[str, ...],
    labels_key: str | None,
    baseline: str,
    candidate: str,
    batch_size: int,
    output_name: str | None,
    task: str,
    in_flight: int,
    shard_text: str,
    compression: str,
    skip_corrupt: bool,
    predictions_path: str | None,
    max_failure_rate: float,
    show_progress: bool | None,
    report_path: str | None,
    manifest_path: str | None,
    training_log_path: str | None,
) -> None:
    """Send the same inputs to two signatures (serve_live vs serve_ema) concurrently and compare them, streaming.

    The model version serving at the start (or --version) is named in every request. Exits 5 when more rows failed
    than --max-failure-rate allows (the report is still printed).
    """
    if report_path is None and (manifest_path or training_log_path):
        raise click.UsageError("--manifest and --training-log add panels to the HTML page; pass --report PATH.html.")
    compare_options = CompareOptions(
        arms=(baseline, candidate),
        batch_size=batch_size,
        output=output_name,
        task=task,  # type: ignore[arg-type]
        version=options["version"],
        version_label=options["version_label"],
        timeout=options["timeout"],
        max_in_flight_batches=in_flight,
    )
    with _client(options) as client:
        shard = Shard.parse(shard_text)
        data_options = DataOptions(labels_key, compression, skip_corrupt, shard)  # type: ignore[arg-type]
        spec = client.metadata(options["model"], version=options["version"], version_label=options["version_label"])
        spec.signature(baseline)
        if spec.version is not None:  # pin the version this first metadata call saw: the inputs were checked against it
            compare_options = dataclasses.replace(compare_options, version=spec.version, version_label=None)
        source = open_data(data_paths, spec.signature(candidate), data_options)
        training_log = page.load_training_log(training_log_path) if training_log_path else None
        writer = PredictionWriter(predictions_path) if predictions_path else None
        bar = _ProgressBar() if (show_progress if show_progress is not None else sys.stderr.isatty()) else None
        try:
            report = compare_arms(client, options["model"], source, options=compare_options, progress=bar,
                                  predictions=writer)  # fmt: skip
        finally:
            if bar is not None:
                bar.finish()
        if report_path is not None:
            _write_page(report, report_path, manifest_path, training_log, training_log_path)
    _finish_report(report, options["as_json"], max_failure_rate)


def _finish_report(report: CompareReport, as_json: bool, max_failure_rate: float) -> None:
    """Print the report, then fail (exit 5) if more rows failed than allowed."""
    _emit(report.to_dict(), as_json, lambda: _compare_table(report))
    try:
        report.check_failures(max_failure_rate)
    except IncompleteComparisonError as error:
        raise _CommandError(" ".join(str(error).split()), 5) from error


class _ProgressBar:
    """One self-rewriting stderr line: rows, rows/s and the running difference, at most ten times a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._width = 0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        difference = "" if progress.difference is None else f", {progress.difference_name} {progress.difference:+.4f}"
        line = (f"{progress.num_rows:,} rows ({progress.num_paired:,} paired), {progress.rows_per_second:,.0f} rows/s, "
                f"{progress.seconds:.0f} s{difference}")  # fmt: skip
        self._width = max(self._width, len(line))
        click.echo("\r" + line.ljust(self._width), nl=False, err=True)

    def finish(self) -> None:
        """End the line so what follows starts on its own."""
        if self._width:
            click.echo("", err=True)


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.option("--max-failure-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of rows allowed to go unanswered by an arm before the exit status is non-zero (5).")
def merge(reports: tuple[str, ...], as_json: bool, max_failure_rate: float) -> None:
    """Combine the --json reports of `compare --shard I/N` runs into the report one process would have produced.

    Refuses reports of different comparisons, shards missing or repeated, and rows answered by different versions.
    """
    documents = []
    for path in reports:
        try:
            documents.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise _CommandError(
                f"Cannot read {path} as a JSON report. Expected the output of `ema-serving compare --json`; check the "
                f"file. Received: {error}", 2) from error  # fmt: skip
    try:
        report = merge_reports(documents)
    except ServingError as error:
        code = next((code for kind, code in _EXIT_CODES if isinstance(error, kind)), 1)
        raise _CommandError(" ".join(str(error).split()), code) from error
    _finish_report(report, as_json, max_failure_rate)


def _write_page(report: CompareReport, path: str, manifest_path: str | None, training_log: dict[str, Any] | None,
                training_log_path: str | None) -> None:
    """Render ``--report`` (inside ``_client``, so a bad --manifest is a one-line error too); say where on stderr."""
    manifest = manifest_file = None
    if manifest_path is not None:
        manifest, manifest_file = page.find_manifest(manifest_path, report.model_version)
    sources = {name: str(where) for name, where in (("manifest", manifest_file), ("training log", training_log_path))
               if where is not None}
    inputs = page.ReportInputs(report.to_dict(), manifest, training_log, sources)
    click.echo(f"wrote the report to {page.write_report(path, inputs)}", err=True)


def _compare_table(report: CompareReport) -> str:
    arms = [
        (
            name,
            arm.n,
            arm.errors,
            _number(arm.accuracy),
            _number(arm.mae),
            _number(arm.mse),
            *(_number(getattr(arm.latency_ms, key, None), 2) for key in ("p50", "p90", "p99")),
        )
        for name, arm in report.arms.items()
    ]
    header = ("arm", "n", "errors", "accuracy", "mae", "mse", "p50 ms", "p90 ms", "p99 ms")
    lines = [
        f"model {report.model} version {report.model_version}: {report.task} on output {report.output!r}, "
        f"{report.num_paired}/{report.num_examples} examples answered by both arms",
        _rows(header, arms),
        "",
        f"{report.candidate} - {report.baseline}:",
        f"  mean |diff| {report.mean_abs_diff:.6g}, max |diff| {report.max_abs_diff:.6g}",
    ]
    if report.agreement is not None:
        lines.append(f"  top-1 agreement {report.agreement:.4f}, flip rate {report.flip_rate:.4f}")
    for label, interval in (("accuracy", report.accuracy_diff), ("MAE", report.mae_diff), ("MSE", report.mse_diff)):
        if interval is not None:
            estimate, low, high = interval.estimate, interval.low, interval.high
            lines.append(f"  {label} diff {estimate:+.4f} (95% CI {low:+.4f} .. {high:+.4f})")
    if report.mcnemar_p is not None:
        lines.append(f"  exact McNemar p = {report.mcnemar_p:.4g} (discordant {report.discordant})")
    if report.num_failed_rows:
        lines.append(f"{report.num_failed_rows} rows ({report.failure_rate:.2%}) not answered by both arms")
    if report.num_corrupt_skipped:
        lines.append(f"{report.num_corrupt_skipped} corrupt records skipped (--skip-corrupt)")
    return "\n".join(lines)


@click.command()
@_shared_options
def metadata(options: dict[str, Any]) -> None:
    """Print the model's signatures with their input and output names, dtypes and shapes."""
    with _client(options) as client:
        result = client.metadata(options["model"], version=options["version"], version_label=options["version_label"])
    _emit(asdict(result), options["as_json"], lambda: _metadata_table(result))


def _metadata_table(result: ModelMetadata) -> str:
    rows = []
    for signature in result.signatures.values():
        if signature.name.startswith("__"):
            continue  # TensorFlow's internal init signature; --json still lists it
        for role, specs in (("input", signature.inputs), ("output", signature.outputs)):
            for spec in specs.values():
                shape = "unknown" if spec.shape is None else "[" + ", ".join(str(size) for size in spec.shape) + "]"
                rows.append((signature.name, role, spec.name, spec.dtype, shape))
    title = f"model {result.model_name} version {result.version}"
    return title + "\n" + _rows(("signature", "kind", "name", "dtype", "shape"), rows)


@click.command()
@_shared_options
def status(options: dict[str, Any]) -> None:
    """Print the state (LOADING, AVAILABLE, ...) of each version of the model."""
    with _client(options) as client:
        versions = client.status(options["model"], version=options["version"], version_label=options["version_label"])
    document = {"model": options["model"], "versions": [asdict(version) for version in versions]}
    _emit(document, options["as_json"], lambda: _status_table(versions))


def _status_table(versions: list[VersionStatus]) -> str:
    rows = [(v.version, v.state, v.error_code, v.error_message or "-") for v in versions]
    return _rows(("version", "state", "code", "message"), rows)


__all__ = ["compare", "merge", "metadata", "predict", "status"]
