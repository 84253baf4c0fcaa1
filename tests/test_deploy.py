"""Deploy loader: a MindFormers Llama2 runs the W8A16 checkpoint on CPU (GRAPH_MODE)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest

import mindspore as ms
from mindformers import LlamaConfig, LlamaForCausalLM

from ckpt_rtn import dtypes
from ckpt_rtn.errors import CkptRtnError
from ckpt_rtn.runtime import deploy
from ckpt_rtn.runtime.deploy import (DeployError, W8A16Linear, load_fp, load_quantized,
                             quantize_network)
from ckpt_rtn.formats import TensorInfo, open_reader, open_writer
from ckpt_rtn.runtime.generation import generate_greedy
from ckpt_rtn.runtime.network import TimedForward

from conftest import cli

SEQ = 64
CONFIG = dict(batch_size=1, seq_length=SEQ, hidden_size=64, num_layers=2, num_heads=4,
              n_kv_heads=2, vocab_size=128, intermediate_size=128, use_past=False,
              use_rope_slice=True, fused_rms_norm=False, compute_dtype="float32",
              param_init_type="float32", layernorm_compute_type="float32",
              softmax_compute_type="float32", rotary_dtype="float32")


def tiny_llama() -> LlamaForCausalLM:
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    net = LlamaForCausalLM(LlamaConfig(**CONFIG))
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Random FP weights saved by MindSpore, and their ckpt-rtn W8A16 conversion."""
    root = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(0)
    arrays: Dict[str, np.ndarray] = {}
    for p in tiny_llama().get_parameters():
        std = 1.0 if ("lm_head" in p.name or "embedding" in p.name) else 0.1
        arrays[p.name] = (np.ones(p.shape, np.float32) if len(p.shape) == 1 else
                          (rng.standard_normal(p.shape) * std).astype(np.float32))
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()],
                       str(root / "fp.ckpt"))
    result = cli("convert", root / "fp.ckpt", root / "w8a16.ckpt", "-q")
    assert result.exit_code == 0, result.stderr
    return root / "fp.ckpt", root / "w8a16.ckpt"


@pytest.fixture(scope="module")
def networks(checkpoints):
    fp_path, w8_path = checkpoints
    fp = tiny_llama()
    load_fp(fp, fp_path)
    quantized = tiny_llama()
    layers = quantize_network(quantized)
    load_quantized(quantized, w8_path)
    return fp, quantized, layers


def test_quantized_logits_match_the_fp_network(networks) -> None:
    fp, quantized, layers = networks
    assert len(layers) == 14 and "lm_head" not in layers
    ids = ms.Tensor(np.random.default_rng(1).integers(1, 128, (1, SEQ)).astype(np.int32))
    a, b = fp(ids)[0].asnumpy(), quantized(ids)[0].asnumpy()
    assert a.shape == b.shape == (1, SEQ, 128)
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine >= 0.999
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


def test_greedy_generation_is_identical(networks) -> None:
    fp, quantized, _ = networks
    prompt = [5, 17, 99, 3, 42]
    expected = generate_greedy(TimedForward(fp, SEQ), prompt, 8)
    assert len(expected) == 8
    assert generate_greedy(TimedForward(quantized, SEQ), prompt, 8) == expected


