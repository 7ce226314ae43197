"""Canary a new model version under TF Serving's label rules: widen the policy, wait for AVAILABLE, then label.

Why three steps and not one edit: TF Serving checks a config's ``version_labels`` *before* it loads anything
(``ServerCore::ReloadConfig`` calls ``UpdateModelVersionLabelMap`` at ``model_servers/server_core.cc`` 514, before
``AddModelsViaModelConfigList`` at 524; the check itself is at 574-584 of the 2.20.0 source). A label may only name a
version that is AVAILABLE right now, unless ``--allow_version_labels_for_unavailable_models``. So switching to
``specific { versions: 1 versions: 2 }`` and adding ``canary: 2`` in one edit is refused: version 2 is not loaded,
the label check fails, the new policy is never applied, and since the server re-reads the file on every poll
(``Server::PollFilesystemAndReloadConfig``, ``model_servers/server.cc`` 165-180) it fails the same way every poll.

The procedure that works, and what this module performs against a model config file:

1. ``start``: the policy first (``specific`` {stable, canary}, labels unchanged); wait until every target reports the
   canary version AVAILABLE (``GetModelStatus``); only then write ``stable`` and ``canary`` labels and wait until the
   targets resolve them. A canary that fails to load, or does not load in time, restores the original file.
2. ``promote``: both labels to the canary version, then the policy down to it alone.
3. ``rollback``: the canary label back to the stable version (clients pinned to ``canary`` keep being served), then
   the policy down to the stable version alone.

Labels always move before a version is dropped, so no label ever names a version that is being unloaded.

Every write replaces the file atomically (a temporary file in the same directory, then ``os.replace``): a server
polling the file never reads half of it, which could parse as a config with fewer models and unload the rest.

Example::

    targets = [ServingClient("localhost:8500")]
    result = start_canary(CanaryRequest("models.config", "classifier", canary_version=2), targets)
    result.steps[-1].labels   # {'stable': 1, 'canary': 2}
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from google.protobuf import text_format

from ema_export.contracts import HintedError
from serving.client import ModelMetadata, VersionStatus
from serving.config import ModelConfig, ModelServerConfig, load_model_server_config, validate_model_server_config
from serving.protocol import ServingError

STABLE_LABEL = "stable"
CANARY_LABEL = "canary"
AVAILABLE = "AVAILABLE"
DEFAULT_WAIT_TIMEOUT_S = 600.0
"""Long enough for TF Serving's config poll (60 s in k8s/) plus a kubelet ConfigMap refresh plus loading and warmup."""


class CanaryError(HintedError):
    """A canary step could not be taken or did not take effect; the message says which and what was restored."""


class VersionSource(Protocol):
    """What the procedure asks each serving target: ``ServingClient`` satisfies it."""

    target: str

    def status(self, model: str, *, version: int | None = None, timeout: float | None = None) -> list[VersionStatus]:
        """GetModelStatus: the state of one version (or all) of a model."""

    def metadata(self, model: str, *, version_label: str | None = None, timeout: float | None = None) -> ModelMetadata:
        """GetModelMetadata: which version a label resolves to (``.version``)."""


@dataclass(frozen=True)
class CanaryRequest:
    """Which file, model and versions a canary step works on.

    Attributes:
        config_path: The ModelServerConfig file the servers poll (``--model_config_file``).
        model: The model's ``name`` in that file.
        canary_version: The new version (``start`` only; ``promote``/``rollback`` read it from the canary label).
        stable_version: The version serving now; default: the ``stable`` label, else the one version AVAILABLE.
        stable_label: Label name for the serving version.
        canary_label: Label name for the canary.
        timeout_s: How long to wait for each step to take effect on every target.
        poll_interval_s: How often to ask the targets while waiting.
    """

    config_path: str | os.PathLike[str]
    model: str
    canary_version: int | None = None
    stable_version: int | None = None
    stable_label: str = STABLE_LABEL
    canary_label: str = CANARY_LABEL
    timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    poll_interval_s: float = 1.0


