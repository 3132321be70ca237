"""``jvpn-trio lab``: every scenario's short form in a real namespace lab, and the report's arithmetic.

The first part needs no root: scenario files, the relay's frame marking, the probe-window
arithmetic and the whole report built from a synthetic run with exactly known times.  The
second part (``requires_lab``: root, iproute2, nft) runs each example scenario's short form
with a real gateway and client and asserts what must hold: zero invariant violations in both
event logs, the TCP stream intact, both traces replaying identically, and each scenario's
causal outcome (which path the session moved to, and why; storm ends DEGRADED).

Determinism rules: assertions are causal (a switch happened, to that path, for that reason;
an invariant held), never wall-clock durations, which are reported (``-s`` prints each
report) but not asserted.  Every lab run is bounded by ``trio.fail_after``, every lab is torn
down (a SIGTERM test checks that too), and each run takes its scenario's short form:
about 15-20 s per scenario, under 2.5 minutes for the file on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import trio
from attrs import evolve as attrs_evolve

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.lab.runner import (
    RELAY_MAC,
    VNET_HDR_BYTES,
    RunData,
    StepRecord,
    build_report,
    check_run,
    lab_spec_for,
    main,
    mark_frame,
    relayed_paths,
    render_report,
    run_scenario,
    window_probes,
)
from jvpn_trio.tools.audit import audit_lines
from jvpn_trio.lab.netns import destroy_stale
from jvpn_trio.lab.processes import ClientClock, ClockJump, ClockSample, estimate_client_clock
from jvpn_trio.tools.replay import DIVERGED, OK, replay_lines
from jvpn_trio.lab.scenario import load_scenario, scenario_from_mapping
from tests.netns import namespaces, requires_lab, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "examples" / "scenarios"
NAMES = ("commute", "flaky-wifi", "dead-wifi", "dock", "storm")
#: The laptop scenarios: their own expectations below, and their own parse tests in tests/lab.
LAPTOP_NAMES = ("hotplug", "dhcp-renew", "gateway-restart", "all-down", "suspend")
#: Bound on one short-form run: build, start, the timeline (<= 16 s), the traffic's tail, teardown.
RUN_BOUND_S = 90.0


# =============================================================================
# Without root
# =============================================================================


@pytest.mark.parametrize("name", NAMES)
def test_each_scenario_parses_and_has_a_short_form_for_ci(name: str) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    short = scenario.short()
    assert 10.0 <= short.duration_s <= 20.0
    assert [s.at_s for s in short.steps] == sorted(s.at_s for s in short.steps)
    assert scenario.description
    spec = lab_spec_for(short)  # the lab can be built from it: distinct names and metrics
    assert [p.name for p in spec.paths] == [p.name for p in scenario.paths]


def test_storm_flaps_more_than_its_switch_budget() -> None:
    storm = load_scenario(SCENARIOS / "storm.toml")
    flaps = sum(1 for s in storm.steps if dict(s.changes).get("link") == "down")
    assert flaps > storm.policy.max_switches_per_minute // 2
    assert any(dict(s.changes).get("delay_ms") for s in storm.steps)  # the needed switch the rate forbids


def test_paths_with_a_delay_get_the_relay() -> None:
    scenario = scenario_from_mapping(
        {
            "duration_s": 10.0,
            "path": [
                {"name": "eth0", "kind": "ethernet", "priority": 10},
                {"name": "wifi0", "kind": "wifi", "priority": 20, "delay_ms": 2.0},
                {"name": "lte0", "kind": "lte", "priority": 30},
            ],
            "step": [{"at_s": 5.0, "path": "lte0", "set": {"jitter_ms": 3.0}}],
        },
        source="test",
    )
    assert relayed_paths(scenario) == ["wifi0", "lte0"]


def ipv4_frame(src_mac: bytes = bytes.fromhex("0a0000000001"), ethertype: bytes = b"\x08\x00") -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    udp = bytes([0x13, 0x88, 0x13, 0x89, 0, 8, 0xAB, 0xCD])
    return bytes.fromhex("0a0000000002") + src_mac + ethertype + ip + udp


def test_mark_frame_changes_only_the_source_mac_and_send_flags() -> None:
    header = bytes([0x03, 5, 42, 0, 0xB0, 0x04, 34, 0, 6, 0])  # NEEDS_CSUM | DATA_VALID, UDP GSO 1200
    frame = ipv4_frame()
    copy = mark_frame(header + frame)
    assert copy is not None
    assert copy[0] == 0x01 and copy[1:VNET_HDR_BYTES] == header[1:]  # DATA_VALID is receive-only
    body = copy[VNET_HDR_BYTES:]
    assert body[6:12] == RELAY_MAC and body[:6] == frame[:6] and body[12:] == frame[12:]
    assert mark_frame(header + ipv4_frame(src_mac=RELAY_MAC)) is None  # already relayed
    assert mark_frame(header + ipv4_frame(ethertype=b"\x08\x06")) is None  # ARP passes untouched
    assert mark_frame(header[:4]) is None


def test_window_probes_counts_what_was_scheduled_and_lost() -> None:
    start, hz = 100.0, 100.0
    arrivals = {seq: start + seq / hz + 0.002 for seq in range(0, 500) if not 150 <= seq < 180}
    outage, expected, lost = window_probes(start, 500, arrivals, start + 1.0, start + 3.0, hz)
    assert (expected, lost) == (200, 30)
    assert outage == pytest.approx(0.31)  # from seq 149's arrival (1.492) to seq 180's (1.802)
    assert window_probes(None, 0, {}, 0.0, 1.0, hz) == (None, 0, 0)
    assert window_probes(start, 500, arrivals, start + 10.0, start + 11.0, hz) == (None, 0, 0)


def test_the_clock_offset_is_the_tightest_lower_bound() -> None:
    samples = [
        ClockSample(core_now=1000.000, monotonic_after=0.0100, monotonic_before=0.0090),  # reply lagged 10 ms
        ClockSample(core_now=1000.120, monotonic_after=0.1205, monotonic_before=0.1190),  # lagged 0.5 ms
    ]
    clock = estimate_client_clock(samples)
    assert clock is not None and clock.offset == pytest.approx(1000.120 - 0.0005 - 0.1205)
    assert estimate_client_clock([]) is None


def test_the_clock_map_takes_out_the_jumps_the_lab_made() -> None:
    # A resume at monotonic 5.0 moved the client's clock 1,797 s forward (a 30 min sleep, 3 s stopped).
    jump = ClockJump(at=5.0, seconds=1_797.0, wall_s=3.0)
    samples = [
        ClockSample(core_now=1000.120, monotonic_after=0.1205, monotonic_before=0.1190),
        ClockSample(core_now=1000.120 + 6.0 + 1_797.0, monotonic_after=6.1205, monotonic_before=6.1190),
        ClockSample(core_now=1000.000 + 6.0, monotonic_after=6.2000, monotonic_before=5.0),  # a stale reply: looser
    ]
    clock = estimate_client_clock(samples, [jump])
    assert clock == ClientClock(offset=pytest.approx(1000.120 - 0.0005 - 0.1205), jumps=(jump,))
    assert clock.at(4.0) == pytest.approx(4.0 + clock.offset)
    assert clock.at(5.0) == clock.at(4.0) + 1.0 + 1_797.0  # the jump counts from its instant


# -- the report from a synthetic run -----------------------------------------------------------------

SID = "00112233445566778899aabbccddeeff"
OFFSET = 1000.0  # client core clock = monotonic + OFFSET
SYNTHETIC = scenario_from_mapping(
    {
        "name": "synthetic",
        "duration_s": 10.0,
        "path": [{"name": "wifi0", "kind": "wifi", "priority": 20}, {"name": "lte0", "kind": "lte", "priority": 30}],
        "step": [
            {"at_s": 2.0, "path": "wifi0", "set": {"link": "down"}},
            {"at_s": 6.0, "path": "wifi0", "set": {"link": "up"}},
        ],
    },
    source="synthetic",
)


def client_event(kind: EventKind, t: float, version: int, reason: ReasonCode, **details: Any) -> str:
    fp = SYNTHETIC.policy.fingerprint
    return EmitEvent(
        kind=kind, t=t, role=Role.CLIENT, session=SID, version=version, reason=reason, policy=fp, details=details
    ).to_json_line()


def synthetic_run(**changes: Any) -> RunData:
    sc, ts, ph = EventKind.STATE_CHANGE, EventKind.TRANSPORT_SWITCH, EventKind.PATH_HEALTH
    r = ReasonCode
    b1, b2 = "p1@10.99.0.1:51820", "p2@10.99.0.1:51820"
    events = [
        client_event(sc, 1000.0, 0, r.SESSION_CREATED, from_state=None, to_state="BIRTH"),
        client_event(sc, 1000.0, 1, r.HANDSHAKE_COMPLETE, from_state="BIRTH", to_state="ATTACHED", binding=b1),
        client_event(ph, 1002.05, 1, r.LINK_DOWN, path="p1", verdict="DEAD"),
        client_event(sc, 1002.05, 2, r.LINK_DOWN, from_state="ATTACHED", to_state="RECOVERING", binding=None, path="p1"),
        client_event(sc, 1002.1, 3, r.REATTACH_CONFIRMED, from_state="RECOVERING", to_state="ATTACHED", binding=b2),
        client_event(ts, 1002.1, 3, r.LINK_DOWN, from_path="p1", to_path="p2", binding=b2, switches_last_minute=1),
        client_event(ph, 1006.2, 3, r.MISSED_PROBES, path="p1", verdict="DEAD"),
        client_event(sc, 1011.0, 4, r.LOCAL_CLOSE, from_state="ATTACHED", to_state="TERMINATED", binding=None),
    ]
    arrivals = [[seq, round(seq / 100 + 0.002, 6)] for seq in range(1101) if not 200 <= seq < 210]
    step = lambda i, at, change, before, after: StepRecord(  # noqa: E731
        index=i, at_s=at, path="wifi0", targets=("wifi0",), changes=change, note="",
        before={"wifi0": before}, after={"wifi0": after}, done=(f"wifi0: {change}",), started=at, finished=at + 0.01,
    )  # fmt: skip
    from jvpn_trio.lab.scenario import Impairment

    up, down = Impairment(), Impairment(link_up=False)
    base: dict[str, Any] = dict(
        scenario=SYNTHETIC, scenario_file=None, short=False, lab={"prefix": "jvt000000"}, kept=False,
        removal_command=None, workdir="/nonexistent", path_names=("wifi0", "lte0"), t0=0.0, end=10.0,
        steps=(step(1, 2.0, "link=down", up, down), step(2, 6.0, "link=up", down, up)),
        clock_samples=(ClockSample(core_now=OFFSET + 1.0 + 0.0005, monotonic_after=1.0, monotonic_before=0.999),),
        client_events=tuple(events), gateway_events=(),
        probe_source={"hz": 100.0}, probe_sink={"start": 0.0, "end": 11.0, "expected": 1101, "received": 1091, "lost": 10,
                                                 "longest_gap_s": 0.102, "arrivals": arrivals},
        tcp_source={"bytes": 10, "sha256": "ab", "reset": False, "error": None},
        tcp_sink={"bytes": 10, "sha256": "ab", "reset": False, "error": None},
        exit_codes={"client": 0, "gateway": 0}, stderr_tails={}, relay=None, relay_seed=None, errors=(),
    )  # fmt: skip
    base.update(changes)
    return RunData(**base)


def synthetic_report(**changes: Any) -> dict[str, Any]:
    """The report of :func:`synthetic_run` with ``changes``; its replays are not ok (no traces)."""
    run = synthetic_run(**changes)
    audits = {
        "client": audit_lines(run.client_events, policy=SYNTHETIC.policy, role="client"),
        "gateway": audit_lines(run.gateway_events, policy=SYNTHETIC.policy, role="gateway"),
    }
    no_trace = replay_lines([])
    return build_report(run, audits=audits, replays={"client": no_trace, "gateway": no_trace})


def test_the_report_times_each_fault_on_the_clients_clock() -> None:
    class Ok:
        status, inputs, problem, divergence = OK, 5, None, None

    run = synthetic_run()
    audits = {"client": audit_lines(run.client_events, policy=SYNTHETIC.policy, role="client")}
    doc = build_report(run, audits=audits, replays={"client": Ok(), "gateway": Ok()})  # type: ignore[dict-item]
    first, second = doc["faults"]
    assert first["active_before"] == "wifi0" and first["on_active_path"] is True
    assert first["detection_ms"] == pytest.approx(50.0) and first["detected_by"]["kind"] == "PATH_HEALTH"
    assert first["switch_ms"] == pytest.approx(100.0)
    assert (first["switched_from"], first["switched_to"], first["reason"]) == ("wifi0", "lte0", "LINK_DOWN")
    assert first["states"] == ["RECOVERING", "ATTACHED"] and first["state_after"] == "ATTACHED"
    assert (first["probes_expected"], first["probes_lost"]) == (400, 10)
    assert first["outage_ms"] == pytest.approx(102.0)  # 2.0 -> seq 210's arrival at 2.102
    assert second["on_active_path"] is False and second["active_before"] == "lte0"
    assert second["detection_ms"] == pytest.approx(200.0) and second["switch_ms"] is None
    assert doc["totals"]["switches"] == {"client": 1, "gateway": 0}
    assert doc["totals"]["time_in_state_s"]["ATTACHED"] == pytest.approx(10.95)
    assert doc["totals"]["termination"] == "LOCAL_CLOSE" and doc["totals"]["state_at_end"] == "ATTACHED"
    assert doc["ok"] and doc["invariants"]["violations"] == 0 and doc["tcp"]["intact"]
    text = render_report(doc)
    assert "PASS" in text and "LINK_DOWN" in text and "lte0" in text


def test_the_report_fails_on_a_broken_stream_a_violation_or_a_bad_replay() -> None:
    assert not synthetic_report()["ok"]  # the replays given are not ok
    broken = synthetic_report(tcp_sink={"bytes": 9, "sha256": "cd", "reset": True, "error": None})
    assert not broken["tcp"]["intact"] and "BROKEN" in render_report(broken)
    events = list(synthetic_run().client_events)
    events[4] = events[4].replace('"version":3', '"version":7')
    bad = synthetic_report(client_events=tuple(events))
    assert bad["invariants"]["violations"] >= 1 and "version" in render_report(bad)


def test_the_report_has_the_laptop_figures() -> None:
    from jvpn_trio.lab.scenario import Impairment

    base = synthetic_run()
    first, second = base.steps
    healthy = client_event(EventKind.PATH_HEALTH, 1006.3, 3, ReasonCode.PREFERRED_PATH_RESTORED, path="p1", verdict="HEALTHY")
    steps = (
        attrs_evolve(first, usable_after=()),  # every path down from 2.0 s
        attrs_evolve(second, usable_after=("wifi0",), after={"wifi0": Impairment()}),
    )
    doc = synthetic_report(
        steps=steps, usable_at_start=("wifi0", "lte0"), client_alive_at_end=False,
        client_events=(*base.client_events[:-1], healthy, base.client_events[-1]),
    )  # fmt: skip
    down, back = doc["faults"]
    assert down["became_usable"] == [] and down["traffic_back_ms"] == pytest.approx(102.0)
    assert back["became_usable"] == ["wifi0"] and back["first_answer_ms"] == {"wifi0": pytest.approx(290.0)}
    laptop = doc["laptop"]
    assert laptop["first_answer"] == [{"step": 2, "path": "wifi0", "ms": pytest.approx(290.0)}]
    assert laptop["all_down"] == [{"step": 2, "down_s": 4.0, "traffic_back_ms": back["traffic_back_ms"]}]
    assert laptop["agent_alive_at_end"] is False and not doc["ok"]
    assert "the client (jvpn-trio up) was not running" in " ".join(doc["errors"])
    assert [s["violations"] for s in laptop["sessions"]["client"]] == [0]
    text = render_report(doc)
    assert "all paths down -> traffic flowing: #2 (4 s down)" in text and "agent alive at the end: NO" in text


def test_a_bad_scenario_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text('duration_s = 5.0\n[[step]]\nat_s = 1.0\npath = "nope0"\nset = { link = "down" }\n')
    args = argparse.Namespace(scenario=str(tmp_path / "bad.toml"), short=False, json=False, keep=False, workdir=None)
    assert main(args) == 2
    assert "nope0" in capsys.readouterr().err


# =============================================================================
# In a lab (root)
# =============================================================================


def assert_clean(report: dict[str, Any]) -> None:
    """What every scenario must show: the checks the lab's exit status is made of."""
    violations = [v for side in ("client", "gateway") for v in report["invariants"][side]["violations"]]
    assert report["invariants"]["violations"] == 0, violations
    assert report["tcp"]["intact"], report["tcp"]
    assert {side: r["status"] for side, r in report["replay"].items()} == {"client": OK, "gateway": OK}
    assert report["errors"] == []
    assert report["ok"]
    assert report["totals"]["termination"] == "LOCAL_CLOSE"


