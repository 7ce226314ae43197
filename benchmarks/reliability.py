"""Attack the local server and the exporter as a reliability engineer would, on loopback, and print each figure.

Scenarios (every count and duration bounded; ``--quick`` shrinks them for a smoke run):

* cost: what one request costs the server process (RSS growth, time): the few-byte Predict request declaring
  [2^24, 4] with one ``float_val`` (refused before allocating), a dense 16 MiB request (cost per row and per byte
  received), a 20 MB REST body;
* fuzz: random and mutated gRPC Predict requests (raw bytes and structured mutations) and REST requests (bodies,
  headers, methods); counts answers by code and checks the server is still alive and not bigger;
* load: N clients for a few seconds: requests, errors, RSS growth;
* hot swap: versions 2 and 3 published (copy, then rename) under 8 clients: failed requests, versions seen;
* shutdown: SIGTERM under 8 clients, repeated: in-flight calls that got no answer (CANCELLED or worse), the time to
  exit, and the time to exit with an idle REST connection open;
* export faults: ``kill -9`` of ``ema-export`` at random moments: broken versions left (numeric directories without
  a complete SavedModel and manifest), and temporary directories the next export leaves behind.

Each server is ``ema-serving serve`` in a child process (its RSS is read from /proc); baselines are measured in the
same run. Run: ``.venv/bin/python benchmarks/reliability.py`` (a few minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from ema_export.names import ASSETS_EXTRA_DIR, MANIFEST_FILENAME, TEMP_VERSION_PREFIX  # noqa: E402
from serving import codec  # noqa: E402
from serving.protocol import predict_pb2  # noqa: E402

MODEL_NAME = "model"
INPUT_NAME = "inputs"
NUM_FEATURES = 4
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
ANSWERS = ("OK", "UNAVAILABLE")  # during a shutdown, the two answers a client can act on


@dataclass(frozen=True)
class Sizes:
    """Bounded counts and durations of one run."""

    fuzz_grpc: int = 500
    fuzz_rest: int = 200
    load_clients: int = 16
    load_seconds: float = 5.0
    swap_seconds: float = 6.0
    shutdown_runs: int = 6
    export_kills: int = 10


QUICK = Sizes(fuzz_grpc=100, fuzz_rest=50, load_clients=8, load_seconds=2.0, swap_seconds=4.0, shutdown_runs=2,
              export_kills=3)


# ------------------------------------------------------------------------------------------------ the model


def build_model():
    """A linear model with a serving signature (the exporter imports it as ``reliability:build_model``)."""
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="linear")
            self.weights = tf.Variable(tf.zeros([NUM_FEATURES, 3]), name="weights")
            self.biases = tf.Variable(tf.zeros([3]), name="biases")

        @tf.function(input_signature=[tf.TensorSpec([None, NUM_FEATURES], tf.float32, name=INPUT_NAME)])
        def __call__(self, inputs):
            return tf.matmul(inputs, self.weights) + self.biases

    return Linear()


def write_checkpoints(ckpt_dir: Path, scale: float) -> None:
    """A training checkpoint and its EMA checkpoint, weights scaled so each version answers differently."""
    import tensorflow as tf

    weights = tf.Variable(np.full((NUM_FEATURES, 3), scale, np.float32), name="weights")
    biases = tf.Variable(np.zeros(3, np.float32), name="biases")
    average = tf.train.ExponentialMovingAverage(decay=0.99)
    average.apply([weights, biases])
    tf.train.CheckpointManager(tf.train.Checkpoint(weights=weights, biases=biases), str(ckpt_dir), 1).save()
    shadows = {variable.name: average.average(variable) for variable in (weights, biases)}
    tf.train.CheckpointManager(tf.train.Checkpoint(ema_weights=shadows), str(ckpt_dir / "ema"), 1).save()


def export_versions(root: Path) -> tuple[Path, dict[int, Path]]:
    """Export versions 1-3 into a library; return the checkpoint of version 1 and each version's directory."""
    import ema_export

    library = root / "library"
    for version in (1, 2, 3):
        write_checkpoints(root / f"ckpt{version}", float(version))
        ema_export.export(root / f"ckpt{version}", library, model=build_model, version=version)
    return root / "ckpt1", {version: library / str(version) for version in (1, 2, 3)}


