"""Status reports: snapshot -> JSON-able dict -> aligned text, compared with exact strings.

The golden snapshots are built from the attrs records directly, so the
expected text does not move when health arithmetic or policy defaults do;
one test drives a real ClientSession to check the mapping stays in step with
the core's snapshot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType

import attrs
import pytest

from jvpn_trio.core import events as ev
from jvpn_trio.core.health import PathStats, PathVerdict, Verdict
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import (
    ClientSession,
    ClientSnapshot,
    GatewaySnapshot,
    PathSnapshot,
    PendingReattach,
    SessionRecord,
)
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from jvpn_trio.drivers.client import ClientStatistics
from jvpn_trio.drivers.routes import RoutingStatistics
from jvpn_trio.ui.status import client_status, gateway_status, render_status_text, statistics_counters

P1, P2, P3 = PathId(1), PathId(2), PathId(3)
SID = SessionId(bytes(range(16)))
SID_B = SessionId(bytes(range(16, 32)))
E1 = ("192.0.2.1", 51820)
E2 = ("192.0.2.2", 51820)
E3 = ("2001:db8::3", 51820)
FINGERPRINT = "0123456789abcdef"


def stats(path: PathId, **overrides: object) -> PathStats:
    base: dict[str, object] = dict(
        path=path,
        srtt_ms=None,
        jitter_ms=None,
        loss_pct=0.0,
        last_delivery=None,
        consecutive_missed=0,
        probes_sent=0,
        probes_acked=0,
        probes_lost=0,
        link_up=True,
        rtt_history_ms=(),
        healthy_since=None,
    )
    base.update(overrides)
    return PathStats(**base)  # type: ignore[arg-type]


def record(**overrides: object) -> SessionRecord:
    base: dict[str, object] = dict(
        session_id=SID,
        state=S.VOLATILE,
        version=4,
        binding=Binding(path=P1, endpoint=E1),
        created_at=100.0,
        unbound_since=None,
        recovering_since=None,
        bound_since=101.0,
        last_path=None,
        switch_times=(130.0,),
    )
    base.update(overrides)
    return SessionRecord(**base)  # type: ignore[arg-type]


def client_snapshot() -> ClientSnapshot:
    return ClientSnapshot(
        now=142.5,
        record=record(),
        policy_fingerprint=FINGERPRINT,
        max_switches_per_minute=6,
        switches_last_minute=1,
        gateway_version=4,
        paths=(
            PathSnapshot(
                path=P2,
                priority=20,
                endpoint=E2,
                verdict=PathVerdict(P2, Verdict.HEALTHY, R.WITHIN_THRESHOLDS),
                stats=stats(P2, srtt_ms=31.04, jitter_ms=2.25, loss_pct=0.0, last_delivery=142.45),
                active=False,
                pinned=False,
            ),
            PathSnapshot(
                path=P1,
                priority=10,
                endpoint=E1,
                verdict=PathVerdict(P1, Verdict.IMPAIRED, R.LOSS_ABOVE_THRESHOLD, 25.0, 20.0),
                stats=stats(
                    P1,
                    srtt_ms=12.3456,
                    jitter_ms=0.04,
                    loss_pct=25.0,
                    last_delivery=142.3,
                    consecutive_missed=1,
                ),
                active=True,
                pinned=False,
            ),
            PathSnapshot(
                path=P3,
                priority=30,
                endpoint=E3,
                verdict=PathVerdict(P3, Verdict.DEAD, R.LINK_DOWN),
                stats=stats(P3, link_up=False),
                active=False,
                pinned=False,
            ),
        ),
        pinned=None,
        pending=PendingReattach(path=P2, nonce=3, sent_at=142.46, cause=R.LOSS_ABOVE_THRESHOLD),
        recovery_deadline=None,
        unbound_deadline=None,
        counters=(("reattach_sent", 3), ("stray_reattach_answers", 1)),
    )


def gateway_snapshots() -> list[GatewaySnapshot]:
    return [
        GatewaySnapshot(
            now=50.0,
            record=record(session_id=SID_B, state=S.RECOVERING, version=7, binding=None, created_at=10.0),
            policy_fingerprint=FINGERPRINT,
            last_nonce=5,
            last_delivery=None,
            switches_last_minute=2,
            counters=(("reattach_rejected_stale_version", 2),),
        ),
        GatewaySnapshot(
            now=50.0,
            record=record(
                state=S.ATTACHED,
                version=3,
                binding=Binding(path=P1, endpoint=("198.51.100.1", 40001)),
                created_at=0.0,
            ),
            policy_fingerprint=FINGERPRINT,
            last_nonce=2,
            last_delivery=49.75,
            switches_last_minute=1,
            counters=(("packets_off_binding", 4), ("reattach_rejected_stale_version", 1)),
        ),
    ]


EXPECTED_CLIENT_TEXT = """\
jvpn-trio client
  session   000102030405060708090a0b0c0d0e0f
  state     VOLATILE (version 4, gateway version 4)
  binding   p1@192.0.2.1:51820
  pinned    -
  switches  1 of 6 allowed in the last minute
  recovery  -
  reattach  p2 nonce 3 (LOSS_ABOVE_THRESHOLD), sent 40.0 ms ago
  age       42.500 s
  policy    0123456789abcdef

