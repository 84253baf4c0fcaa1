"""The MindSpore side of ckpt-rtn: everything here needs the `[mindspore]` extra.

The converter (formats, quantization math, planning, the directory layer)
never imports MindSpore or MindFormers; the modules of this package do:
`network` builds the MindFormers Llama, `deploy` swaps in the quantized
cells and loads a checkpoint, `evaluate` and `generation` measure it,
`memory` says what it holds. The data they are fed and the scores they
are given (`ckpt_rtn.tasks`) are MindSpore-free.

Importing this package routes both frameworks' log lines to files, so that
a command's terminal shows its own progress and results only: MindSpore's
(glog) under `LOG_DIR/mindspore`, MindFormers' under `LOG_DIR/log` (its
files) plus `LOG_DIR/stdout.log` (what it would have printed). Settings a
user already made in the environment are kept.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from typing import Iterator, List

from ..errors import STOP_SIGNALS, ConfigError

#: Where the frameworks' logs go: $CKPT_RTN_LOG_DIR, else one directory per user in
#: the system temp directory, shared by every run (MindFormers rotates its files;
#: MindSpore writes one small file per process).
LOG_DIR = os.environ.get("CKPT_RTN_LOG_DIR") or os.path.join(
    tempfile.gettempdir(), f"ckpt-rtn-logs-{os.getuid() if hasattr(os, 'getuid') else 0}")


def _route_framework_logs() -> None:
    try:
        os.makedirs(os.path.join(LOG_DIR, "mindspore"), exist_ok=True)
        stdout_log = open(os.path.join(LOG_DIR, "stdout.log"), "a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(LOG_DIR, f"cannot hold MindSpore's and MindFormers' logs: "
                          f"{exc.strerror} (set CKPT_RTN_LOG_DIR to a writable directory)"
                          ) from None
    # MindFormers writes to ./output/log of the working directory unless told otherwise.
    os.environ.setdefault("LOCAL_DEFAULT_PATH", LOG_DIR)
    os.environ.setdefault("GLOG_logtostderr", "0")
    os.environ.setdefault("GLOG_log_dir", os.path.join(LOG_DIR, "mindspore"))
    os.environ.setdefault("GLOG_stderrthreshold", "3")  # errors still reach the terminal
    # MindFormers' logger binds its console handler to the sys.stdout of the moment it
    # is created, during the import: that moment's stdout is the log file, for good.
    with contextlib.redirect_stdout(stdout_log), _signals_deferred():
        # pylint: disable=import-outside-toplevel,unused-import
        import mindspore  # noqa: F401  (first: a missing extra is named by its base package)
        import mindformers  # noqa: F401


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Stop signals recorded, not acted on, for the block, then taken as anywhere else.

    A stop signal while MindSpore imports (seconds) raised inside its extension's
    initialisation: `ImportError: initialization failed`, or an abort (exit 134).
    Blocking the signals in this thread was not enough: numpy's BLAS threads, started
    before, take a signal sent to the process, and Python then runs its handler in this
    thread all the same. Only the main thread can set handlers; elsewhere (a library
    caller's thread) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if received:
        signal.raise_signal(received[0])


_route_framework_logs()
