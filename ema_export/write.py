"""Stage 6, write: the SavedModel and its TF Serving warmup records, into the staging directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.contracts import (ARM_SIGNATURES, ASSETS_EXTRA_DIR, DEFAULT_ARMS, DEFAULT_MODEL_NAME,
                                  SIGNATURE_DEFAULT, WARMUP_FILENAME)
from ema_export.memory import large_enough, tensor_bytes, usable_cpus
from ema_export.private_apis import PrivateApiError, SavedModelInParts, fresh_fingerprint

FINGERPRINT_FILENAME = "fingerprint.pb"
"""Where `tf.saved_model.save` writes the fingerprint (TensorFlow exports no constant for the name)."""


PARALLEL_WRITE_MIN_BYTES = 256 * 2**20
"""Below this many bytes of variables, the export writes them as `tf.saved_model.save` does: one shard, eagerly."""

PARALLEL_WRITE_MIN_MEAN_BYTES = 4 * 2**20
"""Nor when the variables average less than this: the traced save costs about 0.7 ms more per variable than the eager
one (ResNet50's 1068 saved tensors: 1.25 s against 0.5 s), more than writing 200 MB at once saves."""

MAX_WRITERS = 4


def writers_for(variable_bytes: Sequence[int], cpus: int | None = None) -> int:
    """How many `SaveV2` ops should write the variables at once: one per usable CPU (at most `MAX_WRITERS`) for a
    model whose variables are large and few enough, else one.

    Writing is copying into the page cache; on this project's 2-core machine two writers halve the time of writing
    1.5 GB (README, "Benchmarks").
    """
    if not large_enough(list(variable_bytes), PARALLEL_WRITE_MIN_BYTES, PARALLEL_WRITE_MIN_MEAN_BYTES):
        return 1
    cpus = cpus if cpus is not None else usable_cpus()
    return max(1, min(MAX_WRITERS, cpus))


class BalancedShards(tf.train.experimental.ShardingCallback):
    """Split a checkpoint's tensors into `count` shards of about equal bytes: largest first, each into the lightest."""

    def __init__(self, count: int) -> None:
        self.count = count

    @property
    def description(self) -> str:
        return f"{self.count} shards of about equal bytes"

    def __call__(self, shardable_tensors: Sequence[Any]) -> list[dict[str, dict[str, tf.Tensor]]]:
        def size(item: Any) -> int:
            return tensor_bytes(item.tensor.shape, item.dtype)

        shards: list[dict[str, dict[str, tf.Tensor]]] = [{} for _ in range(self.count)]
        loads = [0] * self.count
        for item in sorted(shardable_tensors, key=size, reverse=True):
            lightest = loads.index(min(loads))
            shards[lightest].setdefault(item.checkpoint_key, {})[item.slice_spec] = item.tensor
            loads[lightest] += size(item)
        return [shard for shard in shards if shard]


def write_savedmodel(assembly: Assembly, directory: Path, graph_written: Callable[[], None] = lambda: None,
                     writers: int | None = None) -> None:
    """Save the export root with its signatures into `directory` (which exists and is empty).

    The files are those `tf.saved_model.save(root, directory, signatures)` writes, in another order:
    `saved_model.pb` first (with `serving_default` aliased, below), then `graph_written()` is called, so verification
    can import the graph and build its executors while the variables are written, then the variables and
    `fingerprint.pb`. Large variables are written by several `SaveV2` ops at once (`writers_for`), as shards of one
    checkpoint (`variables.data-0000i-of-0000n`), which TF Serving and `tf.saved_model.load` read like one; `writers`
    overrides that choice. The object graph, which TensorFlow places apart from the variables inside a function,
    gets a small shard of its own, so `n` is one more than the writers.

    `serving_default` is not saved as a third function, the way Keras's export passes the same concrete function
    twice (keras/src/export/saved_model_export_archive.py:271-284 at 3422977a5e38): TensorFlow's
    `signature_serialization.canonicalize_signatures` wraps each signature key in a `signature_wrapper` function of
    its own, so that signature gets its own call node and input placeholders (`serving_default_<input>:0`). TF Serving
    would then build a separate executor for it on its first request, which the warmup records (one per arm) do not
    reach. Instead its SignatureDef (what TF Serving reads) and its entry in the object graph's signature map (what
    `tf.saved_model.load` reads) are made to name exactly what the default arm's do. README's "serving_default is an
    exact alias" has the measured cost of the other way.
    """
    try:
        parts = SavedModelInParts(assembly.root, _arms(assembly))
    except PrivateApiError:  # a TensorFlow release that moved save's internals: the same files, in one call
        write_savedmodel_whole(assembly, directory)
        graph_written()
        return
    alias_in(parts.saved_model.meta_graphs[0], SIGNATURE_DEFAULT, DEFAULT_ARMS[assembly.default_arm])
    parts.write_graph(directory)
    graph_written()
    writers = writers or writers_for(assembly.variable_bytes)
    parts.write_variables(directory, BalancedShards(writers) if writers > 1 else None)


def write_savedmodel_whole(assembly: Assembly, directory: Path) -> None:
    """`write_savedmodel` through `tf.saved_model.save` alone: the same files, the variables in one shard, written
    before `saved_model.pb`, which is then edited for the alias (and `fingerprint.pb` recomputed)."""
    tf.saved_model.save(assembly.root, str(directory), signatures=_arms(assembly))
    alias_signature(directory, SIGNATURE_DEFAULT, DEFAULT_ARMS[assembly.default_arm])


def _arms(assembly: Assembly) -> dict[str, Any]:
    """The signatures saved as functions: every one but `serving_default`, which is aliased to its arm after."""
    return {name: function for name, function in assembly.signatures.items() if name != SIGNATURE_DEFAULT}


def alias_in(meta_graph: Any, alias: str, target: str) -> None:
    """Make signature `alias` of `meta_graph` (a MetaGraphDef) an exact alias of signature `target`."""
    meta_graph.signature_def[alias].CopyFrom(meta_graph.signature_def[target])
    for node in meta_graph.object_graph_def.nodes:
        if node.WhichOneof("kind") == "user_object" and node.user_object.identifier == "signature_map":
            target_id = next(child.node_id for child in node.children if child.local_name == target)
            node.children.add(local_name=alias, node_id=target_id)


def alias_signature(directory: Path, alias: str, target: str) -> None:
    """Make signature `alias` of the SavedModel in `directory` an exact alias of signature `target`, in place."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = directory / tf.saved_model.SAVED_MODEL_FILENAME_PB
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    alias_in(saved_model.meta_graphs[0], alias, target)
    path.write_bytes(saved_model.SerializeToString(deterministic=True))
    _refresh_fingerprint(directory)


def _refresh_fingerprint(directory: Path) -> None:
    """Rewrite `fingerprint.pb` (checksums of saved_model.pb among others) after saved_model.pb was edited.

    Only a private TensorFlow function computes it (`private_apis.fresh_fingerprint`). When that function is gone,
    the export fails with `PrivateApiError` (the staging directory is removed, nothing is published) rather than
    publishing the fingerprint of the unedited file: a stale fingerprint names a different saved_model.pb, and tools
    that treat equal fingerprints as the same model (caches, registries, TensorFlow's load metrics) would be silently
    wrong, whereas a missing module is caught at once by `tests/unit/test_private_apis.py` when pyproject's TensorFlow
    bound is raised. Deleting the file instead would also be honest, but would change what the export contains with
    the installed release. Where TensorFlow wrote no fingerprint (its `saved_model_fingerprinting` flag is off),
    there is nothing to refresh.
    """
    fingerprint = directory / FINGERPRINT_FILENAME
    if fingerprint.exists():
        fingerprint.write_bytes(fresh_fingerprint(directory))


def write_warmup(assembly: Assembly, directory: Path, probe: Sequence[Any]) -> Path:
    """Write one Predict warmup record per arm, so TF Serving runs both signatures before taking traffic.

    The records are PredictionLog protos in a TFRecord file (TF Serving's format); model name and version in them are
    ignored by the server, which replays them against the version being loaded.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = directory / ASSETS_EXTRA_DIR / WARMUP_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for signature in ARM_SIGNATURES:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=DEFAULT_MODEL_NAME, signature_name=signature)
            )
            for spec, array in zip(assembly.input_signature, probe):
                request.inputs[spec.name].CopyFrom(tf.make_tensor_proto(array, dtype=spec.dtype))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path
