"""Write a file under a temporary name and give it its final name only on success.

A conversion that fails, is interrupted or crashes must never leave a file
under the name the user asked for: MLOps pipelines test for the output's
existence. The temporary file lives in the target directory so the final
`os.replace` is an atomic rename on the same filesystem. Its name,
`.<name>.ckpt-rtn-<pid>.tmp`, carries the writer's PID, so a later run can
tell a dead run's leftover from a file that a live run is still writing.

Inside `committed_together()` commits are deferred and the files appear
together at the end of the block, or none does: an output and the report
that describes it, say.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Set

from ..errors import FormatError, OutputError
from ..paths import TEMP_PATTERN, destination_lock, open_input, temp_path

_BLOCK = 16 * 1024 * 1024

#: Temporary files this process may have created and not renamed or deleted yet: named here
#: before they are created and forgotten after, so no interruption can orphan one.
_live: Set[str] = set()
#: Files committed inside `committed_together()`, waiting for their rename.
_deferred: "ContextVar[Optional[List[AtomicFile]]]" = ContextVar("ckpt_rtn_deferred",
                                                                default=None)


class AtomicFile:
    """A binary file opened at a temp name in the target's directory.

    Every OSError becomes an OutputError naming the target. Use as a context
    manager: leaving the block without `commit` deletes the temporary file.
    """

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        self.temp_path = temp_path(self.path)
        self._committed = False  # complete and synced; renamed now or at the group's end
        self._renamed = False
        # O_EXCL|O_NOFOLLOW: never write through a link planted at the temp name. A file
        # already there carries this process's PID, so it is a leftover of a dead process.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        _live.add(self.temp_path)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)
            self.file: Optional[BinaryIO] = os.fdopen(os.open(self.temp_path, flags, 0o666), "wb")
        except OSError as exc:
            _live.discard(self.temp_path)
            raise OutputError(self.path, f"cannot create output: {exc.strerror}") from None

    def write(self, data: "bytes | memoryview") -> None:
        assert self.file is not None, "write after close"
        try:
            self.file.write(data)
        except OSError as exc:
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def commit(self) -> None:
        """Flush, fsync and rename onto the final path (at the end of `committed_together`)."""
        assert self.file is not None, "commit after close"
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        except OSError as exc:
            self.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None
        self._committed = True
        pending = _deferred.get()
        if pending is not None:
            pending.append(self)
        else:
            self._rename()

    def _rename(self) -> None:
        try:
            os.replace(self.temp_path, self.path)
        except OSError as exc:
            self.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None
        self._renamed = True
        _live.discard(self.temp_path)
        _sync_directory(os.path.dirname(os.path.abspath(self.path)))

    def discard(self) -> None:
        """Close and delete the temporary file; the final path is untouched."""
        if self.file is not None:
            try:
                self.file.close()  # flushes what is buffered: may fail as the writes did
            except OSError:
                pass
            self.file = None
        if not self._renamed:
            # Best effort: on a filesystem turned read-only (or failing) it stays, and the
            # next run on this destination removes it; the error that got here is the news.
            with contextlib.suppress(OSError):
                os.unlink(self.temp_path)
            _live.discard(self.temp_path)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.discard()


@contextlib.contextmanager
def committed_together() -> Iterator[None]:
    """Files committed in this block are renamed into place as it ends cleanly, or none is.

    Every file is complete and synced before the first rename, so only a
    rename can still fail. They are renamed last committed first: the first
    (the output, whose existence pipelines test for) appears last, and if a
    rename fails the files already renamed are taken back: what their names
    held before (an earlier run's report or description, under --overwrite)
    is put back from a hard link made before the renames, or they are removed.
    """
    pending: List[AtomicFile] = []
    token = _deferred.set(pending)
    earlier: Dict[str, str] = {}  # a replaced file -> a hard link to what it held
    try:
        yield
        _deferred.reset(token)
        token = None
        for out in pending:
            kept = _keep_aside(out.path)
            if kept is not None:
                earlier[out.path] = kept
        for out in reversed(pending):
            out._rename()  # noqa: SLF001
    except BaseException:
        # By each file's own flag: a stop signal can land after a rename, before its caller
        # would have recorded it (while the directory is synced, say).
        for out in (out for out in pending if out._renamed):  # noqa: SLF001
            with contextlib.suppress(OSError):
                if out.path in earlier:
                    os.replace(earlier.pop(out.path), out.path)
                else:
                    os.unlink(out.path)
        for out in pending:
            out.discard()
        raise
    finally:
        if token is not None:
            _deferred.reset(token)
        for kept in earlier.values():
            with contextlib.suppress(OSError):
                os.unlink(kept)
            _live.discard(kept)


def _keep_aside(path: str) -> Optional[str]:
    """A hard link to the regular file at `path`, under a temporary name of this process
    (so a dead run's is removed as its temporary files are); None if there is no such file,
    or the filesystem makes no hard links (then a failed group cannot put it back)."""
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    kept = temp_path(path, earlier=True)
    _live.add(kept)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(kept)
        os.link(path, kept, follow_symlinks=False)
    except OSError:
        _live.discard(kept)
        return None
    return kept


def _sync_directory(directory: str) -> None:
    """Make a rename into `directory` durable: until its directory is synced, a crash can
    bring back the temporary name (the file's bytes were synced before). Best effort: some
    filesystems cannot sync a directory, and the file is in place either way."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_own_temp_files() -> None:
    """Delete the temporary files this process still has: none, unless a signal cut a run
    short between creating one and the `with` that would have discarded it."""
    while _live:
        with contextlib.suppress(OSError):
            os.unlink(_live.pop())


def write_bytes_atomic(path: "os.PathLike[str] | str", data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with AtomicFile(path) as out:
        out.write(data)
        out.commit()


def copy_atomic(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str") -> None:
    """Copy a regular file's bytes to `dst`, which appears only once complete."""
    fd = open_input(src)
    try:
        with AtomicFile(dst) as out:
            while True:
                try:
                    block = os.read(fd, _BLOCK)
                except OSError as exc:
                    raise FormatError(src, f"cannot read: {exc.strerror}") from None
                if not block:
                    break
                out.write(block)
            out.commit()
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (as this process sees PIDs)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def held(path: "os.PathLike[str] | str",
         keep: Iterable["os.PathLike[str] | str"] = ()) -> Iterator[None]:
    """A destination file held against other ckpt-rtn runs for the block (its lock), and
    cleared of the temporary files dead runs left for it; `keep`: this run's inputs."""
    with destination_lock(path):
        directory, name = os.path.split(os.path.abspath(path))
        remove_dead_temp_files(directory, name, keep=keep)
        yield


def remove_dead_temp_files(directory: "os.PathLike[str] | str", name: Optional[str] = None,
                           keep: Iterable["os.PathLike[str] | str"] = ()) -> None:
    """Delete the temporary files that dead runs left in `directory` (for `name` only, if given).

    A file whose PID is alive may be a live run's (or the PID was reused): it
    stays. Callers hold the destination's lock, so no live ckpt-rtn run is
    writing there. `keep`: inputs of this run, never deleted whatever their name.
    """
    directory = os.fspath(directory)
    kept = {os.path.realpath(os.fspath(p)) for p in keep}
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise OutputError(directory, f"cannot list: {exc.strerror}") from None
    for entry in entries:
        match = TEMP_PATTERN.fullmatch(entry.name)
        if match is None or (name is not None and entry.name not in (
                os.path.basename(temp_path(os.path.join(directory, name), int(match.group(1)),
                                           earlier=earlier)) for earlier in (False, True))):
            continue
        if pid_alive(int(match.group(1))) or os.path.realpath(entry.path) in kept \
                or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(entry.path, f"cannot remove a dead run's temporary file: "
                              f"{exc.strerror}") from None

