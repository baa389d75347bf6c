"""Bad and awkward inputs to the rules and graphs (issue 11): rule parameters, dead units under LRP-0, subgraphs,
targets, name clashes, unsupported nodes, cancelling branches. Each case checks the one-line message, the exit
code, that nothing was written and the inputs are unchanged, or, for valid input, finite and correct numbers."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from helpers import conv_numpy, dense_matrix, forward, lrn_taylor_numpy, template_relevance, zennit_rule
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError

ROOT = Path(__file__).resolve().parents[2]


# --- helpers ---------------------------------------------------------------------------------------------------

def run_cli(*args) -> CliResult:
    """The `onnxlrp` command, in process (click's runner; an escaped exception becomes a traceback on stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback: " + repr(result.exception)
    return CliResult(result.exit_code, result.stdout, stderr)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def digests(folder: Path) -> dict[str, str]:
    """Content hash of every file under folder (to prove that a failed run changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result: CliResult, *fragments: str) -> None:
    """One line on stderr, `onnxlrp: error: ...` containing every fragment, exit code 2, no traceback."""
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("onnxlrp: compiled ")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("onnxlrp: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def mlp(dead_hidden: bool = True, hidden: int = 6, classes: int = 4, seed: int = 0, names=None) -> onnx.ModelProto:
    """x [N, 5] -> Gemm -> Relu -> Gemm -> logits; hidden unit 0 is dead (zero weights and bias) if asked."""
    names = {"x": "x", "logits": "logits", **(names or {})}
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((hidden, 5)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    if dead_hidden:
        w1[0], b1[0] = 0, 0
    w2 = rng.standard_normal((classes, hidden)).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    nodes = [helper.make_node("Gemm", [names["x"], "w1", "b1"], ["z1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["z1"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "w2", "b2"], [names["logits"]], transB=1, name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(names["x"], TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info(names["logits"], TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def run_compiled(compiled: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def safe_div(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.divide(a, d, out=np.zeros(np.broadcast(a, d).shape), where=d != 0)


# --- rule parameters ---------------------------------------------------------------------------------------------

BAD_PARAMETERS = [
    (["--epsilon", "nan"], "epsilon must be a finite number"),
    (["--epsilon", "-1"], "epsilon must be >= 0"),
    (["--epsilon", "1e39"], "beyond float32"),
    (["--stabilizer", "inf"], "stabilizer must be a finite number"),
    (["--gamma", "nan"], "gamma must be a finite number"),
    (["--gamma", "-0.5"], "gamma must be >= 0"),
    (["--alpha", "nan"], "alpha must be a finite number"),
    (["--beta", "nan"], "beta must be a finite number"),
    (["--alpha", "3", "--beta", "1"], "alpha - beta must equal 1"),
    (["--low", "nan"], "low must be a finite number"),
    (["--high", "-inf"], "high must be a finite number"),
    (["--low", "2", "--high", "1"], "must not exceed high"),
]


@pytest.mark.parametrize("args,message", BAD_PARAMETERS, ids=[" ".join(a) for a, _ in BAD_PARAMETERS])
def test_bad_rule_parameters_are_refused(tmp_path, args, message):
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    before = digests(tmp_path)
    result = run_cli("compile", model, "-o", tmp_path / "out.onnx", *args)
    assert_refused(result, str(model), message)
    assert digests(tmp_path) == before  # nothing written, the model untouched


@pytest.mark.parametrize("key,value", [("epsilon", float("nan")), ("stabilizer", float("-inf")),
                                       ("gamma", float("inf")), ("low", float("nan")), ("high", "one")])
def test_bad_rule_parameters_are_refused_by_the_python_api(key, value):
    with pytest.raises(OnnxlrpError, match=key):
        onnxlrp.compile_model(mlp(), "epsilon_gamma_box", **{key: value})


@pytest.mark.parametrize("text", ["nan,1", "0.5,inf", "-inf,0.2", "0.5,nan"])
def test_bad_normalize_is_refused(text):
    from onnxlrp.inputs import parse_normalize
    with pytest.raises(OnnxlrpError, match="finite"):
        parse_normalize(text)


def test_bad_normalize_is_refused_by_explain(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}_cache"))
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    np.save(tmp_path / "x.npy", np.ones(5, np.float32))
    before = digests(tmp_path)
    result = run_cli("explain", model, tmp_path / "x.npy", "-o", tmp_path / "out", "--normalize", "nan,1")
    assert_refused(result, "--normalize")
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()


# --- dead units: z = 0 passes 0, never NaN -------------------------------------------------------------------------

DIVIDING_RULES = ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare"]


@pytest.mark.parametrize("rule", DIVIDING_RULES)
def test_dense_rules_pass_zero_through_a_dead_unit(rule):
    """Unit 0 has zero weights and bias, so z = 0 (and every modified z = 0); with epsilon = stabilizer = 0 its
    message is 0, also where relevance arrives at it. Every other unit matches the numpy reference exactly."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    w[0], c[0] = 0, 0
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)
    (y,) = forward(node, x, {"w": w, "c": c})
    assert not y[:, 0].any()
    r = rng.standard_normal(y.shape).astype(np.float32)  # relevance arrives at the dead unit too
    got = template_relevance(node, x, r, rule, {"w": w, "c": c}, epsilon=0.0, stabilizer=0.0, low=-2.0, high=2.0)
    assert np.isfinite(got).all()
    for n in range(3):
        expected = zennit_rule(rule, x[n].astype(np.float64), r[n], lambda v: v, w.astype(np.float64),
                               c.astype(np.float64), low=-2.0, high=2.0, eps=0.0)
        np.testing.assert_allclose(got[n], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("rule", DIVIDING_RULES)
def test_conv_rules_pass_zero_through_a_dead_channel(rule):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    w[1], b[1] = 0, 0
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    (y,) = forward(node, x, {"w": w, "b": b})
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, rule, {"w": w, "b": b}, epsilon=0.0, stabilizer=0.0, low=-2.0, high=2.0)
    assert np.isfinite(got).all()
    zero = np.zeros(3)
    bias = np.broadcast_to(b.reshape(-1, 1, 1), y.shape[1:]).reshape(-1)
    for n in range(2):
        def dense(weights):
            return dense_matrix(lambda e: conv_numpy(e, weights, zero, [1, 1], [1, 1, 1, 1], [1, 1], 1), x.shape[1:])
        expected = zennit_rule(rule, x[n].astype(np.float64), r[n], dense, w.astype(np.float64), bias,
                               low=-2.0, high=2.0, eps=0.0)
        np.testing.assert_allclose(got[n], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


def test_norm_on_add_passes_zero_where_the_sum_is_zero():
    rng = np.random.default_rng(12)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    b = rng.standard_normal((2, 6)).astype(np.float32)
    a[:, :2], b[:, :2] = 0, 0  # both summands 0
    b[:, 2] = -a[:, 2]          # summands cancel exactly
    r = rng.standard_normal((2, 6)).astype(np.float32)
    node = helper.make_node("Add", ["a", "b"], ["y"])
    ra = template_relevance(node, a, r, "norm", x_index=0, extra_inputs={"b": b}, stabilizer=0.0)
    y = (a + b).astype(np.float64)
    np.testing.assert_allclose(ra, a * safe_div(r, y), rtol=1e-5, atol=1e-6)
    assert not ra[:, :3].any()


def test_pool_norms_pass_zero_where_the_mean_is_zero():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    x[:, 1] = 0  # a dead channel
    x[0, 0, :2, :2] = 0  # one dead 2x2 window
    r = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    pool = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    got = template_relevance(pool, x, r, "norm", stabilizer=0.0)
    y = x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    s = safe_div(r, y.astype(np.float64)) / 4
    expected = x * np.repeat(np.repeat(s, 2, axis=2), 2, axis=3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    r1 = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    g = x.mean(axis=(2, 3), keepdims=True).astype(np.float64)
    expected = x * safe_div(r1, g) / 16
    got = template_relevance(helper.make_node("GlobalAveragePool", ["x"], ["y"]), x, r1, "norm", stabilizer=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    mean = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    got = template_relevance(mean, x, r1.reshape(2, 3), "norm", {"axes": np.array([2, 3])}, stabilizer=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_lrn_taylor_passes_zero_where_the_input_is_zero():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 5, 2, 3)).astype(np.float32)
    x[:, 2] = 0
    node = helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.5, beta=0.75, bias=1.0)
    (y,) = forward(node, x)
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, "taylor", stabilizer=0.0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, lrn_taylor_numpy(x.astype(np.float64), r, 3, 0.5, 0.75, 1.0, eps=0.0),
                               rtol=1e-3, atol=1e-5)


