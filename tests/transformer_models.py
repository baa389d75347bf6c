"""Tiny random-init Hugging Face transformers (BERT, ViT, Llama) and their ONNX exports, for the LXT cross-checks.

Every model is deterministic (fixed seed, weights drawn at a scale that makes attention non-uniform, LayerNorm /
RMSNorm weights and biases randomised) and small (hidden 32, 2 layers), so that export and reference take seconds.
``build`` looks each class up in its ``transformers`` module at call time: LXT's BERT patch swaps
``modeling_bert`` wholesale, and the reference worker builds the patched class and loads these weights into it.

Exporters: ``ts17`` (TorchScript, opset 17, eager attention, dynamic batch and sequence), ``ts17_sdpa``
(TorchScript, opset 17, SDPA attention) and ``dynamo18`` (torch.export, opset 18, static shapes, eager attention).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

EXPORTERS = ("ts17", "ts17_sdpa", "dynamo18")
NAMES = ("bert", "vit", "llama")
TARGETS = (np.array([0, 2]), np.array([2, 1]))  # two targets per sample (batch of 2)
BATCH, TOKENS, IMAGE = 2, 8, 16
VOCAB, CLASSES = 50, 3


def _config(name: str, attention: str):
    import transformers
    common = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_labels=CLASSES,
                  initializer_range=0.2, attn_implementation=attention)
    if name == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, num_attention_heads=2, max_position_embeddings=16,
                                       type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **common)
    if name == "vit":
        return transformers.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=3, num_attention_heads=2,
                                      hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      qkv_bias=True, **common)
    if name == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=1,
                                        max_position_embeddings=32, hidden_act="silu", pad_token_id=0,
                                        rms_norm_eps=1e-6, use_cache=False, tie_word_embeddings=False, **common)
    raise KeyError(name)


def model_class(name: str):
    """The classification class, looked up now (after any patching of its module)."""
    from transformers.models.bert import modeling_bert
    from transformers.models.llama import modeling_llama
    from transformers.models.vit import modeling_vit
    return {"bert": lambda: modeling_bert.BertForSequenceClassification,
            "vit": lambda: modeling_vit.ViTForImageClassification,
            "llama": lambda: modeling_llama.LlamaForSequenceClassification}[name]()


def build(name: str, attention: str = "eager", seed: int = 0) -> nn.Module:
    """The model in eval mode with deterministic random weights (norm weights and biases randomised too)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = model_class(name)(_config(name, attention))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            if is_norm:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.6 - 0.3)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        if name == "vit":  # HF zero-initialises the CLS token and draws position embeddings from a truncated normal
            model.vit.embeddings.cls_token.copy_(torch.randn(model.vit.embeddings.cls_token.shape,
                                                             generator=generator) * 0.2)
    return model.eval()


def input_names(name: str) -> list[str]:
    return {"bert": ["input_ids", "attention_mask", "token_type_ids"], "vit": ["pixel_values"],
            "llama": ["input_ids"]}[name]


def sample_inputs(name: str) -> dict[str, np.ndarray]:
    """Fixed inputs: BERT with the second sequence padded (last 3 tokens), token types 0/1; ViT pixels N(0, 1)."""
    rng = np.random.default_rng(7)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((BATCH, 3, IMAGE, IMAGE)).astype(np.float32)}
    ids = rng.integers(1, VOCAB, size=(BATCH, TOKENS)).astype(np.int64)
    if name == "llama":
        return {"input_ids": ids}
    mask = np.ones((BATCH, TOKENS), dtype=np.int64)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    types = np.zeros((BATCH, TOKENS), dtype=np.int64)
    types[:, TOKENS // 2:] = 1
    types[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class Logits(nn.Module):
    """model(**inputs).logits with positional inputs (what the exporters trace)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).logits


def word_embedding(model: nn.Module) -> nn.Module:
    """The word-embedding lookup of a text model (its output is where text relevance is compared)."""
    return model.get_input_embeddings()


def export(name: str, exporter: str, path: Path) -> Path:
    """Export ``build(name)`` (SDPA attention for ts17_sdpa) to ``path`` with IR version 10."""
    attention = "sdpa" if exporter == "ts17_sdpa" else "eager"
    names = input_names(name)
    return export_module(Logits(build(name, attention), names), sample_inputs(name), names, exporter, path,
                         dynamic_tokens=name != "vit")


def export_module(module: nn.Module, inputs: dict[str, np.ndarray], names: list[str], exporter: str, path: Path,
                  dynamic_tokens: bool = False) -> Path:
    """Export ``module(*inputs in names order) -> logits``: TorchScript opset 17 with a dynamic batch (and
    sequence when dynamic_tokens), or dynamo opset 18 with static shapes; IR version at most 10."""
    args = tuple(torch.from_numpy(inputs[n]) for n in names)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter.startswith("ts17"):
            axes = {n: {0: "N", 1: "T"} if dynamic_tokens else {0: "N"} for n in names}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["logits"], dynamic_axes={**axes, "logits": {0: "N"}})
        else:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=18, input_names=names,
                                        output_names=["logits"], optimize=True)
            program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    if model.ir_version > 10:  # ORT 1.31 refuses IR 14
        model.ir_version = 10
        onnx.save(model, str(path))
    return path
