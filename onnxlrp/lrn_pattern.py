"""Kept for old imports: the LRN recogniser lives in onnxlrp.patterns.lrn."""
from .patterns.lrn import recognise_lrn  # noqa: F401
