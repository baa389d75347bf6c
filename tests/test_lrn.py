"""LRN: the first-order Taylor rule against a numpy reference, conservation, and recognising PyTorch's
decomposed LocalResponseNorm in both exporters' graphs.

Derivation (Binder et al. 2016, seed 003). ONNX LRN: y_k = x_k / s_k^beta, s_k = bias + a Q_k, a = alpha/size,
Q_k = sum of x_j^2 over the channel window W(k). The first-order Taylor expansion of y_k at the root point with
only x_k kept splits y_k into an own term z_kk = x_k (bias + a x_k^2)^-beta and, for j in W(k), j != k, cross
terms z_jk = -2 a beta x_k x_j^2 s_k^(-beta-1) (from d y_k / d x_j = -2 a beta x_k x_j s_k^(-beta-1), times x_j).
R_k is split in proportion: R_{j<-k} = z_jk / stab(sum_j z_jk) R_k, hence sum_j R_{j<-k} = R_k.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
from onnx import helper

import onnxlrp
from helpers import forward, lrn_taylor_numpy, template_relevance
from torch_models import EXPORTERS, export


@pytest.mark.parametrize("size,alpha,beta,bias", [(5, 1e-2, 0.75, 1.0), (3, 0.5, 0.75, 2.0), (7, 1.0, 0.5, 1.0)])
def test_taylor_rule_matches_numpy_and_conserves(size, alpha, beta, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 4)).astype(np.float32) * 2
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)
    (y,) = forward(node, x)
    r = rng.standard_normal(y.shape).astype(np.float32)
    got = template_relevance(node, x, r, "taylor")
    np.testing.assert_allclose(got, lrn_taylor_numpy(x.astype(np.float64), r, size, alpha, beta, bias),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got.sum(), r.sum(), rtol=1e-4)
    np.testing.assert_allclose(template_relevance(node, x, r, "identity"), r)


def test_lrn_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 2, 2)).astype(np.float64)
    node = helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.5, beta=0.75, bias=1.0)
    r = rng.standard_normal(x.shape)
    got = template_relevance(node, x.astype(np.float32), r.astype(np.float32), "gradient")
    h = 1e-3
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fp = forward(node, xp.astype(np.float32))[0].astype(np.float64)
        fm = forward(node, xm.astype(np.float32))[0].astype(np.float64)
        numeric[idx] = ((fp - fm) * r).sum() / (2 * h)
    np.testing.assert_allclose(got, numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_torch_local_response_norm_becomes_lrn(tmp_path, exporter):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    path = export(model, x, tmp_path / "lrn.onnx", exporter)
    for rule in ("identity", "taylor"):
        compiled = onnxlrp.compile_model(path, "epsilon", lrn_rule=rule)
        lrn = [n for n in compiled.graph.node if n.op_type == "LRN"]
        assert len(lrn) == 1
        attrs = {a.name: helper.get_attribute_value(a) for a in lrn[0].attribute}
        assert attrs["size"] == 5 and np.isclose(attrs["alpha"], 1e-2) and np.isclose(attrs["bias"], 2.0)
        outputs, relevance = onnxlrp.Explainer(path, composite="epsilon", lrn_rule=rule).explain(x.numpy())
        np.testing.assert_allclose(outputs["y"], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
        assert np.isfinite(relevance).all() and relevance.shape == x.shape
