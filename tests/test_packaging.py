"""The wheel a user installs carries the license, the family rules and both sides of the tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_license_rules_and_every_package(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools builds in the source tree: not in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "output", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("ckpt_rtn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    license_file = next(name for name in names if name.endswith(".dist-info/LICENSE"))
    text = zipfile.ZipFile(wheel).read(license_file).decode()
    assert "Apache License" in text and "Version 2.0" in text
    assert text == (ROOT / "LICENSE").read_text()
    assert "ckpt_rtn/configs/llama2.yaml" in names
    for module in ("runtime/measure.py", "runtime/deploy.py", "tasks/squad.py", "results.py"):
        assert f"ckpt_rtn/{module}" in names
