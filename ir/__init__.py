"""optc's intermediate representation: Program, capture, printer, verifier, custom ops."""

from optc.ir.program import Program, TensorSpec
from optc.ir.capture import capture

__all__ = ["Program", "TensorSpec", "capture"]
