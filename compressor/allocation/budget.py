"""The compression budget: exact bytes, or an average number of bits per weight (design.md section 4).

``parse_budget("3.4GB")`` -> ``Budget(nbytes=3_400_000_000, bits=None)``;
``parse_budget("2.5bits")`` -> ``Budget(nbytes=None, bits=2.5)``, turned into bytes by
``Budget.resolve(n_weights)`` once the number of weights it applies to is known.

Byte quantities are computed in exact decimal arithmetic and rounded down, so
``"3.4GB"`` is exactly 3_400_000_000 bytes and ``"3.4GiB"`` is floor(3.4 * 2**30).
Units are case-insensitive: ``GB`` and ``gb`` both mean 10**9 bytes (never gigabits).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation, localcontext
from fractions import Fraction

__all__ = ["Budget", "parse_budget", "BYTE_UNITS", "BIT_UNITS", "ACCEPTED_UNITS"]

# Multipliers in bytes, keyed by the lower-cased unit.
BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
    "tb": 10**12,
    "tib": 2**40,
}
BIT_UNITS: frozenset[str] = frozenset({"bit", "bits"})
ACCEPTED_UNITS = "B (or no unit), KB, KiB, MB, MiB, GB, GiB, TB, TiB for bytes; bits (or bit) for average bits per weight"

_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A byte budget (``nbytes``) or an average-bits-per-weight budget (``bits``); exactly one is set."""

    nbytes: int | None = None
    bits: float | None = None

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.bits is None):
            raise ValueError(f"Budget needs exactly one of nbytes or bits, got nbytes={self.nbytes!r}, bits={self.bits!r}")
        if self.nbytes is not None:
            if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int):
                raise ValueError(f"Budget.nbytes must be an int, got {self.nbytes!r}")
            if self.nbytes <= 0:
                raise ValueError(f"Budget.nbytes must be positive, got {self.nbytes}")
        if self.bits is not None:
            if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and self.bits > 0):
                raise ValueError(f"Budget.bits must be a positive finite number, got {self.bits!r}")

    @property
    def is_bits(self) -> bool:
        return self.bits is not None

    def resolve(self, n_weights: int) -> int:
        """Bytes available: ``nbytes``, or ``floor(bits * n_weights / 8)`` computed exactly.

        ``bits`` is taken at its shortest decimal representation (``2.3`` means 23/10, not the
        nearest binary float), so ``2.3bits`` over 80 weights is exactly 23 bytes.
        """
        if self.nbytes is not None:
            return self.nbytes
        if isinstance(n_weights, bool) or int(n_weights) != n_weights or n_weights < 0:
            raise ValueError(f"n_weights must be a non-negative integer, got {n_weights!r}")
        exact_bits = Fraction(repr(float(self.bits)))
        return math.floor(exact_bits * int(n_weights) / 8)

    def __str__(self) -> str:
        return f"{self.nbytes}B" if self.nbytes is not None else f"{self.bits:g}bits"


def parse_budget(text: str) -> Budget:
    """Parse ``--budget``: ``"3.4GB"``, ``"3.4 GiB"``, ``"512MiB"``, ``"1000"``, ``"2.5bits"``, ``"2.5 bit"``.

    Raises ValueError naming the text and listing the accepted units on anything else
    (negative, zero, nan/inf, unknown unit, thousands separators, empty).
    """
    if not isinstance(text, str):
        raise ValueError(f"budget must be a string such as '3.4GB' or '2.5bits', got {text!r}; accepted units: {ACCEPTED_UNITS}")
    m = _NUMBER_UNIT.match(text)
    if m is None:
        raise ValueError(f"cannot parse budget {text!r}: expected a positive number followed by a unit; accepted units: {ACCEPTED_UNITS}")
    mantissa, exponent, unit = m.group(1), m.group(2), m.group(3).lower()
    try:
        value = Decimal(mantissa + (f"e{exponent}" if exponent else ""))
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"cannot parse budget {text!r}; accepted units: {ACCEPTED_UNITS}") from None
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive; accepted units: {ACCEPTED_UNITS}")
    if value.adjusted() > 24:
        raise ValueError(f"budget {text!r} is out of range; accepted units: {ACCEPTED_UNITS}")
    if unit in BIT_UNITS:
        bits = float(value)
        if not math.isfinite(bits):
            raise ValueError(f"budget {text!r} is out of range; accepted units: {ACCEPTED_UNITS}")
        return Budget(nbytes=None, bits=bits)
    if unit not in BYTE_UNITS:
        raise ValueError(f"unknown unit {m.group(3)!r} in budget {text!r}; accepted units: {ACCEPTED_UNITS}")
    with localcontext() as ctx:  # enough digits that the product is exact before flooring
        ctx.prec = 80
        nbytes = int((value * BYTE_UNITS[unit]).to_integral_value(rounding=ROUND_FLOOR))
    if nbytes <= 0:
        raise ValueError(f"budget {text!r} rounds down to {nbytes} bytes; it must be at least 1 byte; accepted units: {ACCEPTED_UNITS}")
    return Budget(nbytes=nbytes, bits=None)
