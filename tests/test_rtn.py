"""RTN math against an independent MindSpore-ops implementation of Golden Stick's formula."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from ckpt_rtn.numerics import FloatFormat, bf16_to_float32, float32_to_bf16, to_storage, to_work
from ckpt_rtn.rtn import W8, NonFiniteWeightError, RtnSpec, dequantize_rtn, quantize_rtn, row_bounds

MS_DTYPE = {FloatFormat.FLOAT16: ms.float16, FloatFormat.BFLOAT16: ms.bfloat16,
            FloatFormat.FLOAT32: ms.float32}


def golden_stick_reference(w: np.ndarray, fmt: FloatFormat) -> Tuple[np.ndarray, np.ndarray]:
    """q and scale (raw `fmt` values) computed with MindSpore ops, as Golden Stick does.

    Min/max in float32; scale = (a - (-a)) / 255 in float32 for fp16 (v0.5.0)
    and float64 otherwise (v1.0+); the division in the weight's own dtype;
    ops.round (half to even); clip to [-128, 127]. Rows whose scale is 0 get
    q = 0 (Golden Stick leaves them undefined; we document q = 0).
    """
    dtype = MS_DTYPE[fmt]
    weight = Tensor(to_work(w, fmt).astype(np.float32), dtype)
    wf = ops.cast(weight, ms.float32)
    high, low = ops.amax(wf, axis=1), ops.amin(wf, axis=1)
    a = ops.maximum(ops.abs(high), ops.abs(low))
    if fmt is FloatFormat.FLOAT16:
        scale32 = ops.div(ops.sub(a, ops.neg(a)), 255.0)
    else:
        a64 = ops.cast(a, ms.float64)
        scale32 = ops.cast(ops.div(ops.sub(a64, ops.neg(a64)), 255.0), ms.float32)
    if bool(ops.equal(high, low).all()):
        scale32 = ops.ones_like(scale32)
    scale = ops.cast(scale32, dtype)
    quotient = ops.div(weight, ops.expand_dims(scale, 1))  # in the weight's dtype
    q = ops.clip_by_value(ops.round(ops.cast(quotient, ms.float32)), -128.0, 127.0)
    zero_rows = ops.expand_dims(ops.equal(ops.cast(scale, ms.float32), 0.0), 1)
    q = ops.select(ops.broadcast_to(zero_rows, q.shape), ops.zeros_like(q), q)
    raw_scale = scale.asnumpy()
    if fmt is FloatFormat.BFLOAT16:
        raw_scale = raw_scale.view(np.uint16)
    return ops.cast(q, ms.int8).asnumpy(), raw_scale


def adversarial_weights(fmt: FloatFormat) -> Dict[str, np.ndarray]:
    """float32 values exactly representable in `fmt`, by case."""
    rng = np.random.default_rng(7)
    big = 60000.0 if fmt is FloatFormat.FLOAT16 else 3.0e38
    # fp16: subnormal weights and scales. bf16/fp32: MindSpore's CPU casts flush
    # float32 subnormals to zero, so stay small but normal there.
    tiny = 6e-8 if fmt is FloatFormat.FLOAT16 else 1e-30
    step = 2.0 ** -6
    ties = step * (np.arange(-128, 128) + 0.5)  # exact k + 0.5 quotients; a = 127.5 * step
    cases = {
        "normal": rng.standard_normal((64, 96)) * 0.02,
        "ties": np.stack([ties, -ties, ties[::-1] * 4, ties * 0.5]),
        "huge": np.stack([np.linspace(-big, big, 96), np.full(96, big), rng.uniform(-big, big, 96)]),
        "tiny": np.stack([np.linspace(-tiny, tiny, 96) * 8, np.full(96, tiny), rng.uniform(-1, 1, 96)]),
        "zero_and_constant_rows": np.stack([np.zeros(96), np.full(96, 0.3), np.full(96, -2.0),
                                            rng.standard_normal(96)]),
        "all_rows_constant": np.stack([np.full(40, v) for v in (1.0, -2.5, 0.7, 0.0, 3.5)]),
        "mixed_magnitudes": np.where(rng.random((16, 96)) < 0.1, 10.0, 1e-3) * rng.standard_normal((16, 96)),
        "many_rows": rng.standard_normal((600, 40)),
    }
    return {k: to_storage(v.astype(np.float32), fmt) if fmt is not FloatFormat.FLOAT32
            else v.astype(np.float32) for k, v in cases.items()}


CASES = [(fmt, case) for fmt in MS_DTYPE for case in adversarial_weights(fmt)]


@pytest.mark.parametrize("fmt,case", CASES, ids=[f"{f.value}-{c}" for f, c in CASES])
def test_bit_exact_with_mindspore_ops_reference(fmt: FloatFormat, case: str) -> None:
    w = adversarial_weights(fmt)[case]
    result = quantize_rtn(w, fmt, block_rows=100)
    q_ref, scale_ref = golden_stick_reference(w, fmt)
    assert result.scale.dtype == fmt.storage and result.scale.shape == (w.shape[0],)
    np.testing.assert_array_equal(result.scale.view(np.uint8), scale_ref.view(np.uint8))
    np.testing.assert_array_equal(result.q, q_ref)
    assert result.q.dtype == np.int8 and result.q.shape == w.shape
    assert not to_work(result.zp_neg, fmt).any() and not np.signbit(to_work(result.zp_neg, fmt)).any()


def test_ties_round_half_to_even() -> None:
    w = to_storage(np.float32(2.0 ** -6) * np.float32([[0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -127.5]]),
                   FloatFormat.FLOAT16)
    result = quantize_rtn(w, FloatFormat.FLOAT16)
    assert to_work(result.scale, FloatFormat.FLOAT16)[0] == 2.0 ** -6
    assert result.q.tolist() == [[0, 2, 2, 0, -2, 127, -128]]


def test_degenerate_cases() -> None:
    ones = np.ones((3, 4), np.float16)
    result = quantize_rtn(ones, FloatFormat.FLOAT16)  # every row constant: scale 1
    assert result.q.tolist() == [[1] * 4] * 3 and result.scale.tolist() == [1.0] * 3
    mixed = np.array([[0, 0, 0], [0.5, -1, 0.25]], np.float16)
    result = quantize_rtn(mixed, FloatFormat.FLOAT16)  # a zero row: scale 0, q 0
    assert result.q[0].tolist() == [0, 0, 0] and result.scale[0] == 0
    assert result.q[1].tolist() == [64, -128, 32]


#: Worst |q - w/s| over a whole tensor, in units of its row's scale.
ERROR_BOUND = {FloatFormat.FLOAT16: 0.5625, FloatFormat.BFLOAT16: 1.0, FloatFormat.FLOAT32: 0.5 + 2**-16}


@pytest.mark.parametrize("fmt", list(MS_DTYPE))
def test_dequantization_error_bound(fmt: FloatFormat) -> None:
    """|q*s - w| <= s/2 for every unclamped element, up to the rounding of w/s to `fmt`.

    Golden Stick rounds the quotient to the weight's dtype before rounding to
    an integer, and the scale itself is rounded, so the top code can sit just
    over 127.5 before clamping. In real arithmetic that bounds the error by
    0.5625 * s for fp16 (the largest quotient is 127.5 * (1 + 2^-11)) and by
    1.0 * s for bf16, whose quotients in [64, 128) are spaced 0.5 apart.
    """
    rng = np.random.default_rng(11)
    w = to_storage((rng.standard_normal((256, 512)) * rng.uniform(1e-3, 2, (256, 1)))
                   .astype(np.float32), fmt)
    result = quantize_rtn(w, fmt)
    wf = to_work(w, fmt).astype(np.float64)
    s = to_work(result.scale, fmt).astype(np.float64)[:, None]
    error = np.abs(dequantize_rtn(result, fmt).astype(np.float64) - wf)
    assert (error <= ERROR_BOUND[fmt] * s).all()
    quotient = to_work(to_storage((wf / s).astype(fmt.work), fmt), fmt)  # what is rounded
    unclamped = (quotient > -128.5) & (quotient < 127.5)
    assert (np.abs(result.q - quotient)[unclamped] <= 0.5).all()
    assert unclamped.mean() > 0.99


def test_non_finite_weights_are_refused() -> None:
    w = np.array([[1.0, np.inf]], np.float16)
    with pytest.raises(NonFiniteWeightError):
        quantize_rtn(w, FloatFormat.FLOAT16)
    with pytest.raises(NonFiniteWeightError):
        quantize_rtn(np.array([[np.nan, 1.0]], np.float32), FloatFormat.FLOAT32)


def test_bf16_helpers_round_half_to_even() -> None:
    values = np.array([1.0, 1.00390625, 1.01171875, -3.0e38, np.inf, 1e-40], np.float32)
    bits = float32_to_bf16(values)
    ref = Tensor(values, ms.bfloat16).asnumpy().view(np.uint16)
    np.testing.assert_array_equal(bits, ref)
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.float32([np.nan])))).all()


@pytest.mark.parametrize("fmt", list(MS_DTYPE))
def test_threads_and_block_size_do_not_change_the_result(fmt: FloatFormat) -> None:
    from concurrent.futures import ThreadPoolExecutor
    w = adversarial_weights(fmt)["many_rows"]
    serial = quantize_rtn(w, fmt)
    with ThreadPoolExecutor(3) as pool:
        for block_rows in (1, 7, 128):
            threaded = quantize_rtn(w, fmt, pool=pool, block_rows=block_rows)
            np.testing.assert_array_equal(threaded.q, serial.q)
            np.testing.assert_array_equal(threaded.scale, serial.scale)
        ones = quantize_rtn(adversarial_weights(fmt)["all_rows_constant"], fmt, pool=pool,
                           block_rows=2)
        assert (to_work(ones.scale, fmt) == 1).all()


def raw_bytes(array: np.ndarray) -> np.ndarray:
    """An array's bytes in its logical order: unlike ==, tells -0.0 from +0.0."""
    return np.ascontiguousarray(array).view(np.uint8)


