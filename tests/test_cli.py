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
