"""The compiled kernels give the numpy reference's bits, for every format and RTN variant.

test_rtn.py checks whichever kernel runs against MindSpore's ops (Golden
Stick's arithmetic); here the two kernels are run side by side on inputs
chosen to hit every rounding path: random bit patterns (subnormals, huge
values, exact ties), constant and zero rows, and slices with given bounds.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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


@pytest.mark.parametrize("layout", list(Int4Layout), ids=[lay.value for lay in Int4Layout])
@pytest.mark.parametrize("shape", [(2, 1), (16, 64), (18, 300), (300, 18), (4096, 40)])
def test_int4_packing_kernels_match_numpy(layout: Int4Layout, shape) -> None:
    from ckpt_rtn import kernels
    codes = np.random.default_rng(1).integers(-8, 8, shape, dtype=np.int8)
    out = np.full(layout.shape(*shape), 99, dtype=np.int8)
    pack = kernels.pack_int4_transposed if layout is Int4Layout.TRANSPOSED else kernels.pack_int4_rows
    pack(codes, out)
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
    for a, b in zip(compiled.arrays, reference.arrays):
        np.testing.assert_array_equal(a, b)
