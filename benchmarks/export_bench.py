"""Export cost against a plain save, at several model sizes.

Three jobs do the same user-visible work on the same checkpoint pair: build the model from the `model.json` beside
the checkpoint, restore the training checkpoint, write a SavedModel.

- `plain`: a script restoring with `tf.train.Checkpoint` and calling `tf.saved_model.save` with one signature;
- `keras`: the same restore, then Keras's own `Model.export`;
- `ema-export`: `ema_export.export` on the checkpoint pair (both arms, warmup records, verification, manifest).

Every job runs in a child process of its own (so its peak RSS is its own), libraries imported before timing; the
jobs alternate within each round, so a noisy neighbour hits all three alike, and each figure is the median of the
rounds. Prints one table with ratios per size, the range of the time ratio over the rounds (each round's ema-export
against that round's plain save), and the median duration of each ema-export stage (from the manifest).

Five rounds by default: at the large sizes one round's time ratio ranges over 0.97-1.73x on this project's VM (the
state of its memory, README "Benchmarks"), and medians of three rounds of the same code have ranged over 1.09-1.41x.

Targets at every size: wall time <= 1.4x plain, peak RSS <= 1.3x plain, bytes <= 2.02x plain (exactly one extra copy
of the averaged weights).

    python benchmarks/export_bench.py                      # ResNet50 only
    python benchmarks/export_bench.py --sizes              # 25 MB, ResNet50, 768 MB, 2 GB
    python benchmarks/export_bench.py --sizes small,dense768 --rounds 3 --keep /tmp/bench   # reuse checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TARGETS = {"seconds": 1.4, "peak_rss_mib": 1.3, "bytes": 2.02}
ROLES = ("plain", "keras", "ema-export")
_GIB = 2**30


@dataclass(frozen=True)
class Size:
    """One model to measure: a ResNet50 or a stack of `depth` dense layers of `width` units."""

    name: str
    label: str
    width: int = 0
    depth: int = 0

    @property
    def weight_bytes(self) -> int:
        """float32 bytes of the weights (ResNet50: its published 25.6 M parameters)."""
        return 4 * (self.depth * (self.width * self.width + self.width) if self.depth else 25_636_712)

    def build(self):
        import keras

        if not self.depth:
            return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=1000)
        layers = [keras.layers.Dense(self.width, name=f"dense_{i}") for i in range(self.depth)]
        return keras.Sequential([keras.Input((self.width,))] + layers, name=self.name)


SIZES = {size.name: size for size in (
    Size("small", "Dense 6 x 1024^2, 24 MiB", 1024, 6),
    Size("resnet50", "ResNet50, 98 MiB"),
    Size("dense768", "Dense 12 x 4096^2, 768 MiB", 4096, 12),
    Size("dense2g", "Dense 32 x 4096^2, 2 GiB", 4096, 32),
)}


def write_checkpoints(size: Size, ckpt_dir: Path) -> None:
    """Training side: the model, its architecture as model.json, and an EMA of its trainable weights in `ema/`."""
    import numpy as np
    import tensorflow as tf

    model = size.build()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "model.json").write_text(model.to_json())
    tf.train.Checkpoint(model=model).save(str(ckpt_dir / "ckpt"))
    rng = np.random.default_rng(0)
    shadows = {}
    for variable in model.trainable_variables:  # shadows that differ from the weights, as after training
        noise = rng.standard_normal(variable.shape, dtype=np.float32) * np.float32(1e-3)
        shadows[variable.path] = tf.Variable(variable.value + noise, name=variable.path.replace("/", "_") +
                                             "/ExponentialMovingAverage")
        del noise
    tf.train.Checkpoint(ema_weights=shadows).save(str(ckpt_dir / "ema" / "ckpt"))


def _restored(ckpt_dir: Path):
    import keras
    import tensorflow as tf

    model = keras.models.model_from_json((ckpt_dir / "model.json").read_text())
    tf.train.Checkpoint(model=model).read(tf.train.latest_checkpoint(str(ckpt_dir))).expect_partial()
    return model


def run_plain(ckpt_dir: Path, out_dir: Path) -> dict:
    import tensorflow as tf

    model = _restored(ckpt_dir)
    spec = model.inputs[0]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name="inputs")])
    def serve(inputs):
        return {"output_0": model(inputs, training=False)}

    tf.saved_model.save(model, str(out_dir / "1"), signatures={"serving_default": serve.get_concrete_function()})
    return {}


def run_keras(ckpt_dir: Path, out_dir: Path) -> dict:
    _restored(ckpt_dir).export(str(out_dir / "1"), verbose=False)
    return {}


def run_export(ckpt_dir: Path, out_dir: Path) -> dict:
    import ema_export

    result = ema_export.export(ckpt_dir, out_dir)
    return {"timings": result.manifest["timings"]}


def child(role: str, size_name: str, ckpt_dir: Path, out_dir: Path) -> None:
    """Runs in a child process: import, then time the job alone; report JSON on stdout."""
    # Libraries are imported before timing: the job is the export, not Python start-up.
    import keras  # noqa: F401
    import tensorflow as tf  # noqa: F401

    import ema_export.api  # noqa: F401

    if role == "checkpoints":
        write_checkpoints(SIZES[size_name], ckpt_dir)
        return
    started = time.perf_counter()
    extra = {"plain": run_plain, "keras": run_keras, "ema-export": run_export}[role](ckpt_dir, out_dir)
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(extra, seconds=elapsed, peak_rss_mib=peak_kib / 1024)))


def spawn(role: str, size: Size, ckpt_dir: Path, out_dir: Path) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", role, size.name, str(ckpt_dir), str(out_dir)],
                               capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"{role} at {size.name} failed:\n{completed.stderr[-3000:]}")
    lines = completed.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without pushing others out."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def needed_bytes(size: Size) -> int:
    """A safe bound for the largest job (writing the checkpoints): about 3.5 copies of the weights, plus 1.5 GiB."""
    return int(3.5 * size.weight_bytes) + 3 * _GIB // 2


def needed_disk_bytes(size: Size, root: Path) -> int:
    """The checkpoint pair (unless already written) and the largest output (two copies of the weights), plus 10%."""
    checkpoints = 0 if (root / size.name / "ckpt" / "checkpoint").exists() else 2 * size.weight_bytes
    return int(1.1 * (checkpoints + 2 * size.weight_bytes))


def measure(size: Size, root: Path, rounds: int) -> dict:
    """Median seconds and peak RSS per role, bytes on disk per role, and median stage durations of ema-export."""
    ckpt_dir = root / size.name / "ckpt"
    if not (ckpt_dir / "checkpoint").exists():
        spawn("checkpoints", size, ckpt_dir, root)
    runs: dict[str, list[dict]] = {role: [] for role in ROLES}
    outputs = {role: root / size.name / role for role in ROLES}
    for round_number in range(rounds):
        order = ROLES[round_number % len(ROLES):] + ROLES[:round_number % len(ROLES)]  # rotate who goes first
        for role in order:
            shutil.rmtree(outputs[role], ignore_errors=True)
            run = spawn(role, size, ckpt_dir, outputs[role])
            run["bytes"] = disk_bytes(next(path for path in outputs[role].iterdir() if path.name.isdigit()))
            shutil.rmtree(outputs[role])  # one output on disk at a time: at 2 GiB they would not all fit
            runs[role].append(run)
    result: dict[str, Any] = {role: {key: statistics.median(run[key] for run in runs[role])
                     for key in ("seconds", "peak_rss_mib", "bytes")} for role in ROLES}
    stages = runs["ema-export"][0]["timings"]
    result["stages"] = {stage: statistics.median(run["timings"][stage] for run in runs["ema-export"])
                        for stage in stages}
    result["round_ratios"] = [ours["seconds"] / plain["seconds"] for ours, plain in zip(runs["ema-export"],
                                                                                       runs["plain"])]
    return result


def _row(label: str, result: dict) -> str:
    plain, keras, ours = (result[role] for role in ROLES)
    cells = []
    for key, unit in (("seconds", "s"), ("peak_rss_mib", " MiB"), ("bytes", " MiB")):
        scale = 2**20 if key == "bytes" else 1
        ratio = ours[key] / plain[key]
        verdict = "" if ratio <= TARGETS[key] else " MISSED"
        number = f"{ours[key] / scale:.1f}" if key == "seconds" else f"{ours[key] / scale:.0f}"
        base = f"{plain[key] / scale:.1f}" if key == "seconds" else f"{plain[key] / scale:.0f}"
        cells.append(f"{ratio:.2f}x ({number} vs {base}{unit}){verdict}")
    time_vs_keras = ours["seconds"] / keras["seconds"]
    rss_vs_keras = ours["peak_rss_mib"] / keras["peak_rss_mib"]
    return f"| {label} | {cells[0]} | {time_vs_keras:.2f}x | {cells[1]} | {rss_vs_keras:.2f}x | {cells[2]} |"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="?", const=",".join(SIZES), default="resnet50",
                        help=f"comma-separated, from {', '.join(SIZES)} (all when given alone)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size; each figure is their median")
    parser.add_argument("--keep", type=Path, help="write checkpoints into this directory and reuse them next time")
    arguments = parser.parse_args()
    root = arguments.keep or Path(tempfile.mkdtemp(prefix="export-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in arguments.sizes.split(","):
        size = SIZES[name]
        if available_bytes() < needed_bytes(size):
            print(f"skipped {size.label}: needs about {needed_bytes(size) / _GIB:.1f} GiB of available memory, "
                  f"{available_bytes() / _GIB:.1f} GiB available", flush=True)
            continue
        free_disk = shutil.disk_usage(root).free
        if free_disk < needed_disk_bytes(size, root):
            print(f"skipped {size.label}: needs about {needed_disk_bytes(size, root) / _GIB:.1f} GiB of free disk in "
                  f"{root}, {free_disk / _GIB:.1f} GiB free", flush=True)
            continue
        load_before = os.getloadavg()[0]
        results[name] = measure(size, root, arguments.rounds)
        results[name]["load"] = (load_before, os.getloadavg()[0])  # others' work on the machine, for the reader
        print(f"measured {size.label}: {json.dumps(results[name])}", flush=True)
        if not arguments.keep:
            shutil.rmtree(root / name, ignore_errors=True)
    print(f"\nema-export vs plain tf.saved_model.save and Keras Model.export (median of {arguments.rounds} "
          "alternated rounds; targets: time <= 1.4x, peak RSS <= 1.3x, bytes <= 2.02x of plain)\n")
    print("| model (float32) | time vs plain | time vs Model.export | peak RSS vs plain | peak RSS vs Model.export "
          "| bytes vs plain |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(_row(SIZES[name].label, result))
    print("\ntime vs plain, each round's ema-export against that round's plain save: " + ", ".join(
        f"{SIZES[name].label}: {min(result['round_ratios']):.2f}-{max(result['round_ratios']):.2f}x"
        for name, result in results.items()))
    print("\n1-minute load average before and after each size (2 cores): " + ", ".join(
        f"{SIZES[name].label}: {result['load'][0]:.1f} / {result['load'][1]:.1f}" for name, result in results.items()))
    print("\nema-export stages, median seconds:")
    for name, result in results.items():
        print(f"  {SIZES[name].label}: " + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in
                                                      result["stages"].items()))


if __name__ == "__main__":
    main()
