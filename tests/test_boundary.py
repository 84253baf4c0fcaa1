"""The line between the converter and the MindSpore side holds: only ckpt_rtn.runtime
imports MindSpore or MindFormers, and converting never loads them."""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import ckpt_rtn

PACKAGE = Path(ckpt_rtn.__file__).parent
FRAMEWORK_IMPORT = re.compile(r"^\s*(from|import)\s+(mindspore|mindformers)\b", re.M)


def _modules_outside_runtime() -> list:
    return sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE)], "ckpt_rtn.")
                  if not info.name.startswith("ckpt_rtn.runtime"))


def test_only_the_runtime_package_names_the_frameworks():
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if "runtime" not in path.relative_to(PACKAGE).parts
                 and FRAMEWORK_IMPORT.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert FRAMEWORK_IMPORT.search((PACKAGE / "runtime" / "deploy.py").read_text())


def test_importing_everything_outside_runtime_and_converting_loads_no_framework(tmp_path):
    modules = _modules_outside_runtime()
    assert "ckpt_rtn.converter" in modules and "ckpt_rtn.tasks.squad" in modules
    script = f"""
import importlib, sys
import numpy as np
from click.testing import CliRunner
from safetensors.numpy import save_file
for name in {modules!r}:
    importlib.import_module(name)
from ckpt_rtn.cli import main
src = {str(tmp_path / "in.safetensors")!r}
save_file({{"model.layers.0.attention.wq.weight": np.ones((8, 8), np.float16)}}, src)
result = CliRunner().invoke(main, ["convert", src, {str(tmp_path / "out.safetensors")!r},
                                   "--config", "llama2", "-q"])
assert result.exit_code == 0, result.output
import os
os.mkdir({str(tmp_path / "dir")!r})
save_file({{"model.layers.0.attention.wq.weight": np.ones((8, 8), np.float16)}},
          {str(tmp_path / "dir" / "a.safetensors")!r})
for extra in ([], ["--part", "0/1"]):  # a directory, and a part of one: no Ray either
    result = CliRunner().invoke(main, ["convert", {str(tmp_path / "dir")!r},
                                       {str(tmp_path / "dir_out")!r}, "--config", "llama2",
                                       "-q", "--resume", *extra])
    assert result.exit_code == 0, result.output
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("mindspore", "mindformers", "ray"))
print(loaded)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


RAY_IMPORT = re.compile(r"^\s*(from|import)\s+ray\b", re.M)


def test_only_ray_parts_names_ray():
    """Ray is the optional `[ray]` extra: imported by ray_parts.py alone, under --ray."""
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name != "ray_parts.py" and RAY_IMPORT.search(path.read_text())]
    assert offenders == []
    assert RAY_IMPORT.search((PACKAGE / "ray_parts.py").read_text())
