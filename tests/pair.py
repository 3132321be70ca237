"""A client core and a gateway core wired back to back through an in-memory network.

Like h11's ConnectionPair: no sockets, no clock, no randomness.  Each path
can be up, down, or blackholed (link up, nothing passes); messages on a path
that does not pass are dropped.  The pair records every REATTACH the gateway
received so tests can replay captured ones from another address, and every
action either side emitted so the formal properties can be checked on the
whole trace.

Also here, so that no test file writes them again: :func:`storm`, the
scripted storm scenario (determinism and audit tests), the lone-gateway
helpers :func:`lone_gateway` and :func:`valid_reattach` (a REATTACH the
gateway would accept, to spoil in one way), and :func:`lone_client`, an
attached client with no gateway behind it.  Pinned policies are in
``tests/policies.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    Action,
    EmitEvent,
    SendClose,
    SendPathChallenge,
    SendPathResponse,
    SendReattach,
    SendReattachAck,
    SendReattachReject,
)
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, GatewaySession

GATEWAY_PORT = 51820
NODE = "gw-a"
#: The session every pair (and lone gateway) runs unless told otherwise.
SID = SessionId(bytes(range(16)))
#: Three paths (id, priority), best first.
PATHS = ((1, 10), (2, 20), (3, 30))


def gateway_endpoint(path: PathId) -> tuple[str, int]:
    """Where the client sends on ``path`` (one gateway address per path, as in the lab)."""
    return (f"192.0.2.{path.value}", GATEWAY_PORT)


def client_endpoint(path: PathId) -> tuple[str, int]:
    """The client's source address on ``path`` as the gateway sees it."""
    return (f"198.51.100.{path.value}", 40000 + path.value)


ATTACKER_ENDPOINT = ("203.0.113.66", 6666)

#: ``(event, now, actions)``: what a tap installed by ``Pair.start(attach=...)`` is told.
Tap = Callable[[object, float, list[Action]], None]


class DeadlineStuck(RuntimeError):
    """A machine's ``next_deadline()`` stays at or before ``now`` however often its timer fires."""

    def __init__(self, side: str, now: float) -> None:
        self.side = side
        self.now = now
        super().__init__(f"{side} timer fired {now!r} repeatedly without moving next_deadline() past it")


#: What :meth:`Pair.forge_reattach` can spoil; each must be rejected without mutation.
FORGERY_KINDS = (
    "forged",
    "wrong_session",
    "reused_nonce",
    "stale_timestamp",
    "future_timestamp",
    "wrong_owner",
    "no_record",
    "wrong_revision",
    "stale_version",
    "future_version",
)


@attrs.define
class PathLink:
    up: bool = True
    passes: bool = True  # False: blackholed (link up, nothing gets through)

    @property
    def delivers(self) -> bool:
        return self.up and self.passes


