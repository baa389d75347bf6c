"""Faithfulness of token relevance for text models: token deletion (`onnxlrp evaluate --text/--tokenizer`).

For each text, the tokens that may be deleted are the real ones: attention mask 1 and not special ([CLS], [SEP],
padding and every other token the tokenizer's post-processor adds). Ordered by relevance, most relevant first
(MoRF) and least relevant first (LeRF), the first round(k / steps * n) of the n deletable tokens are deleted at
step k = 0..steps; special tokens and padding never move and are never deleted. Deleting a token means
(``deletion``):

    unk        its id becomes the tokenizer's unknown token ([UNK], <unk>), attention mask kept (the default)
    mask       its id becomes the mask token ([MASK], <mask>), attention mask kept
    pad        its id becomes the padding id, attention mask kept
    attention  its id is kept and its attention mask set to 0 (removed from attention; the other positions keep
               their position ids)

The curve follows the explained class's (the predicted class of the undeleted text) ``score``: ``raw`` (the
explained output's value for that class, e.g. a logit; the default: a relative score divides by a logit that may
be near 0 or negative), ``relative`` (raw / raw of the undeleted text, as the image evaluate) or ``probability``
(softmax of the explained output). AUC = the trapezoid area over the fractions 0..1 (evaluate.area_under_curve):
lower MoRF AUC and higher LeRF AUC = more faithful; ABPC = AUC(LeRF) - AUC(MoRF) per text (the area between the
perturbation curves; higher = more faithful).

All 2 * steps + 1 deleted versions of one text (step 0, MoRF and LeRF steps) go through ONNX Runtime as one batch.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OnnxlrpError

DELETIONS = ("unk", "mask", "pad", "attention")
SCORES = ("raw", "relative", "probability")
#: evaluate --text without --composite: explain's default composite and the two transformer composites.
TEXT_COMPOSITES = ("epsilon_plus_flat", "attnlrp", "cplrp")
_UNK = ("[UNK]", "<unk>", "<UNK>", "<|unk|>")
_MASK = ("[MASK]", "<mask>", "<MASK>", "<|mask|>")


@dataclass
class TokenCurves:
    """The MoRF and LeRF curves of one method, one [steps + 1] array per text."""

    label: str
    morf: list[np.ndarray] = field(default_factory=list)
    lerf: list[np.ndarray] = field(default_factory=list)

    @property
    def morf_aucs(self) -> np.ndarray:
        from .evaluate import area_under_curve
        return np.array([area_under_curve(c) for c in self.morf])

    @property
    def lerf_aucs(self) -> np.ndarray:
        from .evaluate import area_under_curve
        return np.array([area_under_curve(c) for c in self.lerf])

    @property
    def abpc(self) -> np.ndarray:
        return self.lerf_aucs - self.morf_aucs


@dataclass
class TextBatch:
    """The model's inputs for the texts ([N, T] each, padded to the longest) and what may be deleted."""

    feeds: dict[str, np.ndarray]
    ids_name: str
    mask_name: str | None
    deletable: np.ndarray  # bool [N, T]: real, non-special tokens
    texts: list[str]


