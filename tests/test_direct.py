"""Writes around the page cache (formats/direct.py) put every byte where buffered writes do.

The writers cut each write into whole aligned blocks, written by O_DIRECT from
memory or through a staging buffer, and partial blocks gathered until their
neighbours fill them. Here random pieces of a file, in random order, from
several threads, unaligned in the file and in memory, must give the file's
bytes exactly, with O_DIRECT on, off, and refused by the filesystem midway.
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from ckpt_rtn.formats import direct
from ckpt_rtn.formats.direct import BLOCK, BlockWriter

SIZE = 5 * BLOCK * 64 + 1234  # ends inside a block


@pytest.fixture
def on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as on disk, so that a tmpfs with O_DIRECT (Linux 6.6+) exercises the
    direct path as a disk would."""
    monkeypatch.setattr(direct, "in_memory", lambda fd: False)


def has_direct(directory: Path) -> bool:
    """Whether files in `directory` open with O_DIRECT."""
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except (AttributeError, OSError):
        return False
    return True


def refuse_the_first_direct_write(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """EINVAL for the first write while O_DIRECT is on; returns the offsets refused."""
    real = os.pwrite
    refused: List[int] = []

    def pwrite(fd: int, data, pos: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0) and not refused:
            refused.append(pos)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, pos)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    return refused


def pieces(data: bytes, seed: int) -> List[Tuple[int, memoryview]]:
    """`data` cut into pieces of 1 byte to ~300 KiB (some from block-aligned memory at an
    aligned offset, as the fast path wants), shuffled."""
    rng = random.Random(seed)
    cuts, pos = [], 0
    while pos < len(data):
        size = rng.choice([1, 7, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK,
                           rng.randrange(1, 300_000)])
        cuts.append((pos, min(size, len(data) - pos)))
        pos += size
    out = []
    for start, length in cuts:
        if start % BLOCK == 0 and rng.random() < 0.5:  # aligned memory too: written as is
            buffer = np.empty(length + BLOCK, dtype=np.uint8)
            skip = -buffer.ctypes.data % BLOCK
            buffer[skip:skip + length] = np.frombuffer(data, np.uint8, length, start)
            out.append((start, memoryview(buffer[skip:skip + length])))
        else:
            out.append((start, memoryview(data)[start:start + length]))
    rng.shuffle(out)
    return out


def write(path: Path, data: bytes, seed: int, *, threads: int, use_direct: bool) -> BlockWriter:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(data))  # as the format writers do first
        writer = BlockWriter(fd, use_direct)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda piece: writer.pwrite(piece[1], piece[0]), pieces(data, seed)))
        writer.finish()
    finally:
        os.close(fd)
    return writer


@pytest.mark.parametrize("use_direct", [True, False])
@pytest.mark.parametrize("threads", [1, 4])
def test_pieces_in_any_order_make_the_same_file(tmp_path: Path, use_direct: bool,
                                                threads: int, on_disk: None) -> None:
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    for seed in range(3):
        path = tmp_path / f"out{seed}"
        writer = write(path, data, seed, threads=threads, use_direct=use_direct)
        assert path.read_bytes() == data
        assert not writer._partial
        if not use_direct:
            assert not writer.direct


def test_a_filesystem_refusing_direct_writes_midway_gets_the_same_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: None) -> None:
    """EINVAL from a direct write (a filesystem that takes O_DIRECT at open but not the
    write): the writer turns it off, writes what it gathered, and goes on buffered."""
    refused = refuse_the_first_direct_write(monkeypatch)
    data = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    writer = write(tmp_path / "out", data, 5, threads=4, use_direct=True)
    assert (tmp_path / "out").read_bytes() == data
    assert not writer.direct  # refused (or never had O_DIRECT): buffered from then on
    assert bool(refused) == has_direct(tmp_path)


def test_no_thread_writes_unaligned_pieces_while_o_direct_is_still_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: None) -> None:
    """The fallback turns O_DIRECT off before it tells the other threads, which then write
    unaligned pieces as they are: slowed down here, the other order fails with EINVAL."""
    if not has_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    refused = refuse_the_first_direct_write(monkeypatch)
    set_direct = direct._set_direct

    def slowly(fd: int, on: bool) -> bool:
        if not on:
            time.sleep(0.05)  # the other threads run meanwhile
        return set_direct(fd, on)

    monkeypatch.setattr(direct, "_set_direct", slowly)
    data = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    for seed in range(3):
        refused.clear()
        writer = write(tmp_path / f"out{seed}", data, seed, threads=4, use_direct=True)
        assert (tmp_path / f"out{seed}").read_bytes() == data
        assert not writer.direct


