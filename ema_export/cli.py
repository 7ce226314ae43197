"""`ema-export CKPT_DIR OUT_DIR`: the command line over `ema_export.export`.

This module only translates: options become `ExportOptions`, an `ExportResult` becomes a summary (or `--json`),
and each `EmaExportError` becomes one line on stderr with a non-zero exit code. TensorFlow is imported only after
the arguments are parsed, so `--help` is instant and start-up noise can be hidden first.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ema_export.console import hide_native_logs, wants_verbose
from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE

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
    sources, report, verification = result.sources, result.fold, result.verification
    lines = [f"Training checkpoint  {sources.training.prefix}  ({sources.training.chosen_by})"]
    if sources.ema:
        lines.append(f"EMA checkpoint       {sources.ema.prefix}  ({sources.ema.chosen_by})")
    lines.append(f"Model                {result.model_source}, attached at {result.attachment}")
    lines.append(f"Layout               {report.layout}: {report.layout_reason}")
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


def _fail(message: str, code: int, as_json: bool, kind: str) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "type": kind}))
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("ckpt_dir", metavar="CKPT_DIR")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--ema-checkpoint", metavar="PATH",
              help="EMA checkpoint directory or prefix. Default: CKPT_DIR/ema/.")
@click.option("--model", "model_spec", metavar="MODULE:FACTORY",
              help="Function building the untrained model, e.g. my_project.models:build. "
                   "Default: model.keras or model.json in CKPT_DIR (architecture only).")
@click.option("--input-signature", multiple=True, metavar="NAME:DTYPE:[SHAPE]",
              help="Serving input for models that do not define one, e.g. 'inputs:float32:[None,28,28,1]'. "
                   "Repeat once per input.")
@click.option("--allow-missing", is_flag=True,
              help="Let trainable variables without a shadow serve their live value in serve_ema "
                   "(recorded in the manifest) instead of failing.")
@click.option("--version", "version", type=click.IntRange(min=1), metavar="N",
              help="Version number to write. Default: one more than the highest in OUT_DIR.")
@click.option("--overwrite", is_flag=True, help="Replace version N if it already exists.")
@click.option("--default-signature", type=click.Choice(["ema", "live"]), default="ema", show_default=True,
              help="Which arm serving_default serves.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (the manifest plus version_dir) as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show TensorFlow's log output and full tracebacks.")
def cli(ckpt_dir: str, out_dir: str, ema_checkpoint: str | None, model_spec: str | None,
        input_signature: tuple[str, ...], allow_missing: bool, version: int | None, overwrite: bool,
        default_signature: str, as_json: bool, verbose: bool) -> None:
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
        from ema_export.api import ExportOptions, export

        options = ExportOptions(ema_checkpoint=ema_checkpoint, input_signature=input_signature or None,
                                allow_missing=allow_missing, version=version, overwrite=overwrite,
                                default_signature=default_signature)
        progress = _StageProgress(enabled=not as_json and sys.stderr.isatty())
        result = export(ckpt_dir, out_dir, model=model_spec, options=options, progress=progress)
    except EmaExportError as error:
        _fail(str(error), error.exit_code, as_json, type(error).__name__)
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


def main() -> None:
    """Console-script entry point: hide native log noise unless --verbose, then run the command."""
    if not wants_verbose(sys.argv[1:]):
        hide_native_logs()
    cli()
