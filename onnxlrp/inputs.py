"""Inputs for `onnxlrp explain`: image files (PNG/JPEG via Pillow), folders of them, or .npy arrays already
shaped for the model; turned into the model's layout, size and normalisation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, UnidentifiedImageError

from .errors import OnnxlrpError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass
class InputSpec:
    """What the model's (single) image input looks like."""

    name: str
    shape: list[int | None]  # full shape, batch first
    dtype: np.dtype
    channels_last: bool

    @property
    def channels(self) -> int | None:
        return self.shape[3] if self.channels_last else self.shape[1]

    @property
    def size(self) -> tuple[int | None, int | None]:
        return (self.shape[1], self.shape[2]) if self.channels_last else (self.shape[2], self.shape[3])


def input_spec(model: onnx.ModelProto, size: tuple[int, int] | None = None) -> InputSpec:
    """The model's image input (the first non-weight input), with --size filling dynamic height/width."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in weights and vi.name != "target"]
    if not inputs:
        raise OnnxlrpError("the model has no input")
    vi = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if len(dims) != 4:
        return InputSpec(vi.name, dims, dtype, False)
    channels_last = dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)
    if size is not None:
        if channels_last:
            dims[1], dims[2] = size
        else:
            dims[2], dims[3] = size
    return InputSpec(vi.name, dims, dtype, channels_last)


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, folders replaced by their image and .npy files (sorted)."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
        else:
            files.append(path)
    return files


def parse_normalize(text: str) -> tuple[str, tuple[list[float], list[float]] | None]:
    """imagenet | unit | none | MEAN,STD (applied after scaling pixels to [0, 1])."""
    if text in ("imagenet", "unit", "none"):
        return text, IMAGENET if text == "imagenet" else None
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise OnnxlrpError(f"--normalize must be imagenet, unit, none or MEAN,STD, got {text!r}") from None
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise OnnxlrpError(f"--normalize: MEAN and STD must be finite numbers, got {text!r}")
    if std <= 0:
        raise OnnxlrpError(f"--normalize: STD must be positive, got {std:g}")
    return "custom", ([mean], [std])


def load_input(path: Path, spec: InputSpec, normalize: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(model-ready array without batch axis, display image in [0, 1] or None); OnnxlrpError on failure."""
    expected = [d for d in spec.shape[1:]]
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path)
        except (OSError, ValueError) as exc:
            raise OnnxlrpError(f"{path}: cannot read the array ({exc})") from None
        if array.ndim == len(spec.shape):
            if array.shape[0] != 1:
                raise OnnxlrpError(f"{path}: holds a batch of {array.shape[0]}; give one sample per file")
            array = array[0]
        if any(e is not None and e != a for e, a in zip(expected, array.shape)) or array.ndim != len(expected):
            raise OnnxlrpError(f"{path}: array of shape {list(array.shape)} does not fit the model input "
                               f"{spec.name!r} of shape {['N'] + [e if e is not None else '?' for e in expected]}")
        return array.astype(spec.dtype), None
    if len(spec.shape) != 4:
        raise OnnxlrpError(f"{path}: the model input {spec.name!r} has shape {spec.shape}, not an image")
    channels = spec.channels
    if channels not in (1, 3):
        raise OnnxlrpError(f"{path}: the model input {spec.name!r} of shape {spec.shape} expects {channels} "
                           f"channels; images give 1 (grey) or 3 (RGB)")
    height, width = spec.size
    if height is None or width is None:
        raise OnnxlrpError(f"{path}: the model input {spec.name!r} has a dynamic size {spec.shape}; give --size H W")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except FileNotFoundError:
        raise OnnxlrpError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise OnnxlrpError(f"{path}: cannot decode the image ({str(exc).splitlines()[0]})") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # H, W, C
    display = pixels / 255.0
    mode, stats = parse_normalize(normalize)
    values = pixels if mode == "none" else pixels / 255.0
    if stats is not None:
        mean, std = (np.array(s, dtype=np.float32) for s in stats)
        if channels == 1 and mean.size == 3:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        values = (values - mean) / std
    array = values if spec.channels_last else values.transpose(2, 0, 1)
    return array.astype(spec.dtype), display
