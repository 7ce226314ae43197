"""Test-wide settings: quiet TensorFlow, and make the shared tiny models importable (pyproject sets pythonpath)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
