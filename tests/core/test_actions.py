"""actions.EmitEvent: one deterministic JSON line per audit record, and its inverse (spec 12).

Determinism: explicit values only; the same event must always render to the same bytes.
"""

from __future__ import annotations

import json

import attrs
import pytest

from jvpn_trio.core.actions import (
    BindTransport,
    EmitEvent,
    EventKind,
    ReleaseTransport,
    Role,
    SendReattach,
    Terminate,
)
from jvpn_trio.core.ids import Binding, PathId
from jvpn_trio.core.states import ReasonCode as R

SESSION = bytes(range(16)).hex()
POLICY = "0123456789abcdef"


def event(**overrides: object) -> EmitEvent:
    fields: dict[str, object] = dict(
        kind=EventKind.STATE_CHANGE,
        t=1.25,
        role=Role.CLIENT,
        session=SESSION,
        version=2,
        reason=R.LINK_DOWN,
        policy=POLICY,
        details={"to_state": "RECOVERING", "from_state": "ATTACHED", "path": "p1"},
    )
    fields.update(overrides)
    return EmitEvent(**fields)  # type: ignore[arg-type]


def test_json_line_is_sorted_and_compact() -> None:
    assert event().to_json_line() == (
        '{"from_state":"ATTACHED","kind":"STATE_CHANGE","path":"p1","policy":"0123456789abcdef",'
        '"reason":"LINK_DOWN","role":"client","session":"000102030405060708090a0b0c0d0e0f","t":1.25,'
        '"to_state":"RECOVERING","version":2}'
    )


def test_json_line_scalars() -> None:
    e = event(details={"from_state": None, "ok": True, "n": 3, "x": 0.5})
    assert json.loads(e.to_json_line()) == {
        "kind": "STATE_CHANGE",
        "t": 1.25,
        "role": "client",
        "session": SESSION,
        "version": 2,
        "reason": "LINK_DOWN",
        "policy": POLICY,
        "from_state": None,
        "ok": True,
        "n": 3,
        "x": 0.5,
    }
    assert '"from_state":null' in e.to_json_line()
    assert '"ok":true' in e.to_json_line()


def test_json_line_does_not_depend_on_detail_order() -> None:
    a = event(details={"a": 1, "b": 2, "c": 3})
    b = event(details={"c": 3, "a": 1, "b": 2})
    assert a == b
    assert a.details == (("a", 1), ("b", 2), ("c", 3))
    assert a.to_json_line() == b.to_json_line()
    assert a.to_json_line() == a.to_json_line()


def test_detail_lookup() -> None:
    e = event()
    assert e.detail("path") == "p1"
    assert e.detail("to_state") == "RECOVERING"
    assert e.detail("missing") is None


def test_no_details() -> None:
    e = event(details={})
    assert e.details == ()
    assert e.to_dict() == {
        "kind": "STATE_CHANGE",
        "t": 1.25,
        "role": "client",
        "session": SESSION,
        "version": 2,
        "reason": "LINK_DOWN",
        "policy": POLICY,
    }
    assert EmitEvent(
        kind=EventKind.STATE_CHANGE, t=1.25, role=Role.CLIENT, session=SESSION, version=2, reason=R.LINK_DOWN, policy=POLICY
    ) == e


def test_frozen_and_hashable() -> None:
    e = event()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        e.version = 3  # type: ignore[misc]
    assert hash(e) == hash(event())


@pytest.mark.parametrize("kind", list(EventKind), ids=lambda k: k.value)
@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_round_trip(kind: EventKind, role: Role) -> None:
    e = event(kind=kind, role=role, details={"why": "x", "nonce": 7, "flag": False, "none": None, "f": 2.5})
    assert EmitEvent.from_dict(e.to_dict()) == e
    assert EmitEvent.from_dict(json.loads(e.to_json_line())) == e
    assert EmitEvent.from_dict(e.to_dict()).to_json_line() == e.to_json_line()


def test_from_dict_accepts_an_integer_t() -> None:
    data = event().to_dict()
    data["t"] = 3
    e = EmitEvent.from_dict(data)
    assert e.t == 3.0 and type(e.t) is float


def test_from_dict_missing_fields_are_named_sorted() -> None:
    data = event().to_dict()
    del data["reason"], data["policy"], data["t"]
    with pytest.raises(ValueError, match=r"^event line lacks policy, reason, t$"):
        EmitEvent.from_dict(data)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("kind", "BOGUS", "'BOGUS' is not a valid EventKind"),
        ("role", "server", "'server' is not a valid Role"),
        ("reason", "NOPE", "'NOPE' is not a valid ReasonCode"),
        ("t", "soon", "could not convert string to float: 'soon'"),
        ("version", "two", "expected an integer, got 'two'"),
        ("t", None, "bad event line: float() argument must be a string or a real number, not 'NoneType'"),
        ("version", None, "expected an integer, got None"),
    ],
)
def test_from_dict_bad_values_raise_value_error(key: str, value: object, message: str) -> None:
    data = event().to_dict()
    data[key] = value  # type: ignore[assignment]
    with pytest.raises(ValueError) as info:
        EmitEvent.from_dict(data)
    assert str(info.value) == message


@pytest.mark.parametrize("key", ["t", "kind", "role", "session", "version", "reason", "policy"])
def test_detail_named_like_a_fixed_field_is_refused(key: str) -> None:
    # Such a detail would be silently overwritten by the fixed field in to_dict().
    with pytest.raises(ValueError, match="would overwrite fixed fields"):
        event(details={key: "shadowed"})


@pytest.mark.parametrize("version", [2.9, True, "2"])
def test_from_dict_rejects_a_non_integer_version(version: object) -> None:
    data = event().to_dict()
    data["version"] = version  # type: ignore[assignment]
    with pytest.raises(ValueError):
        EmitEvent.from_dict(data)


def test_details_tuple_is_normalised_like_a_dict() -> None:
    assert event(details=(("b", 1), ("a", 2))) == event(details={"b": 1, "a": 2})


def test_other_actions_are_frozen_values() -> None:
    binding = Binding(path=PathId(1), endpoint=("192.0.2.1", 51820))
    assert BindTransport(binding) == BindTransport(binding)
    assert ReleaseTransport(binding) != BindTransport(binding)
    send = SendReattach(path=PathId(2), nonce=1, client_ts_ms=10, expected_version=3)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        send.nonce = 2  # type: ignore[misc]
    assert Terminate(reason=R.LOCAL_CLOSE).reason is R.LOCAL_CLOSE
