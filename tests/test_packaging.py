"""The wheel a user installs (not the editable checkout) carries every module and data file of both packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ema_export-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        path.relative_to(ROOT).as_posix()
        for package in ("ema_export", "serving")
        for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix in {".py", ".config", ".typed"} and "__pycache__" not in path.parts
    }
    assert expected - packed == set(), "left out of the wheel: configure [tool.setuptools.packages.find]"
    assert "serving/server/app.py" in expected and "ema_export/layouts/base.py" in expected
