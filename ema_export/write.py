"""Stage 6, write: the SavedModel and its TF Serving warmup records, into the staging directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.contracts import (ARM_SIGNATURES, ASSETS_EXTRA_DIR, DEFAULT_ARMS, DEFAULT_MODEL_NAME,
                                  SIGNATURE_DEFAULT, WARMUP_FILENAME)
from ema_export.private_apis import fresh_fingerprint

FINGERPRINT_FILENAME = "fingerprint.pb"
"""Where `tf.saved_model.save` writes the fingerprint (TensorFlow exports no constant for the name)."""


def write_savedmodel(assembly: Assembly, directory: Path) -> None:
    """Save the export root with its signatures into `directory` (which exists and is empty).

    `serving_default` is not saved as a third function, the way Keras's export passes the same concrete function
    twice (keras/src/export/saved_model_export_archive.py:271-284 at 3422977a5e38): TensorFlow's
    `signature_serialization.canonicalize_signatures` wraps each signature key in a `signature_wrapper` function of
    its own, so that signature gets its own call node and input placeholders (`serving_default_<input>:0`). TF Serving
    would then build a separate executor for it on its first request, which the warmup records (one per arm) do not
    reach. Instead its SignatureDef (what TF Serving reads) and its entry in the object graph's signature map (what
    `tf.saved_model.load` reads) are made to name exactly what the default arm's do. README's "serving_default is an
    exact alias" has the measured cost of the other way.
    """
    default_arm = DEFAULT_ARMS[assembly.default_arm]
    arms = {name: function for name, function in assembly.signatures.items() if name != SIGNATURE_DEFAULT}
    tf.saved_model.save(assembly.root, str(directory), signatures=arms)
    alias_signature(directory, SIGNATURE_DEFAULT, default_arm)


def alias_signature(directory: Path, alias: str, target: str) -> None:
    """Make signature `alias` of the SavedModel in `directory` an exact alias of signature `target`."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = directory / tf.saved_model.SAVED_MODEL_FILENAME_PB
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    meta_graph = saved_model.meta_graphs[0]
    meta_graph.signature_def[alias].CopyFrom(meta_graph.signature_def[target])
    for node in meta_graph.object_graph_def.nodes:
        if node.WhichOneof("kind") == "user_object" and node.user_object.identifier == "signature_map":
            target_id = next(child.node_id for child in node.children if child.local_name == target)
            node.children.add(local_name=alias, node_id=target_id)
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