def switched(fault: dict[str, Any], to: str, *reasons: str) -> bool:
    return fault["switched_to"] == to and fault["reason"] in reasons


def expect_commute(report: dict[str, Any]) -> None:
    fade, gone, back = report["faults"]
    # A fading path loses probes and answers alike: either the loss window or the silence clock
    # (three silence probes unanswered while the TCP stream waits) may see it first.
    assert fade["on_active_path"] and switched(fade, "lte0", "LOSS_ABOVE_THRESHOLD", "DATA_UNANSWERED")
    assert not gone["on_active_path"] and gone["switch_ms"] is None  # Wi-Fi dies while LTE carries the session
    assert switched(back, "wifi0", "UNMETERED_AVAILABLE")  # LTE is metered: left as soon as Wi-Fi is healthy
    assert report["totals"]["degraded_entries"] == 0


def expect_flaky_wifi(report: dict[str, Any]) -> None:
    bursts = [f for f in report["faults"] if f["changes"] == "loss_pct=30.0"]
    hit = [f for f in bursts if f["on_active_path"]]
    assert len(hit) >= 2, "the session should be back on Wi-Fi for most bursts"
    # 30 % random loss can also drop dead_after_missed_probes probes in a row before the loss
    # fraction crosses its threshold (0.3 ** 3 per run of three), on the ordinary clock or, while
    # the stream's data goes unanswered, on the silence clock: any of the three is the right one.
    assert all(switched(f, "lte0", "LOSS_ABOVE_THRESHOLD", "MISSED_PROBES", "DATA_UNANSWERED") for f in hit)
    returns = [f for f in report["faults"] if switched(f, "wifi0", "UNMETERED_AVAILABLE")]
    assert len(returns) >= 2
    assert report["totals"]["degraded_entries"] == 0


