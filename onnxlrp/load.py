"""Stage 1: read a model, validate it, upgrade old opsets and infer shapes, with clear errors for bad files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import OnnxlrpError

#: Opset of the default domain that rule templates are written against; older models are upgraded to it.
TARGET_OPSET = 18


def model_source(model: onnx.ModelProto | str | os.PathLike) -> str:
    """A short name for messages: the file name, or the graph name of an in-memory model."""
    if isinstance(model, onnx.ModelProto):
        return f"<model {model.graph.name or 'unnamed'}>"
    return str(model)


def read_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or copy an in-memory model; raise OnnxlrpError if unreadable."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if not path.exists():
        raise OnnxlrpError(f"{path}: file not found")
    if path.is_dir():
        raise OnnxlrpError(f"{path}: is a folder, not an ONNX file")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise OnnxlrpError(f"{path}: not an ONNX model (protobuf parse failed: {str(exc).splitlines()[0]})") from None
    except (FileNotFoundError, OSError) as exc:
        raise OnnxlrpError(f"{path}: cannot read the model or its external data ({exc})") from None
    if not proto.graph.node and not proto.graph.output:
        raise OnnxlrpError(f"{path}: not an ONNX model (no graph found)")
    return proto


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset version of the default ONNX domain."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise OnnxlrpError(f"<model {model.graph.name}>: imports no opset of the default ONNX domain")


def upgrade_opset(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Convert models older than TARGET_OPSET with onnx's version converter."""
    if default_opset(model) >= TARGET_OPSET:
        return model
    try:
        return version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(
            f"{source}: cannot upgrade opset {default_opset(model)} to {TARGET_OPSET}: {first}") from None


#: Initializers with more elements than this are replaced by typed graph inputs in `weightless` copies.
LARGE_INITIALIZER = 1024


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape: the checker and shape
    inference then run in milliseconds instead of serialising hundreds of MB (small ones keep their data for
    data propagation of shape computations)."""
    graph = model.graph
    listed = {vi.name for vi in graph.input}
    small = [t for t in graph.initializer if int(np.prod(t.dims)) <= LARGE_INITIALIZER]
    large = [t for t in graph.initializer if int(np.prod(t.dims)) > LARGE_INITIALIZER]
    light = onnx.helper.make_graph(
        list(graph.node), graph.name,
        list(graph.input) + [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in large if t.name not in listed],
        list(graph.output), small, value_info=list(graph.value_info))
    copy = onnx.helper.make_model(light, opset_imports=list(model.opset_import), functions=list(model.functions))
    copy.ir_version = model.ir_version
    return copy


def check(model: onnx.ModelProto, source: str) -> None:
    """Run onnx's checker on the input model and turn its complaint into a one-line error."""
    try:
        onnx.checker.check_model(weightless(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxlrpError(f"{source}: invalid ONNX model: {first}") from None


def infer_shapes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """onnx shape inference with data propagation (so Reshape targets computed from shapes resolve)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return model
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxlrpError(f"{source}: shape inference failed: {first}") from None
