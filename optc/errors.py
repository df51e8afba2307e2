"""Typed errors raised by optc.

Every error a user can trigger is one of these. Each carries enough context to act
on: the op, the node, the user's source line, the pass, the backend.
"""

from __future__ import annotations


class OptcError(Exception):
    """Base class of every error optc raises on purpose."""


class CaptureError(OptcError):
    """The model could not be captured into an optc Program.

    Attributes: ``reason`` (one line), ``source`` (``file:line`` of the user's code
    that triggered it, or None), ``hint`` (what usually fixes it, or None).
    """

    def __init__(self, reason: str, *, source: str | None = None, hint: str | None = None):
        self.reason = reason
        self.source = source
        self.hint = hint
        msg = reason
        if source:
            msg += f"\n  at {source}"
        if hint:
            msg += f"\n  hint: {hint}"
        super().__init__(msg)


class ParseError(OptcError):
    """IR text does not parse: a syntax error, an unknown op, an undefined value, a type the op does
    not compute. The message starts ``file:line:column:``; the attributes carry them too."""

    def __init__(self, message: str, *, filename: str = "<text>", line: int = 1, column: int = 1):
        self.filename = filename
        self.line = line
        self.column = column
        self.message = message
        super().__init__(f"{filename}:{line}:{column}: {message}")


class PipelineError(OptcError):
    """A pipeline string is malformed, or names an unknown pass or option."""


class PassError(OptcError):
    """A pass failed. Names the pass, the passes that ran before it and the node."""

    def __init__(self, message: str, *, pass_name: str | None = None,
                 previous: list[str] | None = None, node: str | None = None,
                 source: str | None = None):
        self.pass_name = pass_name
        self.previous = list(previous or [])
        self.node = node
        self.source = source
        parts = []
        if pass_name:
            after = ", ".join(self.previous) if self.previous else "nothing"
            parts.append(f"while running '{pass_name}' after [{after}]")
        if node:
            parts.append(f"at node %{node}" + (f" ({source})" if source else ""))
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class VerificationError(OptcError):
    """The verifier found a structural or numeric inconsistency in a Program."""

    def __init__(self, message: str, *, node: str | None = None):
        self.node = node
        super().__init__(message if node is None else f"%{node}: {message}")


class NumericMismatchError(VerificationError):
    """Two programs that should compute the same function do not."""


class LoweringError(OptcError):
    """A backend cannot lower an op. Names the op, the node, the source line, the backend."""

    def __init__(self, message: str, *, backend: str, op: str | None = None,
                 node: str | None = None, source: str | None = None):
        self.backend = backend
        self.op = op
        self.node = node
        self.source = source
        where = []
        if op:
            where.append(f"op {op}")
        if node:
            where.append(f"node %{node}")
        if source:
            where.append(source)
        loc = f" ({', '.join(where)})" if where else ""
        super().__init__(f"[{backend}] {message}{loc}")


class BackendUnavailableError(OptcError):
    """The backend's package or device is not available on this machine."""


class ArtifactError(OptcError):
    """A saved artifact folder is missing files, corrupted, or of another version."""


class InputSpecError(OptcError):
    """Inputs given to a Program or CompiledModel do not match the captured signature."""


class WeightsError(OptcError):
    """Weights given for a model do not fit it (a missing tensor, a wrong shape, a file that cannot
    be read), or a model on the ``meta`` device was given none."""


class StaleWeightsError(OptcError):
    """A compiled model that runs on the model's own weight tensors by reference
    (``params="reference"``) was called after one of those tensors was modified in place: its
    kernels (or the copies a backend transformed once at load) no longer match the weights it was
    compiled and checked with."""
