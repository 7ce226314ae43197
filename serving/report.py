"""One self-contained HTML page of an A/B comparison: ``ema-serving compare --report PATH.html``.

Why a page: people deciding between two arms read a picture faster than a table. The page is rendered from the
``compare --json`` document (``CompareReport.to_dict()``), so it shows exactly what the command measured, plus two
optional sources: the export's manifest (live-vs-EMA drift per variable) and a training log (learning curves).

Why self-contained: it is opened from disk, attached to tickets, archived with a run. Styles are inline, figures are
SVG embedded as ``data:`` URIs, and nothing refers to the network. Every figure on the page is also carried in an
element with ``data-source`` (``compare``, ``manifest`` or ``training_log``) and ``data-path`` (a JSON list of keys
into that document) and its exact value in ``data-value``; figures computed here rather than read (a Wilson interval
when the document has none, a count from a rate) say how in ``data-derived``. Tests and scripts read them back.

Plots are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``, no pyplot), which never touches
the process-wide backend: safe inside any host program. matplotlib is imported only when a page is rendered, and
nothing here imports the TensorFlow runtime.

Example:
    >>> page = ReportInputs(compare=report.to_dict(), manifest=find_manifest("models/classifier", 3))  # doctest: +SKIP
    >>> write_report("ab.html", page)  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ema_export.contracts import ASSETS_EXTRA_DIR, MANIFEST_FILENAME
from serving.ab import Z_95
from serving.protocol import DataError

BASELINE_COLOR = "#4c6a9c"
CANDIDATE_COLOR = "#e07b39"
SIGNIFICANCE_LEVEL = 0.05
MAX_MATRIX_CLASSES = 20
"""Classes shown in the disagreement matrix; more would be unreadable. The most-disagreed-on are kept."""
MAX_HISTOGRAM_BARS = 40
"""Bars per latency histogram."""
MAX_DRIFT_BARS = 30
"""Variables drawn in the drift chart (largest drifts first); the table below it lists every one."""

_RC: Any = {"svg.hashsalt": "ema-serving-report", "svg.fonttype": "none", "font.size": 9.0, "axes.spines.top": False,
       "axes.spines.right": False}  # fmt: skip
"""Fixed hash salt: the same inputs give byte-identical pages. Text stays text (small, selectable)."""


@dataclass(frozen=True)
class ReportInputs:
    """What a page is rendered from.

    Attributes:
        compare: the ``ema-serving compare --json`` document (``CompareReport.to_dict()``).
        manifest: the export's ``ema_export.json`` (``find_manifest``), for the drift panel; None to leave it out.
        training_log: a training log (``load_training_log``), for the learning curves; None to leave them out.
        sources: what each input was read from, shown in the page's footer (e.g. ``{"manifest": "models/3/..."}``).
    """

    compare: Mapping[str, Any]
    manifest: Mapping[str, Any] | None = None
    training_log: Mapping[str, Any] | None = None
    sources: Mapping[str, str] | None = None


# ------------------------------------------------------------------------------------------------------------- inputs
def load_training_log(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a training log: ``{"records": [{"step": int, "live": float, "ema": float}, ...], ...}``.

    Optional keys: ``metric`` (the curves' y label, default "accuracy"), ``evaluated_on`` (a caption), ``arms``
    (``{"live": signature, "ema": signature}``), ``settings`` (shown as a table). ``examples/digits_noisy_labels.py``
    writes one.

    Raises:
        DataError: unreadable, not JSON, or records of the wrong shape.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"Cannot read the training log {path} as JSON. Expected a JSON object with a 'records' list; fix the "
            f"file or the path (--training-log). Received: {error}"
        ) from error
    records = document.get("records") if isinstance(document, dict) else None
    problems = _record_problems(records)
    if problems:
        raise DataError(
            f"The training log {path} has no usable learning curve: {'; '.join(problems)}. Expected "
            '{"records": [{"step": 100, "live": 0.91, "ema": 0.93}, ...]}; fix the file (--training-log). '
            f"Received: {type(records).__name__ if records is not None else 'no records key'}."
        )
    return document


def _record_problems(records: Any) -> list[str]:
    if not isinstance(records, list) or not records:
        return ["'records' must be a non-empty list"]
    problems = []
    for index, record in enumerate(records):
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                and all(_is_number(record.get(key)) for key in ("live", "ema"))):
            problems.append(f"record {index} is {record!r}, not {{step: int, live: number, ema: number}}")
    return problems[:5]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_manifest(path: str | os.PathLike, model_version: int | None) -> tuple[dict[str, Any], Path]:
    """The manifest of the compared export, and where it was found.

    Args:
        path: the manifest file itself, a version directory (``<base>/<N>``) or the model's base path, where the
            version that answered the comparison (``model_version``) is picked.
        model_version: the version the server answered with (``CompareReport.model_version``).

    Raises:
        DataError: no manifest there, or not JSON.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / ASSETS_EXTRA_DIR / MANIFEST_FILENAME]
    if path.is_dir() and model_version is not None:
        candidates.append(path / str(model_version) / ASSETS_EXTRA_DIR / MANIFEST_FILENAME)
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise DataError(
            f"No export manifest at {path}. Expected the manifest file, a version directory, or the model base path "
            f"holding version {model_version} ({ASSETS_EXTRA_DIR}/{MANIFEST_FILENAME} inside it); fix --manifest. "
            f"Received: {path}."
        )
    try:
        manifest = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"Cannot read the manifest {found} as JSON. Expected the {MANIFEST_FILENAME} ema-export wrote; fix "
            f"--manifest. Received: {error}"
        ) from error
    if not isinstance(manifest, dict) or "variables" not in manifest:
        raise DataError(
            f"{found} is not an ema-export manifest. Expected a JSON object with 'variables'; fix --manifest. "
            f"Received: keys {sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__}."
        )
    return manifest, found


