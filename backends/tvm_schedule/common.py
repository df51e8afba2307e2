"""Constants and the logger the TVM schedule modules share."""

from __future__ import annotations

import logging


log = logging.getLogger("optc.backends.tvm")


#: Accumulator tile budget: at most LLVM's stack-alloca limit, so the tile is promoted to registers.
MAX_ACC_BYTES = 1024
LAYOUTS = ("NHWC", "NCHW")
# What a refused schedule primitive raises (ScheduleError and TVM's other errors are RuntimeErrors).
_SCHEDULE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
