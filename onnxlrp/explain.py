"""`onnxlrp explain`: images or arrays in, heatmaps, raw relevance and one line per input out."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import compile_cached
from .errors import OnnxlrpError
from .load import require_regular_file
from .outputs import OutputFolder, output_stems
from .inputs import RESIZE_MODES, expand_inputs, input_spec, load_input, parse_normalize, zbox_bounds
from .labels import class_name, model_labels
from .render import colormap, relevance_map, render_heatmap, shared_scale
from .runtime import Explainer


@dataclass
class ExplainResult:
    """What happened to one input under one composite and one target (one record of ``--json``)."""

    file: Path
    composite: str
    predicted: int = -1
    score: float = float("nan")
    explained: int = -1
    relevance_sum: float = float("nan")
    outputs: list[Path] = field(default_factory=list)
    predicted_label: str | None = None
    explained_label: str | None = None
    explained_score: float = float("nan")

    def line(self, many_composites: bool) -> str:
        """``cat.jpg: predicted 281 tabby (12.3), explained 281 tabby, sum 11.9``."""
        tag = f" [{self.composite}]" if many_composites else ""
        predicted = _named(self.predicted, self.predicted_label)
        return (f"{self.file}{tag}: predicted {predicted} ({self.score:.4g}), explained "
                f"{_named(self.explained, self.explained_label)}, sum {self.relevance_sum:.4g}")

    def record(self) -> dict:
        """The JSON record: input, composite, predicted/explained class, names and scores, relevance sum,
        output files."""
        files = {p.suffix[1:]: str(p) for p in self.outputs}
        return {"input": str(self.file), "composite": self.composite,
                "predicted": self.predicted, "predicted_label": self.predicted_label,
                "predicted_score": self.score, "explained": self.explained, "explained_label": self.explained_label,
                "explained_score": self.explained_score, "relevance_sum": self.relevance_sum,
                "heatmap": files.get("png"), "relevance": files.get("npy")}


def _named(index: int, label: str | None) -> str:
    return f"{index} {label}" if label else str(index)


def explain_files(model: Path, inputs: list[Path], outdir: Path, composites: list[str],
                  target: int | list[int] | None = None, batch_size: int = 16, size: tuple[int, int] | None = None,
                  normalize: str = "unit", cmap: str = "bwr", overlay: bool = False, zoom: int = 1,
                  progress: bool = True, log=print, warn=None, *, labels: list[str] | None = None,
                  resize: str = "crop", scale: str = "each", colorbar: bool = False,
                  explain_output: str | None = None,
                  **options) -> tuple[list[ExplainResult], list[tuple[Path, str]]]:
    """Explain every input with every composite, for every target (None: the top class; an int or a list of
    ints: those classes, one heatmap each); returns (results, failures as (file, message)).

    labels: class names (default: the model's metadata, see labels.LABEL_KEYS). resize: crop | squash | pad.
    scale: ``each`` (every heatmap on its own colour scale) or ``shared`` (one scale over all heatmaps of a
    composite, so they can be compared). The ZBox bounds (options low/high) may be one value or one per channel.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    require_regular_file(Path(model))
    targets = [None] if target is None else ([target] if isinstance(target, int) else list(target))
    if not targets:
        targets = [None]
    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    if zoom < 1:
        raise OnnxlrpError(f"--zoom must be a positive integer, got {zoom}")
    if size is not None and min(size) < 1:
        raise OnnxlrpError(f"--size must be two positive integers, got {size[0]} {size[1]}")
    if scale not in ("each", "shared"):
        raise OnnxlrpError(f"--scale must be each or shared, got {scale!r}")
    if resize not in RESIZE_MODES:
        raise OnnxlrpError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    colormap(cmap)  # fail early on an unknown colormap or normalisation
    parse_normalize(normalize)
    files = expand_inputs(inputs)
    if not files:
        raise OnnxlrpError("no input files (give images, .npy arrays, or folders of them)")
    if explain_output is not None:
        options["explain_output"] = explain_output
    follow_normalize(options, model, normalize, size)
    prepared = []
    for composite in composites:  # compile and check everything before the first file is written
        compiled, hit = compile_cached(model, composite, **options)
        warn(f"onnxlrp: {'using cached' if hit else 'compiled'} {model} ({composite})")
        explainer = Explainer.from_compiled(compiled)
        classes = explainer.classes
        for t in targets:
            if t is not None and classes is not None and not -1 <= t < classes:
                raise OnnxlrpError(f"target {t} out of range: the model has {classes} classes (0..{classes - 1})")
        prepared.append((composite, compiled, explainer))
    spec = input_spec(prepared[0][1], size)
    _check_bounds(options, spec)
    _check_pixels(spec, size, zoom)
    names = labels if labels is not None else model_labels(prepared[0][1])
    classes = prepared[0][2].classes
    if names is not None and classes is not None and len(names) != classes:
        warn(f"onnxlrp: warning: {len(names)} class names for {classes} classes; classes without a name show "
             f"their number only")
    fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    batch_size = fixed or batch_size  # a model with a fixed batch runs exactly that many at a time
    out = OutputFolder(outdir, files).open()  # refuses a folder inputs are read from; see outputs.py
    stems = output_stems(files)
    try:
        failures: list[tuple[Path, str]] = []
        loaded = []
        for path in files:
            try:
                loaded.append((path, *load_input(path, spec, normalize, resize)))
            except OnnxlrpError as exc:
                failures.append((path, str(exc)))
        many = len(composites) > 1
        results: list[ExplainResult] = []
        for composite, compiled, explainer in prepared:
            bar = _progress(len(loaded) * len(targets), progress and len(files) > 1, composite)
            pending = []  # (result, relevance map, background) waiting for the shared colour scale
            for batch in _file_batches(loaded, files, batch_size):
                x = _pad_batch(np.stack([array for _, array, _ in batch]), fixed)
                runs = []
                for t in targets:
                    outputs, relevance = explainer.explain({spec.name: x}, target=t)
                    if isinstance(relevance, dict):
                        relevance = relevance[spec.name]
                    scores = outputs[explainer.explained_output][:len(batch)].reshape(len(batch), -1)
                    runs.append((t, scores, relevance[:len(batch)]))
                for k, (path, array, display) in enumerate(batch):  # records per input, its targets together
                    for t, scores, relevance in runs:
                        stem = (stems[path] + (f".{composite}" if many else "")
                                + (f".{t}" if len(targets) > 1 else ""))
                        result = _result(path, composite, scores[k], t, relevance[k], names)
                        npy = out.claim(f"{stem}.npy")
                        out.save_npy(npy, relevance[k])
                        result.outputs = [npy]
                        if relevance[k].ndim in (2, 3):
                            background = (display if display is not None else array) if overlay else None
                            heat = relevance_map(relevance[k], spec.channels_last)
                            png = out.claim(f"{stem}.png")
                            result.outputs.insert(0, png)
                            if scale == "shared":
                                pending.append((result, heat, background))
                            else:
                                out.save_png(png, render_heatmap(heat, cmap, background, zoom=zoom,
                                                                 colorbar=colorbar))
                        results.append(result)
                        log(result.line(many))
                bar.update(len(batch) * len(targets))
            common = shared_scale(heat for _, heat, _ in pending)
            for result, heat, background in pending:
                out.save_png(result.outputs[0], render_heatmap(heat, cmap, background, zoom=zoom, scale=common,
                                                               colorbar=colorbar))
            bar.close()
    except BaseException:
        out.close(failed=True)  # no partial output, no empty folder left behind
        raise
    out.close()  # removes the folder it created when nothing was written (every input failed)
    return results, failures


def _file_batches(loaded: list[tuple], files: list[Path], batch_size: int) -> list[list[tuple]]:
    """The loaded inputs grouped by runs of ``batch_size`` files (an input that failed leaves its batch short), so
    a batch holds the same inputs whichever inputs failed elsewhere; the Ray path (distributed.py) groups files the
    same way, which keeps its relevance bit-identical to this one's."""
    position = {path: i for i, path in enumerate(files)}
    groups: dict[int, list[tuple]] = {}
    for item in loaded:
        groups.setdefault(position[item[0]] // batch_size, []).append(item)
    return [groups[k] for k in sorted(groups)]


def _result(path: Path, composite: str, scores: np.ndarray, target: int | None, relevance: np.ndarray,
            labels: list[str] | None) -> ExplainResult:
    predicted = int(scores.argmax())
    explained = predicted if target is None or target < 0 else int(target)
    return ExplainResult(path, composite, predicted, float(scores[predicted]), explained, float(relevance.sum()),
                         predicted_label=class_name(labels, predicted), explained_label=class_name(labels, explained),
                         explained_score=float(scores[explained]))


def follow_normalize(options: dict, model: Path, normalize: str, size) -> None:
    """Fill unset ZBox bounds (options low/high None) from --normalize: the pixel range [0, 1] normalised."""
    if options.get("low") is None or options.get("high") is None:
        low, high = zbox_bounds(normalize, _channels(model, size))
        options["low"] = low if options.get("low") is None else options["low"]
        options["high"] = high if options.get("high") is None else options["high"]


def _channels(model: Path, size) -> int | None:
    """The channel count of the model's image input (None when unreadable here: compiling reports why)."""
    import onnx
    try:
        return input_spec(onnx.load(str(model), load_external_data=False), size).channels
    except Exception:
        return None


def _check_pixels(spec, size, zoom: int) -> None:
    """--size and --zoom beyond Pillow's decompression-bomb limit (~89 million pixels) would exhaust the memory
    (the process gets killed, with no message): refuse them with one line."""
    from PIL import Image
    if len(spec.shape) != 4 or None in spec.size:
        return
    (height, width), limit = spec.size, Image.MAX_IMAGE_PIXELS
    if size is not None and height * width > limit:
        raise OnnxlrpError(f"--size {height} {width}: {height * width} pixels per input, more than {limit}")
    if zoom > 1 and height * width * zoom * zoom > limit:
        raise OnnxlrpError(f"--zoom {zoom}: heatmaps of {height * zoom} x {width * zoom} pixels, more than {limit}; "
                           f"give a smaller --zoom")


def _pad_batch(x: np.ndarray, fixed: int | None) -> np.ndarray:
    """A short last batch for a model with a fixed batch size, filled up with copies of its last sample (their
    results are dropped)."""
    if fixed is None or len(x) >= fixed:
        return x
    return np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])


def _check_bounds(options: dict, spec) -> None:
    """Per-channel ZBox bounds must have one value per input channel."""
    for key in ("low", "high"):
        value = options.get(key)
        if isinstance(value, (list, tuple)) and len(value) != 1 and len(value) != spec.channels:
            raise OnnxlrpError(f"--{key}: {len(value)} values given, but the model input {spec.name!r} has "
                               f"{spec.channels} channels (give one value or one per channel)")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="input", file=sys.stderr, leave=False,
                disable=None)  # None: shown on a terminal only, so that logs and pipes get one line per error
