"""The TF Serving deployment (serving/configs/, k8s/base/), checked statically against TF Serving's own definitions.

Neither Docker nor ``tensorflow_model_server`` runs here, so everything TF Serving would read is checked the way it
reads it: config files parsed strictly with its protos, container flags against the flag list in its ``main.cc``,
and paths and ports across the Deployment, its probes, the Services and the ConfigMap. Last, the local server starts
on the shipped model configs (base paths moved to a tmp export) to show an ema-export output loads under them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from google.protobuf.message import Message

from ema_export.names import DEFAULT_GRPC_PORT, DEFAULT_REST_PORT, SIGNATURE_EMA
from serving import ServingClient
from serving.ab import CompareOptions
from serving.config import ModelServerConfig, parse_model_server_config, validate_model_server_config
from serving.server import start_server
from support.models import EMA_B, EMA_W, linear_numpy
from support.served import SeedLibrary

REPOSITORY = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPOSITORY / "serving" / "configs"
K8S_DIR = REPOSITORY / "k8s" / "base"
"""The kustomize base every overlay builds on; tests/test_k8s_overlays.py renders and checks the overlays."""

LOCAL_ONLY_CONFIGS = {"models.config"}
"""Files in serving/configs/ the cluster does not get: models.config is the bare-metal and local-server example (its
labels need --allow_version_labels_for_unavailable_models at start); k8s-models.config is the deployed one."""

TF_SERVING_HEALTH_SERVICES = ("", "ModelService", "PredictionService")
"""What --enable_grpc_healthcheck_service registers: the server as a whole and its two services (REFERENCE.md)."""

# tensorflow_model_server's flags, name -> value kind, from tensorflow/serving tensorflow_serving/model_servers/main.cc
# (the `flag_list` in main(), as of 2.19/2.20). Why a list: on an unknown argument the server prints its usage and
# starts anyway (`if (argc != 1) { std::cout << "unknown argument: " ...}`), so a misspelt flag is silently dropped.
SERVER_FLAGS = {
    "port": "int", "grpc_socket_path": "str", "rest_api_port": "int", "rest_api_num_threads": "int",
    "rest_api_timeout_in_ms": "int", "rest_api_enable_cors_support": "bool", "enable_batching": "bool",
    "allow_version_labels_for_unavailable_models": "bool", "batching_parameters_file": "str",
    "enable_per_model_batching_parameters": "bool", "model_config_file": "str",
    "model_config_file_poll_wait_seconds": "int", "model_name": "str", "model_base_path": "str",
    "num_load_threads": "int", "num_unload_threads": "int", "max_num_load_retries": "int",
    "load_retry_interval_micros": "int", "file_system_poll_wait_seconds": "int", "flush_filesystem_caches": "bool",
    "tensorflow_session_parallelism": "int", "tensorflow_session_config_file": "str",
    "tensorflow_intra_op_parallelism": "int", "tensorflow_inter_op_parallelism": "int",
    "use_alts_credentials": "bool", "ssl_config_file": "str", "platform_config_file": "str",
    "per_process_gpu_memory_fraction": "float", "saved_model_tags": "str", "grpc_channel_arguments": "str",
    "grpc_max_threads": "int", "enable_model_warmup": "bool", "num_request_iterations_for_warmup": "int",
    "version": "bool", "monitoring_config_file": "str", "remove_unused_fields_from_bundle_metagraph": "bool",
    "prefer_tflite_model": "bool", "num_tflite_pools": "int", "num_tflite_interpreters_per_pool": "int",
    "enable_signature_method_name_check": "bool", "xla_cpu_compilation_enabled": "bool",
    "xla_gpu_compilation_enabled": "bool", "enable_profiler": "bool", "thread_pool_factory_config_file": "str",
    "mixed_precision": "str", "skip_initialize_tpu": "bool", "enable_grpc_healthcheck_service": "bool",
    "enable_serialization_as_tensor_content": "bool",
}
FLAGS_ADDED_IN = {"enable_grpc_healthcheck_service": (2, 15), "enable_serialization_as_tensor_content": (2, 19)}
"""Flags younger than TF Serving 2.0 (REFERENCE.md): an older image would ignore them."""

# tensorflow/core/util/command_line_flags.cc: a bool flag is bare or `=true|false|1|0`; others need `--name=value`.
BOOL_VALUES = {None, "true", "false", "1", "0"}


# ------------------------------------------------------------------------------------------------ TF Serving protos
def _add_field(message: Any, name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> None:
    field = descriptor_pb2.FieldDescriptorProto
    added = message.field.add(name=name, number=number, type=kind)
    added.label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
    if type_name:
        added.type_name = type_name


@cache
def _transcribed_messages() -> dict[str, type[Message]]:
    """BatchingParameters and MonitoringConfig, declared field by field as in TF Serving's .proto files.

    Why transcribed: tensorflow-serving-api (2.21) ships apis/ and part of config/, but neither
    servables/tensorflow/session_bundle_config_pb2 nor config/monitoring_config_pb2. Names, numbers and types are
    those of tensorflow_serving/servables/tensorflow/session_bundle_config.proto (BatchingParameters fields 1-7) and
    tensorflow_serving/config/monitoring_config.proto. Later BatchingParameters fields are left out, so the strict
    parse also keeps batching.config to fields every 2.x server understands.
    """
    field = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="tf_serving_transcribed.proto", package="tensorflow.serving", syntax="proto3", dependency=[wrappers.name]
    )
    batching = file.message_type.add(name="BatchingParameters")
    scheduler_fields = ["max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"]
    for number, name in enumerate(scheduler_fields, start=1):
        _add_field(batching, name, number, field.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    _add_field(batching, "thread_pool_name", 5, field.TYPE_MESSAGE, ".google.protobuf.StringValue")
    _add_field(batching, "allowed_batch_sizes", 6, field.TYPE_INT64, repeated=True)
    _add_field(batching, "pad_variable_length_inputs", 7, field.TYPE_BOOL)
    prometheus = file.message_type.add(name="PrometheusConfig")
    _add_field(prometheus, "enable", 1, field.TYPE_BOOL)
    _add_field(prometheus, "path", 2, field.TYPE_STRING)
    monitoring = file.message_type.add(name="MonitoringConfig")
    _add_field(monitoring, "prometheus_config", 1, field.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig")
    }


def _config_message(file_name: str) -> type[Message]:
    """The message each file in serving/configs/ is, as the flag that reads it expects."""
    if file_name.endswith("models.config"):
        return ModelServerConfig
    kinds = {"batching.config": "BatchingParameters", "monitoring.config": "MonitoringConfig"}
    assert file_name in kinds, (
        f"serving/configs/{file_name} has no known TF Serving message. Expected *models.config, batching.config or "
        f"monitoring.config; add its message here so it is parsed like the rest. Received: {file_name}"
    )
    return _transcribed_messages()[kinds[file_name]]


def _parse_config(file_name: str) -> Any:
    return text_format.Parse((CONFIG_DIR / file_name).read_text(), _config_message(file_name)())


# ------------------------------------------------------------------------------------------------------- manifests
@cache
def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object the kustomization applies, by (kind, name)."""
    objects = {}
    for resource in _kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S_DIR / resource).read_text()):
            objects[document["kind"], document["metadata"]["name"]] = document
    return objects


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def _one(kind: str) -> dict[str, Any]:
    found = [document for (found_kind, _), document in _manifests().items() if found_kind == kind]
    assert len(found) == 1, f"Expected exactly one {kind} in k8s/base/. Received: {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    (container,) = _pod_spec()["containers"]
    return container