def publish(version_dir: Path, base_path: Path, version: int) -> None:
    """Copy a version in under a temporary name and rename it into place, as the README says to."""
    base_path.mkdir(parents=True, exist_ok=True)
    staging = base_path / f"copy-{version}-{time.monotonic_ns()}"
    shutil.copytree(version_dir, staging)
    staging.rename(base_path / str(version))


# ------------------------------------------------------------------------------------------------ the server


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    port: int
    rest_port: int | None

    def rss(self) -> int:
        return resident_bytes(self.process.pid)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(base_path: Path, *flags: str, rest: bool = False) -> Iterator[Server]:
    """`ema-serving serve` in a child process on 127.0.0.1; killed at the end if still running."""
    rest_port = free_port() if rest else None
    command = [sys.executable, "-c", "from serving.cli import main; main()", "serve", "--model-base-path",
               str(base_path), "--port", "0", "--host", "127.0.0.1", *flags]
    if rest_port:
        command += ["--rest-api-port", str(rest_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = process.stdout.readline()
        if "gRPC on 127.0.0.1:" not in first:
            raise RuntimeError(f"server did not start: {first!r}")
        port = int(first.split("127.0.0.1:")[1].split()[0].rstrip(","))
        while "Serving." not in process.stdout.readline():
            pass
        yield Server(process, port, rest_port)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def raw_predict(channel: grpc.Channel) -> Callable[..., bytes]:
    """Predict taking and returning serialized bytes, so malformed requests reach the server as they are."""
    return channel.unary_unary(PREDICT_METHOD)


def predict_bytes(rows: int, *, dense: bool = True, seed: int = 0) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    if dense:
        values = np.random.default_rng(seed).normal(size=(rows, NUM_FEATURES)).astype(np.float32)
        codec.encode(values, out=request.inputs[INPUT_NAME])
    else:
        codec.encode(np.float32(1.0), shape=(rows, NUM_FEATURES), form="values", out=request.inputs[INPUT_NAME])
    return request.SerializeToString()


def http_exchange(port: int, raw: bytes, timeout: float = 30.0) -> int:
    """Send raw HTTP, return the status code (0: no answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(raw)
            connection.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
    except OSError:
        return 0
    try:
        return int(received.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def http_post(body: bytes, headers: dict[str, str] | None = None, method: str = "POST",
              path: str = PREDICT_PATH) -> bytes:
    fields = {"Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (head + "\r\n").encode() + body


class PeakRss:
    """Samples a process's RSS every few milliseconds while a block runs; ``growth`` is peak minus the start."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.start = resident_bytes(pid)
        self.peak = self.start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.05)
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, resident_bytes(self._pid))
            time.sleep(0.003)


# ------------------------------------------------------------------------------------------------ scenarios


def scenario_cost(base_path: Path) -> None:
    print("\n== cost of one request (server RSS growth, sampled every 3 ms)")
    with serve(base_path, rest=True) as server, grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        predict = raw_predict(channel)
        predict(predict_bytes(2), timeout=30)
        tiny = predict_bytes(2**24, dense=False)
        with PeakRss(server.process.pid) as rss:
            started = time.monotonic()
            try:
                predict(tiny, timeout=30)
                outcome = "OK (served!)"
            except grpc.RpcError as error:
                outcome = error.code().name
            elapsed = time.monotonic() - started
        print(f"  {len(tiny)}-byte request declaring [2^24, 4] (256 MiB decoded): {outcome} in {elapsed * 1e3:.1f} ms,"
              f" RSS +{rss.growth / 2**20:.1f} MiB (it cost +2.5 GB before the limit)")
        dense = predict_bytes(2**20)
        with PeakRss(server.process.pid) as rss:
            started = time.monotonic()
            predict(dense, timeout=60)
            elapsed = time.monotonic() - started
        print(f"  dense request of 2^20 rows ({len(dense) / 2**20:.0f} MiB): {elapsed:.2f} s, RSS peak "
              f"+{rss.growth / 2**20:.0f} MiB = {rss.growth / 2**20:.0f} B per row = {rss.growth / len(dense):.1f}x "
              "the bytes received")
        rows = np.random.default_rng(0).normal(size=(2**19, NUM_FEATURES)).round(6).tolist()
        body = json.dumps({"instances": rows}).encode()
        with PeakRss(server.process.pid) as rss:
            started = time.monotonic()
            status = http_exchange(server.rest_port, http_post(body), timeout=120)
            elapsed = time.monotonic() - started
        print(f"  REST body of {len(body) / 1e6:.0f} MB ({len(rows)} rows): HTTP {status} in {elapsed:.1f} s, RSS peak "
              f"+{rss.growth / 2**20:.0f} MiB = {rss.growth / len(body):.0f}x the body")


