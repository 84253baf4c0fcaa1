"""The compiled kernels give the numpy reference's bits, for every format and RTN variant.

test_rtn.py checks whichever kernel runs against MindSpore's ops (Golden
Stick's arithmetic); here the two kernels are run side by side on inputs
chosen to hit every rounding path: random bit patterns (subnormals, huge
values, exact ties), constant and zero rows, an all-negative row and one of
the largest magnitudes (the 16-bit bound keys' extremes), and slices with
given bounds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ckpt_rtn import rtn
from ckpt_rtn.numerics import FloatFormat, to_storage
from ckpt_rtn.rtn import W8, NonFiniteWeightError, RtnSpec, quantize_rtn, row_bounds
from ckpt_rtn.packing import Int4Layout, pack_codes
from ckpt_rtn.schemes import get_scheme

pytest.importorskip("numba")

SPECS = {
    "w8-legacy": W8,
    "w8-ptq": RtnSpec(bits=8, float64_scale=True),
    "w8-ptq-asym": RtnSpec(bits=8, float64_scale=True, symmetric=False),
    "w4-g64": RtnSpec(bits=4, group_size=64, float64_scale=True),
    "w4-g128-asym": RtnSpec(bits=4, group_size=128, float64_scale=True, symmetric=False),
}
FORMATS = list(FloatFormat)


def both(fn):
    """fn() under the compiled kernels, then under the numpy reference."""
    rtn.compiled_kernels.cache_clear()
    assert rtn.kernel_name() == "numba"
    compiled = fn()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CKPT_RTN_KERNEL", "numpy")
        rtn.compiled_kernels.cache_clear()
        assert rtn.kernel_name() == "numpy"
        reference = fn()
    rtn.compiled_kernels.cache_clear()
    return compiled, reference


def weights(fmt: FloatFormat, rows: int = 48, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Every kind of finite value of `fmt`, plus constant, zero and tiny rows."""
    rng = np.random.default_rng(seed)
    if fmt in (FloatFormat.FLOAT16, FloatFormat.BFLOAT16):
        bits = rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint32).astype(np.uint16)
        exponent = 0x7C00 if fmt is FloatFormat.FLOAT16 else 0x7F80
        bits[(bits & exponent) == exponent] &= np.uint16(0x83FF)  # inf/NaN -> finite
        # Rows whose magnitudes stay in a narrow band: most values quantize far from 0.
        band = rng.integers(0, 1 << 10, (rows // 2, cols), dtype=np.uint16)
        bits[::2] = band | np.uint16(0x3800 if fmt is FloatFormat.FLOAT16 else 0x3F00)
        w = bits.view(np.float16) if fmt is FloatFormat.FLOAT16 else bits
    else:
        w = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-30, 30, (rows, 1))
             ).astype(fmt.storage)
    w = w.copy()
    w[1], w[3] = 0, w[5, 0]  # a zero row, a constant row
    w[7] = to_storage(np.full(cols, 2.0 ** -20, dtype=np.float32), fmt)
    ties = (np.arange(cols) - cols / 2 + 0.5) * 2.0 ** -6  # exact k + 0.5 quotients
    w[9] = to_storage(ties.astype(np.float32), fmt)
    if fmt in (FloatFormat.FLOAT16, FloatFormat.BFLOAT16):  # the 16-bit keys' extremes
        bits = w.view(np.uint16)
        bits[12] |= np.uint16(0x8000)  # a band row made all negative
        largest = 0x7BFF if fmt is FloatFormat.FLOAT16 else 0x7F7F
        bits[13, ::2], bits[13, 1::2] = largest, largest | 0x8000
    return w


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
@pytest.mark.parametrize("name", SPECS)
def test_same_bits_as_the_reference(fmt: FloatFormat, name: str) -> None:
    spec = SPECS[name]
    for seed in range(3):
        w = weights(fmt, seed=seed)
        compiled, reference = both(lambda: quantize_rtn(w, fmt, spec, stats=True, block_rows=7))
        np.testing.assert_array_equal(compiled.q, reference.q)
        np.testing.assert_array_equal(compiled.scale, reference.scale)
        np.testing.assert_array_equal(compiled.zp_neg, reference.zp_neg)
        for field in ("max_abs", "mean_abs", "relative"):
            assert getattr(compiled.stats, field) == pytest.approx(
                getattr(reference.stats, field), rel=1e-5, abs=1e-12), field