def expect_dead_wifi(report: dict[str, Any]) -> None:
    dead, back = report["faults"]
    assert dead["on_active_path"] and switched(dead, "lte0", "LOSS_ABOVE_THRESHOLD", "MISSED_PROBES", "DATA_UNANSWERED")
    assert switched(back, "wifi0", "UNMETERED_AVAILABLE")


def expect_dock(report: dict[str, Any]) -> None:
    dock, undock, redock = report["faults"]
    assert not dock["on_active_path"] and switched(dock, "eth0", "PREFERRED_PATH_RESTORED")
    assert undock["on_active_path"] and switched(undock, "wifi0", "LINK_DOWN")
    # Docked again: back to Ethernet, normally once it has been HEALTHY for return_dwell_ms.  Wi-Fi
    # here runs through the lab's userspace relay (its delay and jitter); if that relay stalls on a
    # loaded machine, Wi-Fi alone goes silent while Ethernet answers promptly, and the session
    # rightly leaves for Ethernet sooner, for DATA_UNANSWERED, with the probes it lost to show for it.
    # (A stall of the gateway silences both paths: no switch then, docs/policy.md "Second opinion".)
    assert switched(redock, "eth0", "PREFERRED_PATH_RESTORED") or (
        switched(redock, "eth0", "DATA_UNANSWERED") and redock["probes_lost"] > 0
    )


