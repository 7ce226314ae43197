"""Shared pieces of the local-server tests: SavedModels written by ema-export, request builders, expected values.

Every model the server tests serve comes from `ema_export.export` on real checkpoints of `support.models.LinearModule`:
version 1 holds the known live/EMA weights, version 2 the same weights doubled, so a response's values tell which
version and which arm answered. The exports are done once per session (`seed_library`); tests copy finished
version directories into their own base path with `publish_version`, which renames a complete copy into place as
the exporter does.

Registered once as a plugin in ``tests/conftest.py``; test modules import the helpers by name.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

import ema_export
from ema_export.names import SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from serving.server import start_server
from support.models import EMA_B, EMA_W, LIVE_B, LIVE_W, LinearModule, linear_numpy, write_seed_checkpoints

MODEL_NAME = "model"
INPUT_NAME = "inputs"
OUTPUT_NAME = "output_0"
VERSION_SCALE = {1: 1.0, 2: 2.0}
"""Version N's weights are the known weights times VERSION_SCALE[N]; biases are unchanged."""

_temp_names = itertools.count()


@dataclass(frozen=True)
class SeedLibrary:
    """Finished exports to copy from (``versions/<N>``) and the checkpoints they came from."""

    versions: Path
    checkpoints: dict[int, Path]


@pytest.fixture(scope="session")
def seed_library(tmp_path_factory: pytest.TempPathFactory) -> SeedLibrary:
    """Versions 1 and 2 of the seed model, exported once per session by `ema_export.export`."""
    root = tmp_path_factory.mktemp("seed_library")
    checkpoints = {}
    for version, scale in VERSION_SCALE.items():
        checkpoints[version] = root / f"ckpt{version}"
        write_seed_checkpoints(checkpoints[version], live=(LIVE_W * scale, LIVE_B), ema=(EMA_W * scale, EMA_B))
        ema_export.export(checkpoints[version], root / "versions", model=LinearModule, version=version)
    return SeedLibrary(root / "versions", checkpoints)


@pytest.fixture(scope="module")
def labelled_server(seed_library: SeedLibrary, tmp_path_factory: pytest.TempPathFactory):
    """A server for the module: versions 1 and 2 (policy ``all``), labels stable -> 1 and canary -> 2, REST and the
    health service on."""
    base_path = tmp_path_factory.mktemp("labelled") / "models"
    for version in (1, 2):
        publish_version(seed_library, base_path, version)
    config = write_config(
        base_path.parent / "models.config",
        [{"name": MODEL_NAME, "base_path": base_path, "policy": "all {}", "labels": {"stable": 1, "canary": 2}}],
    )
    with start_server(
        model_config_file=config,
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
        allow_version_labels_for_unavailable_models=True,
        enable_grpc_healthcheck_service=True,
    ) as server:
        yield server


def publish_version(library: SeedLibrary, base_path: Path, version: int, as_version: int | None = None) -> Path:
    """Copy a finished version into ``base_path`` under a temporary name, then rename it into place."""
    base_path.mkdir(parents=True, exist_ok=True)
    staging = base_path / f"temp-copy-{next(_temp_names)}"
    shutil.copytree(library.versions / str(version), staging)
    target = base_path / str(as_version if as_version is not None else version)
    staging.rename(target)
    return target


def expected_output(inputs: np.ndarray, version: int = 1, signature: str = SIGNATURE_DEFAULT) -> np.ndarray:
    """What a version's signature must answer, computed with numpy (``serving_default`` is the EMA arm)."""
    scale = VERSION_SCALE[version]
    if signature == SIGNATURE_LIVE:
        return linear_numpy(inputs, LIVE_W * scale, LIVE_B)
    assert signature in (SIGNATURE_EMA, SIGNATURE_DEFAULT, "")
    return linear_numpy(inputs, EMA_W * scale, EMA_B)


def predict_request(
    inputs: np.ndarray | None = None,
    *,
    model: str = MODEL_NAME,
    signature: str = "",
    version: int | None = None,
    label: str | None = None,
) -> predict_pb2.PredictRequest:
    """A PredictRequest for the seed model, built the way TF Serving's own examples build them."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if inputs is not None:
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(inputs))
    return request


def sample_inputs(batch: int = 2, seed: int = 0) -> np.ndarray:
    """A float32 batch for the seed model."""
    return np.random.default_rng(seed).normal(size=(batch, 4)).astype(np.float32)


def output_of(response: predict_pb2.PredictResponse) -> np.ndarray:
    """The seed model's output from a PredictResponse."""
    return tf.make_ndarray(response.outputs[OUTPUT_NAME])


@dataclass(frozen=True)
class Stubs:
    """The official generated stubs on one loopback channel."""

    channel: grpc.Channel
    prediction: prediction_service_pb2_grpc.PredictionServiceStub
    model: model_service_pb2_grpc.ModelServiceStub


def connect(port: int) -> Stubs:
    """Stubs for a server on 127.0.0.1."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Stubs(
        channel,
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Run an RPC that must fail and return its error."""
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=30, **kwargs)
    return raised.value


def write_config(path: Path, models: list[dict]) -> Path:
    """Write a ModelServerConfig text file; each dict has name, base_path and optional policy/labels text."""
    entries = []
    for model in models:
        lines = [f'name: "{model["name"]}"', f'base_path: "{model["base_path"]}"', 'model_platform: "tensorflow"']
        if "policy" in model:
            lines.append(f"model_version_policy {{ {model['policy']} }}")
        for label, version in model.get("labels", {}).items():
            lines.append(f'version_labels {{ key: "{label}" value: {version} }}')
        entries.append("  config {\n    " + "\n    ".join(lines) + "\n  }")
    path.write_text("model_config_list {\n" + "\n".join(entries) + "\n}\n")
    return path
