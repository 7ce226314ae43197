"""TF Serving's model config files: parsed with TF Serving's protos, validated with TF Serving's rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.config import (
    ModelConfig,
    ModelConfigError,
    aspired_versions,
    load_model_server_config,
    parse_model_server_config,
    single_model_config,
    validate_model_server_config,
)
from serving.server.manager import list_versions

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "serving" / "configs" / "models.config"


def test_example_config_is_valid_and_uses_every_feature():
    config = load_model_server_config(EXAMPLE_CONFIG)
    models = {model.name: model for model in config.model_config_list.config}
    assert set(models) == {"classifier", "ranker"}
    assert dict(models["ranker"].version_labels) == {"stable": 1, "canary": 2}
    assert list(models["ranker"].model_version_policy.specific.versions) == [1, 2]


def test_single_model_config_makes_the_base_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = single_model_config("model", "models")
    model = config.model_config_list.config[0]
    assert (model.name, model.base_path, model.model_platform) == ("model", str(tmp_path / "models"), "tensorflow")
    validate_model_server_config(config)


def test_parse_errors_give_line_and_field():
    with pytest.raises(ModelConfigError) as raised:
        parse_model_server_config('model_config_list {\n config { nmae: "a" } }', source="models.config")
    message = str(raised.value)
    assert "models.config" in message and "2:" in message and "nmae" in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [('config { name: "a" base_path: "relative" model_platform: "tensorflow" }', ["base_path must be absolute"]),
     ('config { name: "a" base_path: "/x" }', ["model_platform is missing"]),
     ('config { name: "a" base_path: "/x" model_platform: "pytorch" }', ["'pytorch' is unsupported"]),
     ('config { name: "" base_path: "/x" model_platform: "tensorflow" }', ["name is empty"]),
     ('config { name: "a" base_path: "gs://bucket/a" model_platform: "tensorflow" }', ["is a URI"]),
     ('config { name: "a" base_path: "/x" model_platform: "tensorflow" model_version_policy { specific { } } }',
      ["specific lists no versions"]),
     ('config { name: "a" base_path: "/x" model_platform: "tensorflow" } '
      'config { name: "a" base_path: "/y" model_platform: "tensorflow" }',
      ["Illegal to list model a multiple times"]),
     ('config { name: "a" base_path: "r" } config { name: "b" base_path: "/y" model_platform: "x" }',
      ["config[0] (a): base_path", "config[0] (a): model_platform", "config[1] (b): model_platform"])],
)
def test_validation_names_every_offending_field(text, fragments):
    with pytest.raises(ModelConfigError) as raised:
        validate_model_server_config(parse_model_server_config(f"model_config_list {{ {text} }}"))
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_empty_config_is_refused_at_start_but_allowed_for_a_reload():
    config = parse_model_server_config("model_config_list { }")
    with pytest.raises(ModelConfigError, match="lists no model"):
        validate_model_server_config(config)
    validate_model_server_config(config, allow_empty=True)


def _model(policy: str) -> ModelConfig:
    text = f'model_config_list {{ config {{ name: "m" base_path: "/m" model_platform: "tensorflow" {policy} }} }}'
    return parse_model_server_config(text).model_config_list.config[0]


@given(st.sets(st.integers(0, 10**6), max_size=8), st.integers(0, 4))
def test_latest_policy_keeps_the_highest_versions(on_disk, num_versions):
    policy = f"model_version_policy {{ latest {{ num_versions: {num_versions} }} }}"
    assert aspired_versions(_model(policy), on_disk) == set(sorted(on_disk)[-max(num_versions, 1):])


@given(st.sets(st.integers(0, 50), max_size=8), st.sets(st.integers(0, 50), min_size=1, max_size=4))
def test_all_and_specific_policies(on_disk, wanted):
    assert aspired_versions(_model("model_version_policy { all { } }"), on_disk) == on_disk
    versions = " ".join(f"versions: {version}" for version in sorted(wanted))
    specific = _model(f"model_version_policy {{ specific {{ {versions} }} }}")
    assert aspired_versions(specific, on_disk) == on_disk & wanted


def test_only_integer_named_children_are_versions(tmp_path):
    for name in ("1", "002", "10", "temp-123", "1.5", "-3", "v2"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file")  # TF Serving lists it as a version (then fails to load it)
    assert sorted(list_versions(tmp_path)) == [-3, 1, 2, 7, 10]