def test_direct_writes_are_used_where_the_filesystem_has_them(tmp_path: Path,
                                                              on_disk: None) -> None:
    """Where open(O_DIRECT) works (ext4, xfs, tmpfs from Linux 6.6 on), the writer uses it:
    the file then never holds the bytes in the page cache."""
    if not has_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    data = bytes(range(256)) * (SIZE // 256)
    writer = write(tmp_path / "out", data, 2, threads=2, use_direct=True)
    assert writer.direct
    assert (tmp_path / "out").read_bytes() == data


def test_a_file_in_memory_is_written_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs pages are the page cache: O_DIRECT would bypass nothing and add a copy."""
    monkeypatch.setattr(direct, "in_memory", lambda fd: True)
    data = bytes(range(256)) * (SIZE // 256)
    writer = write(tmp_path / "out", data, 3, threads=2, use_direct=True)
    assert not writer.direct
    assert (tmp_path / "out").read_bytes() == data


def test_tmpfs_is_told_from_a_disk(tmp_path: Path) -> None:
    mounts = {line.split()[1]: line.split()[2] for line in open("/proc/mounts")}
    if mounts.get("/dev/shm") != "tmpfs" or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as shm, open(tmp_path / "f", "wb") as f:
        assert direct.in_memory(shm.fileno())
        assert direct.in_memory(f.fileno()) == (mounts.get(_mount_of(tmp_path, mounts))
                                                in ("tmpfs", "ramfs"))


def _mount_of(path: Path, mounts: Dict[str, str]) -> str:
    """The mount point `path` lives under (the longest one that prefixes it)."""
    real = str(path.resolve())
    return max((m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")),
               key=len)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_data_offset_is_where_a_tensors_bytes_start(tmp_path: Path, fmt: str) -> None:
    """What BufferPool.placed aligns the codes to: it must be where their bytes land."""
    from ckpt_rtn import dtypes, formats
    from ckpt_rtn.formats.tensor import TensorInfo
    rng = np.random.default_rng(5)
    arrays = {"a": rng.integers(-128, 127, (3, 7), dtype=np.int8),
              "big": rng.integers(-128, 127, (300, 41), dtype=np.int8),
              "s": rng.standard_normal(5).astype(np.float16)}
    kinds = {"a": dtypes.INT8, "big": dtypes.INT8, "s": dtypes.FLOAT16}
    infos = [TensorInfo.of(name, kinds[name], array.shape) for name, array in arrays.items()]
    path = tmp_path / f"out.{fmt}"
    with formats.open_writer(path, infos, format=fmt, metadata={}) as writer:
        offsets = {name: writer.data_offset(name) for name in arrays}
        for name, array in reversed(list(arrays.items())):
            writer.write(name, array)
    data = path.read_bytes()
    for name, array in arrays.items():
        assert data[offsets[name]:offsets[name] + array.nbytes] == array.tobytes(), name


LLAMA_LINEARS = [f"model.layers.0.{linear}.weight" for linear in (
    "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
    "feed_forward.w2", "feed_forward.w3")]
#: GPT-2's Conv1D-like Linear layers, stored [in, out]: their codes are turned to be stored.
GPT2_IN_OUT = [f"backbone.blocks.0.{linear}.weight" for linear in (
    "attention.projection", "output.mapping", "output.projection")]


@pytest.mark.parametrize("family, names", [("llama2", LLAMA_LINEARS), ("gpt2", GPT2_IN_OUT)])
def test_a_conversion_writes_its_codes_without_staging_them(
        tmp_path: Path, on_disk: None, monkeypatch: pytest.MonkeyPatch, family: str,
        names: List[str]) -> None:
    """The codes are made at addresses congruent to their place in the file, so that direct
    writes take them as they are (1.9 GB on 2 cores: 0.74 s, against 1.0-1.4 s staged)."""
    from safetensors.numpy import save_file
    from ckpt_rtn import buffers, converter
    from ckpt_rtn.options import ConvertOptions
    from ckpt_rtn.rules import RuleChoice
    # The pool places arrays modulo its own constant (buffers.py knows nothing of files):
    # direct writes take them as they are only while it is a multiple of the block.
    assert buffers.ALIGN % BLOCK == 0
    if not has_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    staged: List[int] = []
    placed: List[int] = []
    whole_blocks = BlockWriter._whole_blocks

    def counted(self: BlockWriter, view: memoryview, pos: int) -> None:
        (placed if direct._address(view) % BLOCK == 0 else staged).append(len(view))
        whole_blocks(self, view, pos)

    monkeypatch.setattr(BlockWriter, "_whole_blocks", counted)
    rng = np.random.default_rng(0)
    src = tmp_path / "model.safetensors"
    save_file({name: rng.standard_normal((640, 2048)).astype(np.float16) for name in names},
              str(src))  # 1.25 MiB of codes each: pooled
    out_channels = 2048 if family == "gpt2" else 640
    # Each weight's scale and zp_neg: `out_channels` fp16 values each, in whole blocks or not.
    scale_blocks = len(names) * 2 * (out_channels * 2 // BLOCK + 2)
    for fmt in ("ckpt", "safetensors"):
        staged.clear(), placed.clear()
        converter.convert(src, tmp_path / f"out.{fmt}",
                          ConvertOptions(rules=RuleChoice(config=family), workers=2))
        codes, ends = len(names) * 640 * 2048, len(names) * 2 * BLOCK
        assert sum(placed) >= codes - ends, fmt  # all but their partial end blocks
        assert sum(staged) <= scale_blocks * BLOCK, fmt  # only their scales' blocks, if any
