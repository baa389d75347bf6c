"""Compile smoke test on transformer and hybrid families: timm ViT, DeiT, Swin, ConvNeXt, LeViT, MobileViT,
PoolFormer and Hugging Face BERT, DistilBERT, ViT, ConvNeXt (random init, shrunk where the constructor allows:
fewer blocks, smaller images), each exported by TorchScript (opset 17) and dynamo (opset 18).

Each compiles with ``attnlrp`` (and ``epsilon_plus_flat`` for the convolutional hybrids); the compiled model's
original output must be bit-identical to the uncompiled model on ORT, the relevance finite, and conservation must
close: input relevance + ``bias_relevance`` (biases, softmax and constant-add shares) = target logit.
Exports are slow (dynamo: 10-80 s per model on 2 busy cores), so everything but two cases is marked slow.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("timm", reason="needs the test extra (timm, transformers 4.52.4)")
pytest.importorskip("transformers", reason="needs the test extra (timm, transformers 4.52.4)")

import onnxlrp  # noqa: E402
import transformer_models as tm  # noqa: E402

# timm name -> (constructor arguments that shrink it, image size)
TIMM = {
    "vit_tiny_patch16_224": (dict(img_size=32, depth=2), 32),
    "deit_tiny_patch16_224": (dict(img_size=32, depth=2), 32),
    "swin_tiny_patch4_window7_224": (dict(img_size=32, window_size=2, embed_dim=32, depths=(2, 2, 2),
                                          num_heads=(1, 2, 4)), 32),
    "convnext_atto": (dict(depths=(1, 1, 1, 1)), 32),
    "levit_128s": (dict(img_size=64, depth=(1, 1, 1)), 64),
    "mobilevit_xxs": (dict(), 64),
    "poolformer_s12": (dict(), 32),  # its constructor fixes depths
}
HF = ("hf_bert", "hf_distilbert", "hf_vit", "hf_convnext")
CNN_HYBRIDS = {"convnext_atto", "levit_128s", "mobilevit_xxs", "poolformer_s12", "hf_convnext"}
EXPORTERS = ("ts17", "dynamo18")
FAST = {("vit_tiny_patch16_224", "ts17", "attnlrp"), ("hf_distilbert", "ts17", "attnlrp")}


def _timm(name: str) -> tuple[torch.nn.Module, dict[str, np.ndarray], list[str]]:
    import timm
    kwargs, size = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = np.random.default_rng(3).standard_normal((2, 3, size, size)).astype(np.float32)
    return model, {"pixel_values": x}, ["pixel_values"]


def _hf(name: str) -> tuple[torch.nn.Module, dict[str, np.ndarray], list[str]]:
    import transformers
    if name in ("hf_bert", "hf_vit"):
        short = name[3:]
        return tm.Logits(tm.build(short), tm.input_names(short)), tm.sample_inputs(short), tm.input_names(short)
    torch.manual_seed(0)
    if name == "hf_distilbert":
        config = transformers.DistilBertConfig(vocab_size=tm.VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=16, num_labels=3, dropout=0.0,
                                               attention_dropout=0.0, seq_classif_dropout=0.0,
                                               initializer_range=0.2, attn_implementation="eager")
        model = transformers.DistilBertForSequenceClassification(config).eval()
        inputs = {k: v for k, v in tm.sample_inputs("bert").items() if k != "token_type_ids"}
        return tm.Logits(model, ["input_ids", "attention_mask"]), inputs, ["input_ids", "attention_mask"]
    config = transformers.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32],
                                         depths=[1, 1], image_size=32, num_labels=3, initializer_range=0.2)
    model = transformers.ConvNextForImageClassification(config).eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return tm.Logits(model, ["pixel_values"]), {"pixel_values": x}, ["pixel_values"]


@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("transformer_zoo"), {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            module, inputs, names = (_timm if name in TIMM else _hf)(name)
            text = "input_ids" in names
            path = tm.export_module(module, inputs, names, exporter, folder / f"{name}_{exporter}.onnx",
                                    dynamic_tokens=text)
            cache[name, exporter] = path, inputs
        return cache[name, exporter]

    return get


def _cases():
    for name in list(TIMM) + list(HF):
        for exporter in EXPORTERS:
            for composite in ("attnlrp", "epsilon_plus_flat") if name in CNN_HYBRIDS else ("attnlrp",):
                marks = () if (name, exporter, composite) in FAST else (pytest.mark.slow,)
                yield pytest.param(name, exporter, composite, marks=marks, id=f"{name}-{exporter}-{composite}")


def _explain(zoo_exports, name: str, exporter: str, composite: str, bias: bool):
    """(original logits on ORT, inputs, target, {output name: value} of the compiled model)."""
    path, inputs = zoo_exports(name, exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    (expected,) = session.run(["logits"], feeds)
    compiled = onnxlrp.compile_model(str(path), composite, bias_relevance="layers" if bias else None)
    explaining = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    leaf = "input_ids_relevance" if "input_ids" in inputs else "pixel_values_relevance"
    target = np.argsort(expected, axis=1)[:, -2]  # the runner-up class: not the default top class
    names = ["logits", leaf] + (["bias_relevance"] if bias else [])
    values = dict(zip(names, explaining.run(names, {**feeds, "target": target})))
    values["relevance"] = values.pop(leaf)
    return expected, inputs, target, values


@pytest.mark.parametrize("name,exporter,composite", list(_cases()))
def test_compiles_bit_identical_finite(zoo_exports, name, exporter, composite):
    expected, inputs, _, values = _explain(zoo_exports, name, exporter, composite, bias=False)
    assert np.array_equal(values["logits"], expected), \
        f"logits changed by compiling: max diff {np.abs(values['logits'] - expected).max():.1e}"
    relevance = values["relevance"]
    assert relevance.shape == (inputs["input_ids"] if "input_ids" in inputs else inputs["pixel_values"]).shape
    assert np.isfinite(relevance).all() and np.abs(relevance).sum() > 0


@pytest.mark.parametrize("name,exporter,composite", list(_cases()))
def test_conservation(zoo_exports, name, exporter, composite):
    """Input relevance + bias_relevance (biases, softmax and constant-add shares) = target logit."""
    expected, _, target, values = _explain(zoo_exports, name, exporter, composite, bias=True)
    relevance, absorbed = values["relevance"], values["bias_relevance"]
    assert np.isfinite(absorbed).all()
    start = expected[np.arange(len(target)), target]
    total = relevance.reshape(len(target), -1).sum(1) + absorbed.sum(1)
    scale = np.abs(relevance).reshape(len(target), -1).sum(1) + np.abs(absorbed).sum(1) + np.abs(start)
    assert np.all(np.abs(total - start) <= 1e-5 * scale), (total, start)