def test_network_parameters_equal_the_checkpoint_tensor_set(networks, checkpoints) -> None:
    _, quantized, _ = networks
    net_params = {p.name: (str(p.dtype), tuple(p.shape)) for p in quantized.get_parameters()}
    with open_reader(checkpoints[1]) as reader:
        ckpt_tensors = {t.name: (t.dtype.name, t.shape) for t in reader.tensors
                        if t.dtype is not dtypes.STRING}  # the settings record
    assert net_params == ckpt_tensors
    assert net_params["model.layers.0.feed_forward.w1._handler.weight"] == ("Int8", (128, 64))
    assert net_params["model.layers.1.attention.wk._weight_quantizer.scale"] == ("Float32", (32,))


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint, letting `edit(name, array)` return (name, array) or None to drop."""
    with open_reader(src) as reader:  # the str settings record is left out: no parameter
        tensors = [(t, reader.read(t)) for t in reader.tensors if t.dtype is not dtypes.STRING]
    kept = [r for r in (edit(t.name, a) for t, a in tensors) if r is not None]
    infos = [TensorInfo.of(n, dtypes.from_mindspore_name(
        {np.dtype(np.int8): "Int8", np.dtype(np.float16): "Float16",
         np.dtype(np.float32): "Float32"}[a.dtype]), a.shape) for n, a in kept]
    with open_writer(dst, infos, format="ckpt", metadata={}) as writer:
        for name, array in kept:
            writer.write(name, array)
    return dst


SCALE = "model.layers.0.attention.wq._weight_quantizer.scale"


@pytest.mark.parametrize("case,edit,message", [
    ("missing scale", lambda n, a: None if n == SCALE else (n, a), f"missing 1: {SCALE}"),
    ("wrong dtype", lambda n, a: (n, a.astype(np.float16)) if n == SCALE else (n, a),
     f"mismatched 1: {SCALE} (network Float32 (64,), checkpoint Float16 (64,))"),
    ("wrong shape", lambda n, a: (n, a[:32]) if n == SCALE else (n, a),
     f"mismatched 1: {SCALE} (network Float32 (64,), checkpoint Float32 (32,))"),
    ("extra tensor", lambda n, a: (n + ".extra", a) if n == SCALE else (n, a),
     "unexpected 1: " + SCALE + ".extra"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(networks, checkpoints, tmp_path: Path,
                                                   case: str, edit, message: str) -> None:
    _, quantized, _ = networks
    bad = rewrite(checkpoints[1], tmp_path / "bad.ckpt", edit)
    with pytest.raises(DeployError) as info:
        load_quantized(quantized, bad)
    assert str(info.value).startswith(f"{bad}: does not match the network: ")
    assert message in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_scale_that_is_not_finite_is_refused(networks, checkpoints, tmp_path: Path,
                                               value: float) -> None:
    """A NaN scale loaded: the network computed NaN, `generate` printed the prompt alone and
    SQuAD scored 0, both with exit 0."""
    _, quantized, _ = networks

    def poison(name: str, array: np.ndarray):
        if name == SCALE:
            array = array.copy()
            array[3] = value
        return name, array

    bad = rewrite(checkpoints[1], tmp_path / "bad.ckpt", poison)
    with pytest.raises(DeployError, match=f"^{bad}: tensor '{SCALE}' holds inf or NaN$"):
        load_quantized(quantized, bad)


@pytest.mark.parametrize("dtype", [ms.bfloat16, ms.float16, ms.float32])
def test_every_float_dtype_is_checked_for_inf_and_nan(dtype) -> None:
    """MindSpore 2.9 has no bfloat16 IsFinite on CPU: a bfloat16 checkpoint must still load."""
    values = np.array([1.0, 2.0, np.inf], np.float32)
    good = {"w": ms.Parameter(ms.Tensor(values[:2]).astype(dtype), name="w")}
    deploy._refuse_non_finite("m.ckpt", good)  # pylint: disable=protected-access
    bad = {"w": ms.Parameter(ms.Tensor(values).astype(dtype), name="w")}
    with pytest.raises(DeployError, match="^m.ckpt: tensor 'w' holds inf or NaN$"):
        deploy._refuse_non_finite("m.ckpt", bad)  # pylint: disable=protected-access


def test_a_file_mindspore_cannot_load_is_one_error(tmp_path: Path) -> None:
    """ckpt-rtn reads F8_E4M3 in safetensors; MindSpore 2.9's loader raised KeyError."""
    path = tmp_path / "fp8.safetensors"
    with open_writer(path, [TensorInfo.of("x", dtypes.FLOAT8_E4M3, (4,))], format="safetensors",
                     metadata={}) as writer:
        writer.write("x", np.full(4, 0x38, np.uint8))
    with pytest.raises(DeployError, match=f"^{path}: MindSpore cannot load it: KeyError"):
        load_fp(tiny_llama(), path)


