"""The contracts both packages share: defined once in `ema_export.contracts`, free of TensorFlow, and TF Serving's
version-directory rule as TF Serving's source writes it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ema_export import contracts, names
from ema_export.contracts import (
    DEFAULT_ARMS,
    SIGNATURE_EMA,
    SIGNATURE_LIVE,
    TEMP_VERSION_PREFIX,
    output_name,
    parse_version,
    version_paths,
)
from ema_export.versions import next_version, publish, remove_abandoned_staging, staging_directory

REPOSITORY = Path(__file__).resolve().parents[2]


def test_importing_the_contracts_does_not_import_tensorflow():
    code = ("import json, sys\n"
            "import ema_export.contracts, ema_export.names, ema_export.errors, serving.server.errors\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               cwd=REPOSITORY, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []


def test_the_old_names_module_re_exports_the_contracts_themselves():
    assert names.__all__
    for name in names.__all__:
        assert getattr(names, name) is getattr(contracts, name)


def _exporter_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ema_export")}


def test_serving_takes_only_the_contracts_from_the_exporter():
    imported = {str(path.relative_to(REPOSITORY)): _exporter_imports(path)
                for path in sorted((REPOSITORY / "serving").rglob("*.py"))}
    # ema_export.console (silencing native log output, no TensorFlow) is shared by both command lines.
    allowed = {"ema_export.contracts", "ema_export.console"}
    assert {path: modules - allowed for path, modules in imported.items() if modules - allowed} == {}
    assert sum("ema_export.contracts" in modules for modules in imported.values()) >= 10


def test_default_arms_are_the_cli_choices_and_cannot_be_changed():
    from ema_export.cli import cli

    option = next(param for param in cli.params if param.name == "default_signature")
    assert list(option.type.choices) == list(DEFAULT_ARMS) == ["ema", "live"]
    assert dict(DEFAULT_ARMS) == {"ema": SIGNATURE_EMA, "live": SIGNATURE_LIVE}
    with pytest.raises(TypeError):
        DEFAULT_ARMS["median"] = SIGNATURE_EMA  # type: ignore[index]


def test_unnamed_outputs_are_named_by_the_contract():
    from ema_export.assemble import output_dict

    one, two = np.zeros(1), np.ones(1)
    assert list(output_dict(one)) == [output_name(0)] == ["output_0"]
    assert list(output_dict([one, two])) == [output_name(0), output_name(1)]
    assert list(output_dict({"logits": one})) == ["logits"]


# --- TF Serving's version rule: absl::SimpleAtoi into an int64 ------------------------------------------------------

@pytest.mark.parametrize("name, number", [
    ("1", 1), ("007", 7), ("0", 0), ("-4", -4), ("+5", 5), ("-0", 0),
    (" 8", 8), ("9\n", 9), ("\t\v\f\r10 ", 10),  # ASCII whitespace around the number is skipped
    ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -(2**63)),  # the int64 limits
])
def test_names_tf_serving_reads_as_versions(name, number):
    assert parse_version(name) == number


@pytest.mark.parametrize("name", [
    "", " ", "+", "-", "+-1", "--1", "- 5", "1 2", "1_000", "1.5", "1e3", "0x10", "v5", "temp-3", "5a",
    "9223372036854775808", "-9223372036854775809",  # one past the int64 limits
    "\u00b2", "\u0663", "\uff11",  # superscript two, Arabic-Indic three, fullwidth one
    "\u00a05", "5\u2003",  # no-break space, em space: whitespace to Python, not to absl
])
def test_names_that_are_not_versions(name):
    assert parse_version(name) is None


def test_of_two_names_for_one_number_the_last_in_byte_order_is_loaded(tmp_path):
    for name in ("007", "7", "07"):
        (tmp_path / name).mkdir()
    assert version_paths(tmp_path) == {7: tmp_path / "7"}


def test_a_missing_base_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        version_paths(tmp_path / "missing")


def test_the_next_version_is_positive_even_after_negative_ones(tmp_path):
    (tmp_path / "-3").mkdir()
    assert next_version(tmp_path) == 1


def test_a_file_named_by_the_next_number_is_skipped_not_retried(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").write_text("TF Serving reads this as version 2")
    with staging_directory(tmp_path) as staging:
        (staging / "saved_model.pb").write_text("model")
        assert publish(staging, tmp_path, None) == tmp_path / "3"


def test_a_staging_name_with_non_ascii_digits_is_left_alone(tmp_path):
    odd = tmp_path / f"{TEMP_VERSION_PREFIX}\u00b2-abc"
    odd.mkdir()
    assert remove_abandoned_staging(tmp_path) == [] and odd.is_dir()
