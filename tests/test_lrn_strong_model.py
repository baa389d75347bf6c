"""The shipped digits_lrn_strong model: its LRN layers really normalise (the statistics in its json, recomputed
here from the ONNX model on the test digits) and it reaches the accuracy its json states (>= 97 %)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")

from onnxlrp.runtime import make_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn_strong.onnx"


def test_strong_lrn_model_normalises_and_is_accurate():
    sys.path.insert(0, str(ROOT / "models"))
    from train_digits import load
    _, x, _, y = load()
    info = json.loads(MODEL.with_suffix(".json").read_text())
    proto = onnx.load(str(MODEL))
    lrns = [n for n in proto.graph.node if n.op_type == "LRN"]
    assert len(lrns) == 2
    for node in lrns:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    outputs = make_session(proto).run(["logits"] + [n.input[0] for n in lrns], {"image": x})
    accuracy = float((outputs[0].argmax(1) == y).mean())
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-4) and accuracy >= 0.97
    for node, a, stats in zip(lrns, outputs[1:], info["lrn_normaliser_on_test_data"]):
        attrs = {t.name: onnx.helper.get_attribute_value(t) for t in node.attribute}
        size, half = attrs["size"], (attrs["size"] - 1) // 2
        squares = np.pad(a.astype(np.float64) ** 2, ((0, 0), (half, size - 1 - half), (0, 0), (0, 0)))
        window = sum(squares[:, i:i + a.shape[1]] for i in range(size))
        d = (attrs.get("bias", 1.0) + attrs["alpha"] / size * window) ** attrs.get("beta", 0.75)
        cv = d.std() / d.mean()
        assert cv == pytest.approx(stats["coefficient_of_variation"], rel=1e-3)
        assert d.max() == pytest.approx(stats["max"], rel=1e-3) and d.min() == pytest.approx(stats["min"], rel=1e-3)
        assert cv > 0.1 and d.max() / d.min() > 2  # far from the shipped model's (CV 0.0005 and 0.0015)
