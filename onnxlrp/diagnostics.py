"""Warnings about a compiled model's trustworthiness that are not errors: rules applied where their numbers can blow
up. Each finding is one line; compile records them in the metadata (``onnxlrp.warnings``), the CLI prints them on
stderr, the Python API issues an OnnxlrpWarning."""
from __future__ import annotations

import warnings

from .graph import GraphView

#: Categories whose nodes map their one activation input linearly (affine): parallel branches made of them alone
#: are one linear layer in disguise.
LINEAR_CATEGORIES = {"conv", "dense", "affine", "routing", "pool"}


class OnnxlrpWarning(UserWarning):
    """A compiled model whose relevance may be unreliable (see the message)."""


def cancelling_sums(view: GraphView, path: list[int], rules: dict[int, str | None],
                    categories: dict[int, str | None]) -> list[str]:
    """Sums under the norm rule whose summands are parallel linear branches of one tensor.

    Before: x -> Conv3x3 -> BN -+
            x -> Conv1x1 -> BN -+-> Add (norm)        (RepVGG's training form)
            x ------------> BN -+
    The three branches are one linear map of x, but the norm rule splits relevance by each branch's contribution:
    where the contributions nearly cancel, |sum| << sum of |contributions|, the shares are huge and of opposite
    signs, and the different rules of the branches upstream no longer cancel them. Fusing the branches into one
    layer first avoids it."""
    sources: dict[str, frozenset[str]] = {}  # activation -> tensors it is a linear function of (at this node)

    def origin(name: str) -> frozenset[str]:
        return sources.get(name, frozenset([name]))

    found = []
    for i in path:
        node, category = view.nodes[i], categories.get(i)
        inputs = [node.input[k] for k in view.activation_inputs(i)]
        if category in LINEAR_CATEGORIES and len(inputs) == 1:
            for out in node.output:
                sources[out] = origin(inputs[0])
        elif category == "sum" and len(inputs) >= 2:
            for out in node.output:
                sources[out] = frozenset().union(*(origin(x) for x in inputs))
            if rules.get(i) == "norm":
                shared = _shared_source(view, inputs, origin)
                if shared:
                    source, branches = shared
                    found.append(
                        f"{view.node_name(i)} ({node.op_type}, norm rule) sums parallel linear branches of "
                        f"{source!r} ({', '.join(branches)}); where they cancel, the norm rule's shares explode "
                        f"(relevance far beyond the score): fuse them into one layer before compiling (RepVGG: "
                        f"reparameterise), and run --check")
    return found


def _shared_source(view: GraphView, summands: list[str], origin) -> tuple[str, list[str]] | None:
    """A tensor that two or more summands are linear functions of, and the nodes producing those summands."""
    for source in sorted(frozenset().union(*(origin(s) for s in summands))):
        branches = [s for s in summands if source in origin(s)]
        if len(branches) >= 2:
            return source, [view.node_name(view.producer[s][0]) if s in view.producer else s for s in branches]
    return None


def warn(messages: list[str], source: str) -> None:
    """Issue each finding as an OnnxlrpWarning naming the model."""
    for message in messages:
        warnings.warn(f"{source}: {message}", OnnxlrpWarning, stacklevel=3)


_default_showwarning = warnings.showwarning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """For the CLI: an OnnxlrpWarning as one line `onnxlrp: warning: ...` on stderr; others as Python shows them."""
    if issubclass(category, OnnxlrpWarning):
        import sys
        print(f"onnxlrp: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)
