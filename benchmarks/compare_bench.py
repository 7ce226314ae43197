"""Streaming ``compare`` over TFRecord data: 10x the examples must cost about 10x the time and no more memory.

Writes N and 10*N labelled tf.Example records (with TensorFlow, the real producer) as GZIP TFRecord files, serves the
seed classifier from a child process, and runs ``ema-serving compare`` over each set in a fresh child process of its
own (TensorFlow-free, as users run it), reading that process's peak RSS. Prints, against the N run of the same
invocation (targets in brackets):

* peak RSS, 10N / N  [<= 1.10x]: nothing is kept per example;
* wall time, 10N / N [about 10x]: the work is linear in the examples (best of 3 interleaved runs each: the machine
  is shared, and load elsewhere only ever adds time);
* client CPU time, 10N / N [about 10x]: the same, insensitive to other work on the machine (on a shared 2-core
  machine the wall time of a one-second run swings by 2x with the load of other processes);
* rows per second of each run.

    python benchmarks/compare_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from seed_server import seed_server

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]


# Peak RSS from /proc/self/status (VmHWM, this process's own address space): getrusage's ru_maxrss survives exec on
# Linux, so a child of a process that imported TensorFlow would report TensorFlow's peak.
COMPARE_PROBE = """
import json, re, sys, time
from serving import ServingClient
from serving.ab import compare
from serving.data import DataOptions, open_data
with ServingClient({target!r}) as client:
    signature = client.metadata("model").signature("serve_ema")
    source = open_data([{pattern!r}], signature, DataOptions(labels_key="label"))
    started, cpu_started = time.perf_counter(), time.process_time()
    report = compare(client, "model", source)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu_seconds, "examples": report.num_examples,
                   "peak_rss_mb": peak_kb / 1024,
                   "tensorflow_loaded": "tensorflow.python" in sys.modules}}))
"""


def write_data(directory: Path, num_examples: int, num_files: int) -> str:
    """``num_examples`` labelled examples over ``num_files`` GZIP TFRecord files; returns their glob."""
    import numpy as np
    import tensorflow as tf

    generator = np.random.default_rng(num_examples)
    per_file = -(-num_examples // num_files)
    for index in range(num_files):
        count = min(per_file, num_examples - index * per_file)
        inputs = generator.normal(size=(count, 4)).astype(np.float32)
        labels = generator.integers(0, 3, size=count)
        with tf.io.TFRecordWriter(str(directory / f"val-{index:03d}.tfrecord.gz"), options="GZIP") as writer:
            for row, label in zip(inputs, labels):
                features = {
                    "inputs": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return str(directory / "val-*.tfrecord.gz")


def run_compare(target: str, pattern: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(COMPARE_PROBE.format(target=target, pattern=pattern))],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 and 50,000 examples instead of 20,000 and 200,000")
    arguments = parser.parse_args()
    small = 5_000 if arguments.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="compare-bench-data-") as scratch:
        (Path(scratch) / "small").mkdir()
        (Path(scratch) / "large").mkdir()
        patterns = {
            "N": write_data(Path(scratch) / "small", small, 2),
            "10N": write_data(Path(scratch) / "large", 10 * small, 20),
        }
        with seed_server() as target:
            run_compare(target, patterns["N"])  # warm the server's functions and the file cache
            # Best of a few runs each, interleaved: the machine is shared, and load elsewhere only ever adds time.
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in patterns}
            for _ in range(2 if arguments.quick else 3):
                for name, pattern in patterns.items():
                    runs[name].append(run_compare(target, pattern))
            results = {name: min(measured, key=lambda result: result["seconds"]) for name, measured in runs.items()}
            for name, measured in runs.items():
                results[name]["peak_rss_mb"] = max(result["peak_rss_mb"] for result in measured)
    assert not any(result["tensorflow_loaded"] for result in results.values()), "the client loaded TensorFlow"
    print(f"{'run':6}{'examples':>10}{'seconds':>10}{'CPU s':>8}{'rows/s':>10}{'peak RSS MB':>13}")
    for name, result in results.items():
        rate = result["examples"] / result["seconds"]
        print(f"{name:6}{result['examples']:>10,}{result['seconds']:>10.2f}{result['cpu_seconds']:>8.2f}{rate:>10,.0f}"
              f"{result['peak_rss_mb']:>13.1f}")
    rss = results["10N"]["peak_rss_mb"] / results["N"]["peak_rss_mb"]
    wall = results["10N"]["seconds"] / results["N"]["seconds"]
    print("\n== ratios ==")
    print(f"{'peak RSS, 10N / N [<= 1.10x]':40}{rss:8.3f}x  {'ok' if rss <= 1.10 else 'MISSED'}")
    cpu = results["10N"]["cpu_seconds"] / results["N"]["cpu_seconds"]
    print(f"{'wall time, 10N / N [about 10x]':40}{wall:8.3f}x  {'ok' if 8.0 <= wall <= 12.0 else 'MISSED'}")
    print(f"{'client CPU time, 10N / N [about 10x]':40}{cpu:8.3f}x  {'ok' if 8.0 <= cpu <= 12.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
