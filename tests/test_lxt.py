"""Cross-check against LXT 2.1 itself: AttnLRP and CP-LRP on tiny random-init Hugging Face BERT (GELU-Erf,
LayerNorm, token types, padding), ViT and Llama (RMSNorm, RoPE, grouped-query attention with 1 KV head, SiLU gated
MLP), each exported three ways (TorchScript opset 17 eager and SDPA attention, dynamo opset 18), two targets.

The compiled model's relevance at the word-embedding output (``--relevance-at``), its per-token sum
(``input_ids_relevance``) and ViT's ``pixel_values_relevance`` must equal LXT's (tests/lxt_reference.py, one
subprocess per method since LXT patches globally) to relative L2 <= 1e-4; the ``gradient`` composite must equal
plain autograd gradient x input there. Also: original outputs bit-identical to the uncompiled model on ORT,
relevance finite, and conservation (input + bias/softmax/constant shares = target logit).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("lxt.efficient", reason="needs the test extra (lxt 2.1, transformers 4.52.4)")

import onnxlrp  # noqa: E402
from transformer_models import EXPORTERS, NAMES, TARGETS, VOCAB, export, sample_inputs  # noqa: E402

HERE = Path(__file__).resolve().parent
COMPOSITES = ("attnlrp", "cplrp", "gradient")
TOLERANCE = 1e-4


class References:
    """LXT's relevance per method, computed once per session: the two LXT workers start as soon as the fixture
    is first used and run while the exports are made; gradient x input is computed in-process."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.loaded = folder, {}
        self.workers = {m: subprocess.Popen([sys.executable, str(HERE / "lxt_reference.py"), m,
                                             str(folder / f"{m}.npz")], stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)
                        for m in ("attnlrp", "cplrp")}

    def __getitem__(self, method: str):
        if method not in self.loaded:
            if method == "gradient":
                from lxt_reference import references
                self.loaded[method] = references("gradient")
            else:
                output, _ = self.workers[method].communicate(timeout=900)
                assert self.workers[method].returncode == 0, f"LXT worker {method} failed:\n{output[-3000:]}"
                self.loaded[method] = dict(np.load(self.folder / f"{method}.npz"))
        return self.loaded[method]


@pytest.fixture(scope="module")
def lxt(tmp_path_factory):
    refs = References(tmp_path_factory.mktemp("lxt"))
    yield refs
    for worker in refs.workers.values():
        if worker.poll() is None:
            worker.kill()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("transformer_exports"), {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in cache:
            cache[name, exporter] = export(name, exporter, folder / f"{name}_{exporter}.onnx")
        return cache[name, exporter]

    return get


def word_embedding_output(model: onnx.ModelProto) -> str:
    """The output of the Gather from the [vocab, hidden] word-embedding table (found by structure, not name)."""
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == VOCAB}
    found = [n.output[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert len(found) == 1, f"expected one word-embedding lookup, found {found}"
    return found[0]


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def cpu_session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_equals_lxt(lxt, exports, name, exporter, composite):
    reference = lxt[composite]
    path = exports(name, exporter)
    original = onnx.load(str(path))
    text = name != "vit"
    embedding = word_embedding_output(original) if text else None
    relevance_composite = composite != "gradient"
    compiled = onnxlrp.compile_model(str(path), composite, relevance_at=[embedding] if text else [],
                                     bias_relevance="layers" if relevance_composite else None)
    inputs = sample_inputs(name)
    feeds = {i.name: inputs[i.name] for i in cpu_session(str(path)).get_inputs()}
    (expected_logits,) = cpu_session(str(path)).run(["logits"], feeds)
    np.testing.assert_allclose(expected_logits, reference[f"{name}/logits"], rtol=1e-4, atol=1e-5)
    session = cpu_session(compiled)
    leaf = "input_ids_relevance" if text else "pixel_values_relevance"
    names = ["logits", leaf] + ([embedding + "_relevance"] if text else []) + \
        (["bias_relevance"] if relevance_composite else [])
    for k, target in enumerate(TARGETS):
        values = dict(zip(names, session.run(names, {**feeds, "target": target})))
        assert np.array_equal(values["logits"], expected_logits), "original output changed by compiling"
        for key in names[1:]:
            assert np.isfinite(values[key]).all(), f"{key} not finite"
        if text:
            assert values[leaf].shape == inputs["input_ids"].shape and values[leaf].dtype == np.float32
            expected_tokens = reference[f"{name}/t{k}/tokens"]
            assert rel_l2(values[leaf], expected_tokens) <= TOLERANCE, (leaf, k)
            if "attention_mask" in inputs:  # padded positions get exactly 0
                assert (values[leaf][inputs["attention_mask"] == 0] == 0).all()
            assert rel_l2(values[embedding + "_relevance"], reference[f"{name}/t{k}/embedding"]) <= TOLERANCE
        else:
            assert rel_l2(values[leaf], reference[f"{name}/t{k}/embedding"]) <= TOLERANCE, (leaf, k)
        if relevance_composite:  # input + absorbed shares (biases, softmax, constant adds) = target logit
            start = expected_logits[np.arange(len(target)), target]
            parts = [values[leaf].reshape(len(target), -1).sum(1), values["bias_relevance"].sum(1)]
            scale = np.abs(values[leaf]).reshape(len(target), -1).sum(1) + np.abs(values["bias_relevance"]).sum(1)
            assert np.all(np.abs(parts[0] + parts[1] - start) <= 1e-5 * scale + 1e-6), (parts, start)
