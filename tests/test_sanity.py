"""The model-parameter randomisation sanity check (onnxlrp/sanity.py, `onnxlrp sanity`): which layers, which weights
change, step 0, the drop of similarity on the shipped digits model, and Quantus 0.6's ModelParameterRandomisation
run on the PyTorch twin of the model with the same random weights -> the same per-layer Spearman scores."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxlrp.errors import OnnxlrpError
from onnxlrp.sanity import (Layer, draw_normal, explain_with, parameter_layers, sanity, schedule, spearman, ssim,
                            with_initializers)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("digit_*.png"))
TOP_DOWN = ["classifier.4", "classifier.1", "features.8", "features.4", "features.0"]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    os.environ["ONNXLRP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return sanity(MODEL, SAMPLES, ["epsilon_plus_flat"], mode="cascade", seed=0)


def test_layers_in_topological_order():
    layers = parameter_layers(onnx.load(str(MODEL)))
    assert [layer.label for layer in layers] == TOP_DOWN[::-1]
    assert [layer.op for layer in layers] == ["Conv"] * 3 + ["Gemm"] * 2
    assert all(layer.bias == layer.label + ".bias" for layer in layers)
    cascade_steps, independent_steps = schedule(layers, "cascade"), schedule(layers, "independent")
    assert [[layer.label for layer in step] for step in cascade_steps] == [TOP_DOWN[:k] for k in range(1, 6)]
    assert [[layer.label for layer in step] for step in independent_steps] == [[name] for name in TOP_DOWN]
    with pytest.raises(OnnxlrpError, match="--mode must be cascade or independent"):
        schedule(layers, "bottom_up")


def test_matmul_with_add_bias_and_no_layers(tmp_path):
    """A MatMul's bias is the initializer of the Add right after it; a weight read twice is one layer; a layer is
    named after its weight, else its bias (here: ``dense``), else its node."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "dense.bias")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Add", ["y", "dense.bias"], ["z"]),
         helper.make_node("MatMul", ["x", "w"], ["y2"], name="again"), helper.make_node("Add", ["z", "y2"], ["out"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert parameter_layers(model) == [Layer("mm", "MatMul", "w", "dense.bias")]
    assert parameter_layers(model)[0].label == "dense" and Layer("mm", "MatMul", "w", None).label == "mm"
    del model.graph.initializer[:]
    model.graph.input.extend([helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3]),
                              helper.make_tensor_value_info("dense.bias", onnx.TensorProto.FLOAT, [3])])
    assert parameter_layers(model) == []  # weights fed as inputs are not the model's parameters
    onnx.save(model, str(tmp_path / "inputs_only.onnx"))
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    code, out, err = _cli_here(tmp_path / "inputs_only.onnx", tmp_path / "x.npy", "-o", tmp_path / "a.png")
    assert code == 2 and not out and not (tmp_path / "a.png").exists()
    assert err == f"onnxlrp: error: {tmp_path / 'inputs_only.onnx'}: no parameterised layer (Conv, ConvTranspose, " \
                  "Gemm or MatMul with a float initializer weight) to randomise\n"


def test_randomised_model_differs_only_in_the_chosen_layers():
    proto = onnx.load(str(MODEL))
    layers = parameter_layers(proto)
    originals = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    chosen = [layers[3], layers[4]]  # classifier.1 and classifier.4
    rng = np.random.default_rng(0)
    drawn = {}
    for layer in chosen:
        drawn.update(draw_normal(layer, {n: originals[n] for n in (layer.weight, layer.bias)}, rng))
    randomised = with_initializers(proto, drawn)
    after = {t.name: numpy_helper.to_array(t) for t in randomised.graph.initializer}
    assert after.keys() == originals.keys()
    changed = {name for name in originals if not np.array_equal(originals[name], after[name])}
    assert changed == {n for layer in chosen for n in (layer.weight, layer.bias)}
    for name in changed:
        a, r = originals[name], after[name]
        assert r.dtype == a.dtype and r.shape == a.shape
        # the draw's mean and std are the original's, up to sampling error (5 standard errors)
        assert abs(r.mean() - a.mean()) < 5 * a.std() / np.sqrt(a.size)
        assert abs(r.std() - a.std()) < 5 * a.std() * np.sqrt(2 / a.size) + 1e-7
    again = {}
    rng = np.random.default_rng(0)
    for layer in chosen:
        again.update(draw_normal(layer, {n: originals[n] for n in (layer.weight, layer.bias)}, rng))
    assert all(np.array_equal(drawn[n], again[n]) for n in drawn)  # seeded
    with pytest.raises(OnnxlrpError, match="replacement of shape"):
        with_initializers(proto, {"classifier.4.bias": np.zeros(3)})


