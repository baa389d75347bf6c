"""`evaluate --definition quantus-*` against Quantus 0.6 itself: the shipped digits model (Quantus calls it through
a torch module that runs the same ONNX Runtime session), the same inputs, onnxlrp's relevance as a_batch, the same
settings -> the same curves and AUCs to 1e-6. Also what each definition does that the other does not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

quantus = pytest.importorskip("quantus")
torch = pytest.importorskip("torch")

from ort_module import OrtModule  # noqa: E402

from onnxlrp.evaluate import evaluate  # noqa: E402
from onnxlrp.inputs import input_spec, load_input  # noqa: E402
from onnxlrp.runtime import Explainer, make_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("digit_*.png"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """x, targets, relevance per method label (compiled here, independently of evaluate), the Quantus model."""
    import os
    os.environ["ONNXLRP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    import onnx
    from onnxlrp.compile import compile_model
    proto = onnx.load(str(MODEL))
    spec = input_spec(proto, None)
    x = np.stack([load_input(p, spec, "unit")[0] for p in SAMPLES])
    session = make_session(proto)
    target = session.run(None, {spec.name: x})[0].argmax(1)
    relevance = {}
    for label, composite, options in (("epsilon / lrn identity", "epsilon", {"lrn_rule": "identity"}),
                                      ("epsilon / lrn taylor", "epsilon", {"lrn_rule": "taylor"}),
                                      ("gradient x input", "gradient", {})):
        _, rel = Explainer.from_compiled(compile_model(MODEL, composite, **options)).explain(
            {spec.name: x}, target=target)
        relevance[label] = rel
    return x, target, relevance, OrtModule(session, spec.name).eval()


def _quantus(metric, digits, a):
    x, target, _, model = digits
    return np.array(metric(model=model, x_batch=x, y_batch=target, a_batch=a, softmax=False, channel_first=True,
                           device="cpu"))  # float64 (pixel flipping) or float32 (region perturbation), as Quantus


CASES = [("quantus-pixel-flipping", 4, 16, "mean", 0.0), ("quantus-pixel-flipping", 8, 16, "value", 0.25),
         ("quantus-region-perturbation", 4, 16, "mean", 0.0), ("quantus-region-perturbation", 5, 30, "value", 0.0),
         ("quantus-region-perturbation", 3, 50, "mean", 0.0), ("quantus-pixel-flipping", 1, 16, "black", 0.0),
         ("quantus-region-perturbation", 8, 100, "white", 0.0)]


@pytest.mark.parametrize("definition, patch, steps, fill, value", CASES)
def test_evaluate_equals_quantus(digits, monkeypatch, definition, patch, steps, fill, value):
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # Quantus 0.6 calls np.trapz (gone in numpy 2.4)
    results, failures = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity", "taylor"], steps=steps, patch=patch,
                                 fill=fill, fill_value=value, definition=definition)
    assert not failures
    ours = {r.label: r for r in results}
    baseline = float(value) if fill == "value" else fill
    for label, relevance in digits[2].items():
        if definition == "quantus-pixel-flipping":
            metric = quantus.PixelFlipping(features_in_step=patch * patch, perturb_baseline=baseline,
                                           disable_warnings=True, display_progressbar=False)
        else:
            metric = quantus.RegionPerturbation(patch_size=patch, regions_evaluation=steps, order="morf",
                                                perturb_baseline=baseline, disable_warnings=True,
                                                display_progressbar=False)
        curves = _quantus(metric, digits, relevance)
        expected_steps = 1024 // (patch * patch) if definition == "quantus-pixel-flipping" else \
            min(steps, (-(-32 // patch)) ** 2)
        assert curves.shape == (len(SAMPLES), expected_steps)
        assert np.ptp(curves) > 1.0  # the curves move: flipping changes the score
        np.testing.assert_allclose(np.array(ours[label].curves), curves, rtol=0, atol=1e-6, err_msg=label)
        aucs = np.array([quantus.helpers.utils.calculate_auc(c) for c in curves])  # as get_auc_score does
        np.testing.assert_allclose(ours[label].aucs, aucs, rtol=0, atol=1e-6, err_msg=label)
        # Quantus averages float32 AUCs in float32 (region perturbation): equal to float32's rounding
        assert ours[label].aucs.mean() == pytest.approx(float(metric.get_auc_score), rel=1e-6)


def test_quantus_definition_differs_from_onnxlrp(digits):
    """Same settings, different numbers: relative vs raw score, mean over [0, 1] vs trapezoids of width 1."""
    ours, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=16, patch=4, definition="onnxlrp")
    theirs, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=16, patch=4,
                         definition="quantus-pixel-flipping")
    assert len(ours[0].curves[0]) == 17 and ours[0].curves[0][0] == pytest.approx(1.0)
    assert len(theirs[0].curves[0]) == 64
    assert 0 < abs(ours[0].aucs.mean()) < 2 < abs(theirs[0].aucs.mean())


def test_quantus_definition_refuses_blur():
    from onnxlrp.errors import OnnxlrpError
    with pytest.raises(OnnxlrpError, match="Quantus has no blur fill"):
        evaluate(MODEL, SAMPLES[:1], ["epsilon"], ["identity"], fill="blur", definition="quantus-region-perturbation")
    with pytest.raises(OnnxlrpError, match="--fill must be value, mean or blur"):
        evaluate(MODEL, SAMPLES[:1], ["epsilon"], ["identity"], fill="black", definition="onnxlrp")


def test_cli_definition(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "ONNXLRP_CACHE_DIR": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "onnxlrp.cli", "evaluate", str(MODEL), *map(str, SAMPLES[:2]), "--composite",
               "epsilon", "--lrn-rule", "identity", "--definition", "quantus-region-perturbation", "-o",
               str(tmp_path / "curves.png")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "region-perturbation" in done.stdout and "higher AUC = more faithful" in done.stdout
    assert (tmp_path / "curves.png").stat().st_size > 0
    done = subprocess.run(command[:-2] + ["--fill", "blur", "-o", str(tmp_path / "blur.png")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2 and not (tmp_path / "blur.png").exists()
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("onnxlrp: error: ")
