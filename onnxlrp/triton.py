"""`onnxlrp export-triton`: a Triton Inference Server model repository for the compiled model.

    REPO/<name>/config.pbtxt     onnxruntime backend; inputs (incl. target), outputs (incl. <input>_relevance)
    REPO/<name>/1/model.onnx     the compiled model

Batching: when every input and output has a dynamic first dimension, the model batches in Triton
(``max_batch_size`` > 0, dims without the batch axis, dynamic batching on); a per-sample scalar such as
``target`` ([N]) is declared ``dims: [1]`` with ``reshape: { shape: [] }``, so a client sends it as [N, 1].
A model with a fixed first dimension gets ``max_batch_size: 0`` and its full dims. Inputs that have a default
value (DeepLIFT's ``<input>_baseline``) are left out of the config: ONNX Runtime uses the default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from .errors import OnnxlrpError
from .save import write_file_atomically, write_model_atomically

#: ONNX element type -> Triton data type.
TRITON_TYPES = {
    TensorProto.BOOL: "TYPE_BOOL", TensorProto.UINT8: "TYPE_UINT8", TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32", TensorProto.UINT64: "TYPE_UINT64", TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16", TensorProto.INT32: "TYPE_INT32", TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16", TensorProto.FLOAT: "TYPE_FP32", TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.BFLOAT16: "TYPE_BF16", TensorProto.STRING: "TYPE_STRING",
}
DEFAULT_MAX_BATCH_SIZE = 16


@dataclass
class Tensor:
    """One config entry: name, Triton data type, dims (without the batch axis when batching), reshape."""

    name: str
    data_type: str
    dims: list[int]
    reshape: list[int] | None = None


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _batchable(values: list[onnx.ValueInfoProto]) -> bool:
    """Whether every tensor has a first dimension and it is dynamic (the batch)."""
    return all(_dims(v) and _dims(v)[0] is None for v in values)


def _entry(vi: onnx.ValueInfoProto, batching: bool, source: str) -> Tensor:
    elem = vi.type.tensor_type.elem_type
    if elem not in TRITON_TYPES:
        raise OnnxlrpError(f"{source}: {vi.name!r} has ONNX element type {TensorProto.DataType.Name(elem)}, "
                           f"which Triton does not support")
    dims = [-1 if d is None else d for d in _dims(vi)]
    if batching:
        dims = dims[1:]
        if not dims:  # a per-sample scalar, [N]: Triton needs at least one dim
            return Tensor(vi.name, TRITON_TYPES[elem], [1], [])
    return Tensor(vi.name, TRITON_TYPES[elem], dims)


def triton_tensors(model: onnx.ModelProto, source: str = "<model>",
                   max_batch_size: int | None = None) -> tuple[int, list[Tensor], list[Tensor]]:
    """(max_batch_size, inputs, outputs) of the Triton config for ``model``."""
    defaults = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in defaults]
    outputs = list(model.graph.output)
    batchable = _batchable(inputs + outputs)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
    if max_batch_size < 0:
        raise OnnxlrpError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    if max_batch_size > 0 and not batchable:
        fixed = [f"{v.name} {['N' if d is None else d for d in _dims(v)]}" for v in inputs + outputs
                 if not _dims(v) or _dims(v)[0] is not None]
        raise OnnxlrpError(f"{source}: Triton batching (--max-batch-size {max_batch_size}) needs a dynamic first "
                           f"dimension on every input and output; fixed: {', '.join(fixed)}. Use "
                           f"--max-batch-size 0 (the model's full shapes)")
    batching = max_batch_size > 0
    return (max_batch_size, [_entry(v, batching, source) for v in inputs],
            [_entry(v, batching, source) for v in outputs])


def config_text(name: str, max_batch_size: int, inputs: list[Tensor], outputs: list[Tensor]) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    def block(kind: str, tensors: list[Tensor]) -> list[str]:
        lines = [f"{kind} ["]
        for k, t in enumerate(tensors):
            lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}",
                      f"    dims: {_list(t.dims)}"]
            if t.reshape is not None:
                lines.append(f"    reshape: {{ shape: {_list(t.reshape)} }}")
            lines.append("  }," if k < len(tensors) - 1 else "  }")
        return lines + ["]"]

    lines = [f"name: {_quote(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]
    lines += block("input", inputs) + block("output", outputs)
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _list(values: list[int]) -> str:
    return f"[ {', '.join(str(v) for v in values)} ]" if values else "[ ]"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_name(path: Path) -> str:
    """A Triton model name from a file name: the stem, characters other than letters, digits, - and _ as _."""
    name = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "model"


def export_triton(compiled: onnx.ModelProto, repository: Path, name: str, source: str = "<model>",
                  max_batch_size: int | None = None, protected=()) -> list[Path]:
    """Write REPO/<name>/1/model.onnx and REPO/<name>/config.pbtxt; returns the files written."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise OnnxlrpError(f"--name {name!r}: use letters, digits, '.', '-' and '_' only")
    batch, inputs, outputs = triton_tensors(compiled, source, max_batch_size)
    text = config_text(name, batch, inputs, outputs)  # everything checked before anything is written
    version = Path(repository) / name / "1"
    try:
        version.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrpError(f"{version}: cannot create the model repository folder ({exc.strerror or exc})") \
            from None
    written = write_model_atomically(compiled, version / "model.onnx", protected)
    config = version.parent / "config.pbtxt"
    write_file_atomically(config, lambda handle: handle.write(text.encode()))
    return written + [config]
