"""The `onnxlrp` command: success path and every documented error (one line, exit code 2, no output file)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    assert "onnxlrp, version" in run("--version").stdout
    assert "--composite" in run("compile", "--help").stdout


def test_compile_writes_a_checked_model(exported, tmp_path):
    out = tmp_path / "m.lrp.onnx"
    result = run("compile", str(exported("lenet", "dynamo18")), "-o", str(out), "--composite", "epsilon_gamma_box",
                 "--low", "-3", "--high", "3")
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert "x_relevance" in [o.name for o in model.graph.output]


def _unsupported_model(path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Cos", ["a"], ["b"], name="cos_node"),
             helper.make_node("Sin", ["b"], ["y"], name="sin_node")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _constant_output_model(path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4])
    c = numpy_helper.from_array(np.ones((1, 4), np.float32), "c")
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["c"], ["z"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], [c]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("case", ["missing", "png", "truncated", "unsupported", "constant_output",
                                  "unknown_composite", "alpha_beta", "negative_epsilon", "bad_lrn_rule"])
def test_errors_are_one_line_exit_2_and_leave_no_file(exported, tmp_path, case):
    model = tmp_path / "model.onnx"
    args: list[str] = []
    if case == "png":
        model.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif case == "truncated":
        data = exported("lenet", "dynamo18").read_bytes()
        model.write_bytes(data[: len(data) // 3])
    elif case == "unsupported":
        _unsupported_model(model)
    elif case == "constant_output":
        _constant_output_model(model)
        args = ["--explain-output", "z"]
    elif case != "missing":
        model.write_bytes(exported("lenet", "dynamo18").read_bytes())
        args = {"unknown_composite": ["--composite", "nope"], "alpha_beta": ["--alpha", "3", "--beta", "1"],
                "negative_epsilon": ["--epsilon", "-0.1"], "bad_lrn_rule": ["--lrn-rule", "cubic"]}[case]
    out = tmp_path / "out.onnx"
    result = run("compile", str(model), "-o", str(out), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxlrp: error: "), result.stderr
    assert "model.onnx" in lines[0]
    assert not out.exists()
    assert list(tmp_path.glob("*.tmp")) == []
    if case == "unsupported":
        assert "cos_node (Cos" in lines[0] and "sin_node (Sin" in lines[0]
    if case == "constant_output":
        assert "does not depend on any floating-point model input" in lines[0]


def test_inspect_lists_rules_and_exits_2_on_unsupported(exported, tmp_path):
    result = run("inspect", str(exported("resnet_small", "dynamo18")), "--composite", "epsilon_gamma_box")
    assert result.returncode == 0, result.stderr
    assert "zbox" in result.stdout and "gamma" in result.stdout and "norm" in result.stdout
    assert "unsupported: none" in result.stdout
    bad = tmp_path / "bad.onnx"
    _unsupported_model(bad)
    result = run("inspect", str(bad))
    assert result.returncode == 2
    assert "cos_node (Cos)" in result.stdout and "sin_node (Sin)" in result.stdout


def test_emit_layers_outputs_sum_per_layer(exported):
    import onnxlrp
    compiled = onnxlrp.compile_model(exported("lenet", "dynamo18"), "epsilon", epsilon=0.0, emit_layers=True)
    names = [o.name for o in compiled.graph.output if o.name.startswith("layer_relevance__")]
    assert len(names) >= 8
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    values = dict(zip([o.name for o in session.get_outputs()],
                      session.run(None, {"x": x, "target": np.array([0, 1, 2])})))
    for name in names:
        assert values[name].shape == (3,)
    first_conv = [n for n in names if "conv" in n.lower()][0]
    np.testing.assert_allclose(values[first_conv], values["x_relevance"].reshape(3, -1).sum(1), rtol=1e-5)


def test_check_prints_conservation_table(exported, tmp_path):
    out = tmp_path / "c.onnx"
    result = run("compile", str(exported("resnet_small", "torchscript17")), "-o", str(out), "--check",
                 "--composite", "epsilon_plus")
    assert result.returncode == 0, result.stderr
    assert "drift" in result.stdout and "0 layer(s) flagged" in result.stdout
    assert "conserves" in result.stdout and out.exists()
    # the written model carries no layer outputs unless asked
    assert not [o for o in onnx.load(str(out)).graph.output if o.name.startswith("layer_")]


def test_check_flags_a_layer_that_creates_relevance(tmp_path):
    from onnxlrp.compile import make_plan
    from onnxlrp.report import conservation_rows
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    records = [r.public() for r in make_plan(model).records]
    rows = conservation_rows(records, {"layer_relevance__relu": np.array([2.0]),
                                       "layer_arriving__relu": np.array([1.0])}, "relevance")
    assert rows[0]["flag"] == "CREATES"
