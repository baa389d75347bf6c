"""evaluate's black-box references: occlusion equal to Captum's Occlusion (the same ONNX Runtime session behind a
torch module), RISE's masks equal to eclique/RISE's (skimage resize of the same cells and shifts) and its saliency
to a numpy loop over the same masks, RISE on a linear model follows the weights, the CLI with references."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxlrp.assemble import IR_VERSION
from onnxlrp.reference_methods import bilinear_matrix, occlusion, rise, rise_masks, window_starts
from onnxlrp.runtime import make_session

torch = pytest.importorskip("torch")

from ort_module import OrtModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("digit_*.png"))


def tiny_model(channels: int, size: int, channels_last: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> Flatten -> Gemm (5 classes) with random weights; NHWC input if channels_last."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(4, channels, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    g = numpy_helper.from_array(rng.normal(size=(4 * size * size, 5)).astype(np.float32) / size, "g")
    nodes = [helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2])] if channels_last else []
    nodes += [helper.make_node("Conv", ["xc" if channels_last else "x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
              helper.make_node("Gemm", ["f", "g"], ["y"])]
    shape = ["N", size, size, channels] if channels_last else ["N", channels, size, size]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])], [w, b, g])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    return model


def predictor(session, name: str):
    return lambda batch: session.run(None, {name: batch})[0].reshape(len(batch), -1)


@pytest.mark.parametrize("channels, size, patch, stride", [(1, 8, 2, 2), (3, 9, 3, 3), (3, 8, 4, 2), (2, 10, 3, 1)])
def test_occlusion_equals_captum(channels, size, patch, stride):
    from captum.attr import Occlusion
    session = make_session(tiny_model(channels, size))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, channels, size, size)).astype(np.float32)
    baselines = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape).astype(np.float32)  # the mean fill
    target = session.run(None, {"x": x})[0].argmax(1)
    ours = occlusion(predictor(session, "x"), x, target, baselines, patch, stride)
    assert all(s + patch >= size for s in window_starts(size, patch, stride)[-1:])  # these windows fit exactly
    theirs = Occlusion(OrtModule(session, "x")).attribute(
        torch.from_numpy(x), sliding_window_shapes=(channels, patch, patch), strides=(channels, stride, stride),
        baselines=torch.from_numpy(baselines), target=torch.from_numpy(target)).numpy()
    assert np.ptp(ours) > 0.1
    for c in range(channels):  # every channel of a pixel gets the window's drop
        np.testing.assert_allclose(ours, theirs[:, c], rtol=0, atol=1e-5)


def test_occlusion_digits_model_and_channels_last():
    """The shipped model against Captum; an NHWC twin of a tiny model gives the NCHW model's map."""
    from captum.attr import Occlusion
    from onnxlrp.inputs import input_spec, load_input
    proto = onnx.load(str(MODEL))
    spec = input_spec(proto, None)
    x = np.stack([load_input(p, spec, "unit")[0] for p in SAMPLES[:3]])
    session = make_session(proto)
    target = session.run(None, {spec.name: x})[0].argmax(1)
    fill = np.zeros_like(x)
    ours = occlusion(predictor(session, spec.name), x, target, fill, 4)
    theirs = Occlusion(OrtModule(session, spec.name)).attribute(
        torch.from_numpy(x), sliding_window_shapes=(1, 4, 4), strides=(1, 4, 4), baselines=0.0,
        target=torch.from_numpy(target)).numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert np.ptp(ours) > 1.0
    first, last = make_session(tiny_model(3, 8)), make_session(tiny_model(3, 8, channels_last=True))
    x3 = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    x3_last = np.ascontiguousarray(np.moveaxis(x3, 1, -1))
    target3 = np.array([0, 3])
    np.testing.assert_allclose(
        occlusion(predictor(last, "x"), x3_last, target3, np.zeros_like(x3_last), 2, channels_last=True),
        occlusion(predictor(first, "x"), x3, target3, np.zeros_like(x3), 2), rtol=0, atol=1e-5)
    masks = rise_masks(30, 4, 0.5, (8, 8), np.random.default_rng(0))
    np.testing.assert_allclose(rise(predictor(last, "x"), x3_last, target3, masks, 0.5, channels_last=True),
                               rise(predictor(first, "x"), x3, target3, masks, 0.5), rtol=1e-5, atol=1e-5)


def test_occlusion_covers_the_edge():
    """Patch 3 on 8 pixels: Captum's windows start at 0 and 3 (pixels 6, 7 uncovered); one more starts at 5. On a
    linear score with a zero fill a window's drop is the sum of its weights, averaged over the covering windows."""
    assert window_starts(8, 3, 3) == [0, 3, 5]
    assert window_starts(8, 4, 4) == [0, 4] and window_starts(8, 8, 4) == [0] and window_starts(3, 5, 5) == [0]
    weights = np.arange(64, dtype=np.float64).reshape(8, 8)
    linear = lambda b: np.stack([(b[:, 0] * weights).sum(axis=(1, 2)), np.zeros(len(b))], 1)  # noqa: E731
    x = np.ones((1, 1, 8, 8))
    got = occlusion(linear, x, np.array([0]), np.zeros_like(x), 3)[0]
    expected = np.zeros((8, 8))
    for u in range(8):
        for v in range(8):
            drops = [weights[r:r + 3, c:c + 3].sum() for r in (0, 3, 5) for c in (0, 3, 5)
                     if r <= u < r + 3 and c <= v < c + 3]
            expected[u, v] = np.mean(drops)
    np.testing.assert_allclose(got, expected)
    assert got[7, 7] == weights[5:, 5:].sum() and got[0, 0] == weights[:3, :3].sum()


