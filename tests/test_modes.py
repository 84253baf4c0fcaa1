"""The deploy cells in both MindSpore modes on CPU: graph (compiled) and PyNative (eager).

For each scheme `ckpt-rtn convert` writes, the converted checkpoint is loaded
into a `build_llama(..., mode=...)` network and its logits are compared with
those of an FP network, built the same way, holding the dequantized weights
(q + zp) * scale computed here in numpy from the stored codes. A quantized
cell runs the same ops as MindFormers' Linear on the same float32 weights, so
the two agree to float32 rounding; on MindSpore 2.9 CPU they are bit-identical,
across modes too. The mode is process-wide and switching it within one
process is reliable: each network is built and run under its mode, in turn.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

import mindspore as ms

from ckpt_rtn import dtypes
from ckpt_rtn.formats import open_reader
from ckpt_rtn.models import ModelConfig
from ckpt_rtn.runtime.deploy import PtqLinear, W8A16Linear, load_checkpoint_into
from ckpt_rtn.runtime.evaluate import next_token_nll
from ckpt_rtn.runtime.network import MODES, build_llama
from ckpt_rtn.packing import unpack_int4

from conftest import cli

#: Two or more groups of 64 input channels in every Linear (wk/wv: 64 outputs).
CONFIG = ModelConfig(model=dict(hidden_size=128, num_layers=2, num_heads=4, n_kv_heads=2,
                                intermediate_size=256, vocab_size=128))
SEQ = 32
WINDOWS = 3
#: Test label: `ckpt-rtn convert` options.
SCHEMES = {"w8a16": ["--scheme", "w8a16"], "w8a16-ptq": ["--scheme", "w8a16-ptq"],
           "w8a16-ptq-asym": ["--scheme", "w8a16-ptq", "--asymmetric"],
           "w4a16-g64": ["--scheme", "w4a16", "--group-size", "64"],
           "w4a16-g64-asym": ["--scheme", "w4a16", "--group-size", "64", "--asymmetric"]}
#: Float32 rounding at the logits' scale: a few ulps, room for a backend that fuses
#: or reorders; observed difference 0 (quantized vs dequantized FP, graph vs PyNative).
RTOL_OF_SCALE = 1e-6
#: (codes, scale, zero point) names per cell: Golden Stick v0.5 RTN and PTQ.
QUANT_NAMES = (("._handler.weight", "._weight_quantizer.scale", "._weight_quantizer.zp_neg"),
               ("._layer.weight", "._layer.matmul.weight_scale", "._layer.matmul.weight_zp"))


@pytest.fixture(scope="module", autouse=True)
def mode_restored():
    """Leave the process-wide mode as this module found it, for the tests after it."""
    before = ms.get_context("mode")
    yield
    ms.set_context(mode=before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Random FP weights in the network's own names, converted to each scheme."""
    root = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(0)
    arrays = {p.name: (np.ones(p.shape, np.float32) if len(p.shape) == 1 else
                       (rng.standard_normal(p.shape) * 0.1).astype(np.float32))
              for p in build_llama(CONFIG, SEQ).get_parameters()}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()],
                       str(root / "fp.ckpt"))
    paths = {}
    for label, options in SCHEMES.items():
        paths[label] = root / f"{label}.ckpt"
        result = cli("convert", root / "fp.ckpt", paths[label], *options, "-q")
        assert result.exit_code == 0, result.stderr
    return paths


def dequantized(path: Path) -> Dict[str, np.ndarray]:
    """The checkpoint as FP weights: each quantized layer's `.weight` is (q + zp) * scale."""
    with open_reader(path) as reader:
        stored = {t.name: reader.read(t) for t in reader.tensors if t.dtype is not dtypes.STRING}
    weights = {}
    quantizer_names = set()
    for name, codes in stored.items():
        for codes_suffix, scale_suffix, zp_suffix in QUANT_NAMES:
            if name.endswith(codes_suffix):
                layer = name[:-len(codes_suffix)]
                scale, zp = stored[layer + scale_suffix], stored[layer + zp_suffix]
                quantizer_names |= {layer + scale_suffix, layer + zp_suffix}
                if scale.ndim == 2:  # w4a16: packed [in, out/2] codes, [in/group, out] scales
                    codes = unpack_int4(codes).T  # [out, in]
                    group = codes.shape[1] // scale.shape[0]
                    scale, zp = np.repeat(scale.T, group, axis=1), np.repeat(zp.T, group, axis=1)
                else:
                    scale, zp = scale[:, None], zp[:, None]
                weights[layer + ".weight"] = (codes.astype(np.float32) + zp) * scale
                break
        else:
            weights[name] = codes
    return {name: array for name, array in weights.items() if name not in quantizer_names}