def test_a_corrupted_checkpoint_is_refused_by_its_crc(checkpoints, tmp_path: Path) -> None:
    """MindSpore's loader checks no CRC unless asked: eval measured a corrupted file."""
    crc = tmp_path / "crc.ckpt"
    assert cli("convert", checkpoints[0], crc, "--crc", "-q").exit_code == 0
    data = bytearray(crc.read_bytes())
    data[len(data) // 2] ^= 0x40
    crc.write_bytes(bytes(data))
    with pytest.raises(CkptRtnError, match="CRC"):
        deploy.load_checkpoint_into(tiny_llama(), crc)


def test_a_layer_the_network_lacks_is_named_with_the_checkpoint(checkpoints,
                                                                tmp_path: Path) -> None:
    moved = rewrite(checkpoints[1], tmp_path / "moved.ckpt",
                    lambda n, a: (n.replace("layers.1.", "layers.9."), a))
    with pytest.raises(DeployError, match=f"^{moved}: no MindFormers Linear named "
                                          "model.layers.9."):
        deploy.load_checkpoint_into(tiny_llama(), moved)


def test_fp_checkpoint_into_a_quantized_network_is_refused(networks, checkpoints) -> None:
    _, quantized, _ = networks
    with pytest.raises(DeployError, match="missing 42.*unexpected 14"):
        load_quantized(quantized, checkpoints[0])


def test_ascend_path_builds_the_fused_op_with_the_same_parameters() -> None:
    net = tiny_llama()
    quantize_network(net, fused=True)
    cell = net.model.layers[0].attention.wq
    assert isinstance(cell, W8A16Linear) and cell.fused
    op = cell.weight_quant_matmul
    assert op.transpose_x is False and op.transpose_weight is True
    cpu = tiny_llama()
    quantize_network(cpu, fused=False)
    assert ([(p.name, str(p.dtype), tuple(p.shape)) for p in net.get_parameters()]
            == [(p.name, str(p.dtype), tuple(p.shape)) for p in cpu.get_parameters()])


def test_the_path_follows_the_device_target(monkeypatch: pytest.MonkeyPatch) -> None:
    assert deploy.use_fused_kernel() is False  # this machine runs the CPU target
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend" if key == "device_target" else None)
    assert deploy.use_fused_kernel() is True
    net = tiny_llama()
    quantize_network(net)
    assert net.model.layers[1].feed_forward.w2.fused


def test_blacklist_and_activation_are_kept() -> None:
    net = tiny_llama()
    layers = quantize_network(net, blacklist=["layers.1", "lm_head"])
    assert sorted(layers) == sorted(f"model.layers.0.{n}" for n in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    w1 = net.model.layers[0].feed_forward.w1
    assert w1.activation_flag and w1._handler.activation is not None  # SiLU stays
    everything = tiny_llama()
    assert "lm_head" in quantize_network(everything, blacklist=[])


WIDE = dict(CONFIG, hidden_size=128, intermediate_size=256, seq_length=32)


@pytest.mark.parametrize("scheme,extra", [
    ("w8a16-ptq", []), ("w4a16", ["--group-size", "64"]),
    ("w8a16-ptq", ["--asymmetric"]), ("w4a16", ["--group-size", "64", "--asymmetric"])])
def test_ptq_schemes_run_exactly_their_dequantized_weights(tmp_path: Path, scheme: str,
                                                           extra) -> None:
    """The PTQ cells compute with (q + zp) * scale: the same logits as an FP network
    holding those dequantized weights (int4 codes unpacked on CPU), zero points included."""
    from ckpt_rtn.packing import unpack_int4

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(3)
    fp = LlamaForCausalLM(LlamaConfig(**WIDE))
    fp.set_train(False)
    arrays = {p.name: (np.ones(p.shape, np.float32) if len(p.shape) == 1 else
                       (rng.standard_normal(p.shape) * 0.1).astype(np.float32))
              for p in fp.get_parameters()}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()],
                       str(tmp_path / "fp.ckpt"))
    result = cli("convert", tmp_path / "fp.ckpt", tmp_path / "q.ckpt", "--scheme", scheme,
                 *extra, "-q")
    assert result.exit_code == 0, result.stderr
    quantized = LlamaForCausalLM(LlamaConfig(**WIDE))
    quantized.set_train(False)
    layers = deploy.load_checkpoint_into(quantized, tmp_path / "q.ckpt")
    assert len(layers) == 14
    names = {p.name for p in quantized.get_parameters()}
    assert "model.layers.0.attention.wq._layer.matmul.weight_scale" in names
    with open_reader(tmp_path / "q.ckpt") as reader:
        stored = {t.name: reader.read(t) for t in reader.tensors}
    for layer in layers:  # the FP network gets the dequantized weights
        q = stored[layer + "._layer.weight"]
        scale = stored[layer + "._layer.matmul.weight_scale"]
        zp = stored[layer + "._layer.matmul.weight_zp"]
        assert zp.any() == ("--asymmetric" in extra)
        if scheme == "w4a16":
            q = unpack_int4(q).T
            scale, zp = np.repeat(scale.T, 64, axis=1), np.repeat(zp.T, 64, axis=1)
        else:
            scale, zp = scale[:, None], zp[:, None]
        arrays[layer + ".weight"] = ((q.astype(np.float32) + zp) * scale).astype(np.float32)
    ms.load_param_into_net(fp, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in arrays.items()},
                           strict_load=True)
    ids = ms.Tensor(rng.integers(1, 128, (1, 32)).astype(np.int32))
    np.testing.assert_allclose(quantized(ids)[0].asnumpy(), fp(ids)[0].asnumpy(),
                               rtol=1e-4, atol=1e-4)