def lrp0_numpy(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LRP-0 on the mlp() graph in float64, with 0 where z = 0."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    z1 = x @ w["w1"].T + w["b1"]
    h = np.maximum(z1, 0)
    z2 = h @ w["w2"].T + w["b2"]
    r2 = z2 * np.eye(z2.shape[1])[target]
    r1 = h * (safe_div(r2, z2) @ w["w2"])
    return x * (safe_div(r1, z1) @ w["w1"])


def test_lrp0_on_a_model_with_a_dead_unit_is_finite_and_matches_numpy():
    model = mlp(dead_hidden=True)
    x = np.random.default_rng(15).standard_normal((4, 5)).astype(np.float32)
    target = np.array([0, 1, 2, 3], np.int64)
    compiled = onnxlrp.compile_model(model, "epsilon", epsilon=0.0)
    relevance = run_compiled(compiled, {"x": x, "target": target})["x_relevance"]
    assert np.isfinite(relevance).all()
    np.testing.assert_allclose(relevance, lrp0_numpy(model, x.astype(np.float64), target), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box",
                                       "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"])
def test_every_composite_stays_finite_with_zero_stabilizers_on_dead_channels(composite):
    """A CNN whose second conv has a dead output channel (and whose input has a blank region), compiled with
    epsilon = stabilizer = 0: relevance is finite in every composite, including the *_nonneg variants."""
    rng = np.random.default_rng(16)
    w1 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    w2[0], b2[0] = 0, 0
    w3 = rng.standard_normal((5, 3 * 6 * 6)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "w2": w2, "b2": b2,
                                                                         "w3": w3}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = rng.random((3, 1, 6, 6)).astype(np.float32)
    x[:, :, :3] = 0
    compiled = onnxlrp.compile_model(model, composite, epsilon=0.0, stabilizer=0.0)
    templates = {r["template"] for r in json.loads(
        {p.key: p.value for p in compiled.metadata_props}["onnxlrp.rules"])}
    assert any(t and t.endswith("_nonneg") for t in templates) or "flat" in composite
    out = run_compiled(compiled, {"x": x, "target": np.arange(3, dtype=np.int64)})
    assert np.isfinite(out["x_relevance"]).all()
    assert np.abs(out["x_relevance"]).sum() > 0


