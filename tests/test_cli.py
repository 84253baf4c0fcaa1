"""The `ckpt-rtn` command line: help, inspect, convert options, dry-run, summary."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Union

import numpy as np
import pytest
from click.testing import Result

from ckpt_rtn import dtypes, formats
from ckpt_rtn.formats import TensorInfo

from conftest import FIXTURES, cli
SMALL = FIXTURES / "small.ckpt"
SMALL_CRC = FIXTURES / "small_crc.ckpt"

#: small.ckpt as the fixtures README describes it: name -> (dtype, shape, bytes).
SMALL_TENSORS = {
    "a.fp16": ("Float16", "[2, 3]", 12),
    "b.fp32": ("Float32", "[4]", 16),
    "c.bf16": ("BFloat16", "[2, 2]", 8),
    "d.int8": ("Int8", "[2, 3]", 6),
    "e.scalar_i64": ("Int64", "[]", 8),
    "f.bool": ("Bool", "[3]", 3),
    "g.f64": ("Float64", "[1, 1]", 8),
    "h.u8": ("UInt8", "[3]", 3),
    "epoch_num": ("Int64", "[]", 8),
    "note": ("str", "[]", 20),
    "lr": ("Float32", "[]", 4),
}

LAYERS = 2
ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w1", "w2", "w3")
HANDLER = "._handler.weight"


def run(*args: object) -> Result:
    return cli(*args)


def ok(result: Result) -> Result:
    assert result.exception is None, (result.exception, result.stderr)
    assert result.exit_code == 0, result.stderr
    return result


def linear_layers() -> List[str]:
    layers = []
    for i in range(LAYERS):
        layers += [f"model.layers.{i}.attention.{w}" for w in ATTENTION]
        layers += [f"model.layers.{i}.feed_forward.{w}" for w in FEED_FORWARD]
    return layers


def llama_infos() -> List[TensorInfo]:
    f16 = dtypes.FLOAT16
    infos = [TensorInfo.of("model.tok_embeddings.embedding_weight", f16, [32, 64])]
    for i in range(LAYERS):
        infos += [TensorInfo.of(f"model.layers.{i}.attention.{w}.weight", f16, [64, 64])
                  for w in ATTENTION]
        infos += [TensorInfo.of(f"model.layers.{i}.feed_forward.{w}.weight", f16, [64, 64])
                  for w in FEED_FORWARD]
        infos.append(TensorInfo.of(f"model.layers.{i}.attention_norm.weight", f16, [64]))
    infos.append(TensorInfo.of("model.norm_out.weight", f16, [64]))
    infos.append(TensorInfo.of("lm_head.weight", f16, [32, 64]))
    return infos


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-shaped fp16 .ckpt from our own writer: 14 Linear weights + lm_head."""
    path = tmp_path_factory.mktemp("llama") / "llama.ckpt"
    rng = np.random.default_rng(7)
    infos = llama_infos()
    with formats.open_writer(path, infos, format="ckpt", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, rng.standard_normal(info.shape).astype(np.float16))
    return path


def quantized_layers(path: Path, fmt: Optional[str] = None) -> Set[str]:
    """Layers `<p>` that a converted file holds as `<p>._handler.weight` (+ scale, zp_neg)."""
    with formats.open_reader(path, format=fmt) as reader:
        tensors: Dict[str, TensorInfo] = {t.name: t for t in reader.tensors}
    layers = {n[:-len(HANDLER)] for n in tensors if n.endswith(HANDLER)}
    for layer in layers:
        assert tensors[layer + HANDLER].dtype is dtypes.INT8
        assert layer + ".weight" not in tensors
        for part in ("._weight_quantizer.scale", "._weight_quantizer.zp_neg"):
            assert tensors[layer + part].dtype is dtypes.FLOAT16
            assert tensors[layer + part].shape == (tensors[layer + HANDLER].shape[0],)
    return layers


def summary_count(result: Result, dst: Path) -> int:
    match = re.search(rf"^{re.escape(os.fspath(dst))}: \S+ \S+: quantized (\d+) tensors, "
                      r"copied (\d+);",
                      result.stdout, re.M)
    assert match, result.stdout
    return int(match.group(1))


# --------------------------------------------------------------------------- help

def test_main_help() -> None:
    out = ok(run("--help")).stdout
    for word in ("convert", "inspect", "--version", "--help"):
        assert word in out
    assert ok(run("-h")).stdout == out


