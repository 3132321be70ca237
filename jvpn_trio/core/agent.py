"""The agent's chain of sessions: when to handshake again, and what a new session inherits.

Theory of operation
-------------------
``jvpn-trio up`` keeps one session at a time for as long as it runs.  A
session still ends the way the specification says (TTLs, recovery bound, a
peer's CLOSE ...); what follows is the agent's explicit, bounded next step:
a *new* session, with a new SessionID, whose BIRTH names the one before it.

- **Back-off.**  After a failure the next handshake waits
  ``reconnect_initial_ms``, doubling with each consecutive failure up to
  ``reconnect_max_ms``.  A failure is a handshake round that got no answer,
  or a session that ended before it had served one switch-rate window
  (:data:`~jvpn_trio.core.policy.SWITCH_RATE_WINDOW_S`) with a binding at
  some point.  A session that served that long proves the gateway and a
  path work, so the count starts over.
- **Inheritance.**  A new session starts with the confirmed switches of the
  previous one that are still inside the rate window.  Property 6 then
  bounds switches per minute of the agent, not per session: a flapping
  storm that keeps ending sessions cannot be laundered into fresh switch
  budgets.
- **Rescue.**  A live session without a binding (every path dead, or a
  gateway that restarted and lost its keys) may be beyond saving long before
  its transport-loss TTL.  Once it has been unbound for the recovery window
  (``max_recovery_window_ms``), the agent also tries a fresh handshake.  Only
  the real gateway can answer one (both static keys authenticate it), so
  no unauthenticated packet can end a live session; when it is answered the
  gateway has already replaced its side, and the agent closes the old
  session explicitly (LOCAL_CLOSE) before the new one is born.
- **Resume.**  After a suspend the paths' measurements are stale and the
  gateway heard nothing for as long as the machine slept.  At or beyond
  :func:`gateway_tolerance_s` the gateway has certainly ended the session
  (it releases a silent binding after one transport-loss TTL and ends the
  unbound session after another; docs/spec.md, "Freshness across a
  suspend"), and every REATTACH or probe would go unanswered until the
  client's own TTL ran out.  :meth:`Succession.resumed` then makes the next
  handshake (or a rescue of the live session) due at once.
- **Replaced.**  The gateway keeps one session per static key: a newer
  handshake with the same key (the same key on a second machine, or a
  second ``up`` with it) replaces this session, and the gateway says so with
  an authenticated CLOSE(SESSION_REPLACED).  Handshaking again at once, or
  after any back-off, would evict the other client, which would evict this
  one in turn, forever.  So a session ended that way (:data:`HOLD_PEER_REASONS`)
  *holds* the agent as an operator's disconnect does: no handshake until a
  person asks for one (:meth:`Succession.reconnect_requested`), and the
  status says why (:attr:`Succession.hold`).  The agent's own rescue
  replaces its own session too, and may hear that CLOSE: a session ended
  while a rescue was out (answered or not yet) does not hold.
- **Rounds.**  A handshake round (:class:`HandshakeRound`) is one attempt
  per eligible path, in the order the
  :class:`~jvpn_trio.core.connect.HandshakePlanner` gives, each waiting
  ``handshake_retry_ms``; only one init is outstanding at a time, since a
  second answered init would replace the first session at the gateway.
  The back-off after a failed round counts from when its last init left,
  so two inits are never further apart than ``reconnect_max_ms`` (the
  bound on noticing a gateway that came back).
- **Gateways.**  With several gateways configured (``[[gateway]]``, in
  order of preference), :class:`GatewayChoice` says which one a handshake
  round goes to.  The current one is kept while it answers.  A round to it
  that fails on every path, or a session with it that ended unbound by
  its transport-loss TTL, moves the choice to the next one in the list
  (wrapping around); the next round waits the ordinary back-off.  A
  session's keys live only in the gateway that made them (docs/cluster.md,
  "Multi-gateway and takeover"), so the new gateway's session is a fresh
  handshake with a new SessionID, linked by ``previous_session``.  When a
  *rescue* round fails and another gateway exists, the live session is
  closed (LOCAL_CLOSE) so that the next round can go there: its gateway
  did not answer on any path for the recovery window and a whole round.
  The choice returns to the preferred gateway only by wrapping around,
  when the current one fails: never while one works, so two working
  gateways never flap and a session is never ended to move back.
- **Takeover.**  When the gateways are a cluster (``[client] cluster``:
  they share an ownership store, docs/cluster.md), a failed rescue round
  does not end the session.  The next round goes to the next gateway as a
  *resume*: a handshake naming the live session, which that gateway
  answers only once it has taken the session over (the old owner's lease
  is gone).  The session keeps its SessionID, version and address; the
  core reattaches it there as after any path loss.  Rounds go on, moving
  through the gateways, until one answers or the session's own
  transport-loss TTL ends it.  After an answer the next rescue waits
  another recovery window (:meth:`Succession.session_resumed`), time for
  the reattach.

Everything here is a pure function of its inputs and ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from jvpn_trio.core.candidates import DownReason
from jvpn_trio.core.connect import (
    HandshakeCandidate,
    HandshakeGiveUp,
    HandshakePlanner,
    HandshakeStep,
)
from jvpn_trio.core.ids import MAX_PATH_ID, PathId, SessionId
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.session import SessionRecord
from jvpn_trio.core.states import ReasonCode, SessionState

_MS = 1000.0
#: A peer's CLOSE with one of these reasons holds the agent until a person reconnects (module docstring,
#: "Replaced"): reconnecting by itself would take the session back from another holder of the same key.
#: Each with what the agent says about it (its log line, ``status``, the UI).
HOLD_PEER_REASONS: Mapping[ReasonCode, str] = {
    ReasonCode.SESSION_REPLACED: "replaced by another client with the same key",
}
#: The gateway ends a silent session after this many transport-loss TTLs at the latest: one TTL
#: until it releases the binding (spec R11), one more unbound (Property 4, R1).
GATEWAY_SILENCE_TTLS = 2


def gateway_tolerance_s(policy: Policy) -> float:
    """How long the gateway keeps a session that hears nothing: release after one TTL, end after another."""
    return GATEWAY_SILENCE_TTLS * policy.transport_loss_ttl_ms / _MS


def outlived_gateway(suspended_for_s: float, policy: Policy) -> bool:
    """True when the gateway has certainly ended the session during a suspend that long.

    Nothing reached the gateway while the client slept, so its session was
    silent for at least ``suspended_for_s``.  Assumes the gateway runs the
    same ``transport_loss_ttl_ms`` (the policy fingerprint in every event shows it).
    """
    return suspended_for_s >= gateway_tolerance_s(policy)


@attrs.frozen(kw_only=True)
class SessionSeed:
    """What a new session starts with: the session it follows and the switches still counted."""

    number: int  # 1 for the agent's first session
    previous_session: SessionId | None
    switch_times: tuple[float, ...]
    #: Who asked for this session with a reconnect while none was live (its BIRTH logs it).
    reconnect_by: str = ""


class Succession:
    """The agent's decisions between sessions; see the module docstring.

    State changes: :meth:`handshake_failed`, :meth:`session_started`,
    :meth:`session_ended` and :meth:`reconnect_requested`.  Queries never
    change anything.  ``hold`` is the peer reason the agent waits for a person
    after (None: it reconnects by itself).
    """

    def __init__(self, *, policy: Policy, now: float) -> None:
        self.policy = policy
        self.sessions_started = 0
        self.failures = 0
        self._next_attempt_at = now
        self._switch_times: tuple[float, ...] = ()
        self._previous: SessionId | None = None
        #: Set by a resume that outlived the gateway: a rescue of the live session is due then.
        self._rescue_forced_at: float | None = None
        self._reconnect_by = ""
        self.hold: ReasonCode | None = None

    # -- queries ------------------------------------------------------------------
    def reconnect_delay_ms(self) -> int:
        """The wait after the current run of failures: 0 before any."""
        if self.failures == 0:
            return 0
        doublings = min(self.failures - 1, 32)  # past the ceiling long before this
        return min(self.policy.reconnect_initial_ms << doublings, self.policy.reconnect_max_ms)

    def next_attempt_at(self) -> float:
        """When the next handshake round may start: never while held."""
        return math.inf if self.hold is not None else self._next_attempt_at

    def rescue_at(self, record: SessionRecord) -> float | None:
        """When a fresh handshake may try to replace the live session ``record``; None while it is bound."""
        if record.state in (SessionState.BIRTH, SessionState.TERMINATED):
            return None
        if self._rescue_forced_at is not None and record.created_at < self._rescue_forced_at:
            return self._rescue_forced_at
        if record.binding is not None:
            return None
        if record.unbound_since is None:
            return None
        return max(record.unbound_since + self.policy.max_recovery_window_ms / _MS, self._next_attempt_at)

    def carried_switch_times(self, now: float) -> tuple[float, ...]:
        """The confirmed switches of earlier sessions that still count against the rate at ``now``."""
        return tuple(t for t in self._switch_times if now < t + SWITCH_RATE_WINDOW_S)

    # -- inputs -------------------------------------------------------------------
    def handshake_failed(self, now: float, *, last_attempt_at: float | None = None) -> float:
        """A handshake round ended without an answer at ``now``; returns when the next may start.

        With ``last_attempt_at`` (when the round's last init left) the wait counts from
        there, never ending before ``now``: inits are then at most ``reconnect_max_ms``
        (or one ``handshake_retry_ms``) apart.
        """
        self.failures += 1
        self._rescue_forced_at = None  # the forced attempt was made; the ordinary rules apply again
        start = now if last_attempt_at is None else min(last_attempt_at, now)
        self._next_attempt_at = max(now, start + self.reconnect_delay_ms() / _MS)
        return self._next_attempt_at

    def session_started(self, session_id: SessionId, now: float) -> SessionSeed:
        """A handshake completed: the seed the new session must be created with."""
        self.sessions_started += 1
        self._rescue_forced_at = None
        seed = SessionSeed(
            number=self.sessions_started,
            previous_session=self._previous,
            switch_times=self.carried_switch_times(now),
            reconnect_by=self._reconnect_by,
        )
        self._reconnect_by = ""
        return seed

    def session_ended(
        self, record: SessionRecord, now: float, *, peer_reason: ReasonCode | None = None, rescued: bool = False
    ) -> float:
        """A session is over (or is being replaced); returns when the next handshake may start.

        ``peer_reason``: the reason of the peer's CLOSE that ended it, if one
        did.  One in :data:`HOLD_PEER_REASONS` sets :attr:`hold` (the return
        is then ``inf``) unless ``rescued``: the agent's own rescue was
        out, so the session that replaced this one is (or was about to be) ours.
        """
        if peer_reason in HOLD_PEER_REASONS and not rescued:
            self.hold = peer_reason
        self._previous = record.session_id
        self._switch_times = tuple(
            t for t in sorted(set(self._switch_times) | set(record.switch_times)) if now < t + SWITCH_RATE_WINDOW_S
        )
        ever_bound = record.binding is not None or record.last_path is not None
        if ever_bound and now - record.created_at >= SWITCH_RATE_WINDOW_S:
            self.failures = 0
        self._fail(now)
        return self.next_attempt_at()

    def session_resumed(self, now: float) -> float:
        """The live session was taken over by another gateway at ``now``; returns when a rescue may next be due.

        The answer proves that gateway and a path work (the failures start over); the
        session is still unbound, and the reattach that binds it needs a recovery window.
        """
        self.failures = 0
        self._rescue_forced_at = None
        self._next_attempt_at = now + self.policy.max_recovery_window_ms / _MS
        return self._next_attempt_at

    def resumed(self, suspended_for_s: float, now: float) -> bool:
        """The machine slept ``suspended_for_s`` and runs again at ``now``; True if a handshake is due at once.

        When the suspend outlived the gateway (:func:`outlived_gateway`), the
        next handshake round may start at ``now`` and a live session that
        started before ``now`` is to be rescued at ``now`` (:meth:`rescue_at`),
        bound or not: its binding is gone at the gateway.  A shorter suspend
        changes nothing here (the driver probes every path at once).
        """
        if not outlived_gateway(suspended_for_s, self.policy):
            return False
        self._rescue_forced_at = now
        self._next_attempt_at = min(self._next_attempt_at, now)
        return True

    def reconnect_requested(self, by: str, now: float) -> float:
        """A person asked to reconnect while no session is live; returns when the next round may start.

        The back-off after failures is cut to one ``reconnect_initial_ms``: a
        person asking is a reason to try soon, and the floor still bounds how
        often repeated asking can make the agent handshake.  It ends a hold.
        """
        self.hold = None
        self._reconnect_by = by
        self._next_attempt_at = min(self._next_attempt_at, now + self.policy.reconnect_initial_ms / _MS)
        return self._next_attempt_at

    def _fail(self, now: float) -> float:
        self.failures += 1
        self._next_attempt_at = now + self.reconnect_delay_ms() / _MS
        return self._next_attempt_at


@attrs.frozen(kw_only=True)
class GatewayMove:
    """The agent moved to another gateway: from which, to which, why, when (its log line)."""

    from_index: int
    to_index: int
    from_name: str
    to_name: str
    reason: ReasonCode  # NO_CANDIDATE: a round got no answer; TRANSPORT_LOSS_TTL_EXPIRED: a session ended unbound
    at: float

    def describe(self) -> str:
        why = "no handshake answer on any path" if self.reason is ReasonCode.NO_CANDIDATE else self.reason.value
        return f"gateway {self.from_name} failed ({why}); next handshakes go to {self.to_name}"


class GatewayChoice:
    """Which gateway the agent's handshake rounds go to; see the module docstring, "Gateways".

    ``names`` are the gateways in order of preference (non-empty, distinct;
    ValueError otherwise); the driver keeps what each index means (its
    endpoint and key).  ``moves`` keeps every move, in order.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("at least one gateway")
        if len(set(names)) != len(names):
            raise ValueError(f"gateways repeat: {list(names)}")
        self.names = tuple(names)
        self.current = 0
        self.moves: list[GatewayMove] = []

    @property
    def name(self) -> str:
        return self.names[self.current]

    @property
    def has_alternative(self) -> bool:
        """Another gateway exists to move to."""
        return len(self.names) > 1

    def round_failed(self, now: float) -> GatewayMove | None:
        """A handshake round to the current gateway got no answer on any path; None: nowhere else to go."""
        return self._move(ReasonCode.NO_CANDIDATE, now)

    def session_ended(self, reason: ReasonCode | None, now: float) -> GatewayMove | None:
        """A session with the current gateway ended for ``reason``: only the transport-loss TTL moves on.

        Every other end (a CLOSE, the session TTL, an operator) came with a
        gateway that answered, or is no news about it.
        """
        if reason is not ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED:
            return None
        return self._move(reason, now)

    def _move(self, reason: ReasonCode, now: float) -> GatewayMove | None:
        if not self.has_alternative:
            return None
        to = (self.current + 1) % len(self.names)
        move = GatewayMove(
            from_index=self.current, to_index=to, from_name=self.name, to_name=self.names[to], reason=reason, at=now
        )
        self.current = to
        self.moves.append(move)
        return move


class HandshakeRound:
    """One handshake round of the agent: one attempt on each path eligible when it starts.

    The order and the skipping of down links are the planner's
    (``core/connect.py``); the round gives up after its last attempt, or at
    the planner's own bound, whichever comes first.  ``candidates`` must be
    non-empty with distinct paths (ValueError otherwise).
    """

    def __init__(self, *, policy: Policy, candidates: Iterable[HandshakeCandidate], now: float) -> None:
        self._planner = HandshakePlanner(policy=policy, candidates=candidates, now=now)
        self._started = now
        self._budget = len(self._planner.eligible())
        self.last_attempt_at: float | None = None

    @property
    def attempts(self) -> int:
        return self._planner.attempts

    def link_changed(self, path: PathId, *, up: bool) -> None:
        """Netlink's news about a path; it changes which paths the remaining attempts use."""
        self._planner.link_changed(path, up=up)

    def next_attempt(self, *, now: float) -> HandshakeStep:
        """The attempt to make at ``now``, or the give-up once every attempt of the round is spent."""
        if self._planner.attempts >= self._budget:
            return HandshakeGiveUp(
                reason=ReasonCode.NO_CANDIDATE,
                paths=self._planner.eligible(),
                after_ms=round((now - self._started) * _MS),
            )
        step = self._planner.next_attempt(now=now)
        if not isinstance(step, HandshakeGiveUp):
            self.last_attempt_at = now
        return step


class PathIdsExhausted(Exception):
    """Every PathId (1..255) names a live path: the new path is refused."""


#: Why a path is down for good: only then may its PathId go to another interface.
FREES_PATH_ID = frozenset({DownReason.INTERFACE_GONE, DownReason.NOT_A_CANDIDATE})


class PathIds:
    """Maps the path manager's ids (counting up for the whole run) onto the wire's PathIds (1..255).

    An interface named in the configuration (``[[path]] interface = ...``)
    always gets the same PathId, its place in the file (the first is p1),
    whenever it appears, so event logs, status and the lab's reports name it
    the same across docks, hot-plugs and restarts.  Other paths (matched by
    a glob or a kind, or discovered) share the remaining ids round-robin: a
    reused id is the one freed longest ago, far from any answer still in
    flight for its old path.  The caller frees an id only once its path has
    left the live session (the agent queues ``PathRemoved`` before it frees).
    """

    def __init__(self, configured: Sequence[str] = ()) -> None:
        if len(configured) > MAX_PATH_ID:
            raise ValueError(f"at most {MAX_PATH_ID} configured interfaces")
        self._reserved = {name: PathId(i + 1) for i, name in enumerate(configured)}
        self._by_key: dict[int, PathId] = {}
        self._last = MAX_PATH_ID

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: int) -> PathId | None:
        return self._by_key.get(key)

    def allocate(self, key: int, *, name: str = "") -> PathId:
        """The PathId for manager path ``key`` on interface ``name`` (the same one if it has one already).

        Raises :class:`PathIdsExhausted` when no id is free for it.
        """
        known = self._by_key.get(key)
        if known is not None:
            return known
        live = set(self._by_key.values())
        reserved = self._reserved.get(name)
        if reserved is not None:
            if reserved in live:  # the configured interface already has a live path
                raise PathIdsExhausted(f"{name} already has path {reserved}")
            self._by_key[key] = reserved
            return reserved
        taken = live | set(self._reserved.values())
        if len(taken) >= MAX_PATH_ID:
            raise PathIdsExhausted(f"{MAX_PATH_ID} paths are live or reserved already")
        candidate = self._last
        while True:
            candidate = candidate % MAX_PATH_ID + 1
            if PathId(candidate) not in taken:
                break
        self._last = candidate
        self._by_key[key] = PathId(candidate)
        return PathId(candidate)

    def free(self, key: int) -> PathId | None:
        """Forget manager path ``key``; returns the PathId it had (None if it had none)."""
        return self._by_key.pop(key, None)

    def path_down(self, key: int, reason: DownReason) -> PathId | None:
        """The PathId of manager path ``key``, which went down for ``reason`` (None if it had none).

        The id is forgotten only when the interface is gone for good (:data:`FREES_PATH_ID`):
        a link flap or a lost address keeps it, so logs and status name the path the same
        when it comes back.  The caller removes the path from the live session in the same
        step, before any later path can be given the id.
        """
        pid = self._by_key.get(key)
        if pid is not None and reason in FREES_PATH_ID:
            del self._by_key[key]
        return pid
