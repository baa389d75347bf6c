"""Variant choosers: per node, which of an op's template variants (rules/ops.toml ``variant``; e.g. a Conv's
transposed pass) the rules use, and which of them the portable form may use. VARIANTS is the registry that
ops.toml names."""
from __future__ import annotations

from collections.abc import Callable

from .bind_context import BindContext, axis_attribute
from .ort_fusions import fused_summand


def conv_variant(ctx: BindContext) -> str:
    """The fwd/bwd pair for a Conv: flat with one group has a template of its own (convflat_flat); stride-1
    convolutions take their transposed pass as a Conv (faster on ONNX Runtime's CPU kernels, and independent of
    the input size), grouped ones as a Conv on the stride-spread input
    (onnx.reference's ConvTranspose lacks groups), the rest ConvTranspose; strided convolutions whose spatial
    sizes are only known at run time use ConvTranspose cut to the input's size."""
    if ctx.rule == "flat" and int(ctx.attr("group", 1)) == 1:
        return "convflat"  # a one-channel form of flat, see rules/ops/convflat_flat.onnxtxt
    strides = ctx.attr("strides", None)
    if strides is None or all(int(s) == 1 for s in strides):
        return "convs1"
    shapes = [ctx.view.shape(ctx.node.input[0]), ctx.view.shape(ctx.node.output[0])]
    if any(s is None or None in s[2:] for s in shapes):
        return "convdyn"
    return "convgrouped" if int(ctx.attr("group", 1)) > 1 else "conv"


def maxpool_variant(ctx: BindContext) -> str | None:
    """"unpool" when the windows do not overlap and MaxUnpool's own output size is the input's (no padding or
    dilation, kernel <= strides, static sizes that the windows reach to the end): no winner can collect relevance
    from two windows, so nothing needs adding up."""
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    x_shape, y_shape = ctx.view.shape(ctx.node.input[0]), ctx.view.shape(ctx.node.output[0])
    if any(int(p) for p in ctx.attr("pads", [0] * 2 * n)) or any(int(d) != 1 for d in ctx.attr("dilations", [1] * n)):
        return None
    if ctx.text("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "") or any(k > s for k, s in zip(kernel, strides)):
        return None
    if x_shape is None or y_shape is None or None in x_shape[2:] or None in y_shape[2:]:
        return None
    reach = [(o - 1) * s + k for o, s, k in zip(y_shape[2:], strides, kernel)]
    return "unpool" if reach == list(x_shape[2:]) else None


def concat_variant(ctx: BindContext) -> str | None:
    """"runtime" when some input's size along the axis is unknown statically (dynamic sequence lengths)."""
    axis = axis_attribute(ctx, ctx.node.output[0])
    shapes = [ctx.view.shape(name) for name in ctx.node.input]
    return "runtime" if any(s is None or s[axis] is None for s in shapes) else None



def pad_variant(ctx: BindContext) -> str | None:
    """"runtime" for pads computed in the graph (from shapes); they must be non-negative (no cropping)."""
    return "runtime" if ctx.view.constant_value(ctx.node.input[1]) is None else None


def add_variant(ctx: BindContext) -> str | None:
    """"complement" (read x as y - other) for the summand that ONNX Runtime fuses into its Conv."""
    return "complement" if fused_summand(ctx.view, ctx.index) == ctx.x else None


def gelu_variant(ctx: BindContext) -> str | None:
    """"tanh" for GELU's tanh approximation (op attribute, or recognised by patterns/gelu.py)."""
    return "tanh" if ctx.text("approximate", "none") == "tanh" else None


VARIANTS: dict[str, Callable[[BindContext], str | None]] = {"conv": conv_variant, "add": add_variant,
                                                             "maxpool": maxpool_variant, "concat": concat_variant,
                                                             "pad": pad_variant, "gelu": gelu_variant}

#: Variants the portable form (compile --portable) may choose, per VARIANTS entry. Every one was run on
#: OpenVINO's ONNX front end and onnx.reference against ONNX Runtime (tests/test_runtimes.py). Left out:
#: maxpool "unpool" (MaxUnpool: OpenVINO's ONNX front end has no converter for it, and after it the rank of
#: the relevance is unknown, so the next Conv fails to validate; ORT has no CUDA kernel for it either).
PORTABLE_VARIANTS: dict[str, set[str | None]] = {
    "conv": {"conv", "convs1", "convgrouped", "convdyn", "convflat"},
    "add": {None, "complement"},
    "maxpool": {None},
    "concat": {None, "runtime"},  # Slice / Pad with sizes read at run time (Shape): standard ops everywhere
    "pad": {None, "runtime"},
    "gelu": {None, "tanh"},
}


def choose_variant(ctx: BindContext, variant: str) -> str | None:
    """The node's variant from VARIANTS; in the portable form, the op's own template where the chosen variant
    is not portable."""
    chosen = VARIANTS[variant](ctx)
    if ctx.portable and chosen not in PORTABLE_VARIANTS[variant]:
        return None
    return chosen
