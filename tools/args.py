"""Argument types shared by the ``optc`` commands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``, else a one-line usage error."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    parse.__name__ = "positive" if low == 1 else ("non_negative" if low == 0 else f"int_at_least_{low}")
    return parse


non_negative = int_at_least(0)
positive = int_at_least(1)

__all__ = ["int_at_least", "non_negative", "positive"]
