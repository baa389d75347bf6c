"""The faithfulness commands of `onnxlrp` (registered on the group in cli.py): `evaluate` (pixel flipping,
reference methods, ROAD, token deletion for text models) and `sanity` (model-parameter randomisation)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import _error, _fail, float_rule_options, main
from .composites import DEFAULT_OPTIONS, LRN_RULES
from .errors import OnnxlrpError


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--composite", "composites", multiple=True, default=["epsilon_plus_flat"], show_default=True,
              help="Composite to evaluate (repeat for several).")
@click.option("--lrn-rule", "lrn_rules", multiple=True, default=["identity", "taylor"], show_default=True,
              help="LRN rule(s) to evaluate when the model has LRN layers (repeat for several).")
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Points on the curve after the start.")
@click.option("--patch", type=click.IntRange(min=1), default=4, show_default=True, help="Patch size in pixels.")
@click.option("--fill", type=click.Choice(["mean", "value", "blur", "black", "white"]), default=None,
              help="What flipped patches become: mean (each channel's mean), value (--fill-value) or blur (a 7x7 "
                   "box blur); with --definition quantus-*: Quantus's mean, value, black (min) or white (max) "
                   "[default: mean]")
@click.option("--fill-value", type=float, default=None, help="The constant for --fill value  [default: 0]")
@click.option("--definition", type=click.Choice(["onnxlrp", "quantus-pixel-flipping", "quantus-region-perturbation"]),
              default="onnxlrp", show_default=True,
              help="Whose metric: onnxlrp's (above), or Quantus 0.6's PixelFlipping (--patch x --patch features per "
                   "step, raw score) or RegionPerturbation (--steps tiles, score drop, higher AUC is better), "
                   "equal to Quantus's curves and AUCs (README, faithfulness).")
@click.option("--reference", "references", multiple=True, type=click.Choice(["occlusion", "rise", "none"]),
              default=["occlusion"], show_default=True,
              help="Black-box reference methods beside gradient x input and random (repeat for several; none: "
                   "only those): occlusion (--patch windows, stride --patch, filled as --fill: one model run per "
                   "window and input) or RISE (--rise-masks model runs per input).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(["pixel-flipping", "fills", "road"]),
              default=["pixel-flipping"], show_default=True,
              help="Metrics to report (repeat for several; pixel flipping always is): fills (the pixel-flipping "
                   "AUC averaged over the fills mean, 0 and blur) or road (ROAD: single pixels imputed by noisy "
                   "linear imputation, noise 0.01, most and least relevant first, at 0, 1/--steps, ..., "
                   "(--steps - 1)/--steps of the pixels; needs scipy).")
@click.option("--rise-masks", type=click.IntRange(min=1), default=1000, show_default=True,
              help="RISE: number of random masks.")
@click.option("--rise-grid", type=click.IntRange(min=1), default=8, show_default=True,
              help="RISE: the masks' cells per side before upsampling.")
@click.option("--rise-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.5, show_default=True,
              help="RISE: probability that a cell is kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random order, RISE's masks and "
              "ROAD's noise.")
@click.option("--baseline", "old_fill", type=click.Choice(["mean", "value", "blur"]), default=None, hidden=True,
              help="Deprecated name of --fill (compile's --baseline is DeepLIFT's reference input).")
@click.option("--baseline-value", "old_fill_value", type=float, default=None, hidden=True,
              help="Deprecated name of --fill-value.")
@click.option("--normalize", default="unit", show_default=True, help="As for explain.")
@click.option("--size", type=(click.IntRange(min=1), click.IntRange(min=1)), default=None,
              help="Input height and width when dynamic.")
@click.option("-o", "--plot", "plot_path", type=click.Path(path_type=Path), default=Path("pixel_flipping.png"),
              show_default=True, help="Where to write the plot of the curves.")
@click.option("--text", "texts", multiple=True,
              help="Text models: a text to evaluate by token deletion (repeatable; INPUTS are then text files, one "
                   "text per line); needs --tokenizer.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Hugging Face tokenizer.json: evaluate a text model by token deletion instead of pixel flipping "
                   "[composites default: epsilon_plus_flat, attnlrp, cplrp; plot default: token_deletion.png].")
@click.option("--deletion", type=click.Choice(["unk", "mask", "pad", "attention"]), default="unk",
              show_default=True, help="Text models: a deleted token's id becomes the tokenizer's unknown token, mask "
                                      "token or padding id (attention mask kept), or its attention mask becomes 0.")
@click.option("--score", type=click.Choice(["raw", "relative", "probability"]), default="raw", show_default=True,
              help="Text models: the curve's score of the explained class: raw (e.g. the logit), relative to the "
                   "undeleted text's, or softmax probability.")
@float_rule_options
def evaluate_command(model: Path, inputs: tuple[Path, ...], composites, lrn_rules, steps: int, patch: int,
                     fill: str | None, fill_value: float | None, old_fill: str | None, old_fill_value: float | None,
                     normalize: str, size, plot_path: Path, definition: str = "onnxlrp", references=("occlusion",),
                     metrics=("pixel-flipping",), rise_masks: int = 1000, rise_grid: int = 8, rise_p: float = 0.5,
                     seed: int = 0, **options) -> None:
    """Pixel flipping: AUC of the explained class's score as the most relevant patches are flipped first, for
    each composite (and LRN rule), against gradient x input, black-box references (--reference) and a random
    order (lower AUC is better), with each map's cost in ms per input; --metric adds ROAD and the mean over
    fills. The rule options apply to every composite evaluated. With --tokenizer (and --text or text files): token
    deletion for a text model instead."""
    text_options = {k: options.pop(k) for k in ("texts", "tokenizer", "deletion", "score")}
    if text_options["texts"] or text_options["tokenizer"]:
        _evaluate_texts(model, inputs, list(composites), steps, plot_path, text_options, options)
        return
    if not inputs:
        raise click.UsageError("Missing argument 'INPUTS...': give images, .npy arrays or folders, or --tokenizer "
                               "with --text or text files for a text model")
    from .evaluate import evaluate, plot, report
    from .inputs import expand_inputs
    from .load import model_files
    from .perturbation_metrics import RiseSettings
    from .save import refuse_overwrite
    for old, new, value in (("--baseline", "--fill", old_fill), ("--baseline-value", "--fill-value", old_fill_value)):
        if value is not None:
            click.echo(f"onnxlrp: warning: evaluate's {old} is deprecated, use {new} (compile's --baseline is "
                       f"DeepLIFT's reference input)", err=True)
    fill = fill or old_fill or "mean"
    fill_value = fill_value if fill_value is not None else (old_fill_value if old_fill_value is not None else 0.0)
    try:
        refuse_overwrite(plot_path, model_files(model) + expand_inputs(list(inputs)), "plot")
        results, failures = evaluate(model, list(inputs), list(composites), list(lrn_rules), steps, patch,
                                     fill, fill_value, normalize, size, progress=sys.stderr.isatty(),
                                     definition=definition, seed=seed,
                                     references=[r for r in references if r != "none"],
                                     metrics=list(dict.fromkeys(["pixel-flipping", *metrics])),
                                     rise=RiseSettings(rise_masks, rise_grid, rise_p), **options)
        plot(results, plot_path, steps)
    except (OnnxlrpError, OSError) as exc:
        _fail(str(exc))
    click.echo(report(results))
    click.echo(f"plot: {plot_path}")
    for _, message in failures:
        _error(message)
    if failures:
        sys.exit(1)


def _evaluate_texts(model: Path, inputs: tuple[Path, ...], composites: list[str], steps: int, plot_path: Path,
                    text_options: dict, options: dict) -> None:
    """evaluate --tokenizer: token deletion (onnxlrp/token_deletion.py) on --text and text files."""
    from .load import model_files
    from .save import refuse_overwrite
    from .token_deletion import TEXT_COMPOSITES, evaluate_texts, plot, read_texts, report
    ctx = click.get_current_context()
    default = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT  # noqa: E731
    image_only = [flag for name, flag in (("lrn_rules", "--lrn-rule"), ("patch", "--patch"), ("fill", "--fill"),
                                          ("fill_value", "--fill-value"), ("definition", "--definition"),
                                          ("old_fill", "--baseline"), ("old_fill_value", "--baseline-value"),
                                          ("normalize", "--normalize"), ("size", "--size"),
                                          ("references", "--reference"), ("metrics", "--metric"),
                                          ("rise_masks", "--rise-masks"), ("rise_grid", "--rise-grid"),
                                          ("rise_p", "--rise-p"))
                  if name in ctx.params and not default(name)]
    if image_only:
        _fail(f"evaluate --tokenizer (text models): {image_only[0]} applies to images only")
    if text_options["tokenizer"] is None:
        _fail("evaluate --text needs --tokenizer tokenizer.json")
    if default("composites"):
        composites = list(TEXT_COMPOSITES)
    if default("plot_path"):
        plot_path = Path("token_deletion.png")
    try:
        refuse_overwrite(plot_path, model_files(model) + list(inputs) + [text_options["tokenizer"]], "plot")
        texts = list(text_options["texts"]) + read_texts(list(inputs))
        results, skipped = evaluate_texts(model, texts, text_options["tokenizer"], composites, steps,
                                          text_options["deletion"], text_options["score"],
                                          progress=sys.stderr.isatty(), **options)
        plot(results, plot_path, steps, text_options["score"])
    except (OnnxlrpError, OSError) as exc:
        _fail(str(exc))
    click.echo(report(results, text_options["deletion"], text_options["score"]))
    click.echo(f"plot: {plot_path}")
    for text, why in skipped:
        _error(f"text {text!r}: {why}")
    if skipped:
        sys.exit(1)


@main.command("sanity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--composite", "composites", multiple=True, default=["epsilon_plus_flat"], show_default=True,
              help="Composite to check (repeat for several); gradient x input is always checked too.")
@click.option("--lrn-rule", default=DEFAULT_OPTIONS["lrn_rule"], show_default=True,
              help=f"Rule for LRN layers: {', '.join(LRN_RULES)}.")
@click.option("--mode", type=click.Choice(["cascade", "independent"]), default="cascade", show_default=True,
              help="cascade: randomise the top k layers at step k; independent: only the k-th from the top.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--normalize", default="unit", show_default=True, help="As for explain.")
@click.option("--size", type=(click.IntRange(min=1), click.IntRange(min=1)), default=None,
              help="Input height and width when dynamic.")
@click.option("--show", type=click.IntRange(min=1), default=3, show_default=True,
              help="Inputs whose heatmaps the figure shows (per method).")
@click.option("-o", "--output", "figure_path", type=click.Path(path_type=Path), default=Path("cascade.png"),
              show_default=True, help="Where to write the figure (.png, .pdf or .svg).")
@float_rule_options
def sanity_command(model: Path, inputs: tuple[Path, ...], composites, mode: str, seed: int, normalize: str, size,
                   show: int, figure_path: Path, **options) -> None:
    """Model-parameter randomisation (Adebayo et al. 2018): replace the weights of the parameterised layers by
    random ones from the top down, explain the inputs for the intact model's class again, and print how similar
    the heatmaps stay (Spearman rank correlation of |R| and of R, SSIM; lower = the explanation depends on the
    weights, as it should); writes the cascade figure."""
    from .inputs import expand_inputs
    from .load import model_files
    from .sanity import report, sanity
    from .sanity_figure import check_format, plot
    from .save import refuse_overwrite
    try:
        refuse_overwrite(figure_path, model_files(model) + expand_inputs(list(inputs)), "figure")
        check_format(figure_path)
        result = sanity(model, list(inputs), list(composites), mode, seed, normalize, size,
                        progress=sys.stderr.isatty(), **options)
        plot(result, figure_path, show)
    except (OnnxlrpError, OSError) as exc:
        _fail(str(exc))
    click.echo(report(result))
    click.echo(f"figure: {figure_path}")