def test_a_group_size_golden_stick_does_not_deploy_is_refused(tmp_path: Path) -> None:
    """A W4 checkpoint with groups of 32 (not one ckpt-rtn writes) is named and refused,
    not a traceback; inspect still describes it."""
    layer = "model.layers.0.attention.wq"
    infos = [TensorInfo.of(layer + "._layer.weight", dtypes.INT4, (64, 32)),
             TensorInfo.of(layer + "._layer.matmul.weight_scale", dtypes.FLOAT16, (2, 64)),
             TensorInfo.of(layer + "._layer.matmul.weight_zp", dtypes.FLOAT16, (2, 64))]
    path = tmp_path / "g32.ckpt"
    with open_writer(path, infos, format="ckpt", metadata={}) as writer:
        writer.write(infos[0].name, np.zeros((64, 32), np.int8))
        writer.write(infos[1].name, np.ones((2, 64), np.float16))
        writer.write(infos[2].name, np.zeros((2, 64), np.float16))
    net = LlamaForCausalLM(LlamaConfig(**CONFIG))
    with pytest.raises(DeployError, match="a w4a16 g32 checkpoint: --group-size must be one of"):
        deploy.load_checkpoint_into(net, path)
    assert cli("inspect", path).stdout.splitlines()[-1] == "quantized: w4a16 g32, 1 Linear layer"


def test_weight_memory_counts_what_each_network_holds_by_dtype(networks, checkpoints) -> None:
    from ckpt_rtn.runtime.memory import weight_memory

    fp, quantized, layers = networks
    linear_elements = sum(int(np.prod(p.shape)) for p in fp.get_parameters()
                          if any(p.name.startswith(layer + ".") for layer in layers))
    channels = sum(int(p.shape[0]) for p in fp.get_parameters()
                   if p.name.endswith(".weight") and p.name.rsplit(".", 1)[0] in layers)
    fp_memory, q_memory = weight_memory(fp), weight_memory(quantized)
    assert fp_memory.total_bytes == sum(p.nbytes for p in fp.get_parameters())
    assert set(fp_memory.by_dtype) == {"float32"}
    # Quantized layers: int8 codes, and a float32 scale and zp_neg per output channel;
    # lm_head (blacklisted) is a Linear kept in float32 in both networks.
    head = 4 * CONFIG["vocab_size"] * CONFIG["hidden_size"]
    assert fp_memory.linear_by_dtype == {"float32": 4 * linear_elements + head}
    assert q_memory.linear_by_dtype == {"int8": linear_elements,
                                        "float32": head + 2 * 4 * channels}
    assert q_memory.total_bytes - q_memory.linear_bytes == \
        fp_memory.total_bytes - fp_memory.linear_bytes  # embeddings and norms are the same
