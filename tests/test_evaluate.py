"""Pixel flipping: the AUC on a toy model whose answer is known by hand, the pieces, and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.evaluate import area_under_curve, evaluate, patch_order, perturbed_batch

ROOT = Path(__file__).resolve().parents[1]


def _toy(path: Path) -> Path:
    """score_0 = 4 x0 + 3 x1 + 2 x2 + 1 x3 over a 1x2x2 image; score_1 = 0."""
    w = numpy_helper.from_array(np.array([[4, 3, 2, 1], [0, 0, 0, 0]], np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "toy", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 1, 2, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_auc_on_a_toy_model_known_by_hand(tmp_path):
    model = _toy(tmp_path / "toy.onnx")
    np.save(tmp_path / "ones.npy", np.ones((1, 2, 2), np.float32))
    results, failures = evaluate(model, [tmp_path / "ones.npy"], ["epsilon"], ["identity"], steps=4, patch=1,
                                 fill="value", epsilon=0.0)
    assert not failures
    by_label = {r.label: r for r in results}
    # LRP-0 relevance = w * x = [4, 3, 2, 1]; flipping in that order leaves scores 10, 6, 3, 1, 0
    np.testing.assert_allclose(by_label["epsilon"].curves[0], [1.0, 0.6, 0.3, 0.1, 0.0], atol=1e-6)
    # trapezoids: (0.8 + 0.45 + 0.2 + 0.05) / 4
    assert by_label["epsilon"].aucs[0] == pytest.approx(0.375)
    assert by_label["gradient x input"].aucs[0] == pytest.approx(0.375)
    assert set(by_label) == {"epsilon", "gradient x input", "random"}


def test_pieces():
    assert area_under_curve(np.array([1.0, 0.0])) == 0.5
    order = patch_order(np.array([[0.0, 5.0], [1.0, -2.0]]), 1)
    assert order.tolist() == [1, 2, 0, 3]
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    batch = perturbed_batch(x, np.full_like(x, -1), np.array([3, 0, 1, 2]), patch=2, steps=2)
    assert batch.shape == (3, 1, 4, 4)
    assert (batch[0] == x).all()
    # step 1 of 2 flips half the tiles in order: 3 (bottom right) and 0 (top left)
    assert (batch[1, 0, 2:, 2:] == -1).all() and (batch[1, 0, :2, :2] == -1).all()
    assert (batch[1, 0, :2, 2:] == x[0, :2, 2:]).all() and (batch[1, 0, 2:, :2] == x[0, 2:, :2]).all()
    assert (batch[2] == -1).all()


def test_evaluate_cli_on_digits(tmp_path):
    plot = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, "-m", "onnxlrp.cli", "evaluate", str(ROOT / "models" / "digits_lrn.onnx"),
         str(ROOT / "models" / "samples"), "--composite", "epsilon_plus_flat", "--steps", "8", "--patch", "4",
         "--fill", "mean", "-o", str(plot)], capture_output=True, text=True,
        env={**__import__("os").environ, "ONNXLRP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    labels = [l.split("  ")[0] for l in lines[2:7]]
    assert labels == ["epsilon_plus_flat / lrn identity", "epsilon_plus_flat / lrn taylor", "gradient x input",
                      "occlusion", "random"]  # occlusion: the default --reference
    assert lines[0].split()[-5:] == ["(mean)", "±", "s.e.m.", "ms/input", "inputs"]
    aucs = {l.split("  ")[0]: float(l.split()[-4]) for l in lines[2:7]}
    assert aucs["epsilon_plus_flat / lrn taylor"] < aucs["random"]
    assert plot.exists() and plot.stat().st_size > 10_000


def test_baselines():
    from onnxlrp.evaluate import make_baseline
    x = np.arange(2 * 9 * 9, dtype=np.float32).reshape(2, 9, 9)
    assert (make_baseline(x, "value", 0.5, False) == 0.5).all()
    mean = make_baseline(x, "mean", 0.0, False)
    np.testing.assert_allclose(mean[1, 0, 0], x[1].mean())
    blur = make_baseline(x, "blur", 0.0, False)
    np.testing.assert_allclose(blur[0, 4, 4], x[0, 1:8, 1:8].mean(), rtol=1e-6)  # a 7x7 box in the interior
    with pytest.raises(Exception, match="value, mean or blur"):
        make_baseline(x, "noise", 0.0, False)
