"""Faults around the conversion rather than in the input's bytes (issue #10).

Paths that overlap or are not regular files, OS errors, signals, dead runs'
leftovers, concurrent runs, the report's atomicity and a missing extra.
Each refusal keeps the contract of test_bad_input.py: one `error:` line,
exit 2, no output, no temporary file, inputs untouched. Runs that could hang
(a FIFO) or need signals run in a subprocess with a timeout. A run that must
be caught mid-write (signals, SIGKILL, a concurrent second run) is gated: its
third quantized weight waits for the test, so the moment is deterministic and
the input stays small. OS errors are injected by failing one os function for
one path in-process, or by RLIMIT_FSIZE in a subprocess (tests run as root, so
chmod would deny nothing).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import pytest

from ckpt_rtn import formats, paths
from ckpt_rtn.directory import MANIFEST
from ckpt_rtn.errors import OutputError
from ckpt_rtn.formats import atomic
from ckpt_rtn.formats.atomic import TEMP_PATTERN
from ckpt_rtn.paths import LOCK_NAME, LOCK_PATTERN

from conftest import cli
from test_bad_input import assert_refused, copy_of, temp_files, write_llama_ckpt

LLAMA2 = ("--config", "llama2")
#: Long enough for any of these runs on a loaded 2-core machine; a hang fails, not blocks.
TIMEOUT = 60

#: Runs the CLI; the third quantized weight signals READY and waits for GO (or 30 s), so a
#: test can act while the run holds its lock and a half-written temporary file.
GATED = """
import os, sys, time
from ckpt_rtn import schemes
real, calls = schemes.quantize_rtn, []
def gated(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        open(os.environ["TEST_READY"], "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.environ["TEST_GO"]) and time.monotonic() < deadline:
            time.sleep(0.005)
    return real(*args, **kwargs)
schemes.quantize_rtn = gated
"""
MAIN = "import sys; from ckpt_rtn.cli import main; sys.argv[0] = 'ckpt-rtn'; main()"


# --------------------------------------------------------------------------- helpers

def run_cli(*args: object, prelude: str = "", timeout: float = TIMEOUT) -> SimpleNamespace:
    """`ckpt-rtn ARGS` in a fresh interpreter, as a result `assert_refused` accepts."""
    proc = subprocess.run([sys.executable, "-c", prelude + "\n" + MAIN, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    return as_result(proc.returncode, proc.stdout, proc.stderr)


def as_result(code: int, stdout: str, stderr: str) -> SimpleNamespace:
    return SimpleNamespace(exit_code=code, stdout=stdout, stderr=stderr,
                           output=stdout + stderr, exception=None)


class Gated:
    """A `ckpt-rtn` subprocess stopped mid-write (see GATED) until `go()`."""

    def __init__(self, tmp_path: Path, *args: object) -> None:
        self.ready, self.gate = tmp_path / "ready", tmp_path / "go"
        env = {**os.environ, "TEST_READY": str(self.ready), "TEST_GO": str(self.gate)}
        self.proc = subprocess.Popen([sys.executable, "-c", GATED + MAIN, "convert", "-q",
                                      "--workers", "1", *LLAMA2, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        deadline = time.monotonic() + TIMEOUT
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the gated run never reached its third weight"
            time.sleep(0.005)

    def go(self) -> SimpleNamespace:
        self.gate.touch()
        return self.finish()

    def signal(self, signum: int) -> SimpleNamespace:
        self.proc.send_signal(signum)
        return self.finish()

    def finish(self) -> SimpleNamespace:
        stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
        return as_result(self.proc.returncode, stdout, stderr)


def leftovers(root: Path) -> List[Path]:
    """ckpt-rtn's temporary and lock files anywhere under `root`."""
    return sorted(p for p in root.rglob(".*")
                  if TEMP_PATTERN.fullmatch(p.name) or LOCK_PATTERN.fullmatch(p.name))


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_ckpt(tmp_path_factory.mktemp("llama") / "llama.ckpt")


@pytest.fixture(scope="module")
def reference(llama: Path) -> bytes:
    """The bytes `ckpt-rtn convert llama.ckpt out.ckpt` writes."""
    out = llama.parent / "reference.ckpt"
    assert cli("convert", "-q", llama, out).exit_code == 0
    return out.read_bytes()


@pytest.fixture
def src(tmp_path: Path, llama: Path) -> Path:
    return copy_of(llama, tmp_path / "in.ckpt")


def make_rank_dir(root: Path, llama: Path, ranks: int = 2) -> Path:
    for rank in range(ranks):
        (root / f"rank_{rank}").mkdir(parents=True)
        copy_of(llama, root / f"rank_{rank}" / "net.ckpt")
    return root


@pytest.fixture
def shards(tmp_path: Path, llama: Path) -> Path:
    return make_rank_dir(tmp_path / "src", llama)


def patch_os(monkeypatch: pytest.MonkeyPatch, name: str, fails: Callable[..., bool],
             code: int) -> None:
    """Make `os.<name>` fail with `code` where `fails(*args)` says so."""
    real = getattr(os, name)

    def fake(*args, **kwargs):
        if fails(*args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, fake)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --------------------------------------------------------------------------- 1. data loss

@pytest.mark.parametrize("case", ["input", "input_dot_slash", "input_hardlink", "input_symlink",
                                  "existing_output", "new_output", "output_lock_file"])
def test_report_onto_a_path_the_run_uses(tmp_path: Path, src: Path, monkeypatch, case: str):
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "out.ckpt"
    before = src.read_bytes()
    report = {"input": "in.ckpt", "input_dot_slash": "./in.ckpt", "input_hardlink": "hard.ckpt",
              "input_symlink": "link.json", "existing_output": "out.ckpt",
              "new_output": "out.ckpt", "output_lock_file": ".out.ckpt.ckpt-rtn.lock"}[case]
    if case == "input_hardlink":
        os.link(src, report)
    elif case == "input_symlink":
        os.symlink("in.ckpt", report)
    elif case == "existing_output":
        dst.write_bytes(b"earlier output")
    reason = {"existing_output": r"report is the output", "new_output": r"report is the output",
              "output_lock_file": r"report is the output's lock file"}.get(
        case, r"report is the input file")
    result = cli("convert", "--overwrite", "--report", report, "in.ckpt", "out.ckpt")
    assert_refused(result, report, reason, directory=tmp_path)
    assert src.read_bytes() == before
    assert dst.read_bytes() == b"earlier output" if case == "existing_output" else not dst.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_report_onto_a_file_that_is_not_json(tmp_path: Path, llama: Path,
                                             directory: bool) -> None:
    """A report path mistyped onto a checkpoint replaced it with the report."""
    src = make_rank_dir(tmp_path / "src", llama, ranks=1) if directory else llama
    victim = tmp_path / "victim.ckpt"
    victim.write_bytes(llama.read_bytes()[:4096])
    result = cli("convert", "--report", victim, src, tmp_path / ("out" if directory else "o.ckpt"))
    assert_refused(result, victim, r"exists and is not JSON: the report would replace it",
                   directory=tmp_path)
    assert victim.read_bytes() == llama.read_bytes()[:4096]
    (tmp_path / "earlier.json").write_text('{"earlier": 1}')  # an earlier report: replaced
    again = cli("convert", "-q", "--report", tmp_path / "earlier.json", src,
                tmp_path / ("out" if directory else "o.ckpt"))
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("case", ["inside_input", "inside_linked_input", "onto_a_shard",
                                  "onto_the_manifest"])
def test_directory_report_onto_a_path_the_run_uses(tmp_path: Path, llama: Path, case: str):
    src = make_rank_dir(tmp_path / "src", llama, ranks=1)
    make_rank_dir(tmp_path / "elsewhere", llama, ranks=1)
    os.symlink(tmp_path / "elsewhere" / "rank_0", src / "rank_1")
    dst = tmp_path / "out"
    report, reason = {
        "inside_input": (src / "report.json", r"report would be written inside the input"),
        "inside_linked_input": (tmp_path / "elsewhere" / "rank_0" / "r.json",
                                r"report would be written inside the input"),
        "onto_a_shard": (dst / "rank_1" / "net.ckpt", r"report is an output file"),
        "onto_the_manifest": (dst / MANIFEST, r"report is the manifest")}[case]
    if case.startswith("onto"):
        assert cli("convert", "-q", *LLAMA2, src, dst).exit_code == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("convert", "--overwrite", *LLAMA2, "--report", report, src, dst)
    assert_refused(result, report, reason)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == []


def test_directory_report_beside_the_outputs_is_written(tmp_path: Path, shards: Path) -> None:
    """Beside DST, not in it: a report in DST was an extra file, so that verify called the
    output different."""
    dst = tmp_path / "out"
    inside = cli("convert", "-q", *LLAMA2, "--report", dst / "report.json", shards, dst)
    assert_refused(inside, dst / "report.json", r"is inside DST, which holds the conversion "
                   r"alone \(verify reports any other file there")
    assert not dst.exists()
    result = cli("convert", "-q", *LLAMA2, "--report", tmp_path / "report.json", shards, dst)
    assert result.exit_code == 0, result.stderr
    assert cli("verify", shards, dst).exit_code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["shards"]) == 2
    for key in ("read_s", "quantize_s", "write_s"):  # the directory's: its shards' added up
        assert report["stages"][key] == pytest.approx(
            sum(shard["stages"][key] for shard in report["shards"]), abs=0.002)


def char_device(path: Path) -> Path:
    try:
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a copy of /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    return path


#: A non-regular destination: how to make it, and the kind its refusal must name.
DESTINATIONS: Dict[str, "tuple[Callable[[Path], object], str]"] = {
    "char_device": (char_device, r"is a character device; refusing"),
    "fifo": (os.mkfifo, r"is a FIFO \(named pipe\); refusing"),
    "symlink_to_stdout": (lambda p: os.symlink("/proc/self/fd/1", p),
                          r"is a symbolic link \(to /proc/self/fd/1\)"),
    "symlink_to_a_file": (lambda p: os.symlink("elsewhere.ckpt", p),
                          r"is a symbolic link \(to elsewhere.ckpt\)"),
    "dangling_symlink": (lambda p: os.symlink("missing.ckpt", p), r"is a symbolic link"),
}


def kind_of(path: Path) -> "tuple[int, Optional[str]]":
    st = os.lstat(path)
    return st.st_mode, os.readlink(path) if os.path.islink(path) else None


@pytest.mark.parametrize("role", ["output", "report"])
@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_non_regular_destination_is_refused(tmp_path: Path, src: Path, role: str,
                                            case: str) -> None:
    make, reason = DESTINATIONS[case]
    (tmp_path / "elsewhere.ckpt").write_bytes(b"another file")
    target = tmp_path / ("out.ckpt" if role == "output" else "report.json")
    make(target)
    before = kind_of(target)
    dst = target if role == "output" else tmp_path / "out.ckpt"
    result = run_cli("convert", "--overwrite", "--report", target if role == "report" else
                     tmp_path / "r.json", src, dst, timeout=20)
    assert_refused(result, target, reason, directory=tmp_path)
    assert kind_of(target) == before
    assert (tmp_path / "elsewhere.ckpt").read_bytes() == b"another file"
    assert not (tmp_path / "r.json").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["fifo_shard", "linked_subdirectory", "file_in_the_way"])
