"""`ema-serving compare --report`: the page carries exactly what compare measured, and renders offline in Chromium.

Every figure on the page sits in an element with ``data-source``/``data-path``/``data-value``; these tests read them
back (from the HTML, and from the DOM headless Chromium built) and check each against the document it came from.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from ema_export.contracts import ASSETS_EXTRA_DIR, MANIFEST_FILENAME
from serving import report
from serving.cli import main
from serving.protocol import DataError
from serving.report import CANDIDATE_COLOR, ReportInputs, find_manifest, load_training_log, render_report
from support.rpc import classification_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")  # fmt: skip
WINDOW = (1100, 2600)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium to render the page headless (apt-get install chromium; .ci/run installs it "
    "where apt-get exists)",
)


# ------------------------------------------------------------------------------------------------- reading the page
@dataclass(frozen=True)
class Figure:
    source: str
    path: tuple[Any, ...]
    value: Any
    shown: str
    derived: str | None


class _PageParser(HTMLParser):
    """Collects figure elements (with their text), image sources and every external-looking reference."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[Figure] = []
        self.images: list[str] = []
        self.references: list[str] = []
        self.not_available: list[str] = []
        self._open: dict[str, str] | None = None
        self._text: list[str] = []
        self._in_missing = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        for name in ("src", "href"):
            if name in attributes and not attributes[name].startswith(("data:", "#")):
                self.references.append(attributes[name])
        if tag == "link" or (tag == "script" and "src" in attributes):
            self.references.append(tag)
        if "data-source" in attributes:
            self._open, self._text = attributes, []
        if attributes.get("class") == "not-available":
            self._in_missing = True
            self.not_available.append("")

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)
        if self._in_missing:
            self.not_available[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open is not None:
            attributes = self._open
            self.figures.append(Figure(attributes["data-source"], tuple(json.loads(attributes["data-path"])),
                                       json.loads(attributes["data-value"]), "".join(self._text),
                                       attributes.get("data-derived")))  # fmt: skip
            self._open = None
        if tag == "div":
            self._in_missing = False


def parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    return parser


def lookup(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def assert_figures_match(parser: _PageParser, documents: dict[str, Any]) -> set[tuple[str, tuple[Any, ...]]]:
    """Every read (not derived) figure equals its document's value exactly, and its text shows that value."""
    checked = set()
    for figure in parser.figures:
        shown = float(figure.shown.replace("+", ""))
        assert math.isclose(shown, figure.value, rel_tol=5e-3, abs_tol=5e-3), figure
        if figure.derived is None:
            assert lookup(documents[figure.source], figure.path) == figure.value, figure
            checked.add((figure.source, figure.path))
    return checked


# ------------------------------------------------------------------------------------------------- sample documents
def compare_document(**changes: Any) -> dict[str, Any]:
    """A classification ``compare --json`` document, with the fields a streaming compare adds."""
    histogram = {"bounds_ms": [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], "counts": [3, 40, 90, 25, 2]}
    arms = {
        name: {"n": 400, "errors": 0, "requests": 4, "accuracy": accuracy, "mae": None, "mse": None,
               "latency_ms": {"p50": 1.6, "p90": 3.1, "p99": 7.2, "mean": 1.9}, "first_error": None,
               "accuracy_interval": {"low": accuracy - 0.04, "high": accuracy + 0.03, "level": 0.95},
               "latency_histogram": histogram, "model_version": 3}
        for name, accuracy in (("serve_live", 0.8125), ("serve_ema", 0.87))
    }  # fmt: skip
    counts = [[0, 12, 3], [5, 0, 14], [1, 5, 0]]  # 40 flips: 27 fixed, 4 broken, 9 wrong either way
    document = {
        "model": "classifier", "model_version": 3, "task": "classification", "output": "output_0",
        "baseline": "serve_live", "candidate": "serve_ema", "num_examples": 400, "num_paired": 400, "arms": arms,
        "agreement": 0.9, "flip_rate": 0.09999999999999998,
        "discordant": {"serve_live_only_correct": 4, "serve_ema_only_correct": 27}, "mcnemar_p": 2.3e-05,
        "accuracy_diff": {"estimate": 0.0575, "ci95": [0.0321, 0.0829]}, "mae_diff": None, "mse_diff": None,
        "mean_abs_diff": 0.31, "max_abs_diff": 4.5, "wall_time_s": 0.42,
        "disagreements": {"classes": [0, 1, 2], "counts": counts},
    }  # fmt: skip
    document.update(changes)
    return document


MANIFEST = {
    "version": 3,
    "sources": {"training_step": 1500},
    "variables": {
        "folded": [
            {"name": "hidden/kernel", "path": "hidden/kernel", "shape": [64, 64], "dtype": "float32",
             "shadow_key": "hidden/kernel", "relative_l2": 0.1875},
            {"name": "hidden/bias", "path": "hidden/bias", "shape": [64], "dtype": "float32",
             "shadow_key": "hidden/bias", "relative_l2": 0.42},
        ],
        "kept_live": [{"name": "bn/moving_mean", "path": "bn/moving_mean", "reason": "non-trainable"}],
    },
}  # fmt: skip
TRAINING_LOG = {
    "metric": "accuracy",
    "evaluated_on": "400 clean held-out examples",
    "settings": {"noise": 0.4},
    "records": [{"step": 50 * index, "live": 0.5 + 0.02 * (index % 7), "ema": 0.6 + 0.01 * index}
                for index in range(1, 21)],
}  # fmt: skip


def full_page(document: dict[str, Any]) -> str:
    return render_report(ReportInputs(document, MANIFEST, TRAINING_LOG, {"manifest": "models/3"}))


# --------------------------------------------------------------------------------------------------------- fast tests
def test_every_figure_on_a_full_page_is_its_documents_value() -> None:
    document = compare_document()
    parser = parse(full_page(document))
    checked = assert_figures_match(parser, {"compare": document, "manifest": MANIFEST, "training_log": TRAINING_LOG})
    for arm in ("serve_live", "serve_ema"):
        assert ("compare", ("arms", arm, "accuracy")) in checked
        assert ("compare", ("arms", arm, "accuracy_interval", "low")) in checked  # given, so read, not derived
        assert {("compare", ("arms", arm, "latency_ms", key)) for key in ("p50", "p90", "p99")} <= checked
    assert {("compare", ("accuracy_diff", "ci95", 0)), ("compare", ("mcnemar_p",)),
            ("compare", ("discordant", "serve_ema_only_correct")), ("compare", ("disagreements", "counts", 1, 2)),
            ("manifest", ("variables", "folded", 1, "relative_l2")),
            ("training_log", ("records", 19, "ema"))} <= checked  # fmt: skip
    assert parser.not_available == []
    # Accuracy, disagreement matrix, latency histograms, drift, learning curves: SVG data URIs only.
    assert len(parser.images) == 5 and all(src.startswith("data:image/svg+xml;base64,") for src in parser.images)
    assert parser.references == []


def test_the_verdict_says_the_result_in_plain_words() -> None:
    page = full_page(compare_document())
    assert "serve_ema was right on 27 examples where serve_live was wrong, and wrong on 4" in page
    assert "serve_ema is more accurate." in page
    unclear = render_report(ReportInputs(compare_document(mcnemar_p=0.31)))
    assert "No evidence that either arm is more accurate." in unclear


def test_missing_fields_are_derived_from_what_is_there_or_marked_not_available() -> None:
    document = compare_document(disagreements=None)
    for arm in document["arms"].values():
        del arm["accuracy_interval"], arm["latency_histogram"], arm["model_version"]
    parser = parse(render_report(ReportInputs(document)))
    assert_figures_match(parser, {"compare": document})
    derived = {figure.path: figure for figure in parser.figures if figure.derived}
    for name, arm in document["arms"].items():
        expected = stats.binomtest(round(arm["accuracy"] * 400), 400).proportion_ci(0.95, method="wilson")
        assert derived[("arms", name, "accuracy_interval", "low")].value == pytest.approx(expected.low, rel=1e-9)
        assert derived[("arms", name, "accuracy_interval", "high")].value == pytest.approx(expected.high, rel=1e-9)
    assert derived[("flips",)].value == 40  # 0.1 of 400
    assert derived[("flips_both_wrong",)].value == 40 - 27 - 4
    missing = " ".join(parser.not_available)
    for what in ("Disagreement matrix: not available", "Latency distribution: not available", "Drift: not available",
                 "Learning curves: not available"):  # fmt: skip
        assert what in missing
    assert "--manifest" in missing and "--training-log" in missing


def test_a_regression_page_shows_error_per_arm_and_the_paired_interval() -> None:
    document = compare_document(task="regression", agreement=None, flip_rate=None, discordant=None, mcnemar_p=None,
                                accuracy_diff=None, disagreements=None,
                                mae_diff={"estimate": -0.052, "ci95": [-0.07, -0.031]},
                                mse_diff={"estimate": -0.01, "ci95": [-0.02, 0.004]})  # fmt: skip
    for arm, (mae, mse) in zip(document["arms"].values(), ((0.25, 0.09), (0.198, 0.08))):
        arm.update(accuracy=None, mae=mae, mse=mse)
        del arm["accuracy_interval"]
    page = render_report(ReportInputs(document))
    checked = assert_figures_match(parse(page), {"compare": document})
    assert {("compare", ("arms", "serve_ema", "mae")), ("compare", ("mse_diff", "ci95", 1)),
            ("compare", ("mae_diff", "estimate"))} <= checked  # fmt: skip
    assert "serve_ema has the lower MAE" in page
    assert "Disagreement matrix: not available" in " ".join(parse(page).not_available)


def test_without_labels_the_page_compares_agreement_only() -> None:
    document = compare_document(discordant=None, mcnemar_p=None, accuracy_diff=None)
    for arm in document["arms"].values():
        arm.update(accuracy=None)
        del arm["accuracy_interval"]
    page = render_report(ReportInputs(document))
    assert "No labels were given" in page and "Accuracy and error: not available" in page


def test_the_same_inputs_give_the_same_page() -> None:
    def without_timestamp(page: str) -> str:
        return "\n".join(line for line in page.splitlines() if not line.startswith("<p>Rendered "))

    assert without_timestamp(full_page(compare_document())) == without_timestamp(full_page(compare_document()))


def test_manifest_is_found_from_a_file_a_version_directory_or_the_base_path(tmp_path: Path) -> None:
    manifest_file = tmp_path / "models" / "3" / ASSETS_EXTRA_DIR / MANIFEST_FILENAME
    manifest_file.parent.mkdir(parents=True)
    manifest_file.write_text(json.dumps(MANIFEST))
    for given, version in ((manifest_file, None), (tmp_path / "models" / "3", None), (tmp_path / "models", 3)):
        assert find_manifest(given, version) == (MANIFEST, manifest_file)
    with pytest.raises(DataError, match=r"No export manifest .*version 4.*--manifest"):
        find_manifest(tmp_path / "models", 4)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not an ema-export manifest.*--manifest"):
        find_manifest(tmp_path / "other.json", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "Cannot read the training log"), ('{"records": []}', "non-empty list"),
     ('{"records": [{"step": 1, "live": "high"}]}', "record 0 is")],
)  # fmt: skip
def test_a_bad_training_log_is_one_error_naming_the_flag(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "log.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as raised:
        load_training_log(path)
    assert "--training-log" in str(raised.value)


def test_the_page_is_written_atomically_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    report.write_report(target, ReportInputs(compare_document()))
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text().startswith("<!DOCTYPE html>")
    assert [path.name for path in target.parent.iterdir()] == ["report.html"]  # no temporary file left
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="Cannot write the report.*--report"):
        report.write_report(tmp_path / "file" / "report.html", ReportInputs(compare_document()))


