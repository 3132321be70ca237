"""Client and gateway session machines, driven back to back with exact times."""

from __future__ import annotations

import attrs

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    BindTransport,
    EmitEvent,
    EventKind,
    ReleaseTransport,
    SendReattach,
    SendReattachAck,
    SendClose,
    SendReattachReject,
    Terminate,
)
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, GatewaySession
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from tests.pair import (
    ATTACKER_ENDPOINT,
    NODE,
    SID,
    Pair,
    client_endpoint,
    genuine_reattach,
    lone_client,
    lone_gateway,
    valid_reattach,
)
from tests.policies import ONE_SWITCH_A_MINUTE, SHORT_RECOVERY_POLICY

P1, P2, P3 = PathId(1), PathId(2), PathId(3)


def kinds(events: list[EmitEvent], kind: EventKind) -> list[EmitEvent]:
    return [e for e in events if e.kind is kind]


def test_handshake_binds_both_sides_at_version_one() -> None:
    pair = Pair.start()
    assert pair.client.record.state is S.ATTACHED
    assert pair.gateway.record.state is S.ATTACHED
    assert pair.client.record.version == 1
    assert pair.gateway.record.version == 1
    assert pair.gateway.record.binding == Binding(path=P1, endpoint=client_endpoint(P1))


def test_link_down_switches_to_next_priority_path_at_once() -> None:
    pair = Pair.start()
    pair.run(1.0)
    pair.set_link(1, up=False)
    # LINK_DOWN acts without waiting for a probe timeout: same `now`.
    assert pair.client.record.binding is not None
    assert pair.client.record.binding.path == P2
    assert pair.gateway.record.binding == Binding(path=P2, endpoint=client_endpoint(P2))
    switch = kinds(pair.events("client"), EventKind.TRANSPORT_SWITCH)[-1]
    assert switch.reason is R.LINK_DOWN
    assert switch.t == 1.0
    assert pair.client.record.session_id == pair.gateway.record.session_id


def test_blackhole_detected_by_missed_probes_within_policy_bound() -> None:
    policy = Policy()
    pair = Pair.start(policy=policy)
    pair.run(1.0)
    pair.blackhole(1)
    pair.run(1.0)
    switch = kinds(pair.events("client"), EventKind.TRANSPORT_SWITCH)[-1]
    assert switch.reason in (R.MISSED_PROBES, R.LOSS_ABOVE_THRESHOLD)
    assert switch.t - 1.0 <= policy.death_detection_bound_ms / 1000.0 + 1e-9
    assert pair.gateway.record.binding is not None and pair.gateway.record.binding.path == P2


def test_returns_to_preferred_path_only_after_return_dwell() -> None:
    policy = Policy()
    pair = Pair.start(policy=policy)
    pair.run(1.0)
    pair.set_link(1, up=False)
    pair.run(3.0)
    pair.set_link(1, up=True)
    pair.run(10.0)
    healthy_again = [
        e
        for e in kinds(pair.events("client"), EventKind.PATH_HEALTH)
        if e.detail("path") == "p1" and e.detail("verdict") == "HEALTHY" and e.t > 4.0
    ]
    assert len(healthy_again) == 1
    switches = kinds(pair.events("client"), EventKind.TRANSPORT_SWITCH)
    back = switches[-1]
    assert back.reason is R.PREFERRED_PATH_RESTORED and back.detail("to_path") == "p1"
    dwell = policy.return_dwell_ms / 1000.0
    # The first probe tick at or after healthy_since + return_dwell, and not one tick earlier.
    assert 0 <= back.t - (healthy_again[0].t + dwell) < policy.probe_interval_ms / 1000.0 + 1e-9
    assert len(switches) == 2


