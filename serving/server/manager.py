"""Which versions of which models are loaded: config, file-system polling, version policy, labels, states.

This is the local counterpart of TF Serving's ServerCore + AspiredVersionsManager + FileSystemStoragePathSource:

* Each poll lists a model's base path; only children whose names are integers are versions, so an export still
  being written under a temporary name (``temp-...``) is never seen.
* The version policy (``latest``/``all``/``specific``) picks the aspired versions. New ones are loaded (and warmed
  up) before old ones are unloaded, TF Serving's availability-preserving order, so a model never goes dark during
  a swap. Unlike TF Serving, an old version also stays while every aspired version failed to load: a broken export
  must not take a working model down in a local loop.
* A failed load is retried as TF Serving's ``LoaderHarness::Load`` retries it (loader_harness.cc:81-85,
  util/retrier.cc:27-52): up to ``max_num_load_retries`` more attempts, ``load_retry_interval_micros`` apart
  (``--max_num_load_retries=5``, one minute: server.h:68-69), the version LOADING meanwhile. So a version copied in
  non-atomically (a slow ``cp -r``) loads once the copy is complete. Retries stop when the version is no longer
  aspired (basic_manager.cc:551). After the last attempt the version is END with its error and is not tried again
  until its directory disappears and comes back. Retries run on a timer, not in the poll, so a model whose
  file-system poll is off (``--file_system_poll_wait_seconds=0``) is retried too. Unlike TF Serving, start-up and
  HandleReloadConfigRequest do not wait for retries: they report a model whose first attempt failed right away.
* A version the policy wants but that is not loading yet is START, as TF Serving's state monitor reports it
  (get_model_status_impl.cc:35-37); versions load one at a time, newest first.
* Serving reads are lock-free: ``_serving`` maps are replaced, never mutated, so a request grabs a version with one
  dictionary read and keeps it for as long as it needs it, whatever the poller does meanwhile.
* GetModelStatus sees TF Serving's states: LOADING, AVAILABLE, UNLOADING, END (with the load error, if any); ended
  versions stay listed, as TF Serving's state monitor keeps them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_pb2

from ema_export.contracts import version_paths
from serving.config import ModelConfig, ModelServerConfig, aspired_versions
from serving.server.errors import RpcStatus, failed_precondition, invalid_argument, not_found
from serving.server.servable import LoadedVersion, VersionLoadError, load_version

logger = logging.getLogger("serving.server")

State = get_model_status_pb2.ModelVersionStatus.State
START = State.Value("START")
LOADING = State.Value("LOADING")
AVAILABLE = State.Value("AVAILABLE")
UNLOADING = State.Value("UNLOADING")
END = State.Value("END")


@dataclass(frozen=True)
class VersionState:
    """One version's state as GetModelStatus reports it; ``code``/``message`` hold a failed load's error."""

    state: int
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


@dataclass(frozen=True)
class ManagerOptions:
    """How versions are loaded and labels are checked (the server flags that affect the manager)."""

    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
    enable_signature_method_name_check: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60 * 1000 * 1000

    @property
    def load_retry_interval_seconds(self) -> float:
        """The wait between load attempts; a negative interval means no wait, as in TF Serving (main.cc:168-172)."""
        return max(self.load_retry_interval_micros, 0) / 1e6


@dataclass(frozen=True)
class PendingRetry:
    """A version whose last load attempt failed and that will be tried again at ``due`` (time.monotonic)."""

    num_failed_attempts: int
    due: float
    code: grpc.StatusCode
    message: str


class ModelsUnavailable(RpcStatus):
    """Newly configured models that have no AVAILABLE version; ``problems`` says why, one entry per failure."""

    def __init__(self, names: list[str], problems: list[str]) -> None:
        super().__init__(
            grpc.StatusCode.UNKNOWN,
            f"{len(names)} model(s) did not become available: {{{', '.join('{' + p + '}' for p in problems)}}}",
        )
        self.names = names
        self.problems = problems


def list_versions(base_path: str | os.PathLike[str]) -> dict[int, Path]:
    """The versions TF Serving would load from a base path, by number: `ema_export.contracts.version_paths`, the one
    version-directory rule the exporter uses too (``1``, ``007``; a file named ``8`` counts and then fails to load).

    Raises:
        OSError: the base path is missing or unreadable.
    """
    return version_paths(base_path)


class ModelManager:
    """Loads, serves and unloads model versions according to a ModelServerConfig.

    Args:
        options: Warmup and label behaviour.
    """

    def __init__(self, options: ManagerOptions | None = None) -> None:
        self._options = options or ManagerOptions()
        self._sync_lock = threading.Lock()  # one config change or poll at a time
        self._lock = threading.Lock()  # guards the state and label maps below
        self._configs: dict[str, ModelConfig] = {}
        self._serving: dict[str, Mapping[int, LoadedVersion]] = {}
        self._states: dict[str, dict[int, VersionState]] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._failed: dict[str, set[int]] = {}
        self._retries: dict[tuple[str, int], PendingRetry] = {}
        self._retry_timers: set[threading.Timer] = set()
        self._closed = False
        self._path_problems: dict[str, str] = {}
        self._listeners: list[Callable[[str, int, VersionState], None]] = []

    # ----------------------------------------------------------------------------------------------- requests

    def get_servable(self, model_spec: model_pb2.ModelSpec) -> LoadedVersion:
        """The loaded version a ModelSpec asks for: by version, by label, or the latest.

        Raises:
            RpcStatus: INVALID_ARGUMENT for an empty name or an unknown label, NOT_FOUND for an unknown model or
                version, with TF Serving's messages.
        """
        name = model_spec.name
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        versions = self._serving.get(name)
        if choice is None:
            if not versions:
                raise not_found(f"Servable not found for request: Latest({name})")
            return versions[max(versions)]
        if choice == "version_label":
            version = self._labels.get(name, {}).get(model_spec.version_label)
            if version is None:
                raise invalid_argument(f"Unrecognized servable version label: {model_spec.version_label}")
        else:
            version = model_spec.version.value
        servable = versions.get(version) if versions else None
        if servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return servable

    def version_states(self, name: str, version: int | None = None) -> list[tuple[int, VersionState]]:
        """GetModelStatus: every known version of a model (newest first), or one version.

        Raises:
            RpcStatus: NOT_FOUND with TF Serving's messages when nothing is known.
        """
        with self._lock:
            states = dict(self._states.get(name, {}))
        if version is not None:
            if version not in states:
                raise not_found(f"Could not find version {version} of model {name}")
            return [(version, states[version])]
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
        return sorted(states.items(), reverse=True)

    def available_versions(self) -> dict[str, list[int]]:
        """Every configured model with its AVAILABLE versions, ascending."""
        serving = self._serving
        return {name: sorted(serving.get(name, {})) for name in self._configs}

    def labels(self) -> dict[str, dict[str, int]]:
        """The label map in force: model -> label -> version."""
        with self._lock:
            return {name: dict(labels) for name, labels in self._labels.items()}

    def model_configs(self) -> dict[str, ModelConfig]:
        """The configured models by name."""
        return dict(self._configs)

    # ------------------------------------------------------------------------------------------ config, polls

    def apply_config(self, config: ModelServerConfig) -> None:
        """Switch to a new config (start-up or HandleReloadConfigRequest), loading new models before returning.

        Like TF Serving, labels are checked against the versions available *before* the new config loads anything
        (server_core.cc:512-514), and the call waits for newly added models to become available. Only models that
        are new or whose entry changed are synced with their base path: re-applying the same config (the config
        file poll does it every time) changes labels only, as TF Serving's ``ReloadConfig`` does.

        Raises:
            RpcStatus: FAILED_PRECONDITION when a label points at a version that is not AVAILABLE.
            ModelsUnavailable: (an RpcStatus, UNKNOWN) a newly added model has no version that loaded.
        """
        models = {model.name: model for model in config.model_config_list.config}
        with self._sync_lock:
            labels = self._label_map(models)
            added = [name for name in models if name not in self._configs]
            removed = [name for name in self._configs if name not in models]
            changed = [name for name in models if name in added or models[name] != self._configs[name]]
            with self._lock:
                self._configs = models
                self._labels = labels
            for name in removed:
                self._unload_model(name)
            for name in added:  # a model (re-)added by a config gets a fresh try at versions that failed before
                self._failed.pop(name, None)
            for name in changed:
                self._sync_model(name)
            self._check_available(added)

    def poll(self) -> None:
        """Look at every base path once: load new aspired versions, unload the ones no longer aspired."""
        with self._sync_lock:
            for name in list(self._configs):
                self._sync_model(name)

    def close(self) -> None:
        """Drop every loaded version and pending load retry (at shutdown, after the last request finished)."""
        with self._sync_lock:
            self._closed = True
            for timer in list(self._retry_timers):
                timer.cancel()
            self._retries.clear()
            for name in list(self._serving):
                self._unload_model(name)

    def add_state_listener(self, listener: Callable[[str, int, VersionState], None]) -> None:
        """Call ``listener(model, version, state)`` on every state change, as TF Serving's servable event bus
        tells its state monitor (event_bus.h). The listener runs on the loading thread and must be quick."""
        self._listeners.append(listener)

    def pending_retries(self) -> dict[tuple[str, int], PendingRetry]:
        """Versions waiting for another load attempt, by (model, version)."""
        with self._lock:
            return dict(self._retries)

    def _label_map(self, models: Mapping[str, ModelConfig]) -> dict[str, dict[str, int]]:
        allow_unavailable = self._options.allow_version_labels_for_unavailable_models
        labels: dict[str, dict[str, int]] = {}
        for name, model in models.items():
            serving = self._serving.get(name, {})
            for label, version in model.version_labels.items():
                existing = self._labels.get(name, {}).get(label)
                allowed = allow_unavailable and existing in (None, version)
                if not allowed and version not in serving:
                    raise failed_precondition(
                        f"Request to assign label to version {version} of model {name}, which is not currently "
                        "available for inference"
                    )
                labels.setdefault(name, {})[label] = version
        return labels

    def _check_available(self, names: list[str]) -> None:
        missing = [name for name in names if not self._serving.get(name)]
        if not missing:
            return
        problems = []
        for name in missing:
            failures = [
                f"model {name} version {version}: {state.message}"
                for version, state in sorted(self._states.get(name, {}).items())
                if state.code != grpc.StatusCode.OK
            ]
            failures += [
                f"model {name} version {version}: {retry.message} (load attempt {retry.num_failed_attempts} failed)"
                for (model, version), retry in sorted(self._retries.items())
                if model == name
            ]
            problems += failures or [f"model {name}: {self._path_problems.get(name, 'no version found')}"]
        raise ModelsUnavailable(missing, problems)

    def _sync_model(self, name: str) -> None:
        config = self._configs[name]
        try:
            on_disk = list_versions(config.base_path)
        except OSError as error:
            self._note_path_problem(name, f"Could not list base path {config.base_path} of model {name}: {error}")
            return
        if not on_disk:
            self._note_path_problem(name, f"No versions of model {name} found under base path {config.base_path}")
        else:
            self._path_problems.pop(name, None)
        failed = self._failed.setdefault(name, set())
        failed &= set(on_disk)  # a version that vanished may be retried when it comes back
        aspired = aspired_versions(config, on_disk)
        self._cancel_retries(name, aspired)
        to_load = sorted(aspired - set(self._serving.get(name, {})) - failed, reverse=True)
        for version in to_load:  # TF Serving's START: aspired, not loading yet
            if (name, version) not in self._retries:
                self._set_state(name, version, VersionState(START))
        now = time.monotonic()
        for version in to_load:
            retry = self._retries.get((name, version))
            if retry is None or retry.due <= now:
                self._load(name, version, on_disk[version])
        serving = self._serving.get(name, {})
        unaspired = set(serving) - aspired
        if unaspired and (not aspired or aspired & set(serving)):
            for version in sorted(unaspired):
                self._unload(name, version)

    def _cancel_retries(self, name: str, aspired: set[int]) -> None:
        """Stop retrying versions no longer aspired (basic_manager.cc:545-552); they end with their last error."""
        for model, version in list(self._retries):
            if model == name and version not in aspired:
                retry = self._retries.pop((model, version))
                self._set_state(name, version, VersionState(END, retry.code, retry.message))

    def _note_path_problem(self, name: str, message: str) -> None:
        if self._path_problems.get(name) != message:
            logger.warning("%s", message)
        self._path_problems[name] = message

    def _load(self, name: str, version: int, path: Path) -> None:
        self._set_state(name, version, VersionState(LOADING))
        logger.info("Loading model %s version %d from %s", name, version, path)
        try:
            servable = load_version(
                name,
                version,
                path,
                warmup=self._options.enable_model_warmup,
                method_name_check=self._options.enable_signature_method_name_check,
            )
        except Exception as error:  # whatever breaks one version must fail that version only
            code = error.code if isinstance(error, VersionLoadError) else grpc.StatusCode.UNKNOWN
            message = str(error) if isinstance(error, VersionLoadError) else f"{type(error).__name__}: {error}"
            self._load_failed(name, version, code, message)
            return
        with self._lock:
            self._retries.pop((name, version), None)
        self._serving = {**self._serving, name: {**self._serving.get(name, {}), version: servable}}
        self._set_state(name, version, VersionState(AVAILABLE))
        warmup = f" (after {servable.num_warmup_records} warmup requests)" if servable.num_warmup_records else ""
        logger.info("Model %s version %d is AVAILABLE%s", name, version, warmup)

    def _load_failed(self, name: str, version: int, code: grpc.StatusCode, message: str) -> None:
        """Schedule the next attempt while retries remain (util/retrier.cc:34-44), else END with the error."""
        previous = self._retries.get((name, version))
        num_failed = (previous.num_failed_attempts if previous else 0) + 1
        if num_failed <= self._options.max_num_load_retries:
            delay = self._options.load_retry_interval_seconds
            with self._lock:
                self._retries[(name, version)] = PendingRetry(num_failed, time.monotonic() + delay, code, message)
            self._set_state(name, version, VersionState(LOADING))  # TF Serving stays in kLoading while it retries
            logger.error(
                "Loading model %s version %d failed (attempt %d of %d), retrying in %g s: %s",
                name, version, num_failed, self._options.max_num_load_retries + 1, delay, message,
            )
            self._schedule_retry(delay)
            return
        with self._lock:
            self._retries.pop((name, version), None)
        self._failed[name].add(version)
        self._set_state(name, version, VersionState(END, code, message))
        logger.error("Loading model %s version %d failed: %s", name, version, message)

    def _schedule_retry(self, delay: float) -> None:
        timer = threading.Timer(delay, self._run_due_retries)
        timer.daemon = True
        timer.name = "ema-serving-load-retry"
        self._retry_timers.add(timer)
        timer.start()

    def _run_due_retries(self) -> None:
        """Timer callback: one more attempt for every version whose retry is due (a sync of its model)."""
        with self._sync_lock:
            self._retry_timers = {timer for timer in self._retry_timers if timer.is_alive()}
            if self._closed:
                return
            now = time.monotonic()
            names = {name for (name, _), retry in self._retries.items() if retry.due <= now}
            for name in sorted(names):
                if name in self._configs:
                    try:
                        self._sync_model(name)
                    except Exception:  # a retry that breaks is logged; the server keeps serving
                        logger.exception("Retrying the load of model %s failed", name)

    def _unload(self, name: str, version: int) -> None:
        self._set_state(name, version, VersionState(UNLOADING))
        remaining = {v: servable for v, servable in self._serving.get(name, {}).items() if v != version}
        self._serving = {**self._serving, name: remaining}
        self._set_state(name, version, VersionState(END))
        logger.info("Unloaded model %s version %d", name, version)

    def _unload_model(self, name: str) -> None:
        self._cancel_retries(name, set())
        for version in sorted(self._serving.get(name, {})):
            self._unload(name, version)
        self._serving = {key: value for key, value in self._serving.items() if key != name}

    def _set_state(self, name: str, version: int, state: VersionState) -> None:
        with self._lock:
            self._states.setdefault(name, {})[version] = state
        for listener in self._listeners:
            listener(name, version, state)