def test_importing_the_report_loads_neither_matplotlib_nor_tensorflow() -> None:
    code = ("import json, sys, serving.report, serving.client_cli; print(json.dumps(sorted(m for m in sys.modules if "
            "m.split('.')[0] == 'matplotlib' or m == 'tensorflow' or m.startswith('tensorflow.python'))))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(completed.stdout) == []


# ------------------------------------------------------------------------------------------ the command, in Chromium
def chromium(page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file:// URL, with a fresh profile and nothing that talks to the network by itself."""
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip


@pytest.fixture()
def cli_run(tmp_path: Path, classifier) -> dict[str, Any]:
    """One real `compare --json --report` run against the served classifier, with its manifest and a training log."""
    inputs = classification_inputs(300, seed=5)
    labels = classifier.expected(inputs, "serve_ema").argmax(axis=1)
    labels[::4] = classifier.expected(inputs[::4], "serve_live").argmax(axis=1)
    data = tmp_path / "validation.npz"
    np.savez(data, inputs=inputs, labels=labels)
    log = tmp_path / "training_log.json"
    log.write_text(json.dumps(TRAINING_LOG))
    page = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["compare", "--target", classifier.target, "--data", str(data), "--labels",
                                       "labels", "--json", "--report", str(page), "--manifest",
                                       str(classifier.base_path), "--training-log", str(log)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote the report to {page}" in result.stderr
    manifest = json.loads((classifier.base_path / "1" / ASSETS_EXTRA_DIR / MANIFEST_FILENAME).read_text())
    return {"page": page, "compare": json.loads(result.stdout), "manifest": manifest, "training_log": TRAINING_LOG}


@pytest.mark.slow
@needs_chromium
def test_the_page_chromium_renders_shows_the_json_of_the_same_run(tmp_path: Path, cli_run: dict[str, Any]) -> None:
    dom = chromium(cli_run["page"], tmp_path / "profile-dom", "--dump-dom").stdout
    parser = parse(dom)
    checked = assert_figures_match(parser, cli_run)
    for arm in ("serve_live", "serve_ema"):
        assert {("compare", ("arms", arm, key)) for key in ("accuracy", "n")} <= checked
        assert {("compare", ("arms", arm, "latency_ms", key)) for key in ("p50", "p90", "p99")} <= checked
        assert ("compare", ("arms", arm, "accuracy_interval", "low")) in checked  # compare's own, not derived
    # compare's document has every panel's data: the disagreement matrix and the latency histograms are drawn.
    assert parser.not_available == [] and len(parser.images) == 5
    assert any(path[:2] == ("disagreements", "counts") for _, path in checked)
    assert {("compare", ("mcnemar_p",)), ("compare", ("accuracy_diff", "estimate")), ("compare", ("agreement",)),
            ("manifest", ("variables", "folded", 0, "relative_l2")),
            ("training_log", ("records", 19, "live"))} <= checked  # fmt: skip
    assert len(parser.figures) > 20 and parser.references == []
    document = json.loads(dom.split('id="compare-document">', 1)[1].split("</script>", 1)[0])
    assert document == cli_run["compare"]


@pytest.mark.slow
@needs_chromium
def test_the_screenshot_shows_the_plots(tmp_path: Path, cli_run: dict[str, Any]) -> None:
    from PIL import Image

    screenshot = tmp_path / "report.png"
    chromium(cli_run["page"], tmp_path / "profile-shot", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             f"--screenshot={screenshot}")  # fmt: skip
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # The candidate arm's colour is used only inside the plots: seeing it means the embedded SVGs were drawn.
    candidate = np.array([int(CANDIDATE_COLOR[index : index + 2], 16) for index in (1, 3, 5)])
    assert np.count_nonzero(np.all(np.abs(pixels.astype(int) - candidate) <= 3, axis=1)) > 500


@pytest.mark.slow
def test_report_options_need_report_and_bad_inputs_are_one_line_errors(tmp_path: Path, classifier) -> None:
    data = tmp_path / "validation.npz"
    np.savez(data, inputs=classification_inputs(20, seed=6), labels=np.zeros(20, dtype=np.int64))
    common = ["compare", "--target", classifier.target, "--data", str(data), "--labels", "labels"]
    usage = CliRunner().invoke(main, [*common, "--manifest", str(classifier.base_path)])
    assert usage.exit_code == 2 and "pass --report PATH.html" in usage.output
    bad_log = tmp_path / "log.json"
    bad_log.write_text("{}")
    page = tmp_path / "report.html"
    result = CliRunner().invoke(main, [*common, "--report", str(page), "--training-log", str(bad_log)])
    assert result.exit_code == 2 and "--training-log" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(main, [*common, "--report", str(page), "--manifest", str(tmp_path)])
    assert missing.exit_code == 2 and "No export manifest" in missing.output
    assert not page.exists() and not any(path.suffix == ".tmp" for path in tmp_path.iterdir())


def test_fine_latency_buckets_are_drawn_as_at_most_forty_bars() -> None:
    edges = [0.001 * 1.01**index for index in range(101)]
    coarse_edges, counts = report._histogram({"bounds_ms": edges, "counts": list(range(100))})
    assert len(counts) <= report.MAX_HISTOGRAM_BARS and sum(counts) == sum(range(100))
    assert coarse_edges[0] == edges[0] and coarse_edges[-1] == edges[-1] and len(coarse_edges) == len(counts) + 1