def test_all_paths_dead_recovery_window_then_degraded_then_terminated() -> None:
    pair = Pair.start(policy=SHORT_RECOVERY_POLICY)
    pair.run(0.5)
    for p in (1, 2, 3):
        pair.blackhole(p)
    pair.run(10.0)
    states = [e.detail("to_state") for e in kinds(pair.events("client"), EventKind.STATE_CHANGE)]
    assert states[-3:] == ["RECOVERING", "DEGRADED", "TERMINATED"]
    changes = kinds(pair.events("client"), EventKind.STATE_CHANGE)
    recovering_at = next(e.t for e in changes if e.detail("to_state") == "RECOVERING")
    degraded_at = next(e.t for e in changes if e.detail("to_state") == "DEGRADED")
    terminated = changes[-1]
    assert degraded_at - recovering_at == 1.0
    assert terminated.reason is R.TRANSPORT_LOSS_TTL_EXPIRED
    assert terminated.t - recovering_at == 5.0
    assert isinstance(pair.client_log[-1], Terminate)


def test_storm_of_link_flaps_ends_in_degraded_not_endless_switching() -> None:
    policy = attrs.evolve(Policy(), max_switches_per_minute=3, min_dwell_ms=0)
    pair = Pair.start(policy=policy, paths=((1, 10), (2, 20)))
    pair.run(0.5)
    pair.flap_active(6, down_s=0.5, up_s=0.5)
    switches = kinds(pair.events("client"), EventKind.TRANSPORT_SWITCH)
    assert len(switches) == 3
    assert pair.client.record.state is S.DEGRADED
    assert kinds(pair.events("client"), EventKind.SWITCH_DENIED)


def test_degraded_clears_when_the_rate_window_has_room_again() -> None:
    # The loss TTL outlasts the rate window, so the session survives its penalty.
    policy = attrs.evolve(Policy(), max_switches_per_minute=1, min_dwell_ms=0, transport_loss_ttl_ms=90_000)
    pair = Pair.start(policy=policy, paths=((1, 10), (2, 20)))
    pair.run(0.5)
    pair.set_link(1, up=False)  # switch 1 -> 2 at t=0.5
    pair.run(0.5)
    pair.set_link(1, up=True)
    pair.run(0.5)
    pair.blackhole(2)
    pair.run(1.0)  # needs a switch, rate says no -> DEGRADED, and the dead binding is released
    assert pair.client.record.state is S.DEGRADED
    pair.blackhole(2, on=False)
    pair.run(60.0)
    assert pair.client.record.state is S.ATTACHED


def test_replayed_reattach_from_another_address_changes_nothing() -> None:
    pair = Pair.start()
    pair.run(1.0)
    pair.set_link(1, up=False)
    before = pair.gateway.record
    actions = pair.replay_captured(-1, endpoint=ATTACKER_ENDPOINT)
    assert pair.gateway.record == before
    assert not any(isinstance(a, (BindTransport, ReleaseTransport, SendReattachAck)) for a in actions)
    security = [a for a in actions if isinstance(a, EmitEvent)]
    assert [e.kind for e in security] == [EventKind.SECURITY_EVENT]
    assert security[0].reason is R.REPLAYED_NONCE
    assert not any(isinstance(a, SendReattachReject) for a in actions)  # never answer a replay


def _gateway_bound(policy: Policy | None = None) -> GatewaySession:
    return lone_gateway(policy, held_revision=7)


def test_gateway_rejections_never_mutate() -> None:
    other = SessionId(bytes(16))
    cases = {
        R.DECRYPT_FAILED: dict(proof_valid=False),
        R.SESSION_MISMATCH: dict(session_id=other),
        R.REPLAYED_NONCE: dict(nonce=0),
        R.STALE_TIMESTAMP: dict(client_ts_ms=Policy().freshness_window_ms + 1),
        R.NOT_OWNER: dict(ownership=OwnershipRecord(session_id=SID, owner="gw-b", revision=7)),
        R.OWNERSHIP_AMBIGUOUS: dict(ownership=None),
        R.STALE_VERSION: dict(expected_version=0),
    }
    for reason, override in cases.items():
        gw = _gateway_bound()
        before = (gw.record, gw.last_nonce, gw.clock_offset_ms)
        actions = gw.handle(valid_reattach(gw, **override), now=0.0)
        assert (gw.record, gw.last_nonce, gw.clock_offset_ms) == before, reason
        emitted = [a for a in actions if isinstance(a, EmitEvent)]
        assert emitted and emitted[0].reason is reason