def _flags() -> dict[str, str | None]:
    """The container's ``--name=value`` args as name -> value (None for a bare boolean flag)."""
    flags: dict[str, str | None] = {}
    for argument in _container()["args"]:
        name, has_value, value = argument.removeprefix("--").partition("=")
        assert argument.startswith("--") and name not in flags, f"Expected unique --flag args. Received: {argument}"
        flags[name] = value if has_value else None
    return flags


def _services() -> list[dict[str, Any]]:
    return [document for (kind, _), document in _manifests().items() if kind == "Service"]


def _is_headless(service: dict[str, Any]) -> bool:
    return service["spec"].get("clusterIP") == "None"


def _container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in _container()["ports"]}


def _mount_of(volume_kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, its mount) for the pod's one volume of this kind: ``configMap`` or ``persistentVolumeClaim``."""
    (volume,) = [volume for volume in _pod_spec()["volumes"] if volume_kind in volume]
    (mount,) = [mount for mount in _container()["volumeMounts"] if mount["name"] == volume["name"]]
    return volume, mount


def _cpu_limit() -> float:
    cpu = str(_container()["resources"]["limits"]["cpu"])
    return int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def _image_version() -> tuple[int, int]:
    image = _container()["image"]
    match = re.fullmatch(r"tensorflow/serving:(\d+)\.(\d+)\.\d+(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image)
    assert match, f"Expected tensorflow/serving pinned to a release tag (X.Y.Z). Received: {image}"
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------------------------- the config files
@pytest.mark.parametrize("file_name", sorted(path.name for path in CONFIG_DIR.glob("*.config")))
def test_every_config_file_parses_strictly_as_its_tf_serving_message(file_name):
    parsed = _parse_config(file_name)
    assert parsed.ByteSize() > 0, f"serving/configs/{file_name} parsed to an empty {type(parsed).__name__}"


@pytest.mark.parametrize(
    ("message", "text"),
    [("BatchingParameters", "max_batch_size: 64"),  # a wrapper field needs `{ value: 64 }`
     ("BatchingParameters", "max_batch_sise { value: 64 }"),
     ("MonitoringConfig", 'prometheus_config { enable: true pth: "/metrics" }')],
)
def test_strict_parsing_rejects_what_tf_serving_would(message, text):
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text, _transcribed_messages()[message]())


