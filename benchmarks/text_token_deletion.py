"""Token deletion on the shipped tiny BERT (models/tiny_bert_sentiment.onnx): MoRF / LeRF AUC and ABPC of the
explained class's raw logit for epsilon_plus_flat, attnlrp, cplrp, epsilon, gradient x input and a random order,
for each way of deleting a token (unk: the default; pad; attention), on the 50 sentences of
models/samples/film_sentences.txt. Prints the tables of the README's "Text models: token deletion".

    python benchmarks/text_token_deletion.py [--steps 16] [--deletion unk pad attention] [--write-sentences]

--write-sentences regenerates the sentence file from the tiny BERT's template grammar (models/
make_transformer_figures.py, seed 1; needs torch for that import) and says how many of them are in its training set.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL, TOKENIZER = ROOT / "models" / "tiny_bert_sentiment.onnx", ROOT / "models" / "tiny_bert_tokenizer.json"
SENTENCES = ROOT / "models" / "samples" / "film_sentences.txt"


def write_sentences(count: int = 50) -> None:
    sys.path.insert(0, str(ROOT / "models"))
    from make_transformer_figures import _sentences
    training = {text for text, _ in _sentences(np.random.default_rng(0), 2000)[:1600]}  # make_bert's training set
    sentences = [text for text, _ in _sentences(np.random.default_rng(1), count)]
    SENTENCES.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    seen = sum(text in training for text in sentences)
    print(f"wrote {SENTENCES}: {count} sentences, {seen} of them also in the training set")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--deletion", nargs="+", default=["unk", "pad", "attention"])
    parser.add_argument("--write-sentences", action="store_true")
    args = parser.parse_args()
    if args.write_sentences:
        write_sentences()
    from onnxlrp.token_deletion import evaluate_texts, read_texts, report
    texts = read_texts([SENTENCES])
    with tempfile.TemporaryDirectory() as cache:
        import os
        os.environ["ONNXLRP_CACHE_DIR"] = cache
        for deletion in args.deletion:
            results, skipped = evaluate_texts(MODEL, texts, TOKENIZER, ["epsilon_plus_flat", "attnlrp", "cplrp",
                                                                       "epsilon"], args.steps, deletion)
            print(f"\n--deletion {deletion}, {len(texts) - len(skipped)} sentences, {args.steps} steps")
            print(report(results, deletion))
            by = {r.label: r for r in results}
            for a, b in (("attnlrp", "gradient x input"), ("attnlrp", "cplrp"), ("attnlrp", "epsilon_plus_flat")):
                for what in ("morf_aucs", "abpc"):
                    diff = getattr(by[a], what) - getattr(by[b], what)
                    print(f"paired {'MoRF AUC' if what == 'morf_aucs' else 'ABPC'} {a} - {b}: {diff.mean():+.4f} ± "
                          f"{diff.std(ddof=1) / np.sqrt(len(diff)):.4f} (lower on {int((diff < 0).sum())}, equal on "
                          f"{int((diff == 0).sum())} of {len(diff)})")


if __name__ == "__main__":
    main()
