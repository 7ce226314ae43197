"""A small SavedModel written with TensorFlow's own TF1 builder, for what ema-export never writes.

Its signatures: ``serving_default`` (y = x * scale, with ``scale`` defaulting to 3 in the SignatureDef's
``defaults``), ``custom_method`` (a method name that is not a serving one), ``narrow`` (an int8 input widened to
int32) and ``classify_like`` (a classify signature: one string ``inputs``, a ``scores`` output).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from serving.server.servable import CLASSIFY_METHOD, PREDICT_METHOD

GRAPH_MODEL = "graph"
DEFAULT_SCALE = 3.0


def write_graph_model(path) -> None:
    """A TF1-style SavedModel: y = x * scale (scale defaults to 3 in the SignatureDef), int8 -> int32, a classifier."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        scale = tf.compat.v1.placeholder_with_default(tf.constant(1.0), [], name="scale")
        y = tf.multiply(x, scale, name="y")
        small = tf.compat.v1.placeholder(tf.int8, [None], name="small")
        widened = tf.cast(small, tf.int32, name="widened")
        text = tf.compat.v1.placeholder(tf.string, [None], name="text")
        scores = tf.cast(tf.strings.length(text), tf.float32, name="scores")
        build = tf.compat.v1.saved_model.signature_def_utils.build_signature_def
        info = tf.compat.v1.saved_model.utils.build_tensor_info
        scaled = build({"x": info(x), "scale": info(scale)}, {"y": info(y)}, PREDICT_METHOD)
        scaled.defaults["scale"].CopyFrom(tf.make_tensor_proto(np.float32(DEFAULT_SCALE)))
        signatures = {
            "serving_default": scaled,
            "custom_method": build({"x": info(x)}, {"y": info(y)}, "custom/method"),
            "narrow": build({"small": info(small)}, {"widened": info(widened)}, PREDICT_METHOD),
            "classify_like": build({"inputs": info(text)}, {"scores": info(scores)}, CLASSIFY_METHOD),
        }
    with tf.compat.v1.Session(graph=graph) as session:
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()
