"""Writing compiled models: atomically, so that a failure never leaves a partial file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import OnnxlrpError


def write_model_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a failure never leaves a partial file."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxlrpError(f"{path}: output folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot write the compiled model ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