def test_batching_sets_every_scheduler_field_for_the_containers_cpus():
    batching = _parse_config("batching.config")
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        assert batching.HasField(name), f"batching.config leaves {name} to TF Serving's machine-wide default"
    flags = _flags()
    threads = {
        "num_batch_threads": batching.num_batch_threads.value,
        "--tensorflow_intra_op_parallelism": int(flags["tensorflow_intra_op_parallelism"]),
        "--tensorflow_inter_op_parallelism": int(flags["tensorflow_inter_op_parallelism"]),
    }
    assert set(threads.values()) == {_cpu_limit()}, (
        f"Thread counts must match the container's CPU limit ({_cpu_limit()}), or TensorFlow oversubscribes the "
        f"cores it is throttled to; change them together. Received: {threads}"
    )
    assert batching.max_batch_size.value >= CompareOptions.batch_size, (
        "TF Serving refuses requests larger than max_batch_size; `ema-serving compare` sends "
        f"{CompareOptions.batch_size} rows. Received: max_batch_size {batching.max_batch_size.value}"
    )
    sizes = list(batching.allowed_batch_sizes)
    assert not sizes or (sizes == sorted(set(sizes)) and sizes[-1] == batching.max_batch_size.value)


def test_monitoring_path_is_the_one_prometheus_is_told_to_scrape():
    monitoring = _parse_config("monitoring.config").prometheus_config
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert monitoring.enable
    assert annotations["prometheus.io/path"] == monitoring.path
    assert int(annotations["prometheus.io/port"]) == int(_flags()["rest_api_port"])


# ------------------------------------------------------------------------------------------------ container flags
def test_container_flags_are_ones_tensorflow_model_server_accepts():
    container = _container()
    assert container["command"] == ["/usr/bin/tensorflow_model_server"]
    problems = []
    for name, value in _flags().items():
        kind = SERVER_FLAGS.get(name)
        if kind is None:
            problems.append(f"--{name} is not a tensorflow_model_server flag (one --name=value per arg)")
        elif kind == "bool" and value not in BOOL_VALUES:
            problems.append(f"--{name}={value}: a bool flag takes true, false, 1 or 0")
        elif kind == "int" and not re.fullmatch(r"-?\d+", value or ""):
            problems.append(f"--{name}={value}: expected an integer, as --{name}=N")
        elif kind != "bool" and not value:
            problems.append(f"--{name} needs a value, as --{name}=...")
        elif FLAGS_ADDED_IN.get(name, (0, 0)) > _image_version():
            problems.append(f"--{name} needs TF Serving {FLAGS_ADDED_IN[name]}, the image is {container['image']}")
    assert not problems, "\n".join(problems)