def test_rise_masks_equal_the_reference_generator():
    """eclique/RISE's generate_masks: skimage resize (order 1, reflect, no anti-aliasing) of the same cells to
    (s + 1) * ceil(H / s), cropped at the same shifts."""
    from skimage.transform import resize
    n, grid, p, size = 40, 5, 0.4, (23, 30)
    masks = rise_masks(n, grid, p, size, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # the same draws in the same order
    cells = rng.random((n, grid, grid)) < p
    cell = (-(-size[0] // grid), -(-size[1] // grid))
    shift_y, shift_x = rng.integers(0, cell[0], n), rng.integers(0, cell[1], n)
    up = ((grid + 1) * cell[0], (grid + 1) * cell[1])
    for i in range(n):
        expected = resize(cells[i].astype("float32"), up, order=1, mode="reflect", anti_aliasing=False)
        expected = expected[shift_y[i]:shift_y[i] + size[0], shift_x[i]:shift_x[i] + size[1]]
        np.testing.assert_allclose(masks[i], expected, rtol=0, atol=1e-6)
    assert 0 <= masks.min() and masks.max() <= 1 and len(np.unique(np.round(masks, 3))) > 3  # smooth, not binary
    np.testing.assert_allclose(bilinear_matrix(4, 10).sum(axis=1), 1.0)


def test_rise_equals_a_numpy_loop_on_the_digits_model():
    from onnxlrp.inputs import input_spec, load_input
    proto = onnx.load(str(MODEL))
    spec = input_spec(proto, None)
    x = np.stack([load_input(p, spec, "unit")[0] for p in SAMPLES[:2]])
    session = make_session(proto)
    predict = predictor(session, spec.name)
    target = predict(x).argmax(1)
    masks = rise_masks(60, 8, 0.5, (32, 32), np.random.default_rng(0))
    ours = rise(predict, x, target, masks, 0.5, batch_size=16)  # chunks that do not divide 60
    for i in range(len(x)):
        expected = np.zeros((32, 32))
        for m in masks:
            expected += float(predict((x[i] * m)[None])[0, target[i]]) * m
        np.testing.assert_allclose(ours[i], expected / 60 / 0.5, rtol=1e-5, atol=1e-5)


def test_rise_on_a_linear_model_converges_to_its_expectation():
    """score = w . x + b: E[score(x * M) M(u)] / p = (sum_v w_v x_v E[M_u M_v] + b E[M_u]) / p. RISE with 4000
    masks approaches that expectation (estimated from 20000 other masks), a smoothed copy of w * x."""
    size, p = 16, 0.5
    yy, xx = np.mgrid[:size, :size] / size
    weights = (np.sin(3 * yy) + np.cos(2 * xx) - 1).astype(np.float32)
    gemm = numpy_helper.from_array(weights.reshape(-1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "bias"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])],
        [gemm, numpy_helper.from_array(np.array([2.0], np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    predict = predictor(make_session(model), "x")
    x = np.random.default_rng(3).uniform(0.5, 1.5, size=(1, 1, size, size)).astype(np.float32)
    other = rise_masks(20000, 4, p, (size, size), np.random.default_rng(1)).reshape(20000, -1).astype(np.float64)
    second_moment = other.T @ other / len(other)  # E[M_u M_v]
    expected = (second_moment @ (weights * x[0, 0]).ravel() + 2.0 * other.mean(axis=0)) / p
    errors = []
    for n in (40, 4000):
        saliency = rise(predict, x, np.array([0]), rise_masks(n, 4, p, (size, size), np.random.default_rng(0)), p)
        errors.append(np.linalg.norm(saliency[0].ravel() - expected) / np.linalg.norm(expected))
    assert errors[1] < 0.03 < errors[0]
    assert np.corrcoef(expected, weights.ravel())[0, 1] > 0.8  # the expectation follows the weights


def test_evaluate_cli_with_references_and_bad_values(tmp_path):
    from click.testing import CliRunner
    from onnxlrp.cli import main
    env = {"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["evaluate", str(MODEL), *map(str, SAMPLES[:2]), "--composite", "epsilon_plus_flat", "--lrn-rule",
            "identity", "--steps", "4", "--patch", "8"]
    ok = CliRunner().invoke(main, args + ["--reference", "occlusion", "--reference", "rise", "--rise-masks", "40",
                                          "-o", str(tmp_path / "c.png")], env=env)
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.splitlines()
    assert lines[0].split()[-2:] == ["ms/input", "inputs"]
    rows = {line.split("  ")[0]: line.split() for line in lines[2:7]}
    assert list(rows) == ["epsilon_plus_flat / lrn identity", "gradient x input", "occlusion", "RISE", "random"]
    assert rows["random"][-2] == "–" and all(float(rows[m][-2]) > 0 for m in list(rows)[:4])
    none = CliRunner().invoke(main, args + ["--reference", "none", "-o", str(tmp_path / "d.png")], env=env)
    assert none.exit_code == 0 and "occlusion" not in none.stdout and "random" in none.stdout
    for bad, message in ((["--reference", "lime"], "--reference"), (["--rise-p", "0"], "--rise-p"),
                         (["--rise-masks", "0"], "--rise-masks"), (["--metric", "auc"], "--metric"),
                         (["--metric", "road", "--definition", "quantus-pixel-flipping"], "drop --metric road")):
        result = CliRunner().invoke(main, args + bad + ["-o", str(tmp_path / "e.png")], env=env)
        assert result.exit_code == 2, (bad, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxlrp: error:") and message in lines[0], lines
        assert not (tmp_path / "e.png").exists()
