"""The `onnxlrp` command (click)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .composites import DEFAULT_OPTIONS, LRN_RULES, composite_names
from .errors import OnnxlrpError
from .save import check_output, write_model_atomically


def _error(message: str) -> None:
    """``onnxlrp: error: ...`` on stderr, on one line even for a file name with a newline in it."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    click.echo(f"onnxlrp: error: {message}", err=True)


def _fail(message: str) -> None:
    _error(message)
    sys.exit(2)


def _drop_stdout() -> None:
    """The reader of stdout went away (`onnxlrp explain ... | head -1`): send the rest to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _echo(line: str) -> None:
    """A result line on stdout; a closed pipe is no error: the run goes on and writes its files."""
    try:
        click.echo(line)
    except BrokenPipeError:
        _drop_stdout()


#: The float rule parameters shared by compile and explain, with their help texts (defaults: Zennit's).
RULE_PARAMETERS = {
    "epsilon": "epsilon of the Epsilon rule (0 = LRP-0).",
    "stabilizer": "Stabilizer of every other rule.",
    "gamma": "gamma of the Gamma rule.",
    "alpha": "alpha of the AlphaBeta rule (alpha - beta = 1).",
    "beta": "beta of the AlphaBeta rule.",
    "low": "Lowest input value, for the ZBox rule: one value or one per channel (comma-separated); explain "
           "derives it from --normalize unless given.",
    "high": "Highest input value, for the ZBox rule: one value or one per channel (comma-separated); explain "
            "derives it from --normalize unless given.",
}


class Bounds(click.ParamType):
    """One float, or one per channel separated by commas (ZBox's --low/--high)."""

    name = "FLOAT[,FLOAT...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float, list)):
            return value
        try:
            values = [float(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a number or a comma-separated list of numbers (one per channel)", param, ctx)
        return values[0] if len(values) == 1 else values


RULES_OPTION = click.option(
    "--rules", multiple=True, type=click.Path(file_okay=False, path_type=Path),
    help="A folder of your own rule templates (*.onnxtxt, linear/*.onnxtxt) and op rows (ops.toml); repeatable.")
COMPOSITE_HELP = (f"Rule preset: {', '.join(composite_names())}; or your own composite, FILE.toml[:NAME] "
                  f"(format of rules/composites.toml, plus per-node overrides).")


def float_rule_options(command):
    """The float rule parameters alone (evaluate has its own, repeatable --lrn-rule)."""
    for name, text in reversed(RULE_PARAMETERS.items()):
        command = click.option(f"--{name}", type=Bounds() if name in ("low", "high") else float,
                               default=DEFAULT_OPTIONS[name], show_default=True, help=text)(command)
    return command


def rule_options(command):
    """The rule parameters shared by compile and explain (Zennit's defaults)."""
    options = [click.option(f"--{name}", type=Bounds() if name in ("low", "high") else float,
                            default=DEFAULT_OPTIONS[name], show_default=True, help=text)
               for name, text in RULE_PARAMETERS.items()]
    options.append(click.option("--lrn-rule", default=DEFAULT_OPTIONS["lrn_rule"], show_default=True,
                                help=f"Rule for LRN layers: {', '.join(LRN_RULES)}."))
    options.append(RULES_OPTION)
    for option in reversed(options):
        command = option(command)
    return command


class _OneLineErrors(click.Group):
    """Never a traceback: an exception that escapes a command (input nobody foresaw, or a bug) is one line
    `onnxlrp: error: ...` with exit code 2. ONNXLRP_DEBUG=1 lets it through with its traceback."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors (a bad option value, a missing argument) are one line too, with exit code 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # plain `onnxlrp`: the help text
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "onnxlrp"
            _fail(f"{exc.format_message()} (see {command} --help)")
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.Abort:
            click.echo("onnxlrp: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OnnxlrpError as exc:
            _fail(str(exc))
        except MemoryError:
            _fail("out of memory")
        except BrokenPipeError:
            _drop_stdout()  # like any Unix tool whose reader went away: stop quietly
            sys.exit(1)
        except Exception as exc:
            import os
            if os.environ.get("ONNXLRP_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"internal error ({type(exc).__name__}{': ' + first if first else ''}); "
                  f"ONNXLRP_DEBUG=1 shows the traceback")


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxlrp")
def main() -> None:
    """Compile ONNX models into ONNX models that also explain their predictions (LRP)."""
    import warnings

    from .diagnostics import show_warning
    warnings.showwarning = show_warning  # onnxlrp's warnings as one line `onnxlrp: warning: ...` on stderr


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the compiled model [default: MODEL with suffix .lrp.onnx].")
@click.option("--composite", default=None,
              help=COMPOSITE_HELP + " [default: epsilon_plus_flat for image inputs, epsilon_plus for tabular "
                   "[N, features] inputs; printed on stderr].")
@rule_options
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--target-mask", is_flag=True,
              help="Take a float input target_mask shaped like the explained output instead of target: start "
                   "relevance = output * mask (segmentation regions, detection scores).")
@click.option("--constant-input", "constant_inputs", multiple=True, metavar="NAME",
              help="A float input that is a parameter, not data (repeatable): no relevance output for it.")
@click.option("--inline", is_flag=True, help="Inline the rule functions (plain ONNX graph, no local functions).")
@click.option("--portable", is_flag=True,
              help="One plain graph for every runtime (OpenVINO, onnx.reference, ONNX Runtime): --inline, and "
                   "only templates that all of them run.")
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
@click.option("--relevance-at", "relevance_at", multiple=True, metavar="TENSOR",
              help="Also output TENSOR_relevance, the relevance at that tensor, shaped like it (repeatable; e.g. "
                   "a text model's word-embedding output, a CNN layer).")
def compile_command(model: Path, output: Path | None, composite: str | None, explain_output: str | None,
                    target_mask: bool, constant_inputs: tuple[str, ...], inline: bool, portable: bool,
                    emit_layers: bool, check: bool, bias_relevance: str | None, baseline: str,
                    relevance_at: tuple[str, ...], **options) -> None:
    """Compile MODEL into an explaining model with an extra input `target` and outputs `<input>_relevance`."""
    from .compile import compile_model
    from .load import model_files
    from .report import check_report
    output = output or model.with_suffix(".lrp.onnx")
    baseline_file = [Path(baseline)] if baseline != "zeros" else []
    try:
        check_output(output, [model, *baseline_file])  # before a long compile (its data files: see below)
        compiled = compile_model(model, composite, explain_output=explain_output, inline=inline, portable=portable,
                                 emit_layers=emit_layers, bias_relevance=bias_relevance, baseline=baseline,
                                 relevance_at=relevance_at, target_mask=target_mask,
                                 constant_inputs=constant_inputs, **options)
        # never overwritten; the external data files are known from the compile's read (no second parse)
        protected = model_files(model) + baseline_file
        report, flagged = check_report(model, composite, explain_output, {**options,
                                                                          "constant_inputs": constant_inputs}) \
            if check else (None, 0)
        write_model_atomically(compiled, output, protected)
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
    if flagged:  # the model is written, but a conserving rule lost or created relevance: say so by the exit code
        sys.exit(1)


@main.command("explain")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--outdir", type=click.Path(path_type=Path), default=Path("onnxlrp-out"), show_default=True,
              help="Folder for the heatmaps (.png) and raw relevance (.npy).")
@click.option("--target", "targets", type=int, multiple=True,
              help="Class to explain; repeat for several (one heatmap each, <name>.<class>.png) [default: the "
                   "predicted class].")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Class names, one a line [default: from the model's metadata, when it has them].")
@click.option("--json", "json_path", default=None, metavar="FILE|-",
              help="Write one JSON record per input and target to FILE (- = stdout; the lines then go to stderr).")
@click.option("--composite", "composites", multiple=True, default=["epsilon_plus_flat"], show_default=True,
              help=COMPOSITE_HELP + " Repeat for several.")
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Inputs per run.")
@click.option("--size", type=(click.IntRange(min=1), click.IntRange(min=1)), default=None,
              help="Input height and width when the model's are dynamic.")
@click.option("--normalize", default="unit", show_default=True,
              help="Pixel scaling: unit ([0, 1]), imagenet, none (0..255), or MEAN,STD after [0, 1] scaling.")
@click.option("--resize-mode", "resize", type=click.Choice(["crop", "squash", "pad"]), default="crop",
              show_default=True, help="crop: shorter side to the model's size, then centre crop; squash: both "
                                      "sides; pad: longer side, then pad with black.")
@click.option("--cmap", default="bwr", show_default=True, help="Colormap: a matplotlib name, or coldnhot.")
@click.option("--overlay", is_flag=True, help="Draw the heatmap over the input image (opacity from |relevance|).")
@click.option("--colorbar", is_flag=True, help="Add a colour bar with the scale's values to each heatmap.")
@click.option("--scale", type=click.Choice(["each", "shared"]), default="each", show_default=True,
              help="Colour scale: each heatmap its own, or one shared by all (comparable heatmaps).")
@click.option("--zoom", type=click.IntRange(min=1), default=1, show_default=True,
              help="Upscale the PNGs by this integer factor.")
@click.option("--text", "texts", multiple=True, help="Text to explain (repeatable), for a text model; needs "
              "--tokenizer. Prints each token with its relevance and writes OUTDIR/text.html and text.json.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Hugging Face tokenizer.json for --text (read offline with the tokenizers library).")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Colour the tokens of --text (auto: when stdout is a terminal).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data: a local Ray (--ray alone) or a cluster (auto, ray://HOST:10001); also writes "
                   "OUTDIR/results.parquet.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --ray: actors, one ONNX Runtime session each.")
@rule_options
def explain_command(model: Path, inputs: tuple[Path, ...], outdir: Path, targets: tuple[int, ...],
                    labels_file: Path | None, json_path: str | None, composites: tuple[str, ...],
                    explain_output: str | None, batch_size: int, size, normalize: str, resize: str, cmap: str,
                    overlay: bool, colorbar: bool, scale: str, zoom: int, texts: tuple[str, ...],
                    tokenizer: Path | None, color: str, ray_address: str | None, workers: int, **options) -> None:
    """Explain images (PNG/JPEG), folders of them, or .npy arrays: a heatmap PNG, the raw relevance (.npy) and
    one line per input and target (predicted class, score, explained class, sum of relevance). With --text and
    --tokenizer: sentences for a text model, each token printed with its relevance."""
    import json

    from .explain import explain_files
    from .labels import read_labels_file
    from .save import write_file_atomically
    if texts or tokenizer:
        if len(targets) > 1:
            _fail("--text takes one --target")
        _explain_texts(model, inputs, texts, tokenizer, outdir, list(composites), targets[0] if targets else None,
                       color, options)
        return
    if not inputs:
        raise click.UsageError("Missing argument 'INPUTS...': give images, .npy arrays or folders to explain, or "
                               "--text with --tokenizer")
    to_stdout = json_path == "-"
    log = (lambda m: click.echo(m, err=True)) if to_stdout else _echo
    ctx = click.get_current_context()
    try:
        if json_path not in (None, "-"):  # the JSON file never replaces the model or an input
            from .inputs import expand_inputs
            from .load import model_files
            from .save import refuse_overwrite
            refuse_overwrite(Path(json_path), model_files(model) + expand_inputs(list(inputs)), "--json file")
        labels = read_labels_file(labels_file) if labels_file else None
        for key in ("low", "high"):  # None: the ZBox bounds follow --normalize
            if ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
                options[key] = None
        if ray_address is not None:
            from .distributed import explain_on_ray
            if scale == "shared" or json_path is not None or labels_file is not None:
                raise OnnxlrpError("--ray writes OUTDIR/results.parquet; it takes neither --scale shared, --json "
                                   "nor --labels")
            failures = explain_on_ray(model, list(inputs), outdir, list(composites), list(targets) or None,
                                      batch_size, size, normalize, resize, cmap, workers,
                                      None if ray_address == "local" else ray_address, log=log, zoom=zoom,
                                      colorbar=colorbar, overlay=overlay, explain_output=explain_output,
                                      **options)
            _report_failures(failures)
            return
        results, failures = explain_files(model, list(inputs), outdir, list(composites), list(targets) or None,
                                          batch_size, size, normalize, cmap, overlay, zoom, log=log,
                                          warn=lambda m: click.echo(m, err=True), labels=labels, resize=resize,
                                          scale=scale, colorbar=colorbar, explain_output=explain_output, **options)
        if json_path is not None:
            records = [r.record() for r in results] + [{"input": str(f), "error": m} for f, m in failures]
            text = json.dumps(records, indent=2)
            if to_stdout:
                click.echo(text)
            else:
                write_file_atomically(Path(json_path), lambda handle: handle.write((text + "\n").encode()))
    except (OnnxlrpError, ValueError) as exc:
        _fail(str(exc))
    _report_failures(failures)


def _report_failures(failures: list) -> None:
    """One line per input that could not be used, a summary, and exit code 1 when there were any."""
    for _, message in failures:
        _error(message)
    if failures:
        names = ", ".join(str(f) for f, _ in failures).replace("\r", "\\r").replace("\n", "\\n")
        click.echo(f"onnxlrp: {len(failures)} input(s) failed: {names}", err=True)
        sys.exit(1)


def _explain_texts(model: Path, inputs: tuple[Path, ...], texts: tuple[str, ...], tokenizer: Path | None,
                   outdir: Path, composites: list[str], target: int | None, color: str, options: dict) -> None:
    from .text import explain_texts
    if inputs:
        _fail(f"give either input files or --text, not both (got {inputs[0]})")
    if not texts or tokenizer is None:
        _fail("--text and --tokenizer go together")
    try:
        ansi = {"always": True, "never": False}.get(color)  # click strips ANSI codes off a non-terminal unless told
        explain_texts(model, list(texts), tokenizer, outdir, composites, target, color,
                      log=lambda m: click.echo(m, color=ansi), warn=lambda m: click.echo(m, err=True), **options)
    except (OnnxlrpError, ValueError, OSError) as exc:
        _fail(str(exc))


@main.command("analyze")
@click.argument("relevance", type=click.Path(exists=True, path_type=Path))
@click.option("--class", "klass", type=int, default=None,
              help="Analyse the inputs explained for this class (needs a Parquet sink: explain --ray).")
@click.option("-o", "--outdir", type=click.Path(path_type=Path), default=Path("spray-report"), show_default=True,
              help="Folder for index.html, its pictures and clusters.csv.")
@click.option("--clusters", type=click.IntRange(min=2), default=None,
              help="Number of clusters [default: the eigengap's suggestion].")
@click.option("--neighbors", type=click.IntRange(min=1), default=10, show_default=True,
              help="Neighbours of the k-nearest-neighbour affinity graph.")
@click.option("--size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Heatmaps are block-averaged to at most this many pixels a side.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of clustering and t-SNE.")
def analyze_command(relevance: Path, klass: int | None, outdir: Path, clusters: int | None, neighbors: int,
                    size: int, seed: int) -> None:
    """SpRAy: cluster dataset-wide heatmaps (a folder of explain's .npy files, or a Parquet sink of explain
    --ray) to find the strategies a model uses for a class; writes an HTML report."""
    from .spray import analyze, load_relevance, write_report
    try:
        ids, arrays, inputs = load_relevance(relevance, klass)
        result = analyze(ids, arrays, clusters=clusters, neighbors=neighbors, size=size, seed=seed, inputs=inputs)
        page = write_report(result, outdir, title=f"SpRAy of {relevance}" + (f", class {klass}" if klass is not None
                                                                               else ""))
    except (OnnxlrpError, OSError) as exc:
        _fail(str(exc))
    n = int(result.labels.max()) + 1
    click.echo(f"{len(ids)} heatmaps, eigengap suggests {result.suggested} clusters; "
               + ", ".join(f"cluster {c}: {int((result.labels == c).sum())}" for c in range(n)))
    click.echo(f"report: {page}")


@main.command("export-triton")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.argument("repository", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name in the repository [default: the model file's stem].")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=None,
              help="Triton's max_batch_size (dynamic batching when > 0) [default: 16 for a model with a dynamic "
                   "batch, 0 (full shapes) for a fixed one].")
@click.option("--composite", default="epsilon_plus_flat", show_default=True, help=COMPOSITE_HELP)
@rule_options
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--inline", is_flag=True, help="Inline the rule functions (plain ONNX graph, no local functions).")
def export_triton_command(model: Path, repository: Path, name: str | None, max_batch_size: int | None,
                          composite: str, explain_output: str | None, inline: bool, **options) -> None:
    """Write a Triton Inference Server model repository: REPOSITORY/<name>/1/model.onnx (the compiled model) and
    REPOSITORY/<name>/config.pbtxt (onnxruntime backend; inputs incl. target, outputs incl. relevance)."""
    from .compile import compile_model
    from .load import model_files
    from .triton import export_triton, model_name
    try:
        compiled = compile_model(model, composite, explain_output=explain_output, inline=inline, **options)
        written = export_triton(compiled, repository, name or model_name(model), str(model), max_batch_size,
                                protected=model_files(model))
    except OnnxlrpError as exc:
        _fail(str(exc))
    click.echo(f"wrote {', '.join(str(p) for p in written)} (composite {composite})")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--composite", default=None, help=COMPOSITE_HELP + " [default: as compile's].")
@click.option("--explain-output", default=None, help="Output to explain [default: the first].")
@click.option("--lrn-rule", default=DEFAULT_OPTIONS["lrn_rule"], show_default=True,
              help=f"Rule for LRN layers: {', '.join(LRN_RULES)}.")
@click.option("--constant-input", "constant_inputs", multiple=True, metavar="NAME",
              help="A float input that is a parameter, not data (repeatable).")
@RULES_OPTION
def inspect_command(model: Path, composite: str | None, explain_output: str | None, lrn_rule: str,
                    constant_inputs: tuple[str, ...], rules: tuple[Path, ...]) -> None:
    """Show, before compiling, the rule every node on the relevance path gets (and, with a composite file's
    overrides, why); exit 2 if any is unsupported."""
    from .compile import make_plan
    from .report import inspect_text
    try:
        plan = make_plan(model, composite, explain_output=explain_output, lrn_rule=lrn_rule, rules=rules,
                         constant_inputs=constant_inputs)
    except OnnxlrpError as exc:
        _fail(str(exc))
    click.echo(inspect_text(plan))
    if plan.unsupported:
        sys.exit(2)


from . import cli_faithfulness  # noqa: E402,F401  (registers evaluate and sanity on main)

if __name__ == "__main__":  # python -m onnxlrp.cli: run the group of onnxlrp.cli, where those are registered
    from onnxlrp.cli import main as registered

    registered()
