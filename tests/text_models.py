"""Tiny hand-built text models (no download, no exporter): token ids -> embedding lookup -> a small network."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, TYPES = 20, 4, 2


def bag_of_embeddings(tokens: int = 5, classes: int = 3, seed: int = 0, biases: bool = True,
                      float_embeddings: bool = False, cast_ids: bool = False, ids_name: str = "input_ids",
                      types_name: str = "token_type_ids", constant_mask: np.ndarray | None = None) -> onnx.ModelProto:
    """input_ids, attention_mask, token_type_ids [N, T] (int64) -> word + token-type + position embeddings,
    masked by the attention mask -> flatten -> Gemm -> Relu -> Gemm -> logits [N, classes].

    float_embeddings: the same network, but its input is the word-embedding output ``embeddings`` [N, T, H]
    (float) instead of the ids: the reference for the text contract. cast_ids: the ids pass through an int32
    Cast before the lookup (as some exporters write). constant_mask: the attention mask as a weight instead of an
    input (without a token-ids lookup, an integer input that is only cast to float would count as a raw image)."""
    rng = np.random.default_rng(seed)
    weights = {
        "word_embeddings": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "type_embeddings": rng.standard_normal((TYPES, HIDDEN)).astype(np.float32),
        "position_embeddings": rng.standard_normal((tokens, HIDDEN)).astype(np.float32),
        "w1": rng.standard_normal((tokens * HIDDEN, 8)).astype(np.float32) / 3,
        "b1": (rng.standard_normal(8) * biases).astype(np.float32),
        "w2": rng.standard_normal((8, classes)).astype(np.float32) / 3,
        "b2": (rng.standard_normal(classes) * biases).astype(np.float32),
        "flat_shape": np.array([0, tokens * HIDDEN], dtype=np.int64),
        "last_axis": np.array([-1], dtype=np.int64),
    }
    ints = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["N", tokens])  # noqa: E731
    nodes = [
        helper.make_node("Gather", ["type_embeddings", types_name], ["types"], name="type_lookup"),
        helper.make_node("Add", ["embeddings", "types"], ["with_types"], name="add_types"),
        helper.make_node("Add", ["with_types", "position_embeddings"], ["summed"], name="add_positions"),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT, name="mask_cast"),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_3d"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["summed", "mask_3d"], ["masked"], name="apply_mask"),
        helper.make_node("Reshape", ["masked", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"], name="dense1"),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="relu"),
        helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["logits"], name="dense2"),
    ]
    if float_embeddings:
        inputs = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", tokens, HIDDEN])]
    else:
        ids = ids_name
        if cast_ids:
            nodes.insert(0, helper.make_node("Cast", [ids_name], ["ids32"], to=TensorProto.INT32, name="ids_cast"))
            ids = "ids32"
        nodes.insert(1 if cast_ids else 0, helper.make_node("Gather", ["word_embeddings", ids], ["embeddings"],
                                                            name="word_lookup"))
        inputs = [ints(ids_name)]
    if constant_mask is None:
        inputs.append(ints("attention_mask"))
    else:
        weights["attention_mask"] = np.asarray(constant_mask, dtype=np.int64)
    inputs.append(ints(types_name))
    graph = helper.make_graph(nodes, "bag_of_embeddings", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def sample_text_batch(tokens: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    """Two sequences; the second padded after 3 tokens (pad id 0, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (2, tokens)).astype(np.int64)
    mask = np.ones((2, tokens), dtype=np.int64)
    ids[1, 3:], mask[1, 3:] = 0, 0
    types = np.zeros((2, tokens), dtype=np.int64)
    types[:, tokens // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "movie", "was", "great", "bad", "not", "##ly", "good",
         "plot", "a", "film", "terrible", "fun", "boring", "and", "!"]


def wordpiece_tokenizer(path, words: list[str] = WORDS) -> None:
    """A tiny BERT-style WordPiece tokenizer.json built with the `tokenizers` library (no download): lower-casing,
    [CLS] ... [SEP], [PAD] = 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {word: k for k, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))
