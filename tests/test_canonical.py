"""Graphs as other frameworks write them: unfolded BatchNormalization, MatMul + bias Add, Gemm alpha/beta,
IR-3 / opset-9 Caffe-style models with weights listed as inputs, Dropout, LRN and a final Softmax."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

import onnxlrp
from helpers import exact_zennit_batch_norm

exact_zennit_batch_norm()  # Zennit 0.5.1 leaves eps in its merged BatchNorms (see helpers)


def _bn_net() -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    for bn in (net[1], net[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def _init(name, tensor) -> onnx.TensorProto:
    return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)


def _handwritten_bn_graph(net: nn.Module) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Flatten -> MatMul + Add -> BatchNormalization -> Relu ->
    Gemm(alpha=0.5, beta=2, weights pre-scaled) -> Softmax, as a non-PyTorch exporter might write it."""
    conv, bn1, lin1, bn2, lin2 = net[0], net[1], net[4], net[5], net[7]
    inits = [_init("cw", conv.weight), _init("cb", conv.bias),
             _init("g1", bn1.weight), _init("b1", bn1.bias), _init("m1", bn1.running_mean),
             _init("v1", bn1.running_var), _init("w1", lin1.weight.T), _init("bias1", lin1.bias),
             _init("g2", bn2.weight), _init("b2", bn2.bias), _init("m2", bn2.running_mean),
             _init("v2", bn2.running_var), _init("w2", lin2.weight * 2.0), _init("c2", lin2.bias * 0.5)]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g1", "b1", "m1", "v1"], ["n1"], epsilon=1e-5, name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("MatMul", ["f", "w1"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bias1"], ["a1"], name="bias_add"),
        helper.make_node("BatchNormalization", ["a1", "g2", "b2", "m2", "v2"], ["n2"], epsilon=1e-5, name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w2", "c2"], ["logits"], transB=1, alpha=0.5, beta=2.0, name="gemm"),
        helper.make_node("Softmax", ["logits"], ["p"], axis=1),
    ]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_unfolded_batchnorm_and_bias_add_equal_zennit_with_merged_batchnorm(composite):
    net = _bn_net()
    model = _handwritten_bn_graph(net)
    x = torch.randn(4, 3, 5, 5)
    explainer = onnxlrp.Explainer(model, composite=composite, low=-3, high=3)
    outputs, relevance = explainer.explain(x.numpy())
    # the original outputs are bit-identical to the uncompiled model
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(outputs["p"], original.run(None, {"x": x.numpy()})[0])
    zennit = {"epsilon_plus_flat": lambda c: EpsilonPlusFlat(canonizers=c),
              "epsilon_gamma_box": lambda c: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=c)}[composite]
    with torch.no_grad():
        one_hot = torch.eye(3)[net(x).argmax(1)]
    with Gradient(model=net, composite=zennit([SequentialMergeBatchNorm()])) as attributor:
        _, expected = attributor(x.clone(), lambda out: out * one_hot)
    expected = expected.detach().numpy()
    assert np.linalg.norm(relevance - expected) / np.linalg.norm(expected) <= 1e-4
    rules = {r["node"]: r["rule"] for r in __import__("json").loads(
        {p.key: p.value for p in explainer.compiled.metadata_props}["onnxlrp.rules"])}
    assert rules["bn1"] == "fused into conv" and rules["bias_add"] == "fused into matmul"
    assert rules["bn2"] == "fused into matmul"


