"""onnxlrp: compile any ONNX model into an ONNX model that also explains its predictions with LRP."""
from __future__ import annotations

__version__ = "0.1.0"

from .compile import compile_model  # noqa: E402
from .errors import OnnxlrpError, UnsupportedError  # noqa: E402
from .inputs import load_inputs  # noqa: E402
from .render import render_heatmap  # noqa: E402
from .runtime import Explainer  # noqa: E402
from .ort_install import warn_if_conflicting  # noqa: E402

warn_if_conflicting()  # two ONNX Runtime builds overwrite each other's module: one line with the fix

__all__ = ["Explainer", "OnnxlrpError", "UnsupportedError", "compile_model", "load_inputs", "render_heatmap",
           "__version__"]
