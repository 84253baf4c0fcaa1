"""The paths a run reads and writes: what they are, that they do not overlap, who holds them.

Nothing a run writes may land on anything it reads or writes under another
role: `--report in.ckpt`, an output hard-linked to its input, a shard reached
through a symlink into the output tree. `Claims` compares every path by its
resolved name and, when it exists, by its inode.

Only regular files are read or replaced. A FIFO as input would block for
ever, `/dev/zero` never ends, and renaming a file over a device node, a FIFO
or a symbolic link (`/dev/stdout`) destroys what the user pointed at: each is
refused by name and kind before anything is opened. A symlink destination is
refused rather than replaced: replacing the link would silently leave its
target stale, and writing through it would write another file than named.

`destination_lock` holds an exclusive flock per destination for the whole
run, so a second run writing it fails at once, naming the first one's PID.
The lock file is `.<name>.ckpt-rtn.lock` beside an output file, or
`.ckpt-rtn.lock` inside an output directory; the holder deletes it before
releasing the lock, and a run that finds a lock file whose holder died takes
it over, so none is left after a run that was not killed with SIGKILL.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Type

from .errors import CkptRtnError, FormatError, OutputError

#: Temporary files, `.<name>.ckpt-rtn-<pid>.tmp` (group 1: the writer's PID); left behind only
#: by a killed process.
TEMP_PATTERN = re.compile(r"\..+\.ckpt-rtn-(\d+)(?:\.earlier)?\.tmp")
#: The lock file inside an output directory.
LOCK_NAME = ".ckpt-rtn.lock"
#: Lock files: LOCK_NAME, and `.<name>.ckpt-rtn.lock` beside an output file.
LOCK_PATTERN = re.compile(r"\.(?:.+\.)?ckpt-rtn\.lock")


def temp_path(path: "os.PathLike[str] | str", pid: Optional[int] = None, *,
              earlier: bool = False) -> str:
    """Where this process (or `pid`) writes `path` before renaming it onto `path`; with
    `earlier`, where it keeps what `path` held while a group of renames may still be undone
    (a name no temporary file of another path can have)."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    tail = ".earlier" if earlier else ""
    return os.path.join(directory,
                        f".{name}.ckpt-rtn-{os.getpid() if pid is None else pid}{tail}.tmp")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    """What a file of this st_mode is, as a phrase ("a character device")."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def input_stat(path: "os.PathLike[str] | str", error: Type[CkptRtnError] = FormatError,
               what: str = "a checkpoint file") -> os.stat_result:
    """The stat of an input file, refusing (as `error`) anything but a regular file before
    anything opens it: a FIFO would block (a library's open too, deaf to signals), a device
    such as /dev/zero never end."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(path, f"cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(path, f"is {kind(st.st_mode)}, not {what}")
    return st


def read_text(path: "os.PathLike[str] | str", error: Type[CkptRtnError]) -> str:
    """A UTF-8 input file's text (a regular file: see open_input); anything wrong is
    `error`."""
    fd = open_input(path, error, "a text file")
    try:
        with open(fd, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise error(path, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(path, f"not UTF-8 text (byte {exc.start})") from None


def open_input(path: "os.PathLike[str] | str", error: Type[CkptRtnError] = FormatError,
               what: str = "a checkpoint file") -> int:
    """A read-only descriptor on a regular file (else `error`, naming `what` it should be).

    O_NONBLOCK makes opening a FIFO return at once (where a plain open waits
    for a writer), so a file swapped for a FIFO after a stat is still refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(path, f"cannot open: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(path, f"is {kind(mode)}, not {what}")
    os.set_blocking(fd, True)
    return fd


def check_destination(path: "os.PathLike[str] | str", *, overwrite: bool) -> None:
    """Refuse a destination file that cannot simply be replaced by a new regular file."""
    try:
        st: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(path, f"cannot use as output: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(path, f"is a symbolic link (to {os.readlink(path)}); ckpt-rtn "
                              "replaces regular files only: remove the link or name its target")
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(path, "is a directory; give an output file name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(path, f"is {kind(st.st_mode)}; refusing to replace it with a file")
        if not overwrite:
            raise OutputError(path, "already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(path, f"directory {parent} does not exist")


def resolved(path: "os.PathLike[str] | str") -> str:
    """The path with every symlink resolved, whether or not it exists yet."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def inode(path: "os.PathLike[str] | str") -> Optional[Tuple[int, int]]:
    """The device and inode of the file at `path` (through links), None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Claim:
    path: str
    role: str
    writes: bool


class Claims:
    """Every path one run reads or writes, each under a role ("the input file").

    Registering a path that is the same file as one registered before
    (same resolved name, or same inode: hard links), where either one is
    written, raises an OutputError naming the written path; so does writing
    anywhere inside a directory tree that is read.
    """

    def __init__(self) -> None:
        self._by_name: Dict[str, _Claim] = {}
        self._by_inode: Dict[Tuple[int, int], _Claim] = {}
        self._trees: List[Tuple[str, _Claim]] = []
        self._written: List[Tuple[str, _Claim]] = []

    def read(self, path: "os.PathLike[str] | str", role: str) -> None:
        self._add(_Claim(os.fspath(path), role, writes=False))

    def write(self, path: "os.PathLike[str] | str", role: str) -> None:
        """A file written through its temporary file (both are claimed)."""
        self._add(_Claim(os.fspath(path), role, writes=True))
        self._add(_Claim(temp_path(path), f"{role}'s temporary file", writes=True))

    def write_in_place(self, path: "os.PathLike[str] | str", role: str) -> None:
        """A file written directly (a lock file)."""
        self._add(_Claim(os.fspath(path), role, writes=True))

    def read_tree(self, path: "os.PathLike[str] | str", role: str) -> None:
        """A directory read as a whole: nothing may be written inside it."""
        claim = _Claim(os.fspath(path), role, writes=False)
        root = resolved(path)
        for name, written in self._written:
            if _inside(name, root):
                self._refuse(written, claim, inside=True)
        self._trees.append((root, claim))

    def _add(self, claim: _Claim) -> None:
        name, found = resolved(claim.path), inode(claim.path)
        other = self._by_name.get(name) or (self._by_inode.get(found) if found else None)
        if other is not None and (claim.writes or other.writes):
            self._refuse(claim if claim.writes else other, other if claim.writes else claim)
        if claim.writes:
            for root, tree in self._trees:
                if _inside(name, root):
                    self._refuse(claim, tree, inside=True)
            self._written.append((name, claim))
        self._by_name.setdefault(name, claim)
        if found is not None:
            self._by_inode.setdefault(found, claim)

    @staticmethod
    def _refuse(written: _Claim, other: _Claim, inside: bool = False) -> None:
        if inside:
            raise OutputError(written.path, f"{written.role} would be written inside "
                              f"{other.role} {other.path}; write it elsewhere")
        raise OutputError(written.path, f"{written.role} is {other.role}; write to another path")


def check_replaceable(path: "os.PathLike[str] | str", role: str,
                      reads: "Iterable[os.PathLike[str] | str]") -> None:
    """Refuse a JSON file a command replaces (a table, a report) if it is one of the files
    the command reads, or not a regular file, or another kind of file (check_json)."""
    claims = Claims()
    for read in reads:
        claims.read(read, "an input of this command")
    claims.write(path, role)
    check_destination(path, overwrite=True)
    check_json(path, role)


def check_json(path: "os.PathLike[str] | str", role: str) -> None:
    """Refuse to replace a file that is there and not JSON: a record or report is
    rewritten at will, like any output a command names, but a path mistyped onto a
    checkpoint, say, lost 163 MB to a 787-byte record."""
    try:
        fd = open_input(path, OutputError, "a file")
    except OutputError:
        return  # none there (or check_destination's to refuse)
    try:
        start = os.pread(fd, 64, 0).lstrip()
    except OSError:
        start = b"{"
    finally:
        os.close(fd)
    if start and start[:1] not in (b"{", b"["):
        raise OutputError(path, f"exists and is not JSON: {role} would replace it (remove "
                          "it, or name another file)")


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------- locks

def lock_path(path: "os.PathLike[str] | str", *, directory: bool = False) -> str:
    """The lock file of a destination: inside a directory, beside a file."""
    if directory:
        return os.path.join(resolved(path), LOCK_NAME)
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(resolved(parent), f".{name}.ckpt-rtn.lock")


@contextlib.contextmanager
def destination_lock(path: "os.PathLike[str] | str", *, directory: bool = False,
                     shared: bool = False) -> Iterator[None]:
    """Hold `path` against other ckpt-rtn runs for the block (see the module docstring).

    `shared`: against exclusive holders only; the parts of a directory
    (`--part`) share it, while the run that completes it holds it alone.
    """
    lock = lock_path(path, directory=directory)
    fd = _acquire(os.fspath(path), lock, shared)
    try:
        yield
    finally:
        _release(lock, fd, shared)


#: A sharer's PID record: fixed width, so that whatever a sharer wrote last reads whole.
_PID_WIDTH = 16


def _acquire(shown: str, lock: str, shared: bool = False) -> int:
    """flock a lock file that is still the one at its path (its holder may delete it)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for attempt in range(100):
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as exc:
            parent = os.path.dirname(lock)
            if exc.errno == errno.ENOENT and not os.path.isdir(parent):
                raise OutputError(shown, f"directory {parent} does not exist") from None
            raise OutputError(shown, f"cannot create the lock file {lock}: "
                              f"{exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OutputError(shown, f"lock file {lock} is {kind(mode)}; remove it")
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                if not shared or attempt == 99:
                    raise OutputError(shown, "is being written by another ckpt-rtn run "
                                      f"({_holder(fd)})") from None
                # A sharer that is releasing holds it exclusively for a moment, to learn
                # whether it is the last (_release): a part starting then waits that moment
                # out, where a run that holds it exclusively holds it for its whole life.
                os.close(fd)
                time.sleep(0.01)
                continue
            except OSError as exc:
                raise OutputError(shown, f"cannot lock {lock}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            # Sharers write over each other, never truncating under a sharer that reads.
            record = f"{os.getpid()}\n".ljust(_PID_WIDTH) if shared else f"{os.getpid()}\n"
            try:
                if not shared:
                    os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode(), 0)
            except OSError as exc:  # a full filesystem, most likely: nothing else fits either
                _release(lock, fd, shared)
                raise OutputError(shown, f"cannot write the lock file {lock}: "
                                  f"{exc.strerror}") from None
            return fd
        os.close(fd)  # its holder deleted it after we opened it: lock the new one
    raise OutputError(shown, f"cannot lock {lock}: it keeps being replaced")


def _same_file(fd: int, path: str) -> bool:
    held = os.fstat(fd)
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """'pid N' (or 'pids N, M' for the parts that share a directory's) of who holds the
    lock on `fd`'s file: as the kernel lists them where it does (/proc/locks), else as the
    file records (its holder writes it just after locking). The record is the last sharer's,
    which may have ended while others hold on."""
    pids = _lock_holders(fd)
    if pids:
        return f"pid {pids[0]}" if len(pids) == 1 else f"pids {', '.join(map(str, pids))}"
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.01)
    return "pid unknown"


def _lock_holders(fd: int) -> List[int]:
    """The PIDs of this machine's processes holding a flock on `fd`'s file, from
    /proc/locks (Linux; empty elsewhere, or where it cannot be read). A holder on another
    machine, sharing the filesystem, is not listed."""
    held = os.fstat(fd)
    device = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    pids = set()
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device \
                and fields[4].isdigit() and int(fields[4]) not in (0, os.getpid()):
            pids.add(int(fields[4]))
    return sorted(pids)


def _release(lock: str, fd: int, shared: bool = False) -> None:
    """Delete the lock file while still holding it, then unlock (by closing). A sharer
    deletes it only if it is the last one: one it deleted under another sharer would let an
    exclusive holder lock a new file at the same path meanwhile."""
    try:
        if shared:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another holder still has it (the finally closes it)
        if _same_file(fd, lock):
            os.unlink(lock)
    except OSError:
        pass  # a lock file left behind is taken over by the next run
    finally:
        os.close(fd)
