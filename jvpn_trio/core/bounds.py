"""Range validators for the core's frozen records: one wording for every bounded field.

``Policy``, ``LogLimits`` and ``HandshakeLimits`` each declare their bounds on their fields,
and a config file reaches them unchanged, so the line an operator reads for a bad value is
the one written here: ``name: value is out of range lo..hi`` (bounds inclusive, an optional
``: why`` after it) or ``name: expected an integer, got str``.  ``config.py`` prefixes the file
and table; docs/policy.md quotes the ranges.
"""

from __future__ import annotations

from typing import Any

import attrs

#: Integers longer than this many bits are named by their size in messages: printing one with
#: thousands of digits is slow, and past Python's digit limit it raises instead of explaining.
SHOWN_INT_BITS = 128


def shown(value: object) -> str:
    """``value`` as a message quotes it (a huge integer by its size, see :data:`SHOWN_INT_BITS`)."""
    if isinstance(value, int) and value.bit_length() > SHOWN_INT_BITS:
        return f"a {value.bit_length()}-bit integer"
    return str(value)


def out_of_range(value: object, lo: float, hi: float, *, why: str = "") -> str:
    """The reason a value outside ``lo..hi`` is refused; ``why`` says what a value beyond would break."""
    because = f": {why}" if why else ""
    return f"{shown(value)} is out of range {lo}..{hi}{because}"


@attrs.frozen
class IntRange:
    """An integer (never a bool) in ``lo..hi`` inclusive, else ``error`` naming the field and the range.

    A validator object rather than a closure, so the range can be read back (tests hold the docs to it).
    """

    lo: int
    hi: int
    #: What a value beyond the bound would break, said after the range; empty: nothing said.
    why: str = ""
    error: type[ValueError] = ValueError

    def __call__(self, _inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(f"{attribute.name}: expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise self.error(f"{attribute.name}: {out_of_range(value, self.lo, self.hi, why=self.why)}")


@attrs.frozen
class NumberRange:
    """An int or float (never a bool) in ``lo..hi`` inclusive, else ``error``; NaN is out of every range."""

    lo: float
    hi: float
    error: type[ValueError] = ValueError

    def __call__(self, _inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(f"{attribute.name}: expected a number, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise self.error(f"{attribute.name}: {out_of_range(value, self.lo, self.hi)}")


def int_range(lo: int, hi: int, *, why: str = "", error: type[ValueError] = ValueError) -> IntRange:
    """The validator of an integer field bounded by ``lo..hi`` (inclusive)."""
    return IntRange(lo, hi, why, error)


def number_range(lo: float, hi: float, *, error: type[ValueError] = ValueError) -> NumberRange:
    """The validator of a number field (int or float) bounded by ``lo..hi`` (inclusive)."""
    return NumberRange(lo, hi, error)


def range_of(field: attrs.Attribute[Any]) -> tuple[float, float] | None:
    """The ``(lo, hi)`` an attrs field is validated against (None: not a bounds validator)."""
    validator = field.validator
    if isinstance(validator, (IntRange, NumberRange)):
        return (validator.lo, validator.hi)
    return None


__all__ = ["SHOWN_INT_BITS", "IntRange", "NumberRange", "int_range", "number_range", "out_of_range", "range_of", "shown"]
