"""core/bounds.py: the one range validator of Policy, LogLimits and HandshakeLimits, and its wording."""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core.bounds import int_range, number_range, out_of_range, range_of
from jvpn_trio.core.cookie import HandshakeLimits
from jvpn_trio.core.loglimit import LogLimits
from jvpn_trio.core.policy import Policy, PolicyError


class Refused(ValueError):
    pass


@attrs.frozen(kw_only=True)
class Record:
    count: int = attrs.field(default=5, validator=int_range(1, 10))
    guarded: int = attrs.field(default=5, validator=int_range(2, 9, why="a smaller one breaks it", error=Refused))
    rate: float = attrs.field(default=1.0, validator=number_range(0.5, 2.0))


@pytest.mark.parametrize(("field", "value"), [("count", 1), ("count", 10), ("rate", 0.5), ("rate", 2), ("rate", 2.0)])
def test_both_ends_are_inside(field: str, value: object) -> None:
    assert getattr(Record(**{field: value}), field) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("count", 0, "count: 0 is out of range 1..10"),
     ("count", 11, "count: 11 is out of range 1..10"),
     ("count", True, "count: expected an integer, got bool"),
     ("count", 5.0, "count: expected an integer, got float"),
     ("count", "5", "count: expected an integer, got str"),
     ("count", 1 << 200, "count: a 201-bit integer is out of range 1..10"),
     ("rate", 0.25, "rate: 0.25 is out of range 0.5..2.0"),
     ("rate", float("nan"), "rate: nan is out of range 0.5..2.0"),
     ("rate", False, "rate: expected a number, got bool"),
     ("rate", [1.0], "rate: expected a number, got list")],
)  # fmt: skip
def test_a_value_outside_is_one_line_naming_the_field_and_the_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Record(**{field: value})  # type: ignore[arg-type]
    assert type(info.value) is ValueError
    assert str(info.value) == message


def test_the_reason_and_the_error_class_are_the_callers() -> None:
    with pytest.raises(Refused) as info:
        Record(guarded=1)
    assert str(info.value) == "guarded: 1 is out of range 2..9: a smaller one breaks it"
    assert out_of_range(10, 2, 9) == "10 is out of range 2..9"


def test_the_range_can_be_read_back() -> None:
    fields = attrs.fields_dict(Record)
    assert range_of(fields["count"]) == (1, 10)
    assert range_of(fields["rate"]) == (0.5, 2.0)
    assert range_of(attrs.fields_dict(LogLimits)["kinds"]) is None


def test_the_three_records_use_it_with_their_own_error() -> None:
    with pytest.raises(PolicyError, match="max_switches_per_minute: 0 is out of range 1..600"):
        Policy(max_switches_per_minute=0)
    with pytest.raises(ValueError, match=r"burst: 0 is out of range 1\.\.10000"):
        LogLimits(burst=0)
    with pytest.raises(ValueError, match=r"queue_capacity: 0 is out of range 1\.\.1000000"):
        HandshakeLimits(queue_capacity=0)
    with pytest.raises(ValueError, match=r"cookie_rotation_s: expected a number, got str"):
        HandshakeLimits(cookie_rotation_s="1")  # type: ignore[arg-type]
