"""The chaos soak: its timeline (pure, seeded), its bounds, its verdict; and two minutes of it in a lab (root).

The timeline and the verdict are pure functions, tested on their own.  The lab run is what CI
runs of the soak (issue 15: two minutes); the closing note reports a longer one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.core.policy import Policy
from jvpn_trio.lab import soak
from jvpn_trio.lab.runner import add_arguments, check_run, render_report, run_scenario
from jvpn_trio.lab.scenario import KILL_GATEWAY, START_GATEWAY
from tests.netns import requires_lab, unique_prefix

POLICY = Policy.from_mapping(soak.SOAK_POLICY)


def test_the_same_seed_draws_the_same_timeline_and_another_seed_another() -> None:
    first, again, other = (soak.soak_scenario(5, seed=s) for s in (3, 3, 4))
    assert first == again
    assert first.steps != other.steps
    assert first.name == "soak-3" and first.policy == POLICY


@pytest.mark.parametrize("seed", range(20))
def test_every_fault_is_held_restored_and_followed_by_a_quiet_spell(seed: int) -> None:
    scenario = soak.soak_scenario(10, seed=seed)
    steps = scenario.steps
    assert len(steps) % 2 == 0 and steps, "faults come in pairs: apply, restore"
    assert steps[0].at_s >= soak.LEAD_S
    assert steps[-1].at_s <= scenario.duration_s - soak.TAIL_S
    for apply, restore in zip(steps[::2], steps[1::2]):
        assert apply.path == restore.path
        hold = restore.at_s - apply.at_s
        assert soak.HOLD_S[0] <= hold <= soak.HOLD_S[1] + 0.001
        if apply.kind == KILL_GATEWAY:
            assert restore.kind == START_GATEWAY
        # A path fault is held longer than its outage bound: an outage over it shows whole in one window.
        bound = soak.outage_bound_ms(apply.kind or "set", POLICY)
        if apply.kind != KILL_GATEWAY:
            assert bound is not None and hold * 1000 > bound
    for restore, following in zip(steps[1::2], steps[2::2]):
        quiet = following.at_s - restore.at_s
        assert quiet >= soak.QUIET_S[0]
        if restore.kind == START_GATEWAY:
            assert quiet * 1000 >= (soak.outage_bound_ms(START_GATEWAY, POLICY) or 0)


def test_a_long_soak_draws_every_kind_of_fault() -> None:
    scenario = soak.soak_scenario(30, seed=1)
    kinds = {s.kind or dict(s.changes).popitem()[0] for s in scenario.steps[::2]}
    assert kinds == {"link", "blackhole", "loss_pct", "flush-address", KILL_GATEWAY}
    assert {s.path for s in scenario.steps[::2]} >= {"eth0", "wifi0", "lte0"}


@pytest.mark.parametrize("minutes", [0.0, 0.1, 24 * 60 + 1, float("nan")])
def test_a_soak_length_out_of_range_is_refused(minutes: float) -> None:
    with pytest.raises(soak.SoakError, match="--soak: expected"):
        soak.soak_scenario(minutes, seed=1)


def test_the_bounds_come_from_the_policy() -> None:
    assert soak.outage_bound_ms("link=down", POLICY) == 350 + 3000
    # A round of one attempt per path (3 x 500 ms) may just have begun when the gateway comes back.
    assert soak.outage_bound_ms(START_GATEWAY, POLICY) == 2000 + 3 * 500 + 350
    assert soak.outage_bound_ms(START_GATEWAY, POLICY, paths=1) == 2000 + 500 + 350
    assert soak.outage_bound_ms(KILL_GATEWAY, POLICY) is None
    slower = Policy.from_mapping({**soak.SOAK_POLICY, "max_recovery_window_ms": 3500})
    assert soak.outage_bound_ms("blackhole=True", slower) == 350 + 3500


def _report(*rows: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    return {"ok": ok, "faults": list(rows), "tcp": {"intact": ok, "bytes_received": 1000},
            "invariants": {"violations": 0 if ok else 1}}  # fmt: skip


def _row(index: int, kind: str | None, changes: str, outage_ms: float | None) -> dict[str, Any]:
    return {"index": index, "kind": kind, "changes": changes, "outage_ms": outage_ms, "path": "eth0", "at_s": 1.0}


def test_the_verdict_holds_every_outage_to_its_bound() -> None:
    rows = [_row(1, None, "link=down", 40.0), _row(2, None, "restore=True", 0.0),
            _row(3, KILL_GATEWAY, "", 5000.0), _row(4, START_GATEWAY, "", 2100.0)]  # fmt: skip
    verdict = soak.judge(_report(*rows), POLICY)
    assert verdict["ok"] and verdict["outages_over_bound"] == []
    assert verdict["by_kind"][KILL_GATEWAY] == {"count": 1, "max_outage_ms": 5000.0, "bound_ms": None}
    assert verdict["tcp_bytes_checked"] == 1000
    late = soak.judge(_report(_row(1, None, "blackhole=True", 3351.0)), POLICY)
    assert not late["ok"] and late["outages_over_bound"] == ["step 1 (blackhole=True on eth0 at 1.0 s): 3351 ms > 3350 ms"]
    unmeasured = soak.judge(_report(_row(1, None, "link=down", None)), POLICY)
    assert not unmeasured["ok"] and "no traffic measured" in unmeasured["outages_over_bound"][0]
    assert not soak.judge(_report(ok=False), POLICY)["ok"]  # a violation or a broken stream fails the soak
    assert any("OVER BOUND" in line for line in soak.render(late))


def test_the_command_refuses_a_soak_with_a_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    from jvpn_trio.lab import runner

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert runner.main(parser.parse_args(["--soak", "2", "--short"])) == runner.EXIT_USAGE
    assert "--soak builds its own timeline" in capsys.readouterr().err
    assert runner.main(parser.parse_args(["--soak", "0.1"])) == runner.EXIT_USAGE
    assert "--soak: expected" in capsys.readouterr().err


#: Two minutes of faults, plus the lab's set-up, the streams' tail and the audit.
SOAK_MINUTES = 2.0
RUN_BOUND_S = SOAK_MINUTES * 60 + 120


@requires_lab
async def test_two_minutes_of_random_faults_hold_every_bound(tmp_path: Path) -> None:
    scenario = soak.soak_scenario(SOAK_MINUTES, seed=2)
    with trio.fail_after(RUN_BOUND_S):
        run = await run_scenario(scenario, workdir=tmp_path, short=False, prefix=unique_prefix(), seed=1)
        report = await check_run(run)
    report["soak"] = verdict = soak.judge(report, scenario.policy)
    print("\n" + render_report(report))
    assert verdict["invariant_violations"] == 0
    assert verdict["tcp_intact"] and verdict["tcp_bytes_checked"] > 0
    assert verdict["outages_over_bound"] == []
    assert verdict["ok"], report["errors"]
