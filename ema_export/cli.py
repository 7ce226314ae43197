"""`ema-export CKPT_DIR OUT_DIR`: the command line over `ema_export.export`.

This module only translates: options become `ExportOptions`, an `ExportResult` becomes a summary (or `--json`),
and each `EmaExportError` becomes one line on stderr with a non-zero exit code. TensorFlow is imported only after
the arguments are parsed, so `--help` is instant and start-up noise can be hidden first.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from ema_export.console import hide_native_logs, wants_verbose
from ema_export.contracts import DEFAULT_ARMS, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.layout_registry import LAYOUT_NAMES

EXIT_INTERRUPTED = 130
_DRIFTS_SHOWN = 5


class _StageProgress:
    """Stage names with elapsed seconds on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            click.echo(f"  [{time.monotonic() - self.started:5.1f}s] {stage}...", err=True)


def _summary(result: Any) -> str:
    report, verification = result.fold, result.verification
    lines = _sources_lines(result.sources, result.model_source, result.attachment, report)
    non_trainable = sum(1 for item in report.kept_live if item.reason.startswith("non-trainable"))
    lines.append(f"Variables            {len(report.folded)} folded, {len(report.kept_live)} kept live "
                 f"({non_trainable} non-trainable, {len(report.kept_live) - non_trainable} without shadow)")
    drifts = report.largest_drifts(_DRIFTS_SHOWN)
    if drifts:
        lines.append("Largest drifts       relative L2 distance of EMA from live")
        width = max(len(item.name) for item in drifts)
        lines += [f"  {item.name:<{width}}  {item.relative_l2:.4g}" for item in drifts]
    checks = ", ".join(f"{c.signature}/{c.output} max|diff| {c.max_abs_diff:.2g} <= {c.tolerance:.2g}"
                       for c in verification.checks)
    lines.append(f"Verified             reloaded and ran all signatures on a batch of {verification.batch_size}: "
                 f"{checks}")
    default = result.manifest["signatures"]["default_serves"]
    lines.append(f"Wrote version {result.version}      {result.version_dir}  "
                 f"({SIGNATURE_LIVE}, {SIGNATURE_EMA}, {SIGNATURE_DEFAULT} -> {default})")
    lines += [f"warning: {text}" for text in result.warnings]
    return "\n".join(lines)


def _sources_lines(sources: Any, model_source: str, attachment: str, report: Any) -> list[str]:
    def step_of(files: Any) -> str:
        return f", step {files.step}" if files.step is not None else ""

    lines = [f"Training checkpoint  {sources.training.prefix}  ({sources.training.chosen_by}{step_of(sources.training)})"]
    if sources.ema:
        lines.append(f"EMA checkpoint       {sources.ema.prefix}  ({sources.ema.chosen_by}{step_of(sources.ema)})")
    if sources.step_mismatch_allowed:
        lines.append("warning: the two checkpoints are from different steps (--allow-step-mismatch)")
    lines.append(f"Model                {model_source}, attached at {attachment}")
    lines.append(f"Layout               {report.layout}: {report.layout_reason}")
    return lines


