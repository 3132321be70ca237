"""Inputs to the session machines: what drivers observed, as frozen data.

A driver turns bytes, netlink messages, timers and key presses into one of
these and calls ``machine.handle(event, now=...)``.  Nothing here carries a
clock reading: time is always the separate ``now`` argument, so a recorded
``(now, event)`` sequence replays exactly (``trace.py``).
"""

from __future__ import annotations

import attrs

from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.states import ReasonCode

# -- client side -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HandshakeCompleted:
    """The gateway answered our handshake on ``binding``: the session is born bound.

    ``owner_epoch`` is the fencing epoch the response carried (docs/cluster.md); 0, the
    lowest, when unknown (a trace recorded before protocol version 4).
    """

    session_id: SessionId
    binding: Binding
    gateway_version: int
    owner_epoch: int = 0


@attrs.frozen(kw_only=True)
class PathAdded:
    """A candidate path appeared.  Lower ``priority`` is preferred (route-metric order).

    ``metered``: its bytes cost money (LTE by default): chosen only when no
    unmetered path is HEALTHY, and probed at ``metered_probe_interval_ms``
    while it stands by.
    """

    path: PathId
    priority: int
    endpoint: tuple[str, int]
    link_up: bool = True
    metered: bool = False


@attrs.frozen(kw_only=True)
class PathCostChanged:
    """The path's cost class changed while it is a path (NetworkManager's ``Metered`` property)."""

    path: PathId
    metered: bool


@attrs.frozen(kw_only=True)
class PathRemoved:
    """The path's interface went away: if it carried the binding, that is a link death (LINK_DOWN)."""

    path: PathId


@attrs.frozen(kw_only=True)
class PathReaddressed:
    """The path's interface got a new source address (DHCP renew, roaming): its socket was rebound.

    The gateway's binding names the old endpoint, so if this is the active
    path the session reattaches on it (ENDPOINT_CHANGED).
    """

    path: PathId


@attrs.frozen(kw_only=True)
class LinkChanged:
    """Netlink said the path's interface went up or down: acted on at once (spec 6)."""

    path: PathId
    up: bool


@attrs.frozen(kw_only=True)
class ProbeSent:
    path: PathId
    seq: int


@attrs.frozen(kw_only=True)
class ProbeAcked:
    """An authenticated PROBE_ACK; it also tells us the gateway's version and binding."""

    path: PathId
    seq: int
    gateway_version: int
    gateway_bound_path: PathId | None


@attrs.frozen(kw_only=True)
class DeliveryObserved:
    """Authenticated data arrived on ``path`` (coalesced by the datapath)."""

    path: PathId


@attrs.frozen(kw_only=True)
class DataSent:
    """Data left on ``path`` (coalesced by the datapath): the tunnel is in use, so its path is watched
    at the active cadence (docs/policy.md, "Probing").  Not evidence of health: nothing came back."""

    path: PathId


@attrs.frozen(kw_only=True)
class ReattachAcked:
    """An authenticated REATTACH_ACK; ``owner_epoch`` is the acking gateway's fencing epoch.

    0 (the lowest) when unknown: a trace recorded before protocol version 4.
    """

    path: PathId
    nonce: int
    new_version: int
    owner_epoch: int = 0


@attrs.frozen(kw_only=True)
class ReattachRejected:
    path: PathId
    nonce: int
    reason: ReasonCode
    current_version: int


@attrs.frozen(kw_only=True)
class PathChallenged:
    """An authenticated PATH_CHALLENGE arrived on ``path``; ``for_path`` is the path it names."""

    path: PathId
    for_path: PathId
    nonce: int
    challenge: int


@attrs.frozen(kw_only=True)
class PinRequested:
    """Operator override: pin ``path`` (or unpin with ``None``).

    ``by`` names who asked (``"uid 1000"``, ``"ui"``); the session logs it in
    an OPERATOR_ACTION event.
    """

    path: PathId | None
    by: str = "operator"


