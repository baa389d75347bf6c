"""--relevance-at TENSOR: an output TENSOR_relevance shaped like TENSOR, for any model. Checked against the
truncated model that starts at TENSOR (its input relevance must be the same numbers), by conservation between
layers (LRP-0 without biases) and on a text model's word-embedding output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.utils
import pytest
from onnx import TensorProto, helper, numpy_helper
from text_models import bag_of_embeddings, sample_text_batch

import onnxlrp
from onnxlrp.runtime import make_session

CPU = ["CPUExecutionProvider"]
LAYERS = ["conv1_out", "relu1_out", "conv2_out", "relu2_out", "flat"]


def small_cnn(biases: bool, seed: int = 0) -> onnx.ModelProto:
    """x [N, 2, 6, 6] -> Conv 3x3 -> Relu -> Conv 3x3 stride 2 -> Relu -> Flatten -> Gemm -> y [N, 3]."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((4, 2, 3, 3)), "b1": rng.standard_normal(4) * biases,
               "w2": rng.standard_normal((3, 4, 3, 3)) / 2, "b2": rng.standard_normal(3) * biases,
               "w3": rng.standard_normal((3 * 3 * 3, 3)) / 3, "b3": rng.standard_normal(3) * biases}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["conv1_out"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
             helper.make_node("Conv", ["relu1_out", "w2", "b2"], ["conv2_out"], pads=[1, 1, 1, 1], strides=[2, 2],
                              name="conv2"),
             helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
             helper.make_node("Flatten", ["relu2_out"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], name="dense")]
    graph = helper.make_graph(nodes, "small_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(compiled: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = make_session(compiled, CPU)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _truncated(model: onnx.ModelProto, tensor: str, output: str, path) -> onnx.ModelProto:
    """The part of ``model`` from ``tensor`` (now an input) to ``output``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    onnx.save(inferred, path)
    onnx.utils.extract_model(str(path), str(path), [tensor], [output])
    return onnx.load(str(path))


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1", "gradient"])
@pytest.mark.parametrize("tensor", ["relu1_out", "conv2_out", "flat"])
def test_relevance_at_a_layer_is_the_truncated_models_input_relevance(tmp_path, composite, tensor):
    model = small_cnn(biases=True)
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6)).astype(np.float32)
    target = np.array([0, 2, -1])
    full = _run(onnxlrp.compile_model(model, composite, relevance_at=[tensor]), {"x": x, "target": target})
    assert full[f"{tensor}_relevance"].shape == full_activation(model, tensor, x).shape
    head = _truncated(model, tensor, "y", tmp_path / "head.onnx")
    part = _run(onnxlrp.compile_model(head, composite), {tensor: full_activation(model, tensor, x), "target": target})
    np.testing.assert_allclose(full[f"{tensor}_relevance"], part[f"{tensor}_relevance"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(full["y"], part["y"])


def full_activation(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    return make_session(probe, CPU).run([tensor], {"x": x})[0]


def test_lrp0_without_biases_conserves_between_layers():
    model = small_cnn(biases=False)
    x = np.random.default_rng(2).standard_normal((4, 2, 6, 6)).astype(np.float32)
    target = np.array([0, 1, 2, 1])
    values = _run(onnxlrp.compile_model(model, "epsilon", epsilon=0.0, relevance_at=LAYERS),
                  {"x": x, "target": target})
    start = values["y"][np.arange(4), target]
    for tensor in LAYERS + ["x"]:
        total = values[f"{tensor}_relevance"].reshape(4, -1).sum(1)
        np.testing.assert_allclose(total, start, rtol=1e-4, atol=1e-6, err_msg=tensor)
    np.testing.assert_array_equal(values["relu1_out_relevance"], values["conv1_out_relevance"])  # Relu passes


def test_relevance_at_the_word_embeddings_of_a_text_model():
    feeds = sample_text_batch()
    feeds["target"] = np.array([1, -1])
    for composite in ("epsilon_plus_flat", "gradient"):
        compiled = onnxlrp.compile_model(bag_of_embeddings(), composite, relevance_at=["embeddings"])
        values = _run(compiled, feeds)
        assert values["embeddings_relevance"].shape == (2, 5, 4)
        np.testing.assert_allclose(values["embeddings_relevance"].sum(-1), values["input_ids_relevance"],
                                   rtol=1e-5, atol=1e-7)
        meta = {p.key: p.value for p in compiled.metadata_props}
        assert json.loads(meta["onnxlrp.relevance_at"]) == [{"tensor": "embeddings",
                                                             "output": "embeddings_relevance"}]


def test_explainer_returns_relevance_at_tensors():
    explainer = onnxlrp.Explainer(small_cnn(True), "epsilon", relevance_at=["flat"])
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float32)
    outputs, relevance = explainer.explain(x, target=1)
    assert set(outputs) == {"y"}
    assert relevance["x"].shape == x.shape and relevance["flat"].shape == (2, 27)


def _cnn_with_side_output() -> onnx.ModelProto:
    model = small_cnn(True)
    model.graph.node.append(helper.make_node("Relu", ["conv1_out"], ["side_out"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side_out", TensorProto.FLOAT, ["N", 4, 6, 6]))
    return model


@pytest.mark.parametrize("tensor,message", [
    ("nothing_here", "no tensor of that name"),
    ("w1", "a constant"),
    ("x", "a model input; its relevance is already the output x_relevance"),
    ("side_out", "no relevance reaches it"),
])
def test_bad_tensors_are_refused(tensor, message):
    with pytest.raises(onnxlrp.OnnxlrpError, match=f"--relevance-at {tensor}: {message}"):
        onnxlrp.compile_model(_cnn_with_side_output(), relevance_at=[tensor])


def test_cli_bad_tensor_one_line_exit_2(tmp_path):
    path, out = tmp_path / "cnn.onnx", tmp_path / "cnn.lrp.onnx"
    onnx.save(_cnn_with_side_output(), path)
    run = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "-o", str(out),
                          "--relevance-at", "side_out"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("onnxlrp: error: ")
    assert "side_out: no relevance reaches it" in run.stderr
    assert not out.exists()


def test_cli_relevance_at_is_repeatable(tmp_path):
    path, out = tmp_path / "cnn.onnx", tmp_path / "cnn.lrp.onnx"
    onnx.save(small_cnn(True), path)
    run = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "-o", str(out),
                          "--relevance-at", "relu1_out", "--relevance-at", "flat"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    names = [o.name for o in onnx.load(str(out)).graph.output]
    assert names == ["y", "x_relevance", "relu1_out_relevance", "flat_relevance"]
