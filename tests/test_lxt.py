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


@pytest.fixture(scope="module")
def compiled(exports):
    """compiled(name, exporter, composite, bias) -> (compiled model, word-embedding tensor or None), cached."""
    cache = {}

    def get(name: str, exporter: str, composite: str, bias: bool = False):
        key = (name, exporter, composite, bias)
        if key not in cache:
            path = exports(name, exporter)
            embedding = word_embedding_output(onnx.load(str(path))) if name != "vit" else None
            model = onnxlrp.compile_model(str(path), composite, relevance_at=[embedding] if embedding else [],
                                          bias_relevance="layers" if bias else None)
            cache[key] = model, embedding
        return cache[key]

    return get


def _run(exports, compiled, name, exporter, composite, bias=False):
    """(original logits on ORT, inputs, per target: dict output name -> value of the compiled model)."""
    path = exports(name, exporter)
    model, embedding = compiled(name, exporter, composite, bias)
    inputs = sample_inputs(name)
    original = cpu_session(str(path))
    feeds = {i.name: inputs[i.name] for i in original.get_inputs()}
    (logits,) = original.run(["logits"], feeds)
    session = cpu_session(model)
    names = ["logits", LEAF[name]] + ([embedding + "_relevance"] if embedding else []) + \
        (["bias_relevance"] if bias else [])
    runs = [dict(zip(names, session.run(names, {**feeds, "target": target}))) for target in TARGETS]
    return logits, inputs, runs, embedding


LEAF = {"bert": "input_ids_relevance", "llama": "input_ids_relevance", "vit": "pixel_values_relevance"}


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_equals_lxt(lxt, exports, compiled, name, exporter, composite):
    reference = lxt[composite]
    logits, inputs, runs, embedding = _run(exports, compiled, name, exporter, composite)
    np.testing.assert_allclose(logits, reference[f"{name}/logits"], rtol=1e-4, atol=1e-5)
    leaf = LEAF[name]
    for k, values in enumerate(runs):
        for key, value in values.items():
            assert np.isfinite(value).all(), f"{key} not finite"
        if embedding:
            assert values[leaf].shape == inputs["input_ids"].shape and values[leaf].dtype == np.float32
            assert rel_l2(values[leaf], reference[f"{name}/t{k}/tokens"]) <= TOLERANCE, (leaf, k)
            if "attention_mask" in inputs:  # padded positions get exactly 0
                assert (values[leaf][inputs["attention_mask"] == 0] == 0).all()
            assert rel_l2(values[embedding + "_relevance"], reference[f"{name}/t{k}/embedding"]) <= TOLERANCE
        else:
            assert rel_l2(values[leaf], reference[f"{name}/t{k}/embedding"]) <= TOLERANCE, (leaf, k)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_original_output_bit_identical(exports, compiled, name, exporter, composite):
    logits, _, runs, _ = _run(exports, compiled, name, exporter, composite)
    for values in runs:
        assert np.array_equal(values["logits"], logits), \
            f"logits changed by compiling: max diff {np.abs(values['logits'] - logits).max():.1e}"


@pytest.mark.parametrize("composite", ("attnlrp", "cplrp"))
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_conservation(exports, compiled, name, exporter, composite):
    """Input relevance + the shares absorbed by biases, softmax and constant adds = the target logit."""
    logits, _, runs, _ = _run(exports, compiled, name, exporter, composite, bias=True)
    for target, values in zip(TARGETS, runs):
        start = logits[np.arange(len(target)), target]
        relevance = values[LEAF[name]].reshape(len(target), -1)
        total = relevance.sum(1) + values["bias_relevance"].sum(1)
        scale = np.abs(relevance).sum(1) + np.abs(values["bias_relevance"]).sum(1)
        assert np.all(np.abs(total - start) <= 1e-5 * scale + 1e-6), (total, start)
