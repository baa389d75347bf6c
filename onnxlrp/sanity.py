"""The model-parameter randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps") on the
ONNX graph: replace the weights of the parameterised layers by random values, from the output side down, recompile,
explain the same inputs for the original model's predicted class, and measure how similar the heatmaps stay.

A heatmap that barely changes when the model's weights are random does not explain the model. Layers: Conv,
ConvTranspose, Gemm and MatMul nodes whose weight is a float initializer (with their bias: Conv/ConvTranspose/Gemm
input 2, or the initializer an Add right after a MatMul adds), in topological order. Default draw: each tensor
becomes normal with the original tensor's mean and standard deviation (``draw_normal``; seeded, drawn once per
layer, so cascade step k+1 keeps step k's values). Similarities per input, on the maps summed over channels:
Spearman rank correlation of |R| and of R, and SSIM (Wang et al. 2004, skimage's defaults: 7x7 uniform window) of
|R| / max |R| with data range 1."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxlrpError
from .graph import FLOAT_TYPES

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MODES = ("cascade", "independent")


@dataclass(frozen=True)
class Layer:
    """A parameterised layer: its node, its weight initializer and its bias initializer (or None)."""

    node: str
    op: str
    weight: str
    bias: str | None

    @property
    def label(self) -> str:
        """A short name: the weight's (else the bias's) name without its ``.weight`` / ``.bias`` suffix (torch's
        module name), else the node's."""
        for name, kind in ((self.weight, "weight"), (self.bias or "", "bias")):
            for suffix in (f".{kind}", f"_{kind}", f"/{kind}"):
                if name.endswith(suffix) and len(name) > len(suffix):
                    return name[: -len(suffix)]
        return self.node or self.weight


#: draw(layer, {initializer name: original array}, rng) -> {initializer name: random array of the same shape};
#: a tensor left out of the result keeps its original values.
Draw = Callable[[Layer, dict, np.random.Generator], dict]


def parameter_layers(model: onnx.ModelProto) -> list[Layer]:
    """The model's parameterised layers in topological order (input side first); one per weight initializer."""
    floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers, seen = [], set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OPS:
            continue
        weight = next((name for name in reversed(node.input[:2]) if name in floats), None)
        if weight is None or weight in seen:
            continue
        bias = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] in floats \
            else None
        if node.op_type == "MatMul" and len(users := consumers.get(node.output[0], [])) == 1 \
                and users[0].op_type == "Add":
            bias = next((name for name in users[0].input if name in floats and name != weight), None)
        seen.add(weight)
        layers.append(Layer(node.name or f"{node.op_type}_{index}", node.op_type, weight, bias))
    return layers


def draw_normal(layer: Layer, params: dict, rng: np.random.Generator) -> dict:
    """Each tensor normal with its own mean and standard deviation (a constant tensor stays constant)."""
    return {name: rng.normal(a.mean(dtype=np.float64), a.std(dtype=np.float64), a.shape).astype(a.dtype)
            for name, a in params.items()}


def with_initializers(model: onnx.ModelProto, replacements: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold the given arrays (same shapes, cast to their types)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    left = dict(replacements)
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.name in left:
            value = np.asarray(left.pop(tensor.name))
            if list(value.shape) != list(tensor.dims):
                raise OnnxlrpError(f"initializer {tensor.name!r}: a replacement of shape {list(value.shape)} for "
                                   f"shape {list(tensor.dims)}")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(dtype), tensor.name))
    if left:
        raise OnnxlrpError(f"no initializer named {', '.join(sorted(left))}")
    return copy


def schedule(layers: list[Layer], mode: str) -> list[list[Layer]]:
    """The layers randomised at each step 1..L: cascade = the top k layers, independent = the k-th from the top."""
    if mode not in MODES:
        raise OnnxlrpError(f"--mode must be cascade or independent, got {mode!r}")
    top_down = layers[::-1]
    return [top_down[: k + 1] if mode == "cascade" else [layer] for k, layer in enumerate(top_down)]


