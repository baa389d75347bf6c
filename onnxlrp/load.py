"""Stage 1: read a model, validate it, upgrade old opsets and infer shapes, with clear errors for bad files."""
from __future__ import annotations

import os
from pathlib import Path

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


def check(model: onnx.ModelProto, source: str) -> None:
    """Run onnx's checker on the input model and turn its complaint into a one-line error."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxlrpError(f"{source}: invalid ONNX model: {first}") from None


def infer_shapes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """onnx shape inference with data propagation (so Reshape targets computed from shapes resolve)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxlrpError(f"{source}: shape inference failed: {first}") from None
