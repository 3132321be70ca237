"""JSON-lines codec for recorded core inputs, so any run can be replayed.

A trace line is ``{"t": now, "side": "client"|"gateway", "input": Name, ...fields}``.
Because the machines are pure functions of ``(state, input, now)``, feeding
the decoded lines back in order reproduces every action and event byte for
byte (``jvpn-trio replay``); under another policy it shows what would have
happened instead.  Decoding is strict: a malformed line raises
:class:`BadTrace` naming the line, never another exception.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, TypeGuard

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord, Takeover
from jvpn_trio.core.states import ReasonCode

INPUT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ev.HandshakeCompleted,
        ev.TakenOver,
        ev.PathAdded,
        ev.PathCostChanged,
        ev.PathRemoved,
        ev.PathReaddressed,
        ev.LinkChanged,
        ev.ProbeSent,
        ev.ProbeAcked,
        ev.DeliveryObserved,
        ev.DataSent,
        ev.ReattachAcked,
        ev.ReattachRejected,
        ev.PathChallenged,
        ev.PinRequested,
        ev.ReevaluateRequested,
        ev.TimerFired,
        ev.CloseRequested,
        ev.PeerClosed,
        ev.KeysExhausted,
        ev.OwnershipLost,
        ev.PacketAuthenticated,
        ev.FrameDropped,
        ev.ReattachReceived,
        ev.PathResponseReceived,
    )
}
SIDES = ("client", "gateway")


class BadTrace(ValueError):
    """A trace line that cannot be decoded; the message says which and why."""


def _encode_value(value: Any) -> Any:
    if isinstance(value, PathId):
        return value.value
    if isinstance(value, SessionId):
        return value.hex
    if isinstance(value, ReasonCode):
        return value.value
    if isinstance(value, Binding):
        return {"path": value.path.value, "endpoint": list(value.endpoint)}
    if isinstance(value, OwnershipRecord):
        return {"session_id": value.session_id.hex, "owner": value.owner, "revision": value.revision}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return list(value)
    return value


def _decode_value(hint: Any, raw: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode_value(inner[0], raw)
    if hint is PathId:
        return PathId(raw)
    if hint is SessionId:
        return SessionId.from_hex(raw)
    if hint is ReasonCode:
        return ReasonCode(raw)
    if hint is Binding:
        _expect_keys(raw, {"path", "endpoint"})
        return Binding(path=PathId(_int(raw["path"])), endpoint=_endpoint(raw["endpoint"]))
    if hint is OwnershipRecord:
        _expect_keys(raw, {"session_id", "owner", "revision"})
        return OwnershipRecord(
            session_id=SessionId.from_hex(_str(raw["session_id"])), owner=_str(raw["owner"]), revision=_int(raw["revision"])
        )
    if hint is bytes:
        return bytes.fromhex(_str(raw))
    if origin is tuple:
        return _endpoint(raw)
    if hint is str:
        return _str(raw)
    if hint is bool:
        if not isinstance(raw, bool):
            raise TypeError(f"expected a boolean, got {raw!r}")
        return raw
    if hint is int:
        return _int(raw)
    raise TypeError(f"no decoder for {hint!r}")  # pragma: no cover - every input field type is listed above


def _int(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise TypeError(f"expected an integer, got {raw!r}")
    return raw


def _str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError(f"expected a string, got {raw!r}")
    return raw


def _endpoint(raw: Any) -> tuple[str, int]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise TypeError(f"an endpoint is [host, port], got {raw!r}")
    port = _int(raw[1])
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return (_str(raw[0]), port)


def _expect_keys(raw: Any, keys: set[str]) -> None:
    if not isinstance(raw, dict) or set(raw) != keys:
        raise TypeError(f"expected an object with keys {sorted(keys)}, got {raw!r}")


def encode_input(side: str, now: float, event: Any, *, session: str | None = None) -> str:
    """One trace line for ``event`` fed to ``side`` (the machine of ``session``) at ``now``."""
    name = type(event).__name__
    if name not in INPUT_TYPES or side not in SIDES:
        raise ValueError(f"cannot record {side}/{name}")
    body: dict[str, Any] = {"t": now, "side": side, "input": name}
    if session is not None:
        body["session"] = session
    for field in attrs.fields(type(event)):
        body[field.name] = _encode_value(getattr(event, field.name))
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


@attrs.frozen
class TraceEntry:
    side: str
    now: float
    event: Any
    session: str | None = None


def _finite_number(value: object) -> TypeGuard[int | float]:
    """A JSON number a time can be: int or float, not bool, finite as a float (a 400-digit int is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def decode_input_untrusted(line: str, *, lineno: int = 0) -> TraceEntry:
    """Parse one trace line; raises only :class:`BadTrace`."""
    try:
        body = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadTrace(f"line {lineno}: not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, huge integer literals, deep nesting
        raise BadTrace(f"line {lineno}: not acceptable JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise BadTrace(f"line {lineno}: not a JSON object")
    side, name, now = body.pop("side", None), body.pop("input", None), body.pop("t", None)
    session = body.pop("session", None)
    if session is not None and not _is_session_hex(session):
        raise BadTrace(f"line {lineno}: session must be 32 hex digits")
    if side not in SIDES:
        raise BadTrace(f"line {lineno}: side must be one of {SIDES}, got {side!r}")
    cls = INPUT_TYPES.get(str(name))
    if cls is None:
        raise BadTrace(f"line {lineno}: unknown input {name!r}")
    if not _finite_number(now):
        raise BadTrace(f"line {lineno}: t must be a finite number")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in attrs.fields(cls)}
    extra = set(body) - fields
    if extra:
        raise BadTrace(f"line {lineno}: {name} has no field(s) {', '.join(sorted(extra))}")
    try:
        kwargs = {key: _decode_value(hints[key], value) for key, value in body.items()}
        return TraceEntry(side=side, now=float(now), event=cls(**kwargs), session=session)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise BadTrace(f"line {lineno}: bad {name}: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a trace may hold")


def _is_session_hex(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 32:
        return False
    try:
        SessionId.from_hex(value)
    except ValueError:
        return False
    return True


# -----------------------------------------------------------------------------
# Whole recordings: session starts, inputs, and the actions each input produced
# -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SessionStart:
    """A machine was created: everything needed to create it again, identically."""

    side: str
    now: float
    session: str
    policy: dict[str, Any]
    node_id: str | None = None
    held_revision: int | None = None
    handshake_binding: Binding | None = None
    #: A client session in an agent's chain: the session before it, and the switches it inherited.
    previous_session: str | None = None
    switch_times: tuple[float, ...] = ()
    reconnect_by: str = ""
    #: A gateway session that began by taking a session over from another gateway.
    taken_over: Takeover | None = None


@attrs.frozen(kw_only=True)
class Outputs:
    """The actions one core call returned, as JSON-able dicts, in order."""

    side: str
    now: float
    session: str
    actions: tuple[dict[str, Any], ...]


def encode_action(action: Any) -> dict[str, Any]:
    """An action as a JSON-able dict: events as their log line, others field by field."""
    from jvpn_trio.core.actions import EmitEvent  # local: actions imports nothing from here

    if isinstance(action, EmitEvent):
        return {"action": "EmitEvent", **action.to_dict()}
    body: dict[str, Any] = {"action": type(action).__name__}
    for field in attrs.fields(type(action)):
        body[field.name] = _encode_value(getattr(action, field.name))
    return body


def encode_session_start(start: SessionStart) -> str:
    body: dict[str, Any] = {
        "t": start.now,
        "side": start.side,
        "start": start.session,
        "policy": start.policy,
    }
    if start.node_id is not None:
        body["node_id"] = start.node_id
        body["held_revision"] = start.held_revision
    if start.handshake_binding is not None:
        body["handshake_binding"] = _encode_value(start.handshake_binding)
    if start.previous_session is not None:
        body["previous_session"] = start.previous_session
    if start.switch_times:
        body["switch_times"] = list(start.switch_times)
    if start.reconnect_by:
        body["reconnect_by"] = start.reconnect_by
    if start.taken_over is not None:
        taken = start.taken_over
        body["taken_over"] = {"version": taken.version, "from": taken.previous_owner}
        if taken.endpoint is not None:
            body["taken_over"]["endpoint"] = _encode_value(taken.endpoint)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def encode_outputs(side: str, now: float, session: str, actions: list[Any]) -> str:
    body = {"t": now, "side": side, "session": session, "out": [encode_action(a) for a in actions]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


TraceLine = TraceEntry | SessionStart | Outputs


def decode_line_untrusted(line: str, *, lineno: int = 0) -> TraceLine:
    """Any trace line: a session start, an input, or the outputs of the input before it."""
    try:
        body = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadTrace(f"line {lineno}: not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise BadTrace(f"line {lineno}: not acceptable JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise BadTrace(f"line {lineno}: not a JSON object")
    if "input" in body:
        return decode_input_untrusted(line, lineno=lineno)
    side, now = body.get("side"), body.get("t")
    if side not in SIDES:
        raise BadTrace(f"line {lineno}: side must be one of {SIDES}, got {side!r}")
    if not _finite_number(now):
        raise BadTrace(f"line {lineno}: t must be a finite number")
    if "start" in body:
        return _decode_start(body, side, float(now), lineno)
    if "out" in body:
        session, out = body.get("session"), body.get("out")
        if not _is_session_hex(session):
            raise BadTrace(f"line {lineno}: session must be 32 hex digits")
        if not isinstance(out, list) or not all(isinstance(a, dict) and isinstance(a.get("action"), str) for a in out):
            raise BadTrace(f"line {lineno}: out must be a list of actions")
        extra = set(body) - {"t", "side", "session", "out"}
        if extra:
            raise BadTrace(f"line {lineno}: unexpected key(s) {', '.join(sorted(extra))}")
        return Outputs(side=side, now=float(now), session=str(session), actions=tuple(out))
    raise BadTrace(f"line {lineno}: neither an input, a session start nor outputs")


def _decode_start(body: dict[str, Any], side: str, now: float, lineno: int) -> SessionStart:
    known = {"t", "side", "start", "policy", "node_id", "held_revision", "handshake_binding", "previous_session"}
    extra = set(body) - known - {"switch_times", "reconnect_by", "taken_over"}
    if extra:
        raise BadTrace(f"line {lineno}: unexpected key(s) {', '.join(sorted(extra))}")
    session, policy = body["start"], body.get("policy")
    if not _is_session_hex(session):
        raise BadTrace(f"line {lineno}: start must be a SessionID (32 hex digits)")
    if not isinstance(policy, dict):
        raise BadTrace(f"line {lineno}: policy must be an object")
    previous = body.get("previous_session")
    if previous is not None and not _is_session_hex(previous):
        raise BadTrace(f"line {lineno}: previous_session must be a SessionID (32 hex digits)")
    switch_times = body.get("switch_times", [])
    if not isinstance(switch_times, list) or not all(_finite_number(t) for t in switch_times):
        raise BadTrace(f"line {lineno}: switch_times must be a list of finite numbers")
    taken = body.get("taken_over")
    if taken is not None and not (isinstance(taken, dict) and {"version", "from"} <= set(taken) <= {"version", "from", "endpoint"}):
        raise BadTrace(f"line {lineno}: taken_over must be an object with version, from and maybe endpoint")
    try:
        binding = body.get("handshake_binding")
        takeover = None if taken is None else Takeover(
            version=_int(taken["version"]),
            previous_owner=_str(taken["from"]),
            endpoint=_endpoint(taken["endpoint"]) if "endpoint" in taken else None,
        )
        return SessionStart(
            side=side,
            now=now,
            session=session,
            policy=policy,
            node_id=_str(body["node_id"]) if "node_id" in body else None,
            held_revision=_int(body["held_revision"]) if "held_revision" in body else None,
            handshake_binding=_decode_value(Binding, binding) if binding is not None else None,
            previous_session=previous,
            switch_times=tuple(float(t) for t in switch_times),
            reconnect_by=_str(body.get("reconnect_by", "")),
            taken_over=takeover,
        )
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise BadTrace(f"line {lineno}: bad session start: {exc}") from None
