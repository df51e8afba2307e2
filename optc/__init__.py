"""optc: a compiler-style graph optimizer for PyTorch models.

    program = optc.capture(model, (x,))
    program, report = optc.optimize(program, pipeline="default", target="cpu")
    compiled, report = optc.compile(model, (x,), backend="onnx", target="cpu")
    compiled.save("out/"); compiled = optc.load("out/")
"""

__version__ = "0.1.0"

from optc.errors import (  # noqa: E402  (errors first: every submodule imports them)
    ArtifactError, BackendUnavailableError, CaptureError, InputSpecError, LoweringError, NumericMismatchError,
    OptcError, ParseError, PassError, PipelineError, VerificationError, WeightsError,
)
from optc.target import Target, resolve_target  # noqa: E402
from optc.ir.program import Program  # noqa: E402
from optc.ir.capture import capture  # noqa: E402
from optc.api import CompileReport, compile, load, optimize  # noqa: E402
from optc.recover import recover  # noqa: E402

__all__ = [
    "__version__", "capture", "optimize", "compile", "load", "CompileReport", "Program", "Target", "resolve_target",
    "recover", "OptcError", "CaptureError", "ParseError", "PipelineError", "PassError", "VerificationError", "NumericMismatchError",
    "LoweringError", "BackendUnavailableError", "ArtifactError", "InputSpecError", "WeightsError",
]
