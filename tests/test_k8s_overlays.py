"""Every kustomization in k8s/ renders with ``kubectl kustomize`` and holds up: schema-valid Kubernetes objects
(``kubernetes-validate``, strict, at a pinned Kubernetes version), and each overlay does what its comments say.

Why render instead of reading the YAML files: overlays are patches, and only the rendered objects show what a cluster
would get (a patch that misses its target is silently a no-op). ``kubectl`` (Debian's ``kubernetes-client``, which
``.ci/run`` installs) embeds kustomize; without it these tests skip and say so.

KServe's InferenceService and Istio's VirtualService are custom resources, absent from the Kubernetes schemas: they
get a minimal structural check of their own here, plus the cross-references that matter (same storage, same image
version, a Service that exists).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.config import load_model_server_config

REPOSITORY = Path(__file__).resolve().parent.parent
K8S = REPOSITORY / "k8s"
KUBERNETES_VERSION = "1.32.0"
"""The Kubernetes API the manifests are validated against: Debian's kubernetes-client (1.32) and a cluster version
with everything used here (gRPC probes GA in 1.27, autoscaling/v2 and policy/v1)."""

OVERLAYS = ("local", "object-storage", "canary")
SERVING_STACKS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
"""Kustomizations that deploy the TF Serving Deployment; kserve and istio are separate examples."""
CUSTOM_RESOURCES = {("serving.kserve.io/v1beta1", "InferenceService"), ("networking.istio.io/v1", "VirtualService")}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed (Debian package kubernetes-client; .ci/run installs it where apt-get exists): "
    "the overlays can only be checked as kustomize renders them",
)
pytestmark = [needs_kubectl, pytest.mark.slow]  # kubectl renders each kustomization


@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize k8s/<kustomization>`` renders."""
    built = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert built.returncode == 0, f"kubectl kustomize k8s/{kustomization} failed: {built.stderr}"
    return tuple(document for document in yaml.safe_load_all(built.stdout) if document)


def objects_of(kustomization: str, kind: str) -> list[dict[str, Any]]:
    return [document for document in rendered(kustomization) if document["kind"] == kind]


def one(kustomization: str, kind: str) -> dict[str, Any]:
    (found,) = objects_of(kustomization, kind)
    return found


def pod_spec(kustomization: str) -> dict[str, Any]:
    return one(kustomization, "Deployment")["spec"]["template"]["spec"]


def server_container(kustomization: str) -> dict[str, Any]:
    (container,) = pod_spec(kustomization)["containers"]
    return container


def every_kustomization() -> list[str]:
    return sorted(str(path.parent.relative_to(K8S)) for path in K8S.rglob("kustomization.yaml"))


# ------------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("kustomization", every_kustomization())
def test_every_kustomization_renders_schema_valid_objects(kustomization):
    problems = []
    for document in rendered(kustomization):
        if (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCES:
            continue  # not in the Kubernetes schemas: checked by the tests below
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{document['kind']}/{document['metadata']['name']}: {error.message} at "
                            f"{'.'.join(str(part) for part in error.path)}")
    assert not problems, f"k8s/{kustomization} renders objects Kubernetes {KUBERNETES_VERSION} refuses:\n" + \
        "\n".join(problems)


