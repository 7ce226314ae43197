"""Stage 7, verify: reload what was written and check it reproduces the in-memory models, before publishing.

The SavedModel is loaded the way TF Serving loads it (the session-based loader: import the MetaGraph, run the
restore op, then feed and fetch the tensors each SignatureDef names), not through `tf.saved_model.load`, which can
run models TF Serving cannot. Every signature runs on a probe batch; each output is compared with the in-memory function of its arm and the
largest difference is reported beside the tolerance. All signatures must take and return the same names and dtypes,
so a client can switch arms by signature name alone. Every failure is collected, then raised once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.contracts import DEFAULT_ARMS, SIGNATURE_DEFAULT, SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.errors import VerificationError
from ema_export.private_apis import session_callable, tf1_loader

SIGNATURES = (SIGNATURE_LIVE, SIGNATURE_EMA, SIGNATURE_DEFAULT)


@dataclass(frozen=True)
class OutputCheck:
    """One output of one signature compared with the in-memory model."""

    signature: str
    output: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class VerificationReport:
    """Results of reloading the SavedModel and running every signature."""

    batch_size: int
    checks: list[OutputCheck]
    arms_differ: bool
    max_arm_difference: float
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(check.passed for check in self.checks)


def tolerance_for(dtype: tf.DType, expected: np.ndarray) -> float:
    """How far a reloaded graph may drift from the in-memory one (graph rewrites reorder float arithmetic)."""
    if not dtype.is_floating:
        return 0.0
    relative = 1e-2 if dtype in (tf.float16, tf.bfloat16) else 1e-5
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return relative * max(1.0, scale)


def max_abs_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest elementwise |actual - expected|, in float64; for non-numeric outputs 0 when equal, else infinity."""
    if expected.size and expected.dtype.kind in "fiub":
        return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    return 0.0 if np.array_equal(actual, expected) else np.inf


def _signature_interface(signature: Any) -> tuple[dict[str, tuple], dict[str, tuple]]:
    def describe(infos: Any) -> dict[str, tuple]:
        return {name: (tf.dtypes.as_dtype(info.dtype).name, tuple(tf.TensorShape(info.tensor_shape).as_list()))
                for name, info in infos.items()}

    return describe(signature.inputs), describe(signature.outputs)


class TfServingLoad:
    """A SavedModel loaded the way TF Serving loads it, in steps that can start before the variables are written.

    TF Serving's loader (TensorFlow's cc/saved_model/loader.cc, `LoadSavedModelInternal`) imports the MetaGraph into
    a session, runs the saver's restore op on `variables/variables`, runs the init op, and then each request feeds and
    fetches the tensors its SignatureDef names; a session builds each run's executor (the pruned, Grappler-optimized
    graph) on that run's first call. Here the executors are built ahead: constructing this object imports the graph
    and builds the restore and init runs' executors (only `saved_model.pb` is read), `prepare_run` builds the one run
    of every signature (in a worker thread, if given a pool), `restore` runs the restore and init ops, `run` the
    signatures. The graphs are the ones TF Serving builds; only when they are built differs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # A default ConfigProto, not the caller's global one: graph optimization (Grappler) on, as TF Serving runs it,
        # so the optimized graph is the one whose answers are checked.
        self.session = tf.compat.v1.Session(graph=tf.Graph(), config=tf.compat.v1.ConfigProto())
        self._restored = False
        self._run: Any = None
        self._run_ready: Future[Any] | None = None
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")  # the v1 loader announces its own deprecation on every call
        try:
            loader = tf1_loader()
            saved_model = loader.SavedModelLoader(str(directory))
            saver, _ = saved_model.load_graph(self.session.graph, [tf.saved_model.SERVING])
            meta_graph = saved_model.get_meta_graph_def_from_tags([tf.saved_model.SERVING])
            self.signatures = {name: meta_graph.signature_def.get(name) for name in SIGNATURES}
            self._restore = None if saver is None else session_callable(
                self.session, [meta_graph.saver_def.filename_tensor_name], [], [meta_graph.saver_def.restore_op_name])
            with self.session.graph.as_default():
                init_op = loader.get_init_op(meta_graph)
                assets = loader.get_asset_tensors(str(directory), meta_graph)
            self._init = None if init_op is None else session_callable(self.session, list(assets), [], [init_op.name])
            self._asset_paths = [np.array(tf.compat.as_bytes(path)) for path in assets.values()]
        except BaseException:
            self.session.close()
            raise
        finally:
            logger.setLevel(level)

    def prepare_run(self, pool: Executor | None = None) -> None:
        """Build the executor of one run of every signature, now or (given `pool`) in a worker thread."""
        if pool is not None:
            self._run_ready = pool.submit(self.prepare_run)
            return
        self._feeds: dict[str, str] = {}  # tensor name -> input key
        self._fetches: list[tuple[str, str]] = []  # (signature, output key), in fetch order
        fetch_names = []
        for name, signature in self.signatures.items():
            if signature is not None:
                self._feeds.update({info.name: key for key, info in signature.inputs.items()})
                for key, info in signature.outputs.items():
                    self._fetches.append((name, key))
                    fetch_names.append(info.name)
        # One run for all signatures: graph optimization of a large model dominates, and is paid once.
        self._run = session_callable(self.session, list(self._feeds), fetch_names, [])

    def restore(self) -> None:
        """Run the restore op on `variables/variables`, then the init op with the assets' paths (TF Serving's order).

        Called while the signatures' executor is still being built, it waits for that build: a session's runs and
        builds take one lock (`DirectSession::CheckGraphCreated` and `CreateGraphs`, direct_session.h and .cc).
        """
        prefix = self.directory / tf.saved_model.VARIABLES_DIRECTORY / tf.saved_model.VARIABLES_FILENAME
        if self._restore is not None:
            self._restore(np.array(os.fsencode(prefix)))
        if self._init is not None:
            self._init(*self._asset_paths)
        self._restored = True

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run every signature on `feed` (input key -> array), restoring and preparing first where not yet done.

        Returns:
            signature name -> (SignatureDef, {output name: array}); a missing signature maps to None.
        """
        if not self._restored:
            self.restore()
        if self._run_ready is not None:
            self._run_ready.result()
        if self._run is None:
            self.prepare_run()
        values = self._run(*(feed[key] for key in self._feeds.values()))
        outputs: dict[str, dict[str, Any]] = {}
        for (name, key), value in zip(self._fetches, values):
            outputs.setdefault(name, {})[key] = value
        return {name: None if signature is None else (signature, outputs.get(name, {}))
                for name, signature in self.signatures.items()}

    def close(self) -> None:
        """Close the session, once a run's executor being built in a worker thread is done."""
        if self._run_ready is not None:
            self._run_ready.exception()
        self.session.close()

    def __enter__(self) -> TfServingLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Reference:
    """What the in-memory models answer on the probe batch: everything verification needs from them.

    Computing it before verification lets the export release the in-memory models first, so the written copy is
    never loaded while they still hold memory.
    """

    input_names: tuple[str, ...]
    probe: tuple[np.ndarray, ...]
    outputs: dict[str, dict[str, np.ndarray]]


