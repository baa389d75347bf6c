"""Inputs for `onnxlrp explain`: image files (PNG/JPEG via Pillow), folders of them, or .npy arrays already
shaped for the model; turned into the model's layout, size and normalisation."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from .errors import OnnxlrpError
from .load import require_regular_file

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
    meta = {p.key: p.value for p in model.metadata_props}
    target = meta.get("onnxlrp.target_input", "target") if "onnxlrp.version" in meta else None  # a compiled model
    inputs = [vi for vi in model.graph.input if vi.name not in weights and vi.name != target]
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
    """Files as given, folders replaced by their image and .npy files (sorted; not recursive; subfolders skipped),
    each file once. Special files (FIFOs, devices) stay in the list: load_input refuses them by name."""
    files, seen = [], set()
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"} and not p.is_dir())
        else:
            found = [path]
        for file in found:
            key = os.path.realpath(file)
            if key not in seen:
                seen.add(key)
                files.append(file)
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


def read_array(path: Path) -> np.ndarray:
    """A numeric array from a .npy file (memory-mapped until it is known to fit): never unpickles; refuses .npz
    archives, and structured, string, object and complex arrays, with one line each."""
    require_regular_file(path, "a .npy array")
    try:
        try:
            loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc) or "Object arrays" in str(exc):
                raise
            loaded = np.load(path, allow_pickle=False)  # e.g. an empty array cannot be mapped
    except Exception as exc:  # ValueError (pickled, bad header), OSError, EOFError, SyntaxError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(f"{path}: cannot read the array ({first})") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise OnnxlrpError(f"{path}: is an .npz archive, not a .npy array; save one array with np.save")
    if loaded.dtype.kind not in "biuf":
        raise OnnxlrpError(f"{path}: array of dtype {loaded.dtype} is not numeric (give int, float or bool values)")
    return loaded


RESIZE_MODES = ("crop", "squash", "pad")


def zbox_bounds(normalize: str, channels: int | None = None) -> tuple[float | list[float], float | list[float]]:
    """The lowest and highest model input values that images scaled by ``normalize`` can take, as ZBox wants
    them: unit (0, 1); none (0, 255); imagenet or MEAN,STD one value per channel, (0 - mean) / std and
    (1 - mean) / std (a grey model: the channel means' average, as load_input uses)."""
    mode, stats = parse_normalize(normalize)
    if mode == "none":
        return 0.0, 255.0
    if stats is None:
        return 0.0, 1.0
    mean, std = (np.array(s, dtype=np.float64) for s in stats)
    if channels == 1 and mean.size > 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    low, high = ((bound - mean) / std for bound in (0.0, 1.0))
    if low.size == 1:
        return float(low[0]), float(high[0])
    return [float(v) for v in low], [float(v) for v in high]


def fit_image(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """Bring an image to width x height: ``crop`` scales the shorter side to fit and centre-crops (torchvision's
    Resize + CenterCrop, timm's default), ``squash`` resizes both sides (aspect ratio lost), ``pad`` scales the
    longer side to fit and pads with black, centred (letterbox)."""
    if mode not in RESIZE_MODES:
        raise OnnxlrpError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if image.size == (width, height):
        return image
    if mode == "squash":
        return image.resize((width, height), Image.BILINEAR)
    w, h = image.size
    scale = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = image.resize(new, Image.BILINEAR)
    if mode == "crop":
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, ((width - new[0]) // 2, (height - new[1]) // 2))
    return canvas


def load_input(path: Path, spec: InputSpec, normalize: str,
               resize: str = "crop") -> tuple[np.ndarray, np.ndarray | None]:
    """(model-ready array without batch axis, display image in [0, 1] or None); OnnxlrpError on failure."""
    expected = [d for d in spec.shape[1:]]
    require_regular_file(path, "an image or .npy file")
    if path.suffix.lower() == ".npy":
        array = read_array(path)
        if array.ndim == len(spec.shape):
            if array.shape[0] != 1:
                raise OnnxlrpError(f"{path}: holds a batch of {array.shape[0]}; give one sample per file")
            array = array[0]
        if any(e is not None and e != a for e, a in zip(expected, array.shape)) or array.ndim != len(expected):
            raise OnnxlrpError(f"{path}: array of shape {list(array.shape)} does not fit the model input "
                               f"{spec.name!r} of shape {['N'] + [e if e is not None else '?' for e in expected]}")
        array = np.array(array, dtype=spec.dtype)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise OnnxlrpError(f"{path}: the array holds NaN or infinite values")
        return array, None
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # above 2x the limit it raises
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                image = fit_image(image, width, height, resize)
                pixels = np.asarray(image, dtype=np.float32)
    except FileNotFoundError:
        raise OnnxlrpError(f"{path}: file not found") from None
    except OnnxlrpError:
        raise
    except Exception as exc:  # decoders raise many types on damaged files (OSError, SyntaxError, struct.error,
        #                       DecompressionBombError, ...): any of them means this file cannot be used
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(f"{path}: cannot decode the image ({first})") from None
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


def load_inputs(paths, model, size: tuple[int, int] | None = None, normalize: str = "unit",
                resize: str = "crop") -> tuple[np.ndarray, list[Path]]:
    """Load images (PNG/JPEG/...), folders of them, or .npy arrays as one batch for ``model``, exactly as
    ``onnxlrp explain`` does.

    paths: a path or a list of paths (folders are expanded to their images and .npy files, sorted).
    model: the ONNX model (path or ModelProto, original or compiled) whose first input the batch is for.
    size: (height, width) when the model's are dynamic. normalize: ``unit`` ([0, 1]), ``imagenet``, ``none``
    (0..255) or ``"MEAN,STD"``. resize: ``crop`` (shorter side + centre crop), ``squash`` or ``pad``.
    Returns (batch as a numpy array shaped and typed like the model input, e.g. float32 [N, C, H, W];
    the list of files in batch order). Raises OnnxlrpError on the first file that cannot be used.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = expand_inputs([Path(p) for p in paths])
    if not files:
        raise OnnxlrpError("no input files (give images, .npy arrays, or folders of them)")
    if not isinstance(model, onnx.ModelProto):
        require_regular_file(Path(model))  # a FIFO would block
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        raise OnnxlrpError(f"{model}: cannot read the model ({str(exc).strip().splitlines()[0]})") from None
    spec = input_spec(proto, size)
    parse_normalize(normalize)
    arrays = [load_input(path, spec, normalize, resize)[0] for path in files]
    return np.stack(arrays), files
