"""``jvpn-trio replay``: recorded traces replay exactly; tampering is pointed at; what-if policies differ.

Determinism rules: no sockets, no root, no sleeps.  Traces come from a client/gateway
:class:`~tests.pair.Pair` (exact virtual times) and from the real Trio runtimes over the
in-memory network on Trio's autojump clock, both recorded by :class:`MemoryRecorder`, which
implements ``drivers.recording.Recorder`` with the same encoders as the file recorder.

The golden trace in ``tests/data/traces/`` pins the recording format and the core's decisions:
if a deliberate behaviour change makes it diverge, regenerate it with
``python -m tests.tools.test_replay`` and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import Action
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, GatewaySession
from jvpn_trio.core.trace import SessionStart, encode_input, encode_outputs, encode_session_start
from jvpn_trio.config import DEFAULT_CONTROL_PORT_OFFSET, control_endpoint
from jvpn_trio.drivers.client import ClientPath, ClientRuntime
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.memory import MemoryNetwork
from jvpn_trio.drivers.recording import Recorder
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.tools.replay import (
    DIVERGED,
    INCOMPLETE,
    MALFORMED,
    OK,
    main,
    render_divergence,
    render_replay,
    render_whatif,
    replay_lines,
    whatif_lines,
)
from tests.pair import Pair
from tests.policies import STORM_POLICY

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
ROOT_SCENARIOS = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
GOLDEN = TRACES / "pair-storm.trace.jsonl"
#: The same scenario recorded before Policy gained ``probe_timeout_floor_ms``.
OLDER = TRACES / "pair-storm.before-probe-timeout-floor.trace.jsonl"

#: The what-if: the storm's thresholds, but at most one switch a minute (deliberately not the
#: policy the trace was recorded under, so that decisions differ).
STRICT = Policy(**{**STORM_POLICY.to_mapping(), "max_switches_per_minute": 1})


class MemoryRecorder:
    """A ``Recorder`` that keeps the trace lines in a list (the file recorder writes the same lines)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def started(self, start: SessionStart, actions: list[Any]) -> None:
        self.lines += [encode_session_start(start), encode_outputs(start.side, start.now, start.session, actions)]

    def step(self, side: str, session: str, now: float, event: Any, actions: list[Any]) -> None:
        self.lines += [encode_input(side, now, event, session=session), encode_outputs(side, now, session, actions)]


_protocol_check: type[Recorder] = MemoryRecorder  # MemoryRecorder satisfies the driver's Protocol


def recorded_pair(script: str = "storm") -> tuple[Pair, MemoryRecorder]:
    """Drive a Pair through faults, recording both machines into one trace.

    Not ``tests.pair.storm``: this script is what the golden trace recorded (no pin, no
    partial loss), so changing it means regenerating the golden trace.  ``script="calm"``
    leaves out the flapping storm.
    """
    recorder = MemoryRecorder()

    def attach(side: str, machine: ClientSession | GatewaySession):  # type: ignore[no-untyped-def]
        session = machine.record.session_id.hex
        start = SessionStart(side=side, now=machine.record.created_at, session=session, policy=machine.policy.to_mapping())
        if isinstance(machine, GatewaySession):
            start = SessionStart(
                side=side, now=machine.record.created_at, session=session, policy=machine.policy.to_mapping(),
                node_id=machine.node_id, held_revision=machine.held_revision, handshake_binding=machine.handshake_binding,
            )  # fmt: skip
        recorder.started(start, machine.creation_events())

        def tap(event: object, now: float, actions: list[Action]) -> None:
            recorder.step(side, session, now, event, actions)

        return tap

    pair = Pair.start(policy=STORM_POLICY, attach=attach)
    pair.run(1.0)
    pair.set_link(1, up=False)  # LINK_DOWN: switch to p2
    pair.attack("replay")  # a captured REATTACH from an attacker: SECURITY_EVENT on the gateway
    pair.run(0.5)
    pair.set_link(1, up=True)
    pair.run(1.5)  # p1 healthy again: return to it
    if script == "storm":
        pair.flap_active(4)  # the rate runs out: DEGRADED
    pair.go_dark()  # unbound past the TTL: TERMINATED
    return pair, recorder


