"""optc: a compiler-style graph optimizer for PyTorch models.

    program = optc.capture(model, (x,))
    program, report = optc.optimize(program, pipeline="default", target="cpu")
    compiled, report = optc.compile(model, (x,), backend="onnx", target="cpu")
"""

__version__ = "0.1.0"

from optc.errors import (  # noqa: E402  (errors first: every submodule imports them)
    ArtifactError, BackendUnavailableError, CaptureError, InputSpecError, LoweringError, NumericMismatchError,
    OptcError, PassError, PipelineError, VerificationError,
)
from optc.target import Target, resolve_target  # noqa: E402
from optc.ir.program import Program  # noqa: E402
from optc.ir.capture import capture  # noqa: E402
from optc.api import optimize  # noqa: E402

__all__ = [
    "__version__", "capture", "optimize", "Program", "Target", "resolve_target",
    "OptcError", "CaptureError", "PipelineError", "PassError", "VerificationError", "NumericMismatchError",
    "LoweringError", "BackendUnavailableError", "ArtifactError", "InputSpecError",
]
