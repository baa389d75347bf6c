"""`onnxlrp explain --text`: tokenize sentences with a Hugging Face tokenizer.json (the `tokenizers` library,
offline), run the compiled text model, print each token with its relevance (ANSI colours on a terminal) and write
an HTML page with the tokens shaded red (positive) / blue (negative)."""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .cache import compile_cached
from .errors import OnnxlrpError
from .runtime import Explainer

MASK, TYPES, POSITIONS = (re.compile(p, re.IGNORECASE) for p in (r"mask", r"type|segment", r"position|pos_ids"))


@dataclass
class TextResult:
    """One sentence explained under one composite."""

    text: str
    composite: str
    tokens: list[str]
    relevance: list[float]
    predicted: int
    score: float
    explained: int
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def line(self, many_composites: bool) -> str:
        tag = f" [{self.composite}]" if many_composites else ""
        return (f"{self.text!r}{tag}: predicted {self.predicted} (score {self.score:.4g}), explained {self.explained}, "
                f"sum of relevance {sum(self.relevance):.4g}")


def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from tokenizer.json; one-line errors when the library or the file is missing."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OnnxlrpError("--text needs the tokenizers library: pip install 'onnxlrp[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(f"{path}: cannot read the tokenizer ({first})") from None


def text_feeds(compiled: onnx.ModelProto, tokenizer, texts: list[str]) -> tuple[dict[str, np.ndarray], list]:
    """The model's inputs for ``texts``, matched by name: the token ids (metadata ``onnxlrp.token_ids``), an
    attention mask, token types and position ids; padded to the longest text (or the model's static length)."""
    meta = {p.key: p.value for p in compiled.metadata_props}
    if "onnxlrp.token_ids" not in meta:
        raise OnnxlrpError("--text needs a text model (an integer token-ids input feeding an embedding lookup)")
    ids_name = json.loads(meta["onnxlrp.token_ids"])["input"]
    weights = {t.name for t in compiled.graph.initializer}
    inputs = [vi for vi in compiled.graph.input if vi.name not in weights and vi.name != "target"]
    ids_vi = next(vi for vi in inputs if vi.name == ids_name)
    dims = ids_vi.type.tensor_type.shape.dim
    length = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    encodings = tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    if length is None:
        length = longest
    pad = _pad_id(tokenizer)
    ids = np.full((len(texts), length), pad, dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    types = np.zeros((len(texts), length), dtype=np.int64)
    for k, encoding in enumerate(encodings):
        n = min(len(encoding.ids), length)
        ids[k, :n], mask[k, :n], types[k, :n] = encoding.ids[:n], encoding.attention_mask[:n], encoding.type_ids[:n]
    feeds = {}
    for vi in inputs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name == ids_name:
            value = ids
        elif MASK.search(vi.name):
            value = mask
        elif TYPES.search(vi.name):
            value = types
        elif POSITIONS.search(vi.name):
            value = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape)
        else:
            raise OnnxlrpError(f"--text: cannot fill the model input {vi.name!r} from a tokenizer (known: token ids, "
                               f"attention mask, token types, position ids)")
        feeds[vi.name] = np.ascontiguousarray(value).astype(dtype)
    return feeds, encodings


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding and "pad_id" in padding:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def explain_texts(model: Path, texts: list[str], tokenizer_path: Path, outdir: Path, composites: list[str],
                  target: int | None = None, color: str = "auto", out=None, log=print, warn=print,
                  **options) -> list[TextResult]:
    """Explain every text with every composite: log lines, the tokens with their relevance, an HTML page."""
    import sys
    out = out or sys.stdout
    tokenizer = load_tokenizer(tokenizer_path)
    colour = color == "always" or (color == "auto" and hasattr(out, "isatty") and out.isatty())
    results = []
    for composite in composites:
        compiled, hit = compile_cached(model, composite, **options)
        warn(f"onnxlrp: {'using cached' if hit else 'compiled'} {model} ({composite})")
        explainer = Explainer.from_compiled(compiled)
        classes = explainer.classes
        if target is not None and classes is not None and not -1 <= target < classes:
            raise OnnxlrpError(f"target {target} out of range: the model has {classes} classes (0..{classes - 1})")
        feeds, encodings = text_feeds(compiled, tokenizer, texts)
        outputs, relevance = explainer.explain(feeds, target=target)
        scores = outputs[explainer.explained_output].reshape(len(texts), -1)
        for k, (text, encoding) in enumerate(zip(texts, encodings)):
            n = int(min(len(encoding.ids), relevance.shape[1]))
            keep = [i for i in range(n) if encoding.attention_mask[i]]
            predicted = int(scores[k].argmax())
            result = TextResult(text, composite, [encoding.tokens[i] for i in keep],
                                [float(relevance[k, i]) for i in keep], predicted, float(scores[k, predicted]),
                                predicted if target is None or target < 0 else int(target),
                                [tuple(encoding.offsets[i]) for i in keep])
            results.append(result)
            log(result.line(len(composites) > 1))
            log(token_line(result, colour))
    _prepare(outdir)
    page = outdir / "text.html"
    page.write_text(html_page(results), encoding="utf-8")
    (outdir / "text.json").write_text(json.dumps([{"text": r.text, "composite": r.composite, "tokens": r.tokens,
                                                   "relevance": r.relevance, "predicted": r.predicted,
                                                   "explained": r.explained} for r in results], indent=1))
    log(f"wrote {page} and {outdir / 'text.json'}")
    return results