def test_strict_validation_catches_a_misspelt_field():
    deployment = yaml.safe_load(yaml.safe_dump(one("base", "Deployment")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_folder_with_manifests_is_a_kustomization_that_is_tested():
    expected = {"base", *(f"overlays/{name}" for name in OVERLAYS), "kserve", "istio"}
    assert expected <= set(every_kustomization())


# ------------------------------------------------------------------------------------------------ every serving stack
@pytest.mark.parametrize("kustomization", SERVING_STACKS)
def test_pods_run_non_root_with_a_read_only_root_filesystem(kustomization):
    spec = pod_spec(kustomization)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    for container in spec.get("initContainers", []) + spec["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]


@pytest.mark.parametrize("kustomization", SERVING_STACKS)
def test_shutdown_is_bounded_by_an_explicit_grace_period_longer_than_the_drain(kustomization):
    """TF Serving ignores SIGTERM (no handler; as PID 1 it is not even delivered): the grace period is the drain."""
    spec, container = pod_spec(kustomization), server_container(kustomization)
    assert container["command"] == ["/usr/bin/tensorflow_model_server"], "the server must be PID 1, not a shell"
    assert "terminationGracePeriodSeconds" in spec, "set it explicitly: it is when the server is killed"
    (sleep,) = [int(part) for part in container["lifecycle"]["preStop"]["exec"]["command"] if part.isdigit()]
    assert spec["terminationGracePeriodSeconds"] >= sleep + 30, (
        "after the preStop drain, calls in flight need up to TF Serving's 30 s REST timeout before SIGKILL"
    )


@pytest.mark.parametrize("kustomization", SERVING_STACKS)
def test_autoscaler_and_disruption_budget_select_the_serving_pods(kustomization):
    deployment = one(kustomization, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = one(kustomization, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in budget["spec"], "minAvailable would block draining a one-replica install"
    for autoscaler in objects_of(kustomization, "HorizontalPodAutoscaler"):
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert autoscaler["spec"]["minReplicas"] >= 2, "one pod cannot roll or drain without an outage"
        assert "replicas" not in deployment["spec"], "a fixed replica count fights the autoscaler on every apply"
        container = server_container(kustomization)
        assert "cpu" in container["resources"]["requests"], "CPU utilization is measured against the request"


@pytest.mark.parametrize("kustomization", SERVING_STACKS)
def test_models_volume_is_read_only_for_the_server(kustomization):
    (mount,) = [mount for mount in server_container(kustomization)["volumeMounts"] if mount["name"] == "models"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/models"


# ------------------------------------------------------------------------------------------------ the overlays
def _volume(kustomization: str, name: str) -> dict[str, Any]:
    (volume,) = [volume for volume in pod_spec(kustomization)["volumes"] if volume["name"] == name]
    return volume


def test_local_overlay_serves_a_node_directory_with_one_pod():
    volume = _volume("overlays/local", "models")
    assert set(volume) == {"name", "hostPath"} and volume["hostPath"]["type"] == "Directory"
    assert not objects_of("overlays/local", "PersistentVolumeClaim")
    assert not objects_of("overlays/local", "HorizontalPodAutoscaler")
    assert one("overlays/local", "Deployment")["spec"]["replicas"] == 1


def test_object_storage_overlay_copies_one_version_under_a_temporary_name_then_renames_it():
    spec = pod_spec("overlays/object-storage")
    assert set(_volume("overlays/object-storage", "models")) == {"name", "emptyDir"}
    assert not objects_of("overlays/object-storage", "PersistentVolumeClaim")
    (fetch,) = spec["initContainers"]
    (mount,) = [mount for mount in fetch["volumeMounts"] if mount["name"] == "models"]
    assert not mount.get("readOnly") and mount["mountPath"] == "/models"
    script = fetch["args"][0]
    copy = re.search(r'rclone copy [^\n]*"\$\{incoming\}"', script)
    rename = re.search(r'mv "\$\{incoming\}" "\$\{destination\}/\$\{MODEL_VERSION\}"', script)
    assert copy and rename and copy.start() < rename.start(), "copy to the temporary name first, then rename"
    assert re.search(r'incoming="\$\{destination\}/incoming-', script), "the temporary name must not be numeric"
    assert "set -eu" in script, "a failed copy must stop the script before the rename"
    (source,) = [reference["configMapRef"]["name"] for reference in fetch["envFrom"] if "configMapRef" in reference]
    (config_map,) = [item for item in objects_of("overlays/object-storage", "ConfigMap")
                     if item["metadata"]["name"] == source]
    assert {"MODEL_NAME", "MODEL_VERSION", "MODEL_SOURCE"} <= set(config_map["data"])
    assert config_map["data"]["MODEL_VERSION"].isdigit()
    model_config = _rendered_model_config("overlays/object-storage")
    assert f'base_path: "/models/{config_map["data"]["MODEL_NAME"]}"' in model_config


def _rendered_model_config(kustomization: str) -> str:
    (config_map,) = [item for item in objects_of(kustomization, "ConfigMap")
                     if item["metadata"]["name"] == "ema-serving-config"]
    return config_map["data"]["k8s-models.config"]


def test_canary_overlay_serves_its_own_model_config_under_the_fixed_name(tmp_path):
    base_data = one("base", "ConfigMap")["data"]
    (canary_map,) = [item for item in objects_of("overlays/canary", "ConfigMap")
                     if item["metadata"]["name"] == "ema-serving-config"]
    overlay_file = K8S / "overlays" / "canary" / "k8s-models.config"
    assert canary_map["data"]["k8s-models.config"] == overlay_file.read_text()
    assert {key: value for key, value in canary_map["data"].items() if key != "k8s-models.config"} == \
        {key: value for key, value in base_data.items() if key != "k8s-models.config"}
    assert "--allow_version_labels_for_unavailable_models=true" in server_container("overlays/canary")["args"], (
        "a pod (re)starting while the file holds labels would refuse them and fail to start"
    )
    shipped = load_model_server_config(REPOSITORY / "serving" / "configs" / "k8s-models.config")
    overlay = load_model_server_config(overlay_file)
    assert [(model.name, model.base_path) for model in overlay.model_config_list.config] == \
        [(model.name, model.base_path) for model in shipped.model_config_list.config]


# ------------------------------------------------------------------------------------------------ KServe and Istio
def _check_shape(document: dict[str, Any], required: dict[str, type]) -> list[str]:
    """Minimal structural check of a custom resource: dotted path -> expected type."""
    problems = []
    for path, expected in required.items():
        value: Any = document
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, expected):
            problems.append(f"{path}: expected {expected.__name__}, got {value!r}")
    return problems


def test_kserve_inference_service_serves_the_same_storage_and_tf_serving_version():
    (service,) = rendered("kserve")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    problems = _check_shape(service, {"metadata.name": str, "spec.predictor": dict,
                                      "spec.predictor.tensorflow.storageUri": str,
                                      "spec.predictor.tensorflow.runtimeVersion": str})
    assert not problems, problems
    predictor = service["spec"]["predictor"]
    claim = one("base", "PersistentVolumeClaim")["metadata"]["name"]
    (model,) = load_model_server_config(REPOSITORY / "serving" / "configs" / "k8s-models.config") \
        .model_config_list.config
    relative = PurePosixPath(model.base_path).relative_to("/models")
    assert predictor["tensorflow"]["storageUri"] == f"pvc://{claim}/{relative}"
    assert service["metadata"]["name"] == model.name, "KServe names the model after the InferenceService"
    image_tag = server_container("base")["image"].split(":")[1].split("@")[0]
    assert predictor["tensorflow"]["runtimeVersion"] == image_tag
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["tensorflow"]["securityContext"]["readOnlyRootFilesystem"] is True


def test_istio_mirror_routes_to_the_rest_service_and_mirrors_elsewhere():
    (service,) = rendered("istio")
    assert (service["apiVersion"], service["kind"]) == ("networking.istio.io/v1", "VirtualService")
    assert not _check_shape(service, {"spec.hosts": list, "spec.http": list})
    services = {item["metadata"]["name"]: item for item in objects_of("base", "Service")}
    (route,) = service["spec"]["http"]
    (destination,) = [target["destination"] for target in route["route"]]
    assert destination["host"] in services and destination["host"] in service["spec"]["hosts"]
    ports = {port["port"] for port in services[destination["host"]]["spec"]["ports"]}
    assert destination["port"]["number"] in ports
    assert route["mirror"]["host"] != destination["host"] and route["mirror"]["port"]["number"] in ports
    assert 0 < route["mirrorPercentage"]["value"] <= 100
    assert services[destination["host"]]["spec"].get("clusterIP") != "None", "mirror the REST Service, not headless"


@pytest.mark.parametrize("kustomization", SERVING_STACKS)
def test_every_stack_passes_only_flags_tensorflow_model_server_accepts(kustomization):
    from test_deploy_configs import SERVER_FLAGS  # the flag list read from TF Serving's main.cc

    container = server_container(kustomization)
    names = [argument.removeprefix("--").partition("=")[0] for argument in container["args"]]
    assert all(argument.startswith("--") for argument in container["args"])
    assert not [name for name in names if name not in SERVER_FLAGS], "unknown flags are ignored by the server"
    assert len(names) == len(set(names)), f"a flag is given twice: {names}"
    limit = str(container["resources"]["limits"]["cpu"])
    threads = {argument.partition("=")[2] for argument in container["args"]
               if argument.startswith(("--tensorflow_intra_op_parallelism", "--tensorflow_inter_op_parallelism"))}
    assert threads == {limit}, "thread counts follow the CPU limit"


def _run_fetch_script(tmp_path: Path, source: Path) -> subprocess.CompletedProcess:
    """The object-storage init container's script, run by sh with /models moved under tmp_path.

    rclone is not installed here; a shell function stands in for ``rclone copy SOURCE DEST`` with a local copy, so
    what runs for real is the script's own logic: temporary name, check, rename, and stopping on any failure.
    """
    (fetch,) = pod_spec("overlays/object-storage")["initContainers"]
    script = fetch["args"][0].replace("/models/", f"{tmp_path}/models/")
    stand_in = 'rclone() { shift; [ "$1" = --checksum ] && shift; mkdir -p "$2" && cp -R "$1"/. "$2"/; }\n'
    environment = {"PATH": "/usr/bin:/bin", "MODEL_NAME": "classifier", "MODEL_VERSION": "3",
                   "MODEL_SOURCE": str(source)}
    return subprocess.run(["/bin/sh", "-c", stand_in + script], env=environment, capture_output=True, text=True,
                          timeout=30, check=False)


def test_object_storage_fetch_script_publishes_a_complete_version_only(tmp_path):
    source = tmp_path / "bucket"
    (source / "3" / "variables").mkdir(parents=True)
    (source / "3" / "saved_model.pb").write_bytes(b"graph")
    fetched = _run_fetch_script(tmp_path, source)
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(path.name for path in (tmp_path / "models" / "classifier").iterdir()) == ["3"]
    assert (tmp_path / "models" / "classifier" / "3" / "saved_model.pb").read_bytes() == b"graph"

    (source / "3" / "saved_model.pb").unlink()
    shutil.rmtree(tmp_path / "models")
    refused = _run_fetch_script(tmp_path, source)
    assert refused.returncode != 0 and "holds no saved_model.pb" in refused.stderr
    assert [path.name for path in (tmp_path / "models" / "classifier").iterdir()] == ["incoming-3"], (
        "an incomplete copy must stay under its non-numeric name, invisible to TF Serving"
    )