def expect_gateway_stall(report: dict[str, Any]) -> None:
    totals = report["totals"]
    # Every stall silenced both paths at once: seen (VOLATILE), but no path was to blame, so none
    # was left; before the second opinion each stall cost a switch (docs/policy.md, "Second opinion").
    assert totals["time_in_state_s"].get("VOLATILE", 0.0) > 0.0, "the stalls were not seen: the test proves nothing"
    assert totals["switches"] == {"client": 0, "gateway": 0}
    assert totals["degraded_entries"] == 0 and totals["state_at_end"] == "ATTACHED"


def expect_storm(report: dict[str, Any]) -> None:
    totals = report["totals"]
    budget = report["scenario"]["max_switches_per_minute"]
    assert totals["degraded_entries"] >= 1, "Property 6: a needed switch beyond the rate must end in DEGRADED"
    assert totals["switch_denied"] >= 1
    assert totals["state_at_end"] == "DEGRADED"
    assert totals["switches"]["client"] <= budget and totals["switches"]["gateway"] <= budget
    bloat = next(f for f in report["faults"] if f["changes"].startswith("delay_ms"))
    assert bloat["on_active_path"] and bloat["switch_ms"] is None and "DEGRADED" in bloat["states"]


EXPECT: dict[str, Callable[[dict[str, Any]], None]] = {
    "commute": expect_commute,
    "flaky-wifi": expect_flaky_wifi,
    "dead-wifi": expect_dead_wifi,
    "dock": expect_dock,
    "storm": expect_storm,
    "gateway-stall": expect_gateway_stall,
}


