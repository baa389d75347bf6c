"""Class names for `onnxlrp explain`: from a text file (one name a line) or from the model's metadata."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import onnx

from .errors import OnnxlrpError

#: Metadata keys read for class names, in this order: onnxlrp's own, then keys common exporters write
#: (Ultralytics: ``names``; Hugging Face configs copied into metadata: ``id2label``; others: labels/classes).
LABEL_KEYS = ("onnxlrp.labels", "labels", "class_names", "classes", "names", "id2label")


def read_labels_file(path: Path) -> list[str]:
    """One class name per line (line k = class k; blank lines at the end ignored)."""
    if not Path(path).is_file():  # missing, a folder, or a FIFO (which would block)
        why = "not found" if not Path(path).exists() else "not a regular file"
        raise OnnxlrpError(f"{path}: cannot read the labels file ({why})")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxlrpError(f"{path}: cannot read the labels file ({getattr(exc, 'strerror', None) or exc})") \
            from None
    names = [line.strip() for line in text.rstrip("\n").splitlines()]
    if not any(names):
        raise OnnxlrpError(f"{path}: the labels file is empty (expected one class name per line)")
    return names


def parse_labels(text: str) -> list[str] | None:
    """Class names from a metadata value: a JSON or Python list, a {index: name} mapping, or one name a line."""
    text = text.strip()
    value = None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict):
        try:
            indexed = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if not indexed or min(indexed) < 0:
            return None
        return [indexed.get(k, str(k)) for k in range(max(indexed) + 1)]
    if value is None and "\n" in text:
        return [line.strip() for line in text.splitlines()]
    return None


def model_labels(model: onnx.ModelProto) -> list[str] | None:
    """Class names stored in the model's metadata under one of LABEL_KEYS, or None."""
    meta = {p.key: p.value for p in model.metadata_props}
    for key in LABEL_KEYS:
        if key in meta:
            names = parse_labels(meta[key])
            if names:
                return names
    return None


def class_name(labels: list[str] | None, index: int) -> str | None:
    """The name of class ``index``, or None without labels (or beyond their end)."""
    if labels is None or not 0 <= index < len(labels):
        return None
    return labels[index] or None
