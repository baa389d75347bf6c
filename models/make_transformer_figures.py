"""Make the README's transformer figures with tiny transformers trained here (no download):

    models/tiny_vit_digits.onnx        a 2-layer ViT (hidden 48, 4x4 patches) trained on scikit-learn's digits at
                                       32x32 (input "image" [N, 1, 32, 32] in [0, 1], output "logits")
    models/tiny_bert_sentiment.onnx    a 2-layer BERT (hidden 32) trained on template sentences about films,
    models/tiny_bert_tokenizer.json    positive or negative ("not" flips an adjective), with its WordPiece tokenizer
    docs/vit_digits_attnlrp.png        the sample digits, AttnLRP and CP-LRP heatmaps of the ViT
    docs/bert_sentence_attnlrp.png     sentences shaded by AttnLRP token relevance (red: for, blue: against)

Both models are exported with the TorchScript exporter (opset 17, eager attention) and explained by onnxlrp's
`attnlrp` / `cplrp` composites through the public API. Deterministic; a few minutes on 2 CPU cores.
Run:  python models/make_transformer_figures.py [bert] [vit]    (needs the test extra: torch, transformers,
tokenizers); `bert-figure` / `vit-figure` only redraw a figure from the models already there; VIT_EPOCHS=N
trains the ViT for N epochs instead of 12.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image

import onnxlrp

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
ZOOM = 3

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "movie", "film", "plot", "acting", "was", "is", "not",
         "and", "but", "great", "good", "fun", "brilliant", "bad", "boring", "terrible", "dull", "really", "!"]
POSITIVE, NEGATIVE = ["great", "good", "fun", "brilliant"], ["bad", "boring", "terrible", "dull"]
SENTENCES = ["the plot was not boring and the acting was brilliant", "a really dull film but the acting is good",
             "the movie was not good !"]


def _export(module: torch.nn.Module, args: tuple, names: list[str], path: Path, dynamic: dict) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["logits"], dynamic_axes=dynamic)
    model = onnx.load(str(path))
    model.ir_version = 10
    onnx.save(model, str(path))


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).logits


def _train(model: torch.nn.Module, batches, epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for inputs, labels in batches():
            optimizer.zero_grad()
            F.cross_entropy(model(**inputs).logits, labels).backward()
            optimizer.step()
    model.eval()


def make_vit() -> None:
    import transformers
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    config = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=96, num_labels=10,
                                    attn_implementation="eager", hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(config)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]

    def batches():
        shuffled = train[torch.randperm(len(train))]
        for k in range(0, len(shuffled), 100):
            index = shuffled[k:k + 100]
            yield {"pixel_values": images[index]}, labels[index]
    _train(model, batches, epochs=int(os.environ.get("VIT_EPOCHS", "12")), lr=3e-3)
    with torch.no_grad():
        accuracy = (model(pixel_values=images[test]).logits.argmax(1) == labels[test]).float().mean().item()
    print(f"tiny ViT: held-out accuracy {accuracy:.3f} on {len(test)} digits")
    path = HERE / "tiny_vit_digits.onnx"
    _export(Logits(model, ["pixel_values"]), (images[:2],), ["image"], path, {"image": {0: "N"}, "logits": {0: "N"}})


def vit_figure() -> None:
    path = HERE / "tiny_vit_digits.onnx"
    samples = np.stack([np.asarray(Image.open(HERE / "samples" / f"digit_{d}.png"), dtype=np.float32) / 255.0
                        for d in range(10)])[:, None]
    rows = [[Image.fromarray((im[0] * 255).astype(np.uint8)).convert("RGB").resize((32 * ZOOM, 32 * ZOOM))
             for im in samples]]
    for composite in ("attnlrp", "cplrp"):
        _, relevance = onnxlrp.Explainer(path, composite=composite).explain(samples)
        rows.append(onnxlrp.render_heatmap(relevance, zoom=ZOOM))
    figure = Image.new("RGB", (32 * ZOOM * 10, 32 * ZOOM * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            figure.paste(image, (32 * ZOOM * c, 32 * ZOOM * r))
    figure.save(DOCS / "vit_digits_attnlrp.png")


def _sentences(rng: np.random.Generator, count: int) -> list[tuple[str, int]]:
    """Template sentences: one or two clauses '<det> <noun> <verb> [really|not] <adjective>'; the label is the
    sentiment of the last clause (after 'but') or of both clauses agreeing (after 'and')."""
    out = []
    while len(out) < count:
        clauses = []
        for _ in range(rng.integers(1, 3)):
            adjective = rng.choice(POSITIVE + NEGATIVE)
            negated = rng.random() < 0.3
            modifier = "not " if negated else ("really " if rng.random() < 0.3 else "")
            clauses.append((f"{rng.choice(['the', 'a'])} {rng.choice(['movie', 'film', 'plot', 'acting'])} "
                            f"{rng.choice(['was', 'is'])} {modifier}{adjective}", (adjective in POSITIVE) != negated))
        if len(clauses) == 2:
            joiner = rng.choice(["and", "but"])
            if joiner == "and" and clauses[0][1] != clauses[1][1]:
                continue
            text, label = f"{clauses[0][0]} {joiner} {clauses[1][0]}", clauses[1][1]
        else:
            text, label = clauses[0]
        out.append((text + (" !" if rng.random() < 0.2 else ""), int(label)))
    return out


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {word: k for k, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.save(str(path))
    return tokenizer


def make_bert() -> None:
    import transformers
    tokenizer = make_tokenizer(HERE / "tiny_bert_tokenizer.json")
    rng = np.random.default_rng(0)
    data = _sentences(rng, 2000)
    encoded = tokenizer.encode_batch([text for text, _ in data])
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    labels = torch.tensor([label for _, label in data])
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     type_vocab_size=2, num_labels=2, attn_implementation="eager",
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)

    def batches():
        order = torch.randperm(1600)
        for k in range(0, 1600, 50):
            index = order[k:k + 50]
            yield {"input_ids": ids[index], "attention_mask": mask[index]}, labels[index]
    _train(model, batches, epochs=6, lr=3e-3)
    with torch.no_grad():
        predicted = model(input_ids=ids[1600:], attention_mask=mask[1600:]).logits.argmax(1)
    print(f"tiny BERT: held-out accuracy {(predicted == labels[1600:]).float().mean().item():.3f} on 400 sentences")
    path = HERE / "tiny_bert_sentiment.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    _export(Logits(model, names), (ids[:2], mask[:2], torch.zeros_like(ids[:2])), names, path,
            {**{n: {0: "N", 1: "T"} for n in names}, "logits": {0: "N"}})


def bert_figure() -> None:
    import tempfile

    from onnxlrp.text import explain_texts
    results = explain_texts(HERE / "tiny_bert_sentiment.onnx", SENTENCES, HERE / "tiny_bert_tokenizer.json",
                            Path(tempfile.mkdtemp()), ["attnlrp"], target=1, log=print, warn=lambda m: None)
    render_sentences(results, DOCS / "bert_sentence_attnlrp.png")


def render_sentences(results, path: Path) -> None:
    """Tokens on boxes shaded by relevance (scaled per sentence), one sentence per line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    cmap = colormaps["bwr"]
    figure = plt.figure(figsize=(9, 0.55 * len(results) + 0.3), dpi=110)
    renderer = figure.canvas.get_renderer()
    for row, result in enumerate(results):
        scale = max(abs(r) for r in result.relevance) or 1.0
        x, y = 0.01, 1 - (row + 0.7) / len(results)
        for token, value in zip(result.tokens, result.relevance):
            label = token[2:] if token.startswith("##") else token
            text = figure.text(x, y, label, fontsize=12, family="monospace", va="center",
                               bbox=dict(boxstyle="round,pad=0.25", fc=cmap(0.5 + 0.5 * value / scale), ec="none"))
            box = text.get_window_extent(renderer=renderer).transformed(figure.transFigure.inverted())
            x = box.x1 + 0.012
    figure.savefig(path)
    plt.close(figure)


def main(parts: list[str]) -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if "bert" in parts:
        torch.manual_seed(1)
        make_bert()
    if {"bert", "bert-figure"} & set(parts):
        bert_figure()
    if "vit" in parts:
        torch.manual_seed(0)
        make_vit()
    if {"vit", "vit-figure"} & set(parts):
        vit_figure()


if __name__ == "__main__":
    main(sys.argv[1:] or ["bert", "vit"])
