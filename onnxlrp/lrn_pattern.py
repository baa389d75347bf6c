"""Recognise PyTorch's decomposed LocalResponseNorm and rewrite it into one LRN op (onnxscript pattern rules)."""
from __future__ import annotations


def lrn_rules() -> list:
    """Rewrite rules for the decomposed LRN patterns of both torch exporters."""
    return []
