"""Same inputs, same decisions: byte for byte, in one process and across processes.

Determinism rules (style guide, section 1): the core is a pure function of
(state, event, now).  This test drives the storm scenario (``tests.pair.storm``) through a
client/gateway :class:`~tests.pair.Pair` -- probing, a link failure, loss, a
blackhole, a pin, forged and replayed REATTACHes, a switch-rate storm,
recovery, degradation and termination -- and renders every ``handle`` call
(side, now, input, every action, the record afterwards, the next deadline)
plus every event's own JSON line as text.  Two runs in this process must
produce identical bytes, and so must fresh interpreters started with
different ``PYTHONHASHSEED`` values (string hashing, hence set and dict
orders that depend on it, differ there).
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.core.session import ClientSession, GatewaySession
from tests.pair import Pair, storm
from tests.policies import STORM_POLICY

ROOT = Path(__file__).resolve().parents[2]


def _plain(value: object) -> object:
    """A JSON-ready, order-stable rendering of inputs, actions and records."""
    if isinstance(value, enum.Enum):
        return value.value
    if attrs.has(type(value)):
        out: dict[str, object] = {"type": type(value).__name__}
        for field in attrs.fields(type(value)):  # type: ignore[arg-type]
            out[field.name] = _plain(getattr(value, field.name))
        return out
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


class _Transcript:
    """Taps both machines of a Pair and renders each call as one JSON line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.machines: dict[str, ClientSession | GatewaySession] = {}

    def attach(self, side: str, machine: ClientSession | GatewaySession):  # type: ignore[no-untyped-def]
        self.machines[side] = machine
        for action in machine.creation_events():
            if isinstance(action, EmitEvent):
                self.lines.append(f"{side} event {action.to_json_line()}")

        def tap(event: object, now: float, actions: list[object]) -> None:
            record = {
                "side": side,
                "now": now,
                "input": _plain(event),
                "actions": [_plain(a) for a in actions],
                "record": _plain(machine.record),
                "next_deadline": machine.next_deadline(),
            }
            self.lines.append(f"{side} step " + json.dumps(record, sort_keys=True, separators=(",", ":")))
            for action in actions:
                if isinstance(action, EmitEvent):
                    self.lines.append(f"{side} event {action.to_json_line()}")

        return tap


def scenario_lines() -> list[str]:
    """Drive the storm scenario (``tests.pair.storm``); every decision and event, one line each."""
    transcript = _Transcript()
    storm(Pair.start(policy=STORM_POLICY, attach=transcript.attach))
    return transcript.lines


def _render(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


_SCRIPT = (
    "import sys\n"
    "from tests.core.test_determinism import scenario_lines, _render\n"
    "sys.stdout.buffer.write(_render(scenario_lines()))\n"
)


def _run_in_fresh_process(hash_seed: str) -> bytes:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_the_scenario_exercises_what_it_claims() -> None:
    lines = scenario_lines()
    text = "\n".join(lines)
    for needle in (
        '"kind":"TRANSPORT_SWITCH"',
        '"kind":"SECURITY_EVENT"',
        '"reason":"REPLAYED_NONCE"',
        '"reason":"OPERATOR_PIN"',
        '"reason":"PREFERRED_PATH_RESTORED"',
        '"kind":"SWITCH_DENIED"',
        '"to_state":"RECOVERING"',
        '"to_state":"DEGRADED"',
        '"to_state":"TERMINATED"',
        '"type":"SendReattach"',
        '"type":"BindTransport"',
        '"type":"ReleaseTransport"',
        '"type":"Terminate"',
    ):
        assert needle in text, needle


def test_same_inputs_give_identical_bytes_twice_in_one_process() -> None:
    first = _render(scenario_lines())
    second = _render(scenario_lines())
    assert first == second
    assert len(first) > 10_000


def test_same_inputs_give_identical_bytes_across_processes_and_hash_seeds() -> None:
    here = _render(scenario_lines())
    outputs = {seed: _run_in_fresh_process(seed) for seed in ("0", "1", "4242")}
    for seed, out in outputs.items():
        if out != here:
            ours, theirs = here.decode().splitlines(), out.decode().splitlines()
            first = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
            )
            raise AssertionError(
                f"PYTHONHASHSEED={seed}: output differs from line {first + 1}:\n"
                f"  here:  {ours[first] if first < len(ours) else '<end>'}\n"
                f"  there: {theirs[first] if first < len(theirs) else '<end>'}"
            )