def read_texts(paths: list[Path]) -> list[str]:
    """The texts of UTF-8 text files, one per non-empty line."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise OnnxlrpError(f"{path}: not a text file (give one text per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise OnnxlrpError(f"{path}: not a UTF-8 text file (give one text per line)") from None
        except OSError as exc:
            raise OnnxlrpError(f"{path}: cannot read ({exc.strerror or exc})") from None
        texts += [line.strip() for line in lines if line.strip()]
    return texts


def replacement_id(tokenizer, deletion: str, tokenizer_path: Path | str = "tokenizer") -> int | None:
    """The id a deleted token gets (None for ``attention``); one-line error when the tokenizer has no such token."""
    from .text import _pad_id
    if deletion not in DELETIONS:
        raise OnnxlrpError(f"--deletion must be one of {', '.join(DELETIONS)}, got {deletion!r}")
    if deletion == "attention":
        return None
    if deletion == "pad":
        return _pad_id(tokenizer)
    names = _UNK if deletion == "unk" else _MASK
    if deletion == "unk":
        names = (getattr(tokenizer.model, "unk_token", None),) + names
    for name in names:
        found = tokenizer.token_to_id(name) if name else None
        if found is not None:
            return int(found)
    raise OnnxlrpError(f"{tokenizer_path}: the tokenizer has no {' / '.join(names[-4:])} token for --deletion "
                       f"{deletion} (choose another --deletion)")


def text_batch(compiled, tokenizer, texts: list[str]) -> TextBatch:
    """Tokenize ``texts`` for ``compiled`` (text.text_feeds) and mark the deletable tokens."""
    import json

    from .text import MASK, text_feeds
    feeds, encodings = text_feeds(compiled, tokenizer, texts)
    meta = {p.key: p.value for p in compiled.metadata_props}
    ids_name = json.loads(meta["onnxlrp.token_ids"])["input"]
    mask_name = next((n for n in feeds if n != ids_name and MASK.search(n)), None)
    length = feeds[ids_name].shape[1]
    deletable = np.zeros((len(texts), length), dtype=bool)
    for k, encoding in enumerate(encodings):
        n = min(len(encoding.ids), length)
        special = np.asarray(encoding.special_tokens_mask[:n], dtype=bool)
        attended = np.asarray(encoding.attention_mask[:n], dtype=bool)
        deletable[k, :n] = attended & ~special
    return TextBatch(feeds, ids_name, mask_name, deletable, list(texts))


def deletion_order(relevance: np.ndarray, deletable: np.ndarray, least_first: bool = False) -> np.ndarray:
    """Positions of the deletable tokens of one text, most (or least) relevant first; ties by position."""
    positions = np.flatnonzero(deletable)
    values = np.asarray(relevance, dtype=np.float64)[positions]
    return positions[np.argsort(values if least_first else -values, kind="stable")]


def deleted_feeds(feeds: dict[str, np.ndarray], row: int, orders: list[np.ndarray], steps: int, ids_name: str,
                  mask_name: str | None, replacement: int | None) -> dict[str, np.ndarray]:
    """One batch for text ``row``: the undeleted text, then for each order its steps 1..steps, where step k has
    the first round(k / steps * len(order)) positions of the order deleted (replacement id, or mask 0 when
    ``replacement`` is None)."""
    rows = 1 + steps * len(orders)
    batch = {name: np.repeat(value[row:row + 1], rows, axis=0) for name, value in feeds.items()}
    target_name = ids_name if replacement is not None else mask_name
    value = replacement if replacement is not None else 0
    for o, order in enumerate(orders):
        for k in range(1, steps + 1):
            count = int(round(k / steps * order.size))
            batch[target_name][1 + o * steps + k - 1, order[:count]] = value
    return batch


def _scores(values: np.ndarray, target: int, score: str) -> np.ndarray:
    """The explained class's score per row of the explained output ``values`` [B, ...]."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    if score == "probability":
        flat = np.exp(flat - flat.max(axis=1, keepdims=True))
        flat /= flat.sum(axis=1, keepdims=True)
    raw = flat[:, target]
    if score == "relative":
        return raw / raw[0] if raw[0] != 0 else raw
    return raw


