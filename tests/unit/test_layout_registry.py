"""The layouts are named once: the TensorFlow-free registry, the classes it imports, and `--help` agree."""

import subprocess
import sys

from ema_export.layout_registry import LAYOUT_NAMES


def test_the_registry_imports_without_tensorflow():
    code = "import sys, ema_export.layout_registry; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_registered_layout_is_imported_under_its_own_name_in_detection_order():
    from ema_export.layouts import LAYOUTS

    assert tuple(LAYOUTS) == LAYOUT_NAMES
    assert all(LAYOUTS[name].name == name for name in LAYOUT_NAMES)