@pytest.mark.parametrize("fmt", list(MS_DTYPE))
@pytest.mark.parametrize("spec", [RtnSpec(bits=4, group_size=32, float64_scale=True),
                                  RtnSpec(bits=4, group_size=32, float64_scale=True,
                                          symmetric=False)], ids=["symmetric", "asymmetric"])
def test_groups_first_parameters_are_the_transpose_whatever_the_spans(
        fmt: FloatFormat, spec: RtnSpec) -> None:
    """[in/g, out] scales and zero points, placed by each thread for its own span of output
    rows, are the bytes of the [out, in/g] ones transposed: for spans of one or several
    rows, with int4 packing or without, with one group a row, and after the all-rows-constant
    second pass."""
    from concurrent.futures import ThreadPoolExecutor

    from ckpt_rtn.packing import Int4Layout
    rng = np.random.default_rng(11)
    varied = rng.standard_normal((48, 96)).astype(np.float32) * 0.05  # 3 groups a row
    constant = np.repeat(rng.standard_normal((6, 3)).astype(np.float32), 32, axis=1)
    for w in (varied, varied[:10, :32], constant):
        raw = w if fmt is FloatFormat.FLOAT32 else to_storage(w, fmt)
        groups = w.shape[1] // 32
        serial = quantize_rtn(raw, fmt, spec)
        assert serial.scale.shape == (w.shape[0], groups)
        with ThreadPoolExecutor(3) as pool:
            for block_rows, int4 in ((1, None), (5, None), (64, None), (1, Int4Layout.TRANSPOSED)):
                placed = quantize_rtn(raw, fmt, spec, pool=pool, block_rows=block_rows,
                                      int4=int4, groups_first=True)
                assert placed.scale.shape == (groups, w.shape[0])
                np.testing.assert_array_equal(raw_bytes(placed.scale), raw_bytes(serial.scale.T))
                np.testing.assert_array_equal(raw_bytes(placed.zp_neg),
                                              raw_bytes(serial.zp_neg.T))
    assert (to_work(serial.scale, fmt) == 1).all()  # the constant weight's second pass


