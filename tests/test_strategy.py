"""MindSpore strategy files: which parameter dimensions are split across ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_rtn.errors import FormatError
from ckpt_rtn.formats.strategy import Layout, is_strategy_file, read_strategy

from test_directory import strategy_file


def test_protobuf_written_by_mindspore(tmp_path: Path) -> None:
    path = strategy_file(tmp_path / "s.ckpt", {"a.weight": [-1, 0], "b.weight": [0, -1],
                                               "c.bias": [-1]}, ranks=4)
    assert is_strategy_file(path)
    layouts = read_strategy(path)
    assert layouts == {"a.weight": Layout((4,), (-1, 0)), "b.weight": Layout((4,), (0, -1)),
                       "c.bias": Layout((4,), (-1,))}
    assert layouts["a.weight"].splits(1) and not layouts["a.weight"].splits(0)
    assert layouts["b.weight"].splits(0) and not layouts["c.bias"].splits(0)


def test_json_strategy_and_axes_counted_from_the_right(tmp_path: Path) -> None:
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({"parallel_layout_item": {
        "w": {"dev_matrix": [2, 1, 4], "tensor_map": [1, 0], "field": 0},
        "v": {"dev_matrix": [2, 4], "tensor_map": [[1, 0], -1]}}}))
    assert is_strategy_file(path)
    layouts = read_strategy(path)
    assert not layouts["w"].splits(0)  # axis 1 from the right has size 1
    assert layouts["w"].splits(1)      # axis 0 from the right has size 4
    assert layouts["v"].splits(0) and not layouts["v"].splits(1)


def test_not_a_strategy(tmp_path: Path, fixtures: Path) -> None:
    assert not is_strategy_file(fixtures / "small.ckpt")  # a checkpoint starts with 0x0a
    other = tmp_path / "config.json"
    other.write_text('{"hidden_size": 64}')
    assert not is_strategy_file(other)
    with pytest.raises(FormatError, match="not a MindSpore strategy JSON"):
        read_strategy(other)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x08\x00\x1a\x7f\x0a")
    with pytest.raises(FormatError, match="corrupt strategy file"):
        read_strategy(broken)


def test_safetensors_and_odd_files_are_not_strategies(tmp_path: Path) -> None:
    st = tmp_path / "model.safetensors"
    st.write_bytes((264).to_bytes(8, "little") + b"{" + b" " * 263)  # starts with 0x08
    assert not is_strategy_file(st)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x08\xff\xff")  # 0x08, but no strategy inside
    assert not is_strategy_file(binary)
    bad_json = tmp_path / "s.json"
    bad_json.write_text('{"parallel_layout_item": {"x": [1]}}')
    assert not is_strategy_file(bad_json)
