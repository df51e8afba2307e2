"""Find the user's source line in stack traces (skipping torch's and optc's own frames)."""

from __future__ import annotations

import os
import re
import traceback
from types import TracebackType

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_OPTC_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d
                   for d in ("ir", "passes", "backends", "optc"))
_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


def _is_library(path: str) -> bool:
    path = os.path.abspath(path)
    if path.startswith(_TORCH_DIR) or path.startswith(_OPTC_DIRS):
        return True
    return any(part in path for part in (os.sep + "site-packages" + os.sep + "torch" + os.sep,
                                         os.sep + "contextlib.py", "<frozen ", os.sep + "functools.py"))


def user_frame_from_stack_trace(stack_trace: str | None) -> str | None:
    """``file.py:LINE`` of the innermost frame in a node's ``stack_trace`` outside torch."""
    if not stack_trace:
        return None
    frames = [m for m in _FRAME_RE.finditer(stack_trace)]
    for m in reversed(frames):
        if not _is_library(m.group("file")):
            return f"{os.path.basename(m.group('file'))}:{m.group('line')}"
    if frames:
        m = frames[-1]
        return f"{os.path.basename(m.group('file'))}:{m.group('line')}"
    return None


def node_source(node) -> str | None:
    """The user's source line that produced an fx node, as ``file.py:LINE``."""
    src = node.meta.get("optc_source")
    if src:
        return src
    return user_frame_from_stack_trace(node.meta.get("stack_trace"))


def user_frame_from_traceback(tb: TracebackType | None) -> str | None:
    """``path/file.py:LINE  code`` of the innermost traceback frame that is the user's code."""
    best = None
    for frame in traceback.extract_tb(tb):
        if not _is_library(frame.filename):
            best = frame
    if best is None:
        return None
    code = f"  `{best.line.strip()}`" if best.line else ""
    return f"{best.filename}:{best.lineno}{code}"


def user_frame_from_exception(exc: BaseException) -> str | None:
    """Search an exception and its causes for a user source line."""
    seen = set()
    e: BaseException | None = exc
    found = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        found = user_frame_from_traceback(e.__traceback__) or found
        # torch.export's user-facing errors often mention the user's line in the message
        if found is None:
            m = None
            for m in _FRAME_RE.finditer(str(e)):
                pass
            if m is not None and not _is_library(m.group("file")):
                found = f"{m.group('file')}:{m.group('line')}"
        e = e.__cause__ or e.__context__
    return found
