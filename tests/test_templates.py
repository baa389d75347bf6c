"""Every rule template against an independent numpy re-implementation, on odd geometries."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import conv_numpy, dense_matrix, forward, run_function, template_relevance, zennit_rule

LINEAR_RULES = ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare", "gradient"]
CONV_CASES = {
    # name: (input shape, weight shape, attributes)
    "2d_plain": ((2, 3, 7, 7), (4, 3, 3, 3), {}),
    "2d_stride_pad_uneven": ((1, 2, 8, 9), (3, 2, 3, 2), {"strides": [2, 3], "pads": [1, 0, 2, 1]}),
    "2d_dilated_groups": ((1, 4, 9, 9), (6, 2, 3, 3), {"dilations": [2, 1], "group": 2, "pads": [1, 1, 1, 1]}),
    "2d_depthwise": ((2, 3, 6, 6), (3, 1, 3, 3), {"group": 3, "strides": [2, 2]}),
    "2d_same_upper": ((1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "1d": ((2, 3, 11), (4, 3, 4), {"strides": [3], "pads": [2, 1]}),
}


def _conv_attrs(attrs, x_shape, w_shape):
    """Explicit ONNX attributes (auto_pad resolved) for the numpy reference."""
    d = len(w_shape) - 2
    strides, dilations = attrs.get("strides", [1] * d), attrs.get("dilations", [1] * d)
    pads = attrs.get("pads", [0] * 2 * d)
    if attrs.get("auto_pad") == "SAME_UPPER":
        pads = [0] * 2 * d
        for a in range(d):
            out = -(-x_shape[2 + a] // strides[a])
            total = max(0, (out - 1) * strides[a] + (w_shape[2 + a] - 1) * dilations[a] + 1 - x_shape[2 + a])
            pads[a], pads[a + d] = total // 2, total - total // 2
    return strides, pads, dilations, attrs.get("group", 1)


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_rules_match_numpy(case, rule):
    rng = np.random.default_rng(0)
    x_shape, w_shape, attrs = CONV_CASES[case]
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    (y,) = forward(node, x, {"w": w, "b": b})
    r = rng.standard_normal(y.shape).astype(np.float32)
    used = []
    got = template_relevance(node, x, r, rule, {"w": w, "b": b}, low=-2.0, high=2.0, used=used)
    strides, pads, dilations, group = _conv_attrs(attrs, x_shape, w_shape)
    if rule == "flat":  # one group: the one-channel form of flat
        assert used == ["convflat_flat" if group == 1 else f"{used[0].split('_')[0]}_flat"]
    zero = np.zeros(w_shape[0])
    np.testing.assert_allclose(conv_numpy(x, w, b, strides, pads, dilations, group), y, rtol=1e-4, atol=1e-4)
    for n in range(x_shape[0]):
        def dense(weights):
            return dense_matrix(lambda e: conv_numpy(e, weights, zero, strides, pads, dilations, group),
                                x_shape[1:])
        bias = np.broadcast_to(b.reshape([-1] + [1] * (len(x_shape) - 2)), y.shape[1:]).reshape(-1)
        expected = zennit_rule(rule, x[n].astype(np.float64), r[n], dense, w.astype(np.float64), bias,
                               low=-2.0, high=2.0)
        np.testing.assert_allclose(got[n], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_rules_match_numpy(rule, trans_b):
    alpha, beta = 1.0, 1.0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    w = rng.standard_normal((4, 5) if trans_b else (5, 4)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=trans_b)
    (y,) = forward(node, x, {"w": w, "c": c})
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, rule, {"w": w, "c": c}, low=-2.0, high=2.0)
    for n in range(3):
        def dense(weights):
            return alpha * (weights if trans_b else weights.T)
        expected = zennit_rule(rule, x[n].astype(np.float64), r[n], dense, w.astype(np.float64), beta * c,
                               low=-2.0, high=2.0)
        np.testing.assert_allclose(got[n], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "flat"])
def test_matmul_rules_match_numpy_on_3d_input(rule):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    (y,) = forward(node, x, {"w": w})
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, rule, {"w": w})
    for n in range(2):
        for t in range(3):
            expected = zennit_rule(rule, x[n, t].astype(np.float64), r[n, t], lambda v: v.T, w.astype(np.float64),
                                   np.zeros(4))
            np.testing.assert_allclose(got[n, t], expected, rtol=2e-3, atol=1e-5)


def _maxpool_numpy(x, kernel, strides, pads, ceil_mode, r):
    """Winner-takes-all routing with numpy: first maximum in row-major order wins, overlaps add up."""
    n, c, h, w = x.shape
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])], constant_values=-np.inf)
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(r.shape[2]):
        for j in range(r.shape[3]):
            h0, w0 = i * strides[0], j * strides[1]
            win = xp[:, :, h0:h0 + kernel[0], w0:w0 + kernel[1]].reshape(n, c, -1)
            arg = win.argmax(-1)
            for a in range(n):
                for b in range(c):
                    hi, wi = divmod(int(arg[a, b]), win.shape[-1] // 1 if False else xp[:, :, h0:h0 + kernel[0], w0:w0 + kernel[1]].shape[3])
                    out[a, b, h0 + hi - pads[0], w0 + wi - pads[1]] += r[a, b, i, j]
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kernel,strides,pads,ceil_mode,template", [
    ([3, 3], [2, 2], [0, 0, 0, 0], 0, "maxpool_gradient"),   # overlapping windows (AlexNet)
    ([3, 3], [2, 2], [0, 0, 0, 0], 1, "maxpool_gradient"),   # ceil_mode: a partial window at the end
    ([2, 3], [1, 2], [1, 1, 0, 1], 0, "maxpool_gradient"),   # pads, uneven kernel
    ([2, 3], [2, 3], [0, 0, 0, 0], 0, "maxpool_gradient_unpool"),  # windows tile the input (VGG)
    ([2, 3], [3, 3], [0, 0, 0, 0], 0, "maxpool_gradient_unpool"),  # gaps between the windows
    ([2, 2], [2, 2], [0, 0, 0, 0], 0, "maxpool_gradient"),   # the last column is in no window
])
def test_maxpool_routes_to_winners(kernel, strides, pads, ceil_mode, template, ties):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    if ties:  # Relu outputs: many windows of equal values; the first maximum in row-major order wins
        x = np.round(np.maximum(x, 0))
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=kernel, strides=strides, pads=pads,
                            ceil_mode=ceil_mode)
    y = forward(node, x)[0]
    r = rng.standard_normal(y.shape).astype(np.float32)
    used = []
    got = template_relevance(node, x, r, "gradient", used=used)
    assert used == [template]
    expected = _maxpool_numpy(x, kernel, strides, pads, ceil_mode, r)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(got.sum(), r.sum(), rtol=1e-5)


def _avgpool_matrix(shape, kernel, strides, pads, ceil_mode, count_include_pad, out_shape):
    """Dense matrix of ONNX AveragePool on one channel (rows = windows, columns = input positions)."""
    h, w = shape
    rows = []
    for i in range(out_shape[0]):
        for j in range(out_shape[1]):
            h0, w0 = i * strides[0] - pads[0], j * strides[1] - pads[1]
            h1, w1 = min(h0 + kernel[0], h + pads[2]), min(w0 + kernel[1], w + pads[3])
            row = np.zeros((h, w))
            real = [(a, b) for a in range(max(h0, 0), min(h1, h)) for b in range(max(w0, 0), min(w1, w))]
            divisor = (h1 - h0) * (w1 - w0) if count_include_pad else len(real)
            for a, b in real:
                row[a, b] = 1.0 / divisor
            rows.append(row.reshape(-1))
    return np.array(rows)


@pytest.mark.parametrize("kernel,strides,pads,ceil_mode,count_include_pad", [
    ([2, 2], [2, 2], [0, 0, 0, 0], 0, 0),
    ([3, 3], [2, 2], [1, 1, 1, 1], 0, 0),
    ([3, 3], [2, 2], [1, 1, 1, 1], 0, 1),
    ([3, 2], [2, 2], [0, 1, 0, 1], 1, 0),
    ([3, 3], [1, 1], [1, 1, 1, 1], 0, 1),
])
def test_averagepool_norm_matches_numpy(kernel, strides, pads, ceil_mode, count_include_pad):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, strides=strides, pads=pads,
                            ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    (y,) = forward(node, x)
    A = _avgpool_matrix((7, 8), kernel, strides, pads, ceil_mode, count_include_pad, y.shape[2:])
    np.testing.assert_allclose((x.reshape(2, 3, -1) @ A.T).reshape(y.shape), y, rtol=1e-5, atol=1e-6)
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, "norm")
    grad = template_relevance(node, x, r, "gradient")
    for n in range(2):
        for c in range(3):
            xf, yf, rf = x[n, c].reshape(-1), y[n, c].reshape(-1), r[n, c].reshape(-1)
            s = rf / (yf + 1e-6 * np.where(yf >= 0, 1, -1))
            np.testing.assert_allclose(got[n, c].reshape(-1), xf * (A.T @ s), rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(grad[n, c].reshape(-1), A.T @ rf, rtol=1e-4, atol=1e-6)


def test_global_average_pool_and_reducemean_norm():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    r = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    y = x.mean(axis=(2, 3), keepdims=True)
    expected = x * r / (y + 1e-6 * np.sign(y)) / 20
    got = template_relevance(helper.make_node("GlobalAveragePool", ["x"], ["y"]), x, r, "norm")
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    mean = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    got = template_relevance(mean, x, r.reshape(2, 3), "norm", {"axes": np.array([2, 3])})
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("op,attrs,extra", [
    ("Transpose", {"perm": [0, 2, 3, 1]}, {}),
    ("Flatten", {"axis": 1}, {}),
    ("Reshape", {}, {"shape": np.array([0, -1, 2], dtype=np.int64)}),
    ("Squeeze", {}, {"axes": np.array([1], dtype=np.int64)}),
    ("Slice", {}, {"starts": np.array([1, 0], dtype=np.int64), "ends": np.array([5, 4], dtype=np.int64),
                   "axes": np.array([2, 3], dtype=np.int64), "steps": np.array([2, 3], dtype=np.int64)}),
    ("Gather", {"axis": 2}, {"indices": np.array([0, 3, 3, 1], dtype=np.int64)}),
    ("Pad", {}, {"pads": np.array([0, 0, 1, 2, 0, 0, 3, 0], dtype=np.int64)}),
])
def test_routing_ops_equal_the_gradient(op, attrs, extra):
    """Relevance routing through shape/selection ops equals the vector-Jacobian product (checked numerically)."""
    rng = np.random.default_rng(6)
    shape = (2, 1, 6, 4) if op == "Squeeze" else (2, 3, 6, 4)
    x = rng.standard_normal(shape).astype(np.float32)
    node = helper.make_node(op, ["x"] + list(extra), ["y"], **attrs)
    (y,) = forward(node, x, extra)
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, "gradient", extra)
    # the op is linear: <R, f(x)> = <VJP(R), x> for all x; compare with the dense Jacobian built column-wise
    jac = np.stack([forward(node, e.reshape(shape).astype(np.float32), extra)[0].reshape(-1)
                    for e in np.eye(x.size, dtype=np.float32)], axis=1)
    np.testing.assert_allclose(got.reshape(-1), jac.T @ r.reshape(-1), rtol=1e-5, atol=1e-6)


def test_concat_and_split_route_slices():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 5, 4)).astype(np.float32)
    r = rng.standard_normal((2, 8, 4)).astype(np.float32)
    concat = helper.make_node("Concat", ["a", "b"], ["y"], axis=1)
    got_b = template_relevance(concat, a, r, "gradient", x_index=1, extra_inputs={"b": b})
    np.testing.assert_allclose(got_b, r[:, 3:])
    got_a = template_relevance(concat, a, r, "gradient", x_index=0, extra_inputs={"b": b})
    np.testing.assert_allclose(got_a, r[:, :3])
    x = rng.standard_normal((2, 8, 4)).astype(np.float32)
    split = helper.make_node("Split", ["x", "sizes"], ["p", "q"], axis=1)
    rq = rng.standard_normal((2, 5, 4)).astype(np.float32)
    got = template_relevance(split, x, rq, "gradient", {"sizes": np.array([3, 5], dtype=np.int64)}, y_index=1)
    np.testing.assert_allclose(got[:, 3:], rq)
    assert not got[:, :3].any()


@pytest.mark.parametrize("op,expected", [
    ("Relu", lambda x, r: r * (x > 0)),
    ("Sigmoid", lambda x, r: r * (1 / (1 + np.exp(-x))) * (1 - 1 / (1 + np.exp(-x)))),
    ("Tanh", lambda x, r: r * (1 - np.tanh(x) ** 2)),
])
def test_activation_rules(op, expected):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    r = rng.standard_normal((2, 5)).astype(np.float32)
    node = helper.make_node(op, ["x"], ["y"])
    np.testing.assert_allclose(template_relevance(node, x, r, "pass"), r)
    np.testing.assert_allclose(template_relevance(node, x, r, "gradient"), expected(x, r), rtol=1e-5, atol=1e-6)


def test_add_norm_splits_by_contribution_and_unbroadcasts():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 3, 4)).astype(np.float32)
    r = rng.standard_normal((2, 3, 4)).astype(np.float32)
    node = helper.make_node("Add", ["a", "b"], ["y"])
    ra = template_relevance(node, a, r, "norm", x_index=0, extra_inputs={"b": b})
    rb = template_relevance(node, a, r, "norm", x_index=1, extra_inputs={"b": b})
    y = a + b
    np.testing.assert_allclose(ra, a * r / (y + 1e-6 * np.where(y >= 0, 1, -1)), rtol=1e-4)
    np.testing.assert_allclose(ra + rb, r, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("eps", [1e-6, 0.0, 0.25])
def test_stabilizer_is_zennits_bit_for_bit(eps):
    """stab(z) = z + eps * sign(z) with sign(0) = +1, exactly, also for -0, the smallest subnormals and infinities."""
    tiny = np.float32(1.4e-45)
    z = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, -3 * tiny, 1e-38, -1e-38, 1e-7, -1e-7, 1e-6, -1e-6, 2.5, -2.5,
                  3e38, -3e38, np.inf, -np.inf], dtype=np.float32)
    out = run_function("stab", [z], {"epsilon": eps})[0]
    expected = z + np.float32(eps) * np.where(z >= 0, np.float32(1), np.float32(-1))
    np.testing.assert_array_equal(out, expected)