@pytest.mark.parametrize("fmt", list(MS_DTYPE))
def test_error_stats_match_a_direct_computation(fmt: FloatFormat) -> None:
    w = adversarial_weights(fmt)["mixed_magnitudes"]
    result = quantize_rtn(w, fmt, stats=True, block_rows=5)
    error = dequantize_rtn(result, fmt).astype(np.float64) - to_work(w, fmt).astype(np.float64)
    stats = result.stats
    assert stats is not None
    assert stats.max_abs == pytest.approx(np.abs(error).max(), rel=1e-5)
    assert stats.mean_abs == pytest.approx(np.abs(error).mean(), rel=1e-5)
    norm = np.sqrt((to_work(w, fmt).astype(np.float64) ** 2).sum())
    assert stats.relative == pytest.approx(np.sqrt((error ** 2).sum()) / norm, rel=1e-4)
    assert quantize_rtn(w, fmt).stats is None


ASYM8 = RtnSpec(bits=8, float64_scale=True, symmetric=False)
ASYM4_G32 = RtnSpec(bits=4, group_size=32, float64_scale=True, symmetric=False)


def golden_stick_asymmetric_reference(w: np.ndarray, fmt: FloatFormat, spec: RtnSpec):
    """q, scale and zp_neg (raw `fmt` values) with MindSpore ops, as Golden Stick PTQ's
    cal_quantization_params + quant_tensor_data do with symmetric=False.

    scale = (max - min) / (qmax - qmin) and zp = round(qmin - min / scale) in
    float64; both cast to the weight's dtype; q = clamp(round(w / scale + zp))
    with the division and the addition in the weight's dtype. Rows (groups)
    whose scale rounds to 0 or whose zp overflows get the symmetric
    parameters (our documented fallback; Golden Stick divides by zero there).
    """
    dtype = MS_DTYPE[fmt]
    rows = w.reshape(-1, spec.group_size) if spec.group_size else w
    weight = Tensor(to_work(rows, fmt).astype(np.float32), dtype)
    wf = ops.cast(weight, ms.float32)
    high = ops.cast(ops.amax(wf, axis=1), ms.float64)
    low = ops.cast(ops.amin(wf, axis=1), ms.float64)
    span = float(spec.qmax - spec.qmin)
    scale64 = ops.div(ops.sub(high, low), span)
    zp64 = ops.round(ops.sub(float(spec.qmin), ops.div(low, scale64)))
    a = ops.maximum(ops.abs(high), ops.abs(low))
    sym64 = ops.div(ops.sub(a, ops.neg(a)), span)
    if bool(ops.equal(high, low).all()):
        scale64, zp64 = ops.ones_like(scale64), ops.zeros_like(zp64)
    scale, zp = ops.cast(scale64, dtype), ops.cast(zp64, dtype)
    scale_np = ops.cast(scale, ms.float32).asnumpy()
    zp_np = ops.cast(zp, ms.float32).asnumpy()
    fallback = (scale_np == 0) | ~np.isfinite(zp_np)
    sym_np = ops.cast(ops.cast(sym64, dtype), ms.float32).asnumpy()
    # Selected in float32 (no bf16 Select on CPU): the values are exact in `dtype`.
    scale = Tensor(np.where(fallback, sym_np, scale_np), dtype)
    zp = Tensor(np.where(fallback, 0, zp_np).astype(np.float32), dtype)
    quotient = ops.add(ops.div(weight, ops.expand_dims(scale, 1)), ops.expand_dims(zp, 1))
    q = ops.clip_by_value(ops.round(ops.cast(quotient, ms.float32)), float(spec.qmin),
                          float(spec.qmax))
    zero_rows = ops.expand_dims(ops.equal(ops.cast(scale, ms.float32), 0.0), 1)
    q = ops.select(ops.broadcast_to(zero_rows, q.shape), ops.zeros_like(q), q)
    raw_scale, raw_zp_neg = scale.asnumpy(), ops.neg(zp).asnumpy()
    if fmt is FloatFormat.BFLOAT16:
        raw_scale, raw_zp_neg = raw_scale.view(np.uint16), raw_zp_neg.view(np.uint16)
    shape = (w.shape[0], -1) if spec.group_size else (-1,)
    return (ops.cast(q, ms.int8).asnumpy().reshape(w.shape), raw_scale.reshape(shape),
            raw_zp_neg.reshape(shape))


