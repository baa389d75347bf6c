"""A Clever Hans experiment for `onnxlrp analyze` (SpRAy): a digits CNN trained where one class carries a small
watermark in a corner on half of its training samples learns the shortcut; SpRAy on that class's heatmaps puts
the watermarked inputs into a cluster of their own.

    python benchmarks/spray_watermark.py [--seed 0] [--class 3] [-o spray-watermark]

Trains on scikit-learn's 8x8 digits (deterministic, a few seconds on 2 cores), exports the model to ONNX, explains
the held-out digits of the class (half of them watermarked) with onnxlrp (epsilon_plus), writes their relevance as .npy files,
runs SpRAy with the eigengap's number of clusters and prints the purity and recall of the cluster that holds most
watermarked inputs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MARK = (slice(0, 3), slice(0, 1))  # a 3x1 watermark in the top-left corner column, where no digit has ink


def watermark(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[..., MARK[0], MARK[1]] = 1.0
    return out


def train(seed: int, klass: int, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train and export the model; returns (model path, held-out digits of the class, which are watermarked)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    own = np.flatnonzero(y_train == klass)
    marked = rng.choice(own, size=len(own) // 2, replace=False)
    x_train[marked] = watermark(x_train[marked])

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and deterministic
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(25):
        order = torch.from_numpy(rng.permutation(len(xt)))
        for i in range(0, len(xt), 64):
            batch = order[i:i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    model.eval()
    torch.set_num_threads(threads)
    path = folder / "digits_watermark.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    test = x_test[y_test == klass]
    flags = np.zeros(len(test), dtype=bool)
    flags[rng.choice(len(test), size=len(test) // 2, replace=False)] = True
    test[flags] = watermark(test[flags])
    print(f"test accuracy {accuracy:.3f}; {len(test)} held-out digits of class {klass}, {flags.sum()} watermarked")
    return path, test, flags


def run(seed: int, klass: int, outdir: Path, composite: str = "epsilon_plus") -> dict:
    """The whole experiment; returns purity and recall of the watermark cluster and the SpRAy result."""
    import onnxlrp
    from onnxlrp.spray import analyze, write_report
    outdir.mkdir(parents=True, exist_ok=True)
    model, test, flags = train(seed, klass, outdir)
    # epsilon_plus: the flat rule of the default composite would spread relevance onto empty pixels too
    explainer = onnxlrp.Explainer(str(model), composite=composite)
    _, relevance = explainer.explain(test, target=klass)
    heat = outdir / "relevance"
    heat.mkdir(exist_ok=True)
    ids = [f"{'marked' if f else 'clean'}_{i:03d}" for i, f in enumerate(flags)]
    for name, r in zip(ids, relevance):
        np.save(heat / f"{name}.npy", r)
    result = analyze(ids, list(relevance), seed=seed)
    write_report(result, outdir / "report", title=f"SpRAy, class {klass}, watermark on half")
    best = max(range(int(result.labels.max()) + 1), key=lambda c: int((flags & (result.labels == c)).sum()))
    members = result.labels == best
    purity = float(flags[members].mean())
    recall = float(members[flags].mean())
    print(f"eigengap suggests {result.suggested} clusters; the watermark cluster {best} holds "
          f"{int(members.sum())} inputs: purity {purity:.3f}, recall {recall:.3f}")
    return {"purity": purity, "recall": recall, "clusters": result.suggested, "result": result}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class", dest="klass", type=int, default=3)
    parser.add_argument("-o", "--outdir", type=Path, default=Path("spray-watermark"))
    args = parser.parse_args()
    run(args.seed, args.klass, args.outdir)
