"""ZBox with one bound per input channel (what `--normalize imagenet` gives the first layer): the template against
numpy, the composite against Zennit with per-channel low/high tensors, and the option checks."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp
from helpers import conv_numpy, dense_matrix, forward, template_relevance, zennit_rule

LOWS, HIGHS = [-2.1, -0.5, -1.8], [2.2, 0.7, 2.6]


def test_conv_zbox_per_channel_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 0, 1, 1], strides=[2, 1])
    (y,) = forward(node, x, {"w": w, "b": b})
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, "zbox", {"w": w, "b": b}, low=LOWS, high=HIGHS)
    zero = np.zeros(4)
    per_pixel = [np.broadcast_to(np.array(v)[:, None, None], x.shape[1:]).reshape(-1) for v in (LOWS, HIGHS)]
    bias = np.broadcast_to(b[:, None, None], y.shape[1:]).reshape(-1)
    for n in range(len(x)):
        def dense(weights):
            return dense_matrix(lambda e: conv_numpy(e, weights, zero, [2, 1], [1, 0, 1, 1], [1, 1], 1), x.shape[1:])
        expected = zennit_rule("zbox", x[n].astype(np.float64), r[n], dense, w.astype(np.float64), bias,
                               low=per_pixel[0], high=per_pixel[1])
        np.testing.assert_allclose(got[n], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    # one value for every channel equals the scalar form
    scalar = template_relevance(node, x, r, "zbox", {"w": w, "b": b}, low=-2.0, high=2.0)
    listed = template_relevance(node, x, r, "zbox", {"w": w, "b": b}, low=[-2.0] * 3, high=[2.0] * 3)
    np.testing.assert_allclose(listed, scalar, rtol=1e-6, atol=1e-7)


def test_epsilon_gamma_box_per_channel_equals_zennit(exported):
    torch = pytest.importorskip("torch")
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonGammaBox
    from torch_models import build, sample_input
    x = sample_input("concat")
    explainer = onnxlrp.Explainer(exported("concat", "dynamo18"), composite="epsilon_gamma_box", low=LOWS,
                                  high=HIGHS)
    outputs, relevance = explainer.explain(x.numpy())
    model = build("concat")
    target = outputs["y"].argmax(1)
    one_hot = torch.eye(outputs["y"].shape[1])[torch.as_tensor(target)]
    low, high = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (LOWS, HIGHS))
    with Gradient(model=model, composite=EpsilonGammaBox(low=low, high=high,
                                                         canonizers=[SequentialMergeBatchNorm()])) as attributor:
        _, expected = attributor(x.clone(), lambda out: out * one_hot)
    expected = expected.detach().numpy()
    assert np.abs(expected).sum() > 0
    assert np.linalg.norm(relevance - expected) / np.linalg.norm(expected) <= 1e-3
    scalar = onnxlrp.Explainer(exported("concat", "dynamo18"), composite="epsilon_gamma_box", low=-2.0, high=2.0)
    assert np.abs(scalar.explain(x.numpy())[1] - relevance).max() > 1e-4  # the bounds do matter


@pytest.mark.parametrize("low, high, message", [([0.0, 1.0], [1.0, 2.0, 3.0], "low has 2 values and high 3"),
                                                ([0.0, 2.0], 1.0, "must not exceed high"),
                                                ([0.0, float("nan")], 1.0, "finite")])
def test_bad_per_channel_bounds(low, high, message):
    from onnxlrp.composites import validate_options
    with pytest.raises(onnxlrp.OnnxlrpError, match=message):
        validate_options({"low": low, "high": high})


def test_per_channel_bounds_must_match_the_input_channels():
    model = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "digits_lrn.onnx"
    with pytest.raises(onnxlrp.OnnxlrpError, match="low has 3 values, one per channel, but input 'image' has 1"):
        onnxlrp.compile_model(model, "epsilon_gamma_box", low=[0.0, 0.0, 0.0])