def test_non_regular_destination_inside_an_output_directory(tmp_path: Path, shards: Path,
                                                            case: str) -> None:
    dst = tmp_path / "out"
    assert cli("convert", "-q", *LLAMA2, shards, dst).exit_code == 0
    shutil.rmtree(dst / "rank_1")
    (tmp_path / "elsewhere").mkdir()
    if case == "fifo_shard":
        (dst / "rank_1").mkdir()
        offender = dst / "rank_1" / "net.ckpt"
        os.mkfifo(offender)
        reason = r"is a FIFO"
    elif case == "linked_subdirectory":
        offender = dst / "rank_1"
        os.symlink(tmp_path / "elsewhere", offender)
        reason = r"is a symbolic link .* inside the output directory"
    else:
        offender = dst / "rank_1"
        offender.write_bytes(b"not a directory")
        reason = r"in the way"
    result = run_cli("convert", "--overwrite", *LLAMA2, shards, dst, timeout=20)
    assert_refused(result, offender, reason)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and leftovers(tmp_path) == []


def test_symlinked_rank_directory_is_followed_and_counted(tmp_path: Path, llama: Path,
                                                          reference: bytes) -> None:
    src = make_rank_dir(tmp_path / "src", llama, ranks=1)
    make_rank_dir(tmp_path / "elsewhere", llama, ranks=1)
    os.symlink(tmp_path / "elsewhere" / "rank_0", src / "rank_1")
    result = cli("convert", *LLAMA2, src, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "converted 2 shards" in result.stdout
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["rank_0/net.ckpt", "rank_1/net.ckpt"]
    assert (tmp_path / "out" / "rank_1" / "net.ckpt").read_bytes() == reference
    assert not (tmp_path / "out" / "rank_1").is_symlink()


@pytest.mark.parametrize("case", ["loop", "dangling", "into_the_output"])
def test_bad_links_in_an_input_directory_are_refused_by_name(tmp_path: Path, shards: Path,
                                                             case: str) -> None:
    dst = tmp_path / "out"
    link = shards / "rank_0" / "link"
    if case == "loop":
        os.symlink("..", link)
        reason, dst_kept = r"loop", False
    elif case == "dangling":
        os.symlink("missing", link)
        reason, dst_kept = r"dangling symbolic link", False
    else:
        assert cli("convert", "-q", *LLAMA2, shards, dst).exit_code == 0
        os.symlink(dst / "rank_1", link)  # reading it while rewriting DST would eat the input
        reason, dst_kept = r"an output file is an input file", True
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("convert", "--overwrite", *LLAMA2, shards, dst)
    offender = link if case != "into_the_output" else dst / "rank_1" / "net.ckpt"
    assert_refused(result, offender, reason)
    assert dst.exists() == dst_kept
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- 2. OS errors

def test_file_too_large_while_copying_a_non_shard_file(tmp_path: Path, shards: Path) -> None:
    """RLIMIT_FSIZE fails the copy with EFBIG, as a full disk fails it with ENOSPC."""
    (shards / "tokenizer.model").write_bytes(bytes(300_000))  # shards write < 130 kB each
    dst = tmp_path / "out"
    prelude = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))")
    result = run_cli("convert", *LLAMA2, shards, dst, prelude=prelude)
    assert_refused(result, dst / "tokenizer.model", r"cannot write: File too large")
    assert not (dst / "tokenizer.model").exists() and leftovers(tmp_path) == []


