"""`convert --part I/N`: a directory converted as N independent parts, then completed by
`--resume`, is byte for byte one plain run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from ckpt_rtn import paths
from ckpt_rtn.directory import MANIFEST
from ckpt_rtn.options import Part, assign

from conftest import cli, llama_weights
from test_directory import strategy_file, write_ckpt

LLAMA2 = ("--config", "llama2")
#: Row-parallel weights, split along their input channels: each part must still give every
#: rank's slice the whole weight's scale, which it takes from the other ranks' shards.
COLUMN_SPLIT = ("model.layers.0.attention.wo.weight", "model.layers.0.feed_forward.w2.weight")


def make_source(src: Path) -> None:
    """Four TP ranks (input-split wo/w2, with a strategy file), two sharded safetensors with
    an index, and a file to copy: six shards of three layouts."""
    full = {k: v.astype(np.float16) for k, v in llama_weights(layers=1).items()}
    full["model.layers.0.attention.wo.weight"][:, :16] *= 4
    for rank in range(4):
        local = {k: np.array_split(v, 4, axis=1)[rank] if k in COLUMN_SPLIT else v
                 for k, v in full.items()}
        (src / f"rank_{rank}").mkdir(parents=True)
        write_ckpt(src / f"rank_{rank}" / "net.ckpt", local)
    strategy_file(src / "strategy" / "ckpt_strategy.ckpt",
                  {name: [-1, 0] for name in COLUMN_SPLIT}, ranks=4)
    from safetensors.numpy import save_file
    hf = src / "hf"
    hf.mkdir()
    names = sorted(full)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: full[k] for k in keys}, str(hf / shard))
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: s for s, ks in halves.items()
                                                       for k in ks}}))
    (hf / "README.txt").write_text("copied as is\n")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("parts")
    make_source(root / "src")
    result = cli("convert", root / "src", root / "reference", "-q", *LLAMA2)
    assert result.exit_code == 0, result.stderr
    assert "scaled 2 input-split weights" in cli("convert", root / "src", root / "again",
                                                 *LLAMA2).stdout
    return root / "src", root / "reference"


def files(out: Path) -> Dict[str, bytes]:
    """Every file under `out` but the lock files, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not paths.LOCK_PATTERN.fullmatch(p.name)}


def part_manifests(dst: Path) -> List[str]:
    return sorted(p.name for p in dst.glob("ckpt-rtn-manifest.part-*.json"))


def check_parts_then_resume(src: Path, reference: Path, dst: Path) -> None:
    """Each part wrote only shards, and each shard once; --resume completes the rest."""
    written = files(dst)
    assert part_manifests(dst) == [f"ckpt-rtn-manifest.part-{i}-of-3.json" for i in range(3)]
    recorded = [rel for name in part_manifests(dst)
                for rel in json.loads((dst / name).read_text())["files"]]
    shards = sorted(rel for rel in files(reference) if rel.endswith((".ckpt", ".safetensors"))
                    and not rel.startswith("strategy"))
    assert sorted(recorded) == shards  # each shard in exactly one part
    assert sorted(rel for rel in written if not rel.startswith(MANIFEST[:-5])) == shards
    for rel in shards:
        assert written[rel] == (reference / rel).read_bytes(), rel

    result = cli("convert", src, dst, "--resume", *LLAMA2)
    assert result.exit_code == 0, result.stderr
    assert "converted 0 shards" in result.stdout and "skipped 6 already done" in result.stdout
    assert files(dst) == files(reference)  # the manifest too, byte for byte
    assert part_manifests(dst) == []


def test_parts_one_after_another_then_resume_equal_one_run(source, tmp_path: Path) -> None:
    src, reference = source
    dst = tmp_path / "out"
    for index in range(3):
        result = cli("convert", src, dst, "--part", f"{index}/3", *LLAMA2)
        assert result.exit_code == 0, result.stderr
        assert f"part {index}/3" in result.stdout
    check_parts_then_resume(src, reference, dst)


def test_parts_at_once_then_resume_equal_one_run(source, tmp_path: Path) -> None:
    src, reference = source
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-m", "ckpt_rtn", "convert", "-q", "--workers", "1",
                              *LLAMA2, "--part", f"{index}/3", str(src), str(dst)],
                             stderr=subprocess.PIPE, text=True, env=env) for index in range(3)]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    check_parts_then_resume(src, reference, dst)


