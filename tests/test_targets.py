"""Targets beyond one class index: regression without `target`, a start mask (`target_mask`, Zennit's
attr_output = output * mask) for a segmentation net and a detection-style head, the explained output named in the
metadata, and the default composite for tabular inputs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlus, EpsilonPlusFlat

import onnxlrp
from onnxlrp import compile_model
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError
from torch_models import export


class Segmenter(nn.Module):
    """A small fully convolutional net: per-pixel scores for 3 classes at the input's resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                                  nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return self.body(x)


class Detector(nn.Module):
    """A detection-style head: a conv backbone, then per-anchor box scores [N, 4 anchors, 3 classes] and box
    offsets [N, 4, 4] as two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.scores, self.boxes = nn.Linear(32, 12), nn.Linear(32, 16)

    def forward(self, x):
        features = self.backbone(x)
        return self.scores(features).reshape(-1, 4, 3), self.boxes(features).reshape(-1, 4, 4)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))

    def forward(self, x):
        return self.net(x)


def _export(tmp_path, module: nn.Module, example: torch.Tensor, name: str):
    module.eval()
    return export(module, example, tmp_path / f"{name}.onnx", "torchscript17")


def _zennit(module: nn.Module, composite, x: torch.Tensor, start) -> np.ndarray:
    with Gradient(model=module, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), start)
    return relevance.detach().numpy()


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_segmentation_mask_equals_zennit(tmp_path):
    """Explain class 1 over a region of the segmentation map: start relevance = scores * mask."""
    torch.manual_seed(0)
    module = Segmenter()
    x = torch.rand(2, 3, 12, 12)
    path = _export(tmp_path, module, x, "segmenter")
    mask = np.zeros([2, 3, 12, 12], np.float32)
    mask[:, 1, 3:8, 4:10] = 1.0  # class 1 in a box
    explainer = onnxlrp.Explainer(path, "epsilon_plus_flat", target_mask=True)
    outputs, relevance = explainer.explain(x.numpy(), target_mask=mask)
    expected = _zennit(module, EpsilonPlusFlat(), x, lambda out: out * torch.from_numpy(mask))
    assert np.abs(expected).sum() > 0
    assert _rel_l2(relevance, expected) <= 1e-4
    # broadcasting: one mask [1, 3, H, W] for the whole batch gives the same
    _, again = explainer.explain(x.numpy(), target_mask=mask[:1])
    np.testing.assert_allclose(again, relevance, rtol=1e-6, atol=1e-9)


def test_detection_head_one_box_score(tmp_path):
    """Explain one anchor's class score of the first output (a mask with a single 1), against Zennit."""
    torch.manual_seed(1)
    module = Detector()
    x = torch.rand(2, 3, 8, 8)
    path = tmp_path / "detector.onnx"
    torch.onnx.export(module.eval(), (x,), str(path), input_names=["image"], output_names=["scores", "boxes"],
                      dynamic_axes={"image": {0: "N"}}, opset_version=17, dynamo=False)
    compiled = compile_model(str(path), "epsilon_plus", explain_output="scores", target_mask=True)
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.explained_output"] == "scores" and meta["onnxlrp.target"] == "target_mask"
    inputs = {i.name: i for i in compiled.graph.input}
    assert "target" not in inputs and "target_mask" in inputs
    assert [d.dim_value for d in inputs["target_mask"].type.tensor_type.shape.dim][1:] == [4, 3]
    mask = np.zeros([2, 4, 3], np.float32)
    mask[0, 2, 1] = mask[1, 0, 2] = 1.0
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, boxes, relevance = session.run(["scores", "boxes", "image_relevance"],
                                           {"image": x.numpy(), "target_mask": mask})
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    assert np.array_equal(scores, original[0]) and np.array_equal(boxes, original[1])
    scores_only = nn.Sequential(module.backbone, module.scores, nn.Unflatten(1, (4, 3)))  # Zennit: one output
    expected = _zennit(scores_only, EpsilonPlus(), x, lambda out: out * torch.from_numpy(mask))
    assert _rel_l2(relevance, expected) <= 1e-4


