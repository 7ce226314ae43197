"""TF Serving's model config parser and validator, on config text (no server)."""

from __future__ import annotations

import pytest

from ema_export.names import DEFAULT_MODEL_NAME
from serving.config import (
    ModelConfigError,
    describe_policy,
    load_model_server_config,
    parse_model_server_config,
    single_model_config,
    validate_model_server_config,
)

VALID = 'config {{ name: "m" base_path: "/models/m" model_platform: "tensorflow" {} }}'


def _config(*entries: str):
    return parse_model_server_config(f"model_config_list {{ {' '.join(entries)} }}")


def _problems(*entries: str) -> list[str]:
    with pytest.raises(ModelConfigError) as raised:
        validate_model_server_config(_config(*entries))
    return raised.value.problems


def test_comments_and_labels_parse():
    config = _config("# production models\n", VALID.format('version_labels { key: "stable" value: 3 }'))
    validate_model_server_config(config)
    assert dict(config.model_config_list.config[0].version_labels) == {"stable": 3}


@pytest.mark.parametrize(("extra", "problem"), [
    ('version_labels { key: "" value: 1 }', "config[0] (m): version_labels has an empty label"),
    ('version_labels { key: "old" value: -1 }', "config[0] (m): version_labels['old'] is negative: -1"),
    ("model_version_policy { specific { versions: 1 versions: -2 } }",
     "config[0] (m): model_version_policy.specific.versions has negative versions [-2]"),
    ("model_type: TENSORFLOW", "config[0] (m): sets both model_type (deprecated) and model_platform"),
])
def test_each_rule_names_the_model_and_field(extra, problem):
    problems = _problems(VALID.format(extra))
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_the_deprecated_model_type_alone_is_accepted_for_tensorflow_only():
    validate_model_server_config(_config('config { name: "m" base_path: "/m" model_type: TENSORFLOW }'))
    assert _problems('config { name: "m" base_path: "/m" model_type: OTHER }') == [
        'config[0] (m): model_type is not TENSORFLOW: use model_platform: "tensorflow"']


def test_problems_of_every_model_are_collected_before_raising():
    problems = _problems('config { base_path: "x" }', VALID.format(""), VALID.format(""))
    assert problems == [
        "config[0]: name is empty",
        "config[0]: base_path must be absolute (TF Serving: 'Expected model  to have an absolute path or URI'); "
        "got 'x'",
        'config[0]: model_platform is missing (TF Serving requires model_platform: "tensorflow")',
        "Illegal to list model m multiple times in config list",
    ]


def test_custom_model_config_is_refused():
    config = parse_model_server_config("custom_model_config { }")
    with pytest.raises(ModelConfigError, match="only model_config_list"):
        validate_model_server_config(config)


@pytest.mark.parametrize(("policy", "description"), [
    ("", "latest 1"),
    ("model_version_policy { latest { num_versions: 3 } }", "latest 3"),
    ("model_version_policy { all { } }", "all"),
    ("model_version_policy { specific { versions: 4 versions: 2 } }", "specific [2, 4]"),
])
def test_policies_are_described_briefly(policy, description):
    assert describe_policy(_config(VALID.format(policy)).model_config_list.config[0]) == description


def test_single_model_config_uses_the_default_name_when_none_is_given(tmp_path):
    model = single_model_config("", tmp_path).model_config_list.config[0]
    assert model.name == DEFAULT_MODEL_NAME and model.base_path == str(tmp_path)


def test_an_unreadable_file_names_the_flag(tmp_path):
    with pytest.raises(ModelConfigError) as raised:
        load_model_server_config(tmp_path / "missing.config")
    assert "missing.config" in str(raised.value) and raised.value.hint == "Check the --model-config-file path"
