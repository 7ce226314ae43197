"""How much the local server adds to a Predict call, measured against the two numbers that bound it.

For a small MLP and a mid-size CNN (each a SavedModel with ema-export's three signatures), at batch 1:

* in-process: the ``serving_default`` signature of ``tf.saved_model.load`` called directly, numpy in and out
  (the last column also compares with the server's own runtime, a session callable, called in-process);
* served: ``PredictionService.Predict`` through ``ema-serving serve`` (a separate process, the official stubs);
* echo: a trivial gRPC method on the same stack (``grpc.server`` + thread pool, same request message), which only
  copies the request tensor into the response; this is the floor any Python gRPC server pays.

Overhead = served - in-process, printed as a multiple of the echo round trip (target <= 1.5x at batch 1). Then, for
the CNN, throughput with 8 concurrent clients through the server versus 8 threads calling the signature in-process
(target >= 0.7x).

Servers run in child processes so that client and server do not share one interpreter lock, as in production.

Run: ``.venv/bin/python benchmarks/server_bench.py`` (about two minutes on 2 cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE  # noqa: E402

ECHO_METHOD = "/ema_serving.bench.Echo/Echo"
NUM_CLIENTS = 8
TARGET_OVERHEAD_RATIO = 1.5
TARGET_THROUGHPUT_RATIO = 0.7


# ------------------------------------------------------------------------------------------------ the models


def _build_models(root: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Write the MLP and the CNN as version 1 under ``root/<name>/``; return base paths and input shapes."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def weights(*shape: int) -> tf.Variable:
        fan_in = int(np.prod(shape[:-1]))
        return tf.Variable(rng.normal(0, 1 / np.sqrt(fan_in), size=shape).astype(np.float32))

    class Mlp(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [(weights(64, 256), weights(256)), (weights(256, 256), weights(256)),
                           (weights(256, 10), weights(10))]

        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            for index, (kernel, bias) in enumerate(self.layers):
                x = tf.matmul(x, kernel) + bias
                x = tf.nn.relu(x) if index < len(self.layers) - 1 else tf.nn.softmax(x)
            return x

    class Cnn(tf.Module):
        """Four stages of two 3x3 convolutions (the first with stride 2), 32 to 256 channels: ~0.2 GMAC at 128x128."""

        def __init__(self) -> None:
            super().__init__()
            self.convs = []
            channels_in = 3
            for channels in (32, 64, 128, 256):
                self.convs.append((weights(3, 3, channels_in, channels), weights(channels), 2))
                self.convs.append((weights(3, 3, channels, channels), weights(channels), 1))
                channels_in = channels
            self.head = (weights(256, 10), weights(10))

        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            for kernel, bias, stride in self.convs:
                x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=stride, padding="SAME") + bias)
            x = tf.reduce_mean(x, axis=[1, 2])
            return tf.nn.softmax(tf.matmul(x, self.head[0]) + self.head[1])

    specs = {"mlp": (Mlp, (64,)), "cnn": (Cnn, (128, 128, 3))}
    models = {}
    for name, (factory, shape) in specs.items():
        live, ema = factory(), factory()
        spec = tf.TensorSpec([None, *shape], tf.float32, name="inputs")
        root_module = tf.Module()
        root_module.live, root_module.ema = live, ema
        root_module.serve_live = _serving_function(live, spec)
        root_module.serve_ema = _serving_function(ema, spec)
        signatures = {SIGNATURE_LIVE: root_module.serve_live, SIGNATURE_EMA: root_module.serve_ema,
                      SIGNATURE_DEFAULT: root_module.serve_ema}
        tf.saved_model.save(root_module, str(root / name / "1"), signatures=signatures)
        models[name] = (root / name, shape)
    return models


def _serving_function(module, spec):
    import tensorflow as tf

    @tf.function(input_signature=[spec])
    def serve(inputs):
        return {"output_0": module(inputs)}

    return serve


# ---------------------------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Latency:
    p50: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(ordered[len(ordered) // 2] * 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6)


def _latency(call, num_calls: int) -> Latency:
    for _ in range(max(20, num_calls // 10)):
        call()
    seconds = []
    for _ in range(num_calls):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return Latency.of(seconds)


def _throughput(make_call, num_threads: int, duration: float) -> float:
    """Calls per second with ``num_threads`` threads, each calling its own ``make_call()`` in a loop."""
    calls = [make_call() for _ in range(num_threads)]
    for call in calls:
        call()
    counts = [0] * num_threads
    stop = threading.Event()

    def worker(index: int) -> None:
        while not stop.is_set():
            calls[index]()
            counts[index] += 1

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(num_threads)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- the echo server


def _run_echo_server() -> None:
    """Child-process mode: a gRPC server whose one method copies the request's inputs into the response."""
    from tensorflow_serving.apis import predict_pb2

    def echo(request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        for name, tensor in request.inputs.items():
            response.outputs[name].CopyFrom(tensor)
        return response

    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=predict_pb2.PredictRequest.FromString,
        response_serializer=predict_pb2.PredictResponse.SerializeToString,
    )
    service, method = ECHO_METHOD.strip("/").split("/")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def _spawn(arguments: list[str], marker: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    for line in process.stdout:
        if marker in line:
            return process, int(line.split(marker)[1].split()[0].rstrip(","))
    raise RuntimeError(f"child process exited without printing {marker!r}: {arguments}")


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.echo_server:
        _run_echo_server()
        return

    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.server.servable import load_version

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # the TF1 loader's deprecation notice

    # Measurements alternate in rounds and report the median round, so that load from other processes on a shared
    # machine hits the served, in-process and echo numbers alike.
    num_rounds, num_calls, duration = (2, 300, 2.0) if arguments.quick else (5, 600, 3.0)
    workdir = Path(tempfile.mkdtemp(prefix="server-bench-"))
    models = _build_models(workdir)
    config = workdir / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
        for name, (base, _) in models.items()) + "}\n")

    server, port = _spawn(["-c", "from serving.cli import main; main()", "serve", "--model_config_file", str(config),
                           "--port", "0", "--host", "127.0.0.1", "--file_system_poll_wait_seconds=0"],
                          "gRPC on 127.0.0.1:")
    echo_server, echo_port = _spawn([__file__, "--echo-server"], "echo on 127.0.0.1:")
    channels: list[grpc.Channel] = []

    def channel_to(target_port: int) -> grpc.Channel:
        # One connection per client, as separate client processes would have.
        channels.append(grpc.insecure_channel(f"127.0.0.1:{target_port}",
                                              options=[("grpc.use_local_subchannel_pool", 1)]))
        return channels[-1]

    def served_call(request: predict_pb2.PredictRequest):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel_to(port))
        return lambda: stub.Predict(request, timeout=60)

    def echo_call(request: predict_pb2.PredictRequest):
        echo = channel_to(echo_port).unary_unary(
            ECHO_METHOD, request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString)
        return lambda: echo(request, timeout=60)

    try:
        print(f"Predict at batch 1, latency in microseconds: median of {num_rounds} rounds of {num_calls} calls "
              "(2 cores, loopback)")
        print(f"{'model':6} {'in-process p50/p99':>20} {'served p50/p99':>18} {'echo p50/p99':>16} "
              f"{'overhead p50':>13} {'overhead/echo':>14} {'vs session':>11}")
        ratios, session_ratios = {}, {}
        cnn = None
        for name, (base_path, shape) in models.items():
            signature = tf.saved_model.load(str(base_path / "1")).signatures[SIGNATURE_DEFAULT]
            session_call = load_version(name, 1, base_path / "1", warmup=False).signatures[SIGNATURE_DEFAULT].call
            inputs = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(inputs))

            def in_process_call(signature=signature, inputs=inputs):
                return lambda: signature(inputs=inputs)["output_0"].numpy()

            served, echo = served_call(request), echo_call(request)
            rounds = []
            for _ in range(num_rounds):
                rounds.append((_latency(in_process_call(), num_calls), _latency(served, num_calls),
                               _latency(echo, num_calls), _latency(partial(session_call, inputs), num_calls)))
            local, remote, floor, _ = (
                Latency(statistics.median(r[i].p50 for r in rounds), statistics.median(r[i].p99 for r in rounds))
                for i in range(4)
            )
            overhead = statistics.median(r[1].p50 - r[0].p50 for r in rounds)
            ratios[name] = statistics.median((r[1].p50 - r[0].p50) / r[2].p50 for r in rounds)
            session_ratios[name] = statistics.median((r[1].p50 - r[3].p50) / r[2].p50 for r in rounds)
            print(f"{name:6} {local.p50:9.0f} /{local.p99:8.0f} {remote.p50:8.0f} /{remote.p99:8.0f} "
                  f"{floor.p50:7.0f} /{floor.p99:7.0f} {overhead:13.0f} {ratios[name]:13.2f}x "
                  f"{session_ratios[name]:10.2f}x")
            if name == "cnn":
                cnn = (request, in_process_call)

        request, in_process_call = cnn
        served_rates, local_rates = [], []
        for _ in range(max(num_rounds - 2, 2)):
            served_rates.append(_throughput(lambda: served_call(request), NUM_CLIENTS, duration))
            local_rates.append(max(_throughput(in_process_call, NUM_CLIENTS, duration),
                                   _throughput(in_process_call, 1, duration)))
        throughput_ratio = statistics.median(
            served / local for served, local in zip(served_rates, local_rates, strict=True)
        )
        print(f"\nCNN at batch 1: {statistics.median(served_rates):.0f} requests/s served to {NUM_CLIENTS} concurrent "
              f"clients, {statistics.median(local_rates):.0f}/s in-process (best of {NUM_CLIENTS} threads and 1)")
        print(f"throughput served / in-process: {throughput_ratio:.2f}x (target >= {TARGET_THROUGHPUT_RATIO}x)")
        worst = max(ratios.values())
        print(f"worst overhead at batch 1: {worst:.2f}x the echo round trip (target <= {TARGET_OVERHEAD_RATIO}x)")
        print(f"('vs session': overhead over the server's own runtime, the signature as a session callable called "
              f"in-process: worst {max(session_ratios.values()):.2f}x)")
    finally:
        for channel in channels:
            channel.close()
        for process in (server, echo_server):
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