def test_nonzero_stabilizers_keep_the_plain_division():
    """With epsilon and stabilizer > 0, stab(z) is never 0: the compiled model divides without the guard."""
    for params, guarded in [({}, False), ({"epsilon": 0.0}, True), ({"stabilizer": 0.0}, True)]:
        compiled = onnxlrp.compile_model(mlp(), "epsilon", **params)
        (function,) = [f for f in compiled.functions if f.name == "safe_div"]
        assert any(n.op_type == "Where" for n in function.node) == guarded


# --- targets -------------------------------------------------------------------------------------------------------

def test_a_target_beyond_the_classes_fails_the_run_on_ort_and_the_reference():
    """Never an all-zero relevance: the compiled graph's check fails the run and names the class count."""
    compiled = onnxlrp.compile_model(mlp(classes=4), "epsilon_plus_flat")
    x = np.random.default_rng(20).standard_normal((3, 5)).astype(np.float32)
    ok = run_compiled(compiled, {"x": x, "target": np.array([3, -1, 0], np.int64)})
    assert np.abs(ok["x_relevance"]).sum(axis=1).min() > 0
    for bad in ([0, 4, 1], [9, 9, 9]):
        with pytest.raises(Exception, match=r"target_out_of_range.*Input shape:\{4\}, requested shape:\{%d\}"
                           % (max(bad) + 1)):
            run_compiled(compiled, {"x": x, "target": np.array(bad, np.int64)})
    from onnx.reference import ReferenceEvaluator
    with pytest.raises(ValueError, match="cannot reshape array of size 4"):
        ReferenceEvaluator(compiled).run(None, {"x": x, "target": np.array([0, 4, 1], np.int64)})


