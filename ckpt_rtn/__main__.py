"""`python -m ckpt_rtn` and the `ckpt-rtn` command: a stop signal is reported from the start.

Importing the command line (numpy, click, the converter's modules) takes a few tenths of a
second before a command installs its own handlers (cli's _stop_signals_interrupt). A Ctrl-C
meanwhile printed a traceback, and SIGTERM or SIGHUP ended the process without a word; now
each says so in one line and exits 128 + its number, as a command does. Nothing has been
written by then. This module imports nothing heavy, so that it is in place within
milliseconds of the interpreter's start.
"""
from __future__ import annotations

import os
import signal
import sys

from .errors import STOP_SIGNALS, Interrupted  # a small module, not the command line's


def _stopped_while_starting(signum: int, _frame: object) -> None:
    sys.stderr.write(Interrupted(signum).line() + "\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # no unwinding through half-done imports


def main() -> None:
    previous = {signum: signal.signal(signum, _stopped_while_starting)
                for signum in STOP_SIGNALS}
    from .cli import main as command_line
    for signum, handler in previous.items():  # the commands take over
        signal.signal(signum, handler)
    command_line()


if __name__ == "__main__":
    main()