def test_a_part_again_skips_what_it_did(source, tmp_path: Path) -> None:
    src, _ = source
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "-q", "--part", "1/3", *LLAMA2).exit_code == 0
    again = cli("convert", src, dst, "--part", "1/3", *LLAMA2)
    assert again.exit_code == 0 and "converted 0 shards" in again.stdout, again.stderr


@pytest.mark.parametrize("value,reason", [
    ("3/3", "must be 0 to 2"), ("1/0", "N must be 1 or more"), ("-1/3", "expected I/N"),
    ("a/3", "expected I/N"), ("1/2/3", "expected I/N"), ("2", "expected I/N")])
def test_bad_part_values_are_one_line_errors(source, tmp_path: Path, value: str,
                                             reason: str) -> None:
    src, _ = source
    result = cli("convert", src, tmp_path / "out", "--part", value, *LLAMA2)
    assert result.exit_code == 2 and reason in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_part_of_a_single_file_is_refused(source, tmp_path: Path) -> None:
    src, _ = source
    result = cli("convert", src / "rank_0" / "net.ckpt", tmp_path / "x.ckpt", "--part", "0/2")
    assert result.exit_code == 2 and "directory" in result.stderr
    assert result.stderr.count("\n") == 1


def test_parts_with_other_settings_are_refused(source, tmp_path: Path) -> None:
    src, _ = source
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "-q", "--part", "0/2", *LLAMA2,
               "--scheme", "w8a16-ptq").exit_code == 0
    other = cli("convert", src, dst, "--part", "1/2", *LLAMA2)  # refused before any work
    assert other.exit_code == 2 and "other settings" in other.stderr, other.stderr
    assert "part-0-of-2" in other.stderr
    merge = cli("convert", src, dst, "--resume", *LLAMA2)  # and at the merge
    assert merge.exit_code == 2 and "other settings" in merge.stderr, merge.stderr
    assert part_manifests(dst) == ["ckpt-rtn-manifest.part-0-of-2.json"]


def test_parts_share_the_directory_but_a_final_run_waits_for_them(source,
                                                                  tmp_path: Path) -> None:
    src, _ = source
    dst = tmp_path / "out"
    dst.mkdir()
    with paths.destination_lock(dst, directory=True, shared=True):  # a part is running
        part = cli("convert", src, dst, "-q", "--part", "0/3", *LLAMA2)
        assert part.exit_code == 0, part.stderr
        final = cli("convert", src, dst, "--resume", *LLAMA2)
        assert final.exit_code == 2 and "another ckpt-rtn run" in final.stderr
    with paths.destination_lock(dst, directory=True):  # a final run is running
        part = cli("convert", src, dst, "--part", "1/3", *LLAMA2)
        assert part.exit_code == 2 and "another ckpt-rtn run" in part.stderr
    with paths.destination_lock(dst / "ckpt-rtn-manifest.part-2-of-3.json"):  # part 2 runs
        twice = cli("convert", src, dst, "--part", "2/3", *LLAMA2)
        assert twice.exit_code == 2 and "another ckpt-rtn run" in twice.stderr


def test_a_refusal_names_the_part_that_holds_the_directory(source, tmp_path: Path) -> None:
    """Parts share DST's lock and each writes its PID into it, so the file names the last
    part that started. A final run refused while part 0 still ran named part 1's PID, a
    process that had already ended; it names the holders the kernel lists."""
    src, _ = source
    dst = tmp_path / "out"
    dst.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from ckpt_rtn import paths\n"
         "with paths.destination_lock(sys.argv[1], directory=True, shared=True):\n"
         "    print('held', flush=True); time.sleep(60)\n", str(dst)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        part = cli("convert", src, dst, "-q", "--part", "0/3", *LLAMA2)  # then ends
        assert part.exit_code == 0, part.stderr
        final = cli("convert", src, dst, "--resume", *LLAMA2)
        assert final.exit_code == 2
        assert f"is being written by another ckpt-rtn run (pid {holder.pid})" in final.stderr
    finally:
        holder.kill()
        holder.wait()


