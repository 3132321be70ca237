"""Pinned policies that more than one test file relies on: one named object per purpose.

Each is pinned in full (every field the scenarios exercise is set explicitly) so
that retuning the laptop defaults in ``jvpn_trio/core/policy.py`` never changes
what a test means.  Two tests that need the same bounds for the same reason use
the same object from here; a test that deliberately needs other values keeps its
own policy next to it, with a comment saying why (e.g. the exhaustive
exploration's small bounds, the health tests' thresholds, the what-if policy of
the replay tests).
"""

from __future__ import annotations

import attrs

from jvpn_trio.core.policy import Policy

#: The storm scenario's policy (``tests.pair.storm``; the determinism, audit and replay
#: tests, and the golden trace): fast probing, a 4-per-minute switch budget that the storm
#: exhausts, and a 2 s loss TTL so that going dark ends the session within the script.
STORM_POLICY = Policy(
    max_recovery_window_ms=800,
    max_switches_per_minute=4,
    transport_loss_ttl_ms=2_000,
    session_ttl_s=120,
    loss_threshold_pct=20.0,
    latency_threshold_ms=120.0,
    jitter_threshold_ms=60.0,
    probe_interval_ms=100,
    probe_timeout_ms=200,
    dead_after_missed_probes=3,
    loss_window_probes=10,
    min_dwell_ms=0,
    return_dwell_ms=500,
    reattach_timeout_ms=150,
    freshness_window_ms=2_000,
)

#: Laptop-like bounds with no dwell and a 10-probe loss window, so a scripted scenario
#: switches (and switches back) on the first probe round that allows it.  The formal
#: properties' hand-made scenario runs under it, and the policies below derive from it.
SCENARIO_POLICY = Policy(
    max_recovery_window_ms=3_000,
    max_switches_per_minute=6,
    transport_loss_ttl_ms=30_000,
    session_ttl_s=43_200,
    loss_threshold_pct=10.0,
    latency_threshold_ms=150.0,
    jitter_threshold_ms=50.0,
    probe_interval_ms=50,
    probe_timeout_ms=200,
    dead_after_missed_probes=3,
    loss_window_probes=10,
    min_dwell_ms=0,
    return_dwell_ms=0,
    reattach_timeout_ms=250,
    freshness_window_ms=5_000,
)

#: Every path dead: RECOVERING for 1 s, then DEGRADED, then TERMINATED 5 s after the
#: binding was lost -- bounds short enough to reach, and to step past, in a test.
SHORT_RECOVERY_POLICY = attrs.evolve(SCENARIO_POLICY, transport_loss_ttl_ms=5_000, max_recovery_window_ms=1_000)

#: One switch per minute: a gateway's second accepted REATTACH within the minute is
#: rate-limited (DEGRADED) until the first leaves the 60 s window.
ONE_SWITCH_A_MINUTE = attrs.evolve(SCENARIO_POLICY, max_switches_per_minute=1)
