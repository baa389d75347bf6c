"""DeepLIFT's reference pass: a copy of the forward graph fed with the baseline input ``<input>_baseline``, so
that every activation x has its reference value x0 (tensor ``<x>__ref``). Constants are shared; the original
forward is untouched (its outputs stay bit-identical)."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxlrpError
from .graph import GraphView

BASELINE_SUFFIX = "_baseline"


def baseline_value(vi: onnx.ValueInfoProto, baseline, source: str) -> np.ndarray:
    """The default baseline for input ``vi``: zeros (shape [1, ...]) or an array / .npy file."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if isinstance(baseline, str) and baseline == "zeros":
        if any(d is None for d in dims[1:]):
            raise OnnxlrpError(f"{source}: --baseline zeros needs the static shape of input {vi.name!r}, got {dims}")
        return np.zeros([1] + dims[1:], dtype=dtype)
    if isinstance(baseline, (str, os.PathLike)):
        from pathlib import Path

        from .inputs import read_array
        baseline = read_array(Path(baseline))  # regular numeric .npy only, never unpickled; one-line errors
    array = np.asarray(baseline, dtype=dtype)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise OnnxlrpError(f"{source}: the baseline holds NaN or infinite values")
    if array.ndim == len(dims) - 1:
        array = array[None]
    fits = array.ndim == len(dims) and all(d is None or d == a for d, a in zip(dims[1:], array.shape[1:]))
    if not fits:
        raise OnnxlrpError(f"{source}: baseline of shape {list(array.shape)} does not fit input {vi.name!r} "
                           f"of shape {dims}")
    return array


def reference_forward(view: GraphView, baseline, source: str, fresh=lambda name: name
                      ) -> tuple[list[onnx.NodeProto], dict[str, str], list, list]:
    """(cloned nodes, activation -> reference tensor, baseline graph inputs, their default initializers).
    fresh(hint) returns a name unused in the graph (``hint`` itself when free)."""
    reference: dict[str, str] = {}
    inputs, defaults = [], []
    for vi in view.float_inputs:
        name = fresh(vi.name + BASELINE_SUFFIX)
        reference[vi.name] = name
        value = baseline_value(vi, baseline, source)
        typed = onnx.ValueInfoProto()
        typed.CopyFrom(vi)
        typed.name = name
        dim = typed.type.tensor_type.shape.dim
        if dim:
            dim[0].Clear()
            dim[0].dim_param = "baseline_batch"
        inputs.append(typed)
        defaults.append(numpy_helper.from_array(value, name))
    renamed: dict[str, str] = dict(reference)
    nodes = []
    for node in view.model.graph.node:  # the forward's nodes (view.nodes may hold recognised patterns)
        if not any(i in renamed for i in node.input if i):
            continue
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = fresh(f"{node.name}__ref")
        for k, name in enumerate(clone.input):
            if name in renamed:
                clone.input[k] = renamed[name]
        for k, name in enumerate(clone.output):
            if name:
                renamed[name] = clone.output[k] = fresh(f"{name}__ref")
        nodes.append(clone)
    return nodes, {a: renamed[a] for a in view.activations if a in renamed}, inputs, defaults