PATH  PRI  ENDPOINT             FLAGS   LINK  VERDICT   REASON                SRTT ms  JITTER ms  LOSS %
p1     10  192.0.2.1:51820      active  up    IMPAIRED  LOSS_ABOVE_THRESHOLD     12.3        0.0    25.0
p2     20  192.0.2.2:51820      -       up    HEALTHY   WITHIN_THRESHOLDS        31.0        2.2     0.0
p3     30  [2001:db8::3]:51820  -       down  DEAD      LINK_DOWN                   -          -     0.0

counters
  event_sink.dropped_full         7
  session.reattach_sent           3
  session.stray_reattach_answers  1"""


EXPECTED_GATEWAY_TEXT = """\
jvpn-trio gateway
  node      gw-a
  sessions  2 (ATTACHED 1, RECOVERING 1)

SESSION                           STATE       VER  BINDING                NONCE  SWITCHES/MIN  LAST DELIVERY s AGO
000102030405060708090a0b0c0d0e0f  ATTACHED      3  p1@198.51.100.1:40001      2             1                0.250
101112131415161718191a1b1c1d1e1f  RECOVERING    7  -                          5             2                    -

counters
  session.packets_off_binding              4
  session.reattach_rejected_stale_version  3
  udp.bad_frames                           9"""


# -- client -----------------------------------------------------------------------------


def test_client_text_is_exact() -> None:
    status = client_status(client_snapshot(), counters={"event_sink.dropped_full": 7})
    assert render_status_text(status) == EXPECTED_CLIENT_TEXT


def test_client_status_fields_and_rounding() -> None:
    status = client_status(client_snapshot(), interfaces={P1: ("eth0", "ethernet"), P2: ("wlan0", "wifi")})
    assert status["role"] == "client"
    assert status["session"] == SID.hex
    assert (status["state"], status["version"], status["gateway_version"]) == ("VOLATILE", 4, 4)
    assert (status["active_path"], status["binding"], status["pinned_path"]) == ("p1", "p1@192.0.2.1:51820", None)
    assert (status["switches_last_minute"], status["max_switches_per_minute"]) == (1, 6)
    assert status["recovery_deadline_in_s"] is None
    assert status["pending_reattach"] == {"path": "p2", "nonce": 3, "cause": "LOSS_ABOVE_THRESHOLD", "age_ms": 40.0}
    assert [p["path"] for p in status["paths"]] == ["p1", "p2", "p3"]  # by path id, not input order
    p1, p2, p3 = status["paths"]
    assert p1 == {
        "path": "p1",
        "interface": "eth0",
        "kind": "ethernet",
        "priority": 10,
        "endpoint": "192.0.2.1:51820",
        "active": True,
        "pinned": False,
        "link_up": True,
        "verdict": "IMPAIRED",
        "reason": "LOSS_ABOVE_THRESHOLD",
        "measured": 25.0,
        "threshold": 20.0,
        "srtt_ms": 12.3,
        "jitter_ms": 0.0,
        "loss_pct": 25.0,
        "consecutive_missed": 1,
        "last_delivery_ago_s": 0.2,
    }
    assert p2["last_delivery_ago_s"] == 0.05
    assert (p2["interface"], p2["kind"], p3["interface"], p3["kind"]) == ("wlan0", "wifi", None, None)  # p3 left
    assert (p3["srtt_ms"], p3["jitter_ms"], p3["measured"], p3["last_delivery_ago_s"]) == (None, None, None, None)
    assert p3["endpoint"] == "[2001:db8::3]:51820"
    assert status["counters"] == {"session.reattach_sent": 3, "session.stray_reattach_answers": 1}


def test_status_is_strict_json_and_renders_the_same_after_a_round_trip() -> None:
    status = client_status(client_snapshot(), counters={"event_sink.dropped_full": 7})
    decoded = json.loads(json.dumps(status, allow_nan=False))
    assert decoded == status
    assert render_status_text(decoded) == EXPECTED_CLIENT_TEXT


def test_deadlines_are_shown_as_time_remaining() -> None:
    snap = attrs.evolve(
        client_snapshot(),
        record=record(state=S.RECOVERING, binding=None, recovering_since=142.0, unbound_since=142.0),
        recovery_deadline=143.75,
        unbound_deadline=145.0,
        pending=None,
        pinned=P2,
    )
    status = client_status(snap)
    assert (status["recovery_deadline_in_s"], status["unbound_deadline_in_s"]) == (1.25, 2.5)
    assert (status["binding"], status["active_path"], status["pinned_path"]) == (None, None, "p2")
    lines = render_status_text(status).splitlines()
    assert "  binding   -" in lines
    assert "  pinned    p2" in lines
    assert "  recovery  deadline in 1.250 s" in lines
    assert "  reattach  -" in lines


def test_non_finite_and_negative_zero_floats_are_made_json_safe() -> None:
    snap = client_snapshot()
    weird = attrs.evolve(
        snap.paths[0],
        verdict=PathVerdict(P2, Verdict.IMPAIRED, R.LATENCY_ABOVE_THRESHOLD, math.inf, 200.0),
        stats=stats(P2, srtt_ms=math.nan, jitter_ms=-0.00001, loss_pct=0.0),
    )
    status = client_status(attrs.evolve(snap, paths=(weird,)))
    (p2,) = status["paths"]
    assert (p2["measured"], p2["srtt_ms"], p2["jitter_ms"]) == (None, None, 0.0)
    assert math.copysign(1.0, p2["jitter_ms"]) == 1.0
    json.dumps(status, allow_nan=False)


def test_counter_names_may_not_collide() -> None:
    with pytest.raises(ValueError, match="session.reattach_sent"):
        client_status(client_snapshot(), counters={"session.reattach_sent": 1})


def test_driven_client_session_maps_onto_its_status() -> None:
    policy = Policy()
    client = ClientSession(policy=policy, session_id=SID, now=0.0)
    client.handle(ev.PathAdded(path=P1, priority=10, endpoint=E1), now=0.0)
    client.handle(ev.PathAdded(path=P2, priority=20, endpoint=E2, link_up=False), now=0.0)
    handshake = ev.HandshakeCompleted(session_id=SID, binding=Binding(path=P1, endpoint=E1), gateway_version=1)
    client.handle(handshake, now=0.0)
    for seq, (sent, acked) in enumerate([(0.1, 0.112), (0.2, 0.216), (0.3, 0.312)]):
        client.handle(ev.ProbeSent(path=P1, seq=seq), now=sent)
        client.handle(ev.ProbeAcked(path=P1, seq=seq, gateway_version=1, gateway_bound_path=P1), now=acked)
    snap = client.snapshot(now=0.4)
    status = client_status(snap)

    assert status["state"] == snap.record.state.value == "ATTACHED"
    assert status["version"] == snap.record.version
    assert status["policy"] == policy.fingerprint
    assert status["active_path"] == "p1"
    by_path = {p["path"]: p for p in status["paths"]}
    p1_snap = next(p for p in snap.paths if p.path == P1)
    assert by_path["p1"]["verdict"] == p1_snap.verdict.verdict.value
    assert p1_snap.stats.srtt_ms is not None
    assert by_path["p1"]["srtt_ms"] == round(p1_snap.stats.srtt_ms, 1)
    assert by_path["p1"]["last_delivery_ago_s"] == 0.088
    p2 = by_path["p2"]
    assert (p2["link_up"], p2["verdict"], p2["reason"]) == (False, "DEAD", "LINK_DOWN")
    text = render_status_text(status)
    assert text.splitlines()[0] == "jvpn-trio client"
    assert f"  policy    {policy.fingerprint}" in text.splitlines()


# -- gateway ----------------------------------------------------------------------------


def test_gateway_text_is_exact() -> None:
    status = gateway_status(gateway_snapshots(), node_id="gw-a", counters={"udp.bad_frames": 9})
    assert render_status_text(status) == EXPECTED_GATEWAY_TEXT


def test_gateway_status_fields() -> None:
    status = gateway_status(gateway_snapshots(), node_id="gw-a")
    assert (status["role"], status["node"], status["session_count"]) == ("gateway", "gw-a", 2)
    assert status["states"] == {"ATTACHED": 1, "RECOVERING": 1}
    first, second = status["sessions"]
    assert first == {
        "session": SID.hex,
        "state": "ATTACHED",
        "version": 3,
        "binding": "p1@198.51.100.1:40001",
        "policy": FINGERPRINT,
        "session_age_s": 50.0,
        "last_nonce": 2,
        "last_delivery_ago_s": 0.25,
        "switches_last_minute": 1,
        "counters": {"session.packets_off_binding": 4, "session.reattach_rejected_stale_version": 1},
    }
    assert (second["session"], second["binding"], second["last_delivery_ago_s"]) == (SID_B.hex, None, None)
    assert status["counters"] == {"session.packets_off_binding": 4, "session.reattach_rejected_stale_version": 3}


def test_empty_gateway_renders() -> None:
    text = render_status_text(gateway_status([], node_id=None))
    assert text == "jvpn-trio gateway\n  node      -\n  sessions  0\n\n(no sessions)\n\ncounters\n  (none)"


# -- statistics records ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RuntimeCounts:
    """A stand-in for a runtime's statistics record: counts, and counts by reason."""

    stray_data: int = 0
    send_no_port: int = 0
    terminated: Mapping[R, int] = attrs.field(factory=dict, hash=False)


