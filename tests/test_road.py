"""ROAD (road.py) against Quantus 0.6: the noisy linear imputation equals quantus' noisy_linear_imputation, and on
the shipped digits model the inputs Quantus's ROAD sends to the model (same relevance, percentages, np.random seed)
equal ours to 1e-6, with the same accuracy curve; a plane is imputed exactly; evaluate --metric road / fills."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxlrp.errors import OnnxlrpError
from onnxlrp.inputs import input_spec, load_input
from onnxlrp.road import impute, pixel_order, road_scores
from onnxlrp.runtime import Explainer, make_session

quantus = pytest.importorskip("quantus")
torch = pytest.importorskip("torch")

from ort_module import OrtModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("digit_*.png"))


@pytest.mark.parametrize("shape, removed", [((1, 12, 9), 1), ((1, 12, 9), 40), ((1, 32, 32), 900),
                                            ((1, 8, 8), 63)])
def test_imputation_equals_quantus(shape, removed):
    from quantus.functions.perturb_func import noisy_linear_imputation
    rng = np.random.default_rng(removed)
    x = rng.random(shape).astype(np.float32)
    indices = rng.permutation(shape[1] * shape[2])[:removed]
    np.testing.assert_allclose(impute(x, indices), noisy_linear_imputation(x, indices, noise=0.0), rtol=0,
                               atol=1e-6)
    np.random.seed(5)  # with noise: the same draws
    theirs = noisy_linear_imputation(x, indices, noise=0.01)
    ours = impute(x, indices, 0.01 * np.random.RandomState(5).randn(1, removed))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert not np.allclose(ours, impute(x, indices))
    kept = np.setdiff1d(np.arange(x[0].size), indices)
    assert (ours.reshape(-1)[kept] == x.reshape(-1)[kept]).all()


def test_imputation_of_a_plane_is_exact_and_channels_share_the_system():
    """Each removed pixel = weighted mean of its neighbours: a linear ramp satisfies that away from the border."""
    rows, cols = np.mgrid[:10, :12]
    plane = np.stack([0.3 * rows - 0.2 * cols + 1.0, 2.0 * cols]).astype(np.float64)
    interior = [r * 12 + c for r in range(2, 8) for c in range(3, 9) if (r + c) % 3]
    got = impute(plane, np.array(interior))
    np.testing.assert_allclose(got, plane, rtol=0, atol=1e-9)
    one_by_one = np.stack([impute(plane[c:c + 1], np.array(interior))[0] for c in range(2)])
    np.testing.assert_allclose(got, one_by_one)
    with pytest.raises(OnnxlrpError, match="every pixel removed"):
        impute(plane, np.arange(120))


@pytest.fixture(scope="module")
def digits():
    proto = onnx.load(str(MODEL))
    spec = input_spec(proto, None)
    x = np.stack([load_input(p, spec, "unit")[0] for p in SAMPLES[:5]])
    session = make_session(proto)
    target = session.run(None, {spec.name: x})[0].argmax(1)
    from onnxlrp.compile import compile_model
    _, relevance = Explainer.from_compiled(compile_model(MODEL, "epsilon_plus_flat")).explain(
        {spec.name: x}, target=target)
    return x, target, relevance.sum(axis=1, keepdims=True), session, spec.name


@pytest.mark.parametrize("noise, percentages", [(0.01, [1, 10, 30, 50, 70, 90, 99]), (0.0, [5, 40, 80, 95])])
def test_road_equals_quantus(digits, noise, percentages):
    x, target, a, session, name = digits
    model = OrtModule(session, name).eval()
    metric = quantus.ROAD(percentages=percentages, noise=noise, disable_warnings=True, display_progressbar=False)
    np.random.seed(11)
    metric(model=model, x_batch=x, y_batch=target, a_batch=a, softmax=False, channel_first=True, device="cpu")
    theirs = [b for b in model.seen if len(b) == len(x)]
    assert len(theirs) == len(percentages)  # one model call per percentage
    seen = []

    def predict(batch):
        seen.append(batch)
        return session.run(None, {name: batch})[0]

    counts = [int(1024 * p / 100) for p in percentages]  # Quantus's a_size * p / 100, truncated
    scores = road_scores(predict, x, pixel_order(a[:, 0], "morf"), counts, noise, np.random.RandomState(11))
    for ours, quantus_input in zip(seen, theirs):
        np.testing.assert_allclose(ours, quantus_input, rtol=0, atol=1e-6)
    accuracy = (scores.argmax(-1) == target[:, None]).mean(axis=0)
    np.testing.assert_allclose(accuracy, [metric.evaluation_scores[p] for p in percentages], rtol=0, atol=0)
    assert accuracy[0] == 1.0 and accuracy[-1] < 0.5  # removing the most relevant pixels changes the class


def test_evaluate_metrics_road_and_fills(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path / "cache"))
    from onnxlrp.evaluate import evaluate, report
    common = dict(steps=4, patch=8)
    results, failures = evaluate(MODEL, SAMPLES[:2], ["epsilon_plus_flat"], ["identity"],
                                 metrics=["pixel-flipping", "fills", "road"], **common)
    assert not failures
    by_label = {r.label: r for r in results}
    ours = by_label["epsilon_plus_flat / lrn identity"]
    assert set(ours.metrics) == {"fills", "road-morf", "road-lerf"}
    assert len(ours.metrics["road-morf"].curves[0]) == 4 and ours.metrics["road-morf"].curves[0][0] == 1.0
    # the mean over fills is the mean of the three fills' own pixel-flipping AUCs
    single = [evaluate(MODEL, SAMPLES[:2], ["epsilon_plus_flat"], ["identity"], fill=kind, **common)[0][0].aucs
              for kind in ("mean", "value", "blur")]
    np.testing.assert_allclose(ours.metrics["fills"].aucs, np.mean(single, axis=0), rtol=1e-12)
    # MoRF removes what LRP calls relevant: the score falls faster than LeRF's
    assert ours.metrics["road-morf"].aucs.mean() < ours.metrics["road-lerf"].aucs.mean()
    text = report(results)
    assert "ROAD MoRF" in text and "mean over fills" in text and "ROAD LeRF (higher better)" in text
    with pytest.raises(OnnxlrpError, match="--metric must be one of"):
        evaluate(MODEL, SAMPLES[:1], ["epsilon"], ["identity"], metrics=["roads"])


def test_road_curves_channels_last():
    """The NHWC twin of a model, fed the same images and relevance, gives the NCHW model's ROAD curves."""
    from test_reference_methods import predictor, tiny_model
    from onnxlrp.perturbation_metrics import road_curves
    first, last = make_session(tiny_model(3, 8)), make_session(tiny_model(3, 8, channels_last=True))
    rng = np.random.default_rng(4)
    x = rng.random((2, 3, 8, 8)).astype(np.float32)
    relevance = rng.normal(size=(2, 3, 8, 8))
    target = np.array([1, 4])
    x_last, rel_last = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, relevance))
    for order in ("morf", "lerf"):
        ours = road_curves(predictor(first, "x"), x, relevance, target, False, 4, order, None,
                           np.random.RandomState(0))
        twin = road_curves(predictor(last, "x"), x_last, rel_last, target, True, 4, order, None,
                           np.random.RandomState(0))
        np.testing.assert_allclose(twin, ours, rtol=1e-5, atol=1e-5)
        assert len(ours[0]) == 4 and ours[0][0] == 1.0 and not np.allclose(ours[0], 1.0)
