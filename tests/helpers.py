"""Test helpers: run one rule template on one node with a chosen output relevance, and numpy references."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxlrp.bind_context import BindContext
from onnxlrp.bindings import bind
from onnxlrp.builder import Builder
from onnxlrp.graph import GraphView
from onnxlrp.templates import DOMAIN, library
from onnxlrp.variants import VARIANTS


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in the graph outputs' types from shape inference (ORT refuses untyped outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        if out.name in known and known[out.name].type.tensor_type.elem_type:
            out.CopyFrom(known[out.name])
    return model


def template_relevance(node: onnx.NodeProto, x: np.ndarray, r: np.ndarray, rule: str,
                       weights: dict[str, np.ndarray] | None = None, x_index: int = 0, y_index: int = 0,
                       extra_inputs: dict[str, np.ndarray] | None = None, used: list[str] | None = None,
                       opset: int = 18, **options) -> np.ndarray:
    """Relevance for input ``x_index`` of ``node`` when relevance ``r`` arrives at output ``y_index``.

    The node's input 0 (or every name in extra_inputs) is fed at run time; weights are initializers.
    ``used``, when given, receives the name of the template that was applied.
    """
    weights = weights or {}
    extra_inputs = extra_inputs or {}
    feeds = {node.input[0]: x, **extra_inputs}
    graph = helper.make_graph(
        [node], "single",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for k, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) for o in node.output if o],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    view = GraphView(model)
    lib = library()
    spec = lib.ops[node.op_type]
    builder = Builder(taken={"R"} | {n for n in node.input} | set(node.output))
    ctx = BindContext(view, 0, x_index, y_index, builder.constant, opset, rule=rule, add_node=builder.plain)
    template = spec.template_for(rule, x_index, VARIANTS[spec.variant](ctx) if spec.variant else None)
    if used is not None:
        used.append(template)
    params = {"epsilon": 1e-6, "stabilizer": 1e-6, "gamma": 0.25, "alpha": 2.0, "beta": 1.0, "low": 0.0,
              "high": 1.0, **options}
    inputs, attrs = bind(ctx, lib.function(template), lib.attribute_types(template), params, spec.binder)
    inputs = ["R" if i == "__R__" else i for i in inputs]
    call = helper.make_node(template, inputs, ["R_X"], domain=DOMAIN)
    call.attribute.extend(attrs)
    graph = helper.make_graph(
        list(model.graph.node) + builder.nodes + [call], "template", list(model.graph.input) + [
            helper.make_tensor_value_info("R", helper.np_dtype_to_tensor_dtype(r.dtype), list(r.shape))],
        [helper.make_empty_tensor_value_info("R_X")],
        list(model.graph.initializer) + builder.initializers)
    return _session(graph, template, opset).run(["R_X"], {**feeds, "R": r})[0]


def _session(graph: onnx.GraphProto, function: str, opset: int = 18) -> ort.InferenceSession:
    """An ORT session for a graph that calls the library function ``function`` (checked with full_check)."""
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    functions = [onnx.FunctionProto.FromString(f.SerializeToString()) for f in library().closure([function])]
    for f in functions:  # as the compiler does (on copies): the functions use the model's default-domain opset
        for imp in f.opset_import:
            if imp.domain == "":
                imp.version = max(imp.version, opset)
    model = _typed_outputs(helper.make_model(graph, functions=functions, ir_version=10,
                                             opset_imports=opsets))
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_function(name: str, inputs: list[np.ndarray], attributes: dict) -> list[np.ndarray]:
    """Call one template library function on the given inputs with ORT."""
    lib = library()
    function = lib.function(name)
    types = lib.attribute_types(name)
    call = helper.make_node(name, list(function.input), list(function.output), domain=DOMAIN)
    call.attribute.extend(helper.make_attribute(k, v, attr_type=types.get(k)) for k, v in attributes.items())
    graph = helper.make_graph(
        [call], "call", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                         for n, v in zip(function.input, inputs)],
        [helper.make_empty_tensor_value_info(o) for o in function.output])
    return _session(graph, name).run(None, dict(zip(function.input, inputs)))


def forward(node: onnx.NodeProto, x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run the bare node with ORT."""
    weights = weights or {}
    graph = helper.make_graph(
        [node], "fwd", [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_empty_tensor_value_info(o) for o in node.output if o],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = _typed_outputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {node.input[0]: x})


# --- numpy references ---------------------------------------------------------------------------------------