def _ends(suffix: str, arg: int = 0) -> Callable[..., bool]:
    """Whether positional argument `arg` (a path) ends in `suffix`."""
    return lambda *args: os.fspath(args[arg]).endswith(suffix)


@pytest.mark.parametrize("case", ["manifest_rename_erofs", "manifest_fsync_enospc",
                                  "index_fsync_enospc", "copy_source_eacces",
                                  "listing_eacces", "mkdir_eacces"])
def test_os_error_in_directory_mode_is_one_line(tmp_path: Path, shards: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                case: str) -> None:
    (shards / "config.json").write_text('{"hidden_size": 64}')
    dst = tmp_path / "out"
    manifest_temp = f".{MANIFEST}.ckpt-rtn-{os.getpid()}.tmp"
    if case == "manifest_rename_erofs":
        patch_os(monkeypatch, "replace", _ends(MANIFEST, 1), errno.EROFS)
        path, reason = dst / MANIFEST, r"cannot write: Read-only file system"
    elif case == "manifest_fsync_enospc":
        patch_os(monkeypatch, "fsync", lambda fd: fd_path(fd).endswith(manifest_temp),
                 errno.ENOSPC)
        path, reason = dst / MANIFEST, r"cannot write: No space left on device"
    elif case == "index_fsync_enospc":
        (shards / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "rank_0/net.ckpt"}}))
        patch_os(monkeypatch, "fsync", lambda fd: ".model.safetensors.index.json." in
                 fd_path(fd), errno.ENOSPC)
        path, reason = dst / "model.safetensors.index.json", r"No space left on device"
    elif case == "copy_source_eacces":
        patch_os(monkeypatch, "open", _ends("src/config.json"), errno.EACCES)
        path, reason = shards / "config.json", r"cannot open: Permission denied"
    elif case == "listing_eacces":  # os.walk used to skip such a directory without a word
        patch_os(monkeypatch, "scandir", _ends("rank_1"), errno.EACCES)
        path, reason = shards / "rank_1", r"cannot list: Permission denied"
    else:
        patch_os(monkeypatch, "mkdir", _ends("rank_1"), errno.EACCES)
        path, reason = dst / "rank_1", r"cannot create directory: Permission denied"
    result = cli("convert", *LLAMA2, shards, dst)
    assert_refused(result, path, reason)
    assert leftovers(tmp_path) == []