def test_assignment_is_balanced_by_bytes_and_deterministic() -> None:
    sizes = {"a": 10, "b": 70, "c": 30, "d": 30, "e": 20, "f": 40}
    assert assign(sizes, 3) == [["b"], ["f", "e", "a"], ["c", "d"]]
    assert assign(dict(reversed(sizes.items())), 3) == assign(sizes, 3)
    assert Part(0, 1).shards(sizes) == list(sizes)
    assert sorted(rel for i in range(8) for rel in Part(i, 8).shards(sizes)) == sorted(sizes)


def test_ray_without_the_extra_is_one_line(source, tmp_path: Path) -> None:
    """--ray where Ray cannot be imported: the extra to install, in one line."""
    src, _ = source
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "ckpt_rtn", "convert", str(src),
                           str(tmp_path / "out"), "--ray", *LLAMA2],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'ckpt-rtn[ray]'" in done.stderr


def copy_source(src: Path, to: Path) -> Path:
    import shutil
    return Path(shutil.copytree(src, to))  # copies the modification times too


@pytest.mark.parametrize("change", ["edited", "removed", "added"])
@pytest.mark.parametrize("how", ["resume", "part"])
def test_a_source_changed_since_the_manifest_is_refused(source, tmp_path: Path, change: str,
                                                        how: str) -> None:
    """Shards made from the old SRC would be kept beside new ones (and a row-parallel
    weight's scales come from every rank): once SRC changed, nothing in DST is trusted."""
    src = copy_source(source[0], tmp_path / "src")
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "--part", "0/2", "-q", *LLAMA2).exit_code == 0
    shard = src / "rank_0" / "net.ckpt"
    if change == "edited":  # the same names and shapes, other values
        weights = {k: v.astype(np.float16) for k, v in llama_weights(seed=9, layers=1).items()}
        write_ckpt(shard, {k: np.array_split(v, 4, axis=1)[0] if k in COLUMN_SPLIT else v
                           for k, v in weights.items()})
    elif change == "removed":
        shard.unlink()
    else:
        (src / "hf" / "notes.txt").write_text("new\n")
    args = ("--resume",) if how == "resume" else ("--part", "1/2")
    result = cli("convert", src, dst, *args, *LLAMA2)
    assert result.exit_code == 2, result.stdout
    rel = "hf/notes.txt" if change == "added" else "rank_0/net.ckpt"
    how_now = {"edited": "has changed (its size or modification time)", "removed": "is gone",
               "added": "is new"}[change]
    assert result.stderr.splitlines() == [
        f"error: {dst / 'ckpt-rtn-manifest.part-0-of-2.json'}: the input's {rel} {how_now} "
        "since this manifest was written; start over in a new directory, or with a whole "
        "run's --overwrite (or remove DST to start the parts over)"]
    assert cli("convert", src, dst, "--overwrite", "-q", *LLAMA2).exit_code == 0


def test_resume_checks_the_tensors_a_manifest_lists_and_keeps_only_its_files(
        source, tmp_path: Path) -> None:
    """The indexes are written from the manifest's tensor lists: a list that does not match
    its file (edited by hand) must not make a wrong index, nor an entry for a file this run
    does not write survive."""
    src, reference = source
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "-q", *LLAMA2).exit_code == 0
    (dst / "hf" / "model.safetensors.index.json").unlink()
    manifest = json.loads((dst / MANIFEST).read_text())
    listed = manifest["files"]["hf/model-00002-of-00002.safetensors"]["tensors"]
    listed[0]["name"] = "bogus.weight"
    manifest["files"]["../../etc/passwd"] = dict(manifest["files"]["hf/README.txt"])
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    result = cli("convert", src, dst, "--resume", *LLAMA2)
    assert result.exit_code == 0, result.stderr
    assert "converted 1 shards" in result.stdout
    assert files(dst) == files(reference)


def test_the_final_resume_removes_dead_parts_lock_files(source, tmp_path: Path) -> None:
    src, reference = source
    dst = tmp_path / "out"
    for index in range(2):
        assert cli("convert", src, dst, "--part", f"{index}/2", "-q", *LLAMA2).exit_code == 0
    dead = dst / ".ckpt-rtn-manifest.part-1-of-2.json.ckpt-rtn.lock"
    dead.write_text("4194304\n")  # as a SIGKILLed part leaves it
    assert cli("convert", src, dst, "--resume", "-q", *LLAMA2).exit_code == 0
    assert not [p.name for p in dst.iterdir() if paths.LOCK_PATTERN.fullmatch(p.name)]
    assert files(dst) == files(reference)