def _grpc_mutations(rng: random.Random) -> Iterator[bytes]:
    valid = predict_bytes(4)
    while True:
        kind = rng.randrange(6)
        if kind == 0:  # flip bytes
            data = bytearray(valid)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data)
        elif kind == 1:  # truncate
            yield valid[: rng.randrange(len(valid))]
        elif kind == 2:  # random bytes
            yield rng.randbytes(rng.randint(0, 200))
        else:  # structured: shapes, dtypes, names, filters, content lengths
            request = predict_pb2.PredictRequest.FromString(valid)
            tensor = request.inputs[INPUT_NAME]
            if kind == 3:
                del tensor.tensor_shape.dim[:]
                for _ in range(rng.randint(0, 6)):
                    tensor.tensor_shape.dim.add().size = rng.choice([0, 1, 4, -1, 2**31, 2**40, rng.randint(0, 99)])
            elif kind == 4:
                tensor.dtype = rng.randint(0, 30)
                if rng.random() < 0.5:
                    tensor.tensor_content = tensor.tensor_content[: rng.randrange(64)]
            else:
                request.model_spec.signature_name = rng.choice(["", "serve_live", "serve_ema", "nope", "x" * 5000])
                request.output_filter.extend(rng.choice(["output_0", "y" * 3000]) for _ in range(rng.randint(0, 5)))
                if rng.random() < 0.5:
                    request.inputs["extra" + str(rng.randint(0, 9))].CopyFrom(tensor)
            yield request.SerializeToString()


def _rest_mutations(rng: random.Random) -> Iterator[bytes]:
    valid = json.dumps({"instances": [[1.0, 2.0, 3.0, 4.0]] * 3}).encode()
    while True:
        kind = rng.randrange(7)
        if kind == 0:
            data = bytearray(valid)
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield http_post(bytes(data))
        elif kind == 1:
            yield http_post(valid[: rng.randrange(len(valid))])
        elif kind == 2:
            depth = rng.choice([10, 100, 1000, 10_000, 100_000])
            yield http_post(b'{"instances": ' + b"[" * depth + b"1" + b"]" * depth + b"}")
        elif kind == 3:
            length = rng.choice(["abc", "-5", "", "99999999999", "1e3", str(len(valid) + 5)])
            yield http_post(valid, {"Content-Length": length})
        elif kind == 4:
            chunk = rng.choice([b"%x\r\n%s\r\n0\r\n\r\n" % (len(valid), valid), b"zz\r\n", b"5\r\n{}"])
            yield http_post(chunk, {"Transfer-Encoding": "chunked"}).replace(
                b"Content-Length: %d\r\n" % len(chunk), b"")
        elif kind == 5:
            yield http_post(b"", method=rng.choice(["PUT", "DELETE", "PATCH", "TRACE", "OPTIONS", "HEAD", "BREW"]),
                            path=f"/v1/models/{MODEL_NAME}")
        else:
            value = rng.choice(['"x"', "1e400", "true", "null", "[1, [2]]", '{"b64": "!!"}', "-1e39"])
            yield http_post(f'{{"instances": [[{value}, 1, 2, 3]]}}'.encode())