def test_regression_needs_no_target(tmp_path):
    """One output, no classes: `target` may be left out (default [-1]); LRP-epsilon's books close on y."""
    torch.manual_seed(2)
    module = Regressor()
    x = torch.randn(5, 6)
    path = _export(tmp_path, module, x, "regressor")
    compiled = compile_model(str(path), "epsilon", epsilon=0.0, bias_relevance="layers")
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    y, relevance, absorbed = session.run(None, {"x": x.numpy()})
    with_target = session.run(None, {"x": x.numpy(), "target": np.zeros(5, np.int64)})
    np.testing.assert_array_equal(with_target[1], relevance)
    total = relevance.sum(1) + absorbed.sum(1)
    np.testing.assert_allclose(total, y[:, 0], rtol=1e-4, atol=1e-6)
    # numpy LRP-0 by hand from the weights
    w1, b1 = module.net[0].weight.detach().numpy(), module.net[0].bias.detach().numpy()
    w2, b2 = module.net[2].weight.detach().numpy(), module.net[2].bias.detach().numpy()
    xs = x.numpy().astype(np.float64)
    h = np.maximum(xs @ w1.T + b1, 0)
    z2 = h @ w2.T + b2
    r_h = h * w2[0] * (z2 / z2)  # relevance y at the output, LRP-0: h_j w_j / z * y
    z1 = xs @ w1.T + b1
    r_x = xs * ((r_h / np.where(z1 == 0, 1, z1)) @ w1)
    np.testing.assert_allclose(relevance, r_x, rtol=1e-3, atol=1e-6)


def test_mask_misuse_is_one_line_error(tmp_path):
    torch.manual_seed(0)
    path = _export(tmp_path, Segmenter(), torch.rand(1, 3, 8, 8), "seg")
    explainer = onnxlrp.Explainer(path, "epsilon_plus", target_mask=True)
    with pytest.raises(OnnxlrpError, match="target_mask"):
        explainer.explain(np.zeros([1, 3, 8, 8], np.float32))
    with pytest.raises(OnnxlrpError, match="target_mask"):
        onnxlrp.Explainer(path, "epsilon_plus").explain(np.zeros([1, 3, 8, 8], np.float32),
                                                        target_mask=np.ones([1, 3, 8, 8]))


def test_cli_target_mask_and_tabular_default(tmp_path):
    """`--target-mask` on the CLI; without --composite a tabular model gets epsilon_plus, said on stderr and in
    the metadata; an image model keeps epsilon_plus_flat."""
    torch.manual_seed(0)
    seg = _export(tmp_path, Segmenter(), torch.rand(1, 3, 8, 8), "seg")
    reg = _export(tmp_path, Regressor(), torch.randn(2, 6), "reg")
    runner = CliRunner()

    def compile_cli(*args):
        return runner.invoke(main, ["compile", *map(str, args)])

    done = compile_cli(seg, "-o", tmp_path / "seg.lrp.onnx", "--target-mask")
    assert done.exit_code == 0, done.stderr
    assert "composite epsilon_plus_flat" in done.stderr
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "seg.lrp.onnx")).metadata_props}
    assert meta["onnxlrp.composite"] == "epsilon_plus_flat" and meta["onnxlrp.target"] == "target_mask"
    done = compile_cli(reg, "-o", tmp_path / "reg.lrp.onnx")
    assert done.exit_code == 0, done.stderr
    assert "composite epsilon_plus (default for non-image input 'x'" in done.stderr
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "reg.lrp.onnx")).metadata_props}
    assert meta["onnxlrp.composite"] == "epsilon_plus" and "non-image" in meta["onnxlrp.composite_default"]
    assert "flat" not in {r["rule"] for r in json.loads(meta["onnxlrp.rules"])}
    # an explicit choice is kept and nothing is said
    done = compile_cli(reg, "-o", tmp_path / "reg2.lrp.onnx", "--composite", "epsilon_plus_flat")
    assert done.exit_code == 0 and "default" not in done.stderr


def test_tabular_default_does_not_flatten_features(tmp_path):
    """The reason for the tabular default: epsilon_plus_flat gives every feature of a dense first layer the same
    share (up to the layer's own relevance), the default does not."""
    torch.manual_seed(3)
    path = _export(tmp_path, Regressor(), torch.randn(2, 6), "reg")
    x = np.random.RandomState(0).randn(1, 6).astype(np.float32)
    _, flat = onnxlrp.Explainer(path, "epsilon_plus_flat").explain(x)
    _, default = onnxlrp.Explainer(path).explain(x)
    assert np.allclose(flat, flat[0, 0])  # every feature equal
    assert np.ptp(default) > 1e-3 * np.abs(default).max()


def test_gradient_composite_with_mask_is_input_times_gradient(tmp_path):
    """start_gradient_mask: the gradient composite starts from the mask: x * d(sum(mask * y))/dx (torch autograd)."""
    torch.manual_seed(4)
    module = Segmenter().eval()
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    path = _export(tmp_path, module, x.detach(), "seg")
    mask = np.random.RandomState(0).rand(1, 3, 10, 10).astype(np.float32)
    _, relevance = onnxlrp.Explainer(path, "gradient", target_mask=True).explain(x.detach().numpy(),
                                                                                 target_mask=mask)
    (module(x) * torch.from_numpy(mask)).sum().backward()
    expected = (x * x.grad).detach().numpy()
    assert _rel_l2(relevance, expected) <= 1e-5
