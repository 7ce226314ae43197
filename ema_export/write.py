"""Stage 6, write: the SavedModel and its TF Serving warmup records, into the staging directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.assemble import Assembly
from ema_export.names import ARM_SIGNATURES, ASSETS_EXTRA_DIR, DEFAULT_MODEL_NAME, WARMUP_FILENAME


def write_savedmodel(assembly: Assembly, directory: Path) -> None:
    """Save the export root with its signatures into `directory` (which exists and is empty)."""
    tf.saved_model.save(assembly.root, str(directory), signatures=assembly.signatures)


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