ASYM_CASES = [(fmt, case, spec) for fmt in MS_DTYPE for case in adversarial_weights(fmt)
              for spec in (ASYM8, ASYM4_G32) if adversarial_weights(fmt)[case].shape[1] % 32 == 0]


@pytest.mark.parametrize("fmt,case,spec", ASYM_CASES,
                         ids=[f"{f.value}-{c}-int{s.bits}" for f, c, s in ASYM_CASES])
def test_asymmetric_bit_exact_with_mindspore_ops_reference(fmt: FloatFormat, case: str,
                                                           spec: RtnSpec) -> None:
    w = adversarial_weights(fmt)[case]
    result = quantize_rtn(w, fmt, spec, block_rows=100)
    q_ref, scale_ref, zp_neg_ref = golden_stick_asymmetric_reference(w, fmt, spec)
    np.testing.assert_array_equal(result.scale.view(np.uint8), scale_ref.view(np.uint8))
    np.testing.assert_array_equal(result.q, q_ref)
    # -0.0 and +0.0 are the same zero point; compare values.
    np.testing.assert_array_equal(to_work(result.zp_neg, fmt), to_work(zp_neg_ref, fmt))


def test_asymmetric_codes_span_each_rows_own_range() -> None:
    """A skewed row uses (nearly) all 256 (16) codes, from its own min to its own max,
    and the error stays within half a step, below the symmetric scheme's on the same row."""
    rng = np.random.default_rng(2)
    # float32, so the bound is plain s/2: fp16's rounding of w/s + zp is what the
    # bit-exact tests above cover.
    w = (rng.uniform(0.0, 1.0, (8, 256)) + np.arange(8)[:, None] * 0.1 - 0.2).astype(np.float32)
    fmt = FloatFormat.FLOAT32
    for spec, symmetric in ((ASYM8, RtnSpec(bits=8, float64_scale=True)),
                            (ASYM4_G32, RtnSpec(bits=4, group_size=32, float64_scale=True))):
        result = quantize_rtn(w, fmt, spec, stats=True)
        rows = result.q.reshape(-1, spec.group_size or w.shape[1])
        # The rounded zero point can leave one end a code short of qmin or qmax.
        assert (rows.min(axis=1) <= spec.qmin + 1).all()
        assert (rows.max(axis=1) >= spec.qmax - 1).all()
        assert to_work(result.zp_neg, fmt).any()
        s = np.repeat(to_work(result.scale, fmt).reshape(w.shape[0], -1),
                      spec.group_size or w.shape[1], axis=1)
        error = np.abs(dequantize_rtn(result, fmt).astype(np.float64) - w)
        assert (error <= 0.5 * s * (1 + 2 ** -16)).all()
        assert result.stats.relative < quantize_rtn(w, fmt, symmetric, stats=True).stats.relative


