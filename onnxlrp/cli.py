"""The `onnxlrp` command (click)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .composites import DEFAULT_OPTIONS, LRN_RULES, composite_names
from .errors import OnnxlrpError
from .save import write_model_atomically


def _fail(message: str) -> None:
    click.echo(f"onnxlrp: error: {message}", err=True)
    sys.exit(2)


#: The float rule parameters shared by compile and explain, with their help texts (defaults: Zennit's).
RULE_PARAMETERS = {
    "epsilon": "epsilon of the Epsilon rule (0 = LRP-0).",
    "stabilizer": "Stabilizer of every other rule.",
    "gamma": "gamma of the Gamma rule.",
    "alpha": "alpha of the AlphaBeta rule (alpha - beta = 1).",
    "beta": "beta of the AlphaBeta rule.",
    "low": "Lowest input value, for the ZBox rule.",
    "high": "Highest input value, for the ZBox rule.",
}


def rule_options(command):
    """The rule parameters shared by compile and explain (Zennit's defaults)."""
    options = [click.option(f"--{name}", type=float, default=DEFAULT_OPTIONS[name], show_default=True, help=text)
               for name, text in RULE_PARAMETERS.items()]
    options.append(click.option("--lrn-rule", default=DEFAULT_OPTIONS["lrn_rule"], show_default=True,
                                help=f"Rule for LRN layers: {', '.join(LRN_RULES)}."))
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxlrp")
def main() -> None:
    """Compile ONNX models into ONNX models that also explain their predictions (LRP)."""


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the compiled model [default: MODEL with suffix .lrp.onnx].")
@click.option("--composite", default=None,
              help=f"Rule preset: {', '.join(composite_names())} [default: epsilon_plus_flat for image inputs, "
                   f"epsilon_plus for tabular [N, features] inputs; printed on stderr].")
@rule_options
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--target-mask", is_flag=True,
              help="Take a float input target_mask shaped like the explained output instead of target: start "
                   "relevance = output * mask (segmentation regions, detection scores).")
@click.option("--constant-input", "constant_inputs", multiple=True, metavar="NAME",
              help="A float input that is a parameter, not data (repeatable): no relevance output for it.")
@click.option("--inline", is_flag=True, help="Inline the rule functions (plain ONNX graph, no local functions).")
@click.option("--emit-layers", is_flag=True,
              help="Add an output layer_relevance__<node> [N] per rule application (relevance sum per sample).")
@click.option("--check", is_flag=True,
              help="Run the compiled model once on random input and print the conservation table.")
@click.option("--bias-relevance", type=click.Choice(["layers", "units"]), is_flag=False, flag_value="layers",
              default=None, help="Add an output bias_relevance: the relevance each layer (or, =units, each bias "
              "unit of an epsilon layer) absorbed, so that input + bias relevance = start relevance.")
@click.option("--baseline", default="zeros", show_default=True,
              help="DeepLIFT (--composite deeplift): the default baseline, zeros or a FILE.npy shaped like one input "
                   "sample; the compiled model takes it as input <input>_baseline.")
def compile_command(model: Path, output: Path | None, composite: str, explain_output: str | None,
                    target_mask: bool, constant_inputs: tuple[str, ...], inline: bool, emit_layers: bool,
                    check: bool, bias_relevance: str | None, baseline: str, **options) -> None:
    """Compile MODEL into an explaining model with an extra input `target` and outputs `<input>_relevance`."""
    from .compile import compile_model
    output = output or model.with_suffix(".lrp.onnx")
    try:
        compiled = compile_model(model, composite, explain_output=explain_output, inline=inline,
                                 emit_layers=emit_layers, bias_relevance=bias_relevance, baseline=baseline,
                                 target_mask=target_mask, constant_inputs=constant_inputs, **options)
        report = _check_report(model, composite, explain_output, options) if check else None
        write_model_atomically(compiled, output)
    except OnnxlrpError as exc:
        _fail(str(exc))
    meta = {p.key: p.value for p in compiled.metadata_props}
    if composite is None:
        click.echo(f"onnxlrp: composite {meta['onnxlrp.composite']} ({meta['onnxlrp.composite_default']})", err=True)
    if explain_output is None and len(meta.get("onnxlrp.outputs", "").split(",")) > 1:
        click.echo(f"onnxlrp: explained output {meta['onnxlrp.explained_output']!r} (its scores before any "
                   f"softmax/sigmoid; --explain-output picks another)", err=True)
    if report:
        click.echo(report)
    click.echo(f"wrote {output} (composite {meta['onnxlrp.composite']})")


def _check_report(model: Path, composite: str, explain_output: str | None, options: dict) -> str:
    """Compile with per-layer totals, run once on random input, and render the conservation table."""
    import json

    import numpy as np

    from .compile import RELEVANCE_SUFFIX, compile_model
    from .report import conservation_rows, conservation_text, random_feeds
    from .runtime import make_session
    checked = compile_model(model, composite, explain_output=explain_output, emit_layers="check", **options)
    try:
        feeds = random_feeds(checked)
    except ValueError as exc:
        raise OnnxlrpError(f"{model}: --check: {exc}") from None
    feeds["target"] = np.full(next(iter(feeds.values())).shape[0], -1, dtype=np.int64)
    session = make_session(checked)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    meta = {p.key: p.value for p in checked.metadata_props}
    rows = conservation_rows(json.loads(meta["onnxlrp.rules"]), values, meta["onnxlrp.signal"])
    start = rows[-1]["arriving"] if rows else 0.0
    total = float(np.mean(sum(v.reshape(v.shape[0], -1).sum(1) for k, v in values.items()
                              if k.endswith(RELEVANCE_SUFFIX))))
    return conservation_text(rows, start, total)


