"""The one exception type users see: a one-line message naming the file, node and op where possible."""
from __future__ import annotations


class OnnxlrpError(Exception):
    """A problem with the user's model, options or inputs (the CLI prints it on one line and exits with 2)."""


class UnsupportedError(OnnxlrpError):
    """Nodes on the relevance path that no rule template covers; lists every one of them."""

    def __init__(self, source: str, nodes: list[tuple[str, str, str]]):
        self.nodes = nodes
        listed = ", ".join(f"{name} ({op}{': ' + why if why else ''})" for name, op, why in nodes)
        super().__init__(f"{source}: {len(nodes)} unsupported node(s) on the relevance path: {listed}")
