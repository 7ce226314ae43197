"""Test-wide settings: quiet TensorFlow, and the shared fixtures of ``tests/support`` registered once, here.

``support`` is importable because pyproject's pytest ``pythonpath`` is ``tests``. As plugins, its fixture modules are
imported before any test module (so pytest rewrites their asserts) and their session fixtures run once per run.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = ["support.served", "support.fake_server", "support.exporting"]
