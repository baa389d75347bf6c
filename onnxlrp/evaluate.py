"""Faithfulness by pixel flipping (Samek et al. 2017; the table of seed 003): perturb the most relevant patches
first, a fraction at a time, and follow the explained class's score; the area under that curve (lower = the
explanation found what the model uses) is compared with a random ordering and with gradient x input.

All perturbed versions of one input (steps + 1 of them) go through one ONNX Runtime session as one batch."""
from __future__ import annotations

import sys
import time
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
    """One way of ordering the pixels: a composite (with its LRN rule), gradient x input, a black-box reference
    (occlusion, RISE: reference_methods.py), or random."""

    label: str
    composite: str | None
    options: dict = field(default_factory=dict)
    reference: str | None = None


@dataclass
class Curves:
    label: str
    curves: list[np.ndarray] = field(default_factory=list)
    definition: str = "onnxlrp"  # or quantus-pixel-flipping / quantus-region-perturbation (quantus_definition.py)
    cost_ms: float | None = None  # milliseconds per input to compute the map (None: random)
    metrics: dict[str, "Curves"] = field(default_factory=dict)  # --metric fills / road-morf / road-lerf

    @property
    def mean(self) -> np.ndarray:
        return np.mean(self.curves, axis=0)

    @property
    def aucs(self) -> np.ndarray:
        if self.definition != "onnxlrp":
            from .quantus_definition import area_under_curve as quantus_auc
            return np.array([quantus_auc(c) for c in self.curves])
        return np.array([area_under_curve(c) for c in self.curves])


def methods_for(composites: list[str], lrn_rules: list[str], model_has_lrn: bool, references=(),
                **options) -> list[Method]:
    methods = []
    for composite in composites:
        for rule in (lrn_rules if model_has_lrn else lrn_rules[:1]):
            label = f"{composite} / lrn {rule}" if model_has_lrn else composite
            methods.append(Method(label, composite, {**options, "lrn_rule": rule}))
    methods.append(Method("gradient x input", "gradient", {}))
    methods += [Method(REFERENCE_LABELS[r], None, reference=r) for r in dict.fromkeys(references)]
    methods.append(Method("random", None, {}))
    return methods


REFERENCE_LABELS = {"occlusion": "occlusion", "rise": "RISE"}