def line_index(lines: list[str], predicate: Any) -> int:
    """Index of the first outputs line whose actions satisfy ``predicate``."""
    for i, text in enumerate(lines):
        body = json.loads(text)
        if "out" in body and predicate(body["out"]):
            return i
    raise AssertionError("no such line")


# -- identical replays ----------------------------------------------------------------------------


def test_a_pair_trace_replays_identically() -> None:
    pair, recorder = recorded_pair()
    result = replay_lines(recorder.lines)
    assert result.status == OK, render_replay(result)
    assert {(m.side, m.final_state) for m in result.machines} == {("client", "TERMINATED"), ("gateway", "TERMINATED")}
    assert result.inputs == (len(recorder.lines) - 4) // 2
    assert "replay ok" in render_replay(result)


async def test_traces_of_the_real_runtimes_replay_identically(autojump_clock: trio.abc.Clock) -> None:
    """The Trio drivers record what they feed the core, with the ``now`` they pass: replay agrees."""
    rng = random.Random(5)

    def random_bytes(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    gw_static, cl_static = generate_static(random_bytes), generate_static(random_bytes)
    net = MemoryNetwork()
    gateway_addr = ("192.0.2.1", 51820)
    client_addrs = {i: (f"198.51.100.{i}", 40000 + i) for i in (1, 2, 3)}
    gw_rec, cl_rec = MemoryRecorder(), MemoryRecorder()
    gateway = GatewayRuntime(
        policy=STORM_POLICY, static=gw_static, peers=[GatewayPeer(name="laptop", public=cl_static.public)],
        tunnel=__import__("ipaddress").IPv4Interface("10.66.0.1/24"), store=MemoryOwnershipStore(),
        node_id="gw-replay", emit=lambda e: None, random_bytes=random_bytes, recorder=gw_rec,
    )  # fmt: skip
    client = ClientRuntime(
        policy=STORM_POLICY, static=cl_static, gateway_public=gw_static.public,
        paths=[
            ClientPath(path=PathId(i), name=f"if{i}", kind=("ethernet", "wifi", "lte")[i - 1], priority=10 * i,
                       port=net.port(client_addrs[i]), gateway=gateway_addr)
            for i in (1, 2, 3)
        ],
        emit=lambda e: None, random_bytes=random_bytes, wall_time_ns=lambda: 1_700_000_000_000_000_000, recorder=cl_rec,
    )  # fmt: skip
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            data_port, control_port = net.port(gateway_addr), net.port(control_endpoint(gateway_addr, DEFAULT_CONTROL_PORT_OFFSET))
            await nursery.start(
                lambda task_status: gateway.serve([data_port], control_ports=[control_port], task_status=task_status)
            )
            await nursery.start(lambda task_status: client.run(task_status=task_status))
            await trio.sleep(1.0)
            net.blocked.add(client_addrs[1])  # blackhole path 1: MISSED_PROBES, switch to 2
            await trio.sleep(2.0)
            net.blocked.discard(client_addrs[1])
            await trio.sleep(3.0)
            client.submit_nowait(ev.CloseRequested())
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    for name, rec in (("client", cl_rec), ("gateway", gw_rec)):
        result = replay_lines(rec.lines)
        assert result.status == OK, f"{name}: {render_replay(result)}"
        assert result.inputs > 20 and [m.final_state for m in result.machines] == ["TERMINATED"]
        assert any('"TRANSPORT_SWITCH"' in line for line in rec.lines), f"{name}: the fault caused no switch"



def test_the_golden_trace_replays_identically() -> None:
    result = replay_lines(GOLDEN.read_text().splitlines())
    assert result.status == OK, render_replay(result)
    assert len(result.machines) == 2


def test_a_trace_from_an_older_policy_schema_says_why_it_diverges() -> None:
    result = replay_lines(OLDER.read_text().splitlines())
    assert result.status == DIVERGED and result.divergence is not None
    assert result.divergence.line == 2  # the gateway's creation event: its policy fingerprint
    assert result.divergence.hint is not None and "probe_timeout_floor_ms" in result.divergence.hint
    text = render_replay(result)
    assert "older jvpn-trio" in text and "policy:" in text


# -- tampering is found, at its line ---------------------------------------------------------------


def test_a_tampered_action_is_pointed_at() -> None:
    _, recorder = recorded_pair()
    lines = list(recorder.lines)
    i = line_index(lines, lambda out: any(a.get("kind") == "TRANSPORT_SWITCH" for a in out))
    body = json.loads(lines[i])
    for action in body["out"]:
        if action.get("kind") == "TRANSPORT_SWITCH":
            action["to_path"] = "p3" if action["to_path"] != "p3" else "p1"
    lines[i] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    result = replay_lines(lines)
    assert result.status == DIVERGED
    d = result.divergence
    assert d is not None and d.line == i + 1 and d.input_line == i
    text = render_divergence(d)
    assert f"DIVERGED at line {i + 1}" in text and f"input on line {i}" in text
    assert "to_path:" in text and "TRANSPORT_SWITCH" in text
    assert result.inputs == (i - 3) // 2  # 4 header lines, then input/outputs pairs: this is the last one fed


def test_a_tampered_input_is_pointed_at() -> None:
    _, recorder = recorded_pair()
    lines = list(recorder.lines)
    i = next(n for n, text in enumerate(lines) if '"input":"LinkChanged"' in text and '"up":false' in text)
    lines[i] = lines[i].replace('"up":false', '"up":true')  # the link never went down
    result = replay_lines(lines)
    assert result.status == DIVERGED
    assert result.divergence is not None and result.divergence.input_line == i + 1
    assert "LinkChanged" in render_replay(result)


def test_a_tampered_time_is_pointed_at() -> None:
    _, recorder = recorded_pair()
    lines = list(recorder.lines)
    i = next(n for n, text in enumerate(lines) if '"input":"LinkChanged"' in text)
    body = json.loads(lines[i])
    body["t"] = body["t"] + 0.001  # a millisecond later: every event of that call carries another t
    lines[i] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    result = replay_lines(lines)
    assert result.status == DIVERGED and result.divergence is not None
    assert result.divergence.input_line == i + 1
    assert "t:" in render_divergence(result.divergence)


def test_a_dropped_action_is_shown_as_missing() -> None:
    _, recorder = recorded_pair()
    lines = list(recorder.lines)
    i = line_index(lines, lambda out: len(out) >= 2)
    body = json.loads(lines[i])
    body["out"] = body["out"][:-1]
    lines[i] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    result = replay_lines(lines)
    assert result.divergence is not None and result.divergence.line == i + 1
    assert "(nothing)" in render_divergence(result.divergence)


# -- traces that end early or are not traces -------------------------------------------------------


def test_the_recorders_incomplete_marker() -> None:
    _, recorder = recorded_pair()
    lines = recorder.lines[:40] + ['{"incomplete": 17}']
    result = replay_lines(lines)
    assert result.status == INCOMPLETE and result.dropped == 17 and result.problem_line == 41
    assert result.inputs == 18  # 2 start lines + 2 creation outputs, then 18 input/outputs pairs
    assert "INCOMPLETE" in render_replay(result)


def test_an_input_without_outputs_at_the_end_is_incomplete() -> None:
    _, recorder = recorded_pair()
    result = replay_lines(recorder.lines[:41])
    assert result.status == INCOMPLETE and "without its outputs" in (result.problem or "")


def test_a_partial_last_line_is_incomplete() -> None:
    _, recorder = recorded_pair()
    lines = recorder.lines[:40] + [recorder.lines[40][:30]]
    assert replay_lines(lines).status == INCOMPLETE


def test_garbage_in_the_middle_is_malformed_with_its_line() -> None:
    _, recorder = recorded_pair()
    lines = recorder.lines[:10] + ["{]"] + recorder.lines[10:]
    result = replay_lines(lines)
    assert result.status == MALFORMED and result.problem_line == 11


def test_an_input_for_an_unknown_session_is_malformed() -> None:
    _, recorder = recorded_pair()
    lines = list(recorder.lines)
    lines[4] = lines[4].replace(json.loads(lines[0])["start"], "ab" * 16)
    result = replay_lines(lines)
    assert result.status == MALFORMED and "no start line" in (result.problem or "")


def test_nothing_is_not_a_trace() -> None:
    assert replay_lines([]).status == MALFORMED


async def test_the_recorder_counts_every_line_it_drops() -> None:
    from jvpn_trio.drivers.recording import _ChannelRecorder

    send, _receive = trio.open_memory_channel[str](0)  # a writer that never keeps up: every line is dropped
    recorder = _ChannelRecorder(send)
    recorder.step("client", "00" * 16, 1.0, ev.TimerFired(), [])
    assert recorder.dropped == 2  # an input line and its outputs line


# -- what-if ---------------------------------------------------------------------------------------


def test_whatif_under_a_stricter_policy_shows_how_decisions_differ() -> None:
    _, recorder = recorded_pair()
    result = whatif_lines(recorder.lines, STRICT)
    assert result.baseline.status == OK
    client = next(m for m in result.machines if m.side == "client")
    assert client.recorded["switches"] > client.whatif["switches"]
    assert client.whatif["switch_denied"] >= 1
    assert client.whatif["entered"].get("DEGRADED", 0) >= 1
    assert client.difference_count >= 1 and client.differences
    first = client.differences[0]
    assert first.recorded != first.whatif
    text = render_whatif(result)
    assert "baseline: the trace replays identically" in text
    assert f"what-if ({STRICT.fingerprint})" in text and "switches" in text and "line " in text


def test_whatif_under_the_recorded_policy_changes_nothing() -> None:
    _, recorder = recorded_pair(script="calm")
    result = whatif_lines(recorder.lines, STORM_POLICY)
    assert result.baseline.status == OK
    assert all(m.difference_count == 0 and m.recorded == m.whatif for m in result.machines)
    assert "no decision differs" in render_whatif(result)


# -- the command ----------------------------------------------------------------------------------


def args(trace: Path, **kwargs: Any) -> argparse.Namespace:
    return argparse.Namespace(trace=str(trace), json=kwargs.get("json", False), policy=kwargs.get("policy"), max_differences=5)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, recorder = recorded_pair()
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(recorder.lines) + "\n")
    assert main(args(good)) == 0
    assert "replay ok" in capsys.readouterr().out

    tampered = tmp_path / "tampered.jsonl"
    lines = list(recorder.lines)
    lines[9] = lines[9].replace('"out":[', '"out":[{"action":"Terminate","reason":"LOCAL_CLOSE"},', 1)
    tampered.write_text("\n".join(lines) + "\n")
    assert main(args(tampered)) == 1
    assert "DIVERGED at line 10" in capsys.readouterr().out
    assert main(args(tampered, json=True)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "diverged" and doc["divergence"]["line"] == 10 and doc["divergence"]["first_difference"] == 0

    policy = tmp_path / "strict.toml"
    policy.write_text("[policy]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in STRICT.to_mapping().items()
                                               if k in ("max_switches_per_minute", "max_recovery_window_ms", "transport_loss_ttl_ms",
                                                        "session_ttl_s", "loss_threshold_pct", "latency_threshold_ms",
                                                        "jitter_threshold_ms", "probe_interval_ms", "probe_timeout_ms",
                                                        "loss_window_probes", "min_dwell_ms", "return_dwell_ms",
                                                        "reattach_timeout_ms", "freshness_window_ms")) + "\n")
    assert main(args(good, policy=str(policy))) == 0
    assert "what-if" in capsys.readouterr().out
    assert main(args(good, policy=str(policy), json=True)) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "whatif"

    assert main(args(good, policy=str(ROOT_SCENARIOS / "storm.toml"))) == 0  # a scenario's [policy] will do
    assert main(args(tmp_path / "missing.jsonl")) == 2
    assert main(args(good, policy=str(tmp_path / "missing.toml"))) == 2
    (tmp_path / "junk.jsonl").write_text("hello\nworld\n")
    assert main(args(tmp_path / "junk.jsonl")) == 2


def regenerate_golden() -> None:
    _, recorder = recorded_pair()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text("\n".join(recorder.lines) + "\n")
    print(f"wrote {GOLDEN} ({len(recorder.lines)} lines)")


if __name__ == "__main__":
    regenerate_golden()
