"""Hypothesis profiles for the property tests.

``HYPOTHESIS_PROFILE=ci`` (what CI sets) runs the stateful tests with enough
examples for >= 1,000 generated traces in total, derandomized so that every CI
run explores the same traces and a failure reproduces from the log alone.
The default ``dev`` profile is a quick local run with fresh random traces.
Both use ``deadline=None``: a trace's time is virtual, but its wall-clock cost
varies with how many timers a jump fires.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

#: Examples per stateful test in each profile (test_formal_properties.py has two).
STATEFUL_EXAMPLES = {"ci": 500, "dev": 60}

settings.register_profile(
    "ci",
    max_examples=STATEFUL_EXAMPLES["ci"],
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=STATEFUL_EXAMPLES["dev"],
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: The trace searches run untraced by coverage: under its tracer they take about 3x as long
#: (test_exhaustive 56 s plain, 172 s with --cov; 2026-12-03), and tests/core covers the code
#: they drive.  The fuzz tests stay traced: they reach parsers' error branches nothing else does.
UNTRACED_MODULES = frozenset(
    f"tests.properties.{name}" for name in ("test_exhaustive", "test_formal_properties", "test_replay_model")
)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in UNTRACED_MODULES:
            item.add_marker(pytest.mark.no_cover)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Say how much the generated-trace and exhaustive tests explored (numbers for the CI log)."""
    import sys

    lines = []
    stateful = sys.modules.get("tests.properties.test_formal_properties")
    if stateful is not None and stateful.RUN_STATS:
        stats = stateful.RUN_STATS
        lines.append(
            f"formal properties: {stats['traces']} generated traces, "
            f"{stats['client_steps']} client + {stats['gateway_steps']} gateway steps checked"
        )
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k != "traces"))
        from jvpn_trio.core.states import TRANSITIONS

        missing = sorted(f"{a.value}/{b.value}" for a, b in set(TRANSITIONS) - stateful.ROWS_SEEN)
        lines.append(
            f"  transition-table rows taken: {len(TRANSITIONS) - len(missing)}/{len(TRANSITIONS)}"
            + (f"; never taken: {', '.join(missing)}" if missing else "")
        )
    exhaustive = sys.modules.get("tests.properties.test_exhaustive")
    if exhaustive is not None and getattr(exhaustive, "LAST_REPORT", None):
        lines.append(f"exhaustive exploration: {exhaustive.LAST_REPORT}")
    if lines:
        terminalreporter.section("jvpn_trio property exploration")
        for line in lines:
            terminalreporter.write_line(line)
