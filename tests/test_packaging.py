"""The package builds as a plain wheel (what Colab's install cell does) without deprecation warnings, and
the wheel holds every module of the package."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("setuptools")
    # -v: pip shows the build backend's own output (its deprecation warnings) only when verbose
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-v",
           "-w", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "deprecat" not in log.lower(), log[-3000:]
    wheel = next(tmp_path.glob("minipeft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for ext in ("py", "json") for p in (ROOT / "minipeft").rglob(f"*.{ext}")}
    assert modules <= names, sorted(modules - names)