def _prepare(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrpError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from None


def _shade(value: float, scale: float) -> tuple[int, int, int]:
    """White for 0, towards red for positive and blue for negative relevance (|value| / scale in [0, 1])."""
    a = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    fade = int(round(255 * (1 - a)))
    return (255, fade, fade) if value > 0 else (fade, fade, 255) if value < 0 else (255, 255, 255)


def token_line(result: TextResult, colour: bool) -> str:
    """``token(+0.123) ...``; with colour, each token on an ANSI 24-bit background shaded by its relevance."""
    scale = max((abs(r) for r in result.relevance), default=0.0)
    parts = []
    for token, value in zip(result.tokens, result.relevance):
        cell = f"{token}({value:+.3g})"
        if colour:
            r, g, b = _shade(value, scale)
            cell = f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{cell}\x1b[0m"
        parts.append(cell)
    return "  " + " ".join(parts)


def html_page(results: list[TextResult]) -> str:
    """A self-contained HTML page: per text and composite, its tokens shaded red (+) / blue (-), the relevance in
    each token's tooltip; word pieces (``##``) joined to the word before them."""
    blocks = []
    for result in results:
        scale = max((abs(r) for r in result.relevance), default=0.0)
        spans = []
        for token, value in zip(result.tokens, result.relevance):
            r, g, b = _shade(value, scale)
            piece = token[2:] if token.startswith("##") else token
            space = "" if token.startswith("##") or not spans else " "
            spans.append(f'{space}<span style="background: rgb({r},{g},{b})" title="{value:+.4g}">'
                         f"{html.escape(piece)}</span>")
        blocks.append(f"<p><b>{html.escape(result.composite)}</b>: predicted {result.predicted} (score "
                      f"{result.score:.4g}), explained {result.explained}, sum of relevance "
                      f"{sum(result.relevance):.4g}<br>\n<span class=\"text\">{''.join(spans)}</span></p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>onnxlrp: token relevance</title>\n"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            ".text{font-family:monospace;font-size:1.2em;line-height:2}span[title]{padding:1px 2px;"
            "border-radius:3px}</style></head><body>\n<h1>Token relevance</h1>\n"
            "<p>Red: relevance for the explained class, blue: against it; shades scaled per text to its largest "
            "|relevance|.</p>\n" + "\n".join(blocks) + "\n</body></html>\n")