def test_gemm_before_relu_is_read_as_it_is_and_before_tanh_recomputed():
    """ONNX Runtime fuses a Gemm with the activation after it (FusedGemm). Its Tanh is not the standalone Tanh's
    float, so the rules read a recomputed MatMul + Add there; Relu gives the same float either way, so the rules
    read the Gemm's own output (no second pass over the weights). Original outputs bit-identical both ways."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5)).eval()
    model = _torch_onnx(net, torch.randn(2, 40))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Tanh", "Gemm"]
    relu_gemm, tanh_gemm = model.graph.node[0].output[0], model.graph.node[2].output[0]
    compiled = onnxlrp.compile_model(model, composite="epsilon")
    inlined = onnx.inliner.inline_local_functions(compiled)
    recomputed = {n.name for n in inlined.graph.node if n.op_type == "MatMul"}
    assert not any(relu_gemm in name for name in recomputed)
    assert any(tanh_gemm in name for name in recomputed)
    x = np.random.default_rng(0).standard_normal((7, 40)).astype(np.float32)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x, "target": np.zeros(7, np.int64)})
    np.testing.assert_array_equal(outputs[0], original.run(None, {"input": x})[0])


def _torch_onnx(net: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """``net`` exported by the TorchScript exporter (Linear as Gemm), batch axis dynamic."""
    import io
    buffer = io.BytesIO()
    torch.onnx.export(net, x, buffer, dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def _caffe_style_model(bias: bool) -> onnx.ModelProto:
    """IR 3, opset 9: weights also listed as graph inputs, LRN op, Reshape before Gemm, Dropout with ratio,
    Softmax at the end (how Caffe-converted zoo models look)."""
    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.standard_normal((6, 3, 3, 3)) * 0.3, "fc_w": rng.standard_normal((4, 6 * 3 * 3)) * 0.3}
    weights.update(conv_b=rng.standard_normal(6) * 0.1 * bias, fc_b=rng.standard_normal(4) * 0.1 * bias)
    weights["shape"] = np.array([-1, 6 * 3 * 3])
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("LRN", ["relu"], ["norm"], size=5, alpha=1e-3, beta=0.75, bias=1.0),
        helper.make_node("MaxPool", ["norm"], ["pool"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Reshape", ["pool", "shape"], ["flat"]),
        helper.make_node("Dropout", ["flat"], ["drop"], ratio=0.5),
        helper.make_node("Gemm", ["drop", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("Softmax", ["fc"], ["prob"]),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 3, 7, 7])] + [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "caffe", inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [2, 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize("lrn_rule", ["identity", "taylor"])
def test_caffe_style_opset9_model(tmp_path, lrn_rule):
    path = tmp_path / "caffe.onnx"
    onnx.save(_caffe_style_model(bias=False), str(path))
    x = np.abs(np.random.default_rng(1).standard_normal((2, 3, 7, 7))).astype(np.float32)
    compiled = onnxlrp.compile_model(path, "epsilon", epsilon=0.0, lrn_rule=lrn_rule)
    onnx.checker.check_model(compiled, full_check=True)
    assert [i.name for i in compiled.graph.input] == ["data", "target"]
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert "drop_initializer_inputs" in meta["onnxlrp.canonicalizations"]
    assert "upgrade_opset" in meta["onnxlrp.canonicalizations"]
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    prob, relevance = session.run(["prob", "data_relevance"], {"data": x, "target": np.array([1, 3])})
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    np.testing.assert_allclose(prob, original, rtol=1e-6)
    # the softmax is looked through: relevance of a bias-free net sums to the chosen logit
    logits_model = _caffe_style_model(bias=False)
    logits_model.graph.output[0].name = "fc"
    logits_model.graph.node.pop()
    logits = ort.InferenceSession(logits_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"data": x})[0]
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(1), logits[[0, 1], [1, 3]], rtol=1e-4, atol=1e-6)


def test_external_data_model(tmp_path, exported):
    model = onnx.load(str(exported("lenet", "torchscript17")))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    x = np.random.default_rng(2).standard_normal((3, 1, 16, 16)).astype(np.float32)
    _, a = onnxlrp.Explainer(path).explain(x)
    _, b = onnxlrp.Explainer(exported("lenet", "torchscript17")).explain(x)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _core_nodes(first: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Conv", [first, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]


def _core_weights() -> list[onnx.TensorProto]:
    rng = np.random.default_rng(3)
    return [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n)
            for n, s in [("w", (5, 3, 3, 3)), ("b", (5,)), ("fw", (4, 5)), ("fb", (4,))]]


@pytest.mark.parametrize("raw_type", [TensorProto.UINT8, TensorProto.FLOAT])
def test_preprocessing_in_the_graph(raw_type):
    """Cast, Sub mean, Div std and an NHWC->NCHW Transpose in front of the network (how tf2onnx and hand-made
    deployment graphs look): relevance of the raw input equals the core network's relevance at the normalised
    NCHW input, moved back to NHWC."""
    mean = numpy_helper.from_array(np.array([120.0, 110.0, 100.0], np.float32), "mean")
    std = numpy_helper.from_array(np.array([60.0, 50.0, 55.0], np.float32), "std")
    pre = [helper.make_node("Cast", ["raw"], ["rawf"], to=TensorProto.FLOAT),
           helper.make_node("Sub", ["rawf", "mean"], ["centred"]),
           helper.make_node("Div", ["centred", "std"], ["scaled"]),
           helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2])]
    full = helper.make_model(helper.make_graph(
        pre + _core_nodes("nchw"), "pre", [helper.make_tensor_value_info("raw", raw_type, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], _core_weights() + [mean, std]),
        opset_imports=[helper.make_opsetid("", 18)])
    core = helper.make_model(helper.make_graph(
        _core_nodes("x"), "core", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], _core_weights()),
        opset_imports=[helper.make_opsetid("", 18)])
    raw = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 3)).astype(
        np.uint8 if raw_type == TensorProto.UINT8 else np.float32)
    compiled = onnxlrp.compile_model(full, "epsilon_plus")
    out = [o for o in compiled.graph.output if o.name == "raw_relevance"][0]
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    _, relevance = onnxlrp.Explainer(full, composite="epsilon_plus").explain(raw, target=[1, 2])
    normalised = ((raw.astype(np.float32) - [120.0, 110.0, 100.0]) / [60.0, 50.0, 55.0]).astype(np.float32)
    _, expected = onnxlrp.Explainer(core, composite="epsilon_plus").explain(normalised.transpose(0, 3, 1, 2),
                                                                           target=[1, 2])
    assert relevance.dtype == np.float32 and relevance.shape == raw.shape
    np.testing.assert_allclose(relevance, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-6)