def test_fp16_rounding_from_float64_is_numpys() -> None:
    """The kernel rounds float64 scales and zero points to fp16 itself (numba has no
    float16): the same bits as numpy's astype for every kind of value."""
    from numba import njit

    from ckpt_rtn import kernels

    @njit
    def rounded(values, out):  # pragma: no cover - compiled
        for i in range(values.size):
            out[i] = kernels._fp16_bits(values[i])

    rng = np.random.default_rng(7)
    every_exponent = rng.integers(0, 1 << 64, 200_000, dtype=np.uint64).view(np.float64)
    near_fp16 = (rng.standard_normal(200_000) * 2.0 ** rng.integers(-30, 18, 200_000))
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    exact = halves[np.isfinite(halves)].astype(np.float64)
    with np.errstate(over="ignore"):  # the spacing above 65504 is inf: its "ties" are inf
        ulp = np.abs(np.spacing(halves[np.isfinite(halves)]).astype(np.float64))
    ties = np.concatenate([exact + ulp / 2, exact - ulp / 2, np.nextafter(exact + ulp / 2, 0),
                           np.nextafter(exact + ulp / 2, np.inf)])
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25,
                      np.nextafter(2.0 ** -25, 1), 3 * 2.0 ** -26, 2.0 ** -14, 1e-300, 1e300,
                      np.inf, -np.inf, 5e-324])
    for values in (every_exponent, near_fp16, exact, ties, edges):
        out = np.empty(values.size, dtype=np.uint16)
        rounded(values, out)
        with np.errstate(over="ignore"):
            expected = values.astype(np.float16)
        nan = np.isnan(expected)
        np.testing.assert_array_equal(out[~nan], expected[~nan].view(np.uint16))
        assert np.isnan(out[nan].view(np.float16)).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
def test_all_constant_weight_and_given_bounds(fmt: FloatFormat) -> None:
    constant = np.tile(weights(fmt)[:, :1], (1, 64))
    compiled, reference = both(lambda: quantize_rtn(constant, fmt, W8))
    np.testing.assert_array_equal(compiled.q, reference.q)
    np.testing.assert_array_equal(compiled.scale, reference.scale)
    w = weights(fmt, seed=5)
    bounds = row_bounds(w, fmt)
    spec = SPECS["w8-ptq-asym"]
    compiled, reference = both(lambda: quantize_rtn(w[:, 64:128], fmt, spec, bounds=bounds))
    np.testing.assert_array_equal(compiled.q, reference.q)
    np.testing.assert_array_equal(compiled.zp_neg, reference.zp_neg)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_values_are_refused_by_both(fmt: FloatFormat, bad: float) -> None:
    w = weights(fmt)
    w[20, 100] = to_storage(np.array([bad], dtype=np.float32), fmt)[0]
    for kernel in ("numba", "numpy"):
        with pytest.MonkeyPatch.context() as patch:
            if kernel == "numpy":
                patch.setenv("CKPT_RTN_KERNEL", "numpy")
            rtn.compiled_kernels.cache_clear()
            assert rtn.kernel_name() == kernel
            with pytest.raises(NonFiniteWeightError):
                quantize_rtn(w, fmt, W8)
    rtn.compiled_kernels.cache_clear()


def test_threads_do_not_change_the_codes() -> None:
    w = weights(FloatFormat.BFLOAT16, rows=300, cols=512)
    alone = quantize_rtn(w, FloatFormat.BFLOAT16, W8, block_rows=16)
    with ThreadPoolExecutor(4) as pool:
        shared = quantize_rtn(w, FloatFormat.BFLOAT16, W8, block_rows=16, pool=pool)
    np.testing.assert_array_equal(alone.q, shared.q)


