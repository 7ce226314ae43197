"""The seed model exported once per session by ema-export, and the loopback servers that serve it.

Every export the serving tests use comes from `ema_export.export` on real checkpoints of `models.LinearModule`:
version 1 holds the known live/EMA weights, version 2 the same weights doubled, so a response's values tell which
version and which arm answered. Both are exported once per session (`seed_library`); tests copy finished version
directories into their own base path with `publish_version`, which renames a complete copy into place as the
exporter does. The only other export is `regressor`, a model of another shape.

Servers that tests only read are shared by the session: `labelled_server` (the server tests: versions 1 and 2 under
labels, REST and health on), `graph_server` (the TF1 graph model of `support.graph_model`) and `classifier` (the
client tests: version 1 alone under TF Serving's default policy).
A test that changes a base path or a server's config starts its own from `seed_library`.

Registered once as a plugin in ``tests/conftest.py``; test modules import the helpers by name.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import ema_export
from ema_export.names import DEFAULT_MODEL_NAME, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from serving.server import start_server
from support.graph_model import GRAPH_MODEL, write_graph_model
from support.models import (
    EMA_B,
    EMA_W,
    LIVE_B,
    LIVE_W,
    REGRESSION_EMA,
    REGRESSION_LIVE,
    LinearModule,
    RegressionModule,
    linear_numpy,
    write_seed_checkpoints,
)
from support.rpc import MODEL_NAME

REGRESSOR_NAME = "regressor"
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


@pytest.fixture(scope="session")
def labelled_server(seed_library: SeedLibrary, tmp_path_factory: pytest.TempPathFactory):
    """One server for every test that only reads it: versions 1 and 2 (policy ``all``), labels stable -> 1 and
    canary -> 2, REST and the health service on."""
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


@pytest.fixture(scope="session")
def graph_base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TF1 graph model of `support.graph_model` as version 1 of a base path, written once per session."""
    base_path = tmp_path_factory.mktemp("graph") / "models"
    write_graph_model(base_path / "1")
    return base_path


@pytest.fixture(scope="session")
def graph_server(graph_base_path: Path):
    """One server of the graph model for every test that only reads it: gRPC and REST, no health service."""
    with start_server(
        model_name=GRAPH_MODEL,
        model_base_path=graph_base_path,
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
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


# ------------------------------------------------------------------------------------------- the client tests' servers
@dataclass(frozen=True)
class ServedModel:
    """A model exported by ema-export and served on loopback, with the weights each arm computes with."""

    target: str
    name: str
    base_path: Path
    live: tuple[np.ndarray, np.ndarray]
    ema: tuple[np.ndarray, np.ndarray]

    def expected(self, inputs: np.ndarray, arm: str) -> np.ndarray:
        """What the arm must answer, computed with numpy."""
        weights = self.live if arm == SIGNATURE_LIVE else self.ema
        return linear_numpy(inputs, *weights)


@contextmanager
def _serving(base_path: Path, name: str, live: tuple, ema: tuple) -> Iterator[ServedModel]:
    """Serve ``base_path`` as ``name`` under TF Serving's default policy (the latest version) until the block ends."""
    with start_server(model_name=name, model_base_path=str(base_path), port=0) as server:
        server.wait_until_available(timeout=30)
        yield ServedModel(f"127.0.0.1:{server.port}", name, base_path, live, ema)


@pytest.fixture(scope="session")
def classifier(seed_library: SeedLibrary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """The seed model's version 1 (4 features -> 3 class scores), served alone as ``DEFAULT_MODEL_NAME``."""
    base_path = tmp_path_factory.mktemp("classifier") / "models"
    publish_version(seed_library, base_path, 1)
    with _serving(base_path, DEFAULT_MODEL_NAME, (LIVE_W, LIVE_B), (EMA_W, EMA_B)) as served:
        yield served


@pytest.fixture(scope="session")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """`RegressionModule` (one output column) exported by ema-export with its known weights, served as ``regressor``."""
    root = tmp_path_factory.mktemp("regressor")
    write_seed_checkpoints(root / "ckpt", live=REGRESSION_LIVE, ema=REGRESSION_EMA)
    ema_export.export(root / "ckpt", root / "out", model=RegressionModule)
    with _serving(root / "out", REGRESSOR_NAME, REGRESSION_LIVE, REGRESSION_EMA) as served:
        yield served
