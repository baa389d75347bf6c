"""`onnxlrp explain` end to end on the shipped digits model, the rendering API, and every explain error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxlrp

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = ROOT / "models" / "samples"


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, "ONNXLRP_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", "explain", *args], capture_output=True, text=True,
                          env=env)


def _image(path: Path) -> np.ndarray:
    return (np.asarray(Image.open(path), dtype=np.float32) / 255.0)[None]


def test_shipped_model_is_accurate_and_small():
    info = json.loads((ROOT / "models" / "digits_lrn.json").read_text())
    assert info["test_accuracy"] >= 0.95
    assert MODEL.stat().st_size < 2_000_000
    assert len(list(SAMPLES.glob("digit_*.png"))) == 10


def test_explain_folder_writes_heatmaps_and_arrays(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run(str(MODEL), str(SAMPLES), "-o", str(out), cache=cache)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 10
    correct = 0
    for digit in range(10):
        line = [l for l in lines if f"digit_{digit}.png" in l][0]
        correct += f"predicted {digit} " in line
        png = Image.open(out / f"digit_{digit}.png")
        assert png.size == (32, 32) and png.mode == "RGB"
        assert len(np.unique(np.asarray(png).reshape(-1, 3), axis=0)) > 10  # not uniform
        relevance = np.load(out / f"digit_{digit}.npy")
        assert relevance.shape == (1, 32, 32)
        # the .npy equals the Python API's result for the same image
        _, expected = onnxlrp.Explainer(MODEL).explain(_image(SAMPLES / f"digit_{digit}.png")[None])
        np.testing.assert_allclose(relevance, expected[0], rtol=1e-5, atol=1e-7)
        assert f"sum {relevance.sum():.4g}" in line
    assert correct >= 9
    assert "compiled" in result.stderr
    again = run(str(MODEL), str(SAMPLES / "digit_3.png"), "-o", str(out), cache=cache)
    assert again.returncode == 0 and "using cached" in again.stderr


def test_relevance_sits_on_the_strokes():
    """For the digits model, most positive relevance lies where the digit is drawn."""
    images = np.stack([_image(SAMPLES / f"digit_{d}.png") for d in range(10)])
    _, relevance = onnxlrp.Explainer(MODEL, composite="epsilon_gamma_box", low=0.0, high=1.0).explain(images)
    strokes = images > 0.3
    positive = np.clip(relevance, 0, None)
    share = (positive * strokes).sum(axis=(1, 2, 3)) / positive.sum(axis=(1, 2, 3))
    area = strokes.mean(axis=(1, 2, 3))
    assert (share > 1.3 * area).all(), (share, area)  # stroke pixels are ~40 % of the image


def test_overlay_target_multiple_composites_and_npy_input(tmp_path):
    array = _image(SAMPLES / "digit_7.png")
    np.save(tmp_path / "seven.npy", array)
    out = tmp_path / "out"
    result = run(str(MODEL), str(tmp_path / "seven.npy"), str(SAMPLES / "digit_1.png"), "-o", str(out), "--target",
                 "7", "--overlay", "--zoom", "2", "--composite", "epsilon_plus", "--composite", "epsilon_gamma_box",
                 "--cmap", "coldnhot", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "explained 7" in result.stdout and "[epsilon_gamma_box]" in result.stdout
    assert Image.open(out / "seven.epsilon_plus.png").size == (64, 64)
    assert (out / "digit_1.epsilon_gamma_box.npy").exists()


def test_bad_inputs_are_reported_and_the_rest_processed(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 32, 32), np.float32))
    out = tmp_path / "out"
    result = run(str(MODEL), str(broken), str(wrong), str(SAMPLES / "digit_2.png"), "-o", str(out),
                 cache=tmp_path / "cache")
    assert result.returncode == 1
    assert "digit_2.png: predicted" in result.stdout and (out / "digit_2.png").exists()
    errors = [l for l in result.stderr.splitlines() if l.startswith("onnxlrp: error:")]
    assert any("broken.png: cannot decode the image" in l for l in errors)
    assert any("wrong.npy" in l and "[3, 32, 32]" in l and "['N', 1, 32, 32]" in l for l in errors)
    assert "2 input(s) failed" in result.stderr


@pytest.mark.parametrize("case", ["target", "outdir", "normalize", "cmap"])
def test_explain_errors_exit_non_zero_with_one_line(tmp_path, case):
    out = tmp_path / "out"
    args = [str(MODEL), str(SAMPLES / "digit_0.png"), "-o", str(out)]
    if case == "target":
        args += ["--target", "10"]
    elif case == "outdir":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args[3] = str(blocker / "sub")
    elif case == "normalize":
        args += ["--normalize", "a,b"]
    else:
        args += ["--cmap", "nope"]
    result = run(*args, cache=tmp_path / "cache")
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith("onnxlrp: error:")]
    assert len(errors) == 1
    expected = {"target": "target 10 out of range: the model has 10 classes", "outdir": "not writable",
                "normalize": "--normalize", "cmap": "unknown colormap"}[case]
    assert expected in errors[0]


def test_render_heatmap_is_symmetric_and_batch_first():
    relevance = np.zeros((2, 1, 4, 4), np.float32)
    relevance[0, 0, 0, 0], relevance[0, 0, 3, 3] = 1.0, -1.0
    images = onnxlrp.render_heatmap(relevance, cmap="bwr")
    assert len(images) == 2
    pixels = np.asarray(images[0])
    assert pixels[0, 0, 0] > 200 and pixels[0, 0, 2] < 60      # red for positive
    assert pixels[3, 3, 2] > 200 and pixels[3, 3, 0] < 60      # blue for negative
    assert (abs(pixels[1, 1].astype(int) - 255) < 5).all()     # white for zero (centre of bwr)
    blended = onnxlrp.render_heatmap(relevance[0], image=np.ones((4, 4)), alpha=0.5, zoom=3)
    assert blended.size == (12, 12)