def test_gateway_revision_mismatch_is_ambiguous() -> None:
    gw = _gateway_bound()
    record = OwnershipRecord(session_id=gw.record.session_id, owner=NODE, revision=8)
    actions = gw.handle(valid_reattach(gw, ownership=record), now=0.0)
    assert [a.reason for a in actions if isinstance(a, EmitEvent)] == [R.OWNERSHIP_AMBIGUOUS]


def test_gateway_accept_binds_new_and_releases_old_in_one_step() -> None:
    gw = _gateway_bound()
    actions = genuine_reattach(gw, valid_reattach(gw), now=0.0)
    binds = [a for a in actions if isinstance(a, (BindTransport, ReleaseTransport))]
    assert binds == [
        ReleaseTransport(Binding(path=P1, endpoint=client_endpoint(P1))),
        BindTransport(Binding(path=P2, endpoint=client_endpoint(P2))),
    ]
    assert gw.record.version == 2
    ack = [a for a in actions if isinstance(a, SendReattachAck)]
    assert ack and ack[0].new_version == 2
    assert gw.accepts_data_from(client_endpoint(P2))
    assert not gw.accepts_data_from(client_endpoint(P1))


def test_gateway_same_binding_is_acked_without_a_transition() -> None:
    gw = _gateway_bound()
    actions = gw.handle(valid_reattach(gw, path=P1), now=0.0)
    assert gw.record.version == 1
    assert [type(a) for a in actions] == [SendReattachAck]


def test_gateway_rate_limit_rejects_and_degrades() -> None:
    gw = _gateway_bound(ONE_SWITCH_A_MINUTE)
    genuine_reattach(gw, valid_reattach(gw), now=1.0)
    assert gw.record.binding is not None and gw.record.binding.path == P2
    actions = gw.handle(valid_reattach(gw, path=P3, client_ts_ms=2000), now=2.0)
    assert gw.record.state is S.DEGRADED
    rejects = [a for a in actions if isinstance(a, SendReattachReject)]
    assert rejects[0].reason is R.RATE_LIMITED and rejects[0].current_version == gw.record.version
    assert gw.record.binding is not None and gw.record.binding.path == P2
    for t in (25.0, 50.0, 60.5):  # keep the binding alive (spec 6 silence bound)
        gw.handle(ev.PacketAuthenticated(endpoint=client_endpoint(P2), path=P2), now=t)
    assert gw.record.state is S.DEGRADED
    gw.handle(ev.TimerFired(), now=61.0)
    assert gw.record.state is S.ATTACHED


def test_gateway_silence_releases_binding_then_terminates() -> None:
    policy = Policy()
    gw = _gateway_bound()
    ttl = policy.transport_loss_ttl_ms / 1000.0
    assert gw.next_deadline() == ttl
    gw.handle(ev.TimerFired(), now=ttl)
    assert gw.record.state is S.RECOVERING and gw.record.binding is None
    gw.handle(ev.TimerFired(), now=ttl + policy.max_recovery_window_ms / 1000.0)
    assert gw.record.state is S.DEGRADED
    gw.handle(ev.TimerFired(), now=2 * ttl)
    assert gw.record.state is S.TERMINATED


def test_session_ttl_terminates_with_reason() -> None:
    policy = Policy()
    pair = Pair.start(policy=policy)
    pair.advance(policy.session_ttl_s)
    last = pair.events("client")[-1]
    assert last.reason is R.SESSION_TTL_EXPIRED and last.detail("to_state") == "TERMINATED"
    assert pair.gateway.record.state is S.TERMINATED