@pytest.fixture(scope="module")
def run(checkpoints):
    """run(label, mode): logits of the quantized and the dequantized FP network for the
    same windows, computed once, right after building both under `mode`."""
    windows = np.random.default_rng(1).integers(1, 128, (WINDOWS, SEQ)).astype(np.int32)

    @functools.lru_cache(maxsize=None)
    def logits(label: str, mode: str) -> Tuple[np.ndarray, np.ndarray, List[object], bool]:
        quantized = build_llama(CONFIG, SEQ, mode=mode)
        layers = load_checkpoint_into(quantized, checkpoints[label])
        fp = build_llama(CONFIG, SEQ, mode=mode)
        weights = dequantized(checkpoints[label])
        assert set(weights) == {p.name for p in fp.get_parameters()}
        not_loaded = ms.load_param_into_net(
            fp, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in weights.items()},
            strict_load=True)
        assert not_loaded == ([], [])
        assert ms.get_context("mode") == MODES[mode]
        out = [np.stack([net(ms.Tensor(w[None, :]))[0].asnumpy().reshape(SEQ, -1)
                         for w in windows]) for net in (quantized, fp)]
        cells = [cell for _, cell in quantized.cells_and_names()
                 if isinstance(cell, (W8A16Linear, PtqLinear))]
        assert len(cells) == len(layers) == 14  # every Linear but lm_head
        compiled = bool(quantized.compile_cache)  # graph mode compiles, PyNative does not
        return out[0], out[1], cells, compiled

    return windows, logits


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    """exp of the mean next-token NLL over every window, as Evaluator.perplexity takes it."""
    nll = np.concatenate([next_token_nll(lg, w) for lg, w in zip(logits, windows)])
    return math.exp(float(nll.mean()))


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=RTOL_OF_SCALE * float(np.abs(expected).max()))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("label", list(SCHEMES))
def test_quantized_logits_equal_the_dequantized_fp_network(run, label: str, mode: str) -> None:
    _, logits = run
    quantized, fp, cells, compiled = logits(label, mode)
    assert compiled == (mode == "graph")
    expected_cell = W8A16Linear if label == "w8a16" else PtqLinear
    assert all(type(cell) is expected_cell and not getattr(cell, "fused", False) for cell in cells)
    if expected_cell is PtqLinear:
        assert all(cell._layer.matmul.int4 == label.startswith("w4a16") for cell in cells)
    assert np.abs(fp).max() > 1.0  # logits of a usable scale, not all near zero
    close(quantized, fp)


@pytest.mark.parametrize("label", list(SCHEMES))
def test_graph_and_pynative_logits_agree(run, label: str) -> None:
    _, logits = run
    graph, graph_fp, _, _ = logits(label, "graph")
    pynative, pynative_fp, _, _ = logits(label, "pynative")
    close(pynative, graph)
    close(pynative_fp, graph_fp)


@pytest.mark.parametrize("label", list(SCHEMES))
def test_perplexity_is_the_same_in_both_modes(run, label: str) -> None:
    windows, logits = run
    graph = perplexity(logits(label, "graph")[0], windows)
    pynative = perplexity(logits(label, "pynative")[0], windows)
    assert 1.0 < graph < float("inf")
    assert pynative == pytest.approx(graph, rel=1e-6, abs=0)
    assert perplexity(logits(label, "graph")[1], windows) == pytest.approx(graph, rel=1e-6, abs=0)


def test_the_asymmetric_checkpoints_exercise_the_zero_points(checkpoints) -> None:
    """Golden Stick's zp_neg / weight_zp are zero for symmetric codes, so only the
    -asym checkpoints test that the cells add them."""
    for label, path in checkpoints.items():
        with open_reader(path) as reader:
            zps = [reader.read(t) for t in reader.tensors
                   if t.name.endswith(("zp_neg", "weight_zp"))]
        assert len(zps) == 14
        assert all(zp.any() for zp in zps) == label.endswith("-asym")
        assert any(zp.any() for zp in zps) == label.endswith("-asym")
