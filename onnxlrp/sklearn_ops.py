"""scikit-learn exports (skl2onnx): the linear ai.onnx.ml ops are written into the float twin (quantized.py) as
the standard ops they compute, so the ordinary rules apply (dense layers, affine maps, routing). Rewrites:

    LinearClassifier(X)      ->  scores: Gemm(X, coefficients, intercepts, transB=1)  (the raw scores: the
                                 post_transform SOFTMAX/LOGISTIC is left out, so the pre-activation is explained)
                                 label: Gather(class labels, ArgMax(scores))
    LinearRegressor(X)       ->  Gemm(X, coefficients, intercepts, transB=1)           (post_transform NONE)
    Scaler(X)                ->  Mul(Sub(X, offset), scale)
    Normalizer(X)            ->  Div(X, ReduceL1 / ReduceL2 / ReduceMax(X))  (the norm is treated as a constant:
                                 the numerator gets the relevance, as for a gated product)
    Imputer(X)               ->  Where(IsNaN(X), imputed values, X)           (imputed_value_floats, NaN only)
    Binarizer(X)             ->  Cast(Greater(X, threshold))                   (off the relevance path)
    ArrayFeatureExtractor(X, constant indices) -> Gather(X, indices, axis=-1)

Tree ensembles and kernel SVMs have no LRP rule: refused by name. ZipMap (seq(map) outputs) is looked through when
the explained output is chosen (compile._explained_tensor)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .errors import OnnxlrpError
from .quantized import REWRITES

REFUSED = {"TreeEnsembleClassifier": "tree ensembles", "TreeEnsembleRegressor": "tree ensembles",
           "TreeEnsemble": "tree ensembles", "SVMClassifier": "kernel SVMs", "SVMRegressor": "kernel SVMs"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _dense(t, node: onnx.NodeProto, hint: str, rows: int) -> str:
    """Gemm(X, W[rows, F], b, transB=1) into a fresh twin tensor; returns its name."""
    coefficients = np.asarray(_attr(node, "coefficients"), np.float32)
    intercepts = np.asarray(_attr(node, "intercepts", [0.0] * rows), np.float32)
    if coefficients.size % rows or intercepts.size not in (1, rows):
        raise OnnxlrpError(f"{t.source}: node {hint} ({node.op_type}): {coefficients.size} coefficients do not "
                           f"fit {rows} outputs")
    weight = coefficients.reshape(rows, -1)
    bias = np.broadcast_to(intercepts, [rows]).astype(np.float32)
    out = t.fresh(f"{hint}_scores")
    t.emit("Gemm", [t.tw(node.input[0]), t.constant(f"{hint}_coefficients", weight),
                    t.constant(f"{hint}_intercepts", bias)], [out], hint, transB=1)
    return out


def linear_classifier(t, node: onnx.NodeProto, hint: str) -> None:
    labels = _attr(node, "classlabels_ints") or _attr(node, "classlabels_strings")
    if labels is None:
        raise OnnxlrpError(f"{t.source}: node {hint} (LinearClassifier): no class labels")
    rows = len(np.asarray(_attr(node, "coefficients"))) // max(1, _feature_count(t, node))
    if rows != len(labels):
        raise OnnxlrpError(f"{t.source}: node {hint} (LinearClassifier): {rows} coefficient rows for "
                           f"{len(labels)} classes are not supported")
    raw = _dense(t, node, hint, rows)
    t.emit("Identity", [raw], [t.tw(node.output[1])], f"{hint}_raw")
    index = t.fresh(f"{hint}_argmax")
    t.emit("ArgMax", [raw], [index], f"{hint}_argmax", axis=1, keepdims=0)
    values = np.array(labels, dtype=np.int64 if isinstance(labels[0], int) else object)
    if values.dtype == object:
        values = np.array([v.decode() if isinstance(v, bytes) else v for v in labels], dtype=object)
    t.emit("Gather", [t.constant(f"{hint}_labels", values), index], [t.tw(node.output[0])], f"{hint}_label")


def _feature_count(t, node: onnx.NodeProto) -> int:
    shape = [d.dim_value for d in _value_info(t, node.input[0]).type.tensor_type.shape.dim] \
        if _value_info(t, node.input[0]) is not None else []
    if len(shape) == 2 and shape[1]:
        return shape[1]
    labels = _attr(node, "classlabels_ints") or _attr(node, "classlabels_strings") or [1]
    return len(np.asarray(_attr(node, "coefficients"))) // len(labels)


def _value_info(t, name: str):
    graph = t.model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name == name:
            return vi
    return None


def linear_regressor(t, node: onnx.NodeProto, hint: str) -> None:
    if _attr(node, "post_transform", "NONE") != "NONE":
        raise OnnxlrpError(f"{t.source}: node {hint} (LinearRegressor): post_transform "
                           f"{_attr(node, 'post_transform')} is not supported")
    raw = _dense(t, node, hint, int(_attr(node, "targets", 1)))
    t.emit("Identity", [raw], [t.tw(node.output[0])], f"{hint}_out")


def scaler(t, node: onnx.NodeProto, hint: str) -> None:
    offset = np.asarray(_attr(node, "offset", [0.0]), np.float32)
    scale = np.asarray(_attr(node, "scale", [1.0]), np.float32)
    centred = t.fresh(f"{hint}_centred")
    t.emit("Sub", [t.tw(node.input[0]), t.constant(f"{hint}_offset", offset)], [centred], f"{hint}_sub")
    t.emit("Mul", [centred, t.constant(f"{hint}_scale", scale)], [t.tw(node.output[0])], f"{hint}_mul")


def normalizer(t, node: onnx.NodeProto, hint: str) -> None:
    reduce = {"L1": "ReduceL1", "L2": "ReduceL2", "MAX": "ReduceMax"}.get(_attr(node, "norm", "MAX"))
    if reduce is None:
        raise OnnxlrpError(f"{t.source}: node {hint} (Normalizer): norm {_attr(node, 'norm')!r} is not supported")
    norm = t.fresh(f"{hint}_norm")
    t.emit(reduce, [t.tw(node.input[0]), t.constant(f"{hint}_axes", np.array([1], np.int64))], [norm],
           f"{hint}_norm", keepdims=1)
    t.emit("Div", [t.tw(node.input[0]), norm], [t.tw(node.output[0])], f"{hint}_div")


def imputer(t, node: onnx.NodeProto, hint: str) -> None:
    values = _attr(node, "imputed_value_floats")
    replaced = _attr(node, "replaced_value_float", float("nan"))
    if values is None or not np.isnan(replaced):
        raise OnnxlrpError(f"{t.source}: node {hint} (Imputer): only float imputation of NaN is supported")
    missing = t.fresh(f"{hint}_missing")
    t.emit("IsNaN", [t.tw(node.input[0])], [missing], f"{hint}_isnan")
    t.emit("Where", [missing, t.constant(f"{hint}_values", np.asarray(values, np.float32)), t.tw(node.input[0])],
           [t.tw(node.output[0])], f"{hint}_where")


def binarizer(t, node: onnx.NodeProto, hint: str) -> None:
    above = t.fresh(f"{hint}_above")
    t.emit("Greater", [t.tw(node.input[0]), t.constant(f"{hint}_threshold",
                                                         np.float32(_attr(node, "threshold", 0.0)))],
           [above], f"{hint}_greater")
    t.emit("CastLike", [above, t.tw(node.input[0])], [t.tw(node.output[0])], f"{hint}_cast")


def array_feature_extractor(t, node: onnx.NodeProto, hint: str) -> None:
    indices = t.value(node.input[1])
    if indices is None or t.value(node.input[0]) is not None:  # e.g. class labels picked by an ArgMax
        t.copy(node, hint)
        return
    t.emit("Gather", [t.tw(node.input[0]), t.constant(f"{hint}_indices", np.asarray(indices, np.int64).reshape(-1))],
           [t.tw(node.output[0])], hint, axis=-1)


def refuse(t, node: onnx.NodeProto, hint: str) -> None:
    raise OnnxlrpError(f"{t.source}: node {hint} ({node.op_type}): {REFUSED[node.op_type]} have no LRP rule")


REWRITES.update({"LinearClassifier": linear_classifier, "LinearRegressor": linear_regressor, "Scaler": scaler,
                 "Normalizer": normalizer, "Imputer": imputer, "Binarizer": binarizer,
                 "ArrayFeatureExtractor": array_feature_extractor, **{op: refuse for op in REFUSED}})