def test_os_error_renaming_a_single_output(tmp_path: Path, src: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    patch_os(monkeypatch, "replace", _ends("out.ckpt", 1), errno.EXDEV)
    dst = tmp_path / "out.ckpt"
    assert_refused(cli("convert", src, dst), dst, r"cannot write: Invalid cross-device link",
                   leaves=[dst], directory=tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["file", "directory", "directory_part"])
def test_a_full_filesystem_refusing_the_lock_file_is_one_line(
        tmp_path: Path, src: Path, shards: Path, monkeypatch: pytest.MonkeyPatch,
        case: str) -> None:
    """The lock file is the first thing a run writes: on a full filesystem its PID record
    fails, which once came out as a traceback and left the lock file behind."""
    patch_os(monkeypatch, "pwrite", lambda fd, *_: fd_path(fd).endswith(
        (".ckpt-rtn.lock", LOCK_NAME)), errno.ENOSPC)
    if case == "file":
        dst, args, lock = tmp_path / "out.ckpt", (src,), tmp_path / ".out.ckpt.ckpt-rtn.lock"
    else:
        dst = tmp_path / "out"
        args, lock = (*LLAMA2, shards), dst / LOCK_NAME
        if case == "directory_part":
            args = (*args, "--part", "0/2")
    result = cli("convert", *args, dst)
    assert_refused(result, dst, re.escape(f"cannot write the lock file {lock}: No space left "
                                          "on device"),
                   leaves=[dst] if case == "file" else [])
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 3. hangs

@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_fifo_input_is_refused_at_once(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "model.ckpt"
    os.mkfifo(fifo)
    args = [fifo] if command == "inspect" else [*LLAMA2, fifo, tmp_path / "out.ckpt"]
    result = run_cli(command, *args, timeout=20)
    assert_refused(result, fifo, r"is a FIFO \(named pipe\), not a checkpoint file",
                   leaves=[tmp_path / "out.ckpt"], directory=tmp_path)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_character_device_input_is_named(tmp_path: Path, device: str) -> None:
    for result in (cli("inspect", device), cli("convert", device, tmp_path / "out.ckpt")):
        assert_refused(result, device, r"is a character device, not a checkpoint file",
                       directory=tmp_path)
        assert "empty" not in result.stderr


@pytest.mark.parametrize("name", ["rank_0/pipe", "tokenizer.json", "rank_1/net.ckpt"])
def test_fifo_inside_an_input_directory_is_refused_by_name(tmp_path: Path, shards: Path,
                                                           name: str) -> None:
    fifo = shards / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    dst = tmp_path / "out"
    result = run_cli("convert", *LLAMA2, shards, dst, timeout=20)
    assert_refused(result, fifo, r"is a FIFO \(named pipe\); a checkpoint directory may hold "
                   "only regular files", leaves=[dst])


def test_fifo_as_the_manifest_on_resume(tmp_path: Path, shards: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    os.mkfifo(dst / MANIFEST)
    result = run_cli("convert", "--resume", *LLAMA2, shards, dst, timeout=20)
    assert_refused(result, dst / MANIFEST, r"is a FIFO")


# --------------------------------------------------------------------------- 4. leftovers

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_stop_signal_mid_write_is_like_ctrl_c(tmp_path: Path, src: Path, signum: int) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = Gated(tmp_path, src, out_dir / "w8.ckpt")
    assert [p.name for p in leftovers(out_dir)] == [f".w8.ckpt.ckpt-rtn-{run.proc.pid}.tmp",
                                                    ".w8.ckpt.ckpt-rtn.lock"]
    result = run.signal(signum)
    assert result.exit_code == 128 + signum, result.stderr
    name = signal.Signals(signum).name
    assert result.stderr.splitlines() == [f"error: interrupted by {name}; no output was written"]
    assert list(out_dir.iterdir()) == []


#: `ckpt-rtn convert` whose import of the command line waits (it prints "importing" first):
#: a stop signal then lands before any command's handlers, as in the first tenths of a second.
SLOW_START = """
import importlib.abc, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ckpt_rtn.cli":
            print("importing", flush=True)
            time.sleep(30)
sys.meta_path.insert(0, Slow())
from ckpt_rtn.__main__ import main
sys.argv[0] = "ckpt-rtn"
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_stop_signal_while_starting_is_one_line(tmp_path: Path, src: Path, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_START, "convert", str(src),
                             str(tmp_path / "out.ckpt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "importing\n"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.splitlines() == [f"error: interrupted by {name}; no output was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ckpt"]


def test_a_stop_signal_a_library_turned_into_its_own_interrupt_keeps_its_name(
        tmp_path: Path, src: Path) -> None:
    """Ray's ray.get catches the interrupt our handler raises and raises a plain
    KeyboardInterrupt: the run must still report the signal it received, not Ctrl-C."""
    prelude = """
import os, signal, time
from ckpt_rtn import converter
real = converter.convert
def convert(*args, **kwargs):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    except KeyboardInterrupt:
        raise KeyboardInterrupt() from None
    return real(*args, **kwargs)
converter.convert = convert
"""
    result = run_cli("convert", src, tmp_path / "out.ckpt", prelude=prelude)
    assert result.exit_code == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.splitlines() == ["error: interrupted by SIGTERM; no output was written"]


def test_interrupt_before_a_temporary_file_is_guarded(tmp_path: Path, src: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal just after a writer made its temporary file, before the `with` that would
    discard it: the command still removes it."""
    real = formats.open_writer

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(formats, "open_writer", interrupted)
    result = cli("convert", src, tmp_path / "out.ckpt")
    assert result.exit_code == 130 and "interrupted by SIGINT" in result.stderr
    assert temp_files(tmp_path) == [] and leftovers(tmp_path) == []


def test_sigterm_mid_directory_run(tmp_path: Path, shards: Path) -> None:
    dst = tmp_path / "out"
    result = Gated(tmp_path, shards, dst).signal(signal.SIGTERM)
    assert result.exit_code == 128 + signal.SIGTERM
    # Stopped in its first shard: nothing finished, nothing kept, nothing to --resume (it
    # said that finished files were kept).
    assert result.stderr.splitlines() == [f"error: {dst}: interrupted by SIGTERM; no output "
                                          "was written"]
    assert not dst.exists()


def test_sigkill_then_rerun_removes_the_dead_runs_files(tmp_path: Path, src: Path,
                                                        reference: bytes) -> None:
    dst = tmp_path / "out.ckpt"
    run = Gated(tmp_path, src, dst)
    run.signal(signal.SIGKILL)
    stale = tmp_path / f".out.ckpt.ckpt-rtn-{run.proc.pid}.tmp"
    assert stale.exists() and (tmp_path / ".out.ckpt.ckpt-rtn.lock").exists()
    live = tmp_path / ".out.ckpt.ckpt-rtn-1.tmp"  # PID 1 is alive: not ours to delete
    other = tmp_path / f".other.ckpt.ckpt-rtn-{dead_pid()}.tmp"  # another destination's
    live.write_bytes(b"live")
    other.write_bytes(b"other")
    result = cli("convert", "-q", src, dst)
    assert result.exit_code == 0, result.stderr
    assert dst.read_bytes() == reference
    assert not stale.exists() and not (tmp_path / ".out.ckpt.ckpt-rtn.lock").exists()
    assert live.read_bytes() == b"live" and other.read_bytes() == b"other"


def test_resume_keeps_live_runs_temporary_files(tmp_path: Path, shards: Path) -> None:
    dst = tmp_path / "out"
    assert cli("convert", "-q", *LLAMA2, shards, dst).exit_code == 0
    dead = dst / "rank_0" / f".net.ckpt.ckpt-rtn-{dead_pid()}.tmp"
    live = dst / "rank_0" / ".net.ckpt.ckpt-rtn-1.tmp"
    dead.write_bytes(b"dead")
    live.write_bytes(b"live")
    (dst / LOCK_NAME).write_text("999999\n")  # left by a SIGKILLed run: taken over
    result = cli("convert", "-q", "--resume", *LLAMA2, shards, dst)
    assert result.exit_code == 0, result.stderr
    assert not dead.exists() and live.read_bytes() == b"live"
    assert not (dst / LOCK_NAME).exists()


# --------------------------------------------------------------------------- 5. concurrency

def test_second_writer_of_one_output_fails_at_once(tmp_path: Path, src: Path,
                                                   reference: bytes) -> None:
    dst = tmp_path / "out.ckpt"
    first = Gated(tmp_path, src, dst)
    for extra in ([], ["--overwrite"]):
        started = time.monotonic()
        second = cli("convert", *extra, src, dst)
        assert_refused(second, dst, rf"is being written by another ckpt-rtn run "
                       rf"\(pid {first.proc.pid}\)$")
        assert time.monotonic() - started < 5
    result = first.go()
    assert result.exit_code == 0, result.stderr
    assert dst.read_bytes() == reference
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("extra", [["--resume"], ["--overwrite"], []])
def test_second_directory_run_fails_at_once(tmp_path: Path, shards: Path,
                                            extra: List[str]) -> None:
    dst = tmp_path / "out"
    first = Gated(tmp_path, shards, dst, "--resume")  # a --resume run holds the lock too
    second = cli("convert", *extra, *LLAMA2, shards, dst)
    assert_refused(second, dst, rf"being written by another ckpt-rtn run \(pid {first.proc.pid}\)")
    result = first.go()
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads((dst / MANIFEST).read_text())["files"]) == [
        "rank_0/net.ckpt", "rank_1/net.ckpt"]
    assert leftovers(dst) == []


def test_a_part_starting_while_another_part_releases_waits_that_out(tmp_path: Path) -> None:
    """A releasing part holds the shared lock exclusively for a moment, to learn whether it
    is the last: a part starting then was refused as if a whole run held DST (a --ray run
    failed so on a loaded machine)."""
    dst = tmp_path / "out"
    dst.mkdir()
    releasing = os.open(paths.lock_path(dst, directory=True), os.O_RDWR | os.O_CREAT)
    fcntl.flock(releasing, fcntl.LOCK_EX)
    threading.Timer(0.1, os.close, (releasing,)).start()
    with paths.destination_lock(dst, directory=True, shared=True):
        pass
    held = os.open(paths.lock_path(dst, directory=True), os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a whole run, for its whole life: still refused
    try:
        with pytest.raises(OutputError, match="is being written by another ckpt-rtn run"):
            with paths.destination_lock(dst, directory=True, shared=True):
                pass
    finally:
        os.close(held)


def test_a_lock_on_a_deleted_lock_file_is_not_trusted(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The unlink race: a run that opened the lock file just before its holder deleted it
    gets a lock on a dead inode; it must notice, and lock the file now at the path."""
    dst = tmp_path / "out.ckpt"
    lock = paths.lock_path(dst)
    with paths.destination_lock(dst):
        stale = os.open(lock, os.O_RDWR)  # the racer opens the lock file...
    assert not os.path.exists(lock)  # ...which its holder deletes as it finishes
    real_open, opened = os.open, []

    def racer_open(path, *args, **kwargs):
        opened.append(path)
        return stale if len(opened) == 1 else real_open(path, *args, **kwargs)
    with paths.destination_lock(dst):  # a new run holds a new lock file
        monkeypatch.setattr(os, "open", racer_open)
        with pytest.raises(OutputError, match=rf"being written by another ckpt-rtn run "
                           rf"\(pid {os.getpid()}\)"):
            with paths.destination_lock(dst):
                pass
        monkeypatch.undo()
    assert opened == [lock, lock]  # it tried again at the path after finding the inode gone
    assert not os.path.exists(lock)


# --------------------------------------------------------------------------- 6. the report

@pytest.mark.parametrize("earlier", [False, True], ids=["new", "overwrite"])
def test_report_that_cannot_be_written_takes_the_output_with_it(
        tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, earlier: bool) -> None:
    dst, report = tmp_path / "out.ckpt", tmp_path / "report.json"
    if earlier:
        dst.write_bytes(b"earlier output")
    temp = f".report.json.ckpt-rtn-{os.getpid()}.tmp"
    patch_os(monkeypatch, "fsync", lambda fd: fd_path(fd).endswith(temp), errno.ENOSPC)
    result = cli("convert", "--overwrite", "--report", report, src, dst)
    assert_refused(result, report, r"cannot write: No space left on device", leaves=[report],
                   directory=tmp_path)
    assert dst.read_bytes() == b"earlier output" if earlier else not dst.exists()
    assert leftovers(tmp_path) == []


def test_report_and_output_appear_together(tmp_path: Path, src: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither is renamed into place before both are complete and synced."""
    dst, report = tmp_path / "out.ckpt", tmp_path / "report.json"
    seen: List[List[str]] = []
    real_replace = os.replace

    def replace(a, b):
        seen.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")))
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    result = cli("convert", "-q", "--report", report, src, dst)
    assert result.exit_code == 0, result.stderr
    assert seen == [["in.ckpt"], ["in.ckpt", "report.json"]]  # the report first, the output last
    assert json.loads(report.read_text())["output_bytes"] == dst.stat().st_size


# --------------------------------------------------------------------------- 7. newcomer paths

@pytest.mark.parametrize("name", ["out.ckpt", "out.safetensors"])
def test_directory_input_with_a_file_like_output_name(tmp_path: Path, shards: Path,
                                                      name: str) -> None:
    dst = tmp_path / name
    assert_refused(cli("convert", *LLAMA2, shards, dst), dst,
                   r"input is a directory of shards, so the output is a directory too",
                   leaves=[dst])


@pytest.mark.parametrize("dry_run", [False, True])
def test_existing_directory_as_the_output_of_a_file(tmp_path: Path, src: Path,
                                                    dry_run: bool) -> None:
    dst = tmp_path / "outdir"  # no suffix: the format check used to speak first
    dst.mkdir()
    args = ["--dry-run"] if dry_run else []
    assert_refused(cli("convert", *args, src, dst), dst, r"is a directory; give an output file",
                   directory=tmp_path)
    assert list(dst.iterdir()) == []


MISSING = "import sys\nfor name in {names}: sys.modules[name] = None  # not installed"


@pytest.mark.parametrize("command, extra", [("eval", "mindspore"), ("compare", "mindspore"),
                                            ("generate", "mindspore"),
                                            ("import-gguf", "gguf")])
def test_command_without_its_extra_says_which_to_install(tmp_path: Path, command: str,
                                                         extra: str) -> None:
    for name in ("model.yaml", "m.ckpt", "t.txt"):
        (tmp_path / name).write_text("x")
    yaml, ckpt, text = (str(tmp_path / n) for n in ("model.yaml", "m.ckpt", "t.txt"))
    args = {"eval": ["--config", yaml, "--ckpt", ckpt, "--text", text],
            "compare": ["--config", yaml, ckpt, "--text", text],
            "generate": ["--config", yaml, "--ckpt", ckpt, "hello"],
            "import-gguf": [str(tmp_path / "m.gguf"), str(tmp_path / "out")]}[command]
    missing = ["mindspore", "mindformers"] if extra == "mindspore" else ["gguf", "tokenizers"]
    result = run_cli(command, *args, prelude=MISSING.format(names=missing))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {command} needs the {extra} extra ({missing[0]} is not installed): "
        f"pip install 'ckpt-rtn[{extra}]'"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["inspect", "verify", "convert", "--help", "--version"])
def test_a_full_standard_output_is_one_line(tmp_path: Path, src: Path, command: str) -> None:
    """Standard output on a full disk was a traceback with exit 1 (verify's "differs"), and
    for --help and --version still was; the conversion it reports on stays written."""
    dst = tmp_path / "out.ckpt"
    if command in ("inspect", "verify"):
        assert cli("convert", "-q", src, dst).exit_code == 0
    args = {"inspect": [src], "verify": [src, dst], "convert": [src, dst]}.get(command, [])
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", MAIN, command, *map(str, args)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert (proc.returncode, proc.stderr) == (
        2, "error: standard output: cannot write: No space left on device\n")
    assert dst.exists() or command.startswith("--")


@pytest.mark.parametrize("command", ["inspect", "convert", "verify"])
def test_an_input_that_fails_to_read_is_one_line(tmp_path: Path, src: Path, command: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing disk's EIO while reading an input (its index, or a tensor) was a traceback,
    exit 1."""
    dst = tmp_path / "out.ckpt"
    assert cli("convert", "-q", src, dst).exit_code == 0
    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "pread", failing)  # the index's reads, and a small file's tensors
    args = {"inspect": [src], "convert": [src, tmp_path / "again.ckpt"],
            "verify": [src, dst]}[command]
    result = cli(command, *args)
    monkeypatch.undo()
    read_first = dst if command == "verify" else src  # verify reads DST's settings first
    assert result.exit_code == 2 and result.stderr == (
        f"error: {read_first}: cannot read: Input/output error\n"), result.output
    assert not (tmp_path / "again.ckpt").exists()


def test_a_rename_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's bytes were synced, its directory not: a crash after exit 0 could bring the
    temporary name back (seen on ext4 after a journal abort)."""
    synced: List[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)
    monkeypatch.setattr(os, "fsync", recording)
    atomic.write_bytes_atomic(tmp_path / "o.json", b"{}")
    assert synced == ["file", "directory"]


def test_a_stop_during_a_groups_renames_takes_them_all_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop signal after a rename, while its directory is synced, left that file renamed
    (the new report beside the old output): the group's undo went by a list the interrupted
    rename had not reached."""
    out, report = tmp_path / "o.bin", tmp_path / "r.json"
    out.write_bytes(b"old out")
    report.write_bytes(b"old report")

    def stopped(directory: str) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic, "_sync_directory", stopped)
    with pytest.raises(KeyboardInterrupt):
        with atomic.committed_together():
            for path, data in ((out, b"new out"), (report, b"new report")):
                with atomic.AtomicFile(path) as new:
                    new.write(data)
                    new.commit()
    assert (out.read_bytes(), report.read_bytes()) == (b"old out", b"old report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.bin", "r.json"]


def test_a_temporary_file_that_cannot_be_removed_is_left_to_the_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem turned read-only, a failed write's temporary file cannot be removed:
    that OSError replaced the write's own error with a traceback."""
    out = atomic.AtomicFile(tmp_path / "o.bin")
    out.write(b"x")

    def refused(path: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "unlink", refused)
    out.discard()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(out.temp_path)]


def test_a_closed_pipe_ends_quietly(src: Path) -> None:
    """`ckpt-rtn inspect ... | head -1`: the reader closed the pipe (here before the first
    line, so that no line can win the race), which ends the command quietly, as SIGPIPE
    would end any other tool: no traceback, no error line, exit 128 + SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "inspect", str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(TIMEOUT) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == b""


def test_a_broken_or_closed_standard_error_changes_nothing(tmp_path: Path, src: Path) -> None:
    """stderr on a full disk: a refusal exited 1 (verify's "differs") and an interrupt 1;
    closed (`2>&-`), the progress bar's write to None failed the conversion."""
    def run(*args: object, **streams: object) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-c", MAIN, *map(str, args)], text=True,
                              timeout=TIMEOUT, **streams)  # type: ignore[call-overload]

    dst = tmp_path / "out.ckpt"
    with open("/dev/full", "w") as full:
        assert run("verify", tmp_path / "missing.ckpt", src, stderr=full).returncode == 2
        assert run("convert", src, dst, stderr=full, stdout=subprocess.DEVNULL).returncode == 0
    closed = run("convert", src, tmp_path / "again.ckpt", stderr=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, pass_fds=(), close_fds=True,
                 preexec_fn=lambda: os.close(2))
    assert closed.returncode == 0 and (tmp_path / "again.ckpt").read_bytes() == dst.read_bytes()


def test_a_closed_standard_output_is_one_line(src: Path) -> None:
    """`>&-`: click dropped every line without a word, exit 0."""
    proc = subprocess.run([sys.executable, "-c", MAIN, "inspect", str(src)],
                          stderr=subprocess.PIPE, text=True, timeout=TIMEOUT,
                          preexec_fn=lambda: os.close(1))
    assert (proc.returncode, proc.stderr) == (
        2, "error: standard output: cannot write: it is closed\n")


def test_an_interrupted_overwrite_resumes(tmp_path: Path, shards: Path, llama: Path) -> None:
    """Interrupted in its first shard, an --overwrite of another SRC's output advised
    --resume, which the earlier run's manifest then refused (another SRC)."""
    dst = tmp_path / "out"
    assert cli("convert", "-q", *LLAMA2, shards, dst).exit_code == 0
    other = make_rank_dir(tmp_path / "other", llama, ranks=3)
    stopped = Gated(tmp_path, other, dst, "--overwrite").signal(signal.SIGTERM)
    assert stopped.exit_code == 128 + signal.SIGTERM and "--resume" in stopped.stderr
    resumed = cli("convert", "-q", *LLAMA2, "--resume", other, dst)
    assert resumed.exit_code == 0, resumed.stderr
    assert cli("verify", other, dst).exit_code == 0


def test_a_file_name_that_is_not_utf8_is_printed_escaped(tmp_path: Path, src: Path) -> None:
    """A summary naming a file whose name is not UTF-8 raised UnicodeEncodeError (a
    traceback, exit 1) after the output was written."""
    dst = os.fsencode(tmp_path) + b"/out\xff.ckpt"
    proc = subprocess.run([sys.executable, "-c", MAIN, "convert", os.fsencode(src), dst],
                          capture_output=True, timeout=TIMEOUT,  # a UTF-8 locale's strict stdout
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert proc.returncode == 0, proc.stderr
    assert b"out\\udcff.ckpt: " in proc.stdout and os.path.exists(dst)
