"""Fallback for shapes that onnx's static inference cannot determine (e.g. a Reshape whose target is computed
from the dynamic batch): run the model twice on random inputs, batch 1 and batch 2, and read the shapes of the
intermediate tensors. Dimensions that change with the batch stay dynamic."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import FLOAT_TYPES, GraphView


def probe_shapes(view: GraphView, names: list[str]) -> dict[str, list[int | None]]:
    """Shapes of ``names`` from two ORT runs; {} if the inputs' non-batch dimensions are not static."""
    import onnxruntime as ort
    model = onnx.ModelProto()
    model.CopyFrom(view.model)
    model.ir_version = min(model.ir_version, 10)  # onnx >= 1.20 writes IR versions ORT refuses
    typed = [n for n in names if view.info.get(n) and view.info[n].elem_type]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(n, view.info[n].elem_type, None) for n in typed)
    inputs = [vi for vi in model.graph.input if vi.name not in view.initializers]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return {}
    runs = []
    rng = np.random.default_rng(0)
    for batch in (1, 2):
        feeds = {}
        for vi in inputs:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            if not dims or any(d is None for d in dims[1:]):
                return {}
            shape = [batch] + dims[1:]
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feeds[vi.name] = (rng.standard_normal(shape) if vi.type.tensor_type.elem_type in FLOAT_TYPES
                              else np.zeros(shape)).astype(dtype)
        try:
            runs.append(session.run(typed, feeds))
        except Exception:
            return {}
    return {n: [a if a == b else None for a, b in zip(x.shape, y.shape)] if x.ndim == y.ndim else None
            for n, x, y in zip(typed, runs[0], runs[1])}
