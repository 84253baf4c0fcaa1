"""Write a file under a temporary name and give it its final name only on success.

A conversion that fails, is interrupted or crashes must never leave a file
under the name the user asked for: MLOps pipelines test for the output's
existence. The temporary file lives in the target directory so the final
`os.replace` is an atomic rename on the same filesystem.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import BinaryIO, Optional

from ..errors import OutputError

#: Names of temporary files; left behind only by a killed process.
TEMP_PATTERN = re.compile(r"\..+\.ckpt-rtn-\d+\.tmp")


class AtomicFile:
    """A binary file opened at a temp name in the target's directory."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(self.path))
        self.temp_path = os.path.join(directory, f".{name}.ckpt-rtn-{os.getpid()}.tmp")
        try:
            self.file: Optional[BinaryIO] = open(self.temp_path, "wb")
        except OSError as exc:
            raise OutputError(self.path, f"cannot create output: {exc.strerror}") from None

    def commit(self) -> None:
        """Flush, fsync and rename onto the final path."""
        assert self.file is not None, "commit after close"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self.temp_path, self.path)

    def discard(self) -> None:
        """Close and delete the temporary file; the final path is untouched."""
        if self.file is not None:
            try:
                self.file.close()  # flushes what is buffered: may fail as the writes did
            except OSError:
                pass
            self.file = None
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass


def write_bytes_atomic(path: "os.PathLike[str] | str", data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    out = AtomicFile(path)
    try:
        assert out.file is not None
        out.file.write(data)
        out.commit()
    finally:
        out.discard()


def copy_atomic(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str") -> None:
    """Copy a file's bytes to `dst`, which appears only once complete."""
    out = AtomicFile(dst)
    try:
        with open(src, "rb") as f:
            assert out.file is not None
            shutil.copyfileobj(f, out.file, 16 * 1024 * 1024)
        out.commit()
    finally:
        out.discard()
