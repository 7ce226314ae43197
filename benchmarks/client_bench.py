"""The TensorFlow-free client versus the official stack: import cost, tensor codec throughput, and A/B overhead.

Prints ratios; targets in brackets:

1. Import time and peak RSS of ``from serving import ServingClient`` versus
   ``from tensorflow_serving.apis import prediction_service_pb2_grpc`` (>= 20x faster, >= 5x smaller). Each import
   runs in a fresh child process (best of several, so the file cache is warm for both). Also shown: the client plus
   its codec and numpy (what the first ``predict`` loads), for a like-for-like view.
2. Codec throughput versus ``tf.make_tensor_proto`` / ``tf.make_ndarray`` (>= 2x), for a small request, a typical
   batch, an image batch and int64 ids, in both wire forms (``tensor_content`` and ``*_val``). The headline compares
   what a client does per call, numpy <-> serialized bytes (``codec.encode_bytes`` / ``codec.decode_bytes`` versus
   TensorFlow's function plus ``SerializeToString`` / ``FromString``); numpy <-> message objects is shown too.
3. Wall time of ``compare`` (both arms, concurrently, plus the statistics) versus predicting one arm batch by batch
   with ``ServingClient.predict`` over the same inputs (<= 1.3x); also versus one arm through compare's own pipeline,
   which isolates the cost of the second arm. The local server runs in a child process, so the client and the server
   do not share an interpreter lock (they do share this machine's cores).

    python benchmarks/client_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from seed_server import seed_server

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]

IMPORT_PROBE = """
import json, resource, time
started = time.perf_counter()
{statement}
elapsed = time.perf_counter() - started
print(json.dumps({{"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""



def measure_import(statement: str, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` import time and the peak RSS of a fresh interpreter running `statement`."""
    runs = []
    for _ in range(repeats):
        completed = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE.format(statement=statement)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mb": min(r["peak_rss_mb"] for r in runs)}


def best_time(function: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Seconds per call: the best of 5 rounds, each repeating the call for at least `min_seconds / 5`."""
    function()
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            function()
        if time.perf_counter() - started > min_seconds / 5:
            break
        calls *= 2
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - started) / calls)
    return min(rounds)


def bench_imports(repeats: int) -> list[tuple[str, float, float]]:
    ours = measure_import("from serving import ServingClient", repeats)
    ours_ready = measure_import("from serving import ServingClient, codec", repeats)
    official = measure_import("from tensorflow_serving.apis import prediction_service_pb2_grpc", repeats)
    print("\n== 1. import (fresh interpreter, best of %d) ==" % repeats)
    print(f"{'':44}{'seconds':>9}{'peak RSS MB':>13}")
    rows = (("from serving import ServingClient", ours), ("  + codec and numpy (first predict)", ours_ready),
            ("tensorflow_serving.apis (official)", official))  # fmt: skip
    for name, result in rows:
        print(f"{name:44}{result['seconds']:9.3f}{result['peak_rss_mb']:13.1f}")
    return [
        ("import time, official / ours [>= 20x]", official["seconds"] / ours["seconds"], 20.0),
        ("peak RSS, official / ours [>= 5x]", official["peak_rss_mb"] / ours["peak_rss_mb"], 5.0),
        ("import time incl. numpy+codec, official / ours", official["seconds"] / ours_ready["seconds"], 0.0),
        ("peak RSS incl. numpy+codec, official / ours", official["peak_rss_mb"] / ours_ready["peak_rss_mb"], 0.0),
    ]


def bench_codec() -> list[tuple[str, float, float]]:
    """numpy <-> wire bytes (what a client does per call), and numpy <-> message objects for reference."""
    import numpy as np
    import tensorflow as tf

    from serving import codec
    from serving.protocol import TensorProto

    generator = np.random.default_rng(0)
    cases = {
        "request 32x4 float32": generator.normal(size=(32, 4)).astype(np.float32),
        "batch 256x1000 float32": generator.normal(size=(256, 1000)).astype(np.float32),
        "images 8x224x224x3 uint8": generator.integers(0, 255, size=(8, 224, 224, 3), dtype=np.uint8),
        "ids 1024 int64": generator.integers(0, 2**40, size=1024),
    }
    print("\n== 2. codec (microseconds per call; ratio = TensorFlow / ours) ==")
    print("wire: numpy -> serialized TensorProto and back; TF: make_tensor_proto + SerializeToString, FromString +")
    print("make_ndarray. *_val is TF Serving's default answer form; content is what")
    print("--enable_serialization_as_tensor_content answers with.")
    print(f"{'case':28}{'op':22}{'ours':>10}{'tf':>10}{'ratio':>8}")
    wire_ratios: dict[str, list[float]] = {"encode": [], "decode": []}
    message_ratios: list[float] = []
    for name, array in cases.items():
        content = tf.make_tensor_proto(array).SerializeToString()
        values = codec.encode(array, form="values").SerializeToString()
        content_message, values_message = TensorProto.FromString(content), TensorProto.FromString(values)
        timings = {
            ("encode", "wire encode"): (
                lambda: codec.encode_bytes(array), lambda: tf.make_tensor_proto(array).SerializeToString()),
            ("decode", "wire decode content"): (
                lambda: codec.decode_bytes(content), lambda: tf.make_ndarray(TensorProto.FromString(content))),
            ("decode", "wire decode *_val"): (
                lambda: codec.decode_bytes(values), lambda: tf.make_ndarray(TensorProto.FromString(values))),
            (None, "message encode"): (lambda: codec.encode(array), lambda: tf.make_tensor_proto(array)),
            (None, "message decode content"): (
                lambda: codec.decode(content_message), lambda: tf.make_ndarray(content_message)),
            (None, "message decode *_val"): (
                lambda: codec.decode(values_message), lambda: tf.make_ndarray(values_message)),
        }  # fmt: skip
        for (kind, operation), (ours, theirs) in timings.items():
            ours_s, theirs_s = best_time(ours), best_time(theirs)
            (wire_ratios[kind] if kind else message_ratios).append(theirs_s / ours_s)
            print(f"{name:28}{operation:22}{ours_s * 1e6:10.1f}{theirs_s * 1e6:10.1f}{theirs_s / ours_s:8.2f}")
    return [
        ("codec wire encode, geometric mean [>= 2x]", statistics.geometric_mean(wire_ratios["encode"]), 2.0),
        ("codec wire encode, worst case", min(wire_ratios["encode"]), 0.0),
        ("codec wire decode, geometric mean [>= 2x]", statistics.geometric_mean(wire_ratios["decode"]), 2.0),
        ("codec wire decode, worst case", min(wire_ratios["decode"]), 0.0),
        ("codec message encode/decode, geometric mean", statistics.geometric_mean(message_ratios), 0.0),
    ]


def bench_compare(num_examples: int, batch_size: int, repeats: int) -> list[tuple[str, float, float]]:
    import numpy as np

    from ema_export.names import SIGNATURE_EMA
    from serving import ServingClient
    from serving.ab import CompareOptions, compare, run_arms

    with seed_server() as target:
        generator = np.random.default_rng(0)
        inputs = generator.normal(size=(num_examples, 4)).astype(np.float32)
        labels = generator.integers(0, 3, size=num_examples)
        options = CompareOptions(batch_size=batch_size)
        with ServingClient(target) as client:

            def one_arm() -> None:
                for start in range(0, num_examples, batch_size):
                    client.predict("model", {"inputs": inputs[start : start + batch_size]}, signature=SIGNATURE_EMA)

            def one_arm_pipelined() -> None:
                run_arms(client, "model", {"inputs": inputs}, options, arms=[SIGNATURE_EMA])

            def both_arms() -> None:
                compare(client, "model", {"inputs": inputs}, labels=labels, options=options)

            one_arm(), one_arm_pipelined(), both_arms()  # warm up the channel and the server's functions
            single, pipelined, paired = [], [], []
            for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits all three alike
                single.append(_timed(one_arm))
                pipelined.append(_timed(one_arm_pipelined))
                paired.append(_timed(both_arms))
    num_batches = -(-num_examples // batch_size)
    print(f"\n== 3. compare vs one arm ({num_examples} examples, {num_batches} batches of {batch_size}, "
          f"median of {repeats}) ==")
    print(f"one arm, ServingClient.predict per batch:     {statistics.median(single):.3f} s")
    print(f"one arm, compare's pipeline (run_arms):       {statistics.median(pipelined):.3f} s")
    print(f"compare, both arms concurrently + statistics: {statistics.median(paired):.3f} s")
    both = statistics.median(paired)
    return [
        ("compare wall time / one arm predicted [<= 1.3x]", both / statistics.median(single), -1.3),
        ("compare wall time / one arm in the same pipeline", both / statistics.median(pipelined), 0.0),
    ]


def _timed(function: Callable[[], None]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller compare (for a smoke run)")
    arguments = parser.parse_args()
    repeats = 2 if arguments.quick else 5
    ratios = bench_imports(repeats)
    ratios += bench_codec()
    ratios += bench_compare(5_000 if arguments.quick else 50_000, 256, 3 if arguments.quick else 5)
    print("\n== ratios ==")
    for name, value, target in ratios:
        # A positive target is a floor (value >= target), a negative one a ceiling (value <= -target), 0 none.
        verdict = "" if target == 0 else ("ok" if (value >= target if target > 0 else value <= -target) else "MISSED")
        print(f"{name:52}{value:9.3f}x  {verdict}")


if __name__ == "__main__":
    main()
