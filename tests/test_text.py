"""The text contract: token ids -> embedding lookup -> <ids>_relevance [N, T] float32, the per-token sum of the
relevance at the lookup output; masks and token types get none; padded positions get exactly 0."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from text_models import HIDDEN, bag_of_embeddings, sample_text_batch

import onnxlrp
from onnxlrp.graph import GraphView
from onnxlrp.lookups import TokenLookup, choose_ids_input
from onnxlrp.runtime import make_session

CPU = ["CPUExecutionProvider"]


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = make_session(model, CPU)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _feeds(target) -> dict[str, np.ndarray]:
    feeds = sample_text_batch()
    feeds["target"] = np.asarray(target, dtype=np.int64)
    return feeds


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1", "gradient"])
def test_ids_relevance_is_the_per_token_sum_at_the_lookup(composite):
    """Against the same network fed the embeddings as a float input (the contract's definition)."""
    feeds = _feeds([2, -1])
    text = _run(onnxlrp.compile_model(bag_of_embeddings(), composite), feeds)
    embeddings = onnx.numpy_helper.to_array(
        next(t for t in bag_of_embeddings().graph.initializer if t.name == "word_embeddings"))[feeds["input_ids"]]
    floats = {k: v for k, v in feeds.items() if k not in ("input_ids", "attention_mask")} | {"embeddings": embeddings}
    float_model = bag_of_embeddings(float_embeddings=True, constant_mask=feeds["attention_mask"])
    reference = _run(onnxlrp.compile_model(float_model, composite), floats)
    relevance = text["input_ids_relevance"]
    assert relevance.dtype == np.float32 and relevance.shape == feeds["input_ids"].shape
    np.testing.assert_allclose(relevance, reference["embeddings_relevance"].sum(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(text["logits"], reference["logits"])


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon", "gradient"])
def test_padded_positions_get_exactly_zero(composite):
    values = _run(onnxlrp.compile_model(bag_of_embeddings(), composite), _feeds([0, 1]))
    relevance = values["input_ids_relevance"]
    assert (relevance[1, 3:] == 0).all()
    assert (relevance[0] != 0).all() and (relevance[1, :3] != 0).all()


def test_outputs_inputs_and_original_outputs_unchanged():
    model = bag_of_embeddings()
    compiled = onnxlrp.compile_model(model)
    assert [i.name for i in compiled.graph.input] == ["input_ids", "attention_mask", "token_type_ids", "target"]
    assert [o.name for o in compiled.graph.output] == ["logits", "input_ids_relevance"]
    out = compiled.graph.output[1].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT and [d.dim_param or d.dim_value for d in out.shape.dim] == \
        ["N", 5]
    feeds = _feeds([-1, -1])
    original = make_session(model, CPU).run(["logits"], {k: v for k, v in feeds.items() if k != "target"})[0]
    np.testing.assert_array_equal(_run(compiled, feeds)["logits"], original)


def test_lrp0_without_biases_gives_the_logit_to_the_tokens():
    """Token-type and position embeddings are constant addends; with the pass rule of the CNN composites they
    keep no share, so LRP-0 without biases hands the whole logit to the word embeddings."""
    feeds = _feeds([0, 2])
    values = _run(onnxlrp.compile_model(bag_of_embeddings(biases=False), "epsilon", epsilon=0.0), feeds)
    start = values["logits"][np.arange(2), feeds["target"]]
    np.testing.assert_allclose(values["input_ids_relevance"].sum(1), start, rtol=1e-5)


def test_metadata_and_inspect_name_the_lookup():
    from onnxlrp.compile import make_plan
    from onnxlrp.report import inspect_text
    compiled = onnxlrp.compile_model(bag_of_embeddings())
    meta = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.token_ids"])
    assert meta["input"] == "input_ids" and meta["output"] == "input_ids_relevance"
    assert [lookup["node"] for lookup in meta["lookups"]] == ["word_lookup"]
    assert (meta["lookups"][0]["vocab"], meta["lookups"][0]["hidden"]) == (20, HIDDEN)
    assert meta["no_relevance"] == ["attention_mask", "token_type_ids"]
    text = inspect_text(make_plan(bag_of_embeddings()))
    assert "token ids: input_ids -> input_ids_relevance" in text and "word_lookup" in text
    assert "no relevance: attention_mask, token_type_ids" in text


def test_ids_through_an_integer_cast_and_unhelpful_names():
    model = bag_of_embeddings(cast_ids=True, ids_name="tokens", types_name="segments")
    view = GraphView(model)
    assert [lookup.input for lookup in view.token_lookups] == ["tokens"]
    feeds = _feeds([1, 1])
    feeds["tokens"], feeds["segments"] = feeds.pop("input_ids"), feeds.pop("token_type_ids")
    values = _run(onnxlrp.compile_model(model), feeds)
    assert values["tokens_relevance"].shape == (2, 5) and (values["tokens_relevance"][1, 3:] == 0).all()


def test_choice_of_the_ids_input():
    lookup = lambda name, vocab: TokenLookup(name, 0, f"{name}_out", f"{name}_w", vocab, 4)  # noqa: E731
    assert choose_ids_input([]) is None
    assert choose_ids_input([lookup("token_type_ids", 2), lookup("input_ids", 30)]) == "input_ids"
    assert choose_ids_input([lookup("a", 2), lookup("b", 30)]) == "b"  # the largest vocabulary
    assert choose_ids_input([lookup("position_ids", 512), lookup("input_ids", 30)]) == "input_ids"
    assert choose_ids_input([lookup("token_type_ids", 2)]) is None  # a segment input alone is no text input


def test_integer_inputs_of_image_models_are_still_images():
    """An integer input that is only cast to float is a raw image unless the model has a token-ids lookup."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["xf", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "w")])
    view = GraphView(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [vi.name for vi in view.float_inputs] == ["x"] and view.token_lookups == []


def test_deeplift_refuses_token_ids():
    with pytest.raises(onnxlrp.OnnxlrpError, match="token ids"):
        onnxlrp.compile_model(bag_of_embeddings(), "deeplift")


# --- onnxlrp explain --text ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    from text_models import wordpiece_tokenizer
    folder = tmp_path_factory.mktemp("text")
    wordpiece_tokenizer(folder / "tokenizer.json")
    onnx.save(bag_of_embeddings(tokens=8), folder / "bag.onnx")
    return folder


def test_explain_texts_tokenizes_runs_and_writes_html(text_files, tmp_path, monkeypatch):
    from onnxlrp.text import explain_texts
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path / "cache"))
    lines = []
    results = explain_texts(text_files / "bag.onnx", ["The movie was badly boring", "fun!"],
                            text_files / "tokenizer.json", tmp_path / "out", ["epsilon"], target=2,
                            log=lines.append, warn=lambda m: None)
    assert results[0].tokens == ["[CLS]", "the", "movie", "was", "bad", "##ly", "boring", "[SEP]"]
    assert results[1].tokens == ["[CLS]", "fun", "!", "[SEP]"]  # the 4 padded positions are not shown
    # the same numbers as the compiled model run on ids encoded by hand (vocabulary of text_models.WORDS)
    ids = np.array([[2, 4, 5, 6, 8, 10, 17, 3], [2, 16, 19, 3, 0, 0, 0, 0]])
    mask = (np.arange(8) < np.array([[8], [4]])).astype(np.int64)
    explainer = onnxlrp.Explainer(bag_of_embeddings(tokens=8), "epsilon")
    _, relevance = explainer.explain({"input_ids": ids, "attention_mask": mask,
                                      "token_type_ids": np.zeros_like(ids)}, target=2)
    np.testing.assert_allclose(results[0].relevance, relevance[0], rtol=1e-6)
    np.testing.assert_allclose(results[1].relevance, relevance[1, :4], rtol=1e-6)
    assert (relevance[1, 4:] == 0).all()
    assert lines[0].startswith("'The movie was badly boring': predicted") and "explained 2" in lines[0]
    assert "bad(" in lines[1] and "\x1b[" not in lines[1]  # no colour when stdout is not a terminal
    page = (tmp_path / "out" / "text.html").read_text()
    assert page.count('<span style="background: rgb(') == 12 and ">ly</span>" in page  # ## pieces joined
    saved = json.loads((tmp_path / "out" / "text.json").read_text())
    assert saved[1]["tokens"] == results[1].tokens and saved[0]["explained"] == 2


def test_token_colours():
    from onnxlrp.text import TextResult, _shade, token_line
    assert _shade(1.0, 1.0) == (255, 0, 0) and _shade(-1.0, 1.0) == (0, 0, 255) and _shade(0.0, 1.0) == (255,) * 3
    result = TextResult("a b", "epsilon", ["a", "b"], [0.5, -1.0], 0, 1.0, 0)
    line = token_line(result, colour=True)
    assert "\x1b[48;2;255;128;128m" in line and "\x1b[48;2;0;0;255m" in line


def test_cli_explain_text(text_files, tmp_path):
    from click.testing import CliRunner

    from onnxlrp.cli import main
    runner, env = CliRunner(), {"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["explain", str(text_files / "bag.onnx"), "--text", "a good film", "--tokenizer",
            str(text_files / "tokenizer.json"), "-o", str(tmp_path / "out"), "--composite", "epsilon"]
    result = runner.invoke(main, args + ["--color", "always"], env=env)
    assert result.exit_code == 0, result.output
    assert "\x1b[48;2;" in result.output and "film(" in result.output and (tmp_path / "out" / "text.html").exists()
    plain = runner.invoke(main, args, env=env)  # auto: CliRunner's stdout is no terminal
    assert plain.exit_code == 0 and "\x1b[" not in plain.output
    for bad, message in [(["--tokenizer", str(tmp_path / "none.json")], "cannot read the tokenizer"),
                         ([], "--text and --tokenizer go together")]:
        failed = runner.invoke(main, ["explain", str(text_files / "bag.onnx"), "--text", "x"] + bad, env=env)
        assert failed.exit_code == 2 and message in failed.output
    image = runner.invoke(main, ["explain", str(text_files / "bag.onnx"), "x.png", "--text", "x", "--tokenizer",
                                 str(text_files / "tokenizer.json")], env=env)
    assert image.exit_code == 2 and "not both" in image.output
