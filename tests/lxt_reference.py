"""Reference relevance for tests/transformer_models.py's models from LXT 2.1 (AttnLRP, CP-LRP) and autograd.

LXT patches classes and modules globally, so each LXT method runs in its own process:

    python tests/lxt_reference.py attnlrp|cplrp|gradient OUT.npz [bert vit llama]

writes, per model and target k (transformer_models.TARGETS): ``<name>/logits``, ``<name>/t<k>/embedding`` (R = t * ĝ
at the word-embedding output [N, T, H] of text models, at the pixels [N, C, H, W] of ViT), ``<name>/t<k>/tokens``
(text models: its per-token sum [N, T], what ``<ids>_relevance`` is). ĝ starts as one-hot(target) at the logits.
``gradient`` patches nothing (plain autograd: gradient x input) and can run in-process (``references``).

How LXT is applied (TRANSFORMERS.md): LXT's default maps for HF BERT (AttnLRP only: the patch replaces
``modeling_bert`` wholesale, so the class is looked up after patching and the weights loaded into it) and HF Llama
(AttnLRP and CP-LRP); no map exists for CP-LRP on BERT nor for HF ViT, so there LXT's own functions are applied by
hand: ``layer_norm_forward``, ``dropout_forward``, ``non_linear_forward`` (GELU, Tanh), LXT's attention wrappers
(``wrap_attention_forward`` / ``cp_wrap_attention_forward``) on ViT's eager attention, and for CP-LRP on BERT a
forward hook that detaches the query and key Linear outputs (what LXT's CP wrapper does to Q and K).
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_models import NAMES, TARGETS, build, sample_inputs, word_embedding  # noqa: E402

METHODS = ("attnlrp", "cplrp", "gradient")


def _patch(method: str) -> None:
    """Apply LXT's rules for ``method`` to every model class used here (global to the process)."""
    if method == "gradient":
        return
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import bert as lxt_bert
    from lxt.efficient.models import llama as lxt_llama
    from lxt.efficient.patches import (cp_wrap_attention_forward, dropout_forward, layer_norm_forward,
                                       non_linear_forward, patch_attention, patch_method)
    from transformers.activations import GELUActivation
    from transformers.models.bert import modeling_bert
    from transformers.models.llama import modeling_llama
    from transformers.models.vit import modeling_vit

    identity = partial(patch_method, non_linear_forward, keep_original=True)
    if method == "attnlrp":
        monkey_patch(modeling_bert, lxt_bert.attnLRP)  # LayerNorm, Dropout, and modeling_bert replaced
        monkey_patch(modeling_llama, lxt_llama.attnLRP)
        # HF ViT has no map: LayerNorm and Dropout are patched above (torch classes); GELU and attention here
        monkey_patch(modeling_vit, {GELUActivation: identity, modeling_vit: patch_attention})
    else:
        patch_method(layer_norm_forward, nn.LayerNorm)
        patch_method(dropout_forward, nn.Dropout)
        identity(GELUActivation)
        identity(nn.Tanh)  # BERT's pooler
        monkey_patch(modeling_llama, lxt_llama.cp_LRP)
        modeling_vit.eager_attention_forward = cp_wrap_attention_forward(modeling_vit.eager_attention_forward)


def _detach_query_key(model: nn.Module) -> None:
    """CP-LRP on BERT: no relevance through the attention weights (Q and K are constants for the backward)."""
    for module in model.modules():
        if type(module).__name__.startswith("Bert") and type(module).__name__.endswith("SelfAttention"):
            for linear in (module.query, module.key):
                linear.register_forward_hook(lambda _m, _i, out: out.detach())


def _relevance(model: nn.Module, name: str, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, R = t * ĝ at the word-embedding output or the pixels) for one target vector."""
    feeds = {k: torch.from_numpy(v) for k, v in sample_inputs(name).items()}
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if name == "vit":
        feeds["pixel_values"] = feeds["pixel_values"].clone().requires_grad_(True)
        captured["t"] = feeds["pixel_values"]
    else:
        def keep(_module, _inputs, out):
            out.retain_grad()
            captured["t"] = out
        handle = word_embedding(model).register_forward_hook(keep)
    model.zero_grad()
    logits = model(**feeds).logits
    logits[torch.arange(logits.shape[0]), torch.from_numpy(target)].sum().backward()
    if handle is not None:
        handle.remove()
    t = captured["t"]
    return logits.detach().numpy(), (t * t.grad).detach().numpy()


def references(method: str, names=NAMES) -> dict[str, np.ndarray]:
    """All reference arrays of one method (patches the process for the LXT methods)."""
    weights = {name: build(name).state_dict() for name in names}  # unpatched classes: the exported weights
    _patch(method)
    result = {}
    for name in names:
        model = build(name)
        model.load_state_dict(weights[name], strict=True)
        if method == "cplrp" and name == "bert":
            _detach_query_key(model)
        for k, target in enumerate(TARGETS):
            logits, relevance = _relevance(model, name, target)
            result[f"{name}/logits"] = logits
            result[f"{name}/t{k}/embedding"] = relevance
            if name != "vit":
                result[f"{name}/t{k}/tokens"] = relevance.sum(-1)
    return result


def main(argv: list[str]) -> None:
    method, out, names = argv[0], argv[1], tuple(argv[2:]) or NAMES
    if method not in METHODS:
        raise SystemExit(f"usage: lxt_reference.py {'|'.join(METHODS)} OUT.npz [names]")
    np.savez(out, **references(method, names))


if __name__ == "__main__":
    main(sys.argv[1:])
