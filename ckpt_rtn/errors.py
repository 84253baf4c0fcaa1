"""The exceptions ckpt-rtn raises on purpose.

Every failure a user can cause (a bad file, a bad option, an unsupported
tensor) is one of these, so the CLI can print one clear line and exit 2
instead of a traceback. Anything else escaping is a bug.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

#: Signals that stop a run as Ctrl-C does: temporary files removed, one line, exit 128 + signum.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class CkptRtnError(Exception):
    """Base class: a message about one file, optionally at a byte offset."""

    def __init__(self, path: "os.PathLike[str] | str | None", reason: str,
                 offset: Optional[int] = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.reason = reason
        self.offset = offset
        super().__init__(str(self))

    def __reduce__(self):
        # Rebuilt from its fields, so it survives the trip back from a child process.
        return type(self), (self.path, self.reason, self.offset)

    def __str__(self) -> str:
        where = f" (at byte {self.offset})" if self.offset is not None else ""
        if self.path is None:
            return f"{self.reason}{where}"
        return f"{self.path}: {self.reason}{where}"


class FormatError(CkptRtnError):
    """The input's bytes are not a valid file of the expected format."""


class EncryptedCheckpointError(FormatError):
    """The checkpoint was saved with MindSpore's enc_key; we cannot read it."""


class ChecksumError(FormatError):
    """The CRC trailer does not match the file's content."""


class UnsupportedError(CkptRtnError):
    """Valid input that this tool deliberately does not handle."""


class OutputError(CkptRtnError):
    """The output path cannot be used (exists, is the input, not writable)."""


class ConfigError(CkptRtnError):
    """A setting is wrong: a rules YAML or model.yaml, an option, a manifest of other
    settings, an input the run cannot measure with, where the logs cannot go."""


class QuantizationError(CkptRtnError):
    """A selected tensor cannot be quantized (non-finite values, bad shape)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) received during a command.

    A KeyboardInterrupt, so every `finally` and context manager on the way
    out (temporary files, locks, worker threads) runs as for Ctrl-C.
    """

    def __init__(self, signum: int, path: Optional[str] = None,
                 outcome: str = "no output was written") -> None:
        super().__init__(signum, path, outcome)
        self.signum, self.path, self.outcome = signum, path, outcome

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"error: {where}interrupted by {signal.Signals(self.signum).name}; {self.outcome}"
