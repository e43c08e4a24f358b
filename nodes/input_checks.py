"""Checks of node inputs that ComfyUI's own validation lets through.

ComfyUI compares numbers with ``val < min`` and ``val > max``; both are false for NaN, so a NaN sent over the API
passes its min/max check (and infinity passes where no bound is set). The node classes call
:func:`require_finite` first thing, keeping ComfyUI's min/max checks as they are.
"""
from __future__ import annotations

import math

from ..layerdiff_model.errors import LayerDiffError


class NonFiniteInputError(LayerDiffError):
    """A numeric node input is NaN or infinite."""


def require_finite(node: str, **values: float) -> None:
    """Raise NonFiniteInputError naming ``node`` and the first input whose value is not a finite number."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise NonFiniteInputError(
                f"{node}: input '{name}' is {value!r}, not a finite number. Send a number within the input's range "
                "(NaN and infinity are refused).")