def test_birth_without_confirmation_terminates_after_loss_ttl() -> None:
    policy = Policy()
    gw = lone_gateway(policy, bound=False)
    assert gw.next_deadline() == policy.transport_loss_ttl_ms / 1000.0
    actions = gw.handle(ev.TimerFired(), now=policy.transport_loss_ttl_ms / 1000.0)
    assert gw.record.state is S.TERMINATED
    assert [a.reason for a in actions if isinstance(a, Terminate)] == [R.TRANSPORT_LOSS_TTL_EXPIRED]


def test_close_sends_close_and_terminates_once() -> None:
    pair = Pair.start()
    actions = pair._client(ev.CloseRequested())
    assert pair.client.terminated
    assert any(isinstance(a, Terminate) for a in actions)
    assert pair._client(ev.CloseRequested()) == []
    assert pair.client.counters["inputs_after_termination"] == 1


def test_operator_pin_switches_with_reason_and_holds() -> None:
    pair = Pair.start()
    pair.run(1.0)
    pair._client(ev.PinRequested(path=P3))
    assert pair.client.record.binding is not None and pair.client.record.binding.path == P3
    assert kinds(pair.events("client"), EventKind.TRANSPORT_SWITCH)[-1].reason is R.OPERATOR_PIN
    pair.run(10.0)  # the preferred path is healthy, but the pin holds
    assert pair.client.record.binding.path == P3
    pair._client(ev.PinRequested(path=None))
    pair.run(1.0)
    assert pair.client.record.binding.path == P1


def test_every_operator_action_is_logged_with_who_asked_and_changes_no_version() -> None:
    pair = Pair.start()
    pair.run(1.0)
    version = pair.client.record.version
    pin = pair._client(ev.PinRequested(path=P3, by="uid 1000"))
    first = [a for a in pin if isinstance(a, EmitEvent)][0]
    # The request is logged before the switch it causes, at the version it was asked at.
    assert (first.kind, first.reason, first.version) == (EventKind.OPERATOR_ACTION, R.OPERATOR_PIN, version)
    assert (first.detail("by"), first.detail("path"), first.detail("applied")) == ("uid 1000", "p3", True)
    reevaluate = kinds(pair._client(ev.ReevaluateRequested(by="ui")), EventKind.OPERATOR_ACTION)
    assert [(e.reason, e.detail("by")) for e in reevaluate] == [(R.OPERATOR_REEVALUATE, "ui")]
    unpin = kinds(pair._client(ev.PinRequested(path=None, by="uid 0")), EventKind.OPERATOR_ACTION)
    assert [(e.reason, e.detail("path"), e.detail("applied")) for e in unpin] == [(R.OPERATOR_UNPIN, None, True)]
    assert pair.client.pinned is None


def test_the_agents_own_reevaluation_is_not_an_operator_action() -> None:
    pair = Pair.start()
    pair.run(1.0)
    assert kinds(pair._client(ev.ReevaluateRequested()), EventKind.OPERATOR_ACTION) == []


def test_a_pin_on_a_path_that_vanished_is_logged_as_not_applied_and_keeps_the_old_pin() -> None:
    pair = Pair.start()
    pair.run(1.0)
    pair._client(ev.PinRequested(path=P2, by="ui"))
    pair._client(ev.PathRemoved(path=P3))
    logged = kinds(pair._client(ev.PinRequested(path=P3, by="ui")), EventKind.OPERATOR_ACTION)
    assert [(e.detail("path"), e.detail("applied")) for e in logged] == [("p3", False)]
    assert pair.client.pinned == P2