@dataclass(frozen=True)
class CanaryStep:
    """One write of the config file and what was waited for after it."""

    description: str
    versions: tuple[int, ...]
    labels: Mapping[str, int]
    waited_s: float


@dataclass(frozen=True)
class CanaryResult:
    """What a command did: the versions involved and every step, in order."""

    action: str
    model: str
    stable_version: int
    canary_version: int
    steps: tuple[CanaryStep, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------------ config edits
def read_config(path: str | os.PathLike[str]) -> ModelServerConfig:
    """Read and validate a model config file (TF Serving's rules), as the server would."""
    return load_model_server_config(path)


def model_entry(config: ModelServerConfig, model: str) -> ModelConfig:
    """The ``config`` entry of one model.

    Raises:
        CanaryError: the file lists no such model (naming those it lists).
    """
    for entry in config.model_config_list.config:
        if entry.name == model:
            return entry
    names = [entry.name for entry in config.model_config_list.config]
    raise CanaryError(
        f"The model config lists no model named {model!r}",
        hint=f"Pass --model with one of {names}",
    )


def with_policy_and_labels(
    config: ModelServerConfig, model: str, versions: Sequence[int], labels: Mapping[str, int]
) -> ModelServerConfig:
    """A copy of ``config`` whose model serves exactly ``versions`` (``specific``) with exactly ``labels``.

    Other models and fields are untouched; the input is not modified.

    Raises:
        CanaryError: a label would name a version outside ``versions``: TF Serving would accept it while that version
            is still loaded, then the label would name nothing once it is unloaded.
    """
    outside = {label: version for label, version in labels.items() if version not in versions}
    if outside:
        raise CanaryError(
            f"Labels {outside} of model {model} would name versions that are not served (versions {sorted(versions)})",
            hint="Finish or undo the canary in progress first (`ema-serving canary promote` or `rollback`), or remove "
            "those labels from the config file",
        )
    edited = ModelServerConfig()
    edited.CopyFrom(config)
    entry = model_entry(edited, model)
    entry.model_version_policy.specific.ClearField("versions")
    entry.model_version_policy.specific.versions.extend(sorted(set(versions)))
    entry.ClearField("version_labels")
    entry.version_labels.update(labels)
    validate_model_server_config(edited)
    return edited


def write_config_atomically(path: str | os.PathLike[str], config: ModelServerConfig) -> None:
    """Replace the file with ``config`` in text format, all at once.

    The leading ``#`` comment block of the existing file is kept (the body is regenerated from the parsed config, so
    comments inside it are not). Written to a temporary file in the same directory, flushed to disk, then renamed
    over the original: a rename within one filesystem is atomic, so a polling server reads the old file or the new
    one, never a prefix of it. The original file's permission bits are kept.
    """
    target = Path(path)
    header = _leading_comments(target.read_text(encoding="utf-8")) if target.exists() else ""
    _write_text_atomically(target, header + text_format.MessageToString(config))


def _write_text_atomically(target: Path, text: str) -> None:
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _leading_comments(text: str) -> str:
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("#") and line.strip():
            break
        lines.append(line)
    return "".join(lines)


# ----------------------------------------------------------------------------------------------- the commands
def start_canary(
    request: CanaryRequest, targets: Sequence[VersionSource], on_written: Callable[[Path], None] | None = None
) -> CanaryResult:
    """Serve ``canary_version`` beside the stable version and label both, in the order TF Serving accepts.

    Args:
        request: The file, model and versions (``canary_version`` required).
        targets: Every server that reads the file; each must report the step before the next one is taken.
        on_written: Called after each write (e.g. to ``kubectl apply`` the file as a ConfigMap).

    Returns:
        The two steps taken: policy, then labels.

    Raises:
        CanaryError: bad request; the canary did not load (the original file is restored); or a step did not take
            effect in time.
    """
    if request.canary_version is None:
        raise CanaryError("No canary version was given", hint="Pass --version N, the version to canary")
    original = read_config(request.config_path)
    entry = model_entry(original, request.model)
    stable = _stable_version(request, entry, targets)
    canary = request.canary_version
    if canary == stable:
        raise CanaryError(
            f"The canary version {canary} is the stable version",
            hint="Pass --version with a newer export's number (or --stable with the version serving now)",
        )
    old_labels = {label: version for label, version in entry.version_labels.items() if version != canary}
    widened = with_policy_and_labels(original, request.model, (stable, canary), old_labels)
    labels = {**old_labels, request.stable_label: stable, request.canary_label: canary}
    labelled = with_policy_and_labels(original, request.model, (stable, canary), labels)
    steps = [_write_and_wait(request, widened, f"serve versions {stable} and {canary}", on_written,
                             lambda: _all_available(request.model, canary, targets), restore=original)]
    steps.append(_write_and_wait(request, labelled, f"label {request.stable_label}={stable}, "
                                 f"{request.canary_label}={canary}", on_written,
                                 lambda: _labels_resolve(request.model, labels, targets)))
    return CanaryResult("start", request.model, stable, canary, tuple(steps))


def promote_canary(
    request: CanaryRequest, targets: Sequence[VersionSource], on_written: Callable[[Path], None] | None = None
) -> CanaryResult:
    """Move both labels to the canary version, then serve it alone. Arguments as for `start_canary`."""
    return _narrow(request, targets, on_written, keep="canary")


def rollback_canary(
    request: CanaryRequest, targets: Sequence[VersionSource], on_written: Callable[[Path], None] | None = None
) -> CanaryResult:
    """Point the canary label back at the stable version, then serve the stable version alone.

    Arguments as for `start_canary`. Clients that pin ``canary`` keep being answered (by the stable version).
    """
    return _narrow(request, targets, on_written, keep="stable")


def _narrow(
    request: CanaryRequest, targets: Sequence[VersionSource], on_written: Callable[[Path], None] | None, keep: str
) -> CanaryResult:
    original = read_config(request.config_path)
    entry = model_entry(original, request.model)
    stable, canary = _labelled_pair(request, entry)
    kept, dropped = (canary, stable) if keep == "canary" else (stable, canary)
    labels = {**dict(entry.version_labels), request.stable_label: kept, request.canary_label: kept}
    versions = sorted({stable, canary})
    relabelled = with_policy_and_labels(original, request.model, versions, labels)
    narrowed = with_policy_and_labels(original, request.model, (kept,), labels)
    steps = [_write_and_wait(request, relabelled, f"label {request.stable_label}={kept}, "
                             f"{request.canary_label}={kept}", on_written,
                             lambda: _labels_resolve(request.model, labels, targets))]
    steps.append(_write_and_wait(request, narrowed, f"serve version {kept} only", on_written,
                                 lambda: _none_available(request.model, dropped, targets)))
    return CanaryResult("promote" if keep == "canary" else "rollback", request.model, stable, canary, tuple(steps))


def _labelled_pair(request: CanaryRequest, entry: ModelConfig) -> tuple[int, int]:
    labels = dict(entry.version_labels)
    stable = request.stable_version if request.stable_version is not None else labels.get(request.stable_label)
    canary = request.canary_version if request.canary_version is not None else labels.get(request.canary_label)
    if stable is None or canary is None:
        raise CanaryError(
            f"Model {entry.name} has no canary in progress: expected labels {request.stable_label!r} and "
            f"{request.canary_label!r} in the config (written by `ema-serving canary start`). Received labels: "
            f"{labels or 'none'}",
            hint="Run `ema-serving canary start` first, or name the versions with --stable and --version",
        )
    return stable, canary


def _stable_version(request: CanaryRequest, entry: ModelConfig, targets: Sequence[VersionSource]) -> int:
    if request.stable_version is not None:
        return request.stable_version
    if request.stable_label in entry.version_labels:
        return entry.version_labels[request.stable_label]
    available = sorted({
        status.version
        for target in targets
        for status in _status(target, request.model, None)
        if status.state == AVAILABLE and status.version != request.canary_version
    })
    if len(available) != 1:
        raise CanaryError(
            f"Cannot tell which version of {request.model} is stable: expected exactly one AVAILABLE version besides "
            f"the canary on the targets. Received: {available or 'none'}",
            hint="Pass --stable N, the version serving now",
        )
    return available[0]


# ----------------------------------------------------------------------------------------------- writing, waiting
def _write_and_wait(
    request: CanaryRequest,
    config: ModelServerConfig,
    description: str,
    on_written: Callable[[Path], None] | None,
    done: Callable[[], str | None],
    restore: ModelServerConfig | None = None,
) -> CanaryStep:
    """Write ``config``, then ask ``done`` until it returns None (done) or raises; restore the file on failure.

    A failing ``on_written`` puts the file back as it was before this write (the servers never saw it); a failed
    wait writes ``restore`` when given (and runs ``on_written`` again, so the servers get it too).
    """
    path = Path(request.config_path)
    previous = path.read_text(encoding="utf-8")
    write_config_atomically(path, config)
    if on_written is not None:
        try:
            on_written(path)
        except BaseException:
            _write_text_atomically(path, previous)
            raise
    started = time.monotonic()
    try:
        _wait(done, request, description)
    except CanaryError as error:
        if restore is None:
            raise
        write_config_atomically(path, restore)
        if on_written is not None:
            on_written(path)
        raise CanaryError(error.message + f"; restored the previous {path.name}", hint=error.hint) from None
    entry = model_entry(config, request.model)
    return CanaryStep(description, tuple(entry.model_version_policy.specific.versions), dict(entry.version_labels),
                      round(time.monotonic() - started, 3))


def _wait(done: Callable[[], str | None], request: CanaryRequest, description: str) -> None:
    deadline = time.monotonic() + request.timeout_s
    while True:
        pending = done()
        if pending is None:
            return
        if time.monotonic() >= deadline:
            raise CanaryError(
                f"Step '{description}' did not take effect within {request.timeout_s:g} s: {pending}",
                hint="Check that the servers poll this file (--model_config_file_poll_wait_seconds > 0) and their "
                "logs; raise --timeout for slow loads",
            )
        time.sleep(request.poll_interval_s)


def _status(target: VersionSource, model: str, version: int | None) -> list:
    try:
        return target.status(model, version=version, timeout=10)
    except ServingError:
        return []


def _all_available(model: str, version: int, targets: Sequence[VersionSource]) -> str | None:
    """None once every target reports ``version`` AVAILABLE; raises when one reports its load failed."""
    waiting = []
    for target in targets:
        states = _status(target, model, version)
        state = states[0] if states else None
        if state is not None and state.state == "END" and state.error_message:
            raise CanaryError(
                f"Version {version} of model {model} failed to load on {target.target}: {state.error_message}",
                hint="Fix or re-export that version under a new number, then run `ema-serving canary start` again",
            )
        if state is None or state.state != AVAILABLE:
            waiting.append(f"{target.target} reports version {version} {state.state if state else 'unknown'}")
    return "; ".join(waiting) or None


def _none_available(model: str, version: int, targets: Sequence[VersionSource]) -> str | None:
    """None once no target serves ``version`` any more."""
    serving = [target.target for target in targets
               if any(status.state == AVAILABLE for status in _status(target, model, version))]
    return f"version {version} still AVAILABLE on {', '.join(serving)}" if serving else None


def _labels_resolve(model: str, labels: Mapping[str, int], targets: Sequence[VersionSource]) -> str | None:
    """None once every target resolves each label to its version (GetModelMetadata echoes the version served)."""
    waiting = []
    for target in targets:
        for label, version in sorted(labels.items()):
            try:
                served = target.metadata(model, version_label=label, timeout=10).version
            except ServingError:
                served = None
            if served != version:
                waiting.append(f"{target.target} resolves {label} to {served if served is not None else 'nothing'}")
    return "; ".join(waiting) or None
