"""What is explained: the output (skl2onnx's label first, ZipMap, softmax looked through), the target inputs
(`target` with its default, or `target_mask`), and the default composite for the model's kind of input."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import FLOAT_TYPES, GraphView

TARGET_INPUT = "target"
TARGET_MASK_INPUT = "target_mask"


def scores_tensor(view: GraphView, output: str, twins: dict[str, str] | None) -> str:
    """The tensor explained for an output: its pre-activation, in the float twin when there is one (quantized
    and sklearn models)."""
    tensor = _pre_activation(view, output)
    if twins:
        tensor = _pre_activation(view, twins.get(tensor, tensor))
    return tensor


def _pre_activation(view: GraphView, tensor: str) -> str:
    """The scores an output is computed from: look through a final Softmax / LogSoftmax, and through what
    skl2onnx puts after a classifier's scores (ZipMap's seq(map), Cast to float, the L1 Normalizer of the
    probabilities, the binary [1 - sigmoid(z), sigmoid(z)] Concat: its logit z)."""
    while tensor in view.producer:
        node = view.nodes[view.producer[tensor][0]]
        if node.op_type in ("Softmax", "LogSoftmax", "ZipMap") or (node.op_type == "Normalizer"
                                                                  and node.domain == "ai.onnx.ml"):
            tensor = node.input[0]
        elif node.op_type == "Cast" and view.info.get(node.input[0]) is not None \
                and view.info[node.input[0]].elem_type in FLOAT_TYPES:
            tensor = node.input[0]
        elif node.op_type == "Concat" and len(node.input) == 2 and node.input[1] in view.producer \
                and view.nodes[view.producer[node.input[1]][0]].op_type == "Sigmoid" \
                and node.input[0] in view.producer and view.nodes[view.producer[node.input[0]][0]].op_type == "Sub" \
                and view.nodes[view.producer[node.input[0]][0]].input[1] == node.input[1]:
            tensor = view.nodes[view.producer[node.input[1]][0]].input[0]
        else:
            break
    return tensor


def _single_score(view: GraphView, output: str) -> bool:
    """Whether the output holds one score per sample (a regression): static non-batch dimensions of product 1."""
    vi = next((o for o in view.model.graph.output if o.name == output), None)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim] if vi else []
    rest = dims[1:]
    return all(d is not None for d in rest) and int(np.prod(rest)) == 1 if dims else False


IMAGE_COMPOSITE, TABULAR_COMPOSITE = "epsilon_plus_flat", "epsilon_plus"


def default_composite(view: GraphView) -> tuple[str, str]:
    """(composite, why) when the user chose none: epsilon_plus_flat (Zennit's recommendation for images) when a
    floating-point input has spatial axes (rank >= 3), else epsilon_plus: on tabular [N, features] inputs the flat
    first layer would give every feature the same relevance; epsilon_plus differs only there (no flat first layer:
    epsilon on dense layers, z+ on convolutions)."""
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in view.float_inputs}
    if not ranks or any(r >= 3 for r in ranks.values()):
        return IMAGE_COMPOSITE, "default for inputs with spatial axes"
    listed = ", ".join(f"{n!r} (rank {r})" for n, r in ranks.items())
    return TABULAR_COMPOSITE, (f"default for non-image input {listed}: a flat first layer would make every "
                               f"feature equally relevant")


def set_target_inputs(graph: onnx.GraphProto, view: GraphView, explained_output: str, mask: bool,
                      name: str = TARGET_INPUT, portable: bool = False) -> None:
    """For a regression output (one score per sample) ``target`` (the compiled model's name for it: ``name``)
    gets a default of [-1] (its own batch dimension, so [1] or [N] both fit; not in the portable form), so callers
    may leave it out; or ``target`` is replaced by ``target_mask`` (``name``): the explained output's type and
    shape (unknown dimensions named)."""
    index = next(k for k, vi in enumerate(graph.input) if vi.name == name)
    if not mask:
        if not _single_score(view, explained_output) or portable:
            return  # a classifier's caller says which class; an initializer that is also an input makes ONNX
            #         Runtime warn on load, which the portable form must not
        graph.input[index].type.tensor_type.shape.dim[0].Clear()
        graph.input[index].type.tensor_type.shape.dim[0].dim_param = "target_batch"
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name))
        return
    out = next(o for o in view.model.graph.output if o.name == explained_output)
    mask = onnx.ValueInfoProto()
    mask.CopyFrom(out)
    mask.name = name
    for k, dim in enumerate(mask.type.tensor_type.shape.dim):
        if not dim.HasField("dim_value") and not dim.dim_param:
            dim.dim_param = f"mask_dim{k}"
    del graph.input[index]
    graph.input.append(mask)