def test_statistics_are_flattened_by_field_and_reason_without_zeros() -> None:
    record = ClientStatistics(
        tx_bytes=1500,
        tx_packets=1,
        handshake_sent=2,
        handshake=MappingProxyType({R.BAD_MAC: 1}),
        drop=MappingProxyType({R.REPLAYED_COUNTER: 4, R.MALFORMED: 0}),
    )
    assert statistics_counters(record) == {
        "tx_bytes": 1500,
        "tx_packets": 1,
        "handshake_sent": 2,
        "handshake_bad_mac": 1,
        "drop_replayed_counter": 4,
    }
    routing = RoutingStatistics(install_failed=MappingProxyType({"wlan0": 3}), lines_suppressed=2)
    assert statistics_counters(routing, prefix="routes.") == {
        "routes.install_failed_wlan0": 3,
        "routes.lines_suppressed": 2,
    }
    assert statistics_counters(None) == {} == statistics_counters(ClientStatistics())


def test_statistics_must_be_attrs_counts_with_distinct_names() -> None:
    with pytest.raises(TypeError, match="attrs record"):
        statistics_counters({"tx_bytes": 1})

    @attrs.frozen
    class Odd:
        ratio: float = 0.5

    with pytest.raises(TypeError, match="ratio"):
        statistics_counters(Odd())

    @attrs.frozen
    class Clash:
        drop_malformed: int = 1
        drop: Mapping[R, int] = attrs.field(factory=lambda: {R.MALFORMED: 1}, hash=False)

    with pytest.raises(ValueError, match="drop_malformed"):
        statistics_counters(Clash())