def evaluate(model: Path, inputs: list[Path], composites: list[str], lrn_rules: list[str], steps: int = 16,
             patch: int = 4, fill: str = "mean", fill_value: float = 0.0, normalize: str = "unit",
             size=None, seed: int = 0, progress: bool = False, definition: str = "onnxlrp",
             references=(), metrics=("pixel-flipping",), rise=None,
             **options) -> tuple[list[Curves], list[tuple[Path, str]]]:
    """Pixel-flipping curves per method (relative score: score after k steps / score before).

    fill: what flipped patches become, ``mean`` (each channel's mean), ``value`` (``fill_value``) or ``blur``.
    options: rule options of the composites (epsilon, gamma, ...). progress: a progress bar on stderr.
    definition: ``onnxlrp`` (above) or Quantus 0.6's ``quantus-pixel-flipping`` (patch x patch features per
    step) / ``quantus-region-perturbation`` (``steps`` tiles of patch x patch), see quantus_definition.py.
    references: black-box methods besides (``occlusion``, ``rise``; rise: a perturbation_metrics.RiseSettings).
    metrics: besides pixel flipping, ``fills`` and ``road`` (perturbation_metrics.py), in Curves.metrics."""
    from . import perturbation_metrics as pm
    if steps < 1 or patch < 1:
        raise OnnxlrpError("--steps and --patch must be at least 1")
    if definition not in DEFINITIONS:
        raise OnnxlrpError(f"--definition must be one of {', '.join(DEFINITIONS)}, got {definition!r}")
    pm.check_metrics(list(metrics), definition)
    for name in references:
        if name not in REFERENCE_LABELS:
            raise OnnxlrpError(f"--reference must be occlusion, rise or none, got {name!r}")
    rise = rise or pm.RiseSettings()
    if rise.masks < 1 or rise.grid < 1 or not 0 < rise.p <= 1:
        raise OnnxlrpError("RISE needs --rise-masks >= 1, --rise-grid >= 1 and 0 < --rise-p <= 1")
    if definition != "onnxlrp" and fill not in ("mean", "value", "black", "white"):
        raise OnnxlrpError(f"--definition {definition}: --fill must be mean, value, black or white (Quantus has no "
                           f"{fill} fill)")
    if definition == "onnxlrp":
        make_baseline(np.zeros((1, 1, 1), np.float32), fill, fill_value, False)  # a bad --fill fails first
    from .assemble import IR_VERSION
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
    predict = lambda batch: forward.run([output], {spec.name: batch})[0].reshape(len(batch), -1)  # noqa: E731
    scores = predict(x)
    target = scores.argmax(1)
    results = []
    rng = np.random.default_rng(seed)
    methods = methods_for(composites, lrn_rules, has_lrn, references, **options)
    from tqdm import tqdm
    bar = tqdm(total=len(methods) * len(x), desc="pixel flipping", unit="input", file=sys.stderr, leave=False,
               disable=not progress)
    maps = {}
    for method in methods:
        curves = Curves(method.label, definition=definition)
        relevance, start = None, time.perf_counter()
        if method.reference is not None:
            relevance = pm.reference_map(method.reference, predict, x, target, spec.channels_last, fill, fill_value,
                                         patch, rise, seed)
        elif method.composite is not None:
            compiled, _ = compile_cached(model, method.composite, **method.options)
            explainer = Explainer.from_compiled(compiled)
            explainer.explain({spec.name: x[:1]}, target=target[:1])  # warm-up: the cost is of a warm session
            start = time.perf_counter()  # the explanation's cost, not the compilation's (cached) or the session's
            _, relevance = explainer.explain({spec.name: x}, target=target)
            if isinstance(relevance, dict):
                relevance = relevance[spec.name]
        if relevance is not None:
            curves.cost_ms = 1000 * (time.perf_counter() - start) / len(x)
        maps[method.label] = relevance
        if definition != "onnxlrp":
            results.append(curves)
            bar.update(len(x))
            continue
        for i, sample in enumerate(x):
            curves.curves.append(flip_curve(predict, sample, None if relevance is None else relevance[i], target[i],
                                            patch, steps, fill, fill_value, spec.channels_last, rng))
            bar.update(1)
        results.append(curves)
    bar.close()
    if definition == "onnxlrp":
        pm.add_metrics(results, maps, predict, x, target, spec.channels_last, patch, steps, list(metrics), rng,
                       seed, progress)
    if definition != "onnxlrp":
        quantus_curves(results, maps, x, target, spec.channels_last, predict, definition, patch, steps, fill,
                       fill_value, rng)
    return results, failures


def flip_curve(predict, sample: np.ndarray, relevance: np.ndarray | None, target: int, patch: int, steps: int,
               fill: str, fill_value: float, channels_last: bool, rng: np.random.Generator) -> np.ndarray:
    """One input's pixel-flipping curve: relative score as the tiles are flipped (random order if no relevance)."""
    size = sample.shape[:2] if channels_last else sample.shape[-2:]
    if relevance is None:
        order = patch_order(np.zeros(size), patch, rng)
    else:
        order = patch_order(relevance.sum(axis=-1 if channels_last else 0) if relevance.ndim == 3 else relevance,
                            patch)
    base = make_baseline(sample, fill, fill_value, channels_last)
    values = predict(perturbed_batch(sample, base, order, patch, steps, channels_last))[:, target]
    return values / values[0] if values[0] != 0 else values


DEFINITIONS = ("onnxlrp", "quantus-pixel-flipping", "quantus-region-perturbation")


def quantus_curves(results: list[Curves], maps: dict, x: np.ndarray, target: np.ndarray, channels_last: bool,
                   scores, definition: str, patch: int, steps: int, fill: str, fill_value: float,
                   rng: np.random.Generator) -> None:
    """Fill ``results`` with Quantus's curves: a_batch = the relevance summed over channels, [N, 1, H, W], all
    maps normalised together by their largest magnitude (as one Quantus call per method does)."""
    from . import quantus_definition as q
    to_first = (lambda a: np.moveaxis(a, -1, 1)) if channels_last else (lambda a: a)
    predict = (lambda b: scores(np.ascontiguousarray(np.moveaxis(b, 1, -1)))) if channels_last else scores
    x_first = np.ascontiguousarray(to_first(x))
    for curves in results:
        relevance = maps[curves.label]
        if relevance is None:  # random
            a = None
        elif relevance.ndim == x.ndim:
            a = to_first(relevance).sum(axis=1, keepdims=True)
        else:  # [N, H, W]
            a = relevance[:, None]
        if definition == "quantus-pixel-flipping":
            a = rng.random((len(x), 1, *x_first.shape[2:])) if a is None else q.normalise_by_max(a)
            values = q.pixel_flipping(predict, x_first, a, target, patch * patch, fill, fill_value)
        else:
            values = q.region_perturbation(predict, x_first, np.zeros((len(x), 1, *x_first.shape[2:])) if a is None
                                           else q.normalise_by_max(a), target, patch, steps, fill, fill_value,
                                           rng if a is None else None)
        curves.curves = list(values)


