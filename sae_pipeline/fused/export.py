"""ONNX and INT8 exports of a fused side-net (issue #6), and an ONNX Runtime session that runs either.

The graph is written node by node (opset 17), whitening folded into the first layer so that inference needs no
preprocessing: delta = MatMul(alphas @ film * Relu(acts @ W1' + b1'), W2), with acts (batch, seq, d_model) dynamic
in batch and sequence and alphas (behaviours,). INT8 is ONNX Runtime's static post-training quantisation (QDQ,
per-channel weights) calibrated on activations that cover every behaviour and benign text; the FiLM product stays
in float, since the alphas are a handful of run-time numbers, not a distribution to calibrate. Weight-only INT8
schemes are there too (see INT8_SCHEMES)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from sae_pipeline.fused.net import FusedNet
from sae_pipeline.hashing import file_sha256

OPSET = 17
# The IR version is stamped, not left at the onnx package's newest: ONNX Runtime refuses an IR newer than it knows
# (1.30 reads up to 13; onnx 1.23 writes 14), and the INT16 quantiser's move to opset 21 needs at least 10.
IR_VERSION = 10
ENCODER_NODE, GATE_NODE, DECODER_NODE = "encoder", "film_gate", "decoder"
# INT8 schemes (weights per output channel, symmetric; the FiLM product stays float). Static post-training
# quantisation (QDQ, MinMax activation ranges from the calibration feeds): `a8w8` and `a16w8` quantise both matmuls'
# inputs to INT8 / INT16 (ONNX Runtime's contrib QDQ ops at opset 17); the `_decoder` ones only the decoder matmul,
# keeping the encoder in float, whose input range one outlier sets per tensor (a per-tensor scale cannot hold both the
# rule's thresholds and the odd token far off them). Weight-only: `w8` and `w8_decoder` store INT8 weights
# (DequantizeLinear before each matmul) and leave activations in float, so they need no calibration. Measured against
# the gates in data/evidence/fused_int8.jsonl.
STATIC_SCHEMES = ("a8w8", "a16w8", "a8w8_decoder", "a16w8_decoder")
WEIGHT_ONLY_SCHEMES = {"w8": ("W1_DH", "W2_HD"), "w8_decoder": ("W2_HD",)}
INT8_SCHEMES = (*STATIC_SCHEMES, *WEIGHT_ONLY_SCHEMES)


def _initializer(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
    return numpy_helper.from_array(tensor.detach().float().contiguous().numpy(), name)


def onnx_model(net: FusedNet) -> onnx.ModelProto:
    """The net as an ONNX graph, whitening folded in: W1' = W1 / std, b1' = b1 - W1' . mean."""
    with torch.no_grad():
        w1_HD = net.W1_HD * net.inv_std_D
        b1_H = net.b1_H - w1_HD @ net.mean_D
    d_model, behaviors = w1_HD.shape[1], len(net.behaviors)
    nodes = [
        helper.make_node("MatMul", ["acts", "W1_DH"], ["pre"], name=ENCODER_NODE),
        helper.make_node("Add", ["pre", "b1_H"], ["pre_biased"]),
        helper.make_node("Relu", ["pre_biased"], ["hidden"]),
        helper.make_node("MatMul", ["alphas", "film_GH"], ["gate_H"], name=GATE_NODE),
        helper.make_node("Mul", ["hidden", "gate_H"], ["gated"]),
        helper.make_node("MatMul", ["gated", "W2_HD"], ["delta"], name=DECODER_NODE),
    ]
    graph = helper.make_graph(
        nodes, "fused_side_net",
        [helper.make_tensor_value_info("acts", TensorProto.FLOAT, ["batch", "seq", d_model]),
         helper.make_tensor_value_info("alphas", TensorProto.FLOAT, [behaviors])],
        [helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [_initializer("W1_DH", w1_HD.T), _initializer("b1_H", b1_H), _initializer("film_GH", net.film_GH),
         _initializer("W2_HD", net.W2_DH.T)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="sae-pipeline")
    model.metadata_props.add(key="behaviors", value=",".join(net.behaviors))
    onnx.checker.check_model(model)
    return model


def save_onnx(net: FusedNet, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model(net), str(path))
    return file_sha256(path)


class _Calibration:
    """onnxruntime's CalibrationDataReader: batches of (acts, alphas) feeds, then None."""

    def __init__(self, feeds: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self._feeds = iter([{"acts": acts.float().numpy()[None], "alphas": alphas.float().numpy()}
                            for acts, alphas in feeds])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _weight_only(model: onnx.ModelProto, names: tuple[str, ...]) -> tuple[onnx.ModelProto, dict]:
    """The model with each named (in, out) weight stored as INT8 with a float scale per output channel
    (symmetric, max |w| -> 127) and dequantised in the graph; returns it and the scales' summary."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    summary = {}
    for name in names:
        weight = numpy_helper.to_array(initializers[name])
        scale = np.abs(weight).max(0) / 127.0
        scale[scale == 0] = 1.0  # an all-zero channel (an unused unit) stays exactly 0
        quantised = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([numpy_helper.from_array(quantised, f"{name}_int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")])
        graph.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name],
                                              axis=1, name=f"dequantize_{name}"))
        summary[name] = {"channels": int(scale.size), "scale_max": float(scale.max())}
    onnx.checker.check_model(model)
    return model, summary


def save_int8(float_path: Path, path: Path, feeds: Iterable[tuple[torch.Tensor, torch.Tensor]],
              calibration_cache: Path, scheme: str = "a8w8") -> str:
    """INT8 from the float ONNX file under one of INT8_SCHEMES. Static schemes calibrate on feeds of (acts (tokens,
    d_model), alphas) and write the ranges to calibration_cache; weight-only ones write their scales there."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown INT8 scheme {scheme!r}; schemes are {list(INT8_SCHEMES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    calibration_cache.unlink(missing_ok=True)  # an existing cache would be read, not written
    if scheme in WEIGHT_ONLY_SCHEMES:
        model, summary = _weight_only(onnx.load(str(float_path)), WEIGHT_ONLY_SCHEMES[scheme])
        onnx.save(model, str(path))
        calibration_cache.write_text(json.dumps({"scheme": scheme, "activations": "float (weight-only)",
                                                 "weights": summary}, indent=2, sort_keys=True))
        return file_sha256(path)
    wide = scheme.startswith("a16")
    excluded = [GATE_NODE] + ([ENCODER_NODE] if scheme.endswith("_decoder") else [])
    quantize_static(float_path, path, _Calibration(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt16 if wide else QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=calibration_cache, extra_options={"UseQDQContribOps": wide})
    return file_sha256(path)


class OnnxSideNet:
    """An exported side-net in ONNX Runtime, called as the torch net is: (acts, alphas) -> delta in the activations'
    dtype and device. prefer_cuda: the CUDA execution provider where onnxruntime-gpu is installed; the plain
    onnxruntime package has only the CPU one, which then runs the net (`providers` says which)."""

    def __init__(self, path: Path, prefer_cuda: bool = False):
        import onnxruntime

        cuda = prefer_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # called per hooked layer per token: threads cost more than they save
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
            else ["CPUExecutionProvider"])
        self.providers = tuple(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.behaviors = tuple(meta.get("behaviors", "").split(","))
        self.d_model = int(self.session.get_inputs()[0].shape[-1])

    def __call__(self, acts: torch.Tensor, alphas_G: torch.Tensor) -> torch.Tensor:
        shape = acts.shape
        feed = {"acts": acts.detach().float().reshape(1, -1, shape[-1]).cpu().numpy(),
                "alphas": alphas_G.detach().float().cpu().numpy()}
        delta = np.asarray(self.session.run(["delta"], feed)[0])
        return torch.from_numpy(delta).reshape(shape).to(acts.device, acts.dtype)
