"""Bounded exhaustive exploration: every order of an abstract event alphabet, up to a depth.

What is explored
----------------
A client/gateway :class:`~tests.pair.Pair` (three paths, priorities 10/20/30,
the small :data:`POLICY` below) starts attached on p1 after one healthy probe
round.  From there, breadth first, every event of :data:`ALPHABET` is applied
to every reached state, up to :data:`DEPTH` events::

    link1_down / link1_up      netlink says p1's interface went down / up
    blackhole_active           the path the client is bound to passes nothing
                               (link still up); no-op while unbound
    heal_all                   every blackhole lifted
    probe                      one probe round (acked where the link delivers)
    advance_probe_timeout      time moves on by probe_timeout_ms (+1 ms)
    advance_past_recovery      time moves on by max_recovery_window_ms (+1 ms)
    replay_attack              the last captured REATTACH, again, from an attacker
    stale_version_attack       a valid-looking REATTACH with the previous version
    pin3 / unpin               operator pins p3 / removes the pin

After every event both sides' new steps go through ``checks.TraceChecker``
(all ten properties, and ``invalid_transitions`` staying 0 at every step and
on the live machines), and the checkers themselves are part of the copied
state, so every path through the tree is checked as one whole trace.

What is abstracted (the dedupe key, :func:`abstract_state`)
-------------------------------------------------------------
Two reached states are merged when they agree on: both sides' state, version,
binding (path, and whether the gateway's endpoint is the client's or the
attacker's), switch times still in the rate window (as ages), unbound /
recovering / last-delivery ages; the client's pending reattach (target, age),
retry timer, pin, recovery cause and nonce lead over the gateway; per path
the link and blackhole flags, verdict and reason, consecutive misses, the
loss window's outcomes, outstanding probe ages and last-delivery age; the gateway's
clock offset; the replayable REATTACH's path, nonce lead, version lag and
timestamp skew.  Ages are rounded to 1 ms, relative to ``now``.
Not in the key: absolute time (the 600 s session TTL is out of reach at this
depth, so only relative ages can matter), RTT/jitter history (acks are
instantaneous here, so every sample is 0 ms), event logs, counters, and
captured REATTACHes older than the last.  States equal under the key are
assumed to have equal futures; that is the (documented) under-approximation.
"""

from __future__ import annotations

import collections
import copy
import time
from typing import Callable

import attrs
import pytest

from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.policy import SWITCH_RATE_WINDOW_S, Policy
from jvpn_trio.core.reattach import switches_in_window
from jvpn_trio.core.session import ClientSession, GatewaySession
from jvpn_trio.core.states import TRANSITIONS, ReasonCode, SessionState
from tests.pair import ATTACKER_ENDPOINT, DeadlineStuck, Pair, _install_tap
from tests.properties.checks import PairTracer, Recorder, TraceChecker, check_recorded

#: Small bounds, so that recovery windows, the switch rate and TTLs are reached within the depth
#: (deliberately none of tests/policies.py: those are for scripted scenarios seconds long).
POLICY = Policy(
    max_recovery_window_ms=500,
    max_switches_per_minute=2,
    transport_loss_ttl_ms=1_000,
    session_ttl_s=600,
    loss_threshold_pct=30.0,
    latency_threshold_ms=150.0,
    jitter_threshold_ms=100.0,
    probe_interval_ms=100,
    probe_timeout_ms=200,
    dead_after_missed_probes=2,
    loss_window_probes=4,
    min_dwell_ms=0,
    return_dwell_ms=0,
    reattach_timeout_ms=100,
    freshness_window_ms=1_000,
)

#: Events per explored sequence.  Chosen so the test stays well under a minute on a 2-core machine.
DEPTH = 6

#: Filled in by the test: what one run explored (printed in the pytest summary by conftest).
LAST_REPORT: str = ""


def _link1_down(pair: Pair) -> None:
    pair.set_link(1, up=False)


def _link1_up(pair: Pair) -> None:
    pair.set_link(1, up=True)


def _blackhole_active(pair: Pair) -> None:
    binding = pair.client.record.binding
    if binding is not None:
        pair.blackhole(binding.path.value, on=True)


def _heal_all(pair: Pair) -> None:
    for path in pair.links:
        pair.blackhole(path.value, on=False)


def _probe(pair: Pair) -> None:
    pair.probe_round()


def _advance_probe_timeout(pair: Pair) -> None:
    pair.advance(pair.policy.probe_timeout_ms / 1000.0 + 0.001)


def _advance_past_recovery(pair: Pair) -> None:
    pair.advance(pair.policy.max_recovery_window_ms / 1000.0 + 0.001)


def _replay_attack(pair: Pair) -> None:
    pair.attack("replay")


def _stale_version_attack(pair: Pair) -> None:
    pair.attack("stale_version", path=3)


def _pin3(pair: Pair) -> None:
    pair.pin(3)


def _unpin(pair: Pair) -> None:
    pair.pin(None)