@main.command("explain")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--outdir", type=click.Path(path_type=Path), default=Path("onnxlrp-out"), show_default=True,
              help="Folder for the heatmaps (.png) and raw relevance (.npy).")
@click.option("--target", type=int, default=None, help="Class to explain [default: the predicted class].")
@click.option("--composite", "composites", multiple=True, default=["epsilon_plus_flat"], show_default=True,
              help=f"Rule preset (repeat for several): {', '.join(composite_names())}.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Inputs per run.")
@click.option("--size", type=(int, int), default=None, help="Input height and width when the model's are dynamic.")
@click.option("--normalize", default="unit", show_default=True,
              help="Pixel scaling: unit ([0, 1]), imagenet, none (0..255), or MEAN,STD after [0, 1] scaling.")
@click.option("--cmap", default="bwr", show_default=True, help="Colormap: a matplotlib name, or coldnhot.")
@click.option("--overlay", is_flag=True, help="Blend the heatmap over the input image.")
@click.option("--zoom", type=int, default=1, show_default=True, help="Upscale the PNGs by this integer factor.")
@rule_options
def explain_command(model: Path, inputs: tuple[Path, ...], outdir: Path, target: int | None,
                    composites: tuple[str, ...], batch_size: int, size, normalize: str, cmap: str, overlay: bool,
                    zoom: int, **options) -> None:
    """Explain images (PNG/JPEG), folders of them, or .npy arrays: a heatmap PNG, the raw relevance (.npy) and
    one line per input (predicted class, score, explained class, sum of relevance)."""
    from .explain import explain_files
    try:
        results, failures = explain_files(model, list(inputs), outdir, list(composites), target, batch_size,
                                          size, normalize, cmap, overlay, zoom, log=click.echo,
                                          warn=lambda m: click.echo(m, err=True), **options)
    except (OnnxlrpError, ValueError) as exc:
        _fail(str(exc))
    for _, message in failures:
        click.echo(f"onnxlrp: error: {message}", err=True)
    if failures:
        click.echo(f"onnxlrp: {len(failures)} input(s) failed: {', '.join(str(f) for f, _ in failures)}", err=True)
        sys.exit(1)


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--composite", "composites", multiple=True, default=["epsilon_plus_flat"], show_default=True,
              help="Composite to evaluate (repeat for several).")
@click.option("--lrn-rule", "lrn_rules", multiple=True, default=["identity", "taylor"], show_default=True,
              help="LRN rule(s) to evaluate when the model has LRN layers (repeat for several).")
@click.option("--steps", type=int, default=16, show_default=True, help="Points on the curve after the start.")
@click.option("--patch", type=int, default=4, show_default=True, help="Patch size in pixels.")
@click.option("--baseline", default="value", show_default=True, help="What flipped patches become: value, mean "
              "(the channel mean) or blur (a 7x7 box blur).")
@click.option("--baseline-value", type=float, default=0.0, show_default=True, help="The constant for value.")
@click.option("--normalize", default="unit", show_default=True, help="As for explain.")
@click.option("--size", type=(int, int), default=None, help="Input height and width when dynamic.")
@click.option("--epsilon", type=float, default=DEFAULT_OPTIONS["epsilon"], show_default=True)
@click.option("-o", "--plot", "plot_path", type=click.Path(path_type=Path), default=Path("pixel_flipping.png"),
              show_default=True, help="Where to write the plot of the curves.")
def evaluate_command(model: Path, inputs: tuple[Path, ...], composites, lrn_rules, steps: int, patch: int,
                     baseline: str, baseline_value: float, normalize: str, size, epsilon: float,
                     plot_path: Path) -> None:
    """Pixel flipping: AUC of the explained class's score as the most relevant patches are flipped first, for
    each composite (and LRN rule), against gradient x input and a random order (lower AUC is better)."""
    from .evaluate import evaluate, plot, report
    try:
        results, failures = evaluate(model, list(inputs), list(composites), list(lrn_rules), steps, patch,
                                     baseline, baseline_value, normalize, size, epsilon=epsilon)
        plot(results, plot_path, steps)
    except (OnnxlrpError, OSError) as exc:
        _fail(str(exc))
    click.echo(report(results))
    click.echo(f"plot: {plot_path}")
    for _, message in failures:
        click.echo(f"onnxlrp: error: {message}", err=True)
    if failures:
        sys.exit(1)


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--composite", default=None,
              help=f"Rule preset: {', '.join(composite_names())} [default: as compile's].")
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--lrn-rule", default=DEFAULT_OPTIONS["lrn_rule"], show_default=True,
              help=f"Rule for LRN layers: {', '.join(LRN_RULES)}.")
@click.option("--constant-input", "constant_inputs", multiple=True, metavar="NAME",
              help="A float input that is a parameter, not data (repeatable).")
def inspect_command(model: Path, composite: str, explain_output: str | None, lrn_rule: str,
                    constant_inputs: tuple[str, ...]) -> None:
    """Show, before compiling, the rule every node on the relevance path gets; exit 2 if any is unsupported."""
    from .compile import make_plan
    from .report import inspect_text
    try:
        plan = make_plan(model, composite, explain_output=explain_output, lrn_rule=lrn_rule,
                         constant_inputs=constant_inputs)
    except OnnxlrpError as exc:
        _fail(str(exc))
    click.echo(inspect_text(plan))
    if plan.unsupported:
        sys.exit(2)


if __name__ == "__main__":
    main()
