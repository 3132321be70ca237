"""Status reports: snapshot -> JSON-able dict -> aligned text, compared with exact strings.

The golden snapshots are built from the attrs records directly, so the
expected text does not move when health arithmetic or policy defaults do;
one test drives a real ClientSession to check the mapping stays in step with
the core's snapshot.  The text renderer's own cases (replies from other
versions, units, a property test) are in ``test_status_text.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType

import ipaddress

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
from jvpn_trio.drivers.gateway import PeerStatus
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


def gateway_peers() -> list[PeerStatus]:
    """The snapshots above as the runtime publishes them: with their peers' names, addresses and bytes."""
    recovering, attached = gateway_snapshots()
    return [
        PeerStatus(
            snapshot=recovering,
            name="bob",
            public_key=bytes(range(32, 64)),
            address=ipaddress.IPv4Address("10.66.0.3"),
            address6=None,
            last_handshake=None,
            rx_packets=0,
            rx_bytes=0,
            tx_packets=0,
            tx_bytes=0,
        ),
        PeerStatus(
            snapshot=attached,
            name="alice",
            public_key=bytes(range(32)),
            address=ipaddress.IPv4Address("10.66.0.2"),
            address6=ipaddress.IPv6Address("fd6a:7670::2"),
            last_handshake=-13.25,  # 63.25 s before the snapshot
            rx_packets=1000,
            rx_bytes=1_268_000,
            tx_packets=2500,
            tx_bytes=3_620_000,
        ),
    ]


def full_client_status() -> dict[str, object]:
    return client_status(
        client_snapshot(),
        statistics=ClientStatistics(rx_bytes=1500, tx_bytes=3_145_728),
        counters={"event_sink.dropped_full": 7},
        sessions_started=2,
        interfaces={P1: ("eth0", "ethernet"), P2: ("wlan0", "wifi")},
        tunnel_address="10.66.0.2/24",
        tunnel_address6="fd6a:7670::2/64",
    )


def full_gateway_status() -> dict[str, object]:
    return gateway_status(
        gateway_peers(),
        node_id="gw-a",
        counters={"udp.bad_frames": 9},
        tunnel_address="10.66.0.1/24",
        tunnel_address6="fd6a:7670::1/64",
    )


EXPECTED_CLIENT_TEXT = """\
client: 000102030405060708090a0b0c0d0e0f
  state:            VOLATILE (version 4, gateway version 4)
  tunnel:           10.66.0.2/24, fd6a:7670::2/64
  sessions started: 2
  binding:          p1@192.0.2.1:51820
  pinned:           -
  switches:         1 of 6 allowed in the last minute
  recovery:         -
  reattach:         p2 nonce 3 (LOSS_ABOVE_THRESHOLD), sent 40 ms ago
  session age:      42 seconds
  transfer:         1.46 KiB received, 3.00 MiB sent
  policy:           0123456789abcdef

path: p1 (active)
  interface:        eth0 (ethernet)
  endpoint:         192.0.2.1:51820
  priority:         10
  probing:          active
  link:             up
  verdict:          IMPAIRED, LOSS_ABOVE_THRESHOLD (measured 25.0, threshold 20.0)
  rtt:              12.3 ms (jitter 0.0 ms)
  loss:             25.0% (1 missed in a row)
  last answer:      200 ms ago

path: p2
  interface:        wlan0 (wifi)
  endpoint:         192.0.2.2:51820
  priority:         20
  probing:          active
  link:             up
  verdict:          HEALTHY, WITHIN_THRESHOLDS
  rtt:              31.0 ms (jitter 2.2 ms)
  loss:             0.0%
  last answer:      50 ms ago

path: p3
  interface:        -
  endpoint:         [2001:db8::3]:51820
  priority:         30
  probing:          active
  link:             down
  verdict:          DEAD, LINK_DOWN
  rtt:              -
  loss:             0.0%
  last answer:      -

counters:
  event_sink.dropped_full:        7
  rx_bytes:                       1500
  session.reattach_sent:          3
  session.stray_reattach_answers: 1
  tx_bytes:                       3145728"""


EXPECTED_GATEWAY_TEXT = """\
gateway: gw-a
  tunnel:           10.66.0.1/24, fd6a:7670::1/64
  sessions:         2 (ATTACHED 1, RECOVERING 1)

peer: alice
  session:          000102030405060708090a0b0c0d0e0f
  public key:       AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
  tunnel:           10.66.0.2, fd6a:7670::2
  endpoint:         198.51.100.1:40001 via p1
  state:            ATTACHED (version 3)
  latest handshake: 1 minute, 3 seconds ago
  transfer:         1.21 MiB received, 3.45 MiB sent
  last packet:      250 ms ago
  switches:         1 in the last minute
  session age:      50 seconds
  policy:           0123456789abcdef

peer: bob
  session:          101112131415161718191a1b1c1d1e1f
  public key:       ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=
  tunnel:           10.66.0.3
  endpoint:         -
  state:            RECOVERING (version 7)
  latest handshake: -
  transfer:         0 B received, 0 B sent
  last packet:      -
  switches:         2 in the last minute
  session age:      40 seconds
  policy:           0123456789abcdef

counters:
  session.packets_off_binding:             4
  session.reattach_rejected_stale_version: 3
  udp.bad_frames:                          9"""