def test_client_report_merges_statistics_and_extra_counters() -> None:
    record = ClientStatistics(rx_bytes=9, drop=MappingProxyType({R.STRAY_PACKET: 1}))
    status = client_status(client_snapshot(), statistics=record, counters={"routes.remove_failed": 1})
    assert status["counters"] == {
        "drop_stray_packet": 1,
        "routes.remove_failed": 1,
        "rx_bytes": 9,
        "session.reattach_sent": 3,
        "session.stray_reattach_answers": 1,
    }
    with pytest.raises(ValueError, match="rx_bytes"):
        client_status(client_snapshot(), statistics=record, counters={"rx_bytes": 1})


def test_gateway_report_takes_any_statistics_record() -> None:
    record = RuntimeCounts(stray_data=2, terminated={R.PEER_CLOSE: 1})
    status = gateway_status(gateway_snapshots(), node_id="gw-a", statistics=record)
    assert status["counters"] == {
        "session.packets_off_binding": 4,
        "session.reattach_rejected_stale_version": 3,
        "stray_data": 2,
        "terminated_peer_close": 1,
    }
    both = gateway_status([], statistics=record, counters={"udp.bad_frames": 9})
    assert both["counters"] == {"stray_data": 2, "terminated_peer_close": 1, "udp.bad_frames": 9}
    json.dumps(status, allow_nan=False)