def _dry_run_table(planned: Any) -> str:
    report = planned.fold
    lines = _sources_lines(planned.sources, planned.model_source, planned.attachment, report)
    rows = [(item.name, "x".join(map(str, item.shape)) or "scalar", item.dtype, item.shadow_key,
             f"{item.relative_l2:.4g}") for item in report.folded]
    rows += [(item.name, "", "", f"(kept live: {item.reason})", "") for item in report.kept_live]
    header = ("variable", "shape", "dtype", "shadow source key", "relative drift")
    widths = [max(len(row[column]) for row in rows + [header]) for column in range(len(header))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.append("")
    lines.append(f"Would write version {planned.version} to {planned.version_dir} with {SIGNATURE_LIVE}, "
                 f"{SIGNATURE_EMA} and {SIGNATURE_DEFAULT} ({len(report.folded)} variables folded, "
                 f"{len(report.kept_live)} kept live). Nothing was written (--dry-run).")
    lines += [f"warning: {text}" for text in report.warnings]
    return "\n".join(lines)


def _dry_run_data(planned: Any) -> dict[str, Any]:
    import dataclasses

    report = planned.fold
    return {
        "dry_run": True,
        "version": planned.version,
        "version_dir": str(planned.version_dir),
        "training_checkpoint": planned.sources.training.prefix,
        "ema_checkpoint": planned.sources.ema.prefix if planned.sources.ema else None,
        "model": planned.model_source,
        "attachment": planned.attachment,
        "layout": {"name": report.layout, "reason": report.layout_reason, "source": report.source},
        "folded": [dataclasses.asdict(item) for item in report.folded],
        "kept_live": [dataclasses.asdict(item) for item in report.kept_live],
        "warnings": report.warnings,
    }


def _fail(message: str, code: int, as_json: bool, kind: str, line: str | None = None,
          problems: list[str] | None = None) -> None:
    """Exit with one error line on stderr (`line`, a shortened form of `message`, when given) and, with --json, the
    whole message (and every problem) as JSON on stdout."""
    if as_json:
        click.echo(json.dumps({"error": message, "type": kind, **({"problems": problems} if problems else {})}))
    click.echo(f"Error: {line or message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("ckpt_dir", metavar="CKPT_DIR")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--ema-checkpoint", metavar="PATH",
              help="EMA checkpoint directory or prefix. Default: CKPT_DIR/ema/.")
@click.option("--model", "model_spec", metavar="MODULE:FACTORY",
              help="Function building the untrained model (Keras 3, tf-keras or a tf.Module with a serving "
                   "tf.function), e.g. my_project.models:build. "
                   "Default: model.keras or model.json in CKPT_DIR (architecture only).")
@click.option("--input-signature", multiple=True, metavar="NAME:DTYPE:[SHAPE]",
              help="Serving input for models that do not define one, e.g. 'inputs:float32:[None,28,28,1]'. "
                   "Repeat once per input.")
@click.option("--allow-missing", is_flag=True,
              help="Let trainable variables without a shadow serve their live value in serve_ema "
                   "(recorded in the manifest) instead of failing.")
@click.option("--version", "version", type=click.IntRange(min=1), metavar="N",
              help="Version number to write. Default: one more than the highest in OUT_DIR.")
@click.option("--overwrite", is_flag=True,
              help="Replace version N if it already exists; needs --force, because TF Serving never reloads a "
                   "version number it already serves (publish a new number instead).")
@click.option("--force", is_flag=True,
              help="With --overwrite: replace version N even though a TF Serving may already have loaded it.")
@click.option("--serving-version", metavar="X.Y",
              help="TF Serving release that will serve the export (e.g. 2.20): warn when the TensorFlow writing it "
                   "is newer. Recorded in the manifest.")
@click.option("--default-signature", type=click.Choice(list(DEFAULT_ARMS)), default="ema", show_default=True,
              help="Which arm serving_default serves.")
@click.option("--layout", metavar="NAME",
              help="Checkpoint layout to read shadows with (default: detected; the summary says which and why). "
                   f"Names: {', '.join(LAYOUT_NAMES)}.")
@click.option("--bn-stats", type=click.Choice(["live", "ema"]), default="live", show_default=True,
              help="Non-trainable statistics (BatchNorm moving mean/variance) in serve_ema: the live values, or "
                   "their averages where the checkpoint has them.")
@click.option("--ema-name", metavar="NAME",
              help="Name given to a TF1 ExponentialMovingAverage(name=...), whose shadows are <var>/NAME.")
@click.option("--step", type=click.IntRange(min=0), metavar="N",
              help="Export the training/EMA pair of step N (default: the newest step both checkpoints have).")
@click.option("--allow-step-mismatch", is_flag=True,
              help="Export an explicitly named pair whose steps differ (recorded in the manifest).")
@click.option("--inverted/--not-inverted", default=None,
              help="The checkpoint's model holds the averages and its EMA values the raw weights (Keras "
                   "SwapEMAWeights(swap_on_epoch=True) + ModelCheckpoint, Model Garden ema_checkpoints/): swap the "
                   "arms back (recorded in the manifest). --not-inverted exports it as it is. Default: detected; "
                   "refused when it cannot be told.")
@click.option("--dry-run", is_flag=True,
              help="Run every stage up to folding, print the matching table and what would be written; "
                   "write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (the manifest plus version_dir) as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show TensorFlow's log output and full tracebacks.")
def cli(ckpt_dir: str, out_dir: str, ema_checkpoint: str | None, model_spec: str | None,
        input_signature: tuple[str, ...], allow_missing: bool, version: int | None, overwrite: bool, force: bool,
        serving_version: str | None, default_signature: str, layout: str | None, bn_stats: str,
        ema_name: str | None, step: int | None, allow_step_mismatch: bool, inverted: bool | None, dry_run: bool,
        as_json: bool, verbose: bool) -> None:
    """Export the live and EMA weights of a training checkpoint as one SavedModel.

    Restores the latest checkpoint in CKPT_DIR (or the prefix given) and its EMA checkpoint, folds the averaged
    values into a fresh copy of the model, verifies the result and publishes it atomically as OUT_DIR/<version>/,
    a TF Serving base path. Signatures: serve_live (raw weights), serve_ema (averaged weights) and
    serving_default.

    \b
    Example:
      ema-export runs/7 models/classifier --model my_project.models:build
    """
    from ema_export.errors import EmaExportError

    try:
        from ema_export.api import ExportOptions, dry_run as plan, export

        options = ExportOptions(ema_checkpoint=ema_checkpoint, input_signature=input_signature or None,
                                allow_missing=allow_missing, version=version, overwrite=overwrite,
                                default_signature=default_signature, layout=layout, bn_stats=bn_stats,
                                ema_name=ema_name, step=step, allow_step_mismatch=allow_step_mismatch,
                                inverted=inverted, force=force, serving_version=serving_version)
        progress = _StageProgress(enabled=not as_json and sys.stderr.isatty())
        if dry_run:
            planned = plan(ckpt_dir, out_dir, model=model_spec, options=options, progress=progress)
            click.echo(json.dumps(_dry_run_data(planned), indent=2) if as_json else _dry_run_table(planned))
            return
        result = export(ckpt_dir, out_dir, model=model_spec, options=options, progress=progress)
    except EmaExportError as error:
        _fail(str(error), error.exit_code, as_json, type(error).__name__, None if verbose else error.summary(),
              error.problems)
    except KeyboardInterrupt:
        _fail("Interrupted; nothing was published in OUT_DIR", EXIT_INTERRUPTED, as_json, "KeyboardInterrupt")
    except Exception as error:  # a bug or an unsupported model: still one line unless asked for more
        if verbose:
            raise
        _fail(f"unexpected {type(error).__name__}: {error}. Run again with --verbose for the traceback",
              1, as_json, type(error).__name__)
    if as_json:
        click.echo(json.dumps(dict(result.manifest, version_dir=str(Path(result.version_dir))), indent=2))
    else:
        click.echo(_summary(result))
        if verbose:  # where a slow export spent its time (also in the manifest's "timings")
            click.echo("Stage durations      " + ", ".join(f"{stage} {seconds:.2f}s"
                                                        for stage, seconds in result.timings.items()))


def main() -> None:
    """Console-script entry point: hide native log noise unless --verbose, then run the command."""
    if not wants_verbose(sys.argv[1:]):
        hide_native_logs()
    # Past a file-size limit (ulimit -f) the kernel sends SIGXFSZ, which kills the process before the staging
    # directory is removed; ignored, the write fails with EFBIG and the export reports it as one line.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cli()
