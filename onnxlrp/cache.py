"""A disk cache of compiled models, keyed by the model's content, the onnxlrp version and the options, so that
`onnxlrp explain` compiles a model once. Location: $ONNXLRP_CACHE_DIR, else ~/.cache/onnxlrp."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from . import __version__
from .errors import OnnxlrpError
from .save import write_model_atomically


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXLRP_CACHE_DIR") or Path.home() / ".cache" / "onnxlrp")


def cache_key(model_path: Path, composite: str, options: dict) -> str:
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps({"version": __version__, "composite": composite, **options}, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()[:32]


def compile_cached(model_path: Path, composite: str, **options) -> tuple[onnx.ModelProto, bool]:
    """(compiled model, whether it came from the cache)."""
    from .compile import compile_model
    path = cache_dir() / f"{cache_key(model_path, composite, options)}.lrp.onnx"
    if path.exists():
        try:
            return onnx.load(str(path)), True
        except Exception:
            path.unlink(missing_ok=True)  # a damaged entry: compile again
    compiled = compile_model(model_path, composite, **options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model_atomically(compiled, path)
    except (OSError, OnnxlrpError):
        pass  # an unwritable cache only costs time
    return compiled, False
