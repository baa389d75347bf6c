"""AttnLRP on a BERT-base-sized model: ONNX Runtime forward of the original model, ORT run of the model compiled
with ``attnlrp`` (forward + relevance), their ratio, and LXT 2.1's time (forward + backward of its patched BERT) on
the same weights, input and thread count; plus the compile time and how far onnxlrp's ``input_ids_relevance`` is
from LXT's (relative L2). Random init (12 layers, hidden 768, 12 heads, vocab 30522), 128 tokens, CPU.

Timing: --rounds rounds of a warm-up plus --repeats timed runs each; a time is the lowest of its rounds' medians
(ORT forward and explain take turns round by round; LXT runs in its own process because its patches are global).

    python benchmarks/bench_bert.py [--threads 2] [--batch 1] [--tokens 128] [--repeats 5] [--rounds 3] [--no-lxt]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench_common import best_of_rounds, median_time  # benchmarks/ is on sys.path when this script runs

LAYERS, HIDDEN, HEADS, VOCAB = 12, 768, 12, 30522


def build():
    """BERT-base-sized sequence classifier, deterministic random weights, eager attention (looked up now, so
    after LXT's patch in the LXT process)."""
    import torch
    import transformers
    from transformers.models.bert import modeling_bert
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return modeling_bert.BertForSequenceClassification(config).eval()


def inputs(batch: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, VOCAB, size=(batch, tokens)).astype(np.int64),
            "attention_mask": np.ones((batch, tokens), dtype=np.int64),
            "token_type_ids": np.zeros((batch, tokens), dtype=np.int64)}


def export(model, feeds: dict[str, np.ndarray], path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    names = list(feeds)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), tuple(torch.from_numpy(feeds[n]) for n in names), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "N", 1: "T"} for n in names}, "logits": {0: "N"}})


def lxt_worker(args) -> None:
    """In a fresh process: LXT's AttnLRP patch for BERT, the same weights, forward + backward timed."""
    import torch
    from lxt.efficient import monkey_patch
    from transformers.models.bert import modeling_bert
    torch.set_num_threads(args.threads)
    state = torch.load(args.lxt_worker, weights_only=True)
    monkey_patch(modeling_bert)
    model = build()
    model.load_state_dict(state)
    feeds = {k: torch.from_numpy(v) for k, v in inputs(args.batch, args.tokens).items()}
    target = torch.zeros(args.batch, dtype=torch.long)
    kept = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        kept["e"] = out

    model.get_input_embeddings().register_forward_hook(keep)

    def explain():
        model.zero_grad()
        logits = model(**feeds).logits
        logits[torch.arange(args.batch), target].sum().backward()
        return (kept["e"] * kept["e"].grad).sum(-1)

    seconds = min(median_time(explain, args.repeats) for _ in range(args.rounds))
    print(json.dumps({"lxt": seconds, "relevance": explain().detach().numpy().tolist()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-lxt", action="store_true")
    parser.add_argument("--lxt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lxt_worker:
        return lxt_worker(args)

    import onnxruntime as ort
    import torch

    import onnxlrp
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.log_severity_level = 3
    feeds = inputs(args.batch, args.tokens)
    target = np.zeros(args.batch, dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build()
        torch.save(model.state_dict(), folder / "bert.pt")
        export(model, feeds, folder / "bert.onnx")
        start = time.perf_counter()
        compiled = onnxlrp.compile_model(str(folder / "bert.onnx"), "attnlrp")
        compile_seconds = time.perf_counter() - start
        forward = ort.InferenceSession(str(folder / "bert.onnx"), options, providers=["CPUExecutionProvider"])
        explaining = ort.InferenceSession(compiled.SerializeToString(), options,
                                          providers=["CPUExecutionProvider"])
        times = best_of_rounds({
            "forward": lambda: forward.run(["logits"], feeds),
            "explain": lambda: explaining.run(["logits", "input_ids_relevance"], {**feeds, "target": target}),
        }, args.repeats, args.rounds)
        ours = explaining.run(["input_ids_relevance"], {**feeds, "target": target})[0]
        lxt = None
        if not args.no_lxt:
            done = subprocess.run([sys.executable, __file__, "--lxt-worker", str(folder / "bert.pt"),
                                   "--threads", str(args.threads), "--batch", str(args.batch), "--tokens",
                                   str(args.tokens), "--repeats", str(args.repeats), "--rounds", str(args.rounds)],
                                  capture_output=True, text=True, check=True)
            lxt = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"BERT-base-sized ({LAYERS} layers, hidden {HIDDEN}, random init), batch {args.batch}, {args.tokens} "
          f"tokens, CPU, {args.threads} threads; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; lowest of {args.rounds} medians of {args.repeats}")
    print(f"| {'what':<38} | {'ms':>9} | {'x forward':>9} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 11}|")
    rows = [("ORT forward (original model)", times["forward"]),
            ("onnxlrp attnlrp explain (ORT)", times["explain"])]
    if lxt:
        rows.append(("LXT 2.1 attnlrp (torch fwd + bwd)", lxt["lxt"]))
    for label, seconds in rows:
        print(f"| {label:<38} | {seconds * 1e3:9.1f} | {seconds / times['forward']:9.2f} |")
    print(f"compile: {compile_seconds:.1f} s")
    if lxt:
        theirs = np.asarray(lxt["relevance"], dtype=np.float64)
        error = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        print(f"input_ids_relevance vs LXT: relative L2 {error:.1e}; onnxlrp / LXT time: "
              f"{times['explain'] / lxt['lxt']:.2f}")


if __name__ == "__main__":
    main()