ALPHABET: dict[str, Callable[[Pair], None]] = {
    "link1_down": _link1_down,
    "link1_up": _link1_up,
    "blackhole_active": _blackhole_active,
    "heal_all": _heal_all,
    "probe": _probe,
    "advance_probe_timeout": _advance_probe_timeout,
    "advance_past_recovery": _advance_past_recovery,
    "replay_attack": _replay_attack,
    "stale_version_attack": _stale_version_attack,
    "pin3": _pin3,
    "unpin": _unpin,
}


# =============================================================================
# Nodes: a pair plus the checkers that have seen its whole history
# =============================================================================


@attrs.define
class Node:
    pair: Pair
    checkers: dict[str, TraceChecker]
    recorders: dict[str, Recorder]
    path: tuple[str, ...]


def _root() -> Node:
    tracer = PairTracer()
    pair = Pair.start(policy=POLICY, attach=tracer.attach)
    pair.advance(POLICY.probe_interval_ms / 1000.0)
    pair.probe_round()
    node = Node(pair=pair, checkers=tracer.checkers, recorders=tracer.recorders, path=())
    _check(node)
    return node


def _check(node: Node) -> None:
    check_recorded(node.checkers, node.recorders, forget=True)


def _clone(node: Node, event: str) -> Node:
    """A deep copy of the node (machines, links, checkers) with fresh taps on the copied machines."""
    pair = node.pair
    pair.client_log.clear()
    pair.gateway_log.clear()
    del pair.captured[:-1]  # only the last capture is replayable by the alphabet
    taps = (pair.client.__dict__.pop("handle"), pair.gateway.__dict__.pop("handle"))
    try:
        pair_copy, checkers = copy.deepcopy((pair, node.checkers))
    finally:
        pair.client.handle, pair.gateway.handle = taps  # type: ignore[method-assign]
    recorders = {
        "client": Recorder(pair_copy.client, resume=True),
        "gateway": Recorder(pair_copy.gateway, resume=True),
    }
    _install_tap(pair_copy.client, recorders["client"].tap)
    _install_tap(pair_copy.gateway, recorders["gateway"].tap)
    return Node(pair=pair_copy, checkers=checkers, recorders=recorders, path=node.path + (event,))


# =============================================================================
# The abstraction
# =============================================================================


def _age(now: float, t: float | None) -> float | None:
    return None if t is None else round(now - t, 3)


def _side_key(machine: ClientSession | GatewaySession, now: float) -> tuple[object, ...]:
    rec = machine.record
    return (
        rec.state.value,
        rec.version,
        rec.binding.path.value if rec.binding else None,
        tuple(_age(now, t) for t in rec.switch_times if t > now - SWITCH_RATE_WINDOW_S),
        _age(now, rec.unbound_since) if rec.binding is None else None,
        _age(now, rec.recovering_since),
        rec.last_path.value if rec.last_path else None,
    )


def abstract_state(pair: Pair) -> tuple[object, ...]:
    """The dedupe key of the module docstring: both machines and the network, relative to ``now``."""
    now = pair.now
    client, gateway = pair.client, pair.gateway
    paths = []
    for path, entry in sorted(client._paths.items()):
        verdict = entry.health.verdict(now=now)
        stats = entry.health.stats(now=now)
        outstanding = tuple(
            (_age(now, sent), _age(now, deadline), in_window)
            for sent, deadline, in_window in entry.health._outstanding.values()
        )
        link = pair.links[path]
        paths.append(
            (
                path.value,
                link.up,
                link.passes,
                verdict.verdict.value,
                verdict.reason.value,
                stats.consecutive_missed,
                tuple(entry.health._outcomes),  # the loss window itself, not just today's percentage
                stats.jitter_ms is None,
                outstanding,
                _age(now, stats.last_delivery),
                _age(now, entry.health._unanswered_since),
                _age(now, stats.healthy_since) is not None,
            )
        )
    pending = client.pending
    gw_binding = gateway.record.binding
    last = pair.captured[-1] if pair.captured else None
    replayable = None
    if last is not None:
        expected_ts = (now - gateway.record.created_at) * 1000.0 - gateway.clock_offset_ms
        replayable = (
            last.path.value,
            last.nonce - gateway.last_nonce,
            gateway.record.version - last.expected_version,
            round(last.client_ts_ms - expected_ts),
        )
    return (
        _side_key(client, now),
        (
            pending.path.value if pending else None,
            _age(now, pending.sent_at) if pending else None,
            _age(now, client._retry_not_before),
            client.pinned.value if client.pinned else None,
            client._recovery_cause.value if client._recovery_cause else None,
            client._next_nonce - 1 - gateway.last_nonce,
            client.gateway_version - gateway.record.version,
        ),
        tuple(paths),
        _side_key(gateway, now),
        (
            gw_binding is not None and gw_binding.endpoint == ATTACKER_ENDPOINT,
            _age(now, gateway.last_delivery),
            round(gateway.clock_offset_ms),
        ),
        replayable,
    )


# =============================================================================
# The exploration
# =============================================================================


