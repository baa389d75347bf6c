"""`onnxlrp explain`: images or arrays in, heatmaps, raw relevance and one line per input out."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import compile_cached
from .errors import OnnxlrpError
from .inputs import expand_inputs, input_spec, load_input, parse_normalize
from .render import colormap, render_heatmap
from .runtime import Explainer


@dataclass
class ExplainResult:
    """What happened to one input under one composite."""

    file: Path
    composite: str
    predicted: int = -1
    score: float = float("nan")
    explained: int = -1
    relevance_sum: float = float("nan")
    outputs: list[Path] = field(default_factory=list)

    def line(self, many_composites: bool) -> str:
        tag = f" [{self.composite}]" if many_composites else ""
        return (f"{self.file}{tag}: predicted {self.predicted} (score {self.score:.4g}), explained {self.explained}, "
                f"sum of relevance {self.relevance_sum:.4g}")


def explain_files(model: Path, inputs: list[Path], outdir: Path, composites: list[str], target: int | None = None,
                  batch_size: int = 16, size: tuple[int, int] | None = None, normalize: str = "unit",
                  cmap: str = "bwr", overlay: bool = False, zoom: int = 1, progress: bool = True,
                  log=print, warn=None, **options) -> tuple[list[ExplainResult], list[tuple[Path, str]]]:
    """Explain every input with every composite; returns (results, failures as (file, message))."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    colormap(cmap)  # fail early on an unknown colormap or normalisation
    parse_normalize(normalize)
    _prepare_outdir(outdir)
    files = expand_inputs(inputs)
    if not files:
        raise OnnxlrpError("no input files (give images, .npy arrays, or folders of them)")
    results, failures = [], []
    for composite in composites:
        compiled, hit = compile_cached(model, composite, **options)
        warn(f"onnxlrp: {'using cached' if hit else 'compiled'} {model} ({composite})")
        explainer = Explainer.from_compiled(compiled)
        spec = input_spec(compiled, size)
        classes = explainer.classes
        if target is not None and classes is not None and not -1 <= target < classes:
            raise OnnxlrpError(f"target {target} out of range: the model has {classes} classes (0..{classes - 1})")
        loaded = []
        for path in files:
            try:
                loaded.append((path, *load_input(path, spec, normalize)))
            except OnnxlrpError as exc:
                failures.append((path, str(exc)))
        batches = [loaded[i:i + batch_size] for i in range(0, len(loaded), batch_size)]
        bar = _progress(len(loaded), progress and len(files) > 1, composite)
        for batch in batches:
            x = np.stack([array for _, array, _ in batch])
            outputs, relevance = explainer.explain({spec.name: x}, target=target)
            if isinstance(relevance, dict):
                relevance = relevance[spec.name]
            scores = outputs[explainer.explained_output].reshape(len(batch), -1)
            for k, (path, array, display) in enumerate(batch):
                result = _write_one(path, composite, len(composites) > 1, relevance[k], scores[k], target,
                                    outdir, cmap, display if overlay else None, overlay, array, spec.channels_last,
                                    zoom)
                results.append(result)
                log(result.line(len(composites) > 1))
            bar.update(len(batch))
        bar.close()
    return results, failures


def _prepare_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / ".onnxlrp-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OnnxlrpError(f"{outdir}: output folder is not writable ({exc.strerror or exc})") from None


def _write_one(path: Path, composite: str, many: bool, relevance: np.ndarray, scores: np.ndarray,
               target: int | None, outdir: Path, cmap: str, display, overlay: bool, array: np.ndarray,
               channels_last: bool, zoom: int) -> ExplainResult:
    stem = f"{path.stem}.{composite}" if many else path.stem
    predicted = int(scores.argmax())
    explained = predicted if target is None or target < 0 else int(target)
    result = ExplainResult(path, composite, predicted, float(scores[predicted]), explained,
                           float(relevance.sum()))
    npy, png = outdir / f"{stem}.npy", outdir / f"{stem}.png"
    np.save(npy, relevance)
    background = display if display is not None else (array if overlay else None)
    if relevance.ndim in (2, 3):
        render_heatmap(relevance, cmap, background, zoom=zoom, channels_last=channels_last).save(png)
        result.outputs = [png, npy]
    else:
        result.outputs = [npy]
    return result


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="input", file=sys.stderr, leave=False)