def test_asymmetric_fallbacks() -> None:
    fmt = FloatFormat.FLOAT16
    # Every row constant: scale 1, zp 0, as Golden Stick does.
    ones = quantize_rtn(np.full((2, 8), 3, np.float16), fmt, ASYM8)
    assert ones.q.tolist() == [[3] * 8] * 2 and ones.scale.tolist() == [1, 1]
    assert not ones.zp_neg.any()
    # One constant row among others: quantized symmetrically (no 0/0 zero point).
    w = np.array([[0.5] * 4, [0.0, 1.0, 2.0, 3.0]], np.float16)
    result = quantize_rtn(w, fmt, ASYM8)
    assert result.zp_neg[0] == 0 and result.q[0].tolist() == [127] * 4
    assert result.scale[0] == np.float16(1.0 / 255)
    assert result.zp_neg[1] == 128 and result.q[1].tolist() == [-128, -43, 42, 127]

    # A float64 row whose range exceeds float64 (max - min overflows): symmetric, finite scale.
    huge = np.array([[1e308, -1e308, 0.0, 5e307]], np.float64)
    result = quantize_rtn(huge, FloatFormat.FLOAT64, ASYM8)
    assert np.isfinite(result.scale).all() and result.zp_neg.tolist() == [0.0]
    assert result.scale[0] == 1e308 / 127.5
    assert result.q.tolist() == [[127, -127, 0, 64]]


@pytest.mark.parametrize("shape", [(0, 64), (4, 0)])
def test_a_weight_without_elements_is_refused(shape: Tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_rtn(np.zeros(shape, np.float16), FloatFormat.FLOAT16, W8)


def test_legacy_float32_scale_cannot_be_asymmetric() -> None:
    with pytest.raises(ValueError, match="float64"):
        RtnSpec(symmetric=False)


@pytest.mark.parametrize("case", ["random", "every row constant", "zero"])
def test_bounds_give_the_whole_weights_parameters_to_a_slice(case: str) -> None:
    rng = np.random.default_rng(4)
    whole = (rng.standard_normal((6, 64)) + 0.3).astype(np.float16)
    if case != "random":  # Golden Stick's scale of 1 when max == min in every channel
        whole = np.repeat(whole[:, :1] * (case != "zero"), 64, axis=1)
    fmt = FloatFormat.FLOAT16
    for spec in (W8, ASYM8):
        full = quantize_rtn(whole, fmt, spec)
        part = quantize_rtn(np.ascontiguousarray(whole[:, 32:]), fmt, spec,
                            bounds=row_bounds(whole, fmt))
        np.testing.assert_array_equal(part.q, full.q[:, 32:])
        np.testing.assert_array_equal(part.scale, full.scale)
        np.testing.assert_array_equal(part.zp_neg, full.zp_neg)