@attrs.define
class Pair:
    policy: Policy
    client: ClientSession
    gateway: GatewaySession
    links: dict[PathId, PathLink]
    ownership: OwnershipRecord | None
    now: float = 0.0
    seq: int = 0
    client_log: list[Action] = attrs.Factory(list)
    gateway_log: list[Action] = attrs.Factory(list)
    captured: list[ev.ReattachReceived] = attrs.Factory(list)
    #: While True, the client's next REATTACH is taken off the wire (into ``held_back``), as an
    #: on-path attacker who suppresses it would.
    hold_back: bool = False
    held_back: list[ev.ReattachReceived] = attrs.Factory(list)
    #: PATH_CHALLENGEs the gateway sent to an address that is not the client's (nobody answers them).
    lost_challenges: list[SendPathChallenge] = attrs.Factory(list)

    @classmethod
    def start(
        cls,
        *,
        policy: Policy | None = None,
        paths: Iterable[tuple[int, int]] = PATHS,
        session_id: SessionId | None = None,
        attach: Callable[[str, ClientSession | GatewaySession], Tap] | None = None,
        handshake: bool = True,
        metered: Iterable[int] = (),
    ) -> Pair:
        """Create both sides, add the paths (id, priority) and handshake on the first one.

        With ``attach``, every ``handle`` call of both machines is observed:
        ``attach(side, machine)`` is called for "gateway" then "client" right
        after each machine is built (before its first input) and returns a tap
        ``(event, now, actions)`` that sees every later call, the handshake
        included.  With ``handshake=False`` both sides are left in BIRTH (a
        handshake that never completed), the paths added.  ``metered``: the
        ids of paths whose bytes cost money.
        """
        policy = policy or Policy()
        sid = session_id or SID
        gateway = GatewaySession(policy=policy, session_id=sid, now=0.0, node_id=NODE, held_revision=1)
        if attach is not None:
            _install_tap(gateway, attach("gateway", gateway))
        client = ClientSession(policy=policy, session_id=sid, now=0.0)
        if attach is not None:
            _install_tap(client, attach("client", client))
        path_list = [(PathId(p), prio) for p, prio in paths]
        pair = cls(
            policy=policy,
            client=client,
            gateway=gateway,
            links={p: PathLink() for p, _ in path_list},
            ownership=OwnershipRecord(session_id=sid, owner=NODE, revision=1),
        )
        pair.gateway_log += gateway.creation_events()
        pair.client_log += client.creation_events()
        costly = {PathId(p) for p in metered}
        for path, prio in path_list:
            pair._client(ev.PathAdded(path=path, priority=prio, endpoint=gateway_endpoint(path), metered=path in costly))
        if handshake:
            pair.complete_handshake()
        return pair

    # -- plumbing ---------------------------------------------------------------------
    def _client(self, event: ev.ClientInput) -> list[Action]:
        actions = self.client.handle(event, now=self.now)
        self.client_log += actions
        for action in actions:
            if isinstance(action, SendReattach):
                self._deliver_reattach(action)
            elif isinstance(action, SendPathResponse):
                self._deliver_path_response(action)
        return actions

    def _gateway(self, event: ev.GatewayInput) -> list[Action]:
        actions = self.gateway.handle(event, now=self.now)
        self.gateway_log += actions
        return actions

    def reattach_request(self, send: SendReattach) -> ev.ReattachReceived:
        """What the gateway receives for the client's ``send``: from the client's address on that path."""
        return ev.ReattachReceived(
            session_id=self.client.record.session_id,
            path=send.path,
            endpoint=client_endpoint(send.path),
            nonce=send.nonce,
            client_ts_ms=send.client_ts_ms,
            expected_version=send.expected_version,
            proof_valid=True,
            ownership=self.ownership,
        )

    def _deliver_reattach(self, send: SendReattach) -> None:
        if not self.links[send.path].delivers:
            return
        request = self.reattach_request(send)
        if self.hold_back:
            self.hold_back = False
            self.held_back.append(request)
            return
        self.captured.append(request)
        self._gateway(ev.PacketAuthenticated(endpoint=request.endpoint, path=send.path))
        self._answer_client(self._gateway(request))

    def _deliver_path_response(self, send: SendPathResponse) -> None:
        """The client's echo reaches the gateway from the client's address on that path (if it passes)."""
        if not self.links[send.path].delivers:
            return
        response = ev.PathResponseReceived(
            endpoint=client_endpoint(send.path), path=send.path, nonce=send.nonce, challenge=send.challenge
        )
        self._answer_client(self._gateway(response))

    def _answer_client(self, answers: list[Action]) -> None:
        """Carry the gateway's replies to the client: only those sent to the client's own address on a
        path whose link delivers arrive (on that path); a challenge to any other address is lost."""
        by_endpoint = {client_endpoint(p): p for p in self.links}
        for answer in answers:
            if not isinstance(answer, SendReattachAck | SendReattachReject | SendPathChallenge):
                continue
            path = by_endpoint.get(answer.endpoint)
            if path is None or not self.links[path].delivers:
                if isinstance(answer, SendPathChallenge):
                    self.lost_challenges.append(answer)
                continue
            if isinstance(answer, SendPathChallenge):
                self._client(
                    ev.PathChallenged(path=path, for_path=answer.path, nonce=answer.nonce, challenge=answer.challenge)
                )
            elif isinstance(answer, SendReattachAck):
                self._client(
                    ev.ReattachAcked(
                        path=path, nonce=answer.nonce, new_version=answer.new_version, owner_epoch=answer.owner_epoch
                    )
                )
            else:
                self._client(
                    ev.ReattachRejected(
                        path=path,
                        nonce=answer.nonce,
                        reason=answer.reason,
                        current_version=answer.current_version,
                    )
                )

    # -- what tests drive --------------------------------------------------------------
    def complete_handshake(self) -> None:
        """The handshake completes on the first path: the gateway hears the client, the client the answer."""
        first = next(iter(self.links))
        self._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(first), path=first))
        self._client(
            ev.HandshakeCompleted(
                session_id=self.client.record.session_id,
                binding=Binding(path=first, endpoint=gateway_endpoint(first)),
                gateway_version=self.gateway.record.version,
                owner_epoch=self.gateway.held_revision,
            )
        )

    def advance(self, seconds: float, *, max_repeats: int = 100) -> None:
        """Move time forward, firing every deadline on the way, as the Trio driver does.

        The driver contract (aioquic's ``handle_timer``) is that handling the
        timer at ``next_deadline()`` moves the deadline on.  If timers fire
        ``max_repeats`` times at one instant, that contract is broken (the
        driver's timer loop would spin forever) and :class:`DeadlineStuck`
        says which side and when, instead of hanging the test.
        """
        target = round(self.now + seconds, 9)  # keep test times exact decimals
        repeats = 0
        last_now: float | None = None
        while True:
            deadlines = [d for d in (self.client.next_deadline(), self.gateway.next_deadline()) if d is not None]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > target:
                break
            self.now = max(self.now, nxt)
            repeats = repeats + 1 if self.now == last_now else 0
            last_now = self.now
            if repeats >= max_repeats:
                raise DeadlineStuck("client" if self._due(self.client) else "gateway", self.now)
            if self._due(self.client):
                self._client(ev.TimerFired())
            if self._due(self.gateway):  # asked again: the client's timer may have moved it
                self._gateway(ev.TimerFired())
        self.now = target

    def _due(self, machine: ClientSession | GatewaySession) -> bool:
        deadline = machine.next_deadline()
        return deadline is not None and deadline <= self.now

    def send_probes(self) -> int:
        """Every path sends one probe now; returns the round's sequence number."""
        self.seq += 1
        for path in sorted(self.links):
            self._client(ev.ProbeSent(path=path, seq=self.seq))
        return self.seq

    def ack_probes(self, seq: int, acked: Iterable[int] | None = None) -> None:
        """The gateway answers probe ``seq`` on every path in ``acked`` (all by default) whose link delivers."""
        keep = None if acked is None else {PathId(p) for p in acked}
        for path, link in sorted(self.links.items()):
            if (keep is None or path in keep) and link.delivers and not self.client.terminated:
                self._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(path), path=path))
                bound = self.gateway.record.binding
                self._client(
                    ev.ProbeAcked(
                        path=path,
                        seq=seq,
                        gateway_version=self.gateway.record.version,
                        gateway_bound_path=bound.path if bound else None,
                    )
                )

    def probe_round(self) -> None:
        """Every path sends one probe now; those whose link delivers are acked at once."""
        self.ack_probes(self.send_probes())

    def probe_round_lossy(self, acked: Iterable[int]) -> None:
        """Like :meth:`probe_round`, but only paths in ``acked`` (and whose link delivers) get an ack."""
        self.ack_probes(self.send_probes(), acked)

    def lose_active_ack(self) -> None:
        """One probe round in which only the active path's ack is lost (partial loss on it)."""
        active = self.client.record.binding
        self.probe_round_lossy([p.value for p in self.links if active is None or p != active.path])

    def run(self, seconds: float) -> None:
        """Probe every path at the policy interval for ``seconds``."""
        step = self.policy.probe_interval_ms / 1000.0
        end = round(self.now + seconds, 9)
        while round(self.now + step, 9) <= end:
            self.advance(step)
            self.probe_round()

    def set_link(self, path: int, *, up: bool) -> None:
        pid = PathId(path)
        self.links[pid].up = up
        self._client(ev.LinkChanged(path=pid, up=up))

    def blackhole(self, path: int, *, on: bool = True) -> None:
        self.links[PathId(path)].passes = not on

    def flap_active(self, times: int = 4, *, down_s: float = 0.3, up_s: float = 0.3) -> None:
        """A flapping storm against the active path: whatever path is active goes down, then up, ``times`` times.

        Probing goes on throughout; the switch rate runs out, so the session ends up DEGRADED.
        """
        for _ in range(times):
            active = self.client.record.binding
            if active is not None:
                self.set_link(active.path.value, up=False)
            self.run(down_s)
            if active is not None:
                self.set_link(active.path.value, up=True)
            self.run(up_s)

    def go_dark(self) -> None:
        """Every path blackholed, probing for 3 s, then 5 s of silence: unbound past the loss TTL."""
        for path in sorted(self.links):
            self.blackhole(path.value)
        self.run(3.0)
        self.advance(5.0)

    def replay_captured(self, index: int = -1, *, endpoint: tuple[str, int] = ATTACKER_ENDPOINT) -> list[Action]:
        """Feed a captured REATTACH to the gateway again, from another address."""
        original = self.captured[index]
        return self._deliver_foreign(attrs.evolve(original, endpoint=endpoint))

    def send_held_back(self, index: int = -1, *, endpoint: tuple[str, int] = ATTACKER_ENDPOINT) -> list[Action]:
        """The attacker sends a REATTACH he took off the wire (``hold_back``) from his own address."""
        return self._deliver_foreign(attrs.evolve(self.held_back[index], endpoint=endpoint))

    def _deliver_foreign(self, request: ev.ReattachReceived) -> list[Action]:
        """A REATTACH from someone else's address: replies to the client's addresses still reach it."""
        answers = self._gateway(request)
        self._answer_client(answers)
        return answers

    def events(self, side: str = "client") -> list[EmitEvent]:
        log = self.client_log if side == "client" else self.gateway_log
        return [a for a in log if isinstance(a, EmitEvent)]

    def pin(self, path: int | None) -> list[Action]:
        """Operator pin (or unpin with None) on the client."""
        return self._client(ev.PinRequested(path=PathId(path) if path is not None else None))

    def close(self, side: str = "client", request: ev.CloseRequested | None = None) -> list[Action]:
        """Close one side (``request`` says why and who); its SendClose reaches the other side as PeerClosed."""
        request = request or ev.CloseRequested()
        actions = self._client(request) if side == "client" else self._gateway(request)
        for action in actions:
            if isinstance(action, SendClose):
                if side == "client":
                    self._gateway(ev.PeerClosed(reason=action.reason))
                else:
                    self._client(ev.PeerClosed(reason=action.reason))
        return actions

    def lose_ownership(self, new_owner: str = "gw-b") -> list[Action]:
        """The store now names another node: the record changes and the gateway hears OwnershipLost."""
        sid = self.gateway.record.session_id
        revision = self.ownership.revision + 1 if self.ownership is not None else 1
        self.ownership = OwnershipRecord(session_id=sid, owner=new_owner, revision=revision)
        return self._gateway(ev.OwnershipLost())

    def set_store(self, kind: str) -> None:
        """What the store answers to later REATTACHes: "owned", "other_owner", "missing" or "new_revision"."""
        sid = self.gateway.record.session_id
        held = self.gateway.held_revision
        self.ownership = {
            "owned": OwnershipRecord(session_id=sid, owner=NODE, revision=held),
            "other_owner": OwnershipRecord(session_id=sid, owner="gw-b", revision=held),
            "missing": None,
            "new_revision": OwnershipRecord(session_id=sid, owner=NODE, revision=held + 1),
        }[kind]

    def forge_reattach(
        self, kind: str, *, path: int = 2, endpoint: tuple[str, int] = ATTACKER_ENDPOINT
    ) -> ev.ReattachReceived:
        """A REATTACH that would be accepted now, spoiled in exactly one way (see :data:`FORGERY_KINDS`).

        The base request is :func:`valid_reattach`'s, so only the named
        defect can be the reason for a rejection.  ``kind="valid"`` leaves it
        unspoiled (a client that roamed to a new address, with its keys).
        """
        gw = self.gateway
        sid = gw.record.session_id
        base = valid_reattach(gw, path=PathId(path), now=self.now, endpoint=endpoint)
        window = self.policy.freshness_window_ms
        changes: dict[str, dict[str, object]] = {
            "valid": {},
            "forged": dict(proof_valid=False),
            "wrong_session": dict(session_id=SessionId(bytes(16)) if sid.raw != bytes(16) else SessionId(b"\xff" * 16)),
            "reused_nonce": dict(nonce=gw.last_nonce),
            "stale_timestamp": dict(client_ts_ms=base.client_ts_ms - window - 1_000),
            "future_timestamp": dict(client_ts_ms=base.client_ts_ms + window + 1_000),
            "wrong_owner": dict(ownership=OwnershipRecord(session_id=sid, owner="gw-b", revision=gw.held_revision)),
            "no_record": dict(ownership=None),
            "wrong_revision": dict(
                ownership=OwnershipRecord(session_id=sid, owner=NODE, revision=gw.held_revision + 1)
            ),
            "stale_version": dict(expected_version=gw.record.version - 1),
            "future_version": dict(expected_version=gw.record.version + 1),
        }
        return attrs.evolve(base, **changes[kind])  # type: ignore[arg-type]

    def attack(self, kind: str, **kwargs: object) -> list[Action]:
        """Deliver a forged REATTACH (or ``kind="replay"``: the last captured one) to the gateway."""
        if kind == "replay":
            return self.replay_captured(-1) if self.captured else []
        return self._deliver_foreign(self.forge_reattach(kind, **kwargs))  # type: ignore[arg-type]