def test_step_zero_is_the_intact_model(cascade):
    """Step 0 went through the randomisation path with nothing replaced: the same maps as an independent compile
    and explanation of the model file, for its own predicted classes; similarity 1."""
    from onnxlrp.compile import compile_model
    from onnxlrp.inputs import load_inputs
    from onnxlrp.runtime import Explainer, make_session
    x, _ = load_inputs(SAMPLES, MODEL)
    np.testing.assert_array_equal(cascade.images, x)
    np.testing.assert_array_equal(cascade.target, make_session(onnx.load(str(MODEL))).run(None, {"image": x})[0]
                                  .argmax(1))
    for method, composite in zip(cascade.methods, ("epsilon_plus_flat", "gradient")):
        _, relevance = Explainer.from_compiled(compile_model(MODEL, composite)).explain(x, target=cascade.target)
        np.testing.assert_array_equal(method.maps[0], relevance[:, 0])
        for name, scores in method.scores.items():
            assert scores.shape == (6, len(SAMPLES))
            np.testing.assert_allclose(scores[0], 1.0, rtol=0, atol=1e-12, err_msg=name)


def test_similarity_drops_on_the_digits_model(cascade):
    """With every layer random, the heatmaps are less like the intact model's than at step 0 on every measure;
    the signed rank correlation falls the most (the sign of the relevance is lost, as Adebayo et al. report)."""
    assert cascade.step_labels == ["original", "classifier.4"] + [f"+ {n}" for n in TOP_DOWN[1:]]
    for method in cascade.methods:
        final = {name: np.nanmean(scores[-1]) for name, scores in method.scores.items()}
        assert all(value < 1.0 for value in final.values()), (method.label, final)
        assert final["spearman"] < final["spearman_abs"], (method.label, final)
        for step in range(1, 6):  # every step changed every map
            assert not any(np.array_equal(method.maps[0][i], method.maps[step][i]) for i in range(len(SAMPLES)))


def test_similarity_functions():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 12))
    assert ssim(a, 3 * a) == pytest.approx(1.0) and ssim(a, -a) == pytest.approx(1.0)  # |R| / max |R|
    assert ssim(a, rng.normal(size=(12, 12))) < 0.5
    assert np.isnan(ssim(a[0], a[0]))  # not a 2-D map
    assert spearman(a, np.exp(a)) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros_like(a)))  # a constant map has no ranking


# ---- Quantus 0.6 cross-check -------------------------------------------------------------------------------------