def test_version() -> None:
    import ckpt_rtn
    assert ckpt_rtn.__version__ in ok(run("--version")).stdout


def test_convert_help() -> None:
    out = ok(run("convert", "--help")).stdout
    for option in ("--config", "--include", "--blacklist", "--no-default-blacklist", "--format",
                   "--crc", "--no-verify-crc", "--overwrite", "--dry-run", "--quiet", "-q",
                   "SRC", "DST", "llama2", "lm_head", "safetensors"):
        assert option in out, option


@pytest.mark.parametrize("args, says", [
    (["convert", "a", "b", "--workers", "0"],
     "Invalid value for '--workers': 0 is not in the range x>=1 (see 'ckpt-rtn convert --help')"),
    (["convert"], "Missing argument 'SRC' (see 'ckpt-rtn convert --help')"),
    (["convert", "a", "b", "--bogus"], "No such option '--bogus' (see 'ckpt-rtn convert --help')"),
    (["convrt"], "No such command 'convrt'. Did you mean 'convert'? (see 'ckpt-rtn --help')"),
])
def test_a_usage_error_is_one_line_and_exit_2(args: List[str], says: str) -> None:
    """As every other refusal, not click's usage, hint and error on four lines."""
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {says}"]


def test_inspect_help() -> None:
    out = ok(run("inspect", "--help")).stdout
    assert "--no-verify-crc" in out and "PATH" in out


# --------------------------------------------------------------------------- inspect

def test_inspect_small_fixture() -> None:
    result = ok(run("inspect", SMALL))
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "bytes"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows) == list(SMALL_TENSORS)  # every tensor, in file order
    for name, (dtype, shape, nbytes) in SMALL_TENSORS.items():
        assert re.fullmatch(rf"{re.escape(name)}\s+{dtype}\s+{re.escape(shape)}\s+{nbytes}",
                            rows[name]), rows[name]
    assert lines[-1] == "11 tensors, 96 bytes of data (96 B); file 358 bytes, ckpt"


def test_inspect_crc_fixture_reports_verified_crc() -> None:
    result = ok(run("inspect", SMALL_CRC))
    assert result.stdout.splitlines()[-1] == (
        "11 tensors, 96 bytes of data (96 B); file 375 bytes, ckpt, CRC 0x8c674f81 verified")
    result = ok(run("inspect", "--no-verify-crc", SMALL_CRC))
    assert result.stdout.splitlines()[-1].endswith("CRC 0x8c674f81 not checked")


def test_inspect_mindspore_safetensors() -> None:
    result = ok(run("inspect", FIXTURES / "ms.safetensors"))
    for name, dtype in (("e.scalar", "Int64"), ("a.fp32", "Float32"), ("b.bf16", "BFloat16"),
                        ("z.fp16", "Float16"), ("c.int8", "Int8"), ("d.bool", "Bool")):
        assert re.search(rf"^{re.escape(name)}\s+{dtype}\s", result.stdout, re.M), name
    last = result.stdout.splitlines()[-1]
    assert last.startswith("8 tensors, ") and "file 580 bytes, safetensors" in last
    assert "'format': 'ms'" in last


def test_inspect_int4_fixture() -> None:
    result = ok(run("inspect", FIXTURES / "int4.ckpt"))
    assert re.search(r"Int4\s+\[1, 2\]\s+2$", result.stdout, re.M), result.stdout


# --------------------------------------------------------------------------- convert

EXPECTED_DEFAULT = set(linear_layers())  # lm_head is blacklisted by the llama2 family


def test_exit_skips_the_last_garbage_collections() -> None:
    """The process's last collections would walk numba's objects after the output is safe."""
    script = ("import atexit, gc, ckpt_rtn.cli; atexit._run_exitfuncs(); "
              "print(gc.get_freeze_count())")
    frozen = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                            text=True).stdout
    assert int(frozen) > 1000


