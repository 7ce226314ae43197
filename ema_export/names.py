"""Names other people rely on: kept so that `from ema_export.names import ...` keeps working.

They are defined once, in `ema_export.contracts` (with the other contracts both packages share); import them from
there in new code. Like the contracts, this module does not import TensorFlow.
"""

from ema_export.contracts import (
    ARM_SIGNATURES,
    ASSETS_EXTRA_DIR,
    DEFAULT_GRPC_PORT,
    DEFAULT_MODEL_NAME,
    DEFAULT_REST_PORT,
    EMA_CHECKPOINT_SUBDIR,
    MANIFEST_FILENAME,
    SIGNATURE_DEFAULT,
    SIGNATURE_EMA,
    SIGNATURE_LIVE,
    TEMP_VERSION_PREFIX,
    WARMUP_FILENAME,
)

__all__ = [
    "ARM_SIGNATURES",
    "ASSETS_EXTRA_DIR",
    "DEFAULT_GRPC_PORT",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_REST_PORT",
    "EMA_CHECKPOINT_SUBDIR",
    "MANIFEST_FILENAME",
    "SIGNATURE_DEFAULT",
    "SIGNATURE_EMA",
    "SIGNATURE_LIVE",
    "TEMP_VERSION_PREFIX",
    "WARMUP_FILENAME",
]