def evaluate_texts(model: Path, texts: list[str], tokenizer_path: Path, composites: list[str], steps: int = 16,
                   deletion: str = "unk", score: str = "raw", seed: int = 0, progress: bool = False,
                   **options) -> tuple[list[TokenCurves], list[tuple[str, str]]]:
    """Token-deletion curves (MoRF and LeRF) per method: each composite, gradient x input and a random order.

    Returns (curves per method, [(text, why)] for texts that were skipped: no token to delete)."""
    from .cache import compile_cached
    from .assemble import IR_VERSION
    from .graph import GraphView
    from .load import read_model
    from .lookups import choose_ids_input
    from .runtime import Explainer, make_session
    from .text import load_tokenizer
    if steps < 1:
        raise OnnxlrpError("--steps must be at least 1")
    if score not in SCORES:
        raise OnnxlrpError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if not texts:
        raise OnnxlrpError("no texts to evaluate (give --text or text files, one text per line)")
    tokenizer = load_tokenizer(tokenizer_path)
    replacement = replacement_id(tokenizer, deletion, tokenizer_path)
    proto = read_model(model)
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    view = GraphView(proto)
    ids_input = choose_ids_input(view.token_lookups)
    if ids_input is None:
        raise OnnxlrpError(f"{model}: --text needs a text model (an integer token-ids input feeding an embedding "
                           f"lookup); this one has none")
    vocab = max(lookup.vocab for lookup in view.token_lookups if lookup.input == ids_input)
    if replacement is not None and not 0 <= replacement < vocab:
        raise OnnxlrpError(f"{tokenizer_path}: --deletion {deletion} gives id {replacement}, outside the model's "
                           f"vocabulary of {vocab}")
    labels = [("gradient x input", "gradient")]
    methods = [(c, c) for c in dict.fromkeys(composites) if c != "gradient"] + labels + [("random", None)]
    compiled = {c: compile_cached(model, c, **options)[0] for _, c in methods if c is not None}
    batch = text_batch(compiled["gradient"], tokenizer, texts)
    if deletion == "attention" and batch.mask_name is None:
        raise OnnxlrpError(f"{model}: --deletion attention needs an attention-mask input; the model has none")
    forward = make_session(proto)
    output = proto.graph.output[0].name
    scores = forward.run([output], batch.feeds)[0].reshape(len(texts), -1)
    if score == "probability" and scores.shape[1] < 2:
        raise OnnxlrpError(f"{model}: --score probability needs two or more classes; output {output!r} has one score")
    target = scores.argmax(1)
    keep = [k for k in range(len(texts)) if batch.deletable[k].any()]
    skipped = [(texts[k], "no token to delete (only special tokens)") for k in range(len(texts)) if k not in keep]
    if not keep:
        raise OnnxlrpError("no text has a token to delete")
    from tqdm import tqdm
    bar = tqdm(total=len(methods) * len(keep), desc="token deletion", unit="text", file=sys.stderr, leave=False,
               disable=not progress)
    rng = np.random.default_rng(seed)
    results = []
    for label, composite in methods:
        curves = TokenCurves(label)
        relevance = None
        if composite is not None:
            explainer = Explainer.from_compiled(compiled[composite])
            _, relevance = explainer.explain(batch.feeds, target=target)
            if isinstance(relevance, dict):
                relevance = relevance[batch.ids_name]
        for k in keep:
            if relevance is None:
                morf = rng.permutation(np.flatnonzero(batch.deletable[k]))
                lerf = morf[::-1]
            else:
                morf = deletion_order(relevance[k], batch.deletable[k])
                lerf = deletion_order(relevance[k], batch.deletable[k], least_first=True)
            feeds = deleted_feeds(batch.feeds, k, [morf, lerf], steps, batch.ids_name, batch.mask_name, replacement)
            values = _scores(forward.run([output], feeds)[0], int(target[k]), score)
            curves.morf.append(values[:steps + 1])
            curves.lerf.append(np.concatenate([values[:1], values[steps + 1:]]))
            bar.update(1)
        results.append(curves)
    bar.close()
    return results, skipped


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def report(results: list[TokenCurves], deletion: str = "unk", score: str = "raw") -> str:
    """The table: MoRF AUC (lower = more faithful), LeRF AUC and ABPC (higher = more faithful), each ± s.e.m."""
    rows = [("method", "MoRF AUC", "± s.e.m.", "LeRF AUC", "± s.e.m.", "ABPC", "± s.e.m.", "texts")]
    for r in results:
        cells = [r.label]
        for values in (r.morf_aucs, r.lerf_aucs, r.abpc):
            cells += [f"{values.mean():.4f}", f"{_sem(values):.4f}"]
        rows.append((*cells, str(len(r.morf))))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    how = {"unk": "replaced by the unknown token", "mask": "replaced by the mask token",
           "pad": "replaced by the padding id", "attention": "removed from attention (mask 0)"}[deletion]
    what = {"raw": "raw score", "relative": "score relative to the undeleted text's",
            "probability": "softmax probability"}[score]
    return "\n".join(lines) + (f"\n(token deletion: {what} of the explained class as tokens are {how}, most "
                               f"relevant first (MoRF: lower AUC = more faithful) or least relevant first (LeRF: "
                               f"higher = more faithful); ABPC = LeRF - MoRF, higher = more faithful; special "
                               f"tokens and padding are never deleted)")


def plot(results: list[TokenCurves], path: Path, steps: int, score: str = "raw") -> None:
    """Mean MoRF (solid) and LeRF (dashed) curves per method, legend beside the axes; .png/.pdf/.svg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .save import write_figure
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    fractions = np.linspace(0, 1, steps + 1)
    for r in results:
        line, = ax.plot(fractions, np.mean(r.morf, axis=0), label=f"{r.label} MoRF (AUC {r.morf_aucs.mean():.3f})",
                        linestyle=":" if r.label == "random" else "-")
        ax.plot(fractions, np.mean(r.lerf, axis=0), color=line.get_color(), linestyle="--",
                label=f"{r.label} LeRF (AUC {r.lerf_aucs.mean():.3f})")
    ax.set_xlabel("fraction of tokens deleted")
    ax.set_ylabel({"raw": "score", "relative": "relative score", "probability": "probability"}[score]
                  + " of the explained class")
    ax.set_title("token deletion (solid: most relevant first, dashed: least relevant first)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    write_figure(fig, path)