# -- client -----------------------------------------------------------------------------


def test_client_text_is_exact() -> None:
    assert render_status_text(full_client_status()) == EXPECTED_CLIENT_TEXT


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
        "metered": False,
        "probing": "active",
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
    for status, expected in [(full_client_status(), EXPECTED_CLIENT_TEXT), (full_gateway_status(), EXPECTED_GATEWAY_TEXT)]:
        decoded = json.loads(json.dumps(status, allow_nan=False))
        assert decoded == status
        assert render_status_text(decoded) == expected


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
    assert "  binding:          -" in lines
    assert "  pinned:           p2" in lines
    assert "  recovery:         deadline in 1 second" in lines
    assert "  reattach:         -" in lines


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
    assert text.splitlines()[0] == f"client: {SID.hex}"
    assert f"  policy:           {policy.fingerprint}" in text.splitlines()
    assert "  last answer:      88 ms ago" in text.splitlines()


# -- gateway ----------------------------------------------------------------------------


def test_gateway_text_is_exact() -> None:
    assert render_status_text(full_gateway_status()) == EXPECTED_GATEWAY_TEXT


def test_gateway_status_fields() -> None:
    status = full_gateway_status()
    assert (status["role"], status["node"], status["session_count"]) == ("gateway", "gw-a", 2)
    assert (status["now_s"], status["tunnel_address"], status["tunnel_address6"]) == (
        50.0,
        "10.66.0.1/24",
        "fd6a:7670::1/64",
    )
    assert status["states"] == {"ATTACHED": 1, "RECOVERING": 1}
    first, second = status["sessions"]  # type: ignore[misc]
    assert first == {
        "session": SID.hex,
        "state": "ATTACHED",
        "version": 3,
        "binding": "p1@198.51.100.1:40001",
        "path": "p1",
        "endpoint": "198.51.100.1:40001",
        "policy": FINGERPRINT,
        "session_age_s": 50.0,
        "last_nonce": 2,
        "last_delivery_ago_s": 0.25,
        "switches_last_minute": 1,
        "counters": {"session.packets_off_binding": 4, "session.reattach_rejected_stale_version": 1},
        "peer": "alice",
        "public_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "tunnel_ipv4": "10.66.0.2",
        "tunnel_ipv6": "fd6a:7670::2",
        "last_handshake_ago_s": 63.25,
        "rx_bytes": 1_268_000,
        "tx_bytes": 3_620_000,
        "rx_packets": 1000,
        "tx_packets": 2500,
    }
    assert (second["session"], second["binding"], second["path"], second["endpoint"]) == (SID_B.hex, None, None, None)
    assert (second["peer"], second["tunnel_ipv6"], second["last_handshake_ago_s"]) == ("bob", None, None)
    assert (second["last_delivery_ago_s"], second["rx_bytes"], second["tx_bytes"]) == (None, 0, 0)
    assert status["counters"] == {
        "session.packets_off_binding": 4,
        "session.reattach_rejected_stale_version": 3,
        "udp.bad_frames": 9,
    }


def test_bare_snapshots_report_null_peer_fields() -> None:
    """Given snapshots only (as before the runtime published peers), the keys are there, null."""
    status = gateway_status(gateway_snapshots(), node_id="gw-a")
    assert status["sessions"] == [
        {**entry, **dict.fromkeys(PEER_KEYS, None)} for entry in full_gateway_status()["sessions"]  # type: ignore[attr-defined]
    ]
    assert (status["tunnel_address"], status["tunnel_address6"]) == (None, None)
    text = render_status_text(status)
    assert "peer: -" in text.splitlines() and "  transfer:         -" in text.splitlines()


#: What a gateway session's entry has from its PeerStatus (null without one).
PEER_KEYS = (
    "peer", "public_key", "tunnel_ipv4", "tunnel_ipv6", "last_handshake_ago_s",
    "rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
)  # fmt: skip


def test_empty_gateway_renders() -> None:
    status = gateway_status([], node_id=None)
    assert (status["now_s"], status["sessions"]) == (None, [])
    text = render_status_text(status)
    assert text == "gateway: -\n  tunnel:   -\n  sessions: 0\n\ncounters:\n  (none)"


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
        "relay:\n  a:    yes\n  b:    -\n  role: relay"
    )


def test_between_sessions_the_client_reports_connecting() -> None:
    record = ClientStatistics(tx_dropped_unbound=4)
    status = client_status(None, statistics=record, counters={"routes.install_failed": 1}, sessions_started=1)
    assert status == {
        "role": "client",
        "session": None,
        "state": "CONNECTING",
        "sessions_started": 1,
        "tunnel_address": None,
        "tunnel_address6": None,
        "paths": [],
        "counters": {"routes.install_failed": 1, "tx_dropped_unbound": 4},
    }
    json.dumps(status)
    text = render_status_text(status).splitlines()
    assert text[:4] == ["client: -", "  state:            CONNECTING", "  tunnel:           -", "  sessions started: 1"]


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
