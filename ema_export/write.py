"""Stage 6, write: the SavedModel and its TF Serving warmup records, into the staging directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.contracts import (ARM_SIGNATURES, ASSETS_EXTRA_DIR, DEFAULT_ARMS, DEFAULT_MODEL_NAME,
                                  SIGNATURE_DEFAULT, WARMUP_FILENAME)
from ema_export import bundle
from ema_export.memory import tensor_bytes, usable_cpus
from ema_export.private_apis import PrivateApiError, SavedModelInParts, SavedTensor, fresh_fingerprint

FINGERPRINT_FILENAME = "fingerprint.pb"
"""Where `tf.saved_model.save` writes the fingerprint (TensorFlow exports no constant for the name)."""


PARALLEL_WRITE_MIN_BYTES = 256 * 2**20
"""Below this many bytes of variables, the export writes them as `tf.saved_model.save` does: one shard, by TensorFlow's
saver (the same files, and a write that takes well under a second)."""

MAX_WRITERS = 4


def writers_for(variable_bytes: Sequence[int], cpus: int | None = None) -> int:
    """How many threads should write the variables at once: one per usable CPU (at most `MAX_WRITERS`) for a model
    with `PARALLEL_WRITE_MIN_BYTES` of variables or more, else 0 (TensorFlow's saver writes them).

    Writing is copying into the page cache; on this project's 2-core machine two writers write 2 GiB in 0.27-0.45 s
    where one takes about 0.5 s (README, "Benchmarks").
    """
    if sum(variable_bytes) < PARALLEL_WRITE_MIN_BYTES:
        return 0
    cpus = cpus if cpus is not None else usable_cpus()
    return max(1, min(MAX_WRITERS, cpus))


def balanced(tensors: Sequence[SavedTensor], count: int) -> list[list[SavedTensor]]:
    """Split tensors into at most `count` shards of about equal bytes, none empty: largest first, each into the
    lightest shard, each shard in the order its tensors were added."""
    shards: list[list[SavedTensor]] = [[] for _ in range(count)]
    loads = [0] * count
    sized = [(tensor_bytes(item.tensor.shape, item.tensor.dtype), item) for item in tensors]
    for size, item in sorted(sized, key=lambda pair: pair[0], reverse=True):
        lightest = loads.index(min(loads))
        shards[lightest].append(item)
        loads[lightest] += size
    return [shard for shard in shards if shard]


def write_in_shards(prefix: str, tensors: Sequence[SavedTensor], writers: int) -> None:
    """Write `tensors` as the checkpoint `prefix` in shards, `writers` of them at once, as TensorFlow's sharded save
    does (tensorflow/python/checkpoint/functional_saver.py, `MultiDeviceSaver.save`, at 2.21): each shard a bundle
    `PREFIX_temp/part-0000i-of-0000n`, then TensorFlow's `MergeV2Checkpoints` renames their data files to
    `PREFIX.data-0000i-of-0000n`, writes the one index `PREFIX.index` and removes `PREFIX_temp`.

    Tensors of numbers are written by `bundle.write_bundle` (the same bytes as `SaveV2`, in small writes), balanced
    over `writers` threads; the rest (the object graph, a string; slices; strings and variants of the model) by
    TensorFlow's `SaveV2` in one more shard, meanwhile. So `n` is one more than the writers.
    """
    ours = [item for item in tensors if bundle.writable(item.tensor.dtype, item.slice_spec)]
    theirs = [item for item in tensors if not bundle.writable(item.tensor.dtype, item.slice_spec)]
    shards: list[list[SavedTensor]] = balanced(ours, writers)
    count = len(shards) + (1 if theirs else 0)
    prefixes = [f"{prefix}_temp/part-{index:05d}-of-{count:05d}" for index in range(count)]
    with ThreadPoolExecutor(max_workers=max(1, len(shards)), thread_name_prefix="ema-export-write") as pool:
        written = [pool.submit(bundle.write_bundle, shard_prefix, [(item.key, item.tensor) for item in shard])
                   for shard_prefix, shard in zip(prefixes, shards)]
        if theirs:
            tf.raw_ops.SaveV2(prefix=prefixes[-1], tensor_names=[item.key for item in theirs],
                              shape_and_slices=[item.slice_spec for item in theirs],
                              tensors=[item.tensor for item in theirs])
        for shard_written in written:
            shard_written.result()
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=prefixes, destination_prefix=prefix, delete_old_dirs=True)


def write_savedmodel(assembly: Assembly, directory: Path, graph_written: Callable[[], None] = lambda: None,
                     writers: int | None = None) -> None:
    """Save the export root with its signatures into `directory` (which exists and is empty).

    The files are those `tf.saved_model.save(root, directory, signatures)` writes, in another order:
    `saved_model.pb` first (with `serving_default` aliased, below), then `graph_written()` is called, so verification
    can import the graph and build its executors while the variables are written, then the variables and
    `fingerprint.pb`. Large variables are written by several threads at once (`writers_for`, `write_in_shards`), as
    shards of one checkpoint (`variables.data-0000i-of-0000n`), which TF Serving and `tf.saved_model.load` read like
    one; `writers` overrides that choice (0: TensorFlow's saver, one shard). The object graph gets a small shard of
    its own, so `n` is one more than the writers.

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
    count = writers_for(assembly.variable_bytes) if writers is None else writers
    parts.write_variables(directory, (lambda prefix, tensors: write_in_shards(prefix, tensors, count))
                          if count > 0 else None)


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
