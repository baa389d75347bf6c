"""Transformer rule templates (rules/ops/) against float64 numpy re-implementations: LXT's rules in modified-gradient
form (attnlrp, cplrp), their relevance forms (Zennit composites), and true vector-Jacobian products (gradient,
checked against central differences). Then the patterns on small hand-built graphs: recognised, forward untouched,
relevance equal to the references."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import run_function, template_relevance
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.compile import compile_model, make_plan
from onnxlrp.report import inspect_text

RNG = np.random.default_rng(12)
erf = np.vectorize(math.erf)


def stab(z, eps=1e-6):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def vjp(f, x, r, h=1e-6):
    """Central-difference vector-Jacobian product of f at x (float64)."""
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[i] = h
        out[i] = np.sum((f(x + e) - f(x - e)) * r) / (2 * h)
    return out


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --- elementwise: LXT's identity rule and true derivatives ------------------------------------------------------

def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def silu(x):
    return x / (1 + np.exp(-x))


def test_identity_ratio_is_lxts_identity_rule():
    x = f32(3, 7)
    x[0, :2] = 0.0  # f(0) / (0 + 1e-10) = 0
    y, r = gelu(x.astype(np.float64)).astype(np.float32), f32(3, 7)
    got = run_function("identity_ratio", [x, y, r], {})[0]
    expected = y.astype(np.float64) / (x.astype(np.float64) + 1e-10) * r
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(got).all() and not got[0, :2].any()


@pytest.mark.parametrize("name,f", [("gelu_gradient", gelu), ("silu_gradient", silu),
                                    ("erf_gradient", erf)])
def test_elementwise_gradients(name, f):
    x, r = f32(3, 5), f32(3, 5)
    got = run_function(name, [x, r], {})[0]
    np.testing.assert_allclose(got, vjp(f, x, r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op,f,extra", [
    ("Sqrt", np.sqrt, {}),
    ("Reciprocal", lambda x: 1 / x, {}),
    ("Pow", lambda x: x ** 3.0, {"e": np.array(3.0, dtype=np.float32)}),
    ("Erf", erf, {}),
])
def test_unary_op_gradients_through_the_op_table(op, f, extra):
    x = (np.abs(f32(2, 5)) + 0.5).astype(np.float32)
    r = f32(2, 5)
    node = helper.make_node(op, ["x"] + list(extra), ["y"])
    got = template_relevance(node, x, r, "gradient", extra)
    np.testing.assert_allclose(got, vjp(f, x, r), rtol=1e-4, atol=1e-5)
    ratio = template_relevance(node, x, r, "lxt_identity", extra)
    np.testing.assert_allclose(ratio, f(x.astype(np.float64)) / (x + 1e-10) * r, rtol=1e-5, atol=1e-6)


def test_div_by_an_activation_gradient():
    a, b, r = f32(2, 5), np.abs(f32(2, 5)) + 0.5, f32(2, 5)
    node = helper.make_node("Div", ["a", "b"], ["y"])
    got_a = template_relevance(node, a, r, "gradient", x_index=0, extra_inputs={"b": b})
    got_b = template_relevance(node, a, r, "gradient", x_index=1, extra_inputs={"b": b})
    np.testing.assert_allclose(got_a, r / b.astype(np.float64), rtol=1e-5)
    np.testing.assert_allclose(got_b, vjp(lambda t: a / t, b, r), rtol=1e-4, atol=1e-5)


def test_products_half_and_gate():
    a, b, r = f32(2, 5), f32(2, 5), f32(2, 5)
    np.testing.assert_allclose(run_function("mul_half_gradient", [a, b, r], {})[0], 0.5 * r * b, rtol=1e-6)
    np.testing.assert_allclose(run_function("half", [a, r], {})[0], 0.5 * r, rtol=1e-6)


# --- softmax -----------------------------------------------------------------------------------------------------

def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_gradient_and_relevance(axis):
    x = f32(2, 3, 5)
    x[0, 1, 2] = x[1, 0, 4] = -np.inf  # masked entries (their row keeps finite ones)
    x[1, 2, 0] = np.float32(-3.4e38)
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    r = f32(2, 3, 5)
    y = softmax(x.astype(np.float64), axis)
    got = template_relevance(node, x, r, "gradient")
    np.testing.assert_allclose(got, y * (r - (y * r).sum(axis, keepdims=True)), rtol=1e-4, atol=1e-6)
    finite = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
    masked = np.where(np.isfinite(x), x, -1e4).astype(np.float64)
    np.testing.assert_allclose(vjp(lambda t: softmax(t, axis), masked, r), got, rtol=1e-3, atol=1e-5)
    rel = template_relevance(node, x, r, "lxt")
    expected = finite * (r - y * r.sum(axis, keepdims=True))
    assert np.isfinite(rel).all() and not rel[0, 1, 2] and not rel[1, 0, 4]
    np.testing.assert_allclose(rel, expected, rtol=1e-4, atol=1e-4)


# --- normalisations ----------------------------------------------------------------------------------------------

def layernorm(x, scale, bias, axes, eps):
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("axis", [-1, 1])
def test_layernorm_rules(axis):
    x = f32(2, 3, 7) * 2 + 0.3
    x[1, 2] = 0.0  # a constant row: sd = sqrt(eps), finite everything
    axes = tuple(range(axis % 3, 3))
    norm_shape = x.shape[axis % 3:]
    scale, bias = f32(*norm_shape), f32(*norm_shape)
    eps = 1e-5
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=axis, epsilon=eps)
    weights = {"scale": scale, "bias": bias}
    r = f32(2, 3, 7)
    xd = x.astype(np.float64)
    sd = np.sqrt(xd.var(axis=axes, keepdims=True) + eps)
    g = scale * r
    lxt = (g - g.mean(axis=axes, keepdims=True)) / sd
    got = template_relevance(node, x, r, "lxt_identity", weights)
    np.testing.assert_allclose(got, lxt, rtol=1e-4, atol=1e-4)
    # the LXT form equals the gradient of the layer with sd detached
    detached = vjp(lambda t: (t - t.mean(axis=axes, keepdims=True)) / sd * scale + bias, x, r)
    np.testing.assert_allclose(got, detached, rtol=1e-3, atol=1e-3)
    full = template_relevance(node, x, r, "gradient", weights)
    np.testing.assert_allclose(full, vjp(lambda t: layernorm(t, scale, bias, axes, eps), x, r), rtol=1e-3, atol=1e-3)
    y = layernorm(xd, scale, bias, axes, eps)
    rel = template_relevance(node, x, r, "lxt", weights)
    c = scale * r / stab(y)
    np.testing.assert_allclose(rel, xd * (c - c.mean(axis=axes, keepdims=True)) / sd, rtol=1e-3, atol=1e-3)


def test_instancenorm_rules():
    x = f32(2, 3, 4, 5)
    scale, bias = f32(3), f32(3)
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)
    weights = {"scale": scale, "bias": bias}
    r = f32(2, 3, 4, 5)
    axes, s = (2, 3), scale.reshape(3, 1, 1)
    sd = np.sqrt(x.astype(np.float64).var(axis=axes, keepdims=True) + 1e-5)
    g = s * r
    got = template_relevance(node, x, r, "lxt_identity", weights)
    np.testing.assert_allclose(got, (g - g.mean(axis=axes, keepdims=True)) / sd, rtol=1e-4, atol=1e-4)
    full = template_relevance(node, x, r, "gradient", weights)
    np.testing.assert_allclose(full, vjp(lambda t: layernorm(t, s, bias.reshape(3, 1, 1), axes, 1e-5), x, r),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("groups", [3, 1, 6])
def test_groupnorm_rules(groups):
    x, r = f32(2, 6, 3, 5), f32(2, 6, 3, 5)
    scale, bias = f32(6), f32(6)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=groups, epsilon=1e-5)
    weights = {"scale": scale, "bias": bias}  # opset 21: per channel
    s, b = scale.reshape(6, 1, 1), bias

    def grouped(f, t, *a):
        return f(t.reshape(2, groups, -1), *a).reshape(t.shape)
    sd = grouped(lambda t: np.broadcast_to(np.sqrt(t.var(axis=2, keepdims=True) + 1e-5), t.shape),
                 x.astype(np.float64))
    g = s * r
    got = template_relevance(node, x, r, "lxt_identity", weights, opset=21)
    np.testing.assert_allclose(got, (g - grouped(lambda t: np.broadcast_to(t.mean(axis=2, keepdims=True), t.shape),
                                                 g)) / sd, rtol=1e-4, atol=1e-4)

    def forward(t):
        n = grouped(lambda u: (u - u.mean(axis=2, keepdims=True)) / np.sqrt(u.var(axis=2, keepdims=True) + 1e-5), t)
        return n * s + b.reshape(6, 1, 1)
    full = template_relevance(node, x, r, "gradient", weights, opset=21)
    np.testing.assert_allclose(full, vjp(forward, x, r), rtol=1e-3, atol=1e-3)
    rel = template_relevance(node, x, r, "lxt", weights, opset=21)
    c = s * r / stab(forward(x.astype(np.float64)))
    cm = grouped(lambda t: np.broadcast_to(t.mean(axis=2, keepdims=True), t.shape), c)
    np.testing.assert_allclose(rel, x * (c - cm) / sd, rtol=1e-3, atol=1e-3)


def test_rmsnorm_rules():
    x, r = f32(2, 3, 6), f32(2, 3, 6)
    x[0, 1] = 0.0  # zero row: 0, not NaN
    attrs = {"axes": [2], "epsilon": 1e-6}
    xd = x.astype(np.float64)
    inv = 1 / np.sqrt((xd ** 2).mean(axis=2, keepdims=True) + 1e-6)
    got = run_function("rmsnorm_identity", [x, r], attrs)[0]
    np.testing.assert_allclose(got, r * inv, rtol=1e-4)
    full = run_function("rmsnorm_gradient", [x, r], attrs)[0]
    f = lambda t: t / np.sqrt((t ** 2).mean(axis=2, keepdims=True) + 1e-6)  # noqa: E731
    np.testing.assert_allclose(full, vjp(f, x, r), rtol=1e-3, atol=1e-3)


# --- products of two activations -----------------------------------------------------------------------------------

def test_bilinear_matmul_rules():
    a, b = f32(2, 3, 5, 7), f32(2, 3, 7, 4)
    a[0, 0, 1] = 0.0  # an all-zero row: 0 relevance, not NaN
    r = f32(2, 3, 5, 4)
    perm = {"perm": [0, 1, 3, 2]}
    ga = run_function("matmul_a_gradient", [a, b, r], perm)[0]
    gb = run_function("matmul_b_gradient", [b, a, r], perm)[0]
    np.testing.assert_allclose(ga, r @ b.swapaxes(-1, -2), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, a.swapaxes(-1, -2) @ r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_function("matmul_a_half", [a, b, r], perm)[0], 0.5 * ga, rtol=1e-6)
    np.testing.assert_allclose(run_function("matmul_b_half", [b, a, r], perm)[0], 0.5 * gb, rtol=1e-6)
    y = a.astype(np.float64) @ b
    n = r / stab(y)
    rel_a = run_function("matmul_a_half_relevance", [a, b, y.astype(np.float32), r],
                         {**perm, "lrp_stabilizer": 1e-6})[0]
    rel_b = run_function("matmul_b_half_relevance", [b, a, y.astype(np.float32), r],
                         {**perm, "lrp_stabilizer": 1e-6})[0]
    np.testing.assert_allclose(rel_a, 0.5 * a * (n @ b.swapaxes(-1, -2)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rel_b, 0.5 * b * (a.swapaxes(-1, -2) @ n), rtol=1e-3, atol=1e-4)
    assert np.isfinite(rel_a).all() and not rel_a[0, 0, 1].any()
    # conservation of the uniform rule: both halves sum to R up to the stabilizer (rows where y = 0 absorb)
    np.testing.assert_allclose(rel_a.sum() + rel_b.sum(), (r * y / stab(y)).sum(), rtol=1e-3)


# --- patterns on small hand-built graphs -------------------------------------------------------------------------

H = 6


def _chain(pattern_nodes: list, constants: dict[str, np.ndarray], classes: int = 3, in_shape=(2, 4, H)):
    """x -> MatMul(W1) = h -> [pattern nodes: h -> p] -> MatMul(W2) -> ReduceMean(axis 1) = logits."""
    w1, w2 = RNG.standard_normal((H, H)).astype(np.float32), RNG.standard_normal((H, classes)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])] + pattern_nodes + [
        helper.make_node("MatMul", ["p", "w2"], ["z"]),
        helper.make_node("ReduceMean", ["z", "axis1"], ["logits"], keepdims=0)]
    inits = {"w1": w1, "w2": w2, "axis1": np.array([1], dtype=np.int64), **constants}
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [in_shape[0], classes])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), w1, w2


def _check(model, label, f, modified, seed=0):
    """``label`` recognised; forward bit-identical; gradient composite = x * VJP of the float64 forward (f: h -> p);
    attnlrp = x * the LXT modified gradient (modified(h, g_p) -> g_h)."""
    model, w1, w2 = model
    plan = make_plan(model, "attnlrp")
    assert any(label in c for c in plan.canonicalizations), plan.canonicalizations
    x = np.random.default_rng(seed).standard_normal((2, 4, H)).astype(np.float32)
    target = np.array([0, 2])
    onehot = np.zeros((2, w2.shape[1]))
    onehot[[0, 1], target] = 1
    g_p = np.repeat(onehot[:, None, :], 4, axis=1) / 4 @ w2.T.astype(np.float64)
    h = x.astype(np.float64) @ w1
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for composite, g_h in (("gradient", vjp(f, h, g_p)), ("attnlrp", modified(h, g_p))):
        compiled = compile_model(model, composite)
        session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
        logits, rel = session.run(["logits", "x_relevance"], {"x": x, "target": target})
        np.testing.assert_array_equal(logits, original[0])
        np.testing.assert_allclose(rel, x * (g_h @ w1.T), rtol=2e-3, atol=2e-4)


def _c(value):
    return np.array(value, dtype=np.float32)


@pytest.mark.parametrize("order", ["torchscript", "dynamo"])
def test_gelu_erf_pattern(order):
    erf_part = [helper.make_node("Div", ["h", "sqrt2"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["a"])]
    if order == "torchscript":
        tail = [helper.make_node("Mul", ["h", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["p"])]
    else:
        tail = [helper.make_node("Mul", ["half", "a"], ["m"]), helper.make_node("Mul", ["h", "m"], ["p"])]
    model = _chain(erf_part + tail, {"sqrt2": _c(math.sqrt(2)), "one": _c(1.0), "half": _c(0.5)})
    _check(model, "GELU", gelu, lambda h, g: gelu(h) / (h + 1e-10) * g)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_tanh_pattern():
    nodes = [helper.make_node("Pow", ["h", "three"], ["h3"]), helper.make_node("Mul", ["h3", "c"], ["ch3"]),
             helper.make_node("Add", ["h", "ch3"], ["i"]), helper.make_node("Mul", ["i", "k"], ["u"]),
             helper.make_node("Tanh", ["u"], ["t"]), helper.make_node("Add", ["t", "one"], ["a"]),
             helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Mul", ["hh", "a"], ["p"])]
    consts = {"three": _c(3.0), "c": _c(0.044715), "k": _c(math.sqrt(2 / math.pi)), "one": _c(1.0), "half": _c(0.5)}
    _check(_chain(nodes, consts), "GELU", gelu_tanh, lambda h, g: gelu_tanh(h) / (h + 1e-10) * g)


def test_silu_pattern():
    model = _chain([helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["s", "h"], ["p"])], {})
    _check(model, "SiLU", silu, lambda h, g: silu(h) / (h + 1e-10) * g)


def _ln_detached(h, g, eps=1e-5):
    sd = np.sqrt(h.var(axis=-1, keepdims=True) + eps)
    return (g - g.mean(axis=-1, keepdims=True)) / sd


@pytest.mark.parametrize("inverse", ["Div", "Reciprocal"])
def test_written_out_layernorm_pattern(inverse):
    nodes = [helper.make_node("ReduceMean", ["h", "last"], ["mu"]), helper.make_node("Sub", ["h", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2", "last"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"])]
    if inverse == "Div":
        nodes.append(helper.make_node("Div", ["d", "sd"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["sd"], ["isd"]), helper.make_node("Mul", ["isd", "d"], ["n"])]
    gamma, beta = f32(H), f32(H)
    nodes += [helper.make_node("Mul", ["n", "gamma"], ["ng"]), helper.make_node("Add", ["ng", "beta"], ["p"])]
    consts = {"last": np.array([-1], dtype=np.int64), "two": _c(2.0), "eps": _c(1e-5), "gamma": gamma, "beta": beta}
    _check(_chain(nodes, consts), "layer norm", lambda h: layernorm(h, gamma, beta, -1, 1e-5),
           lambda h, g: _ln_detached(h, g * gamma))


def test_written_out_layernorm_over_channels():
    """Hugging Face ConvNeXt's channels_first LayerNorm: (x - mean_c) / sqrt(var_c + eps) over axis 1 of NCHW."""
    x = np.random.default_rng(3).standard_normal((2, 4, 3, 5)).astype(np.float32)
    w = RNG.standard_normal((4 * 3 * 5, 3)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["x", "one"], ["mu"]), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2", "one"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    inits = {"one": np.array([1], dtype=np.int64), "two": _c(2.0), "eps": _c(1e-6), "w": w}
    graph = helper.make_graph(nodes, "ln_c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert any("layer norm" in c for c in make_plan(model, "attnlrp").canonicalizations)
    session = ort.InferenceSession(compile_model(model, "attnlrp").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    target = np.array([0, 2])
    rel = session.run(["x_relevance"], {"x": x, "target": target})[0]
    g = w.T[target].reshape(2, 4, 3, 5).astype(np.float64)
    sd = np.sqrt(x.astype(np.float64).var(axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rel, x * (g - g.mean(axis=1, keepdims=True)) / sd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("inverse", ["Div", "Reciprocal"])
def test_written_out_rmsnorm_pattern(inverse):
    nodes = [helper.make_node("Pow", ["h", "two"], ["h2"]), helper.make_node("ReduceMean", ["h2", "last"], ["m"]),
             helper.make_node("Add", ["m", "eps"], ["me"]), helper.make_node("Sqrt", ["me"], ["s"])]
    nodes.append(helper.make_node("Div", ["one", "s"], ["r"]) if inverse == "Div" else
                 helper.make_node("Reciprocal", ["s"], ["r"]))
    weight = f32(H)
    nodes += [helper.make_node("Mul", ["h", "r"], ["n"]), helper.make_node("Mul", ["weight", "n"], ["p"])]
    consts = {"last": np.array([-1], dtype=np.int64), "two": _c(2.0), "eps": _c(1e-6), "one": _c(1.0),
              "weight": weight}

    def inv(h):
        return 1 / np.sqrt((h ** 2).mean(axis=-1, keepdims=True) + 1e-6)
    _check(_chain(nodes, consts), "RMS norm", lambda h: h * inv(h) * weight, lambda h, g: g * weight * inv(h))


def test_expand_sums_back_over_broadcast_axes():
    """x [2, 4, 6] -> MatMul -> Slice one token [2, 1, 6] -> Expand to [2, 4, 6] -> ...: the gradient sums."""
    nodes = [helper.make_node("Slice", ["h", "s0", "s1", "ax"], ["hs"]),
             helper.make_node("Expand", ["hs", "shape"], ["p"])]
    consts = {"s0": np.array([1], dtype=np.int64), "s1": np.array([2], dtype=np.int64),
              "ax": np.array([1], dtype=np.int64), "shape": np.array([2, 4, H], dtype=np.int64)}

    def f(h):
        return np.broadcast_to(h[:, 1:2], h.shape)
    _check(_chain(nodes, consts), "", f, lambda h, g: vjp(f, h, g))


# --- a tiny attention block against LXT's own rule functions ------------------------------------------------------

def _attention_block(gated: bool):
    torch = pytest.importorskip("torch")
    rules = pytest.importorskip("lxt.efficient.rules")
    nn = torch.nn

    class Block(nn.Module):
        """LayerNorm, 2-head attention with an additive mask, GELU or gated GELU MLP, mean pool, classifier;
        ``mode`` "attn"/"cp" applies LXT's rules (stop_gradient, divide_gradient, identity_rule_implicit)."""

        def __init__(self, h=8, heads=2, t=5):
            super().__init__()
            self.heads, self.mode = heads, None
            self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
            self.up, self.gate, self.down, self.cls = nn.Linear(h, 2 * h), nn.Linear(h, 2 * h), nn.Linear(2 * h, h), \
                nn.Linear(h, 3)
            mask = torch.zeros(t, t)
            mask[:, -1] = -1e9
            self.register_buffer("mask", mask)

        def ln(self, m, x):
            if self.mode is None:
                return m(x)
            mean = x.mean(-1, keepdim=True)
            std = (((x - mean) ** 2).mean(-1, keepdim=True) + m.eps).sqrt()
            return (x - mean) / rules.stop_gradient(std) * m.weight + m.bias

        def act(self, x):
            f = nn.functional.gelu
            return f(x) if self.mode is None else rules.identity_rule_implicit(f, x)

        def forward(self, x):
            n, t, h = x.shape
            d = h // self.heads
            y = self.ln(self.ln1, x)
            q, k, v = self.q(y), self.k(y), self.v(y)
            if self.mode == "attn":
                q, k, v = rules.divide_gradient(q, 4), rules.divide_gradient(k, 4), rules.divide_gradient(v, 2)
            elif self.mode == "cp":
                q, k = rules.stop_gradient(q), rules.stop_gradient(k)
            q, k, v = (a.view(n, t, self.heads, d).transpose(1, 2) for a in (q, k, v))
            p = (q @ k.transpose(-1, -2) / math.sqrt(d) + self.mask).softmax(-1)
            x = x + self.o((p @ v).transpose(1, 2).reshape(n, t, h))
            y = self.ln(self.ln2, x)
            if gated:
                g, u = self.act(self.gate(y)), self.up(y)
                m = rules.divide_gradient(g * u, 2) if self.mode == "attn" else \
                    rules.stop_gradient(g) * u if self.mode == "cp" else g * u
            else:
                m = self.act(self.up(y))
            return self.cls((x + self.down(m)).mean(1))

    torch.manual_seed(0)
    return torch, Block().eval()


@pytest.mark.parametrize("gated", [False, True])
def test_attention_block_matches_lxt(tmp_path, gated):
    torch, block = _attention_block(gated)
    x = torch.randn(2, 5, 8)
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"])
    plan = make_plan(path, "cplrp")
    labels = " ".join(plan.canonicalizations)
    for label in ("GELU", "attention scores", "attention values") + (("gated product",) if gated else ()):
        assert label in labels
    shown = next(line for line in inspect_text(plan).splitlines() if line.startswith("recognised on the relevance"))
    for label in ("attention scores x1", "attention values x1", "softmax x1", "layer norm x2", "GELU x1"):
        assert label in shown
    target = np.array([0, 2])
    for composite, mode in (("attnlrp", "attn"), ("cplrp", "cp"), ("gradient", None)):
        session = ort.InferenceSession(compile_model(path, composite).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(["x_relevance"], {"x": x.numpy(), "target": target})[0]
        block.mode = mode
        xg = x.clone().requires_grad_(True)
        block(xg)[torch.arange(2), torch.tensor(target)].sum().backward()
        block.mode = None
        expected = (xg * xg.grad).detach().numpy()
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5, composite


# --- routing with run-time sizes (dynamic sequence lengths), HardSwish, Sub ----------------------------------------

def test_concat_and_pad_gradients_with_run_time_sizes():
    x, r = f32(2, 3, 4), f32(2, 8, 4)
    got = run_function("concat_gradient_runtime", [x, np.array([2], dtype=np.int64), r], {"axes": [1]})[0]
    np.testing.assert_array_equal(got, r[:, 2:5])
    pads = np.array([0, 1, 2, 0, 4, 1], dtype=np.int64)  # begins, ends per axis
    r = f32(2, 8, 7)
    got = run_function("pad_gradient_runtime", [x, pads, r], {})[0]
    np.testing.assert_array_equal(got, r[:, 1:4, 2:6])


def test_hardswish_gradient():
    x = np.array([[-4.0, -3.5, -2.0, -0.5, 0.0, 0.7, 2.5, 3.2, 5.0]], dtype=np.float32)
    r = f32(1, 9)
    node = helper.make_node("HardSwish", ["x"], ["y"])
    got = template_relevance(node, x, r, "gradient")
    np.testing.assert_allclose(got, vjp(lambda t: t * np.clip(t / 6 + 0.5, 0, 1), x, r), rtol=1e-4, atol=1e-6)


def test_sub_norm_splits_like_a_sum():
    a, b, r = f32(2, 5), f32(2, 5), f32(2, 5)
    node = helper.make_node("Sub", ["a", "b"], ["y"])
    ra = template_relevance(node, a, r, "norm", x_index=0, extra_inputs={"b": b})
    rb = template_relevance(node, a, r, "norm", x_index=1, extra_inputs={"b": b})
    y = a.astype(np.float64) - b
    np.testing.assert_allclose(ra, a * r / stab(y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rb, -b * r / stab(y), rtol=1e-4, atol=1e-6)