def assert_survived(report: dict[str, Any]) -> None:
    """What every laptop scenario must show: the agent alive, every session of every log clean."""
    laptop = report["laptop"]
    assert laptop["agent_alive_at_end"], report["processes"]["client"]
    for log, sessions in laptop["sessions"].items():
        assert sessions and all(s["violations"] == 0 for s in sessions), (log, sessions)
    assert report["invariants"]["violations"] == 0
    assert all(g["replay_ok"] for g in report["gateway_runs"])
    assert {side: r["status"] for side, r in report["replay"].items()} == {"client": OK, "gateway": OK}
    assert report["tcp"]["intact"], report["tcp"]
    assert report["errors"] == [] and report["ok"]


def expect_hotplug(report: dict[str, Any]) -> None:
    plugged, pulled = report["faults"]
    assert plugged["became_usable"] == ["usb0"] and plugged["first_answer_ms"]["usb0"] is not None
    assert switched(plugged, "usb0", "PREFERRED_PATH_RESTORED")
    assert pulled["on_active_path"] and switched(pulled, "wifi0", "LINK_DOWN")


def expect_dhcp_renew(report: dict[str, Any]) -> None:
    flushed, renewed, moved = report["faults"]
    assert flushed["on_active_path"] and flushed["switched_to"] == "lte0"
    assert renewed["first_answer_ms"]["wifi0"] is not None
    assert [c["traffic_back_ms"] is not None for c in report["laptop"]["address_changes"]] == [True, True, True]
    assert moved["first_answer_ms"] == {} or moved["traffic_back_ms"] is not None


