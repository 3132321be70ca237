"""A real gateway under a 20k/s HANDSHAKE_INIT flood keeps its live session and lets a new client in (root).

Runs ``scripts/handshake_flood.py`` (its own lab: namespaces with a unique prefix, real
``serve`` and ``up``, removed on any exit) for a short flood; the long figures are in
docs/threat-model.md, "Handshake floods".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import trio

from jvpn_trio.core.cookie import HandshakeLimits
from tests.netns import requires_root

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "handshake_flood.py"
FLOOD_S = 8.0
RATE = 20_000
#: Lab setup, the flood and teardown, with room to spare.
TEST_BOUND_S = 120


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("handshake_flood", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_root
async def test_a_single_source_flood_leaves_the_stream_whole_and_a_newcomer_gets_in(tmp_path: Path) -> None:
    with trio.fail_after(TEST_BOUND_S):
        result = await _script().measure_one("single", FLOOD_S, RATE, tmp_path)
    assert result["attack"]["sent"] >= RATE * FLOOD_S * 0.9
    assert result["stream"]["loss_pct"] < 1.0 and result["stream"]["max_gap_ms"] < 200, result
    assert result["newcomer"]["ok"], result
    assert result["gateway_counters"]["handshake_source_limited"] > RATE * FLOOD_S * 0.9


@requires_root
async def test_a_random_source_flood_costs_the_gateway_bounded_work(tmp_path: Path) -> None:
    limits = HandshakeLimits()
    with trio.fail_after(TEST_BOUND_S):
        result = await _script().measure_one("random", FLOOD_S, RATE, tmp_path)
    counters = result["gateway_counters"]
    assert result["attack"]["sent"] >= RATE * FLOOD_S * 0.9
    # DH work: only what got in before the load meter tripped (spoofed sources never get a cookie back).
    assert counters.get("handshake_unknown_peer", 0) <= limits.under_load_per_s + limits.queue_capacity
    assert counters["handshake_cookie_reply"] <= limits.cookie_replies_per_s * (FLOOD_S + 2)
    assert counters["handshake_cookie_limited"] > 0
