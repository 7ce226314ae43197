"""TF Serving's model config file (``--model_config_file``), parsed and validated with TF Serving's own protos.

The local server accepts exactly the files ``tensorflow_model_server`` accepts, so a config that works here works in
production unchanged. Parsing uses ``tensorflow_serving.config.model_server_config_pb2`` and protobuf's text format;
validation applies TF Serving's rules (``model_servers/server_core.cc``): unique model names, absolute base paths,
``model_platform: "tensorflow"``. It runs fully and raises once, naming every offending field.

This module never imports the TensorFlow runtime: the config protos do not depend on it.

Example::

    config = load_model_server_config("serving/configs/models.config")
    for model in config.model_config_list.config:
        print(model.name, model.base_path)
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from google.protobuf import text_format
from tensorflow_serving.config.model_server_config_pb2 import ModelConfig, ModelServerConfig

from ema_export.contracts import DEFAULT_MODEL_NAME, HintedError

TENSORFLOW_PLATFORM = "tensorflow"
"""The only ``model_platform`` this server (and a stock TF Serving build) loads."""


class ModelConfigError(HintedError):
    """A model config is unreadable or breaks one of TF Serving's rules (message naming the field, hint, problems)."""


def parse_model_server_config(text: str, source: str = "<model config>") -> ModelServerConfig:
    """Parse ModelServerConfig text format, as ``tensorflow_model_server --model_config_file`` does.

    Args:
        text: The file's content (protobuf text format; ``#`` comments allowed).
        source: Where the text came from, for messages.

    Returns:
        The parsed config (not yet validated: see `validate_model_server_config`).

    Raises:
        ModelConfigError: the text is not a valid ModelServerConfig, with line and column.
    """
    try:
        return text_format.Parse(text, ModelServerConfig())
    except text_format.ParseError as error:
        raise ModelConfigError(
            f"Could not parse {source} as TF Serving's ModelServerConfig text format: {error}",
            hint='Expected model_config_list { config { name: "..." base_path: "/abs/path" '
            'model_platform: "tensorflow" } }; see serving/configs/models.config',
        ) from None


