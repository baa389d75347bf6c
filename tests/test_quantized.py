"""Quantized models (onnxlrp/quantized.py): ONNX Runtime's quantize_static (QDQ and QOperator) and
quantize_dynamic of a small CNN and a small MLP compile; the original outputs stay bit-identical; the relevance is
close to the float model's; the books close on the float relevance pass (input + bias relevance = start)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

from onnxlrp import compile_model
from onnxlrp.errors import OnnxlrpError
from onnxlrp.quantized import PREFIX

FORMATS = ("qdq", "qoperator", "dynamic")


class SmallCNN(nn.Module):
    """Conv+BN, a residual add, max pool, strided conv, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.c2(y)) + y
        y = torch.relu(self.c3(nn.functional.max_pool2d(y, 2)))
        return self.fc(y.mean((2, 3)))


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


SHAPES = {"cnn": (3, 16, 16), "mlp": (20,)}


def _data(name: str, n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).rand(n, *SHAPES[name]).astype(np.float32)


class _Calibration(CalibrationDataReader):
    def __init__(self, name: str):
        self.batches = iter([{"x": _data(name, 1, 100 + k)} for k in range(16)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(family, format): path}; format "float" is the exported float model."""
    root = tmp_path_factory.mktemp("quantized")
    paths = {}
    for name, cls in (("cnn", SmallCNN), ("mlp", SmallMLP)):
        torch.manual_seed(0)
        module = cls().eval()
        if name == "cnn":  # non-trivial BatchNorm statistics, folded by the quantizer
            module.b1.running_mean.uniform_(-0.2, 0.2)
            module.b1.running_var.uniform_(0.5, 2.0)
        path = root / f"{name}.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.from_numpy(_data(name, 1, 0)),), str(path), input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}}, opset_version=17,
                              dynamo=False)
        paths[name, "float"] = path
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice
        try:
            for fmt, qfmt in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
                paths[name, fmt] = root / f"{name}_{fmt}.onnx"
                quantize_static(str(path), str(paths[name, fmt]), _Calibration(name), quant_format=qfmt)
            paths[name, "dynamic"] = root / f"{name}_dynamic.onnx"
            quantize_dynamic(str(path), str(paths[name, "dynamic"]))
        finally:
            logging.getLogger().setLevel(level)
    return paths


def _run(model, feeds: dict) -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _explain(path, composite: str, x: np.ndarray, **options):
    compiled = compile_model(str(path), composite, **options)
    target = np.full(len(x), -1, np.int64)
    return compiled, _run(compiled, {"x": x, "target": target})


_FLOAT: dict = {}


def _float_relevance(path, composite: str, family: str):
    """The float model's logits and relevance on the comparison inputs (computed once per family/composite)."""
    key = (str(path), composite)
    if key not in _FLOAT:
        _FLOAT[key] = _explain(path, composite, _data(family, 8, 7))[1]
    return _FLOAT[key]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", ["cnn", "mlp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_ops_are_in_the_graph(models, family, fmt):
    ops = {n.op_type for n in onnx.load(str(models[family, fmt])).graph.node}
    expected = {"qdq": {"QuantizeLinear", "DequantizeLinear"},
                "qoperator": {"QLinearConv"} if family == "cnn" else {"QLinearMatMul"},
                "dynamic": {"DynamicQuantizeLinear", "ConvInteger" if family == "cnn" else "MatMulInteger"}}[fmt]
    if family == "mlp" and fmt == "qoperator":
        expected = {"QuantizeLinear"}  # Gemm -> QGemm or MatMul -> QLinearMatMul, depending on the export
    assert expected <= ops, ops


# Relative L2 between the int8 model's relevance and the float model's, measured on this stack (onnxruntime 1.31.1,
# torch 2.14.1 TorchScript export, seed-0 weights, 16 random calibration samples, 8 random inputs):
#                      cnn: qdq   qoperator  dynamic    mlp: qdq   qoperator  dynamic
#   epsilon_plus_flat       0.055 0.055      0.013           0.068 0.068      0.045
#   epsilon (1e-6)          0.195 0.195      0.134           0.049 0.049      0.031
# (QDQ and QOperator quantize alike, so their twins compute the same relevance.) LRP-epsilon with a tiny epsilon
# is close to gradient x input and reacts to every activation that quantization moves across a ReLU or max-pool
# decision; the composites' z+ and flat rules are far steadier. Bounds: about 1.5x the largest measured value
# per composite; a wrong rule, weight, scale or sign gives O(1).
BOUND = {"epsilon_plus_flat": 0.10, "epsilon": 0.30}


@pytest.mark.parametrize("family", ["cnn", "mlp"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon"])
def test_relevance_close_to_float_and_outputs_bit_identical(models, family, fmt, composite):
    x = _data(family, 8, 7)
    logits_f, r_float = _float_relevance(models[family, "float"], composite, family)
    _, (logits_q, r_quant) = _explain(models[family, fmt], composite, x)
    original = _run(str(models[family, fmt]), {"x": x})[0]
    assert np.array_equal(original, logits_q)  # the quantized forward is untouched
    assert np.isfinite(r_quant).all()
    assert r_quant.shape == x.shape
    # explained the same class as the float model on these inputs (argmax agrees), so the maps are comparable
    same = logits_f.argmax(1) == logits_q.argmax(1)
    assert same.sum() >= 6
    error = _rel_l2(r_quant[same], r_float[same])
    print(f"{family} {fmt} {composite}: relative L2 {error:.4f}")
    assert error < BOUND[composite]


@pytest.mark.parametrize("family", ["cnn", "mlp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_conservation_on_the_float_relevance_pass(models, family, fmt):
    """LRP-epsilon with bias relevance: input relevance + absorbed = the start relevance, the twin's score of the
    explained class. (The twin computes the dequantized arithmetic exactly; ONNX Runtime's fused u8s8 kernels can
    differ from it by a few quantization steps on AVX2 CPUs: its documented saturation, see reduce_range.)"""
    x = _data(family, 4, 3)
    compiled = compile_model(str(models[family, fmt]), "epsilon", bias_relevance="layers")
    compiled.graph.output.append(onnx.helper.make_tensor_value_info(PREFIX + "logits", onnx.TensorProto.FLOAT,
                                                                    None))
    outputs = _run(compiled, {"x": x, "target": np.full(len(x), -1, np.int64)})
    names = [o.name for o in compiled.graph.output]
    relevance, absorbed = outputs[names.index("x_relevance")], outputs[names.index("bias_relevance")]
    twin_logits = outputs[names.index(PREFIX + "logits")]
    np.testing.assert_allclose(twin_logits, outputs[0], atol=0.05)  # the twin is the int8 model's output
    total = relevance.reshape(len(x), -1).sum(1) + absorbed.sum(1)
    np.testing.assert_allclose(total, twin_logits.max(1), rtol=1e-4, atol=1e-6)


def test_metadata_records_the_twin(models):
    compiled = compile_model(str(models["cnn", "qoperator"]), "epsilon")
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert "float_twin" in meta["onnxlrp.canonicalizations"]
    rules = {r["op"] for r in __import__("json").loads(meta["onnxlrp.rules"])}
    assert {"Conv", "QuantizeLinear", "DequantizeLinear"} <= rules


def test_activation_weight_is_refused(tmp_path):
    """A QLinearMatMul whose second operand is an activation has no LRP rule: one-line error naming the node."""
    from onnx import TensorProto, helper
    scale = [helper.make_tensor(n, TensorProto.FLOAT, [], [0.1]) for n in ("s",)]
    zero = [helper.make_tensor("z", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("QLinearMatMul", ["xq", "s", "z", "xq", "s", "z", "s", "z"], ["yq"], name="mm"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], scale + zero)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with pytest.raises(OnnxlrpError, match="node mm \\(QLinearMatMul\\)"):
        compile_model(model, "epsilon")


@pytest.mark.parametrize("family", ["cnn", "mlp"])
def test_qdq_twin_is_the_quantized_graph_evaluated_op_by_op(models, family):
    """With graph optimisations off, ONNX Runtime evaluates a QDQ model op by op in float (no integer kernels):
    the twin (weights dequantized at compile time) must give exactly the same output."""
    compiled = compile_model(str(models[family, "qdq"]), "epsilon")
    compiled.graph.output.append(onnx.helper.make_tensor_value_info(PREFIX + "logits", onnx.TensorProto.FLOAT,
                                                                    None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = _data(family, 8, 5)
    plain = ort.InferenceSession(str(models[family, "qdq"]), options, providers=["CPUExecutionProvider"])
    twin = ort.InferenceSession(compiled.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = plain.run(None, {"x": x})[0]
    names = [o.name for o in compiled.graph.output]
    got = twin.run(None, {"x": x, "target": np.full(8, -1, np.int64)})
    np.testing.assert_array_equal(got[names.index(PREFIX + "logits")], expected)
