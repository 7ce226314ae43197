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


def write_savedmodel(assembly: Assembly, directory: Path) -> None:
    """Save the export root with its signatures into `directory` (which exists and is empty).

    `serving_default` is not saved as a third function: TensorFlow would wrap the same concrete function again, and
    every loader, TF Serving included, would instantiate and warm up that copy separately. Instead its SignatureDef
    (what TF Serving reads) and its entry in the object graph's signature map (what `tf.saved_model.load` reads) are
    made to name exactly what the default arm's do.
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
    """Rewrite `fingerprint.pb` (a checksum of saved_model.pb, among others) after editing saved_model.pb."""
    fingerprint = directory / "fingerprint.pb"
    if not fingerprint.exists():
        return
    try:
        from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
    except ImportError:  # pragma: no cover - a TensorFlow without fingerprints: nothing to refresh
        return
    fingerprint.write_bytes(fingerprinting.CreateFingerprintDef(str(directory)))


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