def test_an_operator_disconnect_is_logged_before_the_explicit_close() -> None:
    pair = Pair.start()
    pair.run(1.0)
    actions = pair.close("client", ev.CloseRequested(by="uid 1000", action=R.OPERATOR_DISCONNECT))
    emitted = [a for a in actions if isinstance(a, EmitEvent)]
    assert [(e.kind, e.reason) for e in emitted] == [
        (EventKind.OPERATOR_ACTION, R.OPERATOR_DISCONNECT),
        (EventKind.STATE_CHANGE, R.LOCAL_CLOSE),
    ]
    assert [a.reason for a in actions if isinstance(a, SendClose)] == [R.LOCAL_CLOSE]
    assert kinds(pair.events("gateway"), EventKind.STATE_CHANGE)[-1].detail("peer_reason") == "LOCAL_CLOSE"


def test_a_removed_peer_ends_with_its_own_reason_on_both_sides() -> None:
    pair = Pair.start()
    pair.run(1.0)
    actions = pair.close("gateway", ev.CloseRequested(reason=R.PEER_REMOVED))
    assert [a.reason for a in actions if isinstance(a, SendClose)] == [R.PEER_REMOVED]
    assert kinds(pair.events("gateway"), EventKind.STATE_CHANGE)[-1].reason is R.PEER_REMOVED
    client_end = kinds(pair.events("client"), EventKind.STATE_CHANGE)[-1]
    assert (client_end.reason, client_end.detail("peer_reason")) == (R.PEER_CLOSE, "PEER_REMOVED")


def test_a_close_with_a_reason_that_is_not_a_close_reason_still_ends_explicitly() -> None:
    pair = Pair.start()
    actions = pair._client(ev.CloseRequested(reason=R.SESSION_TTL_EXPIRED))
    assert [a.reason for a in actions if isinstance(a, Terminate)] == [R.LOCAL_CLOSE]
    assert pair.client.counters["unknown_close_reasons"] == 1


def test_lost_ack_resynchronises_through_stale_version_and_already_bound() -> None:
    pair = Pair.start()
    pair.run(1.0)
    client, gateway = pair.client, pair.gateway
    # The gateway accepts a REATTACH for path 2 but the ACK is lost on the way back.
    nonce_actions = client.handle(ev.LinkChanged(path=P1, up=False), now=pair.now)
    pair.links[P1].up = False
    sends = [a for a in nonce_actions if isinstance(a, SendReattach)]
    assert sends
    genuine_reattach(gateway, pair.reattach_request(sends[0]), now=pair.now)
    assert gateway.record.binding is not None and gateway.record.binding.path == P2
    # The client times out, retries with the old expected version, resyncs, and converges.
    pair.run(2.0)
    assert client.record.binding is not None and client.record.binding.path == P2
    assert client.record.state is S.ATTACHED
    assert gateway.record.binding is not None and gateway.record.binding.path == P2


def test_invalid_transition_is_counted_and_changes_nothing() -> None:
    client = ClientSession(policy=Policy(), session_id=SessionId(bytes(16)), now=0.0)
    before = client.record
    # BIRTH has no PATH_HEALTHY_AGAIN row.
    assert client._transition(R.PATH_HEALTHY_AGAIN, 0.0) == []
    assert client.record == before
    assert client.counters["invalid_transitions"] == 1


def _probe(client: ClientSession, seq: int, t: float, *, bound: PathId | None, version: int = 1) -> list:  # type: ignore[type-arg]
    actions = client.handle(ev.ProbeSent(path=P1, seq=seq), now=t)
    actions += client.handle(ev.ProbeSent(path=P2, seq=seq), now=t)
    actions += client.handle(ev.ProbeAcked(path=P2, seq=seq, gateway_version=version, gateway_bound_path=bound), now=t + 0.001)
    return actions + client.handle(
        ev.ProbeAcked(path=P1, seq=seq, gateway_version=version, gateway_bound_path=bound), now=t + 0.002
    )


