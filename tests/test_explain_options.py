"""`onnxlrp explain`'s newcomer options: labels (file and model metadata), several targets, --json (also on
stdout), resize modes, ZBox bounds that follow --normalize, shared colour scale, colour bar, option checks; and
the public loader onnxlrp.load_inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.inputs import fit_image, zbox_bounds
from onnxlrp.labels import model_labels, parse_labels

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = ROOT / "models" / "samples"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def explain(tmp_path, *args):
    runner = CliRunner()
    return runner.invoke(main, ["explain", str(MODEL), *args], env={"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")},
                         catch_exceptions=False)


def test_labels_targets_and_json_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "out"
    result = explain(tmp_path, str(SAMPLES / "digit_3.png"), str(SAMPLES / "digit_5.png"), "-o", str(out),
                     "--labels", str(labels), "--target", "3", "--target", "5", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{SAMPLES / 'digit_3.png'}: predicted 3 three (")
    assert ", explained 3 three, sum " in lines[0] and ", explained 5 five, sum " in lines[1]
    records = json.loads((tmp_path / "r.json").read_text())
    assert [(Path(r["input"]).name, r["explained"]) for r in records] == [
        ("digit_3.png", 3), ("digit_3.png", 5), ("digit_5.png", 3), ("digit_5.png", 5)]
    for record in records:
        relevance = np.load(record["relevance"])
        assert record["heatmap"].endswith(f".{record['explained']}.png") and Path(record["heatmap"]).exists()
        assert record["relevance_sum"] == pytest.approx(float(relevance.sum()), rel=1e-6)
        assert record["explained_label"] == NAMES[record["explained"]]
        assert record["predicted_label"] == NAMES[record["predicted"]]
        # the explained class's score is conserved up to the biases' share (epsilon_plus_flat)
        assert np.isfinite(record["explained_score"])
    # each target's relevance equals the Python API's for that target
    x, files = onnxlrp.load_inputs([SAMPLES / "digit_3.png", SAMPLES / "digit_5.png"], MODEL)
    _, expected = onnxlrp.Explainer(MODEL).explain(x, target=5)
    np.testing.assert_allclose(np.load(out / "digit_5.5.npy"), expected[1], rtol=1e-5, atol=1e-7)


def test_json_on_stdout_is_pure_and_labels_come_from_metadata(tmp_path):
    model = onnx.load(str(MODEL))
    model.metadata_props.add(key="onnxlrp.labels", value=json.dumps(NAMES))
    path = tmp_path / "named.onnx"
    onnx.save(model, str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    runner = CliRunner()
    result = runner.invoke(main, ["explain", str(path), str(SAMPLES / "digit_7.png"), str(broken), "-o",
                                  str(tmp_path / "o"), "--json", "-"],
                           env={"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 1, result.stderr  # one input failed
    records = json.loads(result.stdout)  # nothing else on stdout
    assert records[0]["predicted_label"] == "seven" and records[0]["explained"] == 7
    assert records[1]["input"] == str(broken) and "cannot decode" in records[1]["error"]
    assert "predicted 7 seven" in result.stderr


def test_labels_of_the_wrong_length_warn(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n")
    result = explain(tmp_path, str(SAMPLES / "digit_1.png"), "-o", str(tmp_path / "o"), "--labels", str(labels))
    assert result.exit_code == 0
    assert "2 class names for 10 classes" in result.stderr and "predicted 1 one (" in result.stdout


@pytest.mark.parametrize("value, expected", [
    ('["cat", "dog"]', ["cat", "dog"]), ("{0: 'person', 2: 'car'}", ["person", "1", "car"]),
    ('{"0": "a", "1": "b"}', ["a", "b"]), ("a\nb\n", ["a", "b"]), ("12", None)])
def test_parse_metadata_labels(value, expected):
    assert parse_labels(value) == expected


def test_model_labels_reads_exporter_keys():
    model = onnx.ModelProto()
    model.metadata_props.add(key="names", value="{0: 'person', 1: 'bicycle'}")
    assert model_labels(model) == ["person", "bicycle"]


def test_resize_modes_keep_the_aspect_ratio():
    image = Image.new("RGB", (40, 20), "black")
    image.paste(Image.new("RGB", (8, 20), "white"), (0, 0))  # a white band on the left fifth
    crop = np.asarray(fit_image(image, 10, 10, "crop"))
    assert crop.shape == (10, 10, 3) and crop.max() == 0  # the centre half: the band is cropped away
    pad = np.asarray(fit_image(image, 10, 10, "pad"))
    assert pad[:2].max() == 0 and pad[-2:].max() == 0  # letterbox rows top and bottom
    assert pad[4, 0].min() > 200  # the band is still there
    squash = fit_image(image, 10, 10, "squash")
    assert np.asarray(squash)[5, 1].min() > 200


def test_zbox_bounds_follow_normalize():
    low, high = zbox_bounds("imagenet")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(low, -mean / std)
    np.testing.assert_allclose(high, (1 - mean) / std)
    assert zbox_bounds("unit") == (0.0, 1.0) and zbox_bounds("none") == (0.0, 255.0)
    assert zbox_bounds("0.5,0.25") == (-2.0, 2.0)
    grey_low, _ = zbox_bounds("imagenet", channels=1)
    assert grey_low == pytest.approx(-mean.mean() / std.mean())


def test_explain_zbox_uses_normalize_bounds(tmp_path):
    result = explain(tmp_path, str(SAMPLES / "digit_4.png"), "-o", str(tmp_path / "o"), "--composite",
                     "epsilon_gamma_box", "--normalize", "0.5,0.25")
    assert result.exit_code == 0, result.stderr
    x, _ = onnxlrp.load_inputs(SAMPLES / "digit_4.png", MODEL, normalize="0.5,0.25")
    assert x.min() >= -2.0 and x.max() <= 2.0
    _, expected = onnxlrp.Explainer(MODEL, composite="epsilon_gamma_box", low=-2.0, high=2.0).explain(x)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "digit_4.npy"), expected[0], rtol=1e-5, atol=1e-7)
    # an explicit --low/--high wins
    explicit = explain(tmp_path, str(SAMPLES / "digit_4.png"), "-o", str(tmp_path / "p"), "--composite",
                       "epsilon_gamma_box", "--normalize", "0.5,0.25", "--low", "-3", "--high", "3")
    assert explicit.exit_code == 0
    _, other = onnxlrp.Explainer(MODEL, composite="epsilon_gamma_box", low=-3.0, high=3.0).explain(x)
    np.testing.assert_allclose(np.load(tmp_path / "p" / "digit_4.npy"), other[0], rtol=1e-5, atol=1e-7)


def test_shared_scale_and_colorbar(tmp_path):
    out = tmp_path / "out"
    result = explain(tmp_path, str(SAMPLES / "digit_5.png"), str(SAMPLES / "digit_6.png"), "-o", str(out),
                     "--scale", "shared", "--colorbar")
    assert result.exit_code == 0, result.stderr
    maps = {d: np.load(out / f"digit_{d}.npy")[0] for d in (5, 6)}
    top = max(np.abs(m).max() for m in maps.values())
    for d, m in maps.items():
        png = np.asarray(Image.open(out / f"digit_{d}.png")).astype(int)
        assert png.shape[1] > 32  # the colour bar
        heat = png[(png.shape[0] - 32) // 2:][:32, :32]  # the heatmap, centred beside the taller bar
        r, c = np.unravel_index(np.argmax(m), m.shape)
        # bwr from white (0) to red (+scale): green = 255 (1 - R / shared maximum)
        assert heat[r, c, 1] == pytest.approx(255 * (1 - m[r, c] / top), abs=3)
    assert max(np.abs(m).max() for m in maps.values()) > 1.5 * min(np.abs(m).max() for m in maps.values())


@pytest.mark.parametrize("args, message", [
    (["--zoom", "0"], "--zoom"), (["--size", "0", "5"], "--size"), (["--batch-size", "0"], "--batch-size"),
    (["--low", "0,0,0"], "3 values given"), (["--low", "a"], "--low"), (["--labels", "/nonexistent/l.txt"], "labels"),
    (["--resize-mode", "stretch"], "--resize-mode")])
def test_bad_options_fail_before_writing(tmp_path, args, message):
    out = tmp_path / "out"
    result = explain(tmp_path, str(SAMPLES / "digit_0.png"), "-o", str(out), *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists()


def test_load_inputs_returns_batch_and_files():
    x, files = onnxlrp.load_inputs(SAMPLES, MODEL)
    assert x.shape == (10, 1, 32, 32) and x.dtype == np.float32
    assert [f.name for f in files] == sorted(p.name for p in SAMPLES.glob("*.png"))
    assert 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(onnxlrp.OnnxlrpError, match="no input files"):
        onnxlrp.load_inputs([], MODEL)


def test_explain_output_picks_the_explained_output(tmp_path):
    """A model with two heads: --explain-output explains the second one's classes."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    weights = {"w1": rng.standard_normal((4, 3)).astype(np.float32), "w2": rng.standard_normal((4, 6)).astype(
        np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["first"]), helper.make_node("MatMul", ["x", "w2"], ["second"])],
        "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("first", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("second", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    path = tmp_path / "heads.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    x = rng.standard_normal(4).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                                       "--explain-output", "second", "--composite", "epsilon", "--epsilon", "0",
                                       "--json", "-"], env={"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    second = x @ weights["w2"]
    assert record["predicted"] == int(second.argmax())
    assert record["explained_score"] == pytest.approx(float(second.max()), rel=1e-5)
    assert record["relevance_sum"] == pytest.approx(float(second.max()), rel=1e-4)  # LRP-0 on a linear map
    np.testing.assert_allclose(np.load(record["relevance"]), x * weights["w2"][:, second.argmax()], rtol=1e-4)