def _install_tap(machine: ClientSession | GatewaySession, tap: Tap) -> None:
    """Shadow ``machine.handle`` with a wrapper that reports every call to ``tap``."""
    inner = machine.handle

    def handle(event: Any, *, now: float) -> list[Action]:
        actions = inner(event, now=now)
        tap(event, now, actions)
        return actions

    machine.handle = handle  # type: ignore[method-assign]


# =============================================================================
# The storm scenario
# =============================================================================


def storm(pair: Pair) -> Pair:
    """Drive ``pair`` (3 paths, ``tests.policies.STORM_POLICY``) through every kind of fault, to TERMINATED.

    Probing, a link failure, forged and replayed REATTACHes, a pin, partial
    loss on the active path until the switch rate denies a switch (DEGRADED),
    a flapping storm against the active path, then every path dark until the
    loss TTL ends both sides.  The determinism and audit tests run it.
    """
    pair.run(1.0)
    pair.set_link(1, up=False)  # immediate LINK_DOWN switch to p2
    pair.attack("replay")  # the REATTACH just accepted, again, from an attacker
    pair.attack("forged")
    pair.attack("stale_version")
    pair.attack("wrong_owner")
    pair.run(0.5)
    pair.set_link(1, up=True)
    pair.pin(3)  # operator pin: switch to p3
    pair.run(0.5)
    pair.pin(None)
    pair.run(2.0)  # p1 healthy again, return dwell, switch back
    for _ in range(5):  # partial loss on the active path: VOLATILE; the rate denies a 5th switch: DEGRADED
        pair.advance(0.1)
        pair.lose_active_ack()
        pair.advance(0.1)
        pair.probe_round()
    pair.run(1.0)
    pair.flap_active(4)  # while DEGRADED: the dead binding is released, not replaced
    pair.go_dark()  # RECOVERING, DEGRADED, TERMINATED
    assert pair.client.terminated and pair.gateway.terminated
    return pair


