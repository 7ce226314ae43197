"""Names other people rely on, defined once.

Signature names, the manifest location and the warmup file are contracts between the exporter, the local server,
the client and TF Serving itself. Import them from here; never spell them again. This module imports nothing heavy so
that the TensorFlow-free client can use it.
"""

SIGNATURE_LIVE = "serve_live"
"""Signature that computes with the raw (live) training weights."""

SIGNATURE_EMA = "serve_ema"
"""Signature that computes with the exponential-moving-average (shadow) weights."""

SIGNATURE_DEFAULT = "serving_default"
"""TF Serving's default signature key; an alias of one of the two arms (EMA unless told otherwise)."""

ARM_SIGNATURES = (SIGNATURE_LIVE, SIGNATURE_EMA)
"""The two arms of an A/B comparison, in a fixed order."""

ASSETS_EXTRA_DIR = "assets.extra"
"""Folder of a SavedModel version that TF Serving reads warmup data from and otherwise leaves alone."""

MANIFEST_FILENAME = "ema_export.json"
"""JSON manifest of an export, written to ``<version>/assets.extra/``."""

WARMUP_FILENAME = "tf_serving_warmup_requests"
"""TF Serving's warmup file: a TFRecord of PredictionLog records, at most 1000."""

EMA_CHECKPOINT_SUBDIR = "ema"
"""Where the EMA checkpoint lives inside a training checkpoint directory, by convention."""

TEMP_VERSION_PREFIX = "temp-ema-export-"
"""Prefix of the non-numeric directory an export is written under before it is renamed to its version number."""

DEFAULT_GRPC_PORT = 8500
"""TF Serving's default gRPC port."""

DEFAULT_REST_PORT = 8501
"""The REST port TF Serving's Docker image uses (the binary's own default is 0, off)."""

DEFAULT_MODEL_NAME = "model"
"""Model name used when none is given (TF Serving's Docker image uses the same)."""
