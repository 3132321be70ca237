"""The event-log auditor: real logs pass, and each kind of broken log is caught where it breaks.

Determinism rules: no clock, no sockets.  Good logs come from a client/gateway
:class:`~tests.pair.Pair` driven through the storm scenario (``tests.pair.storm``); bad logs are a small
hand-written session (:func:`good_session`) with exactly one thing spoiled, so each
test names the check that must fire and the line it must point at.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from jvpn_trio.tools.audit import CHECKS, DEFAULT_TIMER_SLACK_S, AuditReport, audit_events, audit_lines, main, render_text
from jvpn_trio.core.policy import Policy
from tests.pair import Pair, storm
from tests.policies import STORM_POLICY

FP = STORM_POLICY.fingerprint
SID = "000102030405060708090a0b0c0d0e0f"
OTHER_SID = "ffeeddccbbaa99887766554433221100"
B1, B2, B3 = "p1@192.0.2.1:51820", "p2@192.0.2.2:51820", "p3@192.0.2.3:51820"


def ev(kind: str, t: float, version: int, reason: str, *, session: str = SID, role: str = "client", **details: Any) -> dict[str, Any]:
    return {"kind": kind, "t": t, "version": version, "reason": reason, "session": session, "role": role, "policy": FP, **details}


def sc(t: float, version: int, reason: str, from_state: str | None, to_state: str, binding: str | None, **extra: Any) -> dict[str, Any]:
    return ev("STATE_CHANGE", t, version, reason, from_state=from_state, to_state=to_state, binding=binding, **extra)


def switch(t: float, version: int, cause: str, from_path: str | None, to_path: str, binding: str) -> dict[str, Any]:
    return ev("TRANSPORT_SWITCH", t, version, cause, from_path=from_path, to_path=to_path, binding=binding, switches_last_minute=1)


def good_session() -> list[dict[str, Any]]:
    """A client session that is born, loses a link, switches, degrades on the rate, and closes."""
    return [
        sc(0.0, 0, "SESSION_CREATED", None, "BIRTH", None),                       # line 1
        sc(0.0, 1, "HANDSHAKE_COMPLETE", "BIRTH", "ATTACHED", B1),                # line 2
        ev("PATH_HEALTH", 0.5, 1, "LINK_DOWN", path="p1", verdict="DEAD"),        # line 3
        sc(0.5, 2, "LINK_DOWN", "ATTACHED", "RECOVERING", None, path="p1"),       # line 4
        sc(0.6, 3, "REATTACH_CONFIRMED", "RECOVERING", "ATTACHED", B2),           # line 5
        switch(0.6, 3, "LINK_DOWN", "p1", "p2", B2),                              # line 6
        sc(1.0, 4, "LOSS_ABOVE_THRESHOLD", "ATTACHED", "VOLATILE", B2, path="p2"),  # line 7
        ev("SWITCH_DENIED", 1.0, 4, "SWITCH_RATE_EXCEEDED", target="p3"),         # line 8
        sc(1.0, 5, "SWITCH_RATE_EXCEEDED", "VOLATILE", "DEGRADED", B2),           # line 9
        sc(2.0, 6, "LOCAL_CLOSE", "DEGRADED", "TERMINATED", None),                # line 10
    ]


def lines_of(events: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(e, sort_keys=True) for e in events]


def audit(events: list[dict[str, Any]], **kwargs: Any) -> AuditReport:
    return audit_lines(lines_of(events), policy=STORM_POLICY, role=kwargs.pop("role", "client"), **kwargs)


def checks_at(report: AuditReport) -> set[tuple[str, int]]:
    return {(v.check, v.line) for v in report.violations}


# -- real logs pass -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "gateway"])
def test_logs_of_a_stormy_pair_pass(side: str) -> None:
    pair = storm(Pair.start(policy=STORM_POLICY))
    report = audit_events(pair.events(side), policy=STORM_POLICY, role=side)
    assert report.ok, render_text(side, report)
    (summary,) = report.sessions
    assert summary.termination == "TRANSPORT_LOSS_TTL_EXPIRED"
    assert summary.switches >= 3
    assert report.events == len(pair.events(side))


def test_the_hand_made_session_passes() -> None:
    report = audit(good_session())
    assert report.ok, render_text("good", report)
    (summary,) = report.sessions
    assert (summary.switches, summary.final_state, summary.termination) == (1, "TERMINATED", "LOCAL_CLOSE")
    assert summary.max_recovering_s == pytest.approx(0.1)


def test_a_gateway_log_may_hold_several_sessions() -> None:
    one = [dict(e, role="gateway") for e in good_session()[:7]]
    one.append(sc(2.0, 5, "PEER_CLOSE", "VOLATILE", "TERMINATED", None, role="gateway"))
    two = [dict(e, session=OTHER_SID, t=e["t"] + 0.25) for e in one]
    report = audit(sorted(one + two, key=lambda e: e["t"]), role="gateway")
    assert report.ok, render_text("gateway", report)
    assert [s.termination for s in report.sessions] == ["PEER_CLOSE", "PEER_CLOSE"]


# -- each broken rule is caught, at its line --------------------------------------------------------


def test_version_gap() -> None:
    events = good_session()
    events[6]["version"] = 5  # line 7 skips v4
    assert ("version", 7) in checks_at(audit(events))


def test_missing_transition_breaks_the_chain() -> None:
    events = good_session()
    del events[3]  # the LINK_DOWN transition is lost: REATTACH_CONFIRMED now comes "from RECOVERING" while ATTACHED
    found = checks_at(audit(events))
    assert ("version", 4) in found and ("transition", 4) in found


def test_two_bindings_a_switch_from_a_path_never_released() -> None:
    events = good_session()
    events[3] = sc(0.5, 2, "LOSS_ABOVE_THRESHOLD", "ATTACHED", "VOLATILE", B1, path="p1")  # p1 kept, not released
    events[4] = sc(0.6, 3, "REATTACH_CONFIRMED", "VOLATILE", "ATTACHED", B2)
    events[5] = switch(0.6, 3, "LOSS_ABOVE_THRESHOLD", "p3", "p2", B2)  # claims to come from p3: p1 never released
    report = audit(events)
    assert ("binding", 6) in checks_at(report)
    assert any("two bindings" in v.message for v in report.violations)


def test_two_bindings_a_binding_appearing_without_a_bind() -> None:
    events = good_session()
    events[6] = sc(1.0, 4, "LOSS_ABOVE_THRESHOLD", "ATTACHED", "VOLATILE", B3, path="p2")  # KEEP row, binding moved
    report = audit(events)
    assert ("binding", 7) in checks_at(report)
    assert any("two bindings" in v.message for v in report.violations)


def test_a_switch_without_its_transition() -> None:
    events = good_session()
    events.insert(7, switch(1.0, 4, "OPERATOR_PIN", "p2", "p3", B3))  # line 8: the binding "moves" by itself
    assert ("switch", 8) in checks_at(audit(events))


def test_a_confirmed_reattach_without_its_switch_event() -> None:
    events = good_session()
    del events[5]
    assert ("switch", 5) in checks_at(audit(events))


def test_session_id_change() -> None:
    events = good_session()
    for e in events[6:]:
        e["session"] = OTHER_SID
    report = audit(events)
    assert ("session_id", 7) in checks_at(report)
    assert any("Property 1" in v.message for v in report.violations)


def test_a_new_session_without_terminating_the_old_one() -> None:
    events = good_session()[:7]
    events += [dict(e, session=OTHER_SID, t=e["t"] + 5.0) for e in good_session()]
    assert ("termination", 8) in checks_at(audit(events))


def test_termination_without_a_reason() -> None:
    events = good_session()
    del events[-1]["reason"]
    report = audit(events)
    assert ("termination", 10) in checks_at(report)


def test_termination_for_a_reason_that_is_not_one() -> None:
    events = good_session()
    events[-1]["reason"] = "RECOVERY_WINDOW_EXCEEDED"
    found = checks_at(audit(events))
    assert ("termination", 10) in found and ("transition", 10) in found


def test_transition_not_in_the_table() -> None:
    events = good_session()
    events[3] = sc(0.5, 2, "LINK_DOWN", "ATTACHED", "DEGRADED", None, path="p1")
    assert ("transition", 4) in checks_at(audit(events))


def test_unbounded_recovery_seen_by_a_later_line() -> None:
    events = good_session()[:5]
    events[4] = ev("PATH_HEALTH", 0.5 + 0.8, 2, "MISSED_PROBES", path="p2", verdict="DEAD")  # still RECOVERING at the bound
    report = audit(events)
    assert ("recovery", 5) in checks_at(report)


def test_recovery_bound_enforced_too_late() -> None:
    events = good_session()[:4]
    late = 0.5 + 0.8 + DEFAULT_TIMER_SLACK_S + 0.5
    events.append(sc(late, 3, "RECOVERY_WINDOW_EXCEEDED", "RECOVERING", "DEGRADED", None))
    assert ("recovery", 5) in checks_at(audit(events))
    on_time = good_session()[:4] + [sc(0.5 + 0.8 + 0.01, 3, "RECOVERY_WINDOW_EXCEEDED", "RECOVERING", "DEGRADED", None)]
    assert audit(on_time).ok


def test_unbound_beyond_the_transport_loss_ttl() -> None:
    events = good_session()[:4] + [
        sc(1.3, 3, "RECOVERY_WINDOW_EXCEEDED", "RECOVERING", "DEGRADED", None),
        ev("PATH_HEALTH", 2.6, 3, "MISSED_PROBES", path="p2", verdict="DEAD"),  # 2.1 s unbound, alive
    ]
    assert ("recovery", 6) in checks_at(audit(events))


def test_a_log_that_ends_while_recovering_too_long_is_caught_at_its_end() -> None:
    events = good_session()[:4] + [ev("PATH_HEALTH", 0.7, 2, "MISSED_PROBES", path="p2", verdict="DEAD")]
    assert audit(events).ok  # ends 0.2 s into recovery: fine
    events.append(ev("PATH_HEALTH", 3.0, 2, "NO_SAMPLES", path="p3", verdict="UNKNOWN"))
    assert "recovery" in {v.check for v in audit(events).violations}


def test_switch_rate_exceeded() -> None:
    events = good_session()[:6]
    t, version, paths = 0.6, 3, ["p2", "p3"]
    for i in range(4):  # four more switches within a minute: five in all, max 4
        t, version = t + 1.0, version + 1
        src, dst = paths[i % 2], paths[(i + 1) % 2]
        binding = B3 if dst == "p3" else B2
        events += [
            sc(t, version, "REATTACH_CONFIRMED", "ATTACHED", "ATTACHED", binding),
            switch(t, version, "PREFERRED_PATH_RESTORED", src, dst, binding),
        ]
    report = audit(events)
    assert ("switch_rate", len(events)) in checks_at(report)


def test_a_denied_switch_must_end_in_degraded() -> None:
    events = good_session()
    events[8] = sc(1.0, 5, "PATH_HEALTHY_AGAIN", "VOLATILE", "ATTACHED", B2)
    events[9]["from_state"] = "ATTACHED"
    assert ("switch_rate", 8) in checks_at(audit(events))


def test_time_going_backwards() -> None:
    events = good_session()
    events[6]["t"] = 0.1
    assert ("clock", 7) in checks_at(audit(events))


def test_transition_after_termination() -> None:
    events = good_session() + [sc(3.0, 7, "REATTACH_CONFIRMED", "TERMINATED", "ATTACHED", B1)]
    assert ("transition", 11) in checks_at(audit(events))


def test_policy_mismatch_is_named_once() -> None:
    report = audit_lines(lines_of(good_session()), policy=Policy(), role="client")
    assert [v.check for v in report.violations] == ["policy"]


def test_garbage_lines_and_wrong_roles() -> None:
    text = lines_of(good_session())
    text.insert(2, "not json")
    text.insert(3, json.dumps({"kind": "STATE_CHANGE"}))
    text[5] = text[5].replace('"role": "client"', '"role": "gateway"')
    report = audit_lines(text, policy=STORM_POLICY, role="client")
    found = checks_at(report)
    assert ("parse", 3) in found and ("reason", 4) in found and ("role", 6) in found


def test_every_check_name_is_documented() -> None:
    from jvpn_trio.tools import audit as module

    assert module.__doc__ is not None
    for name in CHECKS:
        assert f"``{name}``" in module.__doc__


def test_command_line(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(lines_of(good_session())) + "\n")
    broken = good_session()
    broken[6]["version"] = 9
    bad.write_text("\n".join(lines_of(broken)) + "\n")
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in STORM_POLICY.to_mapping().items() if k in {
        "max_recovery_window_ms", "max_switches_per_minute", "transport_loss_ttl_ms", "session_ttl_s",
        "loss_threshold_pct", "latency_threshold_ms", "jitter_threshold_ms", "probe_interval_ms",
        "probe_timeout_ms", "dead_after_missed_probes", "loss_window_probes", "min_dwell_ms",
        "return_dwell_ms", "reattach_timeout_ms", "freshness_window_ms",
    }) + "\n")
    assert main([str(good), "--policy", str(policy)]) == 0
    assert main([str(good), str(bad), "--policy", str(policy), "--json"]) == 1
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out[str(good)]["ok"] and not out[str(bad)]["ok"]
    assert main([str(tmp_path / "missing.jsonl")]) == 2