# ------------------------------------------------------------------------------------------------------------- output
def write_report(path: str | os.PathLike, inputs: ReportInputs) -> Path:
    """Render the page and write it atomically (a temporary file in the same folder, then a rename).

    Why atomic: a reader (a browser tab reloading, a CI artifact upload) never sees half a page.
    """
    path = Path(path)
    page = render_report(inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise DataError(
            f"Cannot write the report to {path}. Expected a file path in a writable folder; fix --report. "
            f"Received: {error}"
        ) from error
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(page)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the page from a web server or a colleague
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def render_report(inputs: ReportInputs) -> str:
    """The whole page as one HTML string."""
    import matplotlib

    document = inputs.compare
    with matplotlib.rc_context(_RC):
        sections = [
            _summary_section(document),
            _metrics_section(document),
            _agreement_section(document),
            _disagreement_section(document),
            _latency_section(document),
            _drift_section(inputs.manifest),
            _learning_section(inputs.training_log),
            _data_section(inputs),
        ]
    title = f"A/B report: {document.get('candidate')} vs {document.get('baseline')} on {document.get('model')}"
    return _PAGE.format(title=_text(title), style=_STYLE, body="\n".join(sections))


# ---------------------------------------------------------------------------------------------------- value elements
def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _value(source: str, path: Sequence[str | int], value: Any, shown: str, derived: str | None = None) -> str:
    """An element carrying one figure: shown formatted, exact in ``data-value``, traceable by source and path."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="missing">n/a</span>'
    attributes = {
        "class": "figure-value",
        "data-source": source,
        "data-path": json.dumps(list(path)),
        "data-value": json.dumps(value),
    }
    if derived:
        attributes["data-derived"] = derived
    rendered = " ".join(f'{name}="{_text(content)}"' for name, content in attributes.items())
    return f"<span {rendered}>{_text(shown)}</span>"


def _compare_value(path: Sequence[str | int], value: Any, spec: str, derived: str | None = None) -> str:
    return _value("compare", path, value, _format(value, spec), derived)


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def _lookup(document: Mapping[str, Any] | None, *path: str | int) -> Any:
    current: Any = document
    for key in path:
        in_mapping = isinstance(current, Mapping) and key in current
        in_list = isinstance(current, list) and isinstance(key, int) and -len(current) <= key < len(current)
        if in_mapping or in_list:
            current = current[key]
        else:
            return None
    return current


def _not_available(what: str, why: str) -> str:
    return f'<div class="not-available"><strong>{_text(what)}: not available.</strong> {_text(why)}</div>'


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{_text(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------------------------------ figures
@contextmanager
def _figure(width: float, height: float) -> Iterator[Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    yield figure
    figure.clear()


def _embed(figure: Any, alternative: str) -> str:
    """The figure as an SVG ``data:`` URI image: no network, and each image's ids stay its own."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_text(alternative)}" src="data:image/svg+xml;base64,{encoded}">'


def _plot(width: float, height: float, alternative: str, draw: Callable[[Any], None]) -> str:
    with _figure(width, height) as figure:
        draw(figure)
        return _embed(figure, alternative)


def _arm_names(document: Mapping[str, Any]) -> list[str]:
    """Baseline first, then the candidate, whatever order the document's keys came in (sorted JSON reorders them)."""
    names = list(document.get("arms") or {})
    leading = [name for name in (document.get("baseline"), document.get("candidate")) if name in names]
    return leading + [name for name in names if name not in leading]


def _arm_colors(document: Mapping[str, Any]) -> dict[str, str]:
    return {document.get("baseline", ""): BASELINE_COLOR, document.get("candidate", ""): CANDIDATE_COLOR}


# ------------------------------------------------------------------------------------------------------------ summary
def _summary_section(document: Mapping[str, Any]) -> str:
    baseline, candidate = document.get("baseline"), document.get("candidate")
    facts = [
        ("model", _text(document.get("model"))),
        ("version", _compare_value(["model_version"], document.get("model_version"), "")),
        ("task", _text(document.get("task"))),
        ("output compared", _text(document.get("output"))),
        ("examples", _compare_value(["num_examples"], document.get("num_examples"), "d")),
        ("answered by both arms", _compare_value(["num_paired"], document.get("num_paired"), "d")),
        ("baseline / candidate", f"{_text(baseline)} / {_text(candidate)} (differences are candidate - baseline)"),
        ("wall time", _compare_value(["wall_time_s"], document.get("wall_time_s"), ".2f") + " s"),
    ]
    rows = "".join(f"<tr><th>{_text(name)}</th><td>{cell}</td></tr>" for name, cell in facts)
    return _section("summary", "Summary", f'<p class="verdict">{_verdict(document)}</p>',
                    f'<table class="facts">{rows}</table>')


def _verdict(document: Mapping[str, Any]) -> str:
    """The comparison's conclusion in plain words."""
    baseline, candidate = _text(document.get("baseline")), _text(document.get("candidate"))
    difference, p_value = document.get("accuracy_diff"), document.get("mcnemar_p")
    if difference is not None and p_value is not None:
        return _accuracy_verdict(document, baseline, candidate, difference, p_value)
    for metric in ("mae", "mse"):
        interval = document.get(f"{metric}_diff")
        if interval is not None:
            return _error_verdict(metric, baseline, candidate, interval)
    return ("No labels were given, so neither arm can be called better; the arms are compared by how often they "
            "agree. Pass <code>--labels</code> for accuracy or error.")


def _accuracy_verdict(document: Mapping[str, Any], baseline: str, candidate: str, difference: Mapping[str, Any],
                      p_value: float) -> str:
    discordant = document.get("discordant") or {}
    only_baseline = discordant.get(f"{document.get('baseline')}_only_correct", 0)
    only_candidate = discordant.get(f"{document.get('candidate')}_only_correct", 0)
    low, high = difference["ci95"]
    estimate = _compare_value(["accuracy_diff", "estimate"], difference["estimate"], "+.4f")
    interval = (f"{_compare_value(['accuracy_diff', 'ci95', 0], low, '+.4f')} to "
                f"{_compare_value(['accuracy_diff', 'ci95', 1], high, '+.4f')}")
    p_shown = _compare_value(["mcnemar_p"], p_value, ".3g")
    words = (f"{candidate} was right on {only_candidate} examples where {baseline} was wrong, and wrong on "
             f"{only_baseline} where {baseline} was right. Accuracy difference {estimate} (95% interval {interval}). ")
    if p_value < SIGNIFICANCE_LEVEL:
        better = candidate if difference["estimate"] > 0 else baseline
        return words + (f"Exact McNemar test: p = {p_shown}, below {SIGNIFICANCE_LEVEL}: a split of the disagreements "
                        f"this uneven would be unlikely if both arms were equally accurate. "
                        f"<strong>{better} is more accurate.</strong>")
    return words + (f"Exact McNemar test: p = {p_shown}, not below {SIGNIFICANCE_LEVEL}: a split this uneven happens "
                    f"often enough by chance. <strong>No evidence that either arm is more accurate.</strong>")


def _error_verdict(metric: str, baseline: str, candidate: str, interval: Mapping[str, Any]) -> str:
    low, high = interval["ci95"]
    shown = (f"{_compare_value([f'{metric}_diff', 'estimate'], interval['estimate'], '+.4g')} (95% paired bootstrap "
             f"interval {_compare_value([f'{metric}_diff', 'ci95', 0], low, '+.4g')} to "
             f"{_compare_value([f'{metric}_diff', 'ci95', 1], high, '+.4g')})")
    name = metric.upper()
    if high < 0:
        conclusion = f"<strong>{candidate} has the lower {name}</strong>: the whole interval is below zero."
    elif low > 0:
        conclusion = f"<strong>{baseline} has the lower {name}</strong>: the whole interval is above zero."
    else:
        conclusion = "<strong>No evidence that either arm errs less</strong>: the interval contains zero."
    return f"{name} of {candidate} minus {name} of {baseline}: {shown}. {conclusion}"


# ------------------------------------------------------------------------------------------------------------ metrics
def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: well-behaved near 0 and 1 and for small n, unlike the Wald interval."""
    if trials <= 0:
        return math.nan, math.nan
    proportion = successes / trials
    denominator = 1 + z * z / trials
    center = (proportion + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


@dataclass(frozen=True)
class _ArmAccuracy:
    """One arm's accuracy with its interval and the HTML of each figure."""

    name: str
    accuracy: float
    low: float
    high: float
    cells: tuple[str, str, str]


def _arm_accuracy(document: Mapping[str, Any], name: str) -> _ArmAccuracy | None:
    accuracy = _lookup(document, "arms", name, "accuracy")
    if accuracy is None:
        return None
    given = _lookup(document, "arms", name, "accuracy_interval")
    if given is not None:
        low, high = given["low"], given["high"]
        cells = (_compare_value(["arms", name, "accuracy_interval", "low"], low, ".4f"),
                 _compare_value(["arms", name, "accuracy_interval", "high"], high, ".4f"))
    else:
        trials = int(document.get("num_paired") or 0)
        low, high = wilson_interval(round(accuracy * trials), trials)
        derived = "wilson 95% interval of round(accuracy * num_paired) successes in num_paired"
        cells = (_compare_value(["arms", name, "accuracy_interval", "low"], low, ".4f", derived),
                 _compare_value(["arms", name, "accuracy_interval", "high"], high, ".4f", derived))
    shown = _compare_value(["arms", name, "accuracy"], accuracy, ".4f")
    return _ArmAccuracy(name, accuracy, low, high, (shown, *cells))


def _metrics_section(document: Mapping[str, Any]) -> str:
    arms = _arm_names(document)
    if document.get("accuracy_diff") is not None:
        return _accuracy_panel(document, arms)
    if document.get("mae_diff") is not None:
        return _error_panel(document, arms)
    return _section("metrics", "Accuracy or error per arm",
                    _not_available("Accuracy and error", "The comparison ran without labels (--labels KEY)."))


def _accuracy_panel(document: Mapping[str, Any], arms: list[str]) -> str:
    measured = [arm for arm in (_arm_accuracy(document, name) for name in arms) if arm is not None]
    rows = [(_text(arm.name), arm.cells[0], arm.cells[1], arm.cells[2],
             _compare_value(["arms", arm.name, "n"], _lookup(document, "arms", arm.name, "n"), "d"))
            for arm in measured]
    table = _table(("arm", "accuracy", "95% low", "95% high", "answered"), rows)
    difference = document["accuracy_diff"]
    colors = _arm_colors(document)

    def draw(figure: Any) -> None:
        left, right = figure.subplots(1, 2, width_ratios=(3, 2))
        for position, arm in enumerate(measured):
            below, above = max(arm.accuracy - arm.low, 0.0), max(arm.high - arm.accuracy, 0.0)
            left.errorbar([arm.accuracy], [position], xerr=[[below], [above]],
                          fmt="o", color=colors.get(arm.name, "#555555"), capsize=4, markersize=7)
        left.set_yticks(range(len(measured)), [arm.name for arm in measured])
        left.set_ylim(-0.7, len(measured) - 0.3)
        left.set_xlabel("accuracy (95% interval)")
        _interval_axis(right, difference, "accuracy difference (candidate - baseline)")

    figure = _plot(8.5, 1.9, "accuracy of each arm with its 95% interval, and their difference", draw)
    return _section("metrics", "Accuracy per arm", table, figure)


def _interval_axis(axis: Any, interval: Mapping[str, Any], label: str) -> None:
    """One paired difference with its interval, against the zero line."""
    estimate, (low, high) = interval["estimate"], interval["ci95"]
    axis.axvline(0.0, color="#999999", linewidth=1, linestyle="--")
    axis.errorbar([estimate], [0], xerr=[[max(estimate - low, 0.0)], [max(high - estimate, 0.0)]], fmt="D",
                  color=CANDIDATE_COLOR, capsize=4, markersize=6)
    span = max(abs(low), abs(high), 1e-9) * 1.3
    axis.set_xlim(-span, span)
    axis.set_yticks([])
    axis.set_xlabel(label)


def _error_panel(document: Mapping[str, Any], arms: list[str]) -> str:
    rows = [(_text(name), _compare_value(["arms", name, "mae"], _lookup(document, "arms", name, "mae"), ".5g"),
             _compare_value(["arms", name, "mse"], _lookup(document, "arms", name, "mse"), ".5g"),
             _compare_value(["arms", name, "n"], _lookup(document, "arms", name, "n"), "d")) for name in arms]
    table = _table(("arm", "MAE", "MSE", "answered"), rows)
    differences = [(metric, document[f"{metric}_diff"]) for metric in ("mae", "mse") if document.get(f"{metric}_diff")]
    difference_rows = [
        (metric.upper(), _compare_value([f"{metric}_diff", "estimate"], interval["estimate"], "+.5g"),
         _compare_value([f"{metric}_diff", "ci95", 0], interval["ci95"][0], "+.5g"),
         _compare_value([f"{metric}_diff", "ci95", 1], interval["ci95"][1], "+.5g"))
        for metric, interval in differences
    ]
    difference_table = _table(("candidate - baseline", "estimate", "95% low", "95% high"), difference_rows)

    def draw(figure: Any) -> None:
        axes = figure.subplots(1, len(differences), squeeze=False)[0]
        for axis, (metric, interval) in zip(axes, differences):
            _interval_axis(axis, interval, f"{metric.upper()} difference (paired bootstrap 95%)")

    figure = _plot(8.5, 1.5, "error difference between the arms with its paired bootstrap interval", draw)
    return _section("metrics", "Error per arm (regression)", table, difference_table, figure)


# ---------------------------------------------------------------------------------------------------------- agreement
def _agreement_section(document: Mapping[str, Any]) -> str:
    rows = [
        ("mean |difference| of the outputs", _compare_value(["mean_abs_diff"], document.get("mean_abs_diff"), ".4g")),
        ("max |difference| of the outputs", _compare_value(["max_abs_diff"], document.get("max_abs_diff"), ".4g")),
    ]
    agreement, num_paired = document.get("agreement"), document.get("num_paired") or 0
    if agreement is not None:
        flips = round(document["flip_rate"] * num_paired)
        rows = [
            ("top-1 agreement", _compare_value(["agreement"], agreement, ".4f")),
            ("flip rate", _compare_value(["flip_rate"], document.get("flip_rate"), ".4f")),
            ("examples whose predicted class flips",
             _compare_value(["flips"], flips, "d", derived="round(flip_rate * num_paired)")),
            *_discordant_rows(document, flips),
            *rows,
        ]
    body = "".join(f"<tr><th>{_text(name)}</th><td>{cell}</td></tr>" for name, cell in rows)
    return _section("agreement", "Agreement and flips", f'<table class="facts">{body}</table>')


def _discordant_rows(document: Mapping[str, Any], flips: int) -> list[tuple[str, str]]:
    discordant = document.get("discordant")
    if not discordant:
        return []
    baseline, candidate = document["baseline"], document["candidate"]
    fixed = discordant.get(f"{candidate}_only_correct", 0)
    broken = discordant.get(f"{baseline}_only_correct", 0)
    return [
        (f"flips only {candidate} gets right (fixed)",
         _compare_value(["discordant", f"{candidate}_only_correct"], fixed, "d")),
        (f"flips only {baseline} gets right (broken)",
         _compare_value(["discordant", f"{baseline}_only_correct"], broken, "d")),
        ("flips both get wrong", _compare_value(["flips_both_wrong"], flips - fixed - broken, "d",
                                                derived="flips - fixed - broken")),
    ]


def _disagreement_section(document: Mapping[str, Any]) -> str:
    title = "Where the arms disagree"
    if document.get("task") != "classification":
        return _section("disagreements", title, _not_available(
            "Disagreement matrix", "It is drawn for classification outputs only."))
    disagreements = document.get("disagreements")
    if not disagreements or not disagreements.get("counts"):
        return _section("disagreements", title, _not_available(
            "Disagreement matrix", "This compare output has no per-class disagreement counts "
            "('disagreements' in the --json document); it comes with a newer ema-serving compare."))
    classes, counts = list(disagreements["classes"]), [list(row) for row in disagreements["counts"]]
    shown = _busiest_classes(counts)
    total = sum(sum(row) for row in counts)
    baseline, candidate = document["baseline"], document["candidate"]

    def draw(figure: Any) -> None:
        axis = figure.subplots()
        matrix = [[counts[row][column] for column in shown] for row in shown]
        axis.imshow(matrix, cmap="Oranges", vmin=0)
        for row_index, row in enumerate(matrix):
            for column_index, count in enumerate(row):
                if count:
                    axis.text(column_index, row_index, str(count), ha="center", va="center", fontsize=8)
        labels = [str(classes[index]) for index in shown]
        axis.set_xticks(range(len(shown)), labels, rotation=90 if len(shown) > 12 else 0)
        axis.set_yticks(range(len(shown)), labels)
        axis.set_xlabel(f"{candidate} predicted")
        axis.set_ylabel(f"{baseline} predicted")

    size = 2.2 + 0.28 * len(shown)
    figure = _plot(size + 0.6, size, f"matrix of the classes {baseline} and {candidate} predicted where they differ",
                   draw)
    note = ("" if len(shown) == len(classes) else
            f"<p>Showing the {len(shown)} of {len(classes)} classes with the most disagreements.</p>")
    pairs = sorted(((count, row, column) for row, counts_row in enumerate(counts)
                    for column, count in enumerate(counts_row) if count), reverse=True)[:10]
    rows = [(_text(classes[row]), _text(classes[column]),
             _compare_value(["disagreements", "counts", row, column], count, "d")) for count, row, column in pairs]
    table = _table((f"{baseline} said", f"{candidate} said", "examples"), rows)
    total_shown = _compare_value(["disagreements_total"], total, "d", derived="sum of disagreements.counts")
    return _section("disagreements", title, f"<p>{total_shown} examples where the predicted classes differ; rows are "
                    f"{_text(baseline)}'s class, columns {_text(candidate)}'s.</p>{note}",
                    f'<div class="side-by-side">{figure}{table}</div>')


def _busiest_classes(counts: list[list[int]]) -> list[int]:
    totals = [sum(counts[index]) + sum(row[index] for row in counts) for index in range(len(counts))]
    busiest = sorted(range(len(counts)), key=lambda index: -totals[index])[:MAX_MATRIX_CLASSES]
    return sorted(busiest)


# ------------------------------------------------------------------------------------------------------------ latency
_PERCENTILES = (("p50", ":"), ("p90", "--"), ("p99", "-."))


def _latency_section(document: Mapping[str, Any]) -> str:
    arms = [name for name in _arm_names(document) if _lookup(document, "arms", name, "latency_ms")]
    if not arms:
        return _section("latency", "Latency per request", _not_available(
            "Latency", "No request was answered, so no latency was measured."))
    rows = [(_text(name), *(_compare_value(["arms", name, "latency_ms", key],
                                           _lookup(document, "arms", name, "latency_ms", key), ".2f")
                            for key in ("p50", "p90", "p99", "mean")),
             _compare_value(["arms", name, "requests"], _lookup(document, "arms", name, "requests"), "d"))
            for name in arms]
    table = _table(("arm", "p50 ms", "p90 ms", "p99 ms", "mean ms", "requests"), rows)
    histograms = {name: _histogram(_lookup(document, "arms", name, "latency_histogram")) for name in arms}
    colors = _arm_colors(document)
    if all(histogram is not None for histogram in histograms.values()):
        figure = _plot(8.5, 1.6 + 1.4 * len(arms), "latency distribution of each arm with p50, p90 and p99 marked",
                       lambda figure: _draw_histograms(figure, document, arms, histograms, colors))
        return _section("latency", "Latency per request", table, figure)
    figure = _plot(8.5, 1.2 + 0.45 * len(arms), "p50, p90 and p99 latency of each arm",
                   lambda figure: _draw_percentiles(figure, document, arms, colors))
    return _section("latency", "Latency per request", table, figure, _not_available(
        "Latency distribution", "This compare output has percentiles only, no histogram ('latency_histogram' in the "
        "--json document); it comes with a newer ema-serving compare. The percentiles are drawn instead."))


def _histogram(histogram: Mapping[str, Any] | None) -> tuple[list[float], list[int]] | None:
    """(bucket edges, counts) from ``{bounds_ms, counts}``: edges (one more than counts) or upper bounds."""
    if not histogram or not histogram.get("counts"):
        return None
    bounds = [float(bound) for bound in histogram["bounds_ms"]]
    counts = [int(count) for count in histogram["counts"]]
    if len(bounds) == len(counts) + 1:
        edges = bounds
    elif len(bounds) == len(counts):  # upper bounds; the first bucket starts at 0
        edges = [0.0, *bounds]
    elif len(bounds) + 1 == len(counts):  # upper bounds plus an overflow bucket
        edges = [0.0, *bounds, bounds[-1] * 2 if bounds else 1.0]
    else:
        return None
    if math.isinf(edges[-1]):
        edges[-1] = edges[-2] * 2 if len(edges) > 2 and edges[-2] > 0 else edges[-2] + 1.0
    return _coarser(edges, counts)


def _coarser(edges: list[float], counts: list[int]) -> tuple[list[float], list[int]]:
    """At most ``MAX_HISTOGRAM_BARS`` bars: neighbouring buckets are added up (fine buckets, such as 1%-wide ones,
    would draw as a comb). Consecutive log-spaced buckets merge into log-spaced bars."""
    group = math.ceil(len(counts) / MAX_HISTOGRAM_BARS)
    if group <= 1:
        return edges, counts
    starts = range(0, len(counts), group)
    return ([edges[start] for start in starts] + [edges[-1]],
            [sum(counts[start : start + group]) for start in starts])


def _draw_histograms(figure: Any, document: Mapping[str, Any], arms: list[str],
                     histograms: Mapping[str, Any], colors: Mapping[str, str]) -> None:
    axes = figure.subplots(len(arms), 1, sharex=True, squeeze=False)[:, 0]
    for axis, name in zip(axes, arms):
        edges, counts = histograms[name]
        widths = [right - left for left, right in itertools.pairwise(edges)]
        axis.bar(edges[:-1], counts, width=widths, align="edge", color=colors.get(name, "#777777"), alpha=0.8)
        if edges[0] > 0 and edges[-1] / edges[0] > 20:
            axis.set_xscale("log")  # exponential buckets, the usual latency layout, read best on a log axis
            _plain_log_ticks(axis.xaxis)
        _mark_percentiles(axis, document, name)
        axis.set_ylabel(f"{name}\nrequests")
        axis.legend(loc="upper right", frameon=False, fontsize=8)
    axes[-1].set_xlabel("latency per request (ms)")


def _plain_log_ticks(axis: Any) -> None:
    """Label a log axis 1, 2, 5, 10, 20... in plain numbers: latencies in ms read badly as powers of ten."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _mark_percentiles(axis: Any, document: Mapping[str, Any], name: str) -> None:
    for key, style in _PERCENTILES:
        value = _lookup(document, "arms", name, "latency_ms", key)
        if value is not None:
            axis.axvline(value, color="#222222", linestyle=style, linewidth=1.2, label=f"{key} {value:.2f} ms")


def _draw_percentiles(figure: Any, document: Mapping[str, Any], arms: list[str], colors: Mapping[str, str]) -> None:
    axis = figure.subplots()
    markers = {"p50": "o", "p90": "s", "p99": "^"}
    for position, name in enumerate(arms):
        values = [_lookup(document, "arms", name, "latency_ms", key) for key, _ in _PERCENTILES]
        axis.plot(values, [position] * len(values), color=colors.get(name, "#777777"), linewidth=1)
        for (key, _), value in zip(_PERCENTILES, values):
            axis.plot([value], [position], markers[key], color=colors.get(name, "#777777"),
                      label=key if position == 0 else None)
    axis.set_yticks(range(len(arms)), arms)
    axis.set_ylim(-0.6, len(arms) - 0.4)
    axis.set_xlabel("latency per request (ms)")
    axis.legend(loc="lower right", frameon=False, fontsize=8, ncols=3)


# -------------------------------------------------------------------------------------------------------------- drift
def _drift_section(manifest: Mapping[str, Any] | None) -> str:
    title = "Live-vs-EMA drift per variable"
    if manifest is None:
        return _section("drift", title, _not_available(
            "Drift", "No export manifest was given: pass --manifest with the model's base path, its version "
            "directory or the ema_export.json file."))
    folded = list(_lookup(manifest, "variables", "folded") or [])
    order = sorted(range(len(folded)), key=lambda index: -float(folded[index].get("relative_l2", 0.0)))
    rows = [(_text(folded[index].get("name")), _text(folded[index].get("shape")),
             _value("manifest", ["variables", "folded", index, "relative_l2"], folded[index].get("relative_l2"),
                    _format(folded[index].get("relative_l2"), ".4g"))) for index in order]
    kept = list(_lookup(manifest, "variables", "kept_live") or [])
    kept_rows = [(_text(item.get("name")), _text(item.get("reason"))) for item in kept]
    parts = [(f"<p>Relative L2 distance of each average from its live value, ||ema - live|| / ||live||, as the "
              f"export recorded it (version {_text(manifest.get('version'))}, step "
              f"{_text(_lookup(manifest, 'sources', 'training_step'))}).</p>")]
    if folded:
        shown = order[:MAX_DRIFT_BARS]
        parts.append(_plot(8.5, 0.8 + 0.22 * len(shown), "relative L2 drift of each averaged variable",
                           lambda figure: _draw_drift(figure, [folded[index] for index in shown])))
        parts.append(_table(("variable", "shape", "relative L2"), rows, "scroll"))
    if kept_rows:
        parts.append("<h3>Kept live in the EMA arm</h3>" + _table(("variable", "why"), kept_rows))
    return _section("drift", title, *parts)


def _draw_drift(figure: Any, variables: list[Mapping[str, Any]]) -> None:
    axis = figure.subplots()
    names = [str(item.get("name")) for item in variables]
    axis.barh(range(len(variables)), [float(item.get("relative_l2", 0.0)) for item in variables],
              color=CANDIDATE_COLOR)
    axis.set_yticks(range(len(variables)), names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("||ema - live|| / ||live||")


# ---------------------------------------------------------------------------------------------------- learning curves
def _learning_section(training_log: Mapping[str, Any] | None) -> str:
    title = "Learning curves"
    if training_log is None:
        return _section("learning", title, _not_available(
            "Learning curves", "No training log was given (--training-log)."))
    records = list(training_log["records"])
    metric = str(training_log.get("metric", "accuracy"))
    arms = training_log.get("arms") or {"live": "live", "ema": "ema"}
    figure = _plot(8.5, 3.0, f"held-out {metric} of the live and the averaged weights at every saved step",
                   lambda figure: _draw_curves(figure, records, metric, arms))
    last = len(records) - 1
    best = {key: max(range(len(records)), key=lambda index: records[index][key]) for key in ("live", "ema")}
    rows = [(_text(arms.get(key, key)),
             _value("training_log", ["records", last, key], records[last][key], f"{records[last][key]:.4f}"),
             _value("training_log", ["records", best[key], key], records[best[key]][key],
                    f"{records[best[key]][key]:.4f}") + f" at step {records[best[key]]['step']}")
            for key in ("live", "ema")]
    table = _table(("weights", f"{metric} at step {records[last]['step']}", f"best {metric}"), rows)
    caption = f"<p>Evaluated on {_text(training_log['evaluated_on'])}.</p>" if training_log.get("evaluated_on") else ""
    settings = training_log.get("settings") or {}
    settings_table = _table(("setting", "value"), [(_text(key), _text(value)) for key, value in settings.items()])
    return _section("learning", title, caption, figure, table, settings_table if settings else "")


def _draw_curves(figure: Any, records: list[Mapping[str, Any]], metric: str, arms: Mapping[str, str]) -> None:
    axis = figure.subplots()
    steps = [record["step"] for record in records]
    for key, color in (("live", BASELINE_COLOR), ("ema", CANDIDATE_COLOR)):
        axis.plot(steps, [record[key] for record in records], color=color, marker="o", markersize=3,
                  label=f"{arms.get(key, key)} ({key} weights)")
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(frameon=False)


# ---------------------------------------------------------------------------------------------------------- the data
def _data_section(inputs: ReportInputs) -> str:
    sources = "".join(f"<li>{_text(name)}: <code>{_text(where)}</code></li>"
                      for name, where in (inputs.sources or {}).items())
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    embedded = json.dumps(inputs.compare, sort_keys=True, default=str).replace("</", "<\\/")
    return _section("data", "The data behind this page",
                    f"<p>Rendered {created} by ema-serving compare --report.</p>",
                    f"<ul>{sources}</ul>" if sources else "",
                    f'<details><summary>compare --json document</summary><pre>{_text(embedded)}</pre></details>',
                    f'<script type="application/json" id="compare-document">{embedded}</script>')


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d2430;
       max-width: 1040px; margin: 24px auto; padding: 0 20px; background: #fafbfc; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin: 0 0 10px; } h3 { font-size: 14px; }
section { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 14px 18px; margin: 14px 0; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 3px 12px 3px 0; text-align: left;
       vertical-align: top; } thead th { border-bottom: 1px solid #ccd3dd; } .facts th { font-weight: 500;
       color: #4a5566; } .figure-value { font-variant-numeric: tabular-nums; font-weight: 600; }
.verdict { font-size: 15px; background: #f3f6fa; padding: 10px 12px; border-radius: 4px; }
.not-available { background: #fff7e8; border: 1px dashed #d9a441; padding: 8px 12px; border-radius: 4px;
       margin: 8px 0; } img.plot { max-width: 100%; display: block; margin: 8px 0; }
.side-by-side { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
table.scroll { display: block; max-height: 260px; overflow-y: auto; } pre { white-space: pre-wrap;
       word-break: break-all; font-size: 11px; } .missing { color: #8a94a3; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""

__all__ = ["ReportInputs", "find_manifest", "load_training_log", "render_report", "wilson_interval", "write_report"]
