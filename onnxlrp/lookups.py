"""Token-id inputs of text models: which embedding lookup turns the ids into activations.

A text model's input is integer token ids; relevance cannot flow into integers, so the leaf of the relevance path
is the output of the word-embedding lookup, ``Gather(W[vocab, hidden], ids)``, and the model's ``<ids>_relevance``
is the per-token sum of the relevance there. Other integer inputs (attention mask, token types / segments, position
ids) get no relevance: their lookups are constants for the rules (an Add of such a constant keeps its share).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

if TYPE_CHECKING:
    from .graph import GraphView

INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8,
                 TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
#: Integer-to-integer ops an exporter may put between the ids input and the lookup.
PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
#: Input names that say "not the token ids": never chosen (their lookups stay constants).
NOT_IDS = re.compile(r"mask|type|segment|position|pos_ids", re.IGNORECASE)


@dataclass(frozen=True)
class TokenLookup:
    """One embedding lookup: ``output = Gather(weight[vocab, hidden], input)`` (through integer casts/reshapes)."""

    input: str
    node: int
    output: str
    weight: str
    vocab: int
    hidden: int

    def describe(self, view: GraphView) -> str:
        return (f"{view.node_name(self.node)} (Gather of {self.weight!r} [{self.vocab}, {self.hidden}] "
                f"by {self.input!r})")


def find_lookups(view: GraphView, integer_inputs: list[str]) -> list[TokenLookup]:
    """Every Gather (axis 0) of a rank-2 float constant indexed by one of ``integer_inputs``."""
    found = []
    for name in integer_inputs:
        for index in _integer_readers(view, name):
            node = view.nodes[index]
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] == node.input[1]:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            weight = view.constant_value(node.input[0])
            if axis != 0 or weight is None or np.ndim(weight) != 2 or \
                    not np.issubdtype(np.asarray(weight).dtype, np.floating):
                continue
            vocab, hidden = np.shape(weight)
            found.append(TokenLookup(name, index, node.output[0], node.input[0], int(vocab), int(hidden)))
    return found


def _integer_readers(view: GraphView, name: str) -> list[int]:
    """Nodes that read ``name`` directly or through integer-only reshapes and casts; their indices."""
    readers, frontier = [], [name]
    while frontier:
        tensor = frontier.pop()
        for index in view.consumers.get(tensor, []):
            node = view.nodes[index]
            cast_to = next((a.i for a in node.attribute if a.name == "to"), None)
            if node.op_type in PASS_THROUGH and node.input[0] == tensor and cast_to in (None, *INTEGER_TYPES):
                frontier.append(node.output[0])
            elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                readers.append(index)
    return readers


def choose_ids_input(lookups: list[TokenLookup]) -> str | None:
    """The token-ids input among those feeding lookups: names of masks, token types and positions are ruled out;
    then the one with the largest vocabulary (the first input on a tie)."""
    names = list(dict.fromkeys(lookup.input for lookup in lookups))
    plausible = [n for n in names if not NOT_IDS.search(n)]
    if not plausible:
        return None
    vocab = {n: max(lookup.vocab for lookup in lookups if lookup.input == n) for n in plausible}
    return max(plausible, key=lambda n: (vocab[n], -plausible.index(n)))
