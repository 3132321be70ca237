"""A client core and a gateway core wired back to back through an in-memory network.

Like h11's ConnectionPair: no sockets, no clock, no randomness.  Each path
can be up, down, or blackholed (link up, nothing passes); messages on a path
that does not pass are dropped.  The pair records every REATTACH the gateway
received so tests can replay captured ones from another address, and every
action either side emitted so the formal properties can be checked on the
whole trace.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    Action,
    EmitEvent,
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


def gateway_endpoint(path: PathId) -> tuple[str, int]:
    """Where the client sends on ``path`` (one gateway address per path, as in the lab)."""
    return (f"192.0.2.{path.value}", GATEWAY_PORT)


def client_endpoint(path: PathId) -> tuple[str, int]:
    """The client's source address on ``path`` as the gateway sees it."""
    return (f"198.51.100.{path.value}", 40000 + path.value)


ATTACKER_ENDPOINT = ("203.0.113.66", 6666)

#: The storm scenario's policy (determinism, audit and replay tests, and the golden trace),
#: pinned in full so that it means the same thing whatever the defaults become.
STORM_POLICY = Policy(
    max_recovery_window_ms=800,
    max_switches_per_minute=4,
    transport_loss_ttl_ms=2_000,
    session_ttl_s=120,
    loss_threshold_pct=20.0,
    latency_threshold_ms=120.0,
    jitter_threshold_ms=60.0,
    probe_interval_ms=100,
    probe_timeout_ms=200,
    dead_after_missed_probes=3,
    loss_window_probes=10,
    min_dwell_ms=0,
    return_dwell_ms=500,
    reattach_timeout_ms=150,
    freshness_window_ms=2_000,
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

    @classmethod
    def start(
        cls,
        *,
        policy: Policy | None = None,
        paths: Iterable[tuple[int, int]] = ((1, 10), (2, 20), (3, 30)),
        session_id: SessionId | None = None,
    ) -> Pair:
        """Create both sides, add the paths (id, priority) and handshake on the first one."""
        policy = policy or Policy()
        sid = session_id or SessionId(bytes(range(16)))
        gateway = GatewaySession(policy=policy, session_id=sid, now=0.0, node_id=NODE, held_revision=1)
        client = ClientSession(policy=policy, session_id=sid, now=0.0)
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
        for path, prio in path_list:
            pair._client(ev.PathAdded(path=path, priority=prio, endpoint=gateway_endpoint(path)))
        first = path_list[0][0]
        pair._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(first), path=first))
        pair._client(
            ev.HandshakeCompleted(
                session_id=sid,
                binding=Binding(path=first, endpoint=gateway_endpoint(first)),
                gateway_version=gateway.record.version,
            )
        )
        return pair

    # -- plumbing ---------------------------------------------------------------------
    def _client(self, event: ev.ClientInput) -> list[Action]:
        actions = self.client.handle(event, now=self.now)
        self.client_log += actions
        for action in actions:
            if isinstance(action, SendReattach):
                self._deliver_reattach(action)
        return actions

    def _gateway(self, event: ev.GatewayInput) -> list[Action]:
        actions = self.gateway.handle(event, now=self.now)
        self.gateway_log += actions
        return actions

    def _deliver_reattach(self, send: SendReattach) -> None:
        if not self.links[send.path].delivers:
            return
        request = ev.ReattachReceived(
            session_id=self.client.record.session_id,
            path=send.path,
            endpoint=client_endpoint(send.path),
            nonce=send.nonce,
            client_ts_ms=send.client_ts_ms,
            expected_version=send.expected_version,
            proof_valid=True,
            ownership=self.ownership,
        )
        self.captured.append(request)
        self._gateway(ev.PacketAuthenticated(endpoint=request.endpoint, path=send.path))
        for answer in self._gateway(request):
            if isinstance(answer, SendReattachAck):
                self._client(ev.ReattachAcked(path=send.path, nonce=answer.nonce, new_version=answer.new_version))
            elif isinstance(answer, SendReattachReject):
                self._client(
                    ev.ReattachRejected(
                        path=send.path,
                        nonce=answer.nonce,
                        reason=answer.reason,
                        current_version=answer.current_version,
                    )
                )

    # -- what tests drive --------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move time forward, firing every deadline on the way, as the Trio driver does."""
        target = round(self.now + seconds, 9)  # keep test times exact decimals
        while True:
            deadlines = [d for d in (self.client.next_deadline(), self.gateway.next_deadline()) if d is not None]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > target:
                break
            self.now = max(self.now, nxt)
            if self.client.next_deadline() is not None and self.client.next_deadline() <= self.now:  # type: ignore[operator]
                self._client(ev.TimerFired())
            if self.gateway.next_deadline() is not None and self.gateway.next_deadline() <= self.now:  # type: ignore[operator]
                self._gateway(ev.TimerFired())
        self.now = target

    def probe_round(self) -> None:
        """Every path sends one probe now; those whose link delivers are acked at once."""
        self.seq += 1
        for path in sorted(self.links):
            self._client(ev.ProbeSent(path=path, seq=self.seq))
        for path, link in sorted(self.links.items()):
            if link.delivers and not self.client.terminated:
                self._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(path), path=path))
                bound = self.gateway.record.binding
                self._client(
                    ev.ProbeAcked(
                        path=path,
                        seq=self.seq,
                        gateway_version=self.gateway.record.version,
                        gateway_bound_path=bound.path if bound else None,
                    )
                )

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

    def replay_captured(self, index: int = -1, *, endpoint: tuple[str, int] = ATTACKER_ENDPOINT) -> list[Action]:
        """Feed a captured REATTACH to the gateway again, from another address."""
        original = self.captured[index]
        return self._gateway(attrs.evolve(original, endpoint=endpoint))

    def events(self, side: str = "client") -> list[EmitEvent]:
        log = self.client_log if side == "client" else self.gateway_log
        return [a for a in log if isinstance(a, EmitEvent)]

    # -- helpers for the property tests (tests/properties, tests/core/test_determinism.py) --
    @classmethod
    def start_traced(
        cls,
        attach: Callable[[str, ClientSession | GatewaySession], Tap],
        *,
        policy: Policy | None = None,
        paths: Iterable[tuple[int, int]] = ((1, 10), (2, 20), (3, 30)),
        session_id: SessionId | None = None,
        handshake: bool = True,
    ) -> Pair:
        """Like :meth:`start`, but every ``handle`` call of both machines is observed.

        ``attach(side, machine)`` is called for "gateway" then "client" right
        after each machine is built (before its first input) and returns a
        tap ``(event, now, actions)`` that sees every later call, the
        handshake included.  The steps are the same as :meth:`start`'s; with
        ``handshake=False`` both sides are left in BIRTH (a handshake that
        never completed), the paths added.
        """
        policy = policy or Policy()
        sid = session_id or SessionId(bytes(range(16)))
        gateway = GatewaySession(policy=policy, session_id=sid, now=0.0, node_id=NODE, held_revision=1)
        _install_tap(gateway, attach("gateway", gateway))
        client = ClientSession(policy=policy, session_id=sid, now=0.0)
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
        for path, prio in path_list:
            pair._client(ev.PathAdded(path=path, priority=prio, endpoint=gateway_endpoint(path)))
        if not handshake:
            return pair
        first = path_list[0][0]
        pair._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(first), path=first))
        pair._client(
            ev.HandshakeCompleted(
                session_id=sid,
                binding=Binding(path=first, endpoint=gateway_endpoint(first)),
                gateway_version=gateway.record.version,
            )
        )
        return pair

    def advance_bounded(self, seconds: float, *, max_repeats: int = 100) -> None:
        """:meth:`advance`, but a deadline that fires without making progress raises instead of hanging.

        The driver contract (aioquic's ``handle_timer``) is that handling the
        timer at ``next_deadline()`` moves the deadline on.  If one side's
        timer fires ``max_repeats`` times at the same instant, that contract is
        broken and :class:`DeadlineStuck` says which side and when.
        """
        target = round(self.now + seconds, 9)
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
            client_due = self.client.next_deadline()
            gateway_due = self.gateway.next_deadline()
            if repeats >= max_repeats:
                side = "client" if client_due is not None and client_due <= self.now else "gateway"
                raise DeadlineStuck(side, self.now)
            if client_due is not None and client_due <= self.now:
                self._client(ev.TimerFired())
            if gateway_due is not None and gateway_due <= self.now:
                self._gateway(ev.TimerFired())
        self.now = target

    def probe_round_lossy(self, acked: Iterable[int]) -> None:
        """Like :meth:`probe_round`, but only paths in ``acked`` (and whose link delivers) get an ack."""
        keep = {PathId(p) for p in acked}
        self.seq += 1
        for path in sorted(self.links):
            self._client(ev.ProbeSent(path=path, seq=self.seq))
        for path, link in sorted(self.links.items()):
            if path in keep and link.delivers and not self.client.terminated:
                self._gateway(ev.PacketAuthenticated(endpoint=client_endpoint(path), path=path))
                bound = self.gateway.record.binding
                self._client(
                    ev.ProbeAcked(
                        path=path,
                        seq=self.seq,
                        gateway_version=self.gateway.record.version,
                        gateway_bound_path=bound.path if bound else None,
                    )
                )

    def pin(self, path: int | None) -> list[Action]:
        """Operator pin (or unpin with None) on the client."""
        return self._client(ev.PinRequested(path=PathId(path) if path is not None else None))

    def close(self, side: str = "client") -> list[Action]:
        """Close one side; its SendClose reaches the other side as PeerClosed."""
        actions = self._client(ev.CloseRequested()) if side == "client" else self._gateway(ev.CloseRequested())
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

        The base request has the next nonce, a fresh timestamp, the current
        version and a valid ownership record, so only the named defect can be
        the reason for a rejection.  ``kind="valid"`` leaves it unspoiled
        (a client that roamed to a new address, with its keys).
        """
        gw = self.gateway
        sid = gw.record.session_id
        expected_ts = (self.now - gw.record.created_at) * 1000.0 - gw.clock_offset_ms
        base = ev.ReattachReceived(
            session_id=sid,
            path=PathId(path),
            endpoint=endpoint,
            nonce=gw.last_nonce + 1,
            client_ts_ms=round(expected_ts),
            expected_version=gw.record.version,
            proof_valid=True,
            ownership=OwnershipRecord(session_id=sid, owner=NODE, revision=gw.held_revision),
        )
        window = self.policy.freshness_window_ms
        changes: dict[str, dict[str, object]] = {
            "valid": {},
            "forged": dict(proof_valid=False),
            "wrong_session": dict(session_id=SessionId(bytes(16)) if sid.raw != bytes(16) else SessionId(b"\xff" * 16)),
            "reused_nonce": dict(nonce=gw.last_nonce),
            "stale_timestamp": dict(client_ts_ms=round(expected_ts) - window - 1_000),
            "future_timestamp": dict(client_ts_ms=round(expected_ts) + window + 1_000),
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
        return self._gateway(self.forge_reattach(kind, **kwargs))  # type: ignore[arg-type]


# Imports for the helpers above, kept here so the original header stays as it was.
from typing import Any, Callable  # noqa: E402

from jvpn_trio.core.actions import SendClose  # noqa: E402


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

#: ``(event, now, actions)``: what a tap installed by :meth:`Pair.start_traced` is told.
Tap = Callable[[object, float, list[Action]], None]


def _install_tap(machine: ClientSession | GatewaySession, tap: Tap) -> None:
    """Shadow ``machine.handle`` with a wrapper that reports every call to ``tap``."""
    inner = machine.handle

    def handle(event: Any, *, now: float) -> list[Action]:
        actions = inner(event, now=now)
        tap(event, now, actions)
        return actions

    machine.handle = handle  # type: ignore[method-assign]
