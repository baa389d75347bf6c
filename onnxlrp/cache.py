"""A disk cache of compiled models, keyed by the content of every file the model reads (the .onnx file and its
external data files), the onnxlrp version and the options, so that `onnxlrp explain` compiles a model once.
Location: $ONNXLRP_CACHE_DIR, else ~/.cache/onnxlrp.

Each entry is ``<key>.lrp.onnx`` and ``<key>.sha256`` (the entry's own digest, written after it): an entry that is
empty, truncated or otherwise damaged no longer matches its digest and is compiled again and replaced, atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from . import __version__
from .errors import OnnxlrpError
from .load import external_data_files, require_regular_file
from . import save
from .save import write_file_atomically
from .weights import serialized_size
from .user_rules import user_files


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXLRP_CACHE_DIR") or Path.home() / ".cache" / "onnxlrp")


def _file_digest(path: Path, digest) -> None:
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot read ({exc.strerror or exc})") from None


def cache_key(model_path: Path, composite: str, options: dict) -> str:
    """sha256 over the model file, each of its external data files (name and content), the version and options."""
    require_regular_file(model_path)
    digest = hashlib.sha256()
    _file_digest(model_path, digest)
    for data in external_data_files(model_path):
        digest.update(f"\0external data {data.name}\0".encode())
        if data.is_file():
            _file_digest(data, digest)
    digest.update(json.dumps({"version": __version__, "composite": composite, **options}, sort_keys=True,
                             default=str).encode())
    for name, text in user_files(composite, options.get("rules")):  # a composite file, --rules folders
        digest.update(f"\0user file {name}\0{text}".encode())
    return digest.hexdigest()[:32]


def _read_entry(path: Path) -> onnx.ModelProto | None:
    """The cached model, or None when the entry is missing, empty, damaged or not onnxlrp's."""
    check = path.with_suffix("").with_suffix(".sha256")
    if not (path.is_file() and check.is_file()):  # missing, or not a regular file (never block on a FIFO)
        return None
    try:
        content = path.read_bytes()
        expected = check.read_text().strip()
    except OSError:
        return None
    if not content or hashlib.sha256(content).hexdigest() != expected:
        return None
    try:
        model = onnx.load_from_string(content)
    except (DecodeError, ValueError, RuntimeWarning):
        return None
    if not any(p.key == "onnxlrp.version" for p in model.metadata_props):
        return None
    return model


def _write_entry(model: onnx.ModelProto, path: Path) -> None:
    """Write the model, then its digest; an unwritable cache only costs time. Models too large for one
    protobuf message are not cached."""
    if serialized_size(model) > save.EXTERNAL_DATA_THRESHOLD:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        content = model.SerializeToString()
        write_file_atomically(path, lambda handle: handle.write(content))
        digest = hashlib.sha256(content).hexdigest()
        write_file_atomically(path.with_suffix("").with_suffix(".sha256"), lambda h: h.write(digest.encode()))
    except (OSError, OnnxlrpError, ValueError):
        pass


def compile_cached(model_path: Path, composite: str, **options) -> tuple[onnx.ModelProto, bool]:
    """(compiled model, whether it came from the cache)."""
    from .compile import compile_model
    path = cache_dir() / f"{cache_key(model_path, composite, options)}.lrp.onnx"
    cached = _read_entry(path)
    if cached is not None:
        return cached, True
    compiled = compile_model(model_path, composite, **options)
    _write_entry(compiled, path)
    return compiled, False