def test_threads_asking_at_once_get_one_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's threads ask for a weight's kernel together; each kernel built loads its
    code on its first call, so they must share one. A slow build makes the threads' asks
    overlap every time, as a first build in a fresh process does."""
    import threading
    import time
    from ckpt_rtn import kernels

    njit = kernels.njit

    def slow_njit(*args: object, **kwargs: object) -> object:
        time.sleep(0.05)
        return njit(*args, **kwargs)

    monkeypatch.setattr(kernels, "njit", slow_njit)
    kernels._span_kernel.cache_clear()
    start = threading.Barrier(8)

    def ask(_: int) -> object:
        start.wait()
        return kernels.span_kernel(kernels.BF16, False, True, True, False, kernels.ROWS)

    with ThreadPoolExecutor(8) as pool:
        assert len({id(kernel) for kernel in pool.map(ask, range(8))}) == 1


@pytest.mark.parametrize("layout", list(Int4Layout), ids=[lay.value for lay in Int4Layout])
@pytest.mark.parametrize("shape", [(2, 1), (16, 64), (18, 300), (300, 18), (4096, 40),
                                   (32, 64), (48, 136), (40, 16)])
def test_int4_packing_kernels_match_numpy(layout: Int4Layout, shape) -> None:
    from ckpt_rtn import kernels
    codes = np.random.default_rng(1).integers(-8, 8, shape, dtype=np.int8)
    out = np.full(layout.shape(*shape), 99, dtype=np.int8)
    if layout is Int4Layout.TRANSPOSED:  # in two halves: the second into later columns
        half = shape[0] // 4 * 2
        scratch = np.empty((shape[0], shape[1]), dtype=np.int8)
        kernels.pack_int4_transposed(codes[:half], out, 0, scratch)
        kernels.pack_int4_transposed(codes[half:], out, half // 2, scratch)
    else:
        kernels.pack_int4_rows(codes, out)
    np.testing.assert_array_equal(out, pack_codes(codes, layout))


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
@pytest.mark.parametrize("layout", list(Int4Layout), ids=[lay.value for lay in Int4Layout])
@pytest.mark.parametrize("name", ["w4-g64", "w4-g128-asym"])
def test_codes_packed_block_by_block_are_the_reference_bits(fmt: FloatFormat, layout: Int4Layout,
                                                             name: str) -> None:
    """The compiled path packs each block of rows into its own columns (or rows) of the
    packed matrix, from several threads; numpy packs the whole matrix of codes at the end."""
    spec = SPECS[name]
    w = weights(fmt, rows=48, cols=384)  # 3 or 6 groups a row: blocks of 7 rows round up
    with ThreadPoolExecutor(3) as pool:
        compiled, reference = both(lambda: quantize_rtn(w, fmt, spec, stats=True, block_rows=7,
                                                        pool=pool, int4=layout))
    np.testing.assert_array_equal(compiled.q, reference.q)
    np.testing.assert_array_equal(compiled.scale, reference.scale)
    np.testing.assert_array_equal(compiled.zp_neg, reference.zp_neg)
    unpacked = quantize_rtn(w, fmt, spec, stats=True)
    np.testing.assert_array_equal(compiled.q, pack_codes(unpacked.q, layout))
    assert compiled.stats == unpacked.stats
    if fmt is FloatFormat.FLOAT16:  # (each format is one more kernel to compile)
        constant = np.tile(w[:, :1], (1, 128))  # every group constant: scale 1, quantized again
        compiled, reference = both(lambda: quantize_rtn(constant, fmt, spec, int4=layout))
        np.testing.assert_array_equal(compiled.q, reference.q)


def test_int4_packing_needs_4_bit_codes_in_pairs_of_rows() -> None:
    w = weights(FloatFormat.FLOAT16, rows=16, cols=128)
    with pytest.raises(ValueError, match="cannot be packed"):
        quantize_rtn(w, FloatFormat.FLOAT16, W8, int4=Int4Layout.ROWS)
    with pytest.raises(ValueError, match="cannot be packed"):
        quantize_rtn(w[:5], FloatFormat.FLOAT16, SPECS["w4-g64"], int4=Int4Layout.TRANSPOSED)


@pytest.mark.parametrize("name,group", [("w4a16", 64), ("w4a8-dynamic", 128)])
def test_w4_scheme_outputs_match(name: str, group: int) -> None:
    scheme = get_scheme(name, group, symmetric=name == "w4a8-dynamic").for_layer(
        "model.layers.0.mlp.experts.0.up_proj")
    w = weights(FloatFormat.FLOAT16, rows=64, cols=256)
    compiled, reference = both(lambda: scheme.quantize(
        w, FloatFormat.FLOAT16, pool=None, stats=False))
    assert len(compiled.arrays) == len(reference.arrays) == 3 - (name == "w4a8-dynamic")
    for a, b in zip(compiled.arrays, reference.arrays):
        np.testing.assert_array_equal(a, b)


_CACHE_PROBE = """
import numpy as np
from ckpt_rtn import kernels
from ckpt_rtn.numerics import FloatFormat
from ckpt_rtn.packing import Int4Layout
from ckpt_rtn.rtn import W8, RtnSpec, quantize_rtn
w = np.ones((4, 256), np.float16)
w[0, 0] = 2
quantize_rtn(w, FloatFormat.FLOAT16, W8)
spec = RtnSpec(bits=4, group_size=128, float64_scale=True, symmetric=False)
quantize_rtn(w, FloatFormat.FLOAT16, spec, stats=True, int4=Int4Layout.TRANSPOSED)
used = [kernels.span_kernel(kernels.FP16, True, False, False, True, kernels.UNPACKED),
        kernels.span_kernel(kernels.FP16, False, True, False, False, kernels.TRANSPOSED)]
