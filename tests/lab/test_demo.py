"""``jvpn-trio demo``: the short scenario end to end, in process, plus the demo's pure helpers.

The end-to-end test runs the real thing on loopback UDP with the real clock
(the relays' delays and the scenario's timeline are real time; ~20 s), with
``--no-tui`` semantics and an ``--events`` file, under ``fail_after``.  It
asserts outcomes that the scenario and the policy guarantee with wide margins
(every state reached, at least three switches, an explicit close on both
sides), never exact times.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import pathlib
import struct

import pytest
import trio

from jvpn_trio.lab import demo
from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.lab.scenario import Impairment, load_scenario

ROOT = pathlib.Path(__file__).resolve().parents[2]


async def test_short_demo_passes_every_state_and_switches(tmp_path: pathlib.Path) -> None:
    events_file = tmp_path / "events.jsonl"
    out = io.StringIO()
    with trio.fail_after(60):
        result = await demo.run_demo(demo.DemoOptions(short=True, tui=False, events=events_file), stdout=out)
    assert result.exit_code == 0 and result.reason is ReasonCode.LOCAL_CLOSE
    events = [EmitEvent.from_dict(json.loads(line)) for line in events_file.read_text().splitlines()]
    client = [e for e in events if e.role is Role.CLIENT]
    gateway = [e for e in events if e.role is Role.GATEWAY]
    reached = {e.detail("to_state") for e in client if e.kind is EventKind.STATE_CHANGE}
    assert reached == {s.value for s in SessionState}
    switches = [e for e in client if e.kind is EventKind.TRANSPORT_SWITCH]
    assert len(switches) >= 3
    # Ethernet comes back, and the session goes back to it.  Not necessarily the last switch: the
    # demo runs on the wall clock, and on a loaded machine (CI with coverage on two cores) a probe
    # late past its timeout can still make a reason-coded MISSED_PROBES switch afterwards.
    restored = [s for s in switches if s.reason is ReasonCode.PREFERRED_PATH_RESTORED]
    assert restored and all(s.detail("to_path") == "p1" for s in restored)
    assert all(s.reason is not None for s in switches)
    # One session, versions without gaps, and an explicit end on both sides.
    assert len({e.session for e in events}) == 1
    versions = [e.version for e in client if e.kind is EventKind.STATE_CHANGE]
    assert versions == list(range(len(versions)))
    assert client[-1].detail("to_state") == "TERMINATED" and client[-1].reason is ReasonCode.LOCAL_CLOSE
    final_gateway = [e for e in gateway if e.kind is EventKind.STATE_CHANGE][-1]
    assert final_gateway.detail("to_state") == "TERMINATED"
    # Plain lines: one per event, the scenario's steps, and the summary.
    text = out.getvalue()
    assert text.count("\n") >= len(events)
    assert "SCENARIO_STEP     wifi0: loss_pct=20.0 (Wi-Fi degrades)" in text
    assert "TRANSPORT_SWITCH" in text
    assert "client TERMINATED (LOCAL_CLOSE)" in text.splitlines()[-2]
    assert result.states[0] == "BIRTH" and result.switches == len(switches)


def test_default_scenario_is_the_documented_one() -> None:
    scenario = load_scenario(demo.DEFAULT_SCENARIO)
    assert scenario.duration_s == 60.0 and scenario.short().duration_s == 20.0
    assert [p.name for p in scenario.paths] == ["eth0", "wifi0", "lte0"]
    policy = scenario.policy
    # The blackhole (all other paths down) outlasts the recovery window even in the short form.
    short = scenario.short()
    blackhole = [s.at_s for s in short.steps if s.path == "lte0" and "blackhole" in dict(s.changes)]
    assert blackhole[1] - blackhole[0] > policy.max_recovery_window_ms / 1000.0 + policy.death_detection_bound_ms / 1000.0
    assert not short.conditions_at(blackhole[0])["eth0"].link_up
    assert not short.conditions_at(blackhole[0])["wifi0"].link_up
    # Ethernet is back early enough to be preferred again before the end.
    plugged = [s.at_s for s in short.steps if s.path == "eth0" and dict(s.changes).get("link") == "up"][0]
    assert plugged + 1.5 + policy.return_dwell_ms / 1000.0 < short.duration_s


def test_ipv4_packets_are_well_formed() -> None:
    src, dst = ipaddress.IPv4Address("10.66.0.2"), ipaddress.IPv4Address("10.66.0.1")
    packet = demo.ipv4_udp_packet(src, dst, sport=40000, dport=5004, ident=7, payload=b"x" * 100)
    version_ihl, _tos, total, ident, _frag, ttl, proto, _csum = struct.unpack("!BBHHHBBH", packet[:12])
    assert (version_ihl, total, ident, ttl, proto) == (0x45, len(packet), 7, 64, 17)
    assert demo.ipv4_checksum(packet[:20]) == 0  # a correct checksum sums to all ones
    assert packet[12:16] == src.packed and packet[16:20] == dst.packed
    assert struct.unpack("!HHH", packet[20:26]) == (40000, 5004, 108)


class FakeRelay:
    def __init__(self) -> None:
        self.impairments: list[Impairment] = []

    def set_impairment(self, impairment: Impairment) -> None:
        self.impairments.append(impairment)


class FakeClient:
    def __init__(self) -> None:
        self.submitted: list[object] = []

    def submit_nowait(self, event: object) -> bool:
        self.submitted.append(event)
        return True


def test_scenario_driver_sets_relays_and_reports_link_changes_only() -> None:
    scenario = load_scenario(demo.DEFAULT_SCENARIO)
    relays = {p.name: FakeRelay() for p in scenario.paths}
    client = FakeClient()
    ids = {p.name: PathId(i + 1) for i, p in enumerate(scenario.paths)}
    driver = demo.ScenarioDriver(scenario, relays, client, ids, origin=0.0, duration_s=60.0)  # type: ignore[arg-type]

    async def main() -> None:
        driver.apply_initial()  # eth0 unplugged at 0 s
        assert client.submitted == [ev.LinkChanged(path=PathId(1), up=False)]
        driver.apply(scenario.steps[1])  # wifi0 loss: no link change
        assert len(client.submitted) == 1 and relays["wifi0"].impairments[-1].loss_pct == 20.0
        emulated, timeline = driver.footer(9.5)
        assert "eth0 link down" in emulated and "wifi0 6±2 ms, loss 20%" in emulated
        assert "next at 9 s: Wi-Fi degrades" in timeline

    trio.run(main)


def test_main_reports_a_bad_scenario_in_one_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('duration_s = 10\n[[step]]\nat_s = 1\npath = "nope"\nset = { link = "down" }\n')
    assert demo.main(["--scenario", str(bad), "--no-tui"]) == demo.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("jvpn-trio: ") and err.count("\n") == 1 and "nope" in err


def test_options_from_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--short", "--no-tui", "--duration", "5", "--events", "e.jsonl", "--scenario", "s.toml"])
    assert demo.options_from_args(args) == demo.DemoOptions(
        scenario=pathlib.Path("s.toml"), duration_s=5.0, tui=False, events=pathlib.Path("e.jsonl"), short=True
    )
    assert demo.options_from_args(parser.parse_args([])).tui is None  # decided by whether stdout is a terminal


def test_demo_clock_starts_at_zero() -> None:
    async def now() -> float:
        return trio.current_time()

    assert 0.0 <= trio.run(now, clock=demo.DemoClock()) < 1.0