def test_gateway_bound_elsewhere_leads_to_a_rebind_on_the_same_path() -> None:
    """A NAT rebinding: probes are answered, but the gateway says they come from an unbound endpoint."""
    client = lone_client()
    for seq in range(1, 4):
        assert not [a for a in _probe(client, seq, seq * 0.05, bound=P1) if type(a).__name__ == "SendReattach"]
    policy = Policy()
    sent = []
    for seq in range(4, 4 + policy.dead_after_missed_probes):
        sent += [a for a in _probe(client, seq, seq * 0.05, bound=None) if type(a).__name__ == "SendReattach"]
    assert [(s.path, s.expected_version) for s in sent] == [(P1, 1)]  # exactly one, on the active path
    actions = client.handle(ev.ReattachAcked(path=P1, nonce=sent[0].nonce, new_version=2), now=0.5)
    switch = [a for a in actions if isinstance(a, EmitEvent) and a.kind is EventKind.TRANSPORT_SWITCH]
    assert [(s.reason, s.detail("from_path"), s.detail("to_path")) for s in switch] == [(R.ENDPOINT_CHANGED, "p1", "p1")]
    assert not any(isinstance(a, (BindTransport, ReleaseTransport)) for a in actions)  # same local binding
    assert client.record.version == 2 and client.record.state is S.ATTACHED


def test_acks_older_than_the_known_gateway_version_do_not_count_as_disowning() -> None:
    client = lone_client()
    client.gateway_version = 5  # e.g. learnt from a REATTACH_ACK; these acks predate it
    for seq in range(1, 10):
        actions = _probe(client, seq, seq * 0.05, bound=None, version=4)
        assert not [a for a in actions if type(a).__name__ == "SendReattach"]


def test_a_readdressed_active_path_reattaches_on_itself_with_endpoint_changed() -> None:
    """DHCP gave the active interface a new address: the gateway's binding names the old endpoint."""
    client = lone_client()
    for seq in range(1, 4):
        _probe(client, seq, seq * 0.05, bound=P1)
    actions = client.handle(ev.PathReaddressed(path=P1), now=0.3)
    sent = [a for a in actions if isinstance(a, SendReattach)]
    assert [(s.path, s.expected_version) for s in sent] == [(P1, 1)]  # at once, no probe has to fail first
    acked = client.handle(ev.ReattachAcked(path=P1, nonce=sent[0].nonce, new_version=2), now=0.31)
    switch = kinds([a for a in acked if isinstance(a, EmitEvent)], EventKind.TRANSPORT_SWITCH)
    assert [(s.reason, s.detail("from_path"), s.detail("to_path")) for s in switch] == [(R.ENDPOINT_CHANGED, "p1", "p1")]
    # Confirmed: no second reattach.
    assert not [a for a in client.handle(ev.TimerFired(), now=0.4) if isinstance(a, SendReattach)]


def test_a_readdressed_standby_path_changes_no_binding() -> None:
    client = lone_client()
    for seq in range(1, 4):
        _probe(client, seq, seq * 0.05, bound=P1)
    actions = client.handle(ev.PathReaddressed(path=P2), now=0.3)
    assert not [a for a in actions if isinstance(a, SendReattach)]
    assert client.handle(ev.PathReaddressed(path=PathId(9)), now=0.3) == []
    assert client.counters["unknown_path_inputs"] == 1


def test_removing_the_active_path_is_its_link_death() -> None:
    client = lone_client()
    for seq in range(1, 4):
        _probe(client, seq, seq * 0.05, bound=P1)
    actions = client.handle(ev.PathRemoved(path=P1), now=0.3)
    assert any(isinstance(a, ReleaseTransport) and a.binding.path == P1 for a in actions)
    changes = kinds([a for a in actions if isinstance(a, EmitEvent)], EventKind.STATE_CHANGE)
    assert changes[0].reason is R.LINK_DOWN
    sent = [a for a in actions if isinstance(a, SendReattach)]
    assert [s.path for s in sent] == [P2]  # the session moves to the remaining path at once