def test_an_empty_batch_gives_empty_results():
    compiled = onnxlrp.compile_model(mlp(), "epsilon_plus_flat")
    out = run_compiled(compiled, {"x": np.zeros((0, 5), np.float32), "target": np.zeros(0, np.int64)})
    assert out["x_relevance"].shape == (0, 5) and out["logits"].shape == (0, 4)


@pytest.mark.parametrize("target,message", [
    (2.7, "got 2.7"), ([0, 1.5, 2], "got 1.5"), (float("nan"), "got nan"), ("3", "got '3'"), (True, "got True"),
    (4, "target 4 out of range: the model has 4 classes (0..3)"),
    ([0, 9, 1], "target 9 out of range: the model has 4 classes (0..3)"),
])
def test_the_explainer_refuses_non_integer_and_out_of_range_targets(target, message):
    explainer = onnxlrp.Explainer(mlp(), "epsilon")
    x = np.random.default_rng(21).standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(OnnxlrpError) as info:
        explainer.explain(x, target=target)
    assert message in str(info.value) and "\n" not in str(info.value)
    _, relevance = explainer.explain(x, target=[0, 2.0, -1])  # whole numbers are fine
    assert np.isfinite(relevance).all()


def test_the_explainer_names_the_target_when_the_class_count_is_dynamic():
    """A fully convolutional model: its classes (C x H x W scores) are known only at run time."""
    w = np.random.default_rng(22).standard_normal((2, 1, 1, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "fcn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    explainer = onnxlrp.Explainer(model, "epsilon")
    assert explainer.classes is None
    x = np.random.default_rng(23).standard_normal((2, 1, 2, 2)).astype(np.float32)
    with pytest.raises(OnnxlrpError, match=r"^target 9 out of range: the model has 8 classes \(0..7\)$"):
        explainer.explain(x, target=[1, 9])
    _, relevance = explainer.explain(x, target=[1, 7])
    assert np.isfinite(relevance).all() and relevance[1].any()


# --- names the compiler needs that the model already uses ------------------------------------------------------

CLASHES = [({"x": "target"}, "target_1", {"target": "target_relevance"}),
           ({"logits": "target"}, "target_1", {"x": "x_relevance"}),
           ({"logits": "x_relevance"}, "target", {"x": "x_relevance_1"}),
           ({"x": "bias_relevance"}, "target", {"bias_relevance": "bias_relevance_relevance"}),
           ({"logits": "bias_relevance"}, "target", {"x": "x_relevance"}),
           ({"logits": "logits__R"}, "target", {"x": "x_relevance"}),
           ({"x": "layer_relevance__fc1"}, "target", {"layer_relevance__fc1": "layer_relevance__fc1_relevance"})]


@pytest.mark.parametrize("names,target,relevance", CLASHES, ids=[str(n) for n, _, _ in CLASHES])
def test_clashing_names_get_unique_ones_recorded_in_the_metadata(names, target, relevance):
    """The compiled model's own names become <name>_1 where the model uses them; the metadata says which, and the
    Explainer and --check follow it. The original outputs keep their names and values."""
    model = mlp(names=names)
    compiled = onnxlrp.compile_model(model, "epsilon", bias_relevance="layers", emit_layers=True)
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.target_input"] == target
    assert json.loads(meta["onnxlrp.relevance_outputs"]) == relevance
    outputs = [o.name for o in compiled.graph.output]
    assert len(set(outputs)) == len(outputs) and outputs[0] == model.graph.output[0].name
    roles = json.loads(meta["onnxlrp.output_roles"])
    assert sorted(kind for _, kind in roles.values()) == ["bias"] + ["passed"] * 3
    x = np.random.default_rng(30).standard_normal((2, 5)).astype(np.float32)
    (x_name,) = relevance
    out = run_compiled(compiled, {x_name: x, target: np.array([1, 2], np.int64)})
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {x_name: x})
    np.testing.assert_array_equal(out[outputs[0]], plain[0])
    expected = onnxlrp.compile_model(mlp(), "epsilon")  # the same model with harmless names
    reference = run_compiled(expected, {"x": x, "target": np.array([1, 2], np.int64)})["x_relevance"]
    np.testing.assert_allclose(out[relevance[x_name]], reference, rtol=1e-6)
    (bias,) = [name for name, (_, kind) in roles.items() if kind == "bias"]
    np.testing.assert_allclose(out[relevance[x_name]].sum(1) + out[bias].sum(1),
                               reference.sum(1) + run_compiled(onnxlrp.compile_model(mlp(), "epsilon",
                               bias_relevance="layers"), {"x": x, "target": np.array([1, 2], np.int64)})[
                                   "bias_relevance"].sum(1), rtol=1e-5)
    explainer = onnxlrp.Explainer.from_compiled(compiled)
    outputs, got = explainer.explain(x, target=[1, 2])
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    assert model.graph.output[0].name in outputs


@pytest.mark.parametrize("names", [{"x": "target"}, {"logits": "x_relevance"}], ids=str)
def test_check_and_explain_follow_the_renamed_interface(tmp_path, monkeypatch, names):
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.onnx"
    onnx.save(mlp(names=names), model)
    result = run_cli("compile", model, "-o", tmp_path / "out.onnx", "--composite", "epsilon", "--check")
    assert result.returncode == 0, result.stderr
    assert "0 layer(s) flagged" in result.stdout
    np.save(tmp_path / "in.npy", np.ones(5, np.float32))
    result = run_cli("explain", model, tmp_path / "in.npy", "-o", tmp_path / "heat", "--composite", "epsilon")
    assert result.returncode == 0, result.stderr
    assert np.isfinite(np.load(tmp_path / "heat" / "in.npy")).all()


def test_deeplift_baseline_input_avoids_a_taken_name():
    compiled = onnxlrp.compile_model(mlp(names={"logits": "x_baseline"}), "deeplift")
    assert [i.name for i in compiled.graph.input] == ["x", "target", "x_baseline_1"]
    _, relevance = onnxlrp.Explainer.from_compiled(compiled).explain(np.ones((2, 5), np.float32))
    assert np.isfinite(relevance).all()


# --- subgraphs, quantized paths and every unsupported node -----------------------------------------------------

def _vi(name: str, elem: int = TensorProto.FLOAT, shape=("N", 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(nodes, inputs, outputs, weights) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs,
                                                [numpy_helper.from_array(v, k) for k, v in weights.items()]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


WEIGHT = np.random.default_rng(40).standard_normal((4, 4)).astype(np.float32)


def if_model(constant_condition: bool) -> onnx.ModelProto:
    """fc -> If (then: Relu(h), else: Neg(h)); the branches read the activation h from the outer graph."""
    then_branch = helper.make_graph([helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then", [],
                                    [_vi("t")])
    else_branch = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                                    [_vi("e")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch,
                              name="branch")]
    weights = {"w": WEIGHT}
    inputs = [_vi("x")]
    if constant_condition:
        weights["cond"] = np.array(True)
    else:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return _model(nodes, inputs, [_vi("y")], weights)


def loop_model() -> onnx.ModelProto:
    """fc -> Loop whose body adds the activation h to its carried value (h read from the outer scope)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc", "h"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _vi("acc")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("acc_out")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="repeat")]
    return _model(nodes, [_vi("x"), helper.make_tensor_value_info("trips", TensorProto.INT64, [])], [_vi("y")],
                  {"w": WEIGHT})


def qdq_model() -> onnx.ModelProto:
    """fc -> QuantizeLinear -> DequantizeLinear -> CumSum: the QDQ pair is explained (on the float twin), the
    CumSum (no rule) is refused by name."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("QuantizeLinear", ["h", "scale", "zero"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dequant"),
             helper.make_node("CumSum", ["dq", "axis"], ["y"], name="cumsum")]
    return _model(nodes, [_vi("x")], [_vi("y")], {"w": WEIGHT, "scale": np.array(0.1, np.float32),
                                                  "zero": np.array(0, np.int8), "axis": np.array(1, np.int64)})


def behind_model() -> onnx.ModelProto:
    """An Einsum of two activations (no rule) behind a CumSum (no rule): both are listed."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc"),
             helper.make_node("Einsum", ["a", "z"], ["b"], equation="ij,jk->ik", name="mix"),
             helper.make_node("CumSum", ["b", "axis"], ["y"], name="cumsum")]
    return _model(nodes, [_vi("x"), _vi("z", shape=(4, 4))], [_vi("y")], {"w": WEIGHT,
                                                                         "axis": np.array(1, np.int64)})


UNSUPPORTED = {
    "if": (if_model(False), ["branch (If: reads activation 'h' inside its subgraph"]),
    "loop": (loop_model(), ["repeat (Loop: reads activation 'h' inside its subgraph"]),
    "qdq": (qdq_model(), ["cumsum (CumSum: no rule for op CumSum)"]),
    "behind": (behind_model(), ["cumsum (CumSum", "mix (Einsum"]),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_every_unsupported_node_is_refused_by_name(tmp_path, case):
    model, fragments = UNSUPPORTED[case]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = digests(tmp_path)
    result = run_cli("compile", path, "-o", tmp_path / "out.onnx")
    assert_refused(result, str(path), f"{len(fragments)} unsupported node(s)", *fragments)
    assert digests(tmp_path) == before
    result = run_cli("inspect", path)
    assert result.returncode == 2 and f"unsupported: {len(fragments)} node(s)" in result.stdout
    listed = result.stdout.split("unsupported:")[1]
    for fragment in fragments:
        name, op = fragment.split(" (")[0], fragment.split("(")[1].split(":")[0].rstrip(")")
        assert f"{name} ({op})" in listed


def test_an_if_with_a_constant_condition_is_inlined_and_explained():
    compiled = onnxlrp.compile_model(if_model(True), "epsilon", epsilon=0.0)
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert [r["op"] for r in json.loads(meta["onnxlrp.rules"])] == ["MatMul", "Relu"]
    x = np.random.default_rng(41).standard_normal((3, 4)).astype(np.float32)
    out = run_compiled(compiled, {"x": x, "target": np.array([0, 1, 2], np.int64)})
    h = x.astype(np.float64) @ WEIGHT
    r = np.maximum(h, 0) * np.eye(4)[[0, 1, 2]]
    np.testing.assert_allclose(out["x_relevance"], x * (safe_div(r, h) @ WEIGHT.T), rtol=1e-4, atol=1e-6)


# --- parallel linear branches under the norm rule (RepVGG in training form) --------------------------------------

def repvgg_block(fused: bool = False, residual: bool = False, c: int = 4) -> onnx.ModelProto:
    """stem Conv -> Relu -> [Conv3x3 + BN, Conv1x1 + BN, BN] summed by two Adds -> Relu -> GAP -> Gemm.
    fused: one Conv3x3 instead of the three branches; residual: a ResNet block (r0 + BN(Conv(Relu(BN(Conv(r0))))))."""
    rng = np.random.default_rng(50)
    weights: dict[str, np.ndarray] = {}

    def conv(name, x, k):
        weights[name] = (rng.standard_normal((c, c if name != "stem" else 3, k, k)) * 0.3).astype(np.float32)
        return helper.make_node("Conv", [x, name], [name + "_y"], pads=[k // 2] * 4, name=name)

    def bn(name, x):
        for part, value in (("s", rng.uniform(0.5, 1.5, c)), ("b", rng.normal(0, .1, c)), ("m", rng.normal(0, .1, c)),
                            ("v", rng.uniform(0.5, 1.5, c))):
            weights[f"{name}_{part}"] = value.astype(np.float32)
        return helper.make_node("BatchNormalization", [x] + [f"{name}_{p}" for p in "sbmv"], [name + "_y"], name=name)

    nodes = [conv("stem", "x", 3), helper.make_node("Relu", ["stem_y"], ["r0"], name="stem_relu")]
    if fused:
        nodes += [conv("conv3x3", "r0", 3), helper.make_node("Identity", ["conv3x3_y"], ["s2"], name="same")]
    elif residual:
        nodes += [conv("conv_a", "r0", 3), bn("bn_a", "conv_a_y"), helper.make_node("Relu", ["bn_a_y"], ["ra"]),
                  conv("conv_b", "ra", 3), bn("bn_b", "conv_b_y"),
                  helper.make_node("Add", ["r0", "bn_b_y"], ["s2"], name="add_residual")]
    else:
        nodes += [conv("conv3x3", "r0", 3), bn("bn3x3", "conv3x3_y"), conv("conv1x1", "r0", 1),
                  bn("bn1x1", "conv1x1_y"), bn("bn_id", "r0"),
                  helper.make_node("Add", ["bn3x3_y", "bn1x1_y"], ["s1"], name="add_a"),
                  helper.make_node("Add", ["s1", "bn_id_y"], ["s2"], name="add_b")]
    weights["fc"] = rng.standard_normal((10, c)).astype(np.float32)
    nodes += [helper.make_node("Relu", ["s2"], ["r1"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc")]
    return _model(nodes, [_vi("x", shape=("N", 3, 8, 8))], [_vi("logits", shape=("N", 10))], weights)


def test_parallel_linear_branches_under_the_norm_rule_are_warned_about(tmp_path):
    from onnxlrp.diagnostics import OnnxlrpWarning
    with pytest.warns(OnnxlrpWarning) as record:
        compiled = onnxlrp.compile_model(repvgg_block())
    assert [str(w.message).split(": ", 1)[1].split(" (")[0] for w in record] == ["add_a", "add_b"]
    assert "add_a (Add, norm rule) sums parallel linear branches of 'r0' (bn3x3, bn1x1)" in str(record[0].message)
    found = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.warnings"])
    assert [w.split(" ")[0] for w in found] == ["add_a", "add_b"] and "(add_a, bn_id)" in found[1]
    path = tmp_path / "repvgg.onnx"
    onnx.save(repvgg_block(), path)
    result = run_cli("compile", path, "-o", tmp_path / "out.onnx")
    assert result.returncode == 0 and (tmp_path / "out.onnx").exists()
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("onnxlrp: warning:")]
    assert len(lines) == 2 and all(line.startswith(f"onnxlrp: warning: {path}: add_") for line in lines)
    assert "fuse them into one layer" in lines[0]
    result = run_cli("inspect", path)
    assert "warnings: 2" in result.stdout


@pytest.mark.parametrize("kind", ["fused", "residual"])
def test_no_warning_for_one_layer_or_a_residual_block(kind):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = onnxlrp.compile_model(repvgg_block(**{kind: True}))
    assert json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.warnings"]) == []


def test_check_exits_1_when_a_conserving_rule_drifts(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(repvgg_block(residual=True), path)
    result = run_cli("compile", path, "-o", tmp_path / "ok.onnx", "--check")
    assert result.returncode == 0 and "0 layer(s) flagged" in result.stdout
    # a stabilizer of 0.5 makes the norm rule absorb relevance: the conserving layers drift, the model is written
    result = run_cli("compile", path, "-o", tmp_path / "drift.onnx", "--check", "--stabilizer", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "LOSES" in result.stdout and (tmp_path / "drift.onnx").exists()


def test_bias_relevance_per_unit_is_finite_and_closes_the_books_with_a_dead_unit():
    model = mlp(dead_hidden=True)
    x = np.random.default_rng(60).standard_normal((3, 5)).astype(np.float32)
    target = np.array([0, 1, 2], np.int64)
    compiled = onnxlrp.compile_model(model, "epsilon", epsilon=0.0, bias_relevance="units")
    out = run_compiled(compiled, {"x": x, "target": target})
    assert np.isfinite(out["bias_relevance"]).all() and not out["bias_relevance"][:, 0].any()  # fc1's dead unit
    start = out["logits"][np.arange(3), target]
    np.testing.assert_allclose(out["x_relevance"].sum(1) + out["bias_relevance"].sum(1), start, rtol=1e-4)


@pytest.mark.parametrize("target,fragment", [("2.7", "--target"), ("4", "target 4 out of range: the model has 4 classes")])
def test_explain_refuses_a_bad_target_before_writing(tmp_path, monkeypatch, target, fragment):
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}_cache"))
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    np.save(tmp_path / "x.npy", np.ones(5, np.float32))
    before = digests(tmp_path)
    result = run_cli("explain", model, tmp_path / "x.npy", "-o", tmp_path / "out", "--target", target)
    assert_refused(result, fragment)
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()


def test_safe_div_is_exact_where_the_denominator_is_not_zero():
    from helpers import run_function
    tiny = np.float32(1.4e-45)
    d = np.array([0.0, -0.0, 0.0, tiny, -tiny, 1e-6, -2.5, np.inf, 3.0], np.float32)
    r = np.array([0.0, 5.0, -3.0, 1e-40, 2.0, 1.0, 1.0, 1.0, 0.0], np.float32)
    (got,) = run_function("safe_div", [r, d], {})
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        expected = np.where(d == 0, np.float32(0), r / d)
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got[:3]).all() and not got[:3].any()
