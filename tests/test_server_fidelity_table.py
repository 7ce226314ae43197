"""README's fidelity table is the one the tests declare: every row names its test and a TF Serving source line.

The rows come from ``@follows`` on the tests of `support.fidelity.FIDELITY_MODULES`;
``python tests/support/fidelity.py`` rewrites README's table after a row is added or changed.
"""

from __future__ import annotations

from support.fidelity import README, SOURCE_PATTERN, collected_rows, readme_table, render_table


def test_readme_table_is_generated_from_the_tests():
    rows = collected_rows()
    assert len(rows) >= 25
    assert readme_table(README.read_text(encoding="utf-8")) == render_table(rows), (
        "README's fidelity table is out of date: run `.venv/bin/python tests/support/fidelity.py`"
    )


def test_every_row_cites_a_source_line_and_a_test_that_exists():
    import importlib

    for row in collected_rows():
        assert SOURCE_PATTERN.match(row.source), row
        module, test = row.test.split("::")
        assert callable(getattr(importlib.import_module(module), test, None)), row
        assert "|" not in row.behaviour, row  # it would break the Markdown table