def _digits_twin():
    """models/train_digits.py's DigitsNet carrying the shipped ONNX model's weights (same names)."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "models" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.DigitsNet().eval()
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
               for t in onnx.load(str(MODEL)).graph.initializer}
    net.load_state_dict({name: weights[name] for name in net.state_dict()})
    return net


@pytest.mark.parametrize("layer_order", ["top_down", "independent"])
def test_equals_quantus_model_parameter_randomisation(cascade, layer_order):
    """Quantus randomises the torch twin's modules itself (torch.manual_seed(seed + 1), then reset_parameters(),
    top module first); its explain_func explains the ONNX model carrying the twin's current weights with onnxlrp.
    sanity() gets the same random weights through its ``draw`` hook -> the same scores per layer to 1e-6."""
    quantus = pytest.importorskip("quantus")
    torch = pytest.importorskip("torch")
    net = _digits_twin()
    x, target = cascade.images[:4], cascade.target[:4]
    proto = onnx.load(str(MODEL))
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), explain_with(proto, "gradient", x, "image",
                                                                                  target)[0], rtol=0, atol=1e-4)

    explained = {}  # the abs and signed runs explain the same weights: once

    def explain_func(model, inputs, targets, **kwargs):
        weights = {name: value.detach().numpy() for name, value in model.state_dict().items()}
        key = b"".join(w.tobytes() for w in weights.values()) + np.asarray(inputs).tobytes()
        if key not in explained:
            explained[key] = explain_with(with_initializers(proto, weights), "epsilon_plus_flat",
                                          np.asarray(inputs, np.float32), "image", np.asarray(targets))[1]
        return explained[key]

    seed = 42
    mode = "cascade" if layer_order == "top_down" else "independent"

    def quantus_draw(layer, params, rng):  # what Quantus does to the module: seed + 1, reset_parameters()
        module = copy.deepcopy(dict(net.named_modules())[layer.label])
        torch.manual_seed(seed + 1)
        module.reset_parameters()
        return {layer.weight: module.weight.detach().numpy(), layer.bias: module.bias.detach().numpy()}

    ours_result = sanity(MODEL, SAMPLES[:4], ["epsilon_plus_flat"], mode=mode, draw=quantus_draw, gradient=False)
    names = ["original"] + TOP_DOWN
    assert [label.removeprefix("+ ") for label in ours_result.step_labels] == names
    for absolute in (True, False):  # Spearman of |R| and of R
        metric = quantus.ModelParameterRandomisation(layer_order=layer_order, seed=seed, abs=absolute, normalise=True,
                                                     disable_warnings=True, display_progressbar=False)
        theirs = metric(model=net, x_batch=x, y_batch=target, a_batch=ours_result.methods[0].maps[0][:, None],
                        explain_func=explain_func, channel_first=True, device="cpu")
        # Quantus's independent order is bottom-up (only top_down reverses its module list): match by layer name
        assert list(theirs) == ["original"] + (TOP_DOWN if mode == "cascade" else TOP_DOWN[::-1])
        ours = ours_result.methods[0].scores["spearman_abs" if absolute else "spearman"]
        np.testing.assert_allclose(np.array([theirs[name] for name in names]), ours, rtol=0, atol=1e-6,
                                   err_msg=f"abs={absolute}")
        assert np.nanmean(ours[-1]) < np.nanmean(ours[0])  # the weights really changed


# ---- CLI ---------------------------------------------------------------------------------------------------------

def _cli_here(*args):
    """The command in this process (click's runner; the one-line error handling is the same code)."""
    from click.testing import CliRunner

    from onnxlrp.cli import main
    done = CliRunner().invoke(main, ["sanity", *map(str, args)])
    return done.exit_code, done.stdout, done.stderr


def test_cli_table_and_figure(tmp_path):
    figure = tmp_path / "cascade.png"
    code, out, err = _cli_here(MODEL, *SAMPLES[:2], "--seed", "3", "-o", figure)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["method", "randomised", "Spearman", "|R|"]
    rows = [line for line in lines if line.startswith(("epsilon_plus_flat", "gradient x input"))]
    assert len(rows) == 12 and rows[0].split()[1:3] == ["original", "1.000"] and "+ features.0" in rows[5]
    assert all(row.split()[-1] == "2" for row in rows)  # inputs
    assert lines[-1] == f"figure: {figure}"
    from PIL import Image
    with Image.open(figure) as image:
        assert image.width > 600 and image.height > 600


def test_cli_bad_inputs(tmp_path):
    code, out, err = _cli_here(MODEL, tmp_path / "nope.png", "-o", tmp_path / "a.png")
    assert code == 2 and not out and not (tmp_path / "a.png").exists()
    assert err.strip() == f"onnxlrp: error: {tmp_path / 'nope.png'}: file not found"
    sample = tmp_path / "digit.png"
    sample.write_bytes(SAMPLES[0].read_bytes())
    code, out, err = _cli_here(MODEL, sample, "-o", sample)
    assert code == 2 and sample.read_bytes() == SAMPLES[0].read_bytes()
    assert err.count("\n") == 1 and "would overwrite the input" in err
    code, out, err = _cli_here(MODEL, sample, "-o", tmp_path / "a.xyz")
    assert code == 2 and "cannot write a figure of type 'xyz'" in err and not (tmp_path / "a.xyz").exists()
    code, out, err = _cli_here(tmp_path / "none.onnx", sample, "-o", tmp_path / "a.png")
    assert code == 2 and err == f"onnxlrp: error: {tmp_path / 'none.onnx'}: file not found\n"
    assert not (tmp_path / "a.png").exists()
    code, out, err = _cli_here(MODEL, sample, "--composite", "nonesuch", "-o", tmp_path / "a.png")
    assert code == 2 and err.startswith("onnxlrp: error: ") and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists()
