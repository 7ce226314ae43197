"""The TF Serving image must be able to load what the exporter writes: its release must be the TensorFlow minor
that writes the exports, or newer.

A SavedModel written by TensorFlow 2.N may use ops, op attributes or graph features that a 2.(N-1) runtime does not
know; TF Serving 2.N is built on TensorFlow 2.N. pyproject.toml bounds the TensorFlow that users install, and so the
newest writer; every ``tensorflow/serving:X.Y.Z`` image in k8s/ (and KServe's ``runtimeVersion``) must be at least
that minor. Raising the TensorFlow cap means raising the image tag too, or this test fails.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPOSITORY = Path(__file__).resolve().parent.parent
K8S = REPOSITORY / "k8s"
IMAGE = re.compile(r"image:\s*tensorflow/serving:(\d+)\.(\d+)\.(\d+)")
RUNTIME_VERSION = re.compile(r"runtimeVersion:\s*\"?(\d+)\.(\d+)\.(\d+)")


def newest_allowed_minor(specifier: SpecifierSet) -> tuple[int, int] | None:
    """The newest TensorFlow ``(major, minor)`` a requirement admits; None when it has no upper bound in 2.x/3.x."""
    if specifier.contains("3.0.0", prereleases=True) or not specifier:
        return None
    allowed = [(2, minor) for minor in range(100)
               if any(specifier.contains(f"2.{minor}.{patch}", prereleases=True) for patch in range(30))]
    return max(allowed) if allowed else None


def tensorflow_requirement() -> SpecifierSet:
    """The ``tensorflow`` requirement of pyproject.toml (tomllib from Python 3.11; the installed metadata before)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: `make` reinstalls whenever pyproject.toml changes, so this is current
        dependencies = metadata.requires("ema-export") or []
    else:
        dependencies = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = [Requirement(text) for text in dependencies]
    (requirement,) = [item for item in requirements if item.name == "tensorflow" and not item.marker]
    return requirement.specifier


def serving_versions() -> dict[str, tuple[int, int]]:
    """Every TF Serving version named in k8s/ manifests: file:line -> (major, minor)."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = IMAGE.search(line) or RUNTIME_VERSION.search(line)
            if match:
                found[f"{path.relative_to(REPOSITORY)}:{number}"] = (int(match[1]), int(match[2]))
    return found


def skew_problems(specifier: SpecifierSet, versions: dict[str, tuple[int, int]]) -> list[str]:
    newest = newest_allowed_minor(specifier)
    if newest is None:
        return [f"tensorflow{specifier} has no upper bound: cap it at the newest TF Serving release (<2.M+1)"]
    return [f"{where} serves with TF Serving {major}.{minor}, older than TensorFlow {newest[0]}.{newest[1]} that "
            f"pyproject.toml ({specifier}) lets the exporter write with: raise the tag or lower the cap"
            for where, (major, minor) in versions.items() if (major, minor) < newest]


def test_k8s_names_at_least_one_tf_serving_image():
    assert any(where.startswith("k8s/base/deployment.yaml") for where in serving_versions())


def test_no_image_is_older_than_the_newest_tensorflow_pyproject_allows():
    problems = skew_problems(tensorflow_requirement(), serving_versions())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("specifier", "expected"),
    [(">=2.16,<2.22", (2, 21)), (">=2.16,<=2.21.3", (2, 21)), ("~=2.20.0", (2, 20)), ("==2.21.*", (2, 21)),
     (">=2.16", None), ("", None)],
)
def test_newest_allowed_minor(specifier, expected):
    assert newest_allowed_minor(SpecifierSet(specifier)) == expected


def test_a_cap_newer_than_the_image_is_reported():
    problems = skew_problems(SpecifierSet(">=2.16,<2.23"), {"k8s/base/deployment.yaml:1": (2, 21)})
    expected = ("k8s/base/deployment.yaml:1 serves with TF Serving 2.21, older than TensorFlow 2.22 that "
                "pyproject.toml (<2.23,>=2.16) lets the exporter write with: raise the tag or lower the cap")
    assert problems == [expected]