@attrs.frozen(kw_only=True)
class ReevaluateRequested:
    """A fresh decision now.

    With ``by`` set an operator asked (the UI's ``s`` key) and the session
    logs an OPERATOR_ACTION; empty, the agent itself asked (after a resume).
    """

    by: str = ""


# -- both sides ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TimerFired:
    """The deadline from ``next_deadline()`` has passed."""


@attrs.frozen(kw_only=True)
class CloseRequested:
    """The local side ends the session explicitly: shutdown, an operator, a removed peer.

    ``reason`` is the termination reason (one of ``CLOSE_REASONS``: LOCAL_CLOSE,
    or PEER_REMOVED on a gateway whose operator removed the peer).  With
    ``by`` set a person asked for it, and ``action`` (OPERATOR_DISCONNECT or
    OPERATOR_RECONNECT) is logged as an OPERATOR_ACTION first.
    """

    reason: ReasonCode = ReasonCode.LOCAL_CLOSE
    by: str = ""
    action: ReasonCode | None = None


@attrs.frozen(kw_only=True)
class PeerClosed:
    """An authenticated CLOSE from the other side (or a reject that says the session is gone)."""

    reason: ReasonCode


@attrs.frozen(kw_only=True)
class KeysExhausted:
    """The key ring hit reject-after-messages/time without a successful rekey."""


@attrs.frozen(kw_only=True)
class OwnershipLost:
    """Cluster store says another node owns this session now: stop serving it (Property 9)."""


# -- gateway side -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PacketAuthenticated:
    """Any authenticated transport packet from ``endpoint`` (after AEAD and replay checks).

    In BIRTH the first one confirms the handshake and binds its source; later
    ones from the active binding refresh its liveness.
    """

    endpoint: tuple[str, int]
    path: PathId


@attrs.frozen(kw_only=True)
class FrameDropped:
    """A control frame addressed to this session failed authentication or was a replay.

    The gateway core records it as a SECURITY_EVENT and changes nothing
    (spec 9: replays never mutate state).  DATA drops are only counted.
    """

    reason: ReasonCode
    endpoint: tuple[str, int]
    frame: str


@attrs.frozen(kw_only=True)
class ReattachReceived:
    """A REATTACH as the gateway driver saw it, plus the ownership record it read.

    ``proof_valid`` is True only when the frame opened with this session's
    keys (proof of possession, spec 7); forged frames arrive with False.
    """

    session_id: SessionId
    path: PathId
    endpoint: tuple[str, int]
    nonce: int
    client_ts_ms: int
    expected_version: int
    proof_valid: bool
    ownership: OwnershipRecord | None
    metadata: bytes = b""
    #: The store gave no certain answer (or the lease is unproven): the reattach is denied with it.
    store_failure: ReasonCode | None = None


@attrs.frozen(kw_only=True)
class PathResponseReceived:
    """An authenticated PATH_RESPONSE from ``endpoint``: the client's echo of a challenge."""

    endpoint: tuple[str, int]
    path: PathId
    nonce: int
    challenge: int


@attrs.frozen(kw_only=True)
class TakenOver:
    """Another gateway of the cluster took the session over: it answered our resume handshake.

    Its keys are in place, the session is still unbound and reattaches there.  ``owner_epoch``
    is the fencing epoch its answer carried (docs/cluster.md, "Takeover").
    """

    owner_epoch: int


ClientInput = (
    HandshakeCompleted
    | TakenOver
    | PathAdded
    | PathCostChanged
    | PathRemoved
    | PathReaddressed
    | LinkChanged
    | ProbeSent
    | ProbeAcked
    | DeliveryObserved
    | DataSent
    | ReattachAcked
    | ReattachRejected
    | PathChallenged
    | PinRequested
    | ReevaluateRequested
    | TimerFired
    | CloseRequested
    | PeerClosed
    | KeysExhausted
)
GatewayInput = (
    PacketAuthenticated
    | FrameDropped
    | ReattachReceived
    | PathResponseReceived
    | TimerFired
    | CloseRequested
    | PeerClosed
    | KeysExhausted
    | OwnershipLost
)
