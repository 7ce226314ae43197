"""k8s/jobs/: the sharded comparison Job and its merge step, checked statically (no cluster here).

Structure with pyyaml; the rendered kustomization with `kubectl kustomize` when kubectl is installed; the objects
against Kubernetes' schemas with kubernetes-validate when it is importable.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from serving.cli import main

JOBS_DIR = Path(__file__).resolve().parents[1] / "k8s" / "jobs"
SERVING_DIR = JOBS_DIR.parent / "base"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((JOBS_DIR / name).read_text())


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container(job)["env"]}


def test_the_compare_job_is_indexed_with_one_shard_per_index() -> None:
    job = load("compare-job.yaml")
    spec = job["spec"]
    assert (job["apiVersion"], job["kind"], spec["completionMode"]) == ("batch/v1", "Job", "Indexed")
    variables = env(job)
    assert spec["completions"] == spec["parallelism"] == int(variables["NUM_SHARDS"])
    script = container(job)["args"][0]
    assert '--shard "${JOB_COMPLETION_INDEX}/${NUM_SHARDS}"' in script and "--json" in script
    assert "shard-${JOB_COMPLETION_INDEX}.json" in script and 'mv "$report.partial" "$report"' in script
    assert '${MODEL_VERSION:+--version "$MODEL_VERSION"}' in script  # one pinned version for every shard
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_the_shards_talk_to_the_headless_grpc_service_with_round_robin() -> None:
    job = load("compare-job.yaml")
    service = yaml.safe_load((SERVING_DIR / "service-grpc.yaml").read_text())
    names = [item["name"] for item in container(job)["env"]]
    assert names.index("POD_NAMESPACE") < names.index("EMA_SERVING_TARGET")  # $(VAR) expands only earlier vars
    target = env(job)["EMA_SERVING_TARGET"]
    assert target == f"dns:///{service['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local:8500"
    assert "--round-robin" in container(job)["args"][0]


def test_every_flag_the_jobs_pass_is_one_the_commands_accept() -> None:
    for name, command in (("compare-job.yaml", "compare"), ("merge-job.yaml", "merge")):
        script = container(load(name))["args"][0]
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        flags = {word.split("=")[0] for word in script.replace('"', " ").split() if word.startswith("--")}
        assert flags and all(flag in help_text for flag in flags), (name, flags)


def test_data_is_read_only_and_reports_share_one_volume_with_the_merge() -> None:
    compare, merge = load("compare-job.yaml"), load("merge-job.yaml")
    mounts = {mount["mountPath"]: mount for mount in container(compare)["volumeMounts"]}
    assert mounts["/eval/data"]["readOnly"] is True and not mounts["/eval/reports"].get("readOnly")
    assert [mount["mountPath"] for mount in container(merge)["volumeMounts"]] == ["/tmp", "/eval/reports"]
    claims = {volume["persistentVolumeClaim"]["claimName"] for job in (compare, merge)
              for volume in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in volume}  # fmt: skip
    assert claims == {load("pvc.yaml")["metadata"]["name"]}
    assert "ema-serving merge /eval/reports/shard-*.json --json" in container(merge)["args"][0]
    rules = compare["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 4]


def test_the_containers_run_hardened_like_the_serving_pods() -> None:
    for name in ("compare-job.yaml", "merge-job.yaml"):
        job = load(name)
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        security = container(job)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


def test_the_kustomization_lists_every_manifest_but_the_later_merge() -> None:
    kustomization = load("kustomization.yaml")
    manifests = {path.name for path in JOBS_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests - {"merge-job.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomization_renders() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(JOBS_DIR)], capture_output=True, text=True, timeout=60,
                              check=True).stdout  # fmt: skip
    objects = {(item["kind"], item["metadata"]["name"]): item for item in yaml.safe_load_all(rendered)}
    assert set(objects) == {("PersistentVolumeClaim", "ema-eval"), ("Job", "ema-compare")}
    assert container(objects[("Job", "ema-compare")])["image"] == "ema-export:0.1.0"


def test_the_manifests_are_valid_kubernetes_objects() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in sorted(JOBS_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, "1.32.0", strict=True)  # as tests/test_k8s_*.py
