"""What the benchmark scripts share: interleaved timing (median_time, best_of_rounds), the torchvision export with
random weights, Zennit's EpsilonPlusFlat runner, the machine line and the markdown tables they print."""
from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np


def median_time(fn, repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``fn`` after one warm-up call (seconds)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_of_rounds(fns: dict, repeats: int, rounds: int) -> dict:
    """name -> the lowest of ``rounds`` medians, the named functions taking turns round by round."""
    medians: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(median_time(fn, repeats))
    return {name: min(values) for name, values in medians.items()}


def torchvision_model(name: str):
    """torchvision's ``name`` with random weights (torch seeded 0), in eval mode."""
    import torch
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def export_torchvision(name: str, folder: Path):
    """:func:`torchvision_model` and its ONNX export (opset 17, TorchScript exporter, input "x" [N, 3, 224, 224],
    output "y") as folder/<name>.onnx."""
    import torch
    model = torchvision_model(name)
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return model, path


@contextlib.contextmanager
def zennit_explainer(model, x: np.ndarray):
    """A function running Zennit's EpsilonPlusFlat (with its ResNet or VGG canonizer) on x for the predicted
    classes, inside Zennit's attributor context (None when zennit is not installed)."""
    try:
        import torch
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError:
        yield None
        return
    canonizer = ResNetCanonizer() if "ResNet" in type(model).__name__ else VGGCanonizer()
    xt = torch.tensor(x)
    with torch.no_grad():
        one_hot = torch.eye(1000)[model(xt).argmax(1)]
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
        yield lambda: attributor(xt, lambda out: out * one_hot)


def machine_line(runtime: str) -> str:
    """``machine: <processor>, <n> cores; onnxruntime <version> (<runtime>); onnxlrp <version>``."""
    import onnxruntime as ort

    import onnxlrp
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxruntime "
            f"{ort.__version__} ({runtime}); onnxlrp {onnxlrp.__version__}")


class Table:
    """A markdown table whose rows are printed as they are added; ``str(table)`` is the whole table."""

    def __init__(self, *columns: str) -> None:
        self.lines = [self._row(columns), "|" + "---|" * len(columns)]

    @staticmethod
    def _row(cells) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    def add(self, *cells) -> None:
        self.lines.append(self._row(cells))
        print(self.lines[-1], flush=True)

    @property
    def has_rows(self) -> bool:
        return len(self.lines) > 2

    def __str__(self) -> str:
        return "\n".join(self.lines)
