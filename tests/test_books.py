"""The books close on attention models: Σ input relevance + Σ absorbed shares (biases, AttnLRP's softmax share,
constant addends such as position and token-type embeddings, normalisations) = start relevance, per sample, for
relevance and gradient-signal composites, on a tiny BERT (tests/transformer_models.py) with padding."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from text_models import bag_of_embeddings
from transformer_models import export, sample_inputs

import onnxlrp
from onnxlrp.runtime import make_session

TARGET = np.array([0, 2])


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return export("bert", "ts17", tmp_path_factory.mktemp("bert") / "bert.onnx")


def _run(compiled: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = make_session(compiled, ["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("composite", ["attnlrp", "cplrp", "gradient", "epsilon"])
def test_bert_books_close_with_the_softmax_and_constant_shares(bert, composite):
    compiled = onnxlrp.compile_model(bert, composite, bias_relevance="layers")
    values = _run(compiled, sample_inputs("bert") | {"target": TARGET})
    start = values["logits"][np.arange(2), TARGET]
    tokens, absorbed = values["input_ids_relevance"], values["bias_relevance"]
    np.testing.assert_allclose(tokens.sum(1) + absorbed.sum(1), start, rtol=1e-5, atol=1e-6)
    assert (tokens[1, -3:] == 0).all()  # padded positions
    columns = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.bias_relevance"])
    kinds = {c["kind"] for c in columns}
    assert {"bias", "normalization", "constant"} <= kinds
    share = {kind: sum(absorbed[:, k] for k, c in enumerate(columns) if c["kind"] == kind) for kind in kinds}
    if composite == "attnlrp":
        assert "softmax" in kinds and np.abs(share["softmax"]).min() > 1e-3  # AttnLRP's softmax keeps a share
        assert np.abs(share["constant"]).min() > 1e-3  # position / token-type embeddings absorb
    if composite == "cplrp":
        assert "softmax" not in kinds  # the attention probabilities are constants: nothing reaches the softmax
    if composite == "epsilon":
        np.testing.assert_array_equal(share["constant"], 0)  # the pass rule keeps nothing at a constant addend


def test_relevance_at_the_word_embeddings_of_bert(bert):
    model = onnx.load(str(bert))
    meta = json.loads({p.key: p.value for p in onnxlrp.compile_model(model, "attnlrp").metadata_props}[
        "onnxlrp.token_ids"])
    (lookup,) = meta["lookups"]
    assert (lookup["vocab"], lookup["hidden"]) == (50, 32) and meta["no_relevance"] == ["attention_mask",
                                                                                          "token_type_ids"]
    compiled = onnxlrp.compile_model(model, "attnlrp", relevance_at=[lookup["output"]])
    values = _run(compiled, sample_inputs("bert") | {"target": TARGET})
    at = values[lookup["output"] + "_relevance"]
    assert at.shape == (2, 8, 32)
    np.testing.assert_allclose(at.sum(-1), values["input_ids_relevance"], rtol=1e-5, atol=1e-7)


def test_check_prints_the_books(tmp_path):
    path = tmp_path / "bag.onnx"
    onnx.save(bag_of_embeddings(), path)
    run = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "-o", str(tmp_path / "c.onnx"),
                          "--check", "--composite", "epsilon"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    books = next(line for line in run.stdout.splitlines() if line.startswith("books: "))
    gap = float(books.split("gap ")[1].split(" (")[1].split(" of")[0])
    assert "bias" in books and gap < 1e-5


def test_explain_text_on_bert(bert, tmp_path, monkeypatch):
    """Tokenizer -> ids, attention mask and token types matched by name on a real export (dynamic length)."""
    from text_models import wordpiece_tokenizer

    from onnxlrp.text import explain_texts
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path / "cache"))
    wordpiece_tokenizer(tmp_path / "tokenizer.json")
    results = explain_texts(bert, ["the plot was not good", "fun"], tmp_path / "tokenizer.json", tmp_path / "out",
                            ["attnlrp"], log=lambda m: None, warn=lambda m: None)
    ids = np.array([[2, 4, 12, 6, 9, 11, 3], [2, 16, 3, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    _, relevance = onnxlrp.Explainer(bert, "attnlrp").explain(
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    np.testing.assert_allclose(results[0].relevance, relevance[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[1].relevance, relevance[1, :3], rtol=1e-5, atol=1e-7)
    assert (relevance[1, 3:] == 0).all() and len(results[1].tokens) == 3