def test_flags_that_depend_on_each_other_are_set_together():
    flags = _flags()
    assert flags.get("enable_batching") == "true" and flags.get("batching_parameters_file")
    assert flags.get("enable_grpc_healthcheck_service") == "true", "the gRPC probes need the health service"
    assert int(flags.get("model_config_file_poll_wait_seconds") or 0) > 0, "labels and models change in place"
    assert "grpc.max_connection_age_ms=" in (flags.get("grpc_channel_arguments") or "")
    assert "model_base_path" not in flags and "model_name" not in flags, "ignored next to --model_config_file"


def test_every_file_flag_points_into_the_mounted_config_map():
    volume, mount = _mount_of("configMap")
    config_map = _manifests()["ConfigMap", volume["configMap"]["name"]]
    assert "subPath" not in mount and "items" not in volume["configMap"], "subPath mounts never see ConfigMap updates"
    for name, value in _flags().items():
        if name.endswith("_file"):
            path = PurePosixPath(value)
            assert path.parent == PurePosixPath(mount["mountPath"]) and path.name in config_map["data"], (
                f"--{name}={value} is not a file of the ConfigMap mounted at {mount['mountPath']} "
                f"(keys: {sorted(config_map['data'])})"
            )


def test_config_map_holds_the_repository_files_byte_for_byte():
    volume, _ = _mount_of("configMap")
    data = _manifests()["ConfigMap", volume["configMap"]["name"]]["data"]
    used = {PurePosixPath(value).name for name, value in _flags().items() if name.endswith("_file")}
    shipped = {path.name for path in CONFIG_DIR.glob("*.config")} - LOCAL_ONLY_CONFIGS
    assert set(data) == used == shipped, (
        "Expected the ConfigMap to hold exactly the files the flags name, which are serving/configs/ minus "
        f"{sorted(LOCAL_ONLY_CONFIGS)}. Received: keys {sorted(data)}, flags {sorted(used)}, files {sorted(shipped)}"
    )
    for key, embedded in data.items():
        assert embedded == (CONFIG_DIR / key).read_text(), (
            f"k8s/base/configmap.yaml data[{key!r}] differs from serving/configs/{key}. Expected a byte-for-byte copy, "
            f"so the cluster runs what these tests check; paste the file under data.{key} as a `|` block."
        )


# ---------------------------------------------------------------------------------------- ports, probes, services
def test_ports_agree_between_flags_container_probes_and_services():
    flags, ports = _flags(), _container_ports()
    assert int(flags["port"]) == ports["grpc"] == DEFAULT_GRPC_PORT
    assert int(flags["rest_api_port"]) == ports["http"] == DEFAULT_REST_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _container()[probe]["grpc"]["port"] == ports["grpc"], f"{probe} must ask the gRPC port"
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _one("Deployment")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    served = set()
    for service in _services():
        name = service["metadata"]["name"]
        assert service["spec"]["selector"].items() <= pod_labels.items(), f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            container_port = ports[target] if isinstance(target, str) else target
            assert container_port in ports.values(), f"Service {name} targets no container port"
            if _is_headless(service):  # clients dial pod addresses: no port translation
                assert port["port"] == container_port == ports["grpc"]
            served.add(container_port)
    assert served == set(ports.values())


def test_readiness_waits_for_the_health_service_tf_serving_registers():
    container = _container()
    readiness, startup = container["readinessProbe"], container["startupProbe"]
    assert readiness["grpc"].get("service", "") in TF_SERVING_HEALTH_SERVICES
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "allow minutes to load and warm up"
    (headless,) = [service for service in _services() if _is_headless(service)]
    assert not headless["spec"].get("publishNotReadyAddresses"), "the headless DNS must list Ready pods only"


# ------------------------------------------------------------------------------------------------ the model config
def test_k8s_model_config_serves_from_the_models_volume():
    config = parse_model_server_config((CONFIG_DIR / "k8s-models.config").read_text(), source="k8s-models.config")
    validate_model_server_config(config)
    volume, mount = _mount_of("persistentVolumeClaim")
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in _manifests()
    assert mount.get("readOnly") is True, "only exports write to the models volume"
    for model in config.model_config_list.config:
        assert PurePosixPath(model.base_path).is_relative_to(mount["mountPath"]), (
            f"{model.name}: base_path {model.base_path} is outside the models volume mounted at {mount['mountPath']}"
        )
        if model.version_labels:
            assert _flags().get("allow_version_labels_for_unavailable_models") == "true", (
                f"{model.name}: labels in the start-up config need --allow_version_labels_for_unavailable_models"
            )


