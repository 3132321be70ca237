"""Fuzzing the trace decoder: garbage only ever raises BadTrace (issue 15, "Inputs that never crash").

Properties, the CI twin of fuzz/fuzz_trace.py:

* ``decode_line_untrusted`` (a whole trace line: input, session start or outputs) and
  ``decode_input_untrusted`` either return or raise BadTrace naming the line, on trace-shaped
  lines built field by field from each input's type hints (right values, wrong ones, missing and
  extra keys), on byte mutations of a recorded trace, and on arbitrary text;
* ``decode_line_untrusted`` decodes an input line exactly as ``decode_input_untrusted`` does;
* a decoded input survives its encoder: ``decode(encode(entry)) == entry``.

tests/core/test_trace.py fuzzes ``decode_input_untrusted`` on JSON values; this file adds the
whole-line decoder and the recorded-trace mutations.  Integers stay below 2**70 here; one
past float's range is its own test at the end (it once escaped as OverflowError).

Determinism: hypothesis draws the inputs (its database replays failures); the recorded trace
is a file in tests/data; nothing reads a clock or the OS's randomness.
"""

from __future__ import annotations

import json
import pathlib
import types
import typing
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.trace import (
    INPUT_TYPES,
    SIDES,
    BadTrace,
    Outputs,
    SessionStart,
    TraceEntry,
    decode_input_untrusted,
    decode_line_untrusted,
    encode_input,
)

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
LINENO = 3
RECORDED = pathlib.Path(__file__).resolve().parent.parent / "data" / "traces" / "pair-storm.trace.jsonl"
RECORDED_LINES = RECORDED.read_text(encoding="utf-8").splitlines()
SID_HEX = SessionId(bytes(range(16))).hex

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
session_hex = st.sampled_from([SID_HEX, "00" * 16]) | st.text("0123456789abcdefABCDEF", min_size=30, max_size=34)
endpoints = st.lists(st.text(max_size=6) | st.integers(-1, 70_000), min_size=2, max_size=2) | json_values
path_values = st.integers(-1, 256) | json_values


valid_endpoints = st.tuples(st.text(max_size=6), st.integers(0, 65_535)).map(list)