# =============================================================================
# A lone gateway machine, for tests that drive it input by input
# =============================================================================


def lone_gateway(
    policy: Policy | None = None,
    *,
    held_revision: int = 1,
    bound: bool = True,
    now: float = 0.0,
    handshake_binding: Binding | None = None,
) -> GatewaySession:
    """A gateway for :data:`SID` on :data:`NODE`; attached on p1 by the client's first packet unless ``bound=False``."""
    gw = GatewaySession(
        policy=policy or Policy(),
        session_id=SID,
        now=now,
        node_id=NODE,
        held_revision=held_revision,
        handshake_binding=handshake_binding,
    )
    if bound:
        p1 = PathId(1)
        gw.handle(ev.PacketAuthenticated(endpoint=client_endpoint(p1), path=p1), now=now)
    return gw


def lone_client(
    policy: Policy | None = None,
    *,
    session_id: SessionId = SID,
    now: float = 0.0,
    switch_times: tuple[float, ...] = (),
) -> ClientSession:
    """A client with p1 and p2 (priorities 10, 20), attached on p1 at ``now`` by a handshake at gateway version 1.

    ``switch_times`` are the confirmed switches an agent's new session inherits (``core/agent.py``).
    """
    client = ClientSession(policy=policy or Policy(), session_id=session_id, now=now, switch_times=switch_times)
    for p, priority in PATHS[:2]:
        path = PathId(p)
        client.handle(ev.PathAdded(path=path, priority=priority, endpoint=gateway_endpoint(path)), now=now)
    p1 = PathId(1)
    binding = Binding(path=p1, endpoint=gateway_endpoint(p1))
    client.handle(ev.HandshakeCompleted(session_id=session_id, binding=binding, gateway_version=1), now=now)
    return client


