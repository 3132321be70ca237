"""Outputs of the session machines: decisions as data, for drivers to carry out.

Observability records (spec 12: STATE_CHANGE, TRANSPORT_SWITCH,
SECURITY_EVENT, and PATH_HEALTH / REATTACH_REJECTED / SWITCH_DENIED) are
actions too: :class:`EmitEvent`.  Drivers hand them to a non-blocking sink,
so a failing log can never alter a decision (spec 12: "Logging failure MUST
NOT alter state").  Each one renders to exactly one JSON line, with sorted
keys and compact separators, so two runs with the same inputs produce
byte-identical logs (docs/events.md holds the schema).
"""

from __future__ import annotations

import enum
import json
from typing import Iterable, Union, cast

import attrs

from jvpn_trio.core.ids import Binding, PathId
from jvpn_trio.core.states import ReasonCode

Scalar = Union[str, int, float, bool, None]


class EventKind(enum.Enum):
    STATE_CHANGE = "STATE_CHANGE"
    TRANSPORT_SWITCH = "TRANSPORT_SWITCH"
    SECURITY_EVENT = "SECURITY_EVENT"
    PATH_HEALTH = "PATH_HEALTH"
    REATTACH_REJECTED = "REATTACH_REJECTED"
    SWITCH_DENIED = "SWITCH_DENIED"
    OPERATOR_ACTION = "OPERATOR_ACTION"  # a person steered the session (pin, unpin, re-evaluate, disconnect, reconnect)


class Role(enum.Enum):
    CLIENT = "client"
    GATEWAY = "gateway"


FIXED_FIELDS = frozenset({"t", "kind", "role", "session", "version", "reason", "policy"})


def _freeze_details(value: object) -> tuple[tuple[str, Scalar], ...]:
    """Details as sorted pairs, so equal JSON means equal events; fixed field names are refused."""
    pairs = cast(Iterable[tuple[str, Scalar]], value.items() if isinstance(value, dict) else value)
    frozen = tuple(sorted(pairs, key=lambda pair: pair[0]))
    clash = FIXED_FIELDS.intersection(k for k, _ in frozen)
    if clash:
        raise ValueError(f"event detail(s) {sorted(clash)} would overwrite fixed fields")
    return frozen


@attrs.frozen(kw_only=True)
class EmitEvent:
    """One audit record.  ``version`` is the session's state_version after the event."""

    kind: EventKind
    t: float
    role: Role
    session: str
    version: int
    reason: ReasonCode
    policy: str
    details: tuple[tuple[str, Scalar], ...] = attrs.field(default=(), converter=_freeze_details)

    def detail(self, key: str) -> Scalar:
        return dict(self.details).get(key)

    def to_dict(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = dict(self.details)
        out.update(
            t=self.t,
            kind=self.kind.value,
            role=self.role.value,
            session=self.session,
            version=self.version,
            reason=self.reason.value,
            policy=self.policy,
        )
        return out

    def to_json_line(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Scalar]) -> EmitEvent:
        """Inverse of :meth:`to_dict` (used by replay and log checkers); raises ValueError."""
        fixed = FIXED_FIELDS
        missing = fixed - set(data)
        if missing:
            raise ValueError(f"event line lacks {', '.join(sorted(missing))}")
        try:
            return cls(
                kind=EventKind(data["kind"]),
                t=float(data["t"]),  # type: ignore[arg-type]
                role=Role(data["role"]),
                session=str(data["session"]),
                version=_strict_int(data["version"]),
                reason=ReasonCode(data["reason"]),
                policy=str(data["policy"]),
                details={k: v for k, v in data.items() if k not in fixed},
            )
        except (TypeError, KeyError) as exc:
            raise ValueError(f"bad event line: {exc}") from exc


def _strict_int(value: Scalar) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


@attrs.frozen
class BindTransport:
    """Make ``binding`` the active one.  Always preceded, in the same list, by the old one's release."""

    binding: Binding


@attrs.frozen
class ReleaseTransport:
    binding: Binding


@attrs.frozen(kw_only=True)
class SendReattach:
    """Client: send a REATTACH on ``path`` (sealed with the session keys as proof of possession)."""

    path: PathId
    nonce: int
    client_ts_ms: int
    expected_version: int


@attrs.frozen(kw_only=True)
class SendReattachAck:
    """Gateway: the REATTACH is accepted; ``owner_epoch`` is the ownership revision it holds (fencing)."""

    endpoint: tuple[str, int]
    nonce: int
    new_version: int
    path: PathId
    owner_epoch: int


@attrs.frozen(kw_only=True)
class SendReattachReject:
    endpoint: tuple[str, int]
    nonce: int
    reason: ReasonCode
    current_version: int


@attrs.frozen(kw_only=True)
class SendPathChallenge:
    """Gateway: challenge the unvalidated ``endpoint`` a REATTACH came from; sent there and nowhere else."""

    endpoint: tuple[str, int]
    path: PathId
    nonce: int
    challenge: int


@attrs.frozen(kw_only=True)
class SendPathResponse:
    """Client: echo a challenge on ``path``, the path the pending REATTACH left by."""

    path: PathId
    nonce: int
    challenge: int


@attrs.frozen(kw_only=True)
class SendClose:
    """Tell the peer, authenticated, that the session is over; sent to ``binding``.

    The binding is the one active when the close was decided: the same call
    releases it, so a driver reading the session's record afterwards would
    find none and stay silent.
    """

    reason: ReasonCode
    binding: Binding | None = None


@attrs.frozen(kw_only=True)
class Terminate:
    """The session is over: drivers tear down its binding, keys and routes."""

    reason: ReasonCode


Action = Union[
    EmitEvent,
    BindTransport,
    ReleaseTransport,
    SendReattach,
    SendReattachAck,
    SendReattachReject,
    SendPathChallenge,
    SendPathResponse,
    SendClose,
    Terminate,
]