def expect_gateway_restart(report: dict[str, Any]) -> None:
    (restart,) = report["laptop"]["gateway_restarts"]
    assert restart["traffic_back_ms"] is not None
    assert len(report["gateway_runs"]) == 1 and report["gateway_runs"][0]["exit"] == -signal.SIGKILL
    assert len(report["laptop"]["sessions"]["client"]) >= 2  # a new session after the old one ended


def expect_all_down(report: dict[str, Any]) -> None:
    (recovery,) = report["laptop"]["all_down"]
    ttl_ms = load_scenario(SCENARIOS / "all-down.toml").policy.transport_loss_ttl_ms
    assert recovery["down_s"] * 1000 > ttl_ms
    assert recovery["traffic_back_ms"] is not None
    sessions = report["laptop"]["sessions"]["client"]
    assert len(sessions) >= 2 and sessions[0]["termination"] == "TRANSPORT_LOSS_TTL_EXPIRED"


def expect_suspend(report: dict[str, Any]) -> None:
    short, long, longest = report["laptop"]["resumes"]
    assert [r["slept_s"] for r in (short, long, longest)] == [pytest.approx(s, abs=0.01) for s in (6.0, 45.0, 1_800.0)]
    for row in (short, long, longest):  # attached and carrying traffic again inside the window after the resume
        assert row["attached_ms"] is not None and row["traffic_back_ms"] is not None, row
    assert report["laptop"]["stale_timestamps"] == 0  # the boottime clock: no storm of rejections
    resumed = [f for f in report["faults"] if f["kind"] == "resume"]
    assert switched(resumed[0], "lte0", "LINK_DOWN")  # Wi-Fi went away while the laptop slept
    assert not short["new_session"] and not long["new_session"]  # the gateway kept the session (docs/spec.md R18)
    assert longest["new_session"]  # 30 min: past the gateway's tolerance and the key lifetime
    client = report["laptop"]["sessions"]["client"]
    assert len(client) == 2 and client[0]["termination"] in ("KEY_EXHAUSTED", "LOCAL_CLOSE")
    assert all(f["asleep"] for f in report["faults"] if f["kind"] in ("suspend", "flush-address", "add-address"))