@attrs.frozen
class Exploration:
    depth: int
    distinct_states: int
    transitions_run: int
    merged: int
    per_depth: tuple[int, ...]
    sequences_covered: int
    seconds: float
    steps_checked: int
    session_states: tuple[tuple[str, int], ...]  # ("client:DEGRADED", distinct states with it), ...
    rows_taken: int  # rows of states.TRANSITIONS some explored step took
    rate_limit_reached: int  # distinct states where a side has max_switches_per_minute in its window


def explore(depth: int = DEPTH) -> Exploration:
    """Breadth first over ALPHABET to ``depth``, checking every step; raises on the first violation."""
    started = time.perf_counter()
    root = _root()
    seen = {abstract_state(root.pair)}
    frontier = [root]
    transitions = merged = steps = 0
    per_depth = [1]
    reached: collections.Counter[str] = collections.Counter()
    rows: set[tuple[str, str]] = set()
    at_limit = 0
    for level in range(depth):
        last_level = level == depth - 1
        next_frontier: list[Node] = []
        new_states = 0
        for node in frontier:
            for name, apply in ALPHABET.items():
                child = _clone(node, name)
                try:
                    apply(child.pair)
                except DeadlineStuck as stuck:  # pragma: no cover - only if the core regresses
                    raise AssertionError(f"after {' -> '.join(child.path)}: {stuck}") from stuck
                for recorder in child.recorders.values():
                    steps += len(recorder.steps)
                    for step in recorder.steps:
                        for action in step.actions:
                            if isinstance(action, EmitEvent) and action.kind is EventKind.STATE_CHANGE:
                                rows.add((str(action.detail("from_state")), action.reason.value))
                try:
                    _check(child)
                except AssertionError as exc:
                    raise AssertionError(f"after {' -> '.join(child.path)}:\n{exc}") from exc
                transitions += 1
                key = abstract_state(child.pair)
                if key in seen:
                    merged += 1
                    continue
                seen.add(key)
                new_states += 1
                if not last_level:  # leaves are checked, never expanded: no need to keep them
                    next_frontier.append(child)
                pair = child.pair
                for side, machine in (("client", pair.client), ("gateway", pair.gateway)):
                    reached[f"{side}:{machine.record.state.value}"] += 1
                if any(
                    switches_in_window(m.record.switch_times, pair.now) >= POLICY.max_switches_per_minute
                    for m in (pair.client, pair.gateway)
                ):
                    at_limit += 1
        per_depth.append(new_states)
        frontier = next_frontier
    k = len(ALPHABET)
    return Exploration(
        depth=depth,
        distinct_states=len(seen),
        transitions_run=transitions,
        merged=merged,
        per_depth=tuple(per_depth),
        sequences_covered=sum(k**d for d in range(1, depth + 1)),
        seconds=time.perf_counter() - started,
        steps_checked=steps,
        session_states=tuple(sorted(reached.items())),
        rows_taken=len({(a, b) for a, b in rows if a != "None"}),
        rate_limit_reached=at_limit,
    )


def test_every_order_of_the_alphabet_up_to_depth_keeps_all_ten_properties() -> None:
    global LAST_REPORT
    result = explore(DEPTH)
    LAST_REPORT = (
        f"depth {result.depth} over {len(ALPHABET)} events: {result.distinct_states} distinct abstract states "
        f"(new per depth {list(result.per_depth)}), {result.transitions_run} transitions run and checked "
        f"({result.steps_checked} machine steps), {result.merged} merged into known states; "
        f"{result.sequences_covered} event sequences of length 1..{result.depth} covered up to the abstraction; "
        f"{result.rows_taken}/{len(TRANSITIONS)} table rows taken; states where a side is at the switch limit: "
        f"{result.rate_limit_reached}; per session state: {dict(result.session_states)}; {result.seconds:.1f} s"
    )
    print(LAST_REPORT)
    # It explored for real: the frontier did not die out early, and the depth was reached.
    assert result.per_depth[-1] > 0
    assert result.distinct_states > 1_000
    reached = dict(result.session_states)
    for state in ("ATTACHED", "RECOVERING", "DEGRADED", "TERMINATED"):
        assert reached.get(f"client:{state}", 0) > 0, state
    assert result.rate_limit_reached > 0


def test_the_abstraction_tells_apart_what_the_properties_care_about() -> None:
    root = _root()
    base = abstract_state(root.pair)
    for name, apply in ALPHABET.items():
        child = _clone(root, name)
        apply(child.pair)
        _check(child)
        if name in ("link1_down", "blackhole_active", "probe", "advance_probe_timeout", "pin3"):
            assert abstract_state(child.pair) != base, name
    # Cloning copies, it does not share: the root is untouched by its children.
    assert abstract_state(root.pair) == base


def test_the_exploration_reports_a_transition_the_table_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a row that losing the active link takes, the first such sequence fails, and says why."""
    monkeypatch.delitem(TRANSITIONS, (SessionState.ATTACHED, ReasonCode.LINK_DOWN))
    with pytest.raises(AssertionError, match=r"invalid_transitions'\] went 0 -> 1") as info:
        explore(depth=1)
    assert str(info.value).startswith("after link1_down:\nProperty 3 ")
