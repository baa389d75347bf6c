"""Graph passes without the weights: a pass that only needs the graph (onnx's version converter, ...) runs on a
light copy whose large initializers are typed graph inputs, and the model then takes the pass's result while
keeping its own weight tensors in place. Copying or serialising hundreds of MB of weights costs seconds per pass
(VGG-16: 528 MB); this way each weight is read once, when the model is loaded.

    model (graph + weights) --split_weights--> light (graph + small initializers + stub inputs)
    light --pass--> light'      model <--join_weights-- light' (model: light's graph, its own large weights)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

#: Initializers with more elements than this stay out of light copies (small ones keep their data, for data
#: propagation of shape computations and constant folding).
LARGE_INITIALIZER = 1024


def is_large(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor has more than LARGE_INITIALIZER elements."""
    return int(np.prod(tensor.dims, dtype=np.int64)) > LARGE_INITIALIZER


@dataclass(frozen=True)
class Split:
    """A light copy of a model and what it left out: ``large`` initializers, of which ``stubs`` were added as
    graph inputs (the others were listed as inputs already)."""

    light: onnx.ModelProto
    large: frozenset[str]
    stubs: frozenset[str]
    order: tuple[str, ...]  # the model's initializers, in order


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of ``source`` except ``skip`` into ``target`` (fields it has already are replaced,
    repeated ones appended)."""
    for field in source.DESCRIPTOR.fields:  # not ListFields: it would read the skipped field (a copy of bytes)
        if field.name == skip:
            continue
        if _repeated(field):
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def _repeated(field: FieldDescriptor) -> bool:
    """protobuf >= 5.29 spells it is_repeated (label is deprecated there)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


def split_weights(model: onnx.ModelProto) -> Split:
    """A copy of ``model`` (every field) whose large initializers are replaced by graph inputs of their type and
    shape; no weight data is copied."""
    light = onnx.ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    listed = {vi.name for vi in model.graph.input}
    large, stubs = set(), set()
    for tensor in model.graph.initializer:
        if not is_large(tensor):
            light.graph.initializer.append(tensor)
            continue
        large.add(tensor.name)
        if tensor.name not in listed:
            stubs.add(tensor.name)
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    return Split(light, frozenset(large), frozenset(stubs), tuple(t.name for t in model.graph.initializer))


def join_weights(model: onnx.ModelProto, light: onnx.ModelProto, keep: frozenset[str] | set[str],
                 stubs: frozenset[str] | set[str] = frozenset(), order: tuple[str, ...] | None = None
                 ) -> onnx.ModelProto:
    """Make ``model`` (in place) equal to ``light`` plus its own initializers named in ``keep`` (not copied):
    every other field, graph fields included, is light's; light's graph inputs named in ``stubs`` are dropped,
    and its initializers named in ``keep`` are placeholders that the kept tensors replace. The initializers are
    ordered as light's (placeholders mark the kept tensors' places) or, given ``order`` (the names in the
    model's order before the pass), in that order, light's new ones last."""
    graph = model.graph
    reference = list(order) if order is not None else []
    reference += [t.name for t in light.graph.initializer]
    position = {}
    for index, name in enumerate(reference):
        position.setdefault(name, index)
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in keep:
            del graph.initializer[index]
    for field in onnx.ModelProto.DESCRIPTOR.fields:
        if field.name != "graph":
            model.ClearField(field.name)
    copy_fields(light, model, skip="graph")
    for field in onnx.GraphProto.DESCRIPTOR.fields:
        if field.name != "initializer":
            graph.ClearField(field.name)
    copy_fields(light.graph, graph, skip="initializer")
    if stubs:
        inputs = [vi for vi in graph.input if vi.name not in stubs]
        if len(inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(inputs)
    graph.initializer.extend(t for t in light.graph.initializer if t.name not in keep)
    graph.initializer.sort(key=lambda t: position.get(t.name, len(position)))  # moves references, not data
    return model


def without_data(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a tensor without its raw data (a placeholder: name, type, dims and the rest)."""
    header = onnx.TensorProto()
    copy_fields(tensor, header, skip="raw_data")
    return header


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(size: int) -> int:
    """Bytes a length-delimited field of ``size`` bytes takes (field numbers below 16: a one-byte tag)."""
    return 1 + _varint_size(size) + size


def raw_data_size(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data that a tensor's dims and type call for (None: sub-byte, string or unknown types)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception:
        return None
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if dtype.kind in "OSU" or name.endswith(("INT4", "INT2", "FLOAT4E2M1")):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` without serialising the weights (ByteSize encodes the whole model: seconds for
    hundreds of MB): the raw data of large initializers counts by their dims and type, which validated tensors
    match (load.validate_tensors)."""
    graph = model.graph
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    light_graph = onnx.GraphProto()
    copy_fields(graph, light_graph, skip="initializer")
    graph_size = light_graph.ByteSize()
    for tensor in graph.initializer:
        raw = raw_data_size(tensor) if is_large(tensor) and tensor.HasField("raw_data") else None
        if raw is None:
            graph_size += _field_size(tensor.ByteSize())
            continue
        graph_size += _field_size(without_data(tensor).ByteSize() + _field_size(raw))
    return skeleton.ByteSize() + (_field_size(graph_size) if model.HasField("graph") else 0)