def test_kustomization_lists_every_manifest_in_k8s():
    listed = _kustomization()["resources"]
    on_disk = sorted(path.name for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (with built-in kustomize) is not installed: Debian kubernetes-client, which .ci/run installs",
)
def test_kubectl_kustomize_builds_the_same_objects():
    built = subprocess.run(["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert built.returncode == 0, built.stderr
    objects = {(document["kind"], document["metadata"]["name"]) for document in yaml.safe_load_all(built.stdout)}
    assert objects == set(_manifests())


# ------------------------------------------------------------------------------------------------ the local server
@pytest.fixture
def seed_export(seed_library: SeedLibrary) -> Path:
    """Version 1 of the seed model, from the session's exports (`support.served.seed_library`)."""
    return seed_library.versions / "1"


def _relocated(file_name: str, seed_export: Path, models_root: Path) -> tuple[ModelServerConfig, Path]:
    """The config with base paths moved from the models volume to ``models_root``, with the versions it wants."""
    config = parse_model_server_config((CONFIG_DIR / file_name).read_text(), source=file_name)
    _, mount = _mount_of("persistentVolumeClaim")
    for model in config.model_config_list.config:
        base_path = models_root / PurePosixPath(model.base_path).relative_to(mount["mountPath"])
        model.base_path = str(base_path)
        for version in model.model_version_policy.specific.versions or [1]:
            shutil.copytree(seed_export, base_path / str(version))
    path = models_root / file_name
    path.write_text(text_format.MessageToString(config))
    return config, path


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["k8s-models.config", "models.config"])
def test_local_server_serves_an_export_under_the_shipped_model_config(file_name, seed_export, tmp_path):
    config, path = _relocated(file_name, seed_export, tmp_path / "models")
    labelled = any(model.version_labels for model in config.model_config_list.config)
    inputs = np.ones((2, 4), np.float32)
    with start_server(
        model_config_file=path, port=0, file_system_poll_wait_seconds=0,
        allow_version_labels_for_unavailable_models=labelled,
    ) as server, ServingClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        for model in config.model_config_list.config:
            assert {status.state for status in client.status(model.name)} == {"AVAILABLE"}
            for label in model.version_labels or [None]:
                answer = client.predict(model.name, {"inputs": inputs}, signature=SIGNATURE_EMA, version_label=label)
                np.testing.assert_allclose(answer.outputs["output_0"], linear_numpy(inputs, EMA_W, EMA_B), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the README guide
def _deploy_guide() -> str:
    readme = (REPOSITORY / "README.md").read_text()
    start = readme.index("## Deploying to TF Serving")
    return readme[start:readme.index("\n## ", start + 1)]


def test_deploy_guide_names_only_paths_that_exist():
    paths = set(re.findall(r"\b(k8s/[\w./-]+|serving/configs/[\w.-]+|tests/test_[\w]+\.py)", _deploy_guide()))
    missing = sorted(path for path in paths if "{" not in path and not (REPOSITORY / path.rstrip(".")).exists())
    assert paths and not missing, f"README's deploy guide names paths that do not exist: {missing}"


def test_deploy_guide_commands_use_only_options_the_commands_accept():
    import click

    from serving.cli import main

    problems = []
    for line in _deploy_guide().replace("\\\n", " ").splitlines():
        command_line = line.strip().lstrip("`")
        if not command_line.startswith("ema-serving "):
            continue
        words = command_line.split()[1:]
        command: click.Command = main
        while isinstance(command, click.Group) and words and words[0] in command.commands:
            command, words = command.commands[words[0]], words[1:]
        accepted = {option for parameter in command.params for option in getattr(parameter, "opts", [])}
        problems += [f"{command_line}: {word}" for word in words
                     if word.startswith("--") and word.partition("=")[0] not in accepted]
    assert not problems, f"README's deploy guide uses options the commands do not have: {problems}"