def valid_reattach(
    gw: GatewaySession,
    *,
    path: PathId | None = None,
    now: float = 0.0,
    endpoint: tuple[str, int] | None = None,
    **changes: Any,
) -> ev.ReattachReceived:
    """A REATTACH ``gw`` would accept at ``now`` to move to ``path`` (p2 by default), with ``changes`` applied.

    From the client's address on ``path`` (or ``endpoint``), with a proof, the
    next nonce, a timestamp exactly where the gateway expects it, the current
    version and an ownership record for this node at the held revision.
    """
    sid = gw.record.session_id
    path = path or PathId(2)
    expected_ts = (now - gw.record.created_at) * 1000.0 - gw.clock_offset_ms
    base = ev.ReattachReceived(
        session_id=sid,
        path=path,
        endpoint=endpoint or client_endpoint(path),
        nonce=gw.last_nonce + 1,
        client_ts_ms=round(expected_ts),
        expected_version=gw.record.version,
        proof_valid=True,
        ownership=OwnershipRecord(session_id=sid, owner=NODE, revision=gw.held_revision),
    )
    return attrs.evolve(base, **changes)


def answer_challenge(gw: GatewaySession, actions: list[Action], *, now: float) -> list[Action]:
    """What ``gw`` does when the client echoes the PATH_CHALLENGE in ``actions`` from the challenged address."""
    challenge = next(a for a in actions if isinstance(a, SendPathChallenge))
    response = ev.PathResponseReceived(
        endpoint=challenge.endpoint, path=challenge.path, nonce=challenge.nonce, challenge=challenge.challenge
    )
    return gw.handle(response, now=now)


def genuine_reattach(gw: GatewaySession, request: ev.ReattachReceived, *, now: float) -> list[Action]:
    """A genuine client's REATTACH: fed to ``gw``, its challenge (if any) answered at once; all actions, in order."""
    actions = gw.handle(request, now=now)
    if any(isinstance(a, SendPathChallenge) for a in actions):
        actions += answer_challenge(gw, actions, now=now)
    return actions
