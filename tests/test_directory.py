"""Sharded checkpoints: MindSpore rank_N layouts, sharded safetensors, manifest and --resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_rtn import dtypes
from ckpt_rtn.directory import MANIFEST, sha256_of
from ckpt_rtn.formats import TensorInfo, open_reader, open_writer
from ckpt_rtn.formats.atomic import TEMP_PATTERN
from ckpt_rtn.paths import LOCK_PATTERN
from ckpt_rtn.numerics import FloatFormat
from ckpt_rtn.golden_stick import legacy_names, ptq_names
from ckpt_rtn.rtn import W8, RtnSpec, quantize_rtn
from ckpt_rtn.schemes import get_scheme

from conftest import cli, llama_weights, ms_bytes, ms_load, ms_save, needs_mindspore

#: A MindSpore strategy file starts with ParallelStrategyMap.current_stage (field 1, varint).
STRATEGY_BYTES = b"\x08\x00\x1a\x0c\x0a\x04wq.w\x12\x04\x28\x00\x30\x00"


def read_all(path: Path) -> Dict[str, np.ndarray]:
    with open_reader(path) as reader:
        return {t.name: reader.read(t) for t in reader.tensors}


def write_ckpt(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    infos = [TensorInfo.of(k, dtypes.FLOAT16, a.shape) for k, a in arrays.items()]
    with open_writer(path, infos, format="ckpt", metadata={}) as writer:
        for k, a in arrays.items():
            writer.write(k, a)


def test_rank_layout_row_split_equals_quantizing_the_whole(tmp_path: Path) -> None:
    full = {k: v.astype(np.float16) for k, v in llama_weights(layers=1).items()}
    src = tmp_path / "tp2"
    for rank in (0, 1):
        (src / f"rank_{rank}").mkdir(parents=True)
        local = {k: np.array_split(v, 2)[rank] if k.endswith(("wq.weight", "w1.weight")) else v
                 for k, v in full.items()}
        ms_save(src / f"rank_{rank}" / "llama-1_1.ckpt", local)
    (src / "strategy").mkdir()
    (src / "strategy" / "ckpt_strategy_rank_0.ckpt").write_bytes(STRATEGY_BYTES)
    result = cli("convert", src, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "strategy" / "ckpt_strategy_rank_0.ckpt").read_bytes() == STRATEGY_BYTES
    ranks = [ms_load(out / f"rank_{r}" / "llama-1_1.ckpt") for r in (0, 1)]
    for layer in ("model.layers.0.attention.wq", "model.layers.0.feed_forward.w1"):
        whole = quantize_rtn(full[layer + ".weight"], FloatFormat.FLOAT16)
        q = np.concatenate([r[layer + "._handler.weight"].asnumpy() for r in ranks])
        scale = b"".join(ms_bytes(r[layer + "._weight_quantizer.scale"]) for r in ranks)
        np.testing.assert_array_equal(q, whole.q)
        assert scale == whole.scale.tobytes()
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {"rank_0/llama-1_1.ckpt", "rank_1/llama-1_1.ckpt",
                                      "strategy/ckpt_strategy_rank_0.ckpt"}
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(str(out / rel))
        assert entry["size"] == (out / rel).stat().st_size
    entry = manifest["files"]["rank_0/llama-1_1.ckpt"]
    assert entry["tensor_count"] == len(ranks[0]) == len(entry["tensors"])
    assert {"name": "model.layers.0.attention.wq._handler.weight", "dtype": "Int8",
            "shape": [32, 64], "nbytes": 2048} in entry["tensors"]


def write_two_shards(src: Path, weights: Dict[str, np.ndarray],
                     save: Callable[[Path, Dict[str, np.ndarray]], None],
                     metadata: Dict[str, object]) -> Dict[str, List[str]]:
    """A new directory `src` of `weights` in two safetensors shards (half the names each,
    written by `save`) and their index (with `metadata`); returns each shard's names."""
    names = list(weights)
    src.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save(src / shard, {k: weights[k] for k in keys})
    index = {"metadata": metadata,
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def test_a_file_named_like_a_manifest_is_copied_below_the_top(tmp_path: Path) -> None:
    """Only DST's own manifests are left out of the copy: in a subdirectory, where nothing
    of ours lands, such a file was dropped without a word."""
    src, dst = tmp_path / "src", tmp_path / "out"
    (src / "notes").mkdir(parents=True)
    write_ckpt(src / "net.ckpt", {k: v.astype(np.float16) for k, v in llama_weights().items()})
    for name in (MANIFEST, "ckpt-rtn-manifest.part-0-of-1.json"):
        (src / "notes" / name).write_text('{"theirs": 1}')
    (src / MANIFEST).write_text('{"theirs": 1}')  # where ours goes: not copied
    assert cli("convert", src, dst, "-q", "--config", "llama2").exit_code == 0
    for name in (MANIFEST, "ckpt-rtn-manifest.part-0-of-1.json"):
        assert (dst / "notes" / name).read_text() == '{"theirs": 1}'
    assert "theirs" not in (dst / MANIFEST).read_text()
    result = cli("verify", src, dst)
    assert result.exit_code == 0, result.stdout


def test_sharded_safetensors_index_is_rewritten(tmp_path: Path) -> None:
    weights = {k: v.astype(np.float16) for k, v in llama_weights(layers=2).items()}
    src = tmp_path / "hf"
    shards = write_two_shards(src, weights, ms_save, {
        "total_size": sum(w.nbytes for w in weights.values()), "note": "x"})
    (src / "config.json").write_text('{"hidden_size": 64}')
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "converted 2 shards" in result.stdout and "rewrote 1 indexes" in result.stdout
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == '{"hidden_size": 64}'
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = {}
    total = 0
    for shard in shards:
        with open_reader(out / shard) as reader:
            assert reader.metadata["format"] == "ms"
            for info in reader.tensors:
                on_disk[info.name] = shard
                total += info.nbytes
    assert new_index["weight_map"] == on_disk
    assert "model.layers.0.attention.wq._weight_quantizer.scale" in on_disk
    assert "model.layers.0.attention.wq.weight" not in on_disk
    assert new_index["metadata"] == {"total_size": total, "note": "x"}


def test_a_failed_overwrite_leaves_no_file_of_the_earlier_output(tmp_path: Path) -> None:
    """--overwrite removes the earlier output before it converts; it kept the files this run
    writes again until their turn came. When the run then failed on its second shard, DST
    held the new first shard beside the earlier second one (two schemes' tensors, both
    loaded by a loader that takes every *.safetensors) and the earlier index and config,
    the index naming the earlier run's tensors."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights(layers=2).items()}
    src, bad, dst = tmp_path / "src", tmp_path / "bad", tmp_path / "dst"
    shards = write_two_shards(src, weights, ms_save, {})
    (src / "config.json").write_text('{"hidden_size": 64}')
    assert cli("convert", src, dst, "-q").exit_code == 0
    second = "model-00002-of-00002.safetensors"
    broken = next(name for name in shards[second] if name.endswith("wq.weight"))
    weights[broken] = weights[broken].copy()
    weights[broken][0, 0] = np.nan
    write_two_shards(bad, weights, ms_save, {})
    (bad / "config.json").write_text('{"hidden_size": 64}')

    result = cli("convert", bad, dst, "--overwrite", "--scheme", "w8a16-ptq", "-q")
    assert result.exit_code == 2 and "inf or NaN" in result.stderr
    assert sorted(os.listdir(dst)) == [MANIFEST, "model-00001-of-00002.safetensors"]
    with open_reader(dst / "model-00001-of-00002.safetensors") as reader:
        assert any(info.name.endswith("._layer.matmul.weight_scale") for info in reader.tensors)


def written_bytes(dst: Path) -> int:
    """What a whole run wrote into `dst`, its manifest aside."""
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file() and p.name != MANIFEST)


def test_a_directory_dry_run_gives_each_shard_and_the_exact_output_size(
        tmp_path: Path) -> None:
    """--dry-run was refused for a directory. It plans every shard from its header, makes
    the same checks as a whole run before it writes, and gives the bytes of every file the
    run then writes (the rewritten index and the copies too), writing nothing."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights(layers=2).items()}
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_two_shards(src, weights, lambda path, arrays: save_file(arrays, str(path)),
                     {"total_size": 1})
    (src / "config.json").write_text('{"hidden_size": 64}')
    planned = cli("convert", src, dst, "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    assert not dst.exists()
    rows = planned.stdout.splitlines()
    assert rows[1].startswith("model-00001-of-00002.safetensors  7 of 10 ")
    assert rows[2].startswith("model-00002-of-00002.safetensors  7 of 11 ")
    assert rows[3] == "would also write config.json, model.safetensors.index.json"
    size = int(re.search(r"output: (\d+) bytes", rows[4]).group(1))
    assert "14 of 21 tensors in 2 shards would be quantized (llama2 rules" in rows[4]
    assert cli("convert", src, dst, "-q").exit_code == 0
    assert written_bytes(dst) == size
    again = cli("convert", src, dst, "--dry-run")  # as a run would: DST is not empty
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert cli("convert", src, dst, "--dry-run", "--overwrite").stdout == planned.stdout
    for extra in (["--resume"], ["--part", "0/2"], ["--ray", "local"],
                  ["--report", str(tmp_path / "r.json")]):
        refused = cli("convert", src, tmp_path / "other", "--dry-run", *extra)
        assert refused.exit_code == 2, extra
        assert refused.stderr == f"error: --dry-run plans a whole run, which {extra[0]} is not\n"
    assert not (tmp_path / "other").exists() and not (tmp_path / "r.json").exists()


def test_a_tensor_held_by_two_shards_stays_where_the_index_points(tmp_path: Path) -> None:
    """The input holds a copied tensor twice, with other values: the index picked the first
    shard's, which a loader reads. The rewritten index pointed at the last shard's (and
    counted it twice in total_size), and the converted model loaded other values, exit 0."""
    src = tmp_path / "hf"
    src.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)
    save_file({"model.norm.weight": np.ones(64, np.float16)}, str(src / first))
    save_file({"model.norm.weight": np.zeros(64, np.float16),
               "model.layers.0.self_attn.q_proj.weight": weight}, str(src / second))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": first, "model.layers.0.self_attn.q_proj.weight": second}}))
    result = cli("convert", src, tmp_path / "out", "--config", "hf-llama", "-q")
    assert result.exit_code == 0, result.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    names = legacy_names("model.layers.0.self_attn.q_proj")
    assert index["weight_map"] == {"model.norm.weight": first, names.weight: second,
                                   names.scale: second, names.zp_neg: second}
    assert index["metadata"]["total_size"] == 64 * 2 + 8 * 64 + 2 * 8 * 2
    assert cli("verify", src, tmp_path / "out").exit_code == 0


#: These shards hold one weight each: too few names to detect the family from.
LLAMA2 = ("--config", "llama2")


def make_shards(src: Path, count: int, rows: int = 4096, cols: int = 4096) -> None:
    """`count` rank directories of one large weight each (~rows*cols*2 bytes)."""
    block = np.random.default_rng(0).standard_normal((256, cols)).astype(np.float16)
    for rank in range(count):
        (src / f"rank_{rank}").mkdir(parents=True)
        weight = np.tile(block, (rows // 256, 1)) * np.float16(rank + 1)
        write_ckpt(src / f"rank_{rank}" / "net.ckpt",
                   {f"model.layers.{rank}.attention.wq.weight": weight})


def output_files(out: Path) -> List[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(root / "src", 12)
    result = cli("convert", root / "src", root / "reference", "-q", *LLAMA2)
    assert result.exit_code == 0, result.stderr
    return root / "src", root / "reference"


def start_convert(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckpt_rtn", "convert", "-q", "--workers", "1",
                             *LLAMA2, str(src), str(dst), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_shard(dst: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((dst / MANIFEST).read_text())["files"]:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    raise AssertionError(f"no shard finished before the run ended (exit {proc.poll()})")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["crash", "ctrl-c"])
def test_killed_run_leaves_no_partial_file_and_resume_finishes(shard_dirs, tmp_path: Path,
                                                               how: signal.Signals) -> None:
    src, reference = shard_dirs
    dst = tmp_path / "out"
    proc = start_convert(src, dst)
    wait_for_first_shard(dst, proc)
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "--resume" in stderr
        assert not [p for p in dst.rglob("*") if TEMP_PATTERN.fullmatch(p.name)]
    finished = [f for f in output_files(dst) if f != MANIFEST and not
                TEMP_PATTERN.fullmatch(os.path.basename(f)) and not  # a crash leaves these
                LOCK_PATTERN.fullmatch(os.path.basename(f))]
    assert 0 < len(finished) < 12
    for rel in finished:  # whatever carries a final name is complete and correct
        assert (dst / rel).read_bytes() == (reference / rel).read_bytes(), rel

    again = cli("convert", src, dst, "--resume", *LLAMA2)
    assert again.exit_code == 0, again.stderr
    assert int(again.stdout.split("skipped ")[1].split()[0]) >= 1  # finished shards kept
    assert output_files(dst) == output_files(reference)
    for rel in output_files(reference):
        assert (dst / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_resume_redoes_a_damaged_output(shard_dirs, tmp_path: Path) -> None:
    src, reference = shard_dirs
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "-q", *LLAMA2).exit_code == 0
    damaged = dst / "rank_3" / "net.ckpt"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    result = cli("convert", src, dst, "--resume", *LLAMA2)
    assert result.exit_code == 0 and "converted 1 shards" in result.stdout
    assert damaged.read_bytes() == (reference / "rank_3" / "net.ckpt").read_bytes()


def test_resume_with_other_settings_is_refused(shard_dirs, tmp_path: Path) -> None:
    src, _ = shard_dirs
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "-q", *LLAMA2).exit_code == 0
    result = cli("convert", src, dst, "--resume", "--blacklist", "layers.3", *LLAMA2)
    assert result.exit_code == 2 and "other settings" in result.stderr
    result = cli("convert", src, dst, *LLAMA2)
    assert result.exit_code == 2 and "--resume" in result.stderr


def test_directory_options_that_do_not_apply(shard_dirs, tmp_path: Path) -> None:
    src, _ = shard_dirs
    result = cli("convert", src, tmp_path / "out", "--format", "ckpt")
    assert result.exit_code == 2 and "--format applies to a single file" in result.stderr
    single = src / "rank_0" / "net.ckpt"
    result = cli("convert", single, tmp_path / "x.ckpt", "--resume")
    assert result.exit_code == 2 and "--resume" in result.stderr
    result = cli("convert", src, src / "inside")
    assert result.exit_code == 2 and "inside the input" in result.stderr


def strategy_file(path: Path, layouts: Dict[str, List[int]], ranks: int) -> Path:
    """A protobuf strategy file written with MindSpore's own node_strategy_pb2."""
    needs_mindspore()
    from mindspore.train import node_strategy_pb2 as pb

    strategy = pb.ParallelStrategyMap()
    strategy.current_stage = 0
    for name, tensor_map in layouts.items():
        item = strategy.parallel_layout_item.add()
        item.param_name = name
        item.parallel_layouts.dev_matrix.add().dim.extend([ranks])
        item.parallel_layouts.tensor_map.add().dim.extend(tensor_map)
        item.parallel_layouts.field = 0
        item.parallel_layouts.opt_weight_shard_step = 0
        item.parallel_layouts.opt_weight_shard_size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(strategy.SerializeToString())
    return path


#: Row-parallel Linear weights: split along their input channels under tensor parallelism.
COLUMN_SPLIT = ("model.layers.0.attention.wo.weight", "model.layers.0.feed_forward.w2.weight")


def write_tp2(src: Path,
              other_layouts: Optional[Dict[str, List[int]]] = None) -> Dict[str, np.ndarray]:
    """A one-layer fp16 Llama saved as two TP ranks, `COLUMN_SPLIT` split along input
    channels (rank 0's half of wo has the larger maxima), with the strategy file saying so
    (plus `other_layouts`); returns the whole weights."""
    full = {k: v.astype(np.float16) for k, v in llama_weights(layers=1).items()}
    full["model.layers.0.attention.wo.weight"][:, :32] *= 4
    for rank in (0, 1):
        local = {k: np.array_split(v, 2, axis=1)[rank] if k in COLUMN_SPLIT else v
                 for k, v in full.items()}
        (src / f"rank_{rank}").mkdir(parents=True)
        write_ckpt(src / f"rank_{rank}" / "net.ckpt", local)
    strategy_file(src / "strategy" / "ckpt_strategy.ckpt",
                  {name: [-1, 0] for name in COLUMN_SPLIT} | (other_layouts or {}), ranks=2)
    return full


@pytest.mark.parametrize("args,names,spec", [
    ((), legacy_names, W8),
    (("--scheme", "w8a16-ptq", "--asymmetric"), ptq_names,
     RtnSpec(float64_scale=True, symmetric=False))], ids=["w8a16", "w8a16-ptq-asymmetric"])
def test_input_split_weights_get_the_whole_weights_scale(tmp_path: Path, args, names,
                                                         spec: RtnSpec) -> None:
    """Row-parallel wo/w2 under TP: each rank holds some input channels of every row. With
    the strategy file, every rank's slice gets the scale (and zero point) of the whole
    weight (Golden Stick's replicated scale) and its codes are the whole weight's columns."""
    src = tmp_path / "tp2"
    full = write_tp2(src, {"model.layers.0.attention.wq.weight": [0, -1]})
    result = cli("convert", src, tmp_path / "out", *args)
    assert result.exit_code == 0, result.stderr
    assert "scaled 2 input-split weights over all ranks" in result.stdout
    ranks = [read_all(tmp_path / "out" / f"rank_{r}" / "net.ckpt") for r in (0, 1)]
    for name in COLUMN_SPLIT:
        stored = names(name[:-len(".weight")])
        whole = quantize_rtn(full[name], FloatFormat.FLOAT16, spec)
        np.testing.assert_array_equal(np.concatenate([r[stored.weight] for r in ranks], axis=1),
                                      whole.q)
        for r in ranks:
            assert r[stored.scale].tobytes() == whole.scale.tobytes()
            np.testing.assert_array_equal(r[stored.zp_neg], whole.zp_neg)
    # Without the strategy file each rank would only see its own half: other scales.
    (src / "strategy" / "ckpt_strategy.ckpt").unlink()
    assert cli("convert", src, tmp_path / "no_strategy", "-q", *args).exit_code == 0
    alone = read_all(tmp_path / "no_strategy" / "rank_1" / "net.ckpt")
    scale = names("model.layers.0.attention.wo").scale
    assert alone[scale].tobytes() != ranks[1][scale].tobytes()


def test_non_finite_weight_in_an_input_split_slice_is_refused(tmp_path: Path) -> None:
    full = {k: v.astype(np.float16) for k, v in llama_weights(layers=1).items()}
    wo = "model.layers.0.attention.wo.weight"
    src = tmp_path / "tp2"
    for rank in (0, 1):
        local = {k: np.array_split(v, 2, axis=1)[rank].copy() if k == wo else v
                 for k, v in full.items()}
        if rank == 1:
            local[wo][3, 5] = np.nan
        (src / f"rank_{rank}").mkdir(parents=True)
        write_ckpt(src / f"rank_{rank}" / "net.ckpt", local)
    strategy_file(src / "strategy.ckpt", {wo: [-1, 0]}, ranks=2)
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 2
    assert "weight contains inf or NaN values" in result.stderr and wo in result.stderr


@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-ptq"])
@pytest.mark.parametrize("where", ["one shard", "another shard"])
def test_an_input_tensor_named_as_an_output_is_refused_before_writing(
        tmp_path: Path, scheme: str, where: str) -> None:
    """An input tensor that holds the name the scheme gives a quantized layer's scale: in the
    layer's own shard it was a traceback; in another shard both files held the name, the
    index pointed at the copied tensor (scales of 1 for the codes), and `verify` agreed.
    Refused in one line, before any shard is written."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights().items()}
    layer = "model.layers.0.attention.wq"
    clash = get_scheme(scheme).names(layer).scale
    weights[clash] = np.ones(weights[layer + ".weight"].shape[0], np.float16)
    if where == "one shard":  # beside its layer, in the first shard
        weights = {clash: weights.pop(clash), **weights}
    src, dst = tmp_path / "src", tmp_path / "out"
    shards = write_two_shards(src, weights, lambda path, arrays: save_file(arrays, path), {})
    assert (clash in shards["model-00001-of-00002.safetensors"]) == (where == "one shard")
    result = cli("convert", src, dst, "--scheme", scheme, "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "would both be written as " + repr(clash) in result.stderr
    assert not dst.exists()


def test_overwrite_never_removes_an_input_reached_through_a_link(tmp_path: Path) -> None:
    """SRC may reach into DST's earlier output through a link (to a file, or to a directory):
    --overwrite removed that file as stale, and then could not read its input (exit 2, the
    only copy gone)."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights().items()}
    src, dst = tmp_path / "src", tmp_path / "out"
    write_two_shards(src, weights, ms_save, {})
    (src / "notes.txt").write_text("precious")
    (src / "tok").mkdir()
    (src / "tok" / "vocab.txt").write_text("words")
    assert cli("convert", src, dst, "-q").exit_code == 0
    other = tmp_path / "other"
    write_two_shards(other, weights, ms_save, {})
    (other / "docs").mkdir()
    (other / "docs" / "notes.txt").symlink_to(dst / "notes.txt")
    (other / "vocab").symlink_to(dst / "tok")
    result = cli("convert", other, dst, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (dst / "notes.txt").read_text() == "precious"
    assert (dst / "tok" / "vocab.txt").read_text() == "words"
    assert (dst / "docs" / "notes.txt").read_text() == "precious"


def test_a_bias_in_another_shard_than_its_quantized_weight_is_refused(tmp_path: Path) -> None:
    """w8a16 renames a quantized layer's bias (`_handler.bias`); one in another shard of the
    index kept its old name, exit 0, and `verify` agreed."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights().items()}
    bias = "model.layers.0.attention.wq.bias"
    weights[bias] = np.ones(weights["model.layers.0.attention.wq.weight"].shape[0], np.float16)
    src, dst = tmp_path / "src", tmp_path / "out"
    shards = write_two_shards(src, weights, lambda path, arrays: save_file(arrays, path), {})
    assert bias in shards["model-00002-of-00002.safetensors"]
    result = cli("convert", src, dst, "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"tensor {bias!r} is the bias of a layer quantized in model-00001" in result.stderr
    assert not dst.exists()