def test_unknown_role_renders_as_sorted_fields() -> None:
    assert render_status_text({"role": "relay", "b": None, "a": True}) == (
        "jvpn-trio relay\n  a     yes\n  b     -\n  role  relay"
    )


def test_between_sessions_the_client_reports_connecting() -> None:
    record = ClientStatistics(tx_dropped_unbound=4)
    status = client_status(None, statistics=record, counters={"routes.install_failed": 1}, sessions_started=1)
    assert status == {
        "role": "client",
        "session": None,
        "state": "CONNECTING",
        "sessions_started": 1,
        "paths": [],
        "counters": {"routes.install_failed": 1, "tx_dropped_unbound": 4},
    }
    json.dumps(status)
    text = render_status_text(status)
    assert "CONNECTING" in text and "sessions  1" in text


def test_between_sessions_the_paths_are_still_listed() -> None:
    interfaces = {PathId(2): ("wlan0", "wifi"), PathId(1): ("eth0", "ethernet")}
    status = client_status(None, sessions_started=3, interfaces=interfaces)
    assert status["paths"] == [
        {"path": "p1", "interface": "eth0", "kind": "ethernet"},
        {"path": "p2", "interface": "wlan0", "kind": "wifi"},
    ]
    render_status_text(status)


def test_a_live_session_reports_how_many_sessions_the_agent_started() -> None:
    status = client_status(client_snapshot(), sessions_started=2)
    assert (status["session"], status["state"], status["sessions_started"]) == (SID.hex, "VOLATILE", 2)
    assert "sessions_started" not in client_status(client_snapshot())