def heatmap(relevance: np.ndarray, channels_last: bool) -> np.ndarray:
    """[N, ...] relevance -> [N, H, W] summed over channels (images), else [N, features]."""
    if relevance.ndim == 4:
        return relevance.sum(axis=-1 if channels_last else 1)
    return relevance.reshape(len(relevance), -1) if relevance.ndim != 3 else relevance


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (nan when one is constant, e.g. all zero)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        raise OnnxlrpError("the sanity check needs scipy (pip install 'onnxlrp[sanity]')") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a.reshape(-1), b.reshape(-1))[0])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of |a| / max|a| and |b| / max|b| (data range 1, skimage's 7x7 window; smaller for smaller maps);
    nan for maps that are not 2-D or narrower than 3."""
    if a.ndim != 2 or min(a.shape) < 3:
        return float("nan")
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise OnnxlrpError("the sanity check's SSIM needs scikit-image (pip install 'onnxlrp[sanity]')") from None
    unit = [np.abs(m) / np.abs(m).max() if np.abs(m).max() > 0 else np.zeros_like(m, dtype=np.float64)
            for m in (a.astype(np.float64), b.astype(np.float64))]
    window = min(7, min(a.shape) - (1 - min(a.shape) % 2))
    return float(structural_similarity(unit[0], unit[1], data_range=1.0, win_size=window))


SIMILARITIES = {"spearman_abs": lambda a, b: spearman(np.abs(a), np.abs(b)), "spearman": spearman, "ssim": ssim}


@dataclass
class MethodResult:
    """One explanation method: its maps per step ([steps + 1, N, ...], step 0 the intact model) and, per
    similarity name, an array [steps + 1, N] against the original model's maps."""

    label: str
    maps: list[np.ndarray] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SanityResult:
    mode: str
    steps: list[list[Layer]]  # layers randomised at steps 1..L
    methods: list[MethodResult]
    images: np.ndarray  # the inputs [N, ...]
    files: list[Path]
    target: np.ndarray
    channels_last: bool

    @property
    def step_labels(self) -> list[str]:
        labels = ["original"]
        for layers in self.steps:
            labels.append(layers[-1].label if self.mode == "independent" or len(layers) == 1
                          else f"+ {layers[-1].label}")
        return labels


def explain_with(model: onnx.ModelProto, composite: str, x: np.ndarray, input_name: str, target,
                 **options) -> tuple[np.ndarray, np.ndarray]:
    """Compile ``model`` (in memory) with ``composite``, explain ``x`` for ``target`` -> (scores of the explained
    output [N, classes], relevance of ``input_name``)."""
    from .compile import compile_model
    from .runtime import Explainer
    explainer = Explainer.from_compiled(compile_model(model, composite, **options))
    outputs, relevance = explainer.explain({input_name: x}, target=target)
    if isinstance(relevance, dict):
        relevance = relevance[input_name]
    return outputs[explainer.explained_output].reshape(len(x), -1), relevance


def sanity(model, inputs: list[Path], composites: list[str], mode: str = "cascade", seed: int = 0,
           normalize: str = "unit", size=None, draw: Draw | None = None, gradient: bool = True,
           progress: bool = False, **options) -> SanityResult:
    """The randomisation test for each composite (and gradient x input when ``gradient``).

    draw: how a layer's tensors are randomised (default ``draw_normal`` with ``np.random.default_rng(seed)``);
    called once per layer, top layer first. options: rule options of the composites (epsilon, lrn_rule, ...).
    progress: a progress bar on stderr (one tick per compiled and explained model).
    Every input must load (no partial result): the first that does not raises OnnxlrpError."""
    from .assemble import IR_VERSION
    from .inputs import expand_inputs, input_spec, load_input
    from .load import read_model
    if mode not in MODES:
        raise OnnxlrpError(f"--mode must be cascade or independent, got {mode!r}")
    spearman(np.arange(3.0), np.arange(3.0)), ssim(np.ones((3, 3)), np.ones((3, 3)))  # scipy, skimage: fail first
    proto = read_model(model)
    proto.ir_version = min(proto.ir_version, IR_VERSION)  # onnx >= 1.20 writes IR versions ORT refuses
    layers = parameter_layers(proto)
    if not layers:
        raise OnnxlrpError(f"{model}: no parameterised layer (Conv, ConvTranspose, Gemm or MatMul with a float "
                           f"initializer weight) to randomise")
    spec = input_spec(proto, size)
    files = expand_inputs(list(inputs))
    if not files:
        raise OnnxlrpError("no input files (give images, .npy arrays, or folders of them)")
    x = np.stack([load_input(path, spec, normalize)[0] for path in files])
    methods = [(c, c, options) for c in composites] + ([("gradient x input", "gradient", {})] if gradient else [])
    if not methods:
        raise OnnxlrpError("no method to check (give a composite)")
    scores, _ = explain_with(proto, methods[0][1], x, spec.name, None, **methods[0][2])
    target = scores.argmax(1)  # the intact model's predicted class, explained at every step
    draw = draw or draw_normal
    rng = np.random.default_rng(seed)
    originals = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    drawn: dict[str, np.ndarray] = {}
    for layer in layers[::-1]:  # top first, once per layer
        names = [n for n in (layer.weight, layer.bias) if n]
        drawn.update(draw(layer, {n: originals[n] for n in names}, rng))
    steps = schedule(layers, mode)
    results = [MethodResult(label) for label, _, _ in methods]
    from tqdm import tqdm
    bar = tqdm(total=(len(steps) + 1) * len(methods), desc="randomisation", unit="model", file=sys.stderr,
               leave=False, disable=not progress)
    for step in [[]] + steps:  # one randomised copy of the model at a time
        randomised = with_initializers(proto, {n: drawn[n] for layer in step for n in (layer.weight, layer.bias)
                                               if n in drawn})
        for result, (_, composite, rule_options) in zip(results, methods):
            relevance = explain_with(randomised, composite, x, spec.name, target, **rule_options)[1]
            result.maps.append(heatmap(relevance, spec.channels_last))
            bar.update(1)
    bar.close()
    for result in results:
        reference = result.maps[0]  # step 0: the intact model
        for name, similarity in SIMILARITIES.items():
            result.scores[name] = np.array([[similarity(reference[i], maps[i]) for i in range(len(x))]
                                            for maps in result.maps])
    return SanityResult(mode, steps, results, x, files, target, spec.channels_last)


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean over the defined (non-nan) values."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def report(result: SanityResult) -> str:
    """The table: per method and step, the mean ± s.e.m. over the inputs of each similarity."""
    rows = [("method", "randomised", "Spearman |R|", "Spearman R", "SSIM", "inputs")]
    for method in result.methods:
        for k, label in enumerate(result.step_labels):
            cells = ["–" if np.isnan(m) else f"{m:.3f} ± {s:.3f}"
                     for m, s in (mean_sem(method.scores[n][k]) for n in SIMILARITIES)]
            rows.append((method.label, label, *cells, str(method.scores["spearman"].shape[1])))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    how = "from the top, cumulative" if result.mode == "cascade" else "one layer at a time"
    note = ("(similarity to the intact model's heatmaps, mean ± s.e.m. over the inputs where defined; layers "
            f"randomised {how}; lower = the explanation depends more on the weights; – : undefined, a constant map "
            "has no ranking and SSIM needs 2-D maps)")
    return "\n".join(lines) + "\n" + note