EXPECT_LAPTOP: dict[str, Callable[[dict[str, Any]], None]] = {
    "hotplug": expect_hotplug,
    "dhcp-renew": expect_dhcp_renew,
    "gateway-restart": expect_gateway_restart,
    "all-down": expect_all_down,
    "suspend": expect_suspend,
}


async def short_form_report(name: str, workdir: Path) -> dict[str, Any]:
    """Run the short form of scenario ``name`` in a fresh lab (bounded), print and return its report."""
    scenario = load_scenario(SCENARIOS / f"{name}.toml").short()
    with trio.fail_after(RUN_BOUND_S):
        run = await run_scenario(scenario, workdir=workdir, short=True, prefix=unique_prefix(), seed=1)
        report = await check_run(run)
    print("\n" + render_report(report))
    return report


@requires_lab
@pytest.mark.parametrize("name", LAPTOP_NAMES)
async def test_laptop_short_form_in_a_lab(name: str, tmp_path: Path) -> None:
    """A laptop scenario end to end: the agent survives it and the figures it is about were measured."""
    report = await short_form_report(name, tmp_path)
    assert_survived(report)
    EXPECT_LAPTOP[name](report)


@requires_lab
@pytest.mark.parametrize("name", ["commute", "flaky-wifi", "dock", "storm", "gateway-stall"])
async def test_short_form_in_a_lab(name: str, tmp_path: Path) -> None:
    report = await short_form_report(name, tmp_path)
    assert_clean(report)
    EXPECT[name](report)


def tamper_first_switch(lines: list[str]) -> tuple[list[str], int]:
    """A copy of a trace whose first recorded TRANSPORT_SWITCH names another path; its 1-based line."""
    for i, text in enumerate(lines):
        body = json.loads(text)
        for action in body.get("out", []):
            if action.get("kind") == "TRANSPORT_SWITCH":
                action["to_path"] = "p9"
                copy = list(lines)
                copy[i] = json.dumps(body, sort_keys=True, separators=(",", ":"))
                return copy, i + 1
    raise AssertionError("the trace holds no switch")


@requires_lab
async def test_the_command_runs_dead_wifi_and_its_traces_replay_or_point_at_tampering(tmp_path: Path) -> None:
    """``python -m jvpn_trio.lab.runner --json`` end to end, then ``python -m jvpn_trio.tools.replay`` on what it recorded."""
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "jvpn_trio.lab.runner", "--scenario", str(SCENARIOS / "dead-wifi.toml"), "--short",
            "--json", "--workdir", str(workdir)]  # fmt: skip
    with trio.fail_after(RUN_BOUND_S):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=str(ROOT))
    report = json.loads(done.stdout)
    print("\n" + render_report(report))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert_clean(report)
    expect_dead_wifi(report)

    for side in ("client", "gateway"):
        lines = Path(report["files"][f"{side}_trace"]).read_text().splitlines()
        assert replay_lines(lines).status == OK
        tampered, line = tamper_first_switch(lines)
        result = replay_lines(tampered)
        assert result.status == DIVERGED and result.divergence is not None and result.divergence.line == line
        copy = tmp_path / f"{side}.tampered.jsonl"
        copy.write_text("\n".join(tampered) + "\n")
        with trio.fail_after(60):
            cli = await trio.run_process(
                [sys.executable, "-m", "jvpn_trio.tools.replay", str(copy)], capture_stdout=True, check=False, cwd=str(ROOT)
            )
        assert cli.returncode == 1
        assert f"DIVERGED at line {line}" in cli.stdout.decode() and "to_path:" in cli.stdout.decode()