def conv_numpy(x, w, b, strides, pads, dilations, group):
    """Direct N-D convolution (cross-correlation) in numpy, ONNX semantics."""
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    k = w.shape[2:]
    d = len(k)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + d]) for a in range(d)])
    out_sp = [(xp.shape[2 + a] - dilations[a] * (k[a] - 1) - 1) // strides[a] + 1 for a in range(d)]
    y = np.zeros([n, m] + out_sp, dtype=np.float64)
    mg = m // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * mg:(g + 1) * mg]
        for offset in np.ndindex(*k):
            sl = tuple(slice(offset[a] * dilations[a], offset[a] * dilations[a] + strides[a] * (out_sp[a] - 1) + 1,
                             strides[a]) for a in range(d))
            patch = xs[(slice(None), slice(None)) + sl]  # [n, cg, *out]
            y[:, g * mg:(g + 1) * mg] += np.einsum("nc...,mc->nm...", patch, ws[(slice(None), slice(None)) + offset])
    return y + b.reshape([1, m] + [1] * d)


def dense_matrix(linear, in_shape):
    """The matrix of a linear map (acting on one sample of shape in_shape), columns = input units."""
    size = int(np.prod(in_shape))
    eye = np.eye(size).reshape([size] + list(in_shape))
    return linear(eye).reshape(size, -1).T


def zennit_rule(rule: str, x, r, dense, w, b, gamma=0.25, alpha=2.0, beta=1.0, low=0.0, high=1.0, eps=1e-6):
    """Zennit's rule definitions on one sample with dense matrices: dense(W) -> matrix, z = dense(W) x + b."""
    def stab(z):
        return z + eps * np.where(z >= 0, 1.0, -1.0)

    def divide(r, z):  # r / stab(z); 0 where stab(z) = 0 (a dead unit with a zero epsilon/stabilizer)
        d = stab(z)
        return np.divide(r, d, out=np.zeros(np.broadcast(r, d).shape), where=d != 0)
    pos, neg = (lambda a: np.clip(a, 0, None)), (lambda a: np.clip(a, None, 0))
    xf, rf = x.reshape(-1), r.reshape(-1)
    A = dense(w)
    if rule == "epsilon":
        z = A @ xf + b
        out = xf * (A.T @ (divide(rf, z)))
    elif rule == "zplus":
        Ap, An = dense(pos(w)), dense(neg(w))
        z = Ap @ pos(xf) + pos(b) + An @ neg(xf)
        s = divide(rf, z)
        out = pos(xf) * (Ap.T @ s) + neg(xf) * (An.T @ s)
    elif rule == "alpha_beta":
        Ap, An = dense(pos(w)), dense(neg(w))
        zp = Ap @ pos(xf) + pos(b) + An @ neg(xf)
        zn = An @ pos(xf) + neg(b) + Ap @ neg(xf)
        sp, sn = divide(rf, zp), divide(rf, zn)
        out = alpha * (pos(xf) * (Ap.T @ sp) + neg(xf) * (An.T @ sp)) \
            - beta * (pos(xf) * (An.T @ sn) + neg(xf) * (Ap.T @ sn))
    elif rule == "gamma":
        Agp, Agn = dense(w + gamma * pos(w)), dense(w + gamma * neg(w))
        z = A @ xf + b
        zp = Agp @ pos(xf) + (b + gamma * pos(b)) + Agn @ neg(xf)
        zn = Agn @ pos(xf) + (b + gamma * neg(b)) + Agp @ neg(xf)
        sp, sn = divide(rf * (z > 0), zp), divide(rf * (z < 0), zn)
        out = pos(xf) * (Agp.T @ sp) + neg(xf) * (Agn.T @ sp) + pos(xf) * (Agn.T @ sn) + neg(xf) * (Agp.T @ sn)
    elif rule == "zbox":
        Ap, An = dense(pos(w)), dense(neg(w))
        lo, hi = np.full_like(xf, low), np.full_like(xf, high)
        z = (A @ xf + b) - (Ap @ lo + pos(b)) - (An @ hi + neg(b))
        s = divide(rf, z)
        out = xf * (A.T @ s) - lo * (Ap.T @ s) - hi * (An.T @ s)
    elif rule == "flat":
        A1 = dense(np.ones_like(w))
        z = A1 @ np.ones_like(xf)
        out = A1.T @ (divide(rf, z))
    elif rule == "wsquare":
        A2 = dense(w * w)
        z = A2 @ np.ones_like(xf) + b * b
        out = A2.T @ (divide(rf, z))
    elif rule == "gradient":
        out = A.T @ rf
    else:
        raise ValueError(rule)
    return out.reshape(x.shape)


def lrn_taylor_numpy(x, r, size, alpha, beta, bias, eps=1e-6):
    n, c = x.shape[:2]
    a = alpha / size
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    out = np.zeros_like(x, dtype=np.float64)
    for k in range(c):
        window = range(max(0, k - lo), min(c - 1, k + hi) + 1)
        s = bias + a * sum(x[:, j] ** 2 for j in window)
        z = {j: (x[:, k] * (bias + a * x[:, k] ** 2) ** -beta if j == k
                 else -2 * a * beta * x[:, k] * x[:, j] ** 2 * s ** (-beta - 1)) for j in window}
        total = sum(z.values())
        total = total + eps * np.where(total >= 0, 1, -1)
        for j in window:  # 0 where the total is 0 (x_k = 0 with a zero stabilizer)
            out[:, j] += np.divide(z[j] * r[:, k], total, out=np.zeros_like(total), where=total != 0)
    return out


def exact_zennit_batch_norm() -> None:
    """Make Zennit's BatchNorm merging exact (idempotent; call before using Zennit's canonizers).

    Zennit 0.5.1's MergeBatchNorm folds a BatchNorm into the linear layer before it and resets the BatchNorm to
    compute the identity, but leaves ``eps`` in place (torch >= 2.10 refuses eps = 0): the "identity" BatchNorm
    still divides by sqrt(1 + eps), which scales every merged layer's output by 1 - 5e-6 (eps = 1e-5) and the
    reference's relevance with it. Setting the merged BatchNorm's running_var to 1 - eps makes it the identity
    (in float32, (1 - 1e-5) + 1e-5 == 1 exactly); ``remove`` restores the saved statistics as before."""
    import torch
    from zennit.canonizers import MergeBatchNorm
    merge = MergeBatchNorm.merge_batch_norm
    if getattr(merge, "exact", False):
        return

    def merge_exactly(modules, batch_norm):
        merge(modules, batch_norm)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)

    merge_exactly.exact = True
    MergeBatchNorm.merge_batch_norm = staticmethod(merge_exactly)
