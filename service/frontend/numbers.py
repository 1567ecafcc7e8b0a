"""One strict reading of the numbers clients send: query, form and JSON fields, and headers.

    top_k = parse_int(raw, "top_k", 1, 20)          # InvalidRequest (422) naming the field otherwise
    rate = parse_float(raw, "keep_rate", 0.0, 1.0, low_open=True)

Accepted: a JSON/Python ``int`` (never ``bool``, although ``bool`` is an ``int`` subclass), a finite
``float`` for :func:`parse_float`, or a string of plain ASCII: optional surrounding spaces, an
optional sign, decimal digits (and for floats one decimal point and an exponent). Everything
Python's own ``int()``/``float()`` would also take is refused: Unicode digits (``'٣'``, ``'²'``),
underscores, ``'nan'``/``'inf'``, hex. Why so strict: ``str.isdigit()`` accepts ``'²'``, which
``int()`` then rejects (a 500 before this module), and ``float()`` of a 400-digit integer raises
``OverflowError``. A float that overflows to infinity or underflows to 0 or a subnormal value is
refused too, since the number used would not be the number written.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from .errors import InvalidRequest

_INT = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)  # 18 digits: any int64 range a field may have
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
_MAX_TEXT = 64  # longer strings are refused before any regex or conversion runs


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and len(value) <= _MAX_TEXT:
        return value.strip(" \t")
    return None


def parse_int(value: Any, name: str, lo: int, hi: int, *, status: int = 422) -> int:
    """``value`` as an integer in ``[lo, hi]``; InvalidRequest (``status``) naming ``name`` otherwise."""
    out: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif (text := _text(value)) is not None and _INT.fullmatch(text):
        out = int(text)
    if out is None or not lo <= out <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}, got {_shown(value)}", status=status)
    return out


def parse_float(value: Any, name: str, lo: float, hi: float, *, low_open: bool = False,
                status: int = 422) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``low_open``); InvalidRequest otherwise."""
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = _finite(value)
    elif (text := _text(value)) is not None and _FLOAT.fullmatch(text):
        out = _finite(text)
    ok = out is not None and (lo < out if low_open else lo <= out) and out <= hi
    if not ok or out is None:
        bound = f"{lo} < {name} <= {hi}" if low_open else f"{lo} <= {name} <= {hi}"
        raise InvalidRequest(f"{name} must be a number with {bound}, got {_shown(value)}", status=status)
    return out


def _finite(value: int | float | str) -> float | None:
    """float(value) unless that overflows, underflows to a subnormal, or is not finite."""
    try:
        out = float(value)
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(out) or (out != 0.0 and abs(out) < sys.float_info.min):
        return None
    if out == 0.0 and _nonzero_digits(value):  # 1e-400: underflowed to zero
        return None
    return out


def _nonzero_digits(value: int | float | str) -> bool:
    if not isinstance(value, str):
        return False
    mantissa = value.lower().split("e", 1)[0]
    return any(c in "123456789" for c in mantissa)
