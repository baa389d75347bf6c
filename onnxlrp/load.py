"""Stage 1: read a model, validate it, upgrade old opsets and infer shapes, with clear errors for bad files."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper, version_converter

from .errors import OnnxlrpError
from .weights import is_large, join_weights, raw_data_size, split_weights

#: Opset of the default domain that rule templates are written against; older models are upgraded to it.
TARGET_OPSET = 18


def model_source(model: onnx.ModelProto | str | os.PathLike) -> str:
    """A short name for messages: the file name, or the graph name of an in-memory model."""
    if isinstance(model, onnx.ModelProto):
        return f"<model {model.graph.name or 'unnamed'}>"
    return str(model)


def require_regular_file(path: Path, kind: str = "an ONNX file") -> None:
    """Refuse what is not a regular file (a FIFO or device would block or never end) with a one-line error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OnnxlrpError(f"{path}: file not found") from None
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise OnnxlrpError(f"{path}: is a folder, not {kind}")
    if not stat.S_ISREG(mode):
        raise OnnxlrpError(f"{path}: not a regular file (a FIFO, socket or device), not {kind}")


def read_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or copy an in-memory model; raise OnnxlrpError if unreadable,
    if a tensor's data does not match its shape, or if the model was compiled by onnxlrp already."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        source = model_source(model)
    else:
        path = Path(model)
        source = str(path)
        proto = _parse(path)
        _load_external_data(proto, path)
    validate_tensors(proto, source)
    refuse_compiled(proto, source)
    return proto


def _parse(path: Path) -> onnx.ModelProto:
    """The model proto of ``path`` without its external data."""
    require_regular_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise OnnxlrpError(f"{path}: not an ONNX model (protobuf parse failed: {str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    if not proto.graph.node and not proto.graph.output:
        raise OnnxlrpError(f"{path}: not an ONNX model (no graph found)")
    key = _file_key(path)
    if key is not None:
        _EXTERNAL_LOCATIONS[key] = _external_locations(proto)
    return proto


#: The external data locations of each file parsed, by (path, inode, size, mtime): the CLI asks for a model's
#: data files after compiling it, and must not parse hundreds of MB a second time for that.
_EXTERNAL_LOCATIONS: dict[tuple, list[str]] = {}


def _file_key(path: Path) -> tuple | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns)


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in all_tensors(proto):
        for entry in tensor.external_data if external_data_helper.uses_external_data(tensor) else []:
            if entry.key == "location" and entry.value not in locations:
                locations.append(entry.value)
    return locations


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read the external data of every tensor; onnx refuses files outside the model's folder, absolute paths,
    symbolic links, non-regular files, and offsets or lengths beyond the file: one line naming the tensor."""
    for tensor in all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        except (onnx.checker.ValidationError, ValueError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            raise OnnxlrpError(f"{path}: external data of tensor {tensor.name!r} cannot be used: {why}") from None


def external_data_files(path: Path) -> list[Path]:
    """The files (beside ``path``) holding the external data of the model at ``path``; [] when unreadable.
    Known without reading when the file was parsed before and has not changed since."""
    locations = _EXTERNAL_LOCATIONS.get(_file_key(path))
    if locations is None:
        try:
            locations = _external_locations(_parse(path))
        except OnnxlrpError:
            return []
    return [path.parent / location for location in locations]


def model_files(path: Path) -> list[Path]:
    """The model file and its external data files: what an output must never overwrite."""
    return [Path(path), *external_data_files(Path(path))]


def all_tensors(model: onnx.ModelProto):
    """Every tensor of the model: initializers and tensor attributes, in subgraphs and functions too."""
    def of_nodes(nodes):
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    yield from of_graph(graph)

    def of_graph(graph):
        yield from graph.initializer
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)


def validate_tensors(model: onnx.ModelProto, source: str) -> None:
    """Every tensor's data must match its dims and type (else a later reshape fails deep in a pass)."""
    for tensor in all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            continue  # an in-memory model with external references: read where it is used
        expected = raw_data_size(tensor)
        if expected is not None and tensor.HasField("raw_data"):
            length = len(tensor.raw_data)
            if length == expected:
                continue
            first = f"{length} bytes of data for {expected}"
        else:
            try:
                numpy_helper.to_array(tensor)
                continue
            except Exception as exc:  # ValueError (size), TypeError/KeyError (data type)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(f"{source}: tensor {tensor.name!r} of shape {list(tensor.dims)} does not hold "
                           f"matching data ({first})")


def refuse_compiled(model: onnx.ModelProto, source: str) -> None:
    """A model compiled by onnxlrp already has relevance outputs and a `target` input: compiling it again would
    explain the explanation. Refuse it by name."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "onnxlrp.version" in meta:
        raise OnnxlrpError(f"{source}: is already an explaining model compiled by onnxlrp "
                           f"{meta['onnxlrp.version']} (composite {meta.get('onnxlrp.composite', '?')}); "
                           f"give the original model (to run this one: onnxruntime, or Explainer.from_compiled)")


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
    split = split_weights(model)  # the converter serialises what it is given: leave the weights out
    try:
        converted = version_converter.convert_version(split.light, TARGET_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(
            f"{source}: cannot upgrade opset {default_opset(model)} to {TARGET_OPSET}: {first}") from None
    return join_weights(model, converted, split.large, split.stubs, split.order)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape: the checker and shape
    inference then run in milliseconds instead of serialising hundreds of MB (small ones keep their data for
    data propagation of shape computations)."""
    graph = model.graph
    listed = {vi.name for vi in graph.input}
    small = [t for t in graph.initializer if not is_large(t)]
    large = [t for t in graph.initializer if is_large(t)]
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