@requires_lab
async def test_sigterm_tears_the_lab_down(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "jvpn_trio.lab.runner", "--scenario", str(SCENARIOS / "commute.toml"), "--short",
            "--workdir", str(tmp_path)]  # fmt: skip
    prefix = None
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(argv, stderr=__import__("subprocess").PIPE, cwd=str(ROOT))
        assert process.stderr is not None
        seen = b""
        while b"ATTACHED" not in seen:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"the lab ended before the session started: {seen.decode()}"
            seen += chunk
        prefix = seen.decode().split("building lab ", 1)[1].split(":", 1)[0]
        process.send_signal(signal.SIGTERM)
        async for chunk in process.stderr:
            seen += chunk
        code = await process.wait()
    try:
        assert code == 128 + signal.SIGTERM, seen.decode()
        assert "interrupted by SIGTERM" in seen.decode()
        assert not [ns for ns in await namespaces() if ns.startswith(prefix)]
    finally:
        await destroy_stale(prefix)


@requires_lab
async def test_a_link_down_at_start_up_is_left_out_until_it_comes_up(tmp_path: Path) -> None:
    """Undocked at start: the session attaches on Wi-Fi at once; docking adds eth0 as p1 and it takes over."""
    from jvpn_trio.lab.netns import LabPath, LabSpec, open_lab
    from jvpn_trio.lab.processes import start_tunnel

    spec = LabSpec(
        prefix=unique_prefix(),
        paths=(LabPath(name="eth0", kind="ethernet", metric=10, index=1), LabPath(name="wifi0", kind="wifi", metric=20, index=2)),
    )
    with trio.fail_after(60):
        async with open_lab(spec) as lab:
            await lab.link_down("eth0")  # the laptop starts undocked
            tunnel = await start_tunnel(lab, tmp_path, policy={"handshake_retry_ms": 300, "return_dwell_ms": 500})
            await tunnel.wait_attached()
            await trio.sleep(0.5)
            docked_at = len(tunnel.events("client"))
            await lab.link_up("eth0")
            await trio.sleep(3.0)
            await tunnel.stop()
    events = tunnel.events("client")
    before, after = events[:docked_at], events[docked_at:]
    # Never a probe, a verdict or a handshake on a path whose link is down: it is not a path yet.
    assert [e for e in before if e.kind is EventKind.PATH_HEALTH and e.detail("path") == "p1"] == []
    first_bind = next(e for e in before if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "ATTACHED")
    assert str(first_bind.detail("binding")).startswith("p2")
    # Docked: eth0 is p1 (its place in the config), answers probes, and the session returns to it.
    assert any(e.kind is EventKind.PATH_HEALTH and e.detail("path") == "p1" and e.detail("verdict") == "HEALTHY" for e in after)
    switches = [e for e in after if e.kind is EventKind.TRANSPORT_SWITCH]
    assert switches and switches[-1].detail("to_path") == "p1"


@requires_lab
async def test_keep_leaves_the_namespaces_and_says_how_to_remove_them(tmp_path: Path) -> None:
    scenario = scenario_from_mapping(
        {
            "name": "brief",
            "duration_s": 2.0,
            "path": [{"name": "eth0", "kind": "ethernet", "priority": 10},
                     {"name": "wifi0", "kind": "wifi", "priority": 20, "delay_ms": 2.0}],  # fmt: skip
            "step": [{"at_s": 1.0, "path": "eth0", "set": {"link": "down"}}],
        },
        source="brief",
    )
    prefix = unique_prefix()
    try:
        with trio.fail_after(RUN_BOUND_S):
            run = await run_scenario(scenario, workdir=tmp_path, keep=True, prefix=prefix)
            report = await check_run(run)
        assert report["lab"]["kept"] and report["lab"]["removal_command"] == f"ip netns del {prefix}-cli; ip netns del {prefix}-gw"
        assert {f"{prefix}-cli", f"{prefix}-gw"} <= set(await namespaces())
        for ns in (f"{prefix}-cli", f"{prefix}-gw"):  # kept: the namespaces, not the processes
            pids = await trio.run_process(["ip", "netns", "pids", ns], capture_stdout=True)
            assert pids.stdout.strip() == b""
        assert "kept: remove with" in render_report(report)
        assert_clean(report)
    finally:
        await destroy_stale(prefix)
    assert not [ns for ns in await namespaces() if ns.startswith(prefix)]
