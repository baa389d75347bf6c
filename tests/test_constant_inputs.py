"""Inputs that are parameters, not data (a Keras-style Normalization exported with its mean and variance as graph
inputs): no relevance output for them, not required by explain, and `inspect` names the explained data input."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp import compile_model
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError

RNG = np.random.RandomState(0)
MEAN, VARIANCE = RNG.randn(4).astype(np.float32), RNG.uniform(0.5, 2.0, 4).astype(np.float32)
W1, B1 = RNG.randn(4, 8).astype(np.float32), RNG.randn(8).astype(np.float32) * 0.1
W2, B2 = RNG.randn(8, 3).astype(np.float32), RNG.randn(3).astype(np.float32) * 0.1


def keras_like(defaults: bool) -> onnx.ModelProto:
    """x -> (x - mean) / sqrt(variance) -> Dense(8, relu) -> Dense(3), with mean and variance graph inputs
    (``defaults``: backed by initializers of the same name, as Keras' own export writes them)."""
    nodes = [helper.make_node("Sub", ["x", "mean"], ["centred"], name="normalization/sub"),
             helper.make_node("Sqrt", ["variance"], ["std"], name="normalization/sqrt"),
             helper.make_node("Div", ["centred", "std"], ["normalized"], name="normalization/truediv"),
             helper.make_node("MatMul", ["normalized", "w1"], ["h0"], name="dense/MatMul"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="dense/BiasAdd"),
             helper.make_node("Relu", ["h1"], ["h"], name="dense/Relu"),
             helper.make_node("MatMul", ["h", "w2"], ["o0"], name="dense_1/MatMul"),
             helper.make_node("Add", ["o0", "b2"], ["output_0"], name="dense_1/BiasAdd")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("mean", TensorProto.FLOAT, [4]),
              helper.make_tensor_value_info("variance", TensorProto.FLOAT, [4])]
    weights = {"w1": W1, "b1": B1, "w2": W2, "b2": B2}
    if defaults:
        weights.update(mean=MEAN, variance=VARIANCE)
    graph = helper.make_graph(nodes, "keras_normalization", inputs,
                              [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def reference(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LRP-epsilon (eps = 0) by hand: the normalisation is affine (relevance passes), two dense layers."""
    z = (x.astype(np.float64) - MEAN) / np.sqrt(VARIANCE)
    h1 = z @ W1 + B1
    h = np.maximum(h1, 0)
    out = h @ W2 + B2
    r_out = np.zeros_like(out)
    r_out[np.arange(len(x)), target] = out[np.arange(len(x)), target]
    r_h = h * ((r_out / out) @ W2.T)
    return z * ((r_h / h1) @ W1.T)


def test_initializer_backed_inputs_are_parameters(tmp_path):
    model = keras_like(defaults=True)
    path = tmp_path / "keras.onnx"
    onnx.save(model, str(path))
    compiled = compile_model(str(path), "epsilon", epsilon=0.0)
    outputs = [o.name for o in compiled.graph.output]
    assert "x_relevance" in outputs and "mean_relevance" not in outputs and "variance_relevance" not in outputs
    explainer = onnxlrp.Explainer.from_compiled(compiled)
    assert explainer.input_names == ["x"]  # explain needs only the data
    x = RNG.randn(5, 4).astype(np.float32)
    scores, relevance = explainer.explain(x)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(scores["output_0"], original)
    np.testing.assert_allclose(relevance, reference(x, original.argmax(1)), rtol=1e-3, atol=1e-5)


def test_marked_constant_inputs(tmp_path):
    """Without defaults, mean and variance are plain inputs: unmarked, they are treated as data and get relevance
    outputs of their own (the difference x - mean splits relevance between them); marked with constant_inputs they
    get none (and stay inputs the caller feeds)."""
    model = keras_like(defaults=False)
    unmarked = compile_model(model, "epsilon")
    assert {"mean_relevance", "variance_relevance"} <= {o.name for o in unmarked.graph.output}
    compiled = compile_model(model, "epsilon", epsilon=0.0, constant_inputs=["mean", "variance"])
    assert [o.name for o in compiled.graph.output] == ["output_0", "x_relevance"]
    assert {"x", "mean", "variance"} <= {i.name for i in compiled.graph.input}
    x = RNG.randn(3, 4).astype(np.float32)
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    out, relevance = session.run(None, {"x": x, "mean": MEAN, "variance": VARIANCE,
                                        "target": np.array([0, 1, 2], np.int64)})
    np.testing.assert_allclose(relevance, reference(x, np.array([0, 1, 2])), rtol=1e-3, atol=1e-5)
    with pytest.raises(OnnxlrpError, match="'average' is not a model input"):
        compile_model(model, "epsilon", constant_inputs=["average"])


def test_inspect_names_the_explained_input(tmp_path):
    path = tmp_path / "keras.onnx"
    onnx.save(keras_like(defaults=False), str(path))
    result = CliRunner().invoke(main, ["inspect", str(path), "--constant-input", "mean", "--constant-input",
                                       "variance"])
    assert result.exit_code == 0, result.output
    assert "explained: output 'output_0' (class given by target); relevance for input(s): x; constant input(s): " \
           "mean, variance" in result.output
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "out.onnx"),
                                       "--constant-input", "mean", "--constant-input", "variance"])
    assert result.exit_code == 0, result.output
