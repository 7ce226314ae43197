"""Export Keras ResNet50 (weights=None) with ema-export versus a plain single-signature `tf.saved_model.save`.

Both run in this same invocation, each in a child process of its own so peak RSS is measured cleanly, on the same
checkpoints, and each does the same user-visible job: build the model, restore the training checkpoint, write a
SavedModel. Prints ratios (ema-export / baseline) of wall time, peak RSS and bytes on disk.

Targets: time <= 1.5x; bytes <= 2.02x (exactly one extra copy of the averaged weights); peak RSS <= 1.5x.

    python benchmarks/export_bench.py [--keep DIR] [--rounds N]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TARGETS = {"wall_time": 1.5, "bytes_on_disk": 2.02, "peak_rss": 1.5}
INPUT_SHAPE = (224, 224, 3)


def build_model():
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=INPUT_SHAPE, classes=1000)


def write_checkpoints(ckpt_dir: Path) -> None:
    """Training side: a ResNet50 with an EMA of its trainable weights, saved as the seed layout."""
    import numpy as np
    import tensorflow as tf

    model = build_model()
    variables = [v.value for v in model.trainable_variables]
    average = tf.train.ExponentialMovingAverage(decay=0.999)
    average.apply(variables)
    rng = np.random.default_rng(0)
    for variable in variables:  # shadows that differ from the weights, as after training
        average.average(variable).assign(variable + rng.normal(0, 1e-3, variable.shape).astype(np.float32))
    tf.train.Checkpoint(model=model).save(str(ckpt_dir / "ckpt"))
    tf.train.Checkpoint(ema_weights={v.path: average.average(v.value) for v in model.trainable_variables}).save(
        str(ckpt_dir / "ema" / "ckpt"))


def run_baseline(ckpt_dir: Path, out_dir: Path) -> None:
    import tensorflow as tf

    model = build_model()
    tf.train.Checkpoint(model=model).read(tf.train.latest_checkpoint(str(ckpt_dir))).expect_partial()

    @tf.function(input_signature=[tf.TensorSpec((None,) + INPUT_SHAPE, tf.float32, name="inputs")])
    def serve(inputs):
        return {"output_0": model(inputs, training=False)}

    tf.saved_model.save(model, str(out_dir / "1"), signatures={"serving_default": serve.get_concrete_function()})


def run_export(ckpt_dir: Path, out_dir: Path) -> None:
    import ema_export

    ema_export.export(ckpt_dir, out_dir, model=build_model)


def child(role: str, ckpt_dir: Path, out_dir: Path) -> None:
    """Runs in a child process: import, then time the job alone; report JSON on stdout."""
    # Libraries are imported before timing: the job is the export, not Python start-up.
    import keras  # noqa: F401
    import tensorflow as tf  # noqa: F401

    import ema_export.api  # noqa: F401

    started = time.perf_counter()
    {"baseline": run_baseline, "export": run_export, "checkpoints": lambda c, o: write_checkpoints(c)}[role](
        ckpt_dir, out_dir)
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "peak_rss_mib": peak_kib / 1024}))


def spawn(role: str, ckpt_dir: Path, out_dir: Path) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", role, str(ckpt_dir), str(out_dir)],
                               check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    keep = Path(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else None
    root = keep or Path(tempfile.mkdtemp(prefix="export-bench-"))
    ckpt_dir = root / "ckpt"
    if not (ckpt_dir / "checkpoint").exists():
        spawn("checkpoints", ckpt_dir, root)
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    baseline_runs, our_runs = [], []
    for round_number in range(rounds):  # interleaved, so a noisy neighbour hits both sides alike
        shutil.rmtree(root / "baseline", ignore_errors=True)
        shutil.rmtree(root / "ema", ignore_errors=True)
        baseline_runs.append(spawn("baseline", ckpt_dir, root / "baseline"))
        our_runs.append(spawn("export", ckpt_dir, root / "ema"))
    baseline = {key: statistics.median(run[key] for run in baseline_runs) for key in baseline_runs[0]}
    ours = {key: statistics.median(run[key] for run in our_runs) for key in our_runs[0]}
    baseline_bytes = disk_bytes(root / "baseline" / "1")
    ours_bytes = disk_bytes(next(p for p in (root / "ema").iterdir() if p.name.isdigit()))
    ratios = {
        "wall_time": ours["seconds"] / baseline["seconds"],
        "bytes_on_disk": ours_bytes / baseline_bytes,
        "peak_rss": ours["peak_rss_mib"] / baseline["peak_rss_mib"],
    }
    print("Keras ResNet50 (weights=None): ema-export end to end vs plain single-signature tf.saved_model.save "
          f"(median of {rounds} interleaved rounds)")
    print(f"  {'':<14}{'baseline':>12}{'ema-export':>12}{'ratio':>8}{'target':>8}")
    rows = [("wall_time", f"{baseline['seconds']:.1f}s", f"{ours['seconds']:.1f}s"),
            ("bytes_on_disk", f"{baseline_bytes / 2**20:.1f}MiB", f"{ours_bytes / 2**20:.1f}MiB"),
            ("peak_rss", f"{baseline['peak_rss_mib']:.0f}MiB", f"{ours['peak_rss_mib']:.0f}MiB")]
    for name, base, mine in rows:
        verdict = "ok" if ratios[name] <= TARGETS[name] else "MISSED"
        print(f"  {name:<14}{base:>12}{mine:>12}{ratios[name]:>7.2f}x{TARGETS[name]:>7.2f}x {verdict}")


if __name__ == "__main__":
    main()
