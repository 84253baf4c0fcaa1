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


def test_an_address_nothing_answers_at_is_refused_at_once(source, tmp_path: Path) -> None:  # noqa: F811
    """ray.init retries such an address for minutes, printing warnings; a port nothing
    listens on is refused in one line instead."""
    src, _ = source
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckpt_rtn", "convert", str(src),
                           str(tmp_path / "out"), "--ray", "127.0.0.1:1", *LLAMA2],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: --ray 127.0.0.1:1: cannot connect: nothing "
                                        "answers at 127.0.0.1:1 (Connection refused)"]
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "out").exists()


def test_the_stop_signals_handlers_outlive_ray_init() -> None:
    """ray.init sets its own SIGTERM handler in the driver (a stack dump, exit 15, lock files
    left): the command's handlers must be back once it returns. A stand-in for ray.init
    changes them as Ray does; the real one is too slow to start here."""
    script = """
import signal, ray
from ckpt_rtn import ray_parts
def ours(signum, frame): pass
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, ours)
def init(**kwargs):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
ray.init = init
ray_parts._start("local")
print(all(signal.getsignal(s) is ours for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout == "True\n", done.stderr
