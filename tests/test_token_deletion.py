"""evaluate --tokenizer: token deletion for text models (onnxlrp/token_deletion.py), against a loop written here
from the definition, on the shipped tiny BERT and on a hand-built bag-of-words model with a known answer."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from text_models import WORDS, wordpiece_tokenizer

import onnxlrp
from onnxlrp import token_deletion
from onnxlrp.evaluate import area_under_curve

ROOT = Path(__file__).resolve().parents[1]
BERT, BERT_TOKENIZER = ROOT / "models" / "tiny_bert_sentiment.onnx", ROOT / "models" / "tiny_bert_tokenizer.json"
CPU = ["CPUExecutionProvider"]
#: per-token weights of the bag-of-words model (text_models.WORDS vocabulary; every other token weighs 0)
WEIGHTS = {"[CLS]": 1.0, "[SEP]": 0.5, "the": 0.25, "movie": 1.0, "was": -0.5, "great": 2.0}


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """One compiled-model cache for the module's tests (each composite of the tiny BERT is compiled once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXLRP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def bag_of_words(path: Path, length: int = 6) -> Path:
    """input_ids [N, 6] -> Gather(weights [vocab, 1]) -> Reshape [N, 6] -> MatMul(ones [6, 1]) -> score [N, 1]: the
    score is the sum of the tokens' weights (a MatMul with ones, as onnxlrp has no rule for ReduceSum; the static
    length also exercises text_feeds's padding to the model's length)."""
    table = np.zeros((len(WORDS), 1), np.float32)
    for word, weight in WEIGHTS.items():
        table[WORDS.index(word), 0] = weight
    graph = helper.make_graph(
        [helper.make_node("Gather", ["weights", "input_ids"], ["per_token"], name="lookup"),
         helper.make_node("Reshape", ["per_token", "flat"], ["flat_tokens"], name="flatten"),
         helper.make_node("MatMul", ["flat_tokens", "ones"], ["score"], name="sum")],
        "bag_of_words", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", length])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(table, "weights"), numpy_helper.from_array(np.array([0, length], np.int64), "flat"),
         numpy_helper.from_array(np.ones((length, 1), np.float32), "ones")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    folder = tmp_path_factory.mktemp("words")
    wordpiece_tokenizer(folder / "tokenizer.json")
    return bag_of_words(folder / "bag.onnx"), folder / "tokenizer.json"


class FeedSpy:
    """Records the feeds of every forward run (runs without a target: not the explaining ones)."""

    def __init__(self, monkeypatch):
        import onnxlrp.runtime as runtime
        self.batches, make = [], runtime.make_session
        spy = self

        class Session:
            def __init__(self, session):
                self.session = session

            def run(self, names, feeds):
                if not any(k.startswith("target") for k in feeds):
                    spy.batches.append({k: np.array(v) for k, v in feeds.items()})
                return self.session.run(names, feeds)

            def __getattr__(self, name):
                return getattr(self.session, name)

        monkeypatch.setattr(runtime, "make_session", lambda *a, **k: Session(make(*a, **k)))


def _vocab(path: Path) -> dict[str, int]:
    return json.loads(path.read_text())["model"]["vocab"]


def loop_curves(text: str, relevance: np.ndarray, steps: int, unk: int) -> tuple[list[float], list[float]]:
    """The definition, written out: [CLS] words [SEP] (the sentence is whole words of the vocabulary), order the
    words by relevance (ties: earlier first), replace the first round(k / steps * n) by [UNK] (Python's round:
    halves to even), one ORT run per step on the original model, logit of the predicted class."""
    import onnxruntime as ort
    vocab = _vocab(BERT_TOKENIZER)
    ids = [vocab["[CLS]"]] + [vocab[w] for w in text.split()] + [vocab["[SEP]"]]
    session = ort.InferenceSession(str(BERT), providers=CPU)

    def logits(token_ids):
        x = np.array([token_ids], np.int64)
        return session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x),
                                        "token_type_ids": np.zeros_like(x)})[0][0]
    target = int(np.argmax(logits(ids)))
    words = list(range(1, len(ids) - 1))
    curves = []
    for order in (sorted(words, key=lambda p: (-relevance[p], p)), sorted(words, key=lambda p: (relevance[p], p))):
        curve = []
        for k in range(steps + 1):
            changed = list(ids)
            for p in order[:round(Fraction(k * len(words), steps))]:
                changed[p] = unk
            curve.append(float(logits(changed)[target]))
        curves.append(curve)
    return curves[0], curves[1]