def _mean_sem(aucs: np.ndarray) -> list[str]:
    sem = aucs.std(ddof=1) / np.sqrt(len(aucs)) if len(aucs) > 1 else 0.0
    return [f"{aucs.mean():.4f}", f"{sem:.4f}"]


def report(results: list[Curves]) -> str:
    """The table: per method the AUC ± s.e.m. of each metric, the map's cost (ms per input) and the inputs."""
    from .perturbation_metrics import HIGHER_IS_BETTER, TITLES
    extra = list(results[0].metrics) if results else []
    header = ["method", "AUC (mean)", "± s.e.m."]
    for name in extra:
        header += [f"{TITLES[name]}{' (higher better)' if name in HIGHER_IS_BETTER else ''}", "± s.e.m."]
    rows = [header + ["ms/input", "inputs"]]
    for r in results:
        row = [r.label] + _mean_sem(r.aucs)
        for name in extra:
            row += _mean_sem(r.metrics[name].aucs)
        rows.append(row + ["–" if r.cost_ms is None else f"{r.cost_ms:.2f}", str(len(r.aucs))])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header) + 2)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if extra:
        lines.append("(mean over fills: pixel flipping averaged over the fills mean, 0 and blur; ROAD: pixels imputed "
                     "by noisy linear imputation, most (MoRF) or least (LeRF) relevant first; ms/input: the time to "
                     "compute the map)")
    definition = results[0].definition if results else "onnxlrp"
    if definition != "onnxlrp":
        what = "raw score of the explained class, features flipped most relevant first; lower AUC = more faithful" \
            if definition == "quantus-pixel-flipping" else \
            "drop of the explained class's score, tiles flipped most relevant first; higher AUC = more faithful"
        return "\n".join(lines) + f"\n(Quantus 0.6's {definition.removeprefix('quantus-')}: {what}; AUC = " \
                                  "trapezoids of width 1 over the steps)"
    return "\n".join(lines) + "\n(relative score of the explained class after flipping the most relevant patches " \
                              "first; lower AUC = more faithful)"


def plot(results: list[Curves], path: Path, steps: int) -> None:
    """Write the mean curves (legend beside the axes, never over the curves) to a .png/.pdf/.svg file."""
    from .save import write_figure
    write_figure(figure(results, steps), path)


def figure(results: list[Curves], steps: int):
    """The matplotlib figure of the mean curves, with the legend outside the axes on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .perturbation_metrics import TITLES, road_fractions
    extra = list(results[0].metrics) if results else []  # --metric fills / road: one panel each, on the right
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(9 + 4 * len(extra), 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    for r in results:
        fractions = np.linspace(0, 1, steps + 1) if r.definition == "onnxlrp" else np.arange(1, len(r.mean) + 1)
        ax.plot(fractions, r.mean, label=f"{r.label} (AUC {r.aucs.mean():.3f})",
                linestyle="--" if r.label == "random" else "-")
    definition = results[0].definition if results else "onnxlrp"
    ax.set_xlabel("fraction of patches flipped (most relevant first)" if definition == "onnxlrp" else "step")
    ax.set_ylabel("relative score of the explained class" if definition == "onnxlrp" else
                  "score drop" if definition == "quantus-region-perturbation" else "score of the explained class")
    ax.set_title("pixel flipping" if definition == "onnxlrp" else f"Quantus {definition.removeprefix('quantus-')}")
    for other, name in zip(axes[0][1:], extra):
        for r in results:
            fractions = road_fractions(steps) if name.startswith("road") else np.linspace(0, 1, steps + 1)
            other.plot(fractions, r.metrics[name].mean, linestyle="--" if r.label == "random" else "-")
        other.set_title(f"{TITLES[name]} (AUC in the table)")
        other.set_xlabel("fraction of pixels imputed" if name.startswith("road") else "fraction of patches flipped")
    axes[0][-1].legend(handles=ax.get_lines(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0)  # beside the curves
    fig.tight_layout()
    return fig
