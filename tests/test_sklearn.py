"""scikit-learn exports (skl2onnx): linear models, pipelines with StandardScaler / Normalizer, MLPs compile; the
label output listed first and ZipMap's seq(map) probabilities do not stop compile (the probabilities'
pre-activation is explained); relevance equals LRP-0 computed by hand from the estimator's coefficients; tree
ensembles and kernel SVMs are refused by name."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("skl2onnx")
from skl2onnx import to_onnx  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import Normalizer, StandardScaler  # noqa: E402
from sklearn.svm import SVC, LinearSVC  # noqa: E402

from onnxlrp import compile_model  # noqa: E402
from onnxlrp.errors import OnnxlrpError  # noqa: E402

RNG = np.random.RandomState(0)
X = (RNG.randn(80, 5) * [1.0, 2.0, 0.5, 1.0, 3.0] + [0.5, -1.0, 0.0, 2.0, 0.0]).astype(np.float32)
Y3 = ((X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 0.3)).astype(np.int64)
Y2 = (X[:, 0] - X[:, 3] > -2).astype(np.int64)
YR = (2 * X[:, 0] - X[:, 1] + 0.5 * X[:, 4]).astype(np.float32)
SAMPLE = X[:6]


def _fit(estimator, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(X, y)


def _explain(estimator, **options):
    """Compile the skl2onnx export (LRP-0) and run it: (compiled model, original outputs, compiled outputs)."""
    model = to_onnx(estimator, X[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    compiled = compile_model(model, "epsilon", epsilon=0.0, **options)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {"X": SAMPLE}
    if any(i.name == "target" for i in session.get_inputs()):  # classifiers: the top class (regressions default)
        feeds["target"] = np.full(len(SAMPLE), -1, np.int64)
    return compiled, original.run(None, {"X": SAMPLE}), dict(zip(names, session.run(None, feeds)))


def _meta(compiled) -> dict:
    return {p.key: p.value for p in compiled.metadata_props}


def _lrp0_dense(a: np.ndarray, layers, start_class=None) -> np.ndarray:
    """LRP-0 through dense layers (W [in, out], b) with ReLU between them, from the raw output score of
    ``start_class`` (argmax when None; a single output when there is one column)."""
    acts = [a.astype(np.float64)]
    for k, (w, b) in enumerate(layers):
        z = acts[-1] @ w + b
        acts.append(np.maximum(z, 0) if k < len(layers) - 1 else z)
    out = acts[-1]
    cls = out.argmax(1) if start_class is None else np.full(len(a), start_class)
    r = np.zeros_like(out)
    r[np.arange(len(a)), cls] = out[np.arange(len(a)), cls]
    for k in range(len(layers) - 1, -1, -1):
        w, b = layers[k]
        z = acts[k] @ w + b
        r = acts[k] * ((r / np.where(z == 0, 1, z)) @ w.T)
    return r


def _check_outputs_identical(original, outputs: dict):
    for k, value in enumerate(original):
        name = list(outputs)[k]
        if isinstance(value, list):  # ZipMap's list of dicts
            assert value == outputs[name]
        else:
            assert np.array_equal(value, outputs[name])


@pytest.mark.parametrize("kind", ["logistic", "logistic_binary", "linear_svc", "scaled", "normalized"])
def test_linear_classifiers(kind):
    estimator = {"logistic": lambda: _fit(LogisticRegression(), Y3),
                 "logistic_binary": lambda: _fit(LogisticRegression(), Y2),
                 "linear_svc": lambda: _fit(LinearSVC(), Y3),
                 "scaled": lambda: _fit(make_pipeline(StandardScaler(), LogisticRegression()), Y3),
                 "normalized": lambda: _fit(make_pipeline(Normalizer(), LogisticRegression()), Y3)}[kind]()
    compiled, original, outputs = _explain(estimator)
    _check_outputs_identical(original, outputs)
    meta = _meta(compiled)
    assert meta["onnxlrp.explained_output"] in ("output_probability", "probabilities")
    head = estimator[-1] if hasattr(estimator, "steps") else estimator
    features = SAMPLE.astype(np.float64)
    if kind == "scaled":
        features = estimator[0].transform(SAMPLE).astype(np.float64)
    elif kind == "normalized":  # the norm is treated as a constant: relevance of x = relevance of x / |x|
        features = estimator[0].transform(SAMPLE).astype(np.float64)
    coef, intercept = head.coef_.astype(np.float64), head.intercept_.astype(np.float64)
    if coef.shape[0] == 1:  # binary: skl2onnx writes the two rows [-w, w]
        coef, intercept = np.vstack([-coef, coef]), np.hstack([-intercept, intercept])
    expected = _lrp0_dense(features, [(coef.T, intercept)])
    relevance = outputs["X_relevance"]
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5)
    # the explained class is the top raw score = the predicted label
    scores = features @ coef.T + intercept
    np.testing.assert_array_equal(scores.argmax(1), np.asarray(original[0]).reshape(-1) if kind != "logistic_binary"
                                  else np.asarray(original[0]).reshape(-1))


def test_explicit_target_class():
    estimator = _fit(LogisticRegression(), Y3)
    model = to_onnx(estimator, X[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    compiled = compile_model(model, "epsilon", epsilon=0.0)
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    relevance = session.run(["X_relevance"], {"X": SAMPLE, "target": np.full(6, 2, np.int64)})[0]
    np.testing.assert_allclose(relevance, SAMPLE * estimator.coef_[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("regressor", ["linear", "mlp"])
def test_regressors(regressor):
    estimator = _fit(LinearRegression() if regressor == "linear" else
                     MLPRegressor(hidden_layer_sizes=(8,), max_iter=200, random_state=0), YR)
    _, original, outputs = _explain(estimator)
    _check_outputs_identical(original, outputs)
    if regressor == "linear":
        layers = [(estimator.coef_.reshape(-1, 1).astype(np.float64), np.atleast_1d(estimator.intercept_))]
    else:
        layers = [(w.astype(np.float64), b.astype(np.float64))
                  for w, b in zip(estimator.coefs_, estimator.intercepts_)]
    np.testing.assert_allclose(outputs["X_relevance"], _lrp0_dense(SAMPLE, layers), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("classes", [3, 2])
def test_mlp_classifier(classes):
    """Multi-class: the logits before Softmax; binary: the logit z before [1 - sigmoid(z), sigmoid(z)]."""
    estimator = _fit(MLPClassifier(hidden_layer_sizes=(8,), max_iter=200, random_state=0), Y3 if classes == 3 else Y2)
    _, original, outputs = _explain(estimator)
    _check_outputs_identical(original, outputs)
    layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in zip(estimator.coefs_, estimator.intercepts_)]
    np.testing.assert_allclose(outputs["X_relevance"], _lrp0_dense(SAMPLE, layers), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("estimator, op", [(RandomForestClassifier(n_estimators=3, random_state=0),
                                            "TreeEnsembleClassifier"), (SVC(), "SVMClassifier")])
def test_trees_and_kernel_svms_are_refused_by_name(estimator, op):
    model = to_onnx(_fit(estimator, Y3), X[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    with pytest.raises(OnnxlrpError, match=rf"node \S+ \({op}\): .* have no LRP rule") as error:
        compile_model(model)
    assert "\n" not in str(error.value)


def test_imputer_pipeline_routes_relevance_to_present_features():
    """SimpleImputer -> Imputer: Where(IsNaN(x), imputed, x); missing features get no relevance, the others the
    linear model's x * w (the imputed values take part in the scores but belong to no input)."""
    from sklearn.impute import SimpleImputer
    estimator = _fit(make_pipeline(SimpleImputer(), LogisticRegression()), Y3)
    model = to_onnx(estimator, X[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    compiled = compile_model(model, "epsilon", epsilon=0.0)
    sample = SAMPLE.copy()
    sample[0, 1] = sample[3, 4] = np.nan
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    relevance = session.run(["X_relevance"], {"X": sample, "target": np.full(len(sample), -1, np.int64)})[0]
    filled = estimator[0].transform(sample).astype(np.float64)
    head = estimator[-1]
    expected = _lrp0_dense(filled, [(head.coef_.T.astype(np.float64), head.intercept_.astype(np.float64))])
    expected[np.isnan(sample)] = 0.0
    assert np.isfinite(relevance).all()
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5)