def scenario_fuzz(base_path: Path, sizes: Sizes) -> None:
    print(f"\n== fuzz: {sizes.fuzz_grpc} gRPC and {sizes.fuzz_rest} REST random or mutated requests")
    rng = random.Random(14)
    with serve(base_path, rest=True) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        predict = raw_predict(channel)
        predict(predict_bytes(2), timeout=30)
        before = server.rss()
        codes: collections.Counter[str] = collections.Counter()
        for data in _take(_grpc_mutations(rng), sizes.fuzz_grpc):
            try:
                predict(data, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as error:
                # gRPC itself answers INTERNAL to bytes that do not parse as a PredictRequest (as TF Serving's does).
                unparsed = error.code() == grpc.StatusCode.INTERNAL and "deserializ" in (error.details() or "")
                codes["INTERNAL (unparseable bytes)" if unparsed else error.code().name] += 1
        statuses: collections.Counter[int] = collections.Counter(
            http_exchange(server.rest_port, raw, timeout=10) for raw in _take(_rest_mutations(rng), sizes.fuzz_rest)
        )
        alive = server.process.poll() is None
        growth = server.rss() - before
    print(f"  gRPC answers by code: {dict(codes.most_common())}")
    print(f"  REST answers by HTTP status (0 = none): {dict(sorted(statuses.items()))}")
    unexpected = codes["INTERNAL"] + codes["UNKNOWN"] + sum(n for status, n in statuses.items() if status >= 500
                                                            and status != 501 or status == 0)
    print(f"  server alive: {alive}; unexpected answers (INTERNAL/UNKNOWN, 5xx other than 501, none): {unexpected};"
          f" RSS {growth / 2**20:+.1f} MiB")


def _take(iterator: Iterator[bytes], count: int) -> Iterator[bytes]:
    for _, item in zip(range(count), iterator, strict=False):
        yield item


def _hammer(port: int, seconds: float, num_clients: int, request: bytes) -> tuple[int, collections.Counter, set]:
    """``num_clients`` clients sending ``request`` back to back for ``seconds``: count, errors, versions seen."""
    deadline = time.monotonic() + seconds
    errors: collections.Counter[str] = collections.Counter()
    versions: set[int] = set()
    counts = [0] * num_clients
    lock = threading.Lock()

    def client(index: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            predict = raw_predict(channel)
            while time.monotonic() < deadline:
                try:
                    response = predict_pb2.PredictResponse.FromString(predict(request, timeout=30))
                    with lock:
                        versions.add(response.model_spec.version.value)
                except grpc.RpcError as error:
                    with lock:
                        errors[error.code().name] += 1
                counts[index] += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), errors, versions


def scenario_load(base_path: Path, sizes: Sizes) -> None:
    print(f"\n== load: {sizes.load_clients} clients for {sizes.load_seconds:g} s")
    with serve(base_path) as server:
        request = predict_bytes(8)
        _hammer(server.port, 0.5, 2, request)  # warm
        before = server.rss()
        total, errors, _ = _hammer(server.port, sizes.load_seconds, sizes.load_clients, request)
        growth = (server.rss() - before) / before
    print(f"  {total} requests ({total / sizes.load_seconds:.0f}/s), errors {dict(errors) or 0}, RSS {growth:+.2%}")


def scenario_hot_swap(root: Path, versions: dict[int, Path], sizes: Sizes) -> None:
    print(f"\n== hot swap: versions 2 and 3 published under 8 clients for {sizes.swap_seconds:g} s")
    base_path = root / "swap"
    publish(versions[1], base_path, 1)
    with serve(base_path, "--file-system-poll-wait-seconds", "0.2") as server:
        def swapper() -> None:
            for version in (2, 3):
                time.sleep(sizes.swap_seconds / 3)
                publish(versions[version], base_path, version)

        thread = threading.Thread(target=swapper)
        thread.start()
        total, errors, seen = _hammer(server.port, sizes.swap_seconds, 8, predict_bytes(4))
        thread.join()
    print(f"  {total} requests, failed {sum(errors.values())} {dict(errors) or ''}, versions answered {sorted(seen)}")


def _shutdown_run(
    base_path: Path, grace: float
) -> tuple[collections.Counter, collections.Counter, tuple[float, float]]:
    """8 clients, SIGTERM mid-load: codes of the calls in flight at the signal, of all calls, time to stop and exit."""
    records: list[tuple[float, float, str]] = []
    with serve(base_path, f"--grace-period={grace}") as server:
        running = threading.Event()

        def client(index: int) -> None:
            request = predict_bytes(20_000, seed=index)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                predict = raw_predict(channel)
                while True:
                    started = time.monotonic()
                    try:
                        predict(request, timeout=30)
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    records.append((started, time.monotonic(), code))
                    running.set()
                    if code != "OK":
                        return

        threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        running.wait(30)
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        stopped = _time_to_stopped(server, signalled)
        server.process.wait(grace + 30)
        exited = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    in_flight = collections.Counter(code for started, ended, code in records if started < signalled < ended)
    return in_flight, collections.Counter(code for _, _, code in records), (stopped, exited)


def _time_to_stopped(server: Server, signalled: float) -> float:
    """Seconds from the signal to the server's "Stopped." line (the interpreter's own exit comes after)."""
    for line in server.process.stdout:
        if line.startswith("Stopped."):
            return time.monotonic() - signalled
    return float("nan")


def scenario_shutdown(base_path: Path, sizes: Sizes) -> None:
    print(f"\n== shutdown: SIGTERM under 8 clients, {sizes.shutdown_runs} runs, --grace-period=5")
    in_flight_total: collections.Counter[str] = collections.Counter()
    all_codes: collections.Counter[str] = collections.Counter()
    exits = []
    for _ in range(sizes.shutdown_runs):
        in_flight, codes, exited = _shutdown_run(base_path, 5.0)
        in_flight_total.update(in_flight)
        all_codes.update(codes)
        exits.append(exited)
    unanswered = sum(n for code, n in in_flight_total.items() if code not in ANSWERS)
    print(f"  in flight at SIGTERM: {sum(in_flight_total.values())} calls, {dict(in_flight_total)}; "
          f"without an answer (CANCELLED or other): {unanswered}")
    stops, ends = [stop for stop, _ in exits], [end for _, end in exits]
    print(f"  all calls: {dict(all_codes)}; SIGTERM to \"Stopped.\": {min(stops):.2f}-{max(stops):.2f} s, "
          f"to process exit: {min(ends):.2f}-{max(ends):.2f} s")
    with serve(base_path, "--grace-period=5", rest=True) as server:
        idle = socket.create_connection(("127.0.0.1", server.rest_port))
        time.sleep(0.3)  # accepted, and waiting for a request line that never comes
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        stopped = _time_to_stopped(server, started)
        server.process.wait(120)
        exited = time.monotonic() - started
        idle.close()
    print(f"  with one idle REST connection open: SIGTERM to \"Stopped.\" {stopped:.2f} s, to exit {exited:.2f} s "
          "(grace period 5 s; 61 s before)")


def scenario_export_faults(root: Path, checkpoint: Path, sizes: Sizes) -> None:
    print(f"\n== export faults: kill -9 of ema-export at random moments, {sizes.export_kills} times")
    out_dir = root / "faults"
    command = [sys.executable, "-c", "from ema_export.cli import main; main()", str(checkpoint), str(out_dir),
               "--model", "reliability:build_model"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    started = time.monotonic()
    subprocess.run(command, env=environment, check=True, capture_output=True)
    full = time.monotonic() - started
    rng = random.Random(7)
    mid_write = 0  # kills that left a half-written temporary directory behind
    for _ in range(sizes.export_kills):
        process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5 * full, 1.1 * full))  # the late half is where files are written
        process.send_signal(signal.SIGKILL)
        process.wait()
        mid_write += any(child.name.startswith(TEMP_VERSION_PREFIX) for child in out_dir.iterdir())
    numeric = [child for child in out_dir.iterdir() if child.name.isdigit()]
    broken = [child.name for child in numeric if not (child / "saved_model.pb").is_file()
              or not (child / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).is_file()]
    left = [child for child in out_dir.iterdir() if child.name.startswith(TEMP_VERSION_PREFIX)]
    subprocess.run(command, env=environment, check=True, capture_output=True)
    left_after = [child for child in out_dir.iterdir() if child.name.startswith(TEMP_VERSION_PREFIX)]
    print(f"  one export takes {full:.1f} s; {mid_write} of {sizes.export_kills} kills left a half-written temporary "
          f"directory; numeric versions {len(numeric)}, broken {len(broken)} {broken or ''}; temporary directories "
          f"{len(left)} after the kills, {len(left_after)} after the next export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (cost fuzz load swap shutdown export)")
    arguments = parser.parse_args()
    sizes = QUICK if arguments.quick else Sizes()
    chosen = set(arguments.only or ["cost", "fuzz", "load", "swap", "shutdown", "export"])
    with tempfile.TemporaryDirectory(prefix="ema-reliability-") as temporary:
        root = Path(temporary)
        checkpoint, versions = export_versions(root)
        base_path = root / "models"
        publish(versions[1], base_path, 1)
        if "cost" in chosen:
            scenario_cost(base_path)
        if "fuzz" in chosen:
            scenario_fuzz(base_path, sizes)
        if "load" in chosen:
            scenario_load(base_path, sizes)
        if "swap" in chosen:
            scenario_hot_swap(root, versions, sizes)
        if "shutdown" in chosen:
            scenario_shutdown(base_path, sizes)
        if "export" in chosen:
            scenario_export_faults(root, checkpoint, sizes)


if __name__ == "__main__":
    main()