def reference_outputs(assembly: Assembly, probe: Sequence[np.ndarray]) -> Reference:
    """Run the in-memory live and EMA functions on the probe batch; `serving_default` expects its arm's answer."""
    outputs = {arm: {k: v.numpy() for k, v in assembly.functions[arm](*map(tf.constant, probe)).items()}
               for arm in (SIGNATURE_LIVE, SIGNATURE_EMA)}
    outputs[SIGNATURE_DEFAULT] = outputs[DEFAULT_ARMS[assembly.default_arm]]
    return Reference(tuple(spec.name for spec in assembly.input_signature), tuple(probe), outputs)


def verify(load: TfServingLoad, reference: Reference) -> VerificationReport:
    """Finish loading the SavedModel as TF Serving would (`load`, whose graph half may be done already) and check
    every signature against the in-memory reference.

    Raises:
        VerificationError: A signature is missing, the signatures disagree on inputs or outputs, the batch dimension
            is not dynamic, or an output differs from the in-memory model beyond its tolerance.
    """
    names = list(reference.input_names)
    probe = reference.probe
    expected = reference.outputs
    served = load.run(dict(zip(names, probe)))

    problems: list[str] = []
    checks: list[OutputCheck] = []
    interfaces = {}
    for signature in SIGNATURES:
        if served[signature] is None:
            problems.append(f"signature {signature!r} is missing")
            continue
        signature_def, got = served[signature]
        interfaces[signature] = _signature_interface(signature_def)
        for name, (_, shape) in interfaces[signature][0].items():
            if not shape or shape[0] is not None:
                problems.append(f"{signature} input {name!r} has shape {list(shape)}; the batch dimension must be None")
        if sorted(interfaces[signature][0]) != sorted(names):
            problems.append(f"{signature} takes inputs {sorted(interfaces[signature][0])}, expected {sorted(names)}")
        for output, value in expected[signature].items():
            if output not in got:
                problems.append(f"{signature} has no output {output!r}")
                continue
            actual = np.asarray(got[output])
            if actual.shape != value.shape:
                problems.append(f"{signature} output {output!r} has shape {actual.shape}, expected {value.shape}")
                continue
            checks.append(OutputCheck(signature, output, max_abs_difference(actual, value),
                                      tolerance_for(tf.dtypes.as_dtype(actual.dtype), value)))
    if len(set(map(repr, interfaces.values()))) > 1:
        problems.append("signatures differ in input or output names, dtypes or shapes: "
                        + "; ".join(f"{k}: {v}" for k, v in interfaces.items()))
    arm_difference = max(
        (max_abs_difference(expected[SIGNATURE_LIVE][k], v) for k, v in expected[SIGNATURE_EMA].items()
         if v.size and v.dtype.kind in "fiub"),
        default=0.0,
    )
    report = VerificationReport(len(probe[0]) if len(probe) else 0, checks, arm_difference > 0, arm_difference,
                                problems)
    failed = [f"{c.signature}/{c.output}: max |diff| {c.max_abs_diff:.3g} > tolerance {c.tolerance:.3g}"
              for c in checks if not c.passed]
    if problems or failed:
        raise VerificationError(
            "The written SavedModel does not reproduce the in-memory models; nothing was published:",
            hint="This is a bug or an unsupported model: run again with --verbose and report the output",
            problems=problems + failed,
        )
    return report