def test_curves_equal_a_loop_from_the_definition_on_the_shipped_bert():
    texts = ["the movie was not good !", "a really dull film but the acting is good"]  # the first one gets padded
    steps = 4  # 6 words: counts 0, 2 (1.5 to even), 3, 4 (4.5 to even), 6
    results, skipped = token_deletion.evaluate_texts(BERT, texts, BERT_TOKENIZER, ["attnlrp"], steps)
    assert skipped == [] and [r.label for r in results] == ["attnlrp", "gradient x input", "random"]
    explainer = onnxlrp.Explainer(BERT, "attnlrp")
    for k, text in enumerate(texts):
        ids = np.array([[_vocab(BERT_TOKENIZER)[t] for t in ["[CLS]", *text.split(), "[SEP]"]]])
        _, relevance = explainer.explain({"input_ids": ids, "attention_mask": np.ones_like(ids),
                                          "token_type_ids": np.zeros_like(ids)})
        morf, lerf = loop_curves(text, relevance[0], steps, _vocab(BERT_TOKENIZER)["[UNK]"])
        np.testing.assert_allclose(results[0].morf[k], morf, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(results[0].lerf[k], lerf, rtol=1e-4, atol=1e-4)
        assert results[0].morf_aucs[k] == pytest.approx(area_under_curve(np.array(morf)), abs=1e-4)
    assert morf[0] == pytest.approx(3.50, abs=0.01) and morf[-1] != pytest.approx(morf[0], abs=0.1)


@pytest.mark.parametrize("deletion", ["unk", "pad", "attention"])
def test_special_tokens_and_padding_are_never_deleted(deletion, monkeypatch):
    spy = FeedSpy(monkeypatch)
    texts = ["the movie was not good !", "a really dull film but the acting is good"]
    steps = 5
    token_deletion.evaluate_texts(BERT, texts, BERT_TOKENIZER, ["cplrp"], steps, deletion)
    undeleted, *runs = spy.batches  # the first run: the predicted classes of the undeleted texts
    assert len(runs) == 3 * len(texts)  # cplrp, gradient x input, random
    vocab = _vocab(BERT_TOKENIZER)
    replacement = {"unk": vocab["[UNK]"], "pad": vocab["[PAD]"], "attention": None}[deletion]
    for r, feeds in enumerate(runs):
        k = r % len(texts)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.shape == (2 * steps + 1, undeleted["input_ids"].shape[1])
        original_ids, original_mask = undeleted["input_ids"][k], undeleted["attention_mask"][k]
        special = np.isin(original_ids, [vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]])
        words = ~special
        assert special.sum() == (5 if k == 0 else 2) and words.sum() == len(texts[k].split())
        # special tokens and padding: the same id and mask in every row
        assert (ids[:, special] == original_ids[special]).all() and (mask[:, special] == original_mask[special]).all()
        # step 0: the undeleted text; the last MoRF (row steps) and LeRF (row 2 steps) rows: every word deleted
        assert (ids[0] == original_ids).all() and (mask[0] == original_mask).all()
        for row in range(2 * steps + 1):
            if replacement is None:
                deleted = words & (mask[row] == 0)
                assert (ids[row] == original_ids).all()
            else:
                deleted = words & (ids[row] == replacement)
                assert (mask[row] == original_mask).all()
            count = 0 if row == 0 else (row - 1) % steps + 1
            assert deleted.sum() == round(Fraction(count * words.sum(), steps))  # nested: each step adds
            if row not in (0, 1, steps + 1):
                assert (deleted >= previous).all()
            previous = deleted
        assert ((ids[steps] == replacement) if replacement is not None else (mask[steps] == 0))[words].all()
        assert ((ids[2 * steps] == replacement) if replacement is not None else (mask[2 * steps] == 0))[words].all()


