"""`convert --ray`: a directory's parts (`--part`) as Ray tasks, then the final merge here.

Ray is an optional extra (`pip install 'ckpt-rtn[ray]'`), imported only
here and only under --ray. The cluster's nodes must see SRC and DST at the
same paths (a shared filesystem) and run the same ckpt-rtn version (each part
records it, and the merge refuses parts made with other settings).

One task per shard: Ray hands them to free CPUs as they come, which
balances better than N fixed parts when shards differ in size. Each task is
one `--part I/N` run, so everything `--part` guarantees holds: a task writes
only its shard and its part manifest, and a task run again (Ray re-runs one
whose worker died, up to `max_retries` times) resumes where the dead one
stopped. The driver then runs the `--resume` merge itself, which checks
every shard's size and sha256, converts any still missing, copies the other
files and writes the indexes and the one manifest: the same bytes as one
local run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Iterator, Optional

from . import converter, directory, paths
from .errors import STOP_SIGNALS, CkptRtnError, ConfigError, OutputError
from .options import ConvertOptions, Part

#: Re-runs of a part whose worker process died (killed, out of memory, node lost).
MAX_RETRIES = 3
#: Seconds to wait for a cluster's address to answer before refusing it.
REACH_TIMEOUT = 10
#: Ray's object store holds only the parts' small results.
LOCAL_OBJECT_STORE = 100 * 1024 * 1024
#: Fault injection for tests/test_ray.py: a path; the first part task to run creates that file
#: and SIGKILLs its own worker process, so that Ray re-runs it.
KILL_ONCE = "CKPT_RTN_TEST_KILL_ONCE"


def convert_on_ray(src: str, dst: str, options: ConvertOptions, address: str, *,
                   progress: Optional[converter.ProgressFn] = None,
                   report: Optional[str] = None) -> directory.DirectoryResult:
    """Convert directory `src` into `dst` as Ray tasks on the cluster at `address` ('local':
    start one on this machine), then complete it here; returns the whole run's result."""
    if options.part is not None or options.overwrite:
        raise ConfigError(dst, "--ray runs every part itself and never replaces what is there: "
                          "drop --part and --overwrite (remove DST to start over)")
    started = time.perf_counter()
    shards = directory.shard_list(src, dst)
    if not options.resume and os.path.isdir(dst) and any(
            name != paths.LOCK_NAME for name in os.listdir(dst)):
        raise OutputError(dst, "already exists and is not empty; pass --resume to finish "
                          "an interrupted run")
    workers = options.workers or 1  # Ray gives each task that many CPUs
    parts = [replace(options, part=Part(index, len(shards)), workers=workers, resume=True)
             for index in range(len(shards))]
    ray = _start(address)
    try:
        task = ray.remote(num_cpus=workers, max_retries=MAX_RETRIES)(run_part)
        refs = [task.remote(src, dst, part) for part in parts]
        try:
            done = [_result(ray, ref, dst, part.part) for ref, part in zip(refs, parts)]
        except BaseException:
            for ref in refs:  # a cluster outlives this run: stop its tasks (each cleans up)
                ray.cancel(ref)
            raise
    finally:
        ray.shutdown()
    result = directory.convert_directory(src, dst, replace(options, resume=True),
                                         progress=progress, report=report)
    # The merge skipped what the tasks converted: report those as converted.
    by_tasks = [converted for part in done for converted in part.converted]
    names = {os.path.relpath(converted.plan.source, src) for converted in by_tasks}
    result.converted = by_tasks + result.converted
    result.skipped = [rel for rel in result.skipped if rel not in names]
    result.global_scales = sorted({name for part in done for name in part.global_scales}
                                  | set(result.global_scales))
    result.seconds = time.perf_counter() - started
    return result


def run_part(src: str, dst: str, options: ConvertOptions) -> directory.DirectoryResult:
    """One Ray task: `convert --part` in the worker process."""
    marker = os.environ.get(KILL_ONCE)
    if marker is not None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return directory.convert_directory(src, dst, options)


def _result(ray: Any, ref: Any, dst: str, part: Optional[Part]) -> directory.DirectoryResult:
    """A task's result; our error as itself (one line), a worker that kept dying as one."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CkptRtnError):
            raise exc.cause from None
        raise
    except ray.exceptions.WorkerCrashedError:
        raise OutputError(dst, f"part {part}: its Ray worker died {MAX_RETRIES + 1} times; "
                          "finished shards are kept, run again with --resume") from None


def _start(address: str) -> Any:
    """Ray, connected: a local instance started for this run, or an existing cluster."""
    try:
        import ray
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        raise ConfigError(None, "--ray needs the ray extra (ray is not installed): "
                          "pip install 'ckpt-rtn[ray]'") from None
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address != "local":
        _check_reachable(address)
    with _stop_signals_kept():
        if address == "local":
            ray.init(object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False, **quiet)
            return ray
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(None, f"--ray {address}: cannot connect: {exc}") from None
    return ray


@contextlib.contextmanager
def _stop_signals_kept() -> Iterator[None]:
    """Put back the stop signals' handlers that ray.init replaces in the driver (SIGTERM
    printed Ray's stack dump and exited 15, SIGHUP was reported as SIGINT): the command's
    own report them in one line and clean up."""
    if threading.current_thread() is not threading.main_thread():  # no handlers to keep
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


def _check_reachable(address: str) -> None:
    """Refuse a cluster address nothing listens at, in seconds: ray.init retries one for
    as long as the cluster may take to start, minutes, printing warnings meanwhile."""
    if address == "auto":  # Ray finds it (RAY_ADDRESS, or this node's running cluster)
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # left to ray.init, which refuses what it cannot parse
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(None, f"--ray {address}: cannot connect: nothing answers at "
                          f"{host}:{port} ({reason})") from None