def test_convert_default_summary(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    result = ok(run("convert", llama, dst))
    assert summary_count(result, dst) == len(EXPECTED_DEFAULT) == 14
    assert re.search(r"copied 5; ", result.stdout)  # embedding, 2 norms, norm_out, lm_head
    assert quantized_layers(dst) == EXPECTED_DEFAULT
    assert result.stdout.count("\n") == 1  # only the summary line


def test_convert_progress_bar_stays_off_a_non_tty_stderr(tmp_path: Path, llama: Path) -> None:
    """A clean conversion says nothing on stderr when stderr is a pipe or a log file."""
    result = ok(run("convert", llama, tmp_path / "w8.ckpt"))
    assert result.stderr == "", repr(result.stderr)


def test_quiet_prints_nothing(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    for flag in ("--quiet", "-q"):
        result = ok(run("convert", flag, "--overwrite", llama, dst))
        assert result.stdout == ""
        assert result.stderr == ""
        assert quantized_layers(dst) == EXPECTED_DEFAULT


def _dry_run_size(result: Result, fmt: str) -> int:
    match = re.search(rf"output {fmt}: (\d+) bytes", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def assert_size_is_parsed(path: Path, size: int) -> None:
    """`path` is `size` bytes, every one of them a header's or a record's. The writers make
    the file its planned size before they write, so its size alone would match a planned
    size that is wrong; the reader refuses bytes that nothing describes."""
    assert path.stat().st_size == size
    with formats.open_reader(path) as reader:
        for info in reader.tensors:
            reader.read(info)


@pytest.mark.parametrize("source, name, extra, fmt", [
    ("llama", "w8.ckpt", [], "ckpt"),
    ("llama", "w8.ckpt", ["--crc"], "ckpt"),
    ("llama", "w8.safetensors", [], "safetensors"),
    ("llama", "w8.bin", ["--format", "safetensors"], "safetensors"),
    ("llama", "w8.ckpt", ["--no-default-blacklist"], "ckpt"),
    ("small", "copy.safetensors", [], "safetensors"),  # drops the str tensor
    ("small_crc", "copy.ckpt", ["--crc"], "ckpt"),
])
def test_dry_run_size_is_exact(tmp_path: Path, llama: Path, source: str, name: str,
                               extra: List[str], fmt: str) -> None:
    src = {"llama": llama, "small": SMALL, "small_crc": SMALL_CRC}[source]
    if source != "llama":  # no family to detect in the fixtures
        extra = [*extra, "--config", "llama2"]
    dst = tmp_path / name
    dry = ok(run("convert", "--dry-run", *extra, src, dst))
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    size = _dry_run_size(dry, fmt)
    real = ok(run("convert", "--quiet", *extra, src, dst))
    assert_size_is_parsed(dst, size)
    if source == "llama":
        listed = set(re.findall(r"^(\S+)\.weight\s+Float16\s+\[", dry.stdout, re.M))
        assert listed == quantized_layers(dst, fmt)
        n = len(listed)
        assert re.search(rf"^{n} of 19 tensors would be quantized", dry.stdout, re.M)
    assert real.stdout == ""


def test_dry_run_lists_what_it_would_quantize(tmp_path: Path, llama: Path) -> None:
    result = ok(run("convert", "--dry-run", llama, tmp_path / "w8.ckpt"))
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["would", "quantize"]
    listed = [line.split()[0] for line in lines[1:-1]]
    assert listed == [layer + ".weight" for layer in linear_layers()]
    assert "lm_head.weight" not in result.stdout
    assert re.search(r"14 of 19 tensors would be quantized \(llama2 rules, w8a16, blacklist: "
                     r"lm_head\)",
                     lines[-1])
    for line in lines[1:-1]:
        assert re.search(r"Float16\s+\[64, 64\]\s+8\.19 kB\s+4\.35 kB$", line), line


def test_crc_output_is_verified_on_read(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    ok(run("convert", "-q", "--crc", llama, dst))
    assert dst.read_bytes()[-17:-10] == b"crc_num"
    assert re.search(r", CRC 0x[0-9a-f]{8} verified$", ok(run("inspect", dst)).stdout, re.M)


def test_blacklist(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    result = ok(run("convert", "--blacklist", "layers.0.", llama, dst))
    expected = {layer for layer in linear_layers() if ".layers.1." in layer}
    assert quantized_layers(dst) == expected
    assert summary_count(result, dst) == 7


def test_blacklist_repeatable_and_keeps_default(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    ok(run("convert", "-q", "--blacklist", "feed_forward", "--blacklist", "wq", llama, dst))
    expected = {layer for layer in linear_layers() if "attention" in layer and "wq" not in layer}
    assert quantized_layers(dst) == expected  # and lm_head stays blacklisted


def test_no_default_blacklist_quantizes_lm_head(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    result = ok(run("convert", "--no-default-blacklist", llama, dst))
    assert quantized_layers(dst) == EXPECTED_DEFAULT | {"lm_head"}
    assert summary_count(result, dst) == 15


def test_include_regex(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    result = ok(run("convert", "--include", r"attention\.wq\.weight$", llama, dst))
    assert quantized_layers(dst) == {f"model.layers.{i}.attention.wq" for i in range(LAYERS)}
    assert summary_count(result, dst) == 2


def test_include_repeatable_only_takes_2d_weights(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    # "norm" matches the 1-D attention_norm / norm_out weights: they must not be quantized
    ok(run("convert", "-q", "--include", "norm", "--include", r"\.w2\.", llama, dst))
    assert quantized_layers(dst) == {f"model.layers.{i}.feed_forward.w2" for i in range(LAYERS)}


def test_include_respects_blacklist(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    ok(run("convert", "-q", "--include", "lm_head", llama, dst))
    assert quantized_layers(dst) == set()
    ok(run("convert", "-q", "--overwrite", "--include", "lm_head", "--no-default-blacklist",
           llama, dst))
    assert quantized_layers(dst) == {"lm_head"}


def test_config_llama2_is_the_default(tmp_path: Path, llama: Path) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    ok(run("convert", "-q", "--config", "llama2", llama, a))
    ok(run("convert", "-q", llama, b))
    assert a.read_bytes() == b.read_bytes()
    assert quantized_layers(a) == EXPECTED_DEFAULT


def test_config_custom_yaml(tmp_path: Path, llama: Path) -> None:
    config = tmp_path / "rules" / "custom.yaml"
    config.parent.mkdir()
    config.write_text("family: tiny\n"
                      "linear_weights:\n"
                      "  - '\\.feed_forward\\.w(1|3)\\.weight$'\n"
                      "  - '^lm_head\\.weight$'\n"
                      "blacklist:\n"
                      "  - layers.1.\n")
    dst = tmp_path / "w8.ckpt"
    dry = ok(run("convert", "--dry-run", "--config", config, llama, dst))
    assert "(tiny rules, w8a16, blacklist: layers.1.)" in dry.stdout
    result = ok(run("convert", "--config", config, llama, dst))
    assert quantized_layers(dst) == {"model.layers.0.feed_forward.w1",
                                     "model.layers.0.feed_forward.w3", "lm_head"}
    assert summary_count(result, dst) == 3


def _assert_one_error_line(result: Result, pattern: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_config_unknown_family(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    result = run("convert", "--config", "nosuchfamily", llama, dst)
    _assert_one_error_line(result, r"unknown model family 'nosuchfamily'.*llama2")
    assert not dst.exists()


@pytest.mark.parametrize("content, pattern", [
    (None, r"cannot open"),
    ("linear_weights: [unclosed\n", r"invalid YAML"),
    # Each was a traceback, or silence: a key misspelt dropped what it said.
    (b"family: x\nlinear_weights: ['wq']\n\xff", r"not UTF-8 text \(byte 33\)"),
    # Nested too deeply for the recursion limit (a traceback), or unclosed where it is higher.
    pytest.param("[" * 1000, r"invalid YAML: ", id="nested-1000-deep"),
    ("linear_weights: ['wq']\nblacklists: [lm_head]\n", r"unknown key\(s\) blacklists; a "
                                                       r"rules file takes family, description"),
    ("linear_weights: [{pattern: wq, layuot: in_out}]\n", r"linear_weights entry .*: expected a "
                                                         r"regular expression or \{pattern"),
    ("family: x\nlinear_weights: []\n", r"linear_weights"),
    ("linear_weights: ['(']\n", r"invalid regular expression"),
    ("linear_weights: ['wq']\nblacklist: ['']\n", r"blacklist"),
    ("linear_weights: ['wq']\nreject: 'experts'\n", r"reject must be a list of regular "),
    ("linear_weights: ['wq']\nreject: ['(']\n", r"invalid regular expression"),
])
def test_config_bad_yaml(tmp_path: Path, llama: Path, content: Union[str, bytes, None],
                         pattern: str) -> None:
    config = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    dst = tmp_path / "w8.ckpt"
    _assert_one_error_line(run("convert", "--config", config, llama, dst), pattern)
    assert not dst.exists()


def test_config_keys_starting_with_a_dot_hold_anchors(tmp_path: Path, llama: Path) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text(".common: &wq 'attention\\.wq\\.weight$'\nlinear_weights: [*wq]\n")
    result = run("convert", "-q", "--config", config, llama, tmp_path / "w8.ckpt")
    assert result.exit_code == 0, result.output


def test_config_that_is_no_regular_file(tmp_path: Path, llama: Path) -> None:
    """A FIFO hung until a signal came; /dev/zero was read until memory ran out."""
    fifo = tmp_path / "rules.yaml"
    os.mkfifo(fifo)
    for config, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        _assert_one_error_line(run("convert", "--config", config, llama, tmp_path / "w8.ckpt"),
                               rf"^error: {config}: is {kind}.*, not a text file$")


def test_empty_blacklist_entry_is_refused(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    _assert_one_error_line(run("convert", "--blacklist", "", llama, dst), r"--blacklist")
    _assert_one_error_line(run("convert", "--dry-run", "--blacklist", "", llama, dst),
                           r"--blacklist")
    # It selected every 2-D float weight, the embedding too, exit 0.
    _assert_one_error_line(run("convert", "--include", "", llama, dst),
                           r"--include: an empty pattern would select every 2-D float weight")
    assert not dst.exists()


def test_invalid_include_regex_is_refused(tmp_path: Path, llama: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    _assert_one_error_line(run("convert", "--include", "(", llama, dst),
                           r"--include.*regular expression")
    assert not dst.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_format_option_with_bin_name(tmp_path: Path, llama: Path, fmt: str) -> None:
    dst = tmp_path / "w8.bin"
    result = ok(run("convert", "--format", fmt, llama, dst))
    assert summary_count(result, dst) == 14
    assert formats.detect_format(dst) == fmt  # sniffed from the bytes, not the name
    assert quantized_layers(dst, fmt) == EXPECTED_DEFAULT
    records = 48 if fmt == "ckpt" else 47  # a .ckpt holds the settings as a str record
    assert re.search(rf"^{records} tensors, .*, {fmt}", ok(run("inspect", dst)).stdout, re.M)
    if fmt == "safetensors":
        from safetensors.numpy import load_file  # an independent reader
        loaded = load_file(os.fspath(dst))
        assert len(loaded) == 47
        assert loaded["model.layers.0.attention.wq._handler.weight"].dtype == np.int8


@pytest.mark.parametrize("fmt, name", [("safetensors", "w8.ckpt"), ("ckpt", "w8.safetensors")])
def test_format_option_contradicting_the_suffix_is_refused(tmp_path: Path, llama: Path,
                                                          fmt: str, name: str) -> None:
    """Such a file was written, exit 0, and then refused by ckpt-rtn's own inspect and
    verify (and taken for the other format by MindSpore and MindFormers)."""
    dst = tmp_path / name
    _assert_one_error_line(run("convert", "-q", "--format", fmt, llama, dst),
                           rf"--format {fmt} would write a {fmt} file under a \.\w+ name")
    assert not dst.exists()


def test_no_matching_tensor_warns_and_copies(tmp_path: Path) -> None:
    dst = tmp_path / "copy.ckpt"
    result = ok(run("convert", "--config", "llama2", SMALL, dst))
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "no tensor matched the llama2 rules" in warnings[0], warnings
    assert summary_count(result, dst) == 0
    assert "copied 11;" in result.stdout
    # every tensor copied bit for bit: our records are MindSpore's, so the file is the input's
    # bytes followed by the settings record
    assert dst.read_bytes().startswith(SMALL.read_bytes())
    with formats.open_reader(dst) as reader:
        assert [t.name for t in reader.tensors] == [*SMALL_TENSORS, "ckpt_rtn_settings"]


def test_no_matching_tensor_warns_in_dry_run(tmp_path: Path) -> None:
    result = ok(run("convert", "--dry-run", "--config", "llama2", SMALL, tmp_path / "copy.ckpt"))
    assert any(line.startswith(f"warning: {SMALL}: no tensor matched")
               for line in result.stderr.splitlines())
    assert re.search(r"^0 of 11 tensors would be quantized", result.stdout, re.M)
    ok(run("convert", "-q", "--config", "llama2", SMALL, tmp_path / "copy.ckpt"))
    assert_size_is_parsed(tmp_path / "copy.ckpt", _dry_run_size(result, "ckpt"))


def test_safetensors_round_trip_back_to_ckpt(tmp_path: Path, llama: Path) -> None:
    """convert reads its own safetensors output and writes the same ckpt as directly."""
    direct, via = tmp_path / "direct.ckpt", tmp_path / "via.ckpt"
    st = tmp_path / "w8.safetensors"
    ok(run("convert", "-q", llama, direct))
    ok(run("convert", "-q", llama, st))
    result = ok(run("convert", "--config", "llama2", st, via))
    assert summary_count(result, via) == 0  # nothing left to quantize
    with formats.open_reader(direct) as a, formats.open_reader(via) as b:
        assert {t.name: t for t in a.tensors} == {t.name: t for t in b.tensors}
        for info in a.tensors:
            assert np.array_equal(a.read(info), b.read(info)), info.name


def test_family_is_detected_or_refused(tmp_path: Path, llama: Path) -> None:
    result = ok(run("convert", llama, tmp_path / "w8.ckpt"))
    assert ": llama2 w8a16: quantized 14 tensors" in result.stdout
    refused = run("convert", SMALL, tmp_path / "copy.ckpt")
    assert refused.exit_code == 2
    assert refused.stderr == (f"error: {SMALL}: cannot tell the model family from the tensor "
                              "names (matches: none); pass --config FAMILY or a YAML file, or "
                              "--include REGEX\n")
    assert not (tmp_path / "copy.ckpt").exists()


@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-ptq"])
def test_already_quantized_input_is_named_as_such(tmp_path: Path, llama: Path,
                                                   scheme: str) -> None:
    quantized = tmp_path / "q.safetensors"
    ok(run("convert", "-q", "--scheme", scheme, llama, quantized))
    again = tmp_path / "again.ckpt"
    refused = run("convert", quantized, again)
    assert refused.exit_code == 2 and not again.exists()
    assert refused.stderr.startswith(f"error: {quantized}: is already quantized ({scheme}, 14 "
                                     "Linear layers): "), refused.stderr
    assert len(refused.stderr.splitlines()) == 1


def test_include_alone_needs_no_family(tmp_path: Path) -> None:
    """--include on a checkpoint of no known family quantizes what it names, as [out, in]."""
    src = tmp_path / "custom.safetensors"
    rng = np.random.default_rng(0)
    tensors = {"blocks.0.proj.weight": rng.standard_normal((8, 64)).astype(np.float16),
               "blocks.0.scale.weight": np.ones(64, np.float16)}
    infos = [TensorInfo.of(n, dtypes.FLOAT16, a.shape) for n, a in tensors.items()]
    with formats.open_writer(src, infos, format="safetensors", metadata={}) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    dst = tmp_path / "w8.safetensors"
    result = ok(run("convert", "--include", r"proj\.weight$", src, dst))
    assert ": custom w8a16: quantized 1 tensors" in result.stdout
    with formats.open_reader(dst) as reader:
        shapes = {t.name: t.shape for t in reader.tensors}
    assert shapes["blocks.0.proj._handler.weight"] == (8, 64)
    assert shapes["blocks.0.proj._weight_quantizer.scale"] == (8,)
    assert shapes["blocks.0.scale.weight"] == (64,)


def test_no_match_warning_names_each_shard(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rank in (0, 1):
        (src / f"rank_{rank}").mkdir(parents=True)
        shutil.copy(SMALL, src / f"rank_{rank}" / "small.ckpt")
    result = ok(run("convert", "--config", "llama2", src, tmp_path / "out"))
    warnings = [l for l in result.stderr.splitlines() if "no tensor matched" in l]
    assert warnings == [f"warning: {src / f'rank_{rank}' / 'small.ckpt'}: no tensor matched the "
                        "llama2 rules; its output is a copy (see --config / --include)"
                        for rank in (0, 1)]


def test_out_of_memory_is_one_line(tmp_path: Path, llama: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (numpy's names the allocation; a huge --seq-len made one) was a
    traceback with exit 1."""
    from ckpt_rtn import cli as command_line

    def no_memory(*_: object, **__: object) -> None:
        raise MemoryError("Unable to allocate 83.8 GiB for an array")

    monkeypatch.setattr(command_line.converter, "convert", no_memory)
    result = run("convert", llama, tmp_path / "w8.ckpt")
    assert (result.exit_code, result.stderr) == (2, "error: out of memory: Unable to allocate "
                                                    "83.8 GiB for an array (fewer --workers "
                                                    "needs less)\n")
