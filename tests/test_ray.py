"""`convert --ray local`: the parts as Ray tasks, then the merge, give one plain run's bytes,
also when a task's worker is killed and Ray re-runs it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_rtn.ray_parts import KILL_ONCE

from test_parts import LLAMA2, files, part_manifests, source  # noqa: F401 (a fixture)

# Not imported here: Ray's protobuf modules, once loaded, break MindSpore's (which the
# fixtures use) in the same process; the conversions run in their own processes.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'ckpt-rtn[ray]')")


def convert_on_ray(src: Path, dst: Path, **env: str) -> subprocess.CompletedProcess:
    """The command line in a fresh process: Ray starts (2 CPUs here) and stops with it."""
    return subprocess.run([sys.executable, "-m", "ckpt_rtn", "convert", str(src), str(dst),
                           "--ray", *LLAMA2], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})


def check_equal_to_one_run(reference: Path, dst: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr
    assert "converted 6 shards" in done.stdout and "skipped 0" in done.stdout, done.stdout
    assert files(dst) == files(reference)  # every file and the manifest, byte for byte
    assert part_manifests(dst) == []


def test_local_ray_equals_one_run(source, tmp_path: Path) -> None:  # noqa: F811
    src, reference = source
    started = time.perf_counter()
    done = convert_on_ray(src, tmp_path / "out")
    check_equal_to_one_run(reference, tmp_path / "out", done)
    assert time.perf_counter() - started < 120


def test_a_killed_worker_is_rerun_and_the_result_is_the_same(source,  # noqa: F811
                                                             tmp_path: Path) -> None:
    src, reference = source
    marker = tmp_path / "killed"
    done = convert_on_ray(src, tmp_path / "out", **{KILL_ONCE: str(marker)})
    assert marker.exists(), "no task was killed"
    check_equal_to_one_run(reference, tmp_path / "out", done)


def test_ray_refuses_what_it_cannot_do(source, tmp_path: Path) -> None:  # noqa: F811
    from conftest import cli
    src, _ = source
    for extra, reason in ((["--part", "0/2"], "drop --part"), (["--overwrite"], "drop --part"),
                          ([], "a directory of shards")):
        target = src / "rank_0" / "net.ckpt" if not extra else src
        result = cli("convert", target, tmp_path / "out", "--ray", *LLAMA2, *extra)
        assert result.exit_code == 2 and reason in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
