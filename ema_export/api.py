"""`ema_export.export`: the whole pipeline, from checkpoints to one published SavedModel version.

    locate -> read -> fresh model -> restore live -> collect shadows -> fold -> assemble -> write -> verify -> publish

Each stage lives in its own module and returns data; this module only runs them in order. Nothing is printed:
progress goes to an optional callback and the outcome comes back as an `ExportResult`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly, assemble
from ema_export.contracts import DEFAULT_ARMS
from ema_export.errors import OptionsError
from ema_export.fold import BN_STATS_POLICIES, Fold, FoldReport, fold
from ema_export.fresh_model import ModelFactory, build_fresh_model, probe_inputs
from ema_export.layouts import LayoutSettings, choose_layout
from ema_export.locate import CheckpointSources, locate
from ema_export.manifest import AssemblyFacts, Manifest, build_manifest, describe_assembly, write_manifest
from ema_export.memory import collect_only_new_objects, release
from ema_export.out_dir import ensure_writable
from ema_export.read import one_export, read_checkpoints
from ema_export.restore import restore
from ema_export.serving_version import skew_warning
from ema_export.verify import Reference, TfServingLoad, VerificationReport, reference_outputs, verify
from ema_export.versions import plan_version, publish, staging_directory
from ema_export.write import write_savedmodel, write_warmup

STAGES = ("locate", "build model", "restore live values", "collect shadows", "fold", "assemble signatures",
          "write SavedModel", "verify", "publish")
"""Stage names passed to the progress callback, in order."""


class _StageClock:
    """Passes each stage's name on to the progress callback and records how long every stage took.

    A slow export is diagnosed by its stage durations: they go into the manifest (`timings`) and the result.
    """

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress = progress or (lambda stage: None)
        self.durations: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0

    def __call__(self, stage: str) -> None:
        self.stop()
        self.current, self.started = stage, time.perf_counter()
        self.progress(stage)

    def stop(self) -> dict[str, float]:
        """End the running stage; every duration so far, in seconds."""
        if self.current is not None:
            self.durations[self.current] = round(time.perf_counter() - self.started, 3)
            self.current = None
        return dict(self.durations)


@dataclass(frozen=True)
class ExportOptions:
    """How to export; every field has the default the CLI uses.

    Attributes:
        ema_checkpoint: EMA checkpoint directory or prefix; default `<CKPT_DIR>/ema/`.
        input_signature: Serving inputs (`NAME:DTYPE:[shape]` or TensorSpecs) for models that do not define them.
        allow_missing: Let trainable variables without a shadow serve their live value in `serve_ema`.
        version: Version number to write; default one more than the highest present.
        overwrite: Replace `version` if it exists; needs `force` too, since TF Serving never reloads a number it serves.
        force: With `overwrite`, replace `version` even though a TF Serving may already have loaded it.
        default_signature: Which arm `serving_default` aliases: "ema" or "live".
        layout: Checkpoint layout name; default auto-detected.
        bn_stats: "live" (default) or "ema": whether `serve_ema` uses averaged BatchNorm statistics where the
            checkpoint has them.
        ema_name: The name a TF1 `ExponentialMovingAverage(name=...)` gave its shadows, when not the default.
        step: Export the training/EMA pair of this step instead of the newest complete pair.
        allow_step_mismatch: Export an explicitly named pair whose steps differ (recorded in the manifest).
        inverted: The checkpoint holds the averages in the model and the raw weights as its EMA (Keras
            `SwapEMAWeights(swap_on_epoch=True)` checkpoints, Model Garden's `ema_checkpoints/`): True swaps the arms
            back, False exports it as it is, None (default) decides from the evidence and refuses when ambiguous.
        serving_version: The TF Serving release (`2.20`) that will serve the export: warn when TensorFlow is newer.
    """

    ema_checkpoint: str | os.PathLike | None = None
    input_signature: Sequence[str] | Sequence[tf.TensorSpec] | None = None
    allow_missing: bool = False
    version: int | None = None
    overwrite: bool = False
    default_signature: str = "ema"
    layout: str | None = None
    bn_stats: str = "live"
    ema_name: str | None = None
    step: int | None = None
    allow_step_mismatch: bool = False
    inverted: bool | None = None
    force: bool = False
    serving_version: str | None = None


@dataclass(frozen=True)
class ExportResult:
    """What an export did."""

    version: int
    version_dir: Path
    sources: CheckpointSources
    model_source: str
    attachment: str
    fold: FoldReport
    verification: VerificationReport
    record: Manifest = field(repr=False)
    """The manifest written into the version, as a typed value (`manifest` is its JSON form)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each stage (`STAGES`), publishing included."""

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest, as in `<version>/assets.extra/ema_export.json` (a fresh copy on every access)."""
        return self.record.to_dict()

    @property
    def warnings(self) -> list[str]:
        return list(self.record.warnings)


@dataclass(frozen=True)
class DryRunResult:
    """What an export would do: every stage up to folding, and the version it would write. Nothing is written."""

    version: int
    version_dir: Path
    sources: CheckpointSources
    model_source: str
    attachment: str
    fold: FoldReport
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each stage that ran."""


@dataclass(frozen=True)
class _Prepared:
    sources: CheckpointSources
    fresh: Any
    restored: Any
    fold: Fold
    version: int


@dataclass(frozen=True)
class _Assembled:
    """What the stages after assembly need from those before, without the models."""

    sources: CheckpointSources
    model_source: str
    attachment: str
    report: FoldReport
    facts: AssemblyFacts


def _resolve_options(options: ExportOptions | None, overrides: dict[str, Any]) -> ExportOptions:
    options = dataclasses.replace(options or ExportOptions(), **overrides)
    if options.default_signature not in DEFAULT_ARMS:
        raise OptionsError(f"default signature must be one of {', '.join(DEFAULT_ARMS)}, got "
                           f"{options.default_signature!r}", hint="Use --default-signature ema or live")
    if options.bn_stats not in BN_STATS_POLICIES:
        raise OptionsError(f"bn_stats must be one of {', '.join(BN_STATS_POLICIES)}, got {options.bn_stats!r}",
                           hint="Use --bn-stats live or ema")
    skew_warning(options.serving_version, tf.__version__)  # a malformed --serving-version fails before any work
    return options


@one_export()
def _prepare(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, model: str | ModelFactory | None,
             options: ExportOptions, step: Callable[[str], None], keep_values: bool = True) -> _Prepared:
    """Stages shared by `export` and `dry_run`: locate and read, build, restore, collect and fold."""
    step(STAGES[0])
    version = plan_version(output_dir, options.version, options.overwrite, options.force)  # fail before any work
    sources = locate(checkpoint, options.ema_checkpoint, step=options.step,
                     allow_step_mismatch=options.allow_step_mismatch)
    indexes = read_checkpoints(sources)  # timed with locate, whose step reading already opened most of them
    step(STAGES[1])
    fresh = build_fresh_model(sources.checkpoint_dir, model, options.input_signature, sources.training.prefix)
    step(STAGES[2])
    restored = restore(fresh, sources.training, indexes.training)
    step(STAGES[3])
    layout, reason = choose_layout(indexes, restored, options.layout, LayoutSettings(
        ema_name=options.ema_name, inverted=options.inverted, bn_stats=options.bn_stats))
    match = layout.collect(indexes, restored)
    step(STAGES[4])
    folded = fold(restored, match, reason, options.allow_missing, options.bn_stats, keep_values)
    return _Prepared(sources, fresh, restored, folded, version)


def dry_run(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | ModelFactory | None = None,
    options: ExportOptions | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> DryRunResult:
    """Run every stage up to folding and report the matching; write nothing.

    Takes the same arguments as `export`. Raises the same errors it would, so a clean dry run means the export
    can only fail in writing or verification.
    """
    options = _resolve_options(options, overrides)
    clock = _StageClock(progress)
    prepared = _prepare(checkpoint, output_dir, model, options, clock, keep_values=False)
    return DryRunResult(prepared.version, Path(output_dir) / str(prepared.version), prepared.sources,
                        prepared.fresh.source, prepared.restored.attachment, prepared.fold.report, clock.stop())


def export(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | ModelFactory | None = None,
    options: ExportOptions | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> ExportResult:
    """Export the live and EMA weights of a training checkpoint as one SavedModel version.

    Args:
        checkpoint: CKPT_DIR (its latest checkpoint) or a training checkpoint prefix.
        output_dir: TF Serving base path; the export becomes `output_dir/<version>/`.
        model: Factory building the untrained model (or `package.module:factory`); default: `model.keras` or
            `model.json` in CKPT_DIR.
        options: Everything else, see `ExportOptions`; keyword arguments named like its fields override it.
        progress: Called with each stage's name as it starts.

    Returns:
        An `ExportResult`; the manifest it holds is also in `<version>/assets.extra/ema_export.json`.

    Raises:
        EmaExportError: A subclass naming what was wrong and how to fix it. Nothing numeric is left in
            `output_dir` by a failed or interrupted export.

    Example:
        >>> result = ema_export.export("runs/7", "models/classifier", model="my_project.models:build")
        >>> result.version_dir
        PosixPath('models/classifier/1')
    """
    options = _resolve_options(options, overrides)
    with collect_only_new_objects():
        return _export(checkpoint, output_dir, model, options, _StageClock(progress))


def _policies(options: ExportOptions, sources: CheckpointSources) -> dict[str, Any]:
    return {"bn_stats": options.bn_stats, "allow_missing": options.allow_missing,
            "allow_step_mismatch": sources.step_mismatch_allowed, "inverted": options.inverted,
            "serving_version": options.serving_version}


def _assemble(prepared: _Prepared, default_signature: str) -> tuple[Assembly, _Assembled, list[Any]]:
    """Assemble the export; the averages `fold` made go no further (the export root holds those it needs)."""
    assembly = assemble(prepared.restored, prepared.fold.averages, default_signature)
    facts = _Assembled(prepared.sources, prepared.fresh.source, prepared.restored.attachment, prepared.fold.report,
                       describe_assembly(assembly))
    return assembly, facts, probe_inputs(prepared.fresh.input_signature)


def _write(assembly: Assembly, staging: Path, probe: list[Any],
           pool: Executor) -> tuple[Reference, Future[TfServingLoad]]:
    """Write the SavedModel and its warmup records. Meanwhile, in worker threads (TensorFlow releases the GIL in all of
    it), compute the in-memory reference answers and, in `pool`, as soon as `saved_model.pb` is written, load the
    graph half of verification (`TfServingLoad`); its future is returned, for the verify stage."""
    loads: list[Future[TfServingLoad]] = []

    def load_graph() -> TfServingLoad:
        load = TfServingLoad(staging)
        load.prepare_run(pool)
        return load

    try:
        # A thread of its own, ended before this returns: a worker that ran the in-memory models would keep
        # TensorFlow's per-thread state about them alive past their release.
        with ThreadPoolExecutor(max_workers=1) as reference_pool:
            reference = reference_pool.submit(reference_outputs, assembly, probe)
            write_savedmodel(assembly, staging, graph_written=lambda: loads.append(pool.submit(load_graph)))
            write_warmup(assembly, staging, probe)
            return reference.result(), loads[0]
    except BaseException:
        for pending in loads:  # no session outlives a failed write
            if pending.exception() is None:
                pending.result().close()
        raise


def _export(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, model: str | ModelFactory | None,
            options: ExportOptions, step: _StageClock) -> ExportResult:
    ensure_writable(output_dir)  # a read-only or full OUT_DIR fails now, not after restoring and folding
    prepared = _prepare(checkpoint, output_dir, model, options, step)
    step(STAGES[5])
    assembly, assembled, probe = _assemble(prepared, options.default_signature)
    del prepared  # the model and the averages live on in the assembly only
    skew = skew_warning(options.serving_version, tf.__version__)
    with staging_directory(output_dir) as staging:
        step(STAGES[6])
        with ThreadPoolExecutor(max_workers=2) as pool:  # the graph's load, then the signatures' executor
            reference, loading = _write(assembly, staging, probe, pool)
            del assembly  # the in-memory models go before the written copy loads: its memory does not stack on theirs
            release()
            step(STAGES[7])
            with loading.result() as load:
                load.restore()  # waits for the signatures' executor if it is still being built
                verification = verify(load, reference)
        manifest = build_manifest(
            sources=assembled.sources, model_source=assembled.model_source, attachment=assembled.attachment,
            report=assembled.report, assembly=assembled.facts, policies=_policies(options, assembled.sources),
            warnings=[skew] if skew else [], verification=verification, durations=step.stop())
        step(STAGES[8])
        version_dir = publish(staging, output_dir, options.version, options.overwrite, force=options.force,
                              stamp=lambda directory, number: _stamp(directory, manifest.numbered(number)))
    version = int(version_dir.name)
    return ExportResult(version, version_dir, assembled.sources, assembled.model_source, assembled.attachment,
                        assembled.report, verification, manifest.numbered(version), step.stop())


def _stamp(directory: Path, manifest: Manifest) -> None:
    write_manifest(directory, manifest.to_dict())