print(sum(sum(k.stats.cache_misses.values()) for k in used),
      sum(sum(k.stats.cache_hits.values()) for k in used))
"""


def test_a_second_process_loads_the_kernels_from_numbas_disk_cache(tmp_path: Path) -> None:
    """Compiling takes seconds; a conversion must pay for it once per machine, not once per
    process (numba keys its cache by the kernel's constants: they must stay plain values)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True,
                           text=True, check=True).stdout.split() for _ in range(2)]
    assert runs == [["2", "0"], ["0", "2"]]


def test_where_numba_can_cache_nowhere_each_run_compiles_and_says_so(tmp_path: Path) -> None:
    """A read-only install run without a writable home (a common container set-up): with
    `cache=True`, numba raises as the kernels are imported, so every conversion failed with
    a traceback. It now compiles them in each process, writes the same bytes and warns."""
    import shutil
    import ckpt_rtn
    from safetensors.numpy import save_file
    if rtn.kernel_name() != "numba":
        pytest.skip("the compiled kernels are not what runs here (CKPT_RTN_KERNEL=numpy)")
    package = tmp_path / "install" / "ckpt_rtn"
    shutil.copytree(Path(ckpt_rtn.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__pycache__").write_text("")  # a file: numba cannot make its cache here
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # nor under a home or cache directory inside a file, even as root
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"))
    rng = np.random.default_rng(0)
    src = tmp_path / "tiny.safetensors"
    save_file({f"model.layers.0.{linear}.weight": rng.standard_normal((64, 128)).astype(
        np.float16) for linear in ("attention.wq", "attention.wk", "attention.wv",
                                   "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                   "feed_forward.w3")}, str(src))

    def convert(out: Path, **where: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ckpt_rtn", "convert", "-q", "--config",
                               "llama2", str(src), str(out)], capture_output=True, text=True,
                              **where)

    uncached = convert(tmp_path / "uncached.safetensors", cwd=package.parent, env=env)
    assert uncached.returncode == 0, uncached.stderr
    assert "every run compiles them again" in uncached.stderr
    assert "NUMBA_CACHE_DIR" in uncached.stderr
    usual = convert(tmp_path / "usual.safetensors")
    assert usual.returncode == 0, usual.stderr
    assert "compiles them again" not in usual.stderr
    assert (tmp_path / "uncached.safetensors").read_bytes() == \
        (tmp_path / "usual.safetensors").read_bytes()


def test_with_numbas_jit_disabled_numpys_steps_run() -> None:
    """NUMBA_DISABLE_JIT=1 (a debugging switch) leaves the kernels plain Python, a loop per
    element: about a day for a 7B model, a conversion that looks hung."""
    probe = "from ckpt_rtn import rtn; print(rtn.kernel_name())"
    env = {name: value for name, value in os.environ.items()
           if name not in ("CKPT_RTN_KERNEL", "NUMBA_DISABLE_JIT")}
    kernels = [subprocess.run([sys.executable, "-c", probe], env=extra, capture_output=True,
                              text=True, check=True).stdout.strip()
               for extra in (env, {**env, "NUMBA_DISABLE_JIT": "1"})]
    assert kernels == ["numba", "numpy"]


@pytest.mark.parametrize("name", ["w8a16", "w4a16"])
def test_warm_up_compiles_the_kernel_a_weight_then_runs(name: str) -> None:
    """converter.warm_up quantizes a tiny weight so that the real ones find their kernel
    ready: the same variant, with the same argument types (no second specialization)."""
    from ckpt_rtn import kernels
    scheme, fmt = get_scheme(name), FloatFormat.BFLOAT16
    scheme.warm_up(fmt, stats=False)
    layout = {None: kernels.UNPACKED}.get(scheme.int4_layout, kernels.TRANSPOSED)
    kernel = kernels.span_kernel(kernels.BF16, True, False, False, False, layout)
    compiled = len(kernel.signatures)
    assert compiled >= 1
    with ThreadPoolExecutor(2) as pool:
        scheme.quantize(weights(fmt, rows=64, cols=256), fmt, pool=pool, stats=False)
    assert len(kernel.signatures) == compiled