def valid_value(hint: Any) -> st.SearchStrategy[Any]:
    """The JSON of a valid value of type ``hint``, as the encoder writes it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.none() | valid_value(next(a for a in args if a is not type(None)))
    if hint is PathId:
        return st.integers(1, 255)
    if hint is SessionId:
        return st.binary(min_size=16, max_size=16).map(bytes.hex)
    if hint is ReasonCode:
        return st.sampled_from([r.value for r in ReasonCode])
    if hint is Binding:
        return st.fixed_dictionaries({"path": st.integers(1, 255), "endpoint": valid_endpoints})
    if hint is OwnershipRecord:
        return st.fixed_dictionaries(
            {"session_id": valid_value(SessionId), "owner": st.text(max_size=6), "revision": st.integers(0, 1 << 32)}
        )
    if hint is bytes:
        return st.binary(max_size=8).map(bytes.hex)
    if origin is tuple:
        return valid_endpoints
    if hint is str:
        return st.text(max_size=8)
    if hint is bool:
        return st.booleans()
    return st.integers(0, 1 << 32)


def field_value(hint: Any) -> st.SearchStrategy[Any]:
    """The JSON for a field of type ``hint``: mostly valid, sometimes a near miss, sometimes any JSON value."""
    origin = typing.get_origin(hint)
    if hint is PathId:
        near: st.SearchStrategy[Any] = st.sampled_from([0, 256, -1, True, 1.0, "1"])
    elif hint is SessionId:
        near = session_hex
    elif hint is Binding:
        near = st.fixed_dictionaries({"path": path_values, "endpoint": endpoints})
    elif hint is bytes:
        near = st.text("0123456789abcdefxyz ", max_size=9)
    elif origin is tuple:
        near = endpoints
    else:
        near = st.integers(-(1 << 65), 1 << 65) | st.booleans() | st.floats(allow_nan=False)
    return st.one_of(valid_value(hint), valid_value(hint), near, json_values)


@st.composite
def input_lines(draw: st.DrawFn) -> str:
    """An input line for any recordable input: valid as recorded, or with fields spoiled, dropped or added."""
    name = draw(st.sampled_from(sorted(INPUT_TYPES)))
    cls = INPUT_TYPES[name]
    hints = typing.get_type_hints(cls)
    if draw(st.booleans()):  # as the encoder writes it
        body: dict[str, Any] = {"t": draw(st.floats(-1e9, 1e9)), "side": draw(st.sampled_from(SIDES)), "input": name}
        if draw(st.booleans()):
            body["session"] = draw(valid_value(SessionId))
        for field in attrs.fields(cls):
            body[field.name] = draw(valid_value(hints[field.name]))
        return json.dumps(body)
    body = {"t": draw(st.floats(-1e9, 1e9) | json_scalars), "side": draw(st.sampled_from(SIDES) | json_scalars), "input": name}
    if draw(st.booleans()):
        body["session"] = draw(session_hex | json_scalars)
    for field in attrs.fields(cls):
        body[field.name] = draw(field_value(hints[field.name]))
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)
    if draw(st.booleans()):
        body[draw(st.text(max_size=6))] = draw(json_values)
    return json.dumps(body)


@st.composite
def start_and_output_lines(draw: st.DrawFn) -> str:
    """A session start or an outputs line, field by field."""
    body: dict[str, Any] = {"t": draw(st.floats(-1e9, 1e9) | json_scalars), "side": draw(st.sampled_from(SIDES))}
    if draw(st.booleans()):
        body["start"] = draw(session_hex | json_scalars)
        body["policy"] = draw(st.dictionaries(st.text(max_size=6), json_scalars, max_size=3) | json_scalars)
        optional = {
            "node_id": st.text(max_size=6) | json_scalars,
            "held_revision": st.integers(0, 1 << 64) | json_scalars,
            "handshake_binding": field_value(Binding),
            "previous_session": session_hex | json_scalars,
            "switch_times": st.lists(st.floats(allow_nan=False, allow_infinity=False) | json_scalars, max_size=3),
            "reconnect_by": st.text(max_size=6) | json_scalars,
        }
        for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
            body[key] = draw(optional[key])
    else:
        body["session"] = draw(session_hex | json_scalars)
        action = st.fixed_dictionaries({"action": st.text(max_size=6) | json_scalars})
        body["out"] = draw(st.lists(action | json_values, max_size=3) | json_scalars)
    if draw(st.booleans()):
        body[draw(st.text(max_size=6))] = draw(json_values)
    return json.dumps(body)


@st.composite
def mutated_recorded_lines(draw: st.DrawFn) -> str:
    """A line of a recorded trace with a few bytes flipped, dropped or inserted (read as replay reads it)."""
    raw = bytearray(draw(st.sampled_from(RECORDED_LINES)).encode())
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(raw) - 1))
        kind = draw(st.sampled_from(["set", "delete", "insert"]))
        if kind == "set":
            raw[index] = draw(st.integers(0, 255))
        elif kind == "delete":
            del raw[index]
        else:
            raw.insert(index, draw(st.sampled_from(b'"{}[],:0123456789-.e')))
    return bytes(raw).decode("utf-8", errors="replace")


trace_lines = st.one_of(input_lines(), start_and_output_lines(), mutated_recorded_lines(), st.text(max_size=60))


def decoded_or_none(decode: Any, line: str) -> Any:
    try:
        return decode(line, lineno=LINENO)
    except BadTrace as exc:
        assert str(exc).startswith(f"line {LINENO}: ")
        return None


@FUZZ
@given(trace_lines)
def test_trace_lines_decode_or_raise_bad_trace(line: str) -> None:
    item = decoded_or_none(decode_line_untrusted, line)
    if isinstance(item, TraceEntry):
        assert item.side in SIDES and type(item.event) in INPUT_TYPES.values()
    elif isinstance(item, (SessionStart, Outputs)):
        assert item.side in SIDES and len(item.session) == 32
    else:
        assert item is None


@FUZZ
@given(input_lines())
def test_input_lines_decode_alike_and_survive_their_encoder(line: str) -> None:
    entry = decoded_or_none(decode_input_untrusted, line)
    assert decoded_or_none(decode_line_untrusted, line) == entry
    if entry is not None:
        again = decode_input_untrusted(encode_input(entry.side, entry.now, entry.event, session=entry.session))
        assert again == entry


@pytest.mark.parametrize("name", ["ReattachReceived", "HandshakeCompleted", "PathResponseReceived"])
def test_the_generator_reaches_past_the_checks(name: str) -> None:
    """Else the round trip above is checked on nothing: the richest inputs decode from generated lines."""

    def decodes_as(line: str) -> bool:
        entry = decoded_or_none(decode_input_untrusted, line)
        return entry is not None and type(entry.event).__name__ == name

    find(input_lines(), decodes_as, settings=settings(max_examples=1_000, database=None, derandomize=True))


def test_every_recorded_line_decodes() -> None:
    for number, line in enumerate(RECORDED_LINES, 1):
        assert decode_line_untrusted(line, lineno=number) is not None


# -- an integer past float's range where a number goes (found by fuzz/fuzz_trace.py) ---------------------

HUGE = "1" + "0" * 400


@pytest.mark.parametrize(
    "line",
    [
        '{"t":' + HUGE + ',"side":"client","input":"TimerFired"}',
        '{"t":' + HUGE + ',"side":"client","session":"' + SID_HEX + '","out":[]}',
        '{"t":0,"side":"client","start":"' + SID_HEX + '","policy":{},"switch_times":[' + HUGE + "]}",
    ],
    ids=["input-t", "outputs-t", "start-switch-times"],
)
def test_huge_integer_where_a_number_goes_is_bad_trace(line: str) -> None:
    with pytest.raises(BadTrace):
        decode_line_untrusted(line)
