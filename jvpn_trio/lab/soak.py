"""A chaos soak: random laptop faults for as long as asked, judged against the policy's bounds.

``jvpn-trio lab --soak MINUTES [--seed N]`` builds a scenario (:func:`soak_scenario`) whose
timeline is drawn from a seeded generator: one fault at a time on a random path (link down, a
blackhole, heavy loss, the address flushed and a new one in another subnet) or the gateway
killed with SIGKILL and started again; each held for a while, restored, then a quiet spell long
enough for the session to settle.  The lab runs it like any scenario (``lab/runner.py``), with
a TCP stream whose bytes are checked by SHA-256 and a 100 Hz probe stream through the tunnel,
and audits both event logs against the ten properties.  :func:`judge` then holds every fault's
outage to its bound (:func:`outage_bound_ms`), computed from the soak's policy, never measured.

The same seed gives the same timeline, so a failure can be run again.  The soak's policy is the
laptop default with the changes a fault every few seconds needs (:data:`SOAK_POLICY`): a switch
budget that many faults a minute do not exhaust, and the gateway-restart timers of the shipped
``gateway-restart`` scenario.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from jvpn_trio.core.policy import Policy
from jvpn_trio.lab.scenario import (
    ADD_ADDRESS,
    FLUSH_ADDRESS,
    KILL_GATEWAY,
    MAX_SUBNET,
    MIN_HOST,
    START_GATEWAY,
    Scenario,
    scenario_from_mapping,
)

LINK_DOWN = "link-down"
BLACKHOLE = "blackhole"
LOSS = "loss"
READDRESS = "readdress"
GATEWAY_RESTART = "gateway-restart"
#: The faults drawn, with their weights: path faults often, a gateway restart now and then.
FAULT_WEIGHTS: Mapping[str, int] = {LINK_DOWN: 3, BLACKHOLE: 3, LOSS: 2, READDRESS: 2, GATEWAY_RESTART: 1}
#: The loss a LOSS fault sets, in percent: well above the policy's threshold.
LOSS_PCT = 30.0
#: The client's paths (interface, kind, priority), as in the built-in tour.
SOAK_PATHS = (("eth0", "ethernet", 10), ("wifi0", "wifi", 20), ("lte0", "lte", 30))
#: ``add-address`` hosts drawn from here (the lab's address plan allows more).
ADDRESS_HOSTS = (MIN_HOST, MIN_HOST + 1, MIN_HOST + 2)
#: The tunnel comes up before the first fault; the streams run past the last.
LEAD_S = 6.0
TAIL_S = 6.0
#: How long a fault is held, drawn uniformly; never shorter than a path fault's outage bound with
#: the soak's policy (3.35 s), so an outage over the bound shows whole in the fault step's window.
HOLD_S = (4.0, 8.0)
#: After a path fault is restored, quiet this long (drawn) so the session returns and settles.
QUIET_S = (3.0, 6.0)
#: After a gateway restart, quiet for its recovery bound plus this much.
GATEWAY_QUIET_MARGIN_S = 3.0
SHORTEST_SOAK_MINUTES = 0.5
LONGEST_SOAK_MINUTES = 24 * 60.0

#: The soak's policy over the laptop default: a fault every few seconds would exhaust the default
#: switch budget (then SWITCH_DENIED and DEGRADED are correct, but say nothing new), and the
#: gateway-restart timers are those of the shipped ``gateway-restart`` scenario.
SOAK_POLICY: Mapping[str, int] = {
    "max_switches_per_minute": 30,
    "min_dwell_ms": 500,
    "return_dwell_ms": 1500,
    "transport_loss_ttl_ms": 4000,
    "handshake_retry_ms": 500,
    "reconnect_max_ms": 2000,
}


class SoakError(ValueError):
    """A soak that cannot be built (length out of range); one line."""


def outage_bound_ms(kind: str, policy: Policy, *, paths: int = len(SOAK_PATHS)) -> float | None:
    """The longest outage a fault step may cause under ``policy``; None: the step's outage is the fault.

    A path fault (and its restore): the active path is declared dead within the death detection
    bound and the session is on another path within the recovery window.  The gateway's start:
    a handshake round that began just before it goes on unanswered (one attempt per path, each
    waiting ``handshake_retry_ms``: core/agent.py, "Rounds"), then the agent's longest wait
    between rounds, then the death detection bound for the half-dead session the new one
    replaces.  The gateway's kill has no bound: traffic stops until it is started again, by design.
    """
    if kind == KILL_GATEWAY:
        return None  # traffic stops until the gateway is started again
    if kind == START_GATEWAY:
        return float(policy.reconnect_max_ms + paths * policy.handshake_retry_ms + policy.death_detection_bound_ms)
    return float(policy.death_detection_bound_ms + policy.max_recovery_window_ms)


def _fault_steps(kind: str, path: str, at: float, hold: float, rng: random.Random) -> list[dict[str, Any]]:
    restore = {"at_s": round(at + hold, 3), "path": path, "set": {"restore": True}, "note": f"{kind} restored"}
    if kind == LINK_DOWN:
        return [{"at_s": at, "path": path, "set": {"link": "down"}, "note": "link down"}, restore]
    if kind == BLACKHOLE:
        return [{"at_s": at, "path": path, "set": {"blackhole": True}, "note": "blackhole"}, restore]
    if kind == LOSS:
        return [{"at_s": at, "path": path, "set": {"loss_pct": LOSS_PCT}, "note": f"{LOSS_PCT:g} % loss"}, restore]
    if kind == READDRESS:
        subnet, host = rng.randint(0, MAX_SUBNET), rng.choice(ADDRESS_HOSTS)
        return [
            {"at_s": at, "path": path, "do": FLUSH_ADDRESS, "note": "address flushed"},
            {"at_s": round(at + hold, 3), "path": path, "do": ADD_ADDRESS, "subnet": subnet, "host": host,
             "note": f"new address: subnet {subnet}, host {host}"},
        ]  # fmt: skip
    return [
        {"at_s": at, "do": KILL_GATEWAY, "note": "gateway SIGKILL"},
        {"at_s": round(at + hold, 3), "do": START_GATEWAY, "note": "gateway started again"},
    ]


def soak_scenario(minutes: float, *, seed: int) -> Scenario:
    """The soak's scenario: ``minutes`` of random faults drawn from ``seed`` (ScenarioError never: the
    timeline is built to be valid, and the scenario parser checks it all the same)."""
    if not SHORTEST_SOAK_MINUTES <= minutes <= LONGEST_SOAK_MINUTES:
        raise SoakError(f"--soak: expected {SHORTEST_SOAK_MINUTES:g} to {LONGEST_SOAK_MINUTES:g} minutes, got {minutes:g}")
    duration = minutes * 60.0
    rng = random.Random(seed)
    policy = Policy.from_mapping(SOAK_POLICY)
    gateway_quiet = (outage_bound_ms(START_GATEWAY, policy) or 0.0) / 1000.0 + GATEWAY_QUIET_MARGIN_S
    kinds, weights = list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values())
    steps: list[dict[str, Any]] = []
    at = LEAD_S
    while True:
        kind = rng.choices(kinds, weights)[0]
        hold = round(rng.uniform(*HOLD_S), 3)
        quiet = gateway_quiet if kind == GATEWAY_RESTART else rng.uniform(*QUIET_S)
        if at + hold + quiet > duration - TAIL_S:
            break
        path = rng.choice(SOAK_PATHS)[0]
        steps += _fault_steps(kind, path, round(at, 3), hold, rng)
        at += hold + quiet
    data = {
        "name": f"soak-{seed}",
        "description": f"{minutes:g} min of random faults (seed {seed})",
        "duration_s": duration,
        "path": [{"name": n, "kind": k, "priority": p} for n, k, p in SOAK_PATHS],
        "step": steps,
        "policy": dict(SOAK_POLICY),
    }
    return scenario_from_mapping(data, source=f"soak seed {seed}")


def judge(report: Mapping[str, Any], policy: Policy) -> dict[str, Any]:
    """The soak's verdict on a lab report: every fault's outage within its bound, with the run's own
    checks (invariants, TCP bytes, replay).  Pure."""
    by_kind: dict[str, dict[str, Any]] = {}
    late: list[str] = []
    faults: Sequence[Mapping[str, Any]] = report.get("faults") or []
    for row in faults:
        kind = str(row.get("kind") or row.get("changes"))
        outage = row.get("outage_ms")
        bound = outage_bound_ms(kind, policy)
        entry = by_kind.setdefault(kind, {"count": 0, "max_outage_ms": None, "bound_ms": bound})
        entry["count"] += 1
        if outage is not None:
            entry["max_outage_ms"] = max(entry["max_outage_ms"] or 0.0, float(outage))
        if bound is not None and (outage is None or float(outage) > bound):
            shown = "no traffic measured" if outage is None else f"{float(outage):.0f} ms"
            late.append(f"step {row.get('index')} ({kind} on {row.get('path')} at {row.get('at_s')} s): {shown} > {bound:.0f} ms")
    tcp = report.get("tcp") or {}
    invariants = report.get("invariants") or {}
    return {
        "faults": len(faults),
        "by_kind": by_kind,
        "outages_over_bound": late,
        "invariant_violations": invariants.get("violations"),
        "tcp_bytes_checked": tcp.get("bytes_received") if tcp.get("intact") else 0,
        "tcp_intact": bool(tcp.get("intact")),
        "ok": bool(report.get("ok")) and not late,
    }


def render(verdict: Mapping[str, Any]) -> list[str]:
    """The soak's lines at the end of the lab report."""
    lines = ["", f"soak: {verdict['faults']} fault steps, "
             f"{verdict['invariant_violations']} invariant violations, "
             f"TCP {'intact' if verdict['tcp_intact'] else 'NOT intact'} ({verdict['tcp_bytes_checked']} bytes checked)"]  # fmt: skip
    for kind, entry in sorted(verdict["by_kind"].items()):
        bound = "no bound (the fault itself)" if entry["bound_ms"] is None else f"bound {entry['bound_ms']:.0f} ms"
        worst = "-" if entry["max_outage_ms"] is None else f"{entry['max_outage_ms']:.0f} ms"
        lines.append(f"  {kind}: {entry['count']} steps, longest outage {worst}, {bound}")
    for problem in verdict["outages_over_bound"]:
        lines.append(f"  OVER BOUND: {problem}")
    lines.append(f"soak: {'ok' if verdict['ok'] else 'FAILED'}")
    return lines
