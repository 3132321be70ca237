"""trace.py: JSON-lines codec for recorded inputs; round trips and every BadTrace path.

Determinism: explicit events and exact ``now`` values; the hypothesis tests
draw from fixed strategies and assert only "decodes, or raises BadTrace".
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio.core import events as ev
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.trace import INPUT_TYPES, SIDES, BadTrace, TraceEntry, decode_input_untrusted, encode_input

SID = SessionId(bytes(range(16)))
P1, P2 = PathId(1), PathId(2)
EP = ("198.51.100.1", 40001)

# One instance of every recordable input, with every optional field set to a non-default value.
SAMPLES: dict[str, Any] = {
    "HandshakeCompleted": ev.HandshakeCompleted(
        session_id=SID, binding=Binding(path=P1, endpoint=("192.0.2.1", 51820)), gateway_version=1, owner_epoch=9
    ),
    "TakenOver": ev.TakenOver(owner_epoch=11),
    "PathAdded": ev.PathAdded(path=P2, priority=20, endpoint=("192.0.2.2", 51820), link_up=False, metered=True),
    "PathCostChanged": ev.PathCostChanged(path=P2, metered=True),
    "PathRemoved": ev.PathRemoved(path=P2),
    "PathReaddressed": ev.PathReaddressed(path=P2),
    "LinkChanged": ev.LinkChanged(path=P1, up=False),
    "ProbeSent": ev.ProbeSent(path=P1, seq=41),
    "ProbeAcked": ev.ProbeAcked(path=P1, seq=41, gateway_version=3, gateway_bound_path=P2),
    "DeliveryObserved": ev.DeliveryObserved(path=P2),
    "DataSent": ev.DataSent(path=P1),
    "ReattachAcked": ev.ReattachAcked(path=P2, nonce=7, new_version=4, owner_epoch=(1 << 64) - 1),
    "TakenOver": ev.TakenOver(owner_epoch=12),
    "ReattachRejected": ev.ReattachRejected(path=P2, nonce=7, reason=R.STALE_VERSION, current_version=5),
    "PathChallenged": ev.PathChallenged(path=P2, for_path=P2, nonce=7, challenge=3),
    "PathResponseReceived": ev.PathResponseReceived(endpoint=EP, path=P2, nonce=7, challenge=(1 << 64) - 1),
    "PinRequested": ev.PinRequested(path=PathId(255)),
    "ReevaluateRequested": ev.ReevaluateRequested(),
    "TimerFired": ev.TimerFired(),
    "CloseRequested": ev.CloseRequested(),
    "PeerClosed": ev.PeerClosed(reason=R.SESSION_TTL_EXPIRED),
    "KeysExhausted": ev.KeysExhausted(),
    "OwnershipLost": ev.OwnershipLost(),
    "PacketAuthenticated": ev.PacketAuthenticated(endpoint=EP, path=P1),
    "FrameDropped": ev.FrameDropped(reason=R.BAD_MAC, endpoint=("203.0.113.66", 6666), frame="REATTACH"),
    "ReattachReceived": ev.ReattachReceived(
        session_id=SID,
        path=P2,
        endpoint=("198.51.100.2", 40002),
        nonce=9,
        client_ts_ms=12_345,
        expected_version=4,
        proof_valid=False,
        ownership=OwnershipRecord(session_id=SID, owner="gw-a", revision=7),
        metadata=b"\x00\xffhi",
    ),
}
# Optional (None-able) fields set to None, which must round trip too.
NONE_VARIANTS = [
    ev.PinRequested(path=None),
    ev.ProbeAcked(path=P1, seq=1, gateway_version=1, gateway_bound_path=None),
    attrs.evolve(SAMPLES["ReattachReceived"], ownership=None, metadata=b""),
]


def line(**body: object) -> str:
    return json.dumps(body)


def reattach_body(**changes: object) -> dict[str, object]:
    """The body of a well-formed ReattachReceived line (no ownership record), with ``changes``."""
    body: dict[str, object] = dict(
        input="ReattachReceived",
        session_id=SID.hex,
        path=1,
        endpoint=["h", 1],
        nonce=1,
        client_ts_ms=1,
        expected_version=1,
        proof_valid=True,
        ownership=None,
    )
    return body | changes


def bad(text: str, *, lineno: int = 0) -> str:
    with pytest.raises(BadTrace) as info:
        decode_input_untrusted(text, lineno=lineno)
    return str(info.value)


def test_samples_cover_every_input_type() -> None:
    assert set(SAMPLES) == set(INPUT_TYPES)
    for name, event in SAMPLES.items():
        assert type(event) is INPUT_TYPES[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("side", SIDES)
def test_round_trip_every_input_type(name: str, side: str) -> None:
    event = SAMPLES[name]
    text = encode_input(side, 12.375, event)
    assert decode_input_untrusted(text) == TraceEntry(side=side, now=12.375, event=event)


@pytest.mark.parametrize("event", NONE_VARIANTS, ids=lambda e: type(e).__name__)
def test_round_trip_with_none_fields(event: object) -> None:
    assert decode_input_untrusted(encode_input("client", 0.0, event)).event == event


def test_encoding_is_compact_sorted_json() -> None:
    text = encode_input("client", 1.5, ev.LinkChanged(path=P1, up=False))
    assert text == '{"input":"LinkChanged","path":1,"side":"client","t":1.5,"up":false}'


def test_encoding_of_nested_values() -> None:
    text = encode_input("gateway", 2.0, SAMPLES["ReattachReceived"])
    assert json.loads(text) == {
        "t": 2.0,
        "side": "gateway",
        "input": "ReattachReceived",
        "session_id": SID.hex,
        "path": 2,
        "endpoint": ["198.51.100.2", 40002],
        "nonce": 9,
        "client_ts_ms": 12_345,
        "expected_version": 4,
        "proof_valid": False,
        "ownership": {"session_id": SID.hex, "owner": "gw-a", "revision": 7},
        "metadata": "00ff6869",
        "store_failure": None,
    }
    handshake = json.loads(encode_input("client", 0.0, SAMPLES["HandshakeCompleted"]))
    assert handshake["binding"] == {"path": 1, "endpoint": ["192.0.2.1", 51820]}
    assert json.loads(encode_input("client", 0.0, SAMPLES["PeerClosed"]))["reason"] == "SESSION_TTL_EXPIRED"


def test_encoding_is_deterministic() -> None:
    for event in SAMPLES.values():
        assert encode_input("client", 3.25, event) == encode_input("client", 3.25, event)


def test_integer_t_decodes_as_float() -> None:
    entry = decode_input_untrusted(line(t=2, side="client", input="TimerFired"))
    assert entry == TraceEntry(side="client", now=2.0, event=ev.TimerFired())
    assert type(entry.now) is float


def test_optional_field_may_be_omitted() -> None:
    entry = decode_input_untrusted(line(t=0, side="client", input="PathAdded", path=1, priority=1, endpoint=["h", 1]))
    assert entry.event == ev.PathAdded(path=P1, priority=1, endpoint=("h", 1), link_up=True)


def test_encode_rejects_what_it_cannot_record() -> None:
    with pytest.raises(ValueError, match=r"^cannot record server/LinkChanged$"):
        encode_input("server", 0.0, SAMPLES["LinkChanged"])
    with pytest.raises(ValueError, match=r"^cannot record client/str$"):
        encode_input("client", 0.0, "TimerFired")


# -- every BadTrace path ----------------------------------------------------------------------------


def test_bad_trace_is_a_value_error() -> None:
    assert issubclass(BadTrace, ValueError)


@pytest.mark.parametrize(
    ("text", "msg"),
    [("nope", "Expecting value"), ("", "Expecting value"), ('{"t": 1', "Expecting ',' delimiter")],
)
def test_not_json(text: str, msg: str) -> None:
    assert bad(text, lineno=7) == f"line 7: not JSON ({msg})"


@pytest.mark.parametrize("text", ["[1]", '"TimerFired"', "5", "null", "true"])
def test_not_an_object(text: str) -> None:
    assert bad(text, lineno=3) == "line 3: not a JSON object"


@pytest.mark.parametrize("side", ["server", None, 1, ["client"], "Client"])
def test_bad_side(side: object) -> None:
    assert bad(line(t=0, side=side, input="TimerFired")) == f"line 0: side must be one of ('client', 'gateway'), got {side!r}"


def test_missing_side() -> None:
    assert bad(line(t=0, input="TimerFired")) == "line 0: side must be one of ('client', 'gateway'), got None"


@pytest.mark.parametrize("name", ["Bogus", None, 5, "timerfired", "TraceEntry", [], {}, ["TimerFired"]])
def test_unknown_input(name: object) -> None:
    assert bad(line(t=0, side="client", input=name)) == f"line 0: unknown input {name!r}"


def test_missing_input() -> None:
    assert bad(line(t=0, side="client")) == "line 0: unknown input None"


@pytest.mark.parametrize("t", ["1.0", None, True, False, [1], {"s": 1}])
def test_bad_t(t: object) -> None:
    assert bad(line(t=t, side="client", input="TimerFired"), lineno=2) == "line 2: t must be a finite number"


def test_missing_t() -> None:
    assert bad(line(side="client", input="TimerFired")) == "line 0: t must be a finite number"


def test_extra_fields_are_named_sorted() -> None:
    text = line(t=0, side="client", input="LinkChanged", path=1, up=True, zeta=1, colour="red")
    assert bad(text) == "line 0: LinkChanged has no field(s) colour, zeta"


def test_extra_field_on_a_field_less_input() -> None:
    assert bad(line(t=0, side="client", input="TimerFired", path=1)) == "line 0: TimerFired has no field(s) path"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            dict(input="LinkChanged", path=0, up=True),
            "line 0: bad LinkChanged: PathId must be an int in 1..255, got 0",
        ),
        (
            dict(input="LinkChanged", path=256, up=True),
            "line 0: bad LinkChanged: PathId must be an int in 1..255, got 256",
        ),
        (
            dict(input="PeerClosed", reason="NOT_A_REASON"),
            "line 0: bad PeerClosed: 'NOT_A_REASON' is not a valid ReasonCode",
        ),
        (
            dict(input="PathRemoved"),
            "line 0: bad PathRemoved: PathRemoved.__init__() missing 1 required keyword-only argument: 'path'",
        ),
        (
            dict(
                input="HandshakeCompleted",
                session_id="zz",
                binding={"path": 1, "endpoint": ["h", 1]},
                gateway_version=1,
            ),
            "line 0: bad HandshakeCompleted: SessionId is not hex: 'zz'",
        ),
        (
            dict(
                input="HandshakeCompleted",
                session_id="00" * 15,
                binding={"path": 1, "endpoint": ["h", 1]},
                gateway_version=1,
            ),
            "line 0: bad HandshakeCompleted: SessionId must be 16 bytes",
        ),
        (
            dict(input="HandshakeCompleted", session_id=SID.hex, binding={"path": 1}, gateway_version=1),
            "line 0: bad HandshakeCompleted: expected an object with keys ['endpoint', 'path'], got {'path': 1}",
        ),
    ],
)
def test_bad_field_value(body: dict[str, object], expected: str) -> None:
    assert bad(line(t=0, side="client", **body)) == expected


@pytest.mark.parametrize(
    "body",
    [
        dict(input="PathAdded", path=1, priority=1, endpoint="h:1"),
        dict(input="PathAdded", path=1, priority=1, endpoint=["h"]),
        dict(input="PathAdded", path=1, priority=1, endpoint=["h", "port"]),
        dict(input="PathAdded", path=1, priority=1, endpoint=None),
        dict(input="PathAdded", path=1, priority=1.5, endpoint=["h", 1]),
        dict(input="PathAdded", path="1", priority=1, endpoint=["h", 1]),
        dict(input="PinRequested", path=[1]),
        dict(input="ReattachAcked", path=1, nonce=None, new_version=1),
        dict(input="HandshakeCompleted", session_id=5, binding={"path": 1, "endpoint": ["h", 1]}, gateway_version=1),
        dict(input="HandshakeCompleted", session_id=SID.hex, binding=[1, ["h", 1]], gateway_version=1),
        dict(input="HandshakeCompleted", session_id=SID.hex, binding={"path": 1, "endpoint": []}, gateway_version=1),
        dict(input="PeerClosed", reason={"x": 1}),
        reattach_body(ownership={"session_id": SID.hex, "owner": "gw-a"}),
        reattach_body(ownership={"session_id": SID.hex, "owner": "gw-a", "revision": "seven"}),
        reattach_body(metadata="not hex"),
    ],
    ids=lambda b: f"{b['input']}-{sorted(k for k in b if k != 'input')}",
)
def test_bad_field_value_shapes(body: dict[str, object]) -> None:
    name = body["input"]
    assert bad(line(t=0, side="client", **body)).startswith(f"line 0: bad {name}: ")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (dict(input="ProbeSent", path=1, seq=True), "line 0: bad ProbeSent: expected an integer, got True"),
        (
            dict(input="ReattachAcked", path=1, nonce=False, new_version=1),
            "line 0: bad ReattachAcked: expected an integer, got False",
        ),
        (dict(input="ProbeSent", path=1, seq=1.0), "line 0: bad ProbeSent: expected an integer, got 1.0"),
        (dict(input="ProbeSent", path=True, seq=1), "line 0: bad ProbeSent: PathId must be an int in 1..255, got True"),
        (dict(input="LinkChanged", path=1, up=1), "line 0: bad LinkChanged: expected a boolean, got 1"),
        (dict(input="LinkChanged", path=1, up="true"), "line 0: bad LinkChanged: expected a boolean, got 'true'"),
    ],
)
def test_bool_and_int_are_not_interchangeable(body: dict[str, object], expected: str) -> None:
    assert bad(line(t=0, side="client", **body)) == expected


# -- decode raises nothing but BadTrace ---------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = sorted({"t", "side", "input"} | {f.name for cls in INPUT_TYPES.values() for f in attrs.fields(cls)})


def _decodes_or_bad_trace(text: str) -> None:
    try:
        entry = decode_input_untrusted(text, lineno=1)
    except BadTrace as exc:
        assert str(exc).startswith("line 1: ")
    else:
        assert isinstance(entry, TraceEntry)
        assert type(entry.event) in INPUT_TYPES.values()


@given(st.text())
def test_arbitrary_text_decodes_or_raises_bad_trace(text: str) -> None:
    _decodes_or_bad_trace(text)


@given(JSON_VALUES)
def test_arbitrary_json_decodes_or_raises_bad_trace(value: object) -> None:
    _decodes_or_bad_trace(json.dumps(value))


@st.composite
def json_ish_lines(draw: st.DrawFn) -> str:
    """A plausible trace line: an input name (real or any JSON value), with fields replaced, added or dropped."""
    name = draw(st.sampled_from(sorted(INPUT_TYPES)) | JSON_VALUES)
    cls = INPUT_TYPES.get(name) if isinstance(name, str) else None
    if cls is not None:
        body = json.loads(encode_input("client", 1.0, SAMPLES[name]))
    else:
        body = {"t": 1.0, "side": "client", "input": name}
    body["input"] = name
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
        if key == "input":
            continue
        body[key] = draw(JSON_VALUES)
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)
    return json.dumps(body)


@given(json_ish_lines())
def test_json_ish_lines_decode_or_raise_bad_trace(text: str) -> None:
    _decodes_or_bad_trace(text)


# -- known gaps: decode lets other exceptions out ------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"t":0,"side":"client","input":"PathAdded","path":1,"priority":1,"endpoint":["h",1e400]}',
    '{"t":0,"side":"client","input":"PacketAuthenticated","path":1,"endpoint":["h",Infinity]}',
    '{"t":0,"side":"gateway","input":"ReattachReceived","session_id":"' + SID.hex + '","path":1,'
    '"endpoint":["h",1],"nonce":1,"client_ts_ms":1,"expected_version":1,"proof_valid":true,'
    '"ownership":{"session_id":"' + SID.hex + '","owner":"gw-a","revision":1e400}}',
])
def test_infinite_number_in_an_int_slot_is_bad_trace(text: str) -> None:
    bad(text)


def test_deeply_nested_json_is_bad_trace() -> None:
    bad("[" * 100_000)


def test_huge_integer_literal_is_bad_trace() -> None:
    bad('{"t":0,"side":"client","input":"ProbeSent","path":1,"seq":' + "1" * 5000 + "}")


@pytest.mark.parametrize("t", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_t_is_bad_trace(t: str) -> None:
    bad('{"t":' + t + ',"side":"client","input":"TimerFired"}')


@pytest.mark.parametrize(
    "endpoint", [["h", True], ["h", 80.9], ["h", "80"], ["h", 80, "extra"], [1, 80]]
)
def test_endpoint_is_decoded_strictly(endpoint: list[object]) -> None:
    bad(line(t=0, side="client", input="PacketAuthenticated", path=1, endpoint=endpoint))


@pytest.mark.parametrize("frame", [5, None, ["REATTACH"], {"x": 1}], ids=repr)
def test_string_field_rejects_non_strings(frame: object) -> None:
    bad(line(t=0, side="gateway", input="FrameDropped", reason="BAD_MAC", endpoint=["h", 1], frame=frame))