def load_model_server_config(path: str | os.PathLike[str], *, allow_empty: bool = False) -> ModelServerConfig:
    """Read, parse and validate a model config file.

    Raises:
        ModelConfigError: the file is missing, unreadable, unparsable or invalid.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ModelConfigError(
            f"Could not read the model config file {os.fspath(path)!r}: {error.strerror}",
            hint="Check the --model-config-file path",
        ) from None
    config = parse_model_server_config(text, source=os.fspath(path))
    validate_model_server_config(config, allow_empty=allow_empty)
    return config


def single_model_config(model_name: str, base_path: str | os.PathLike[str]) -> ModelServerConfig:
    """The config ``--model_name``/``--model_base_path`` stand for (TF Serving's ``BuildSingleModelConfig``).

    A relative base path is made absolute here, for convenience on the command line; config files must use absolute
    paths, as TF Serving requires.
    """
    config = ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name or DEFAULT_MODEL_NAME
    model.base_path = os.path.abspath(os.fspath(base_path))
    model.model_platform = TENSORFLOW_PLATFORM
    return config


def validate_model_server_config(config: ModelServerConfig, *, allow_empty: bool = False) -> None:
    """Check a config against TF Serving's rules, collecting every problem before raising once.

    Args:
        config: The parsed config.
        allow_empty: Accept a config that lists no model (a reload may unload everything; a server start may not).

    Raises:
        ModelConfigError: listing each problem with the field that causes it.
    """
    which = config.WhichOneof("config")
    if which == "custom_model_config":
        raise ModelConfigError(
            "custom_model_config is not supported: only model_config_list is",
            hint="Describe each model in model_config_list { config { ... } }",
        )
    models = config.model_config_list.config
    if not models and not allow_empty:
        raise ModelConfigError(
            "The model config lists no model: model_config_list has no config entry",
            hint='Add model_config_list { config { name: "..." base_path: "/abs/path" model_platform: "tensorflow" } }',
        )
    problems = [problem for index, model in enumerate(models) for problem in _model_problems(index, model)]
    problems += _duplicate_name_problems(model.name for model in models)
    if problems:
        raise ModelConfigError(
            f"The model config has {len(problems)} problem(s):",
            hint="Fix the named fields; TF Serving would refuse this config too",
            problems=problems,
        )


def _model_problems(index: int, model: ModelConfig) -> list[str]:
    where = f"config[{index}]" + (f" ({model.name})" if model.name else "")
    problems = []
    if not model.name:
        problems.append(f"{where}: name is empty")
    if not model.base_path:
        problems.append(f"{where}: base_path is empty")
    elif "://" in model.base_path:
        problems.append(f"{where}: base_path {model.base_path!r} is a URI; this local server reads local paths")
    elif not os.path.isabs(model.base_path):
        problems.append(
            f"{where}: base_path must be absolute (TF Serving: 'Expected model {model.name} to have an absolute path "
            f"or URI'); got {model.base_path!r}"
        )
    problems += _platform_problems(where, model)
    problems += _policy_problems(where, model)
    for label, version in model.version_labels.items():
        if not label:
            problems.append(f"{where}: version_labels has an empty label")
        if version < 0:
            problems.append(f"{where}: version_labels[{label!r}] is negative: {version}")
    return problems


def _platform_problems(where: str, model: ModelConfig) -> list[str]:
    unspecified = ModelConfig.DESCRIPTOR.fields_by_name["model_type"].enum_type.values_by_name
    if model.model_type != unspecified["MODEL_TYPE_UNSPECIFIED"].number:
        if model.model_platform:
            return [f"{where}: sets both model_type (deprecated) and model_platform: keep only model_platform"]
        if model.model_type != unspecified["TENSORFLOW"].number:
            return [f"{where}: model_type is not TENSORFLOW: use model_platform: \"tensorflow\""]
        return []
    if not model.model_platform:
        return [f'{where}: model_platform is missing (TF Serving requires model_platform: "tensorflow")']
    if model.model_platform != TENSORFLOW_PLATFORM:
        return [f'{where}: model_platform {model.model_platform!r} is unsupported (expected "tensorflow")']
    return []


def _policy_problems(where: str, model: ModelConfig) -> list[str]:
    policy = model.model_version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        if not policy.specific.versions:
            return [f"{where}: model_version_policy.specific lists no versions"]
        negative = [version for version in policy.specific.versions if version < 0]
        if negative:
            return [f"{where}: model_version_policy.specific.versions has negative versions {negative}"]
    return []


def _duplicate_name_problems(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    duplicates: list[str] = []
    for name in names:
        if name in seen and name not in duplicates:
            duplicates.append(name)
        seen.add(name)
    return [f"Illegal to list model {name} multiple times in config list" for name in duplicates]


def aspired_versions(config: ModelConfig, versions_on_disk: Iterable[int]) -> set[int]:
    """The versions ``model_version_policy`` wants loaded, out of those found on disk.

    ``latest { num_versions: N }`` (the default, N = 1 when unset) keeps the N highest; ``all {}`` keeps every
    version; ``specific { versions: ... }`` keeps the listed ones that exist.
    """
    on_disk = set(versions_on_disk)
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return on_disk
    if which == "specific":
        return on_disk & set(policy.specific.versions)
    num_versions = max(policy.latest.num_versions, 1)
    return set(sorted(on_disk)[-num_versions:])


def describe_policy(config: ModelConfig) -> str:
    """A short human description of a model's version policy, e.g. ``latest 1`` or ``specific [1, 2]``."""
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return "all"
    if which == "specific":
        return f"specific {sorted(policy.specific.versions)}"
    return f"latest {max(policy.latest.num_versions, 1)}"