@pytest.mark.parametrize("composite", ["gradient", "epsilon"])
def test_bag_of_words_order_is_the_weights_and_the_auc_a_hand_computation(words, composite):
    model, tokenizer = words
    steps = 4
    results, _ = token_deletion.evaluate_texts(model, ["The movie was great"], tokenizer, [composite], steps)
    curves = {r.label: r for r in results}["gradient x input" if composite == "gradient" else composite]
    # weights: [CLS] 1, the 0.25, movie 1, was -0.5, great 2, [SEP] 0.5, [UNK] 0 -> score 4.25
    # most relevant first: great, movie, the, was; least relevant first: was, the, movie, great
    np.testing.assert_allclose(curves.morf[0], [4.25, 2.25, 1.25, 1.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(curves.lerf[0], [4.25, 4.75, 4.5, 3.5, 1.5], rtol=1e-6)
    # trapezoids over the fractions 0, 1/4, ..., 1: (3.25 + 1.75 + 1.125 + 1.25) / 4 and (4.5 + 4.625 + 4 + 2.5) / 4
    assert curves.morf_aucs[0] == pytest.approx(1.84375, abs=1e-6)
    assert curves.lerf_aucs[0] == pytest.approx(3.90625, abs=1e-6)
    assert curves.abpc[0] == pytest.approx(2.0625, abs=1e-6)
    relative, _ = token_deletion.evaluate_texts(model, ["The movie was great"], tokenizer, [composite], steps,
                                                score="relative")
    np.testing.assert_allclose(relative[0].morf[0], np.array([4.25, 2.25, 1.25, 1.0, 1.5]) / 4.25, rtol=1e-6)


def test_deletion_order_and_batch():
    relevance = np.array([9.0, 0.5, -1.0, 0.5, 3.0, 7.0])
    deletable = np.array([False, True, True, True, True, False])
    assert token_deletion.deletion_order(relevance, deletable).tolist() == [4, 1, 3, 2]  # tie: earlier first
    assert token_deletion.deletion_order(relevance, deletable, least_first=True).tolist() == [2, 1, 3, 4]
    feeds = {"ids": np.arange(12).reshape(2, 6), "mask": np.ones((2, 6), np.int64)}
    batch = token_deletion.deleted_feeds(feeds, 1, [np.array([4, 1, 3, 2])], 2, "ids", "mask", 99)
    assert batch["ids"].tolist() == [[6, 7, 8, 9, 10, 11], [6, 99, 8, 9, 99, 11], [6, 99, 99, 99, 99, 11]]
    masked = token_deletion.deleted_feeds(feeds, 0, [np.array([4, 1, 3, 2])], 2, "ids", "mask", None)
    assert masked["mask"].tolist() == [[1] * 6, [1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1]]
    assert (masked["ids"] == feeds["ids"][0]).all()


def test_cli_end_to_end(words, tmp_path):
    from click.testing import CliRunner

    from onnxlrp.cli import main
    model, tokenizer = words
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was great\n\nthe movie was bad\n", encoding="utf-8")
    plot = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["evaluate", str(model), str(texts), "--text", "a great film", "--tokenizer",
                                       str(tokenizer), "--composite", "epsilon", "--steps", "4", "-o", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["method", "MoRF"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {"epsilon", "gradient", "random"} and rows["epsilon"][-1] == "3"
    assert "replaced by the unknown token" in result.output and plot.stat().st_size > 0
    bert = CliRunner().invoke(main, ["evaluate", str(BERT), "--text", "the movie was not good !", "--tokenizer",
                                     str(BERT_TOKENIZER), "--steps", "2", "--deletion", "attention",
                                     "-o", str(tmp_path / "bert.png")])
    assert bert.exit_code == 0, bert.output
    assert [line.split()[0] for line in bert.output.splitlines()[2:7]] == [
        "epsilon_plus_flat", "attnlrp", "cplrp", "gradient", "random"]  # the default composites


def test_bad_inputs_exit_2_with_one_line(words, tmp_path):
    from click.testing import CliRunner

    from onnxlrp.cli import main
    model, tokenizer = words
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases = [
        ([str(model), "--text", "a film"], "--text needs --tokenizer"),
        ([str(ROOT / "models" / "digits_lrn.onnx"), "--text", "a film", "--tokenizer", str(tokenizer)],
         "digits_lrn.onnx: --text needs a text model"),
        ([str(model), "--text", "a film", "--tokenizer", str(tokenizer), "--deletion", "mask"],
         "the tokenizer has no [MASK]"),
        ([str(model), "--text", "a film", "--tokenizer", str(tokenizer), "--deletion", "attention"],
         "--deletion attention needs an attention-mask input"),
        ([str(model), "--text", "a film", "--tokenizer", str(tmp_path / "missing.json")],
         "cannot read the tokenizer"),
        ([str(model), str(binary), "--tokenizer", str(tokenizer)], "binary.txt: not a UTF-8 text file"),
        ([str(model), "--text", "a film", "--tokenizer", str(tokenizer), "--patch", "2"], "--patch applies to images"),
        ([str(model), "--tokenizer", str(tokenizer)], "no texts to evaluate"),
        ([str(model), "--text", "a film", "--tokenizer", str(tokenizer), "--score", "probability"],
         "--score probability needs two or more classes"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["evaluate", *args, "-o", str(tmp_path / "plot.png")])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("onnxlrp: error: ") and result.output.count("\n") == 1, result.output
        assert message in result.output, result.output
    assert not (tmp_path / "plot.png").exists()
    only_special = CliRunner().invoke(main, ["evaluate", str(model), "--text", "", "--text", "great", "--tokenizer",
                                             str(tokenizer), "-o", str(tmp_path / "plot.png")])
    assert only_special.exit_code == 1 and "text '': no token to delete" in only_special.output
