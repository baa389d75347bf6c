"""Faithfulness by pixel flipping (Samek et al. 2017; the table of seed 003): perturb the most relevant patches
first, a fraction at a time, and follow the explained class's score; the area under that curve (lower = the
explanation found what the model uses) is compared with a random ordering and with gradient x input.

All perturbed versions of one input (steps + 1 of them) go through one ONNX Runtime session as one batch."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import compile_cached
from .errors import OnnxlrpError
from .inputs import expand_inputs, input_spec, load_input
from .runtime import Explainer, make_session


def patch_order(relevance_map: np.ndarray, patch: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of the (patch x patch) tiles of an [H, W] map, most relevant (summed) first; random if rng."""
    h, w = relevance_map.shape
    rows, cols = -(-h // patch), -(-w // patch)
    padded = np.zeros((rows * patch, cols * patch))
    padded[:h, :w] = relevance_map
    scores = padded.reshape(rows, patch, cols, patch).sum(axis=(1, 3)).reshape(-1)
    if rng is not None:
        return rng.permutation(scores.size)
    return np.argsort(-scores, kind="stable")


def perturbed_batch(x: np.ndarray, baseline: np.ndarray, order: np.ndarray, patch: int, steps: int,
                    channels_last: bool = False) -> np.ndarray:
    """[steps + 1, ...]: x with the first round(k / steps * tiles) tiles of ``order`` replaced by the baseline."""
    h, w = (x.shape[0], x.shape[1]) if channels_last else (x.shape[-2], x.shape[-1])
    cols = -(-w // patch)
    out = np.repeat(x[None], steps + 1, axis=0)
    for k in range(1, steps + 1):
        count = int(round(k / steps * order.size))
        for tile in order[:count]:
            r, c = divmod(int(tile), cols)
            rs, cs = slice(r * patch, min((r + 1) * patch, h)), slice(c * patch, min((c + 1) * patch, w))
            if channels_last:
                out[k, rs, cs] = baseline[rs, cs]
            else:
                out[k, ..., rs, cs] = baseline[..., rs, cs]
    return out


def area_under_curve(curve: np.ndarray) -> float:
    """Trapezoid area of a curve sampled at equally spaced fractions 0..1 of perturbed tiles."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(((curve[1:] + curve[:-1]) / 2).mean()) if curve.size > 1 else float(curve[0])


def make_baseline(x: np.ndarray, kind: str, value: float, channels_last: bool) -> np.ndarray:
    """What flipped patches become (--fill): value: a constant; mean: each channel's mean (the default: a
    constant 0 is itself a strong signal on normalised or [0, 1] images); blur: a 7x7 box blur of the input."""
    if kind == "value":
        return np.full_like(x, value)
    if kind == "mean":
        axes = (0, 1) if channels_last else (-2, -1)
        return np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape).astype(x.dtype)
    if kind == "blur":
        axes = (0, 1) if channels_last else (x.ndim - 2, x.ndim - 1)
        blurred = x.astype(np.float64)
        for axis in axes:  # 7-wide box filter per axis, edges repeated
            pad = [(0, 0)] * x.ndim
            pad[axis] = (3, 3)
            padded = np.pad(blurred, pad, mode="edge")
            sums = np.cumsum(np.insert(padded, 0, 0.0, axis=axis), axis=axis)
            n = x.shape[axis]
            blurred = (np.take(sums, range(7, n + 7), axis=axis) - np.take(sums, range(0, n), axis=axis)) / 7.0
        return blurred.astype(x.dtype)
    raise OnnxlrpError(f"--fill must be value, mean or blur, got {kind!r}")


@dataclass
class Method:
    """One way of ordering the pixels: a composite (with its LRN rule), gradient x input, or random."""

    label: str
    composite: str | None
    options: dict = field(default_factory=dict)


@dataclass
class Curves:
    label: str
    curves: list[np.ndarray] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        return np.mean(self.curves, axis=0)

    @property
    def aucs(self) -> np.ndarray:
        return np.array([area_under_curve(c) for c in self.curves])


def methods_for(composites: list[str], lrn_rules: list[str], model_has_lrn: bool, **options) -> list[Method]:
    methods = []
    for composite in composites:
        for rule in (lrn_rules if model_has_lrn else lrn_rules[:1]):
            label = f"{composite} / lrn {rule}" if model_has_lrn else composite
            methods.append(Method(label, composite, {**options, "lrn_rule": rule}))
    methods.append(Method("gradient x input", "gradient", {}))
    methods.append(Method("random", None, {}))
    return methods


def evaluate(model: Path, inputs: list[Path], composites: list[str], lrn_rules: list[str], steps: int = 16,
             patch: int = 4, fill: str = "mean", fill_value: float = 0.0, normalize: str = "unit",
             size=None, seed: int = 0, progress: bool = False,
             **options) -> tuple[list[Curves], list[tuple[Path, str]]]:
    """Pixel-flipping curves per method (relative score: score after k steps / score before).

    fill: what flipped patches become, ``mean`` (each channel's mean), ``value`` (``fill_value``) or ``blur``.
    options: rule options of the composites (epsilon, gamma, ...). progress: a progress bar on stderr."""
    if steps < 1 or patch < 1:
        raise OnnxlrpError("--steps and --patch must be at least 1")
    make_baseline(np.zeros((1, 1, 1), np.float32), fill, fill_value, False)  # a bad --fill fails first
    from .compile import IR_VERSION
    from .load import read_model
    proto = read_model(model)  # regular files only, external data and tensors checked, one-line errors
    proto.ir_version = min(proto.ir_version, IR_VERSION)  # onnx >= 1.20 writes IR versions ORT refuses
    has_lrn = any(n.op_type == "LRN" for n in proto.graph.node)
    spec = input_spec(proto, size)
    forward = make_session(proto)
    output = proto.graph.output[0].name
    files = expand_inputs(inputs)
    loaded, failures = [], []
    for path in files:
        try:
            loaded.append((path, load_input(path, spec, normalize)[0]))
        except OnnxlrpError as exc:
            failures.append((path, str(exc)))
    if not loaded:
        raise OnnxlrpError("no usable inputs")
    x = np.stack([a for _, a in loaded])
    scores = forward.run([output], {spec.name: x})[0].reshape(len(x), -1)
    target = scores.argmax(1)
    results = []
    rng = np.random.default_rng(seed)
    methods = methods_for(composites, lrn_rules, has_lrn, **options)
    from tqdm import tqdm
    bar = tqdm(total=len(methods) * len(x), desc="pixel flipping", unit="input", file=sys.stderr, leave=False,
               disable=not progress)
    for method in methods:
        curves = Curves(method.label)
        if method.composite is not None:
            compiled, _ = compile_cached(model, method.composite, **method.options)
            _, relevance = Explainer.from_compiled(compiled).explain({spec.name: x}, target=target)
            if isinstance(relevance, dict):
                relevance = relevance[spec.name]
        for i, sample in enumerate(x):
            if method.composite is None:
                order = patch_order(np.zeros(spec.size), patch, rng)
            else:
                rel = relevance[i].sum(axis=-1 if spec.channels_last else 0) if relevance[i].ndim == 3 \
                    else relevance[i]
                order = patch_order(rel, patch)
            base = make_baseline(sample, fill, fill_value, spec.channels_last)
            batch = perturbed_batch(sample, base, order, patch, steps, spec.channels_last)
            values = forward.run([output], {spec.name: batch})[0].reshape(len(batch), -1)[:, target[i]]
            curves.curves.append(values / values[0] if values[0] != 0 else values)
            bar.update(1)
        results.append(curves)
    bar.close()
    return results, failures


def report(results: list[Curves]) -> str:
    rows = [("method", "AUC (mean)", "± s.e.m.", "inputs")]
    for r in results:
        aucs = r.aucs
        sem = aucs.std(ddof=1) / np.sqrt(len(aucs)) if len(aucs) > 1 else 0.0
        rows.append((r.label, f"{aucs.mean():.4f}", f"{sem:.4f}", str(len(aucs))))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(relative score of the explained class after flipping the most relevant patches " \
                              "first; lower AUC = more faithful)"


def plot(results: list[Curves], path: Path, steps: int) -> None:
    """Write the mean curves (legend beside the axes, never over the curves) to a .png/.pdf/.svg file."""
    import matplotlib.pyplot as plt
    fig = figure(results, steps)
    from .save import write_file_atomically
    fmt = Path(path).suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise OnnxlrpError(f"{path}: cannot write a plot of type {fmt!r} (use .png, .pdf or .svg)")
    write_file_atomically(Path(path), lambda handle: fig.savefig(handle, format=fmt, bbox_inches="tight"))
    plt.close(fig)


def figure(results: list[Curves], steps: int):
    """The matplotlib figure of the mean curves, with the legend outside the axes on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    fractions = np.linspace(0, 1, steps + 1)
    for r in results:
        ax.plot(fractions, r.mean, label=f"{r.label} (AUC {r.aucs.mean():.3f})",
                linestyle="--" if r.label == "random" else "-")
    ax.set_xlabel("fraction of patches flipped (most relevant first)")
    ax.set_ylabel("relative score of the explained class")
    ax.set_title("pixel flipping")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside the curves
    fig.tight_layout()
    return fig
