"""switching.decide: one table row per branch, the ranking order, and the dwell/rate edges (Property 6).

Determinism: pure function of (view, candidates, policy, now); times are exact
floats.  POLICY pins ``min_dwell_ms`` = 2000 and ``return_dwell_ms`` = 5000.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest

from jvpn_trio.core.health import Verdict
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import DEFAULT_POLICY, Policy
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from jvpn_trio.core.switching import Candidate, Decision, DecisionKind, SwitchView, decide, rank

POLICY = attrs.evolve(DEFAULT_POLICY, min_dwell_ms=2_000, return_dwell_ms=5_000)
P1, P2, P3, P4 = PathId(1), PathId(2), PathId(3), PathId(4)
H, I, U, D = Verdict.HEALTHY, Verdict.IMPAIRED, Verdict.UNKNOWN, Verdict.DEAD
STAY, SWITCH, DEGRADE = DecisionKind.STAY, DecisionKind.SWITCH, DecisionKind.DEGRADE

DEFAULT_REASON = {
    H: R.WITHIN_THRESHOLDS,
    I: R.LOSS_ABOVE_THRESHOLD,
    U: R.NO_SAMPLES,
    D: R.MISSED_PROBES,
}


def cand(
    path: PathId,
    priority: int,
    verdict: Verdict,
    *,
    reason: R | None = None,
    healthy_since: float | None = None,
    metered: bool = False,
) -> Candidate:
    return Candidate(
        path=path,
        priority=priority,
        verdict=verdict,
        reason=reason or DEFAULT_REASON[verdict],
        healthy_since=healthy_since,
        metered=metered,
    )


def view(**overrides: object) -> SwitchView:
    """A bound, ATTACHED session on p1 since t=10.0, unpinned, with room to switch."""
    fields: dict[str, object] = dict(
        state=S.ATTACHED,
        active=P1,
        bound_since=10.0,
        pinned=None,
        reattach_in_flight=False,
        rate_has_room=True,
        recovery_cause=None,
    )
    fields.update(overrides)
    return SwitchView(**fields)  # type: ignore[arg-type]


def unbound(**overrides: object) -> SwitchView:
    return view(state=S.RECOVERING, active=None, bound_since=None, **overrides)


def stay(reason: R) -> Decision:
    return Decision(STAY, reason)


def case(name: str, v: SwitchView, candidates: tuple[Candidate, ...], expected: Decision, *, now: float = 20.0) -> Any:
    return pytest.param(v, candidates, expected, now, id=name)


# One case per row: (id, view, candidates, expected), decided at now=20.0 unless ``now=`` says otherwise.
CASES = [
    # -- not a session that can switch ------------------------------------------------
    case("terminated", view(state=S.TERMINATED, active=None), (cand(P2, 20, H),), stay(R.NO_CANDIDATE)),
    case("birth", view(state=S.BIRTH, active=None), (cand(P2, 20, H),), stay(R.NO_CANDIDATE)),
    case("reattach in flight", unbound(reattach_in_flight=True), (cand(P2, 20, H),), stay(R.REATTACH_IN_FLIGHT)),
    case(
        "in flight beats an impaired active",
        view(reattach_in_flight=True),
        (cand(P1, 10, I), cand(P2, 20, H)),
        stay(R.REATTACH_IN_FLIGHT),
    ),
    # -- unbound: recovery picks the best usable path -------------------------------------
    case("unbound, no candidates", unbound(), (), stay(R.NO_CANDIDATE)),
    case("unbound, only dead and unknown", unbound(), (cand(P2, 20, D), cand(P3, 30, U)), stay(R.NO_CANDIDATE)),
    case(
        "unbound, recovery cause carried",
        unbound(recovery_cause=R.MISSED_PROBES),
        (cand(P3, 30, H), cand(P2, 20, H)),
        Decision(SWITCH, R.MISSED_PROBES, P2),
    ),
    case(
        "unbound, no recovery cause means LINK_DOWN",
        unbound(),
        (cand(P2, 20, H),),
        Decision(SWITCH, R.LINK_DOWN, P2),
    ),
    case(
        "unbound, an impaired path is better than none",
        unbound(recovery_cause=R.DELIVERY_TIMEOUT),
        (cand(P2, 20, I), cand(P3, 30, D)),
        Decision(SWITCH, R.DELIVERY_TIMEOUT, P2),
    ),
    case(
        "unbound, pinned usable path wins over a better one",
        unbound(pinned=P3, recovery_cause=R.LINK_DOWN),
        (cand(P2, 20, H), cand(P3, 30, I)),
        Decision(SWITCH, R.LINK_DOWN, P3),
    ),
    case(
        "unbound, pinned dead path is ignored",
        unbound(pinned=P3, recovery_cause=R.LINK_DOWN),
        (cand(P2, 20, H), cand(P3, 30, D)),
        Decision(SWITCH, R.LINK_DOWN, P2),
    ),
    case(
        "unbound, rate exhausted -> DEGRADE",
        unbound(rate_has_room=False, recovery_cause=R.LINK_DOWN),
        (cand(P2, 20, H),),
        Decision(DEGRADE, R.SWITCH_RATE_EXCEEDED, P2),
    ),
    case(
        "unbound and already DEGRADED, rate exhausted -> STAY RATE_LIMITED",
        view(state=S.DEGRADED, active=None, bound_since=None, rate_has_room=False),
        (cand(P2, 20, H),),
        stay(R.RATE_LIMITED),
    ),
    # -- operator pin ------------------------------------------------------------------------
    case("pinned active stays even when impaired", view(pinned=P1), (cand(P1, 10, I), cand(P2, 20, H)), stay(R.PINNED)),
    case(
        "pinned usable path: switch at once, no dwell, even to a worse path",
        view(pinned=P3),
        (cand(P1, 10, H), cand(P3, 30, I)),
        Decision(SWITCH, R.OPERATOR_PIN, P3),
        now=10.0,
    ),
    case(
        "pinned usable path, rate exhausted",
        view(pinned=P3, rate_has_room=False),
        (cand(P1, 10, H), cand(P3, 30, H)),
        stay(R.RATE_LIMITED),
    ),
    case(
        "pinned dead path: decide as if unpinned (healthy active)",
        view(pinned=P3),
        (cand(P1, 10, H), cand(P3, 30, D)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "pinned dead path: decide as if unpinned (impaired active)",
        view(pinned=P3),
        (cand(P1, 10, I), cand(P2, 20, H), cand(P3, 30, D)),
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P2),
    ),
    case(
        "pinned path not known at all",
        view(pinned=P4),
        (cand(P1, 10, H), cand(P2, 20, H)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    # -- the active path has no verdict to act on -------------------------------------------------
    case("active path not a candidate", view(), (cand(P2, 20, H),), stay(R.NO_SAMPLES)),
    case("active path unknown", view(), (cand(P1, 10, U), cand(P2, 20, H)), stay(R.NO_SAMPLES)),
    case("active path dead", view(), (cand(P1, 10, D), cand(P2, 20, H)), stay(R.NO_SAMPLES)),
    # -- impaired active path --------------------------------------------------------------------
    case(
        "impaired active, healthy candidate, dwell met",
        view(),
        (cand(P1, 10, I, reason=R.JITTER_ABOVE_THRESHOLD), cand(P2, 20, H)),
        Decision(SWITCH, R.JITTER_ABOVE_THRESHOLD, P2),
        now=12.0,
    ),
    case(
        "impaired active, healthy beats impaired of better priority",
        view(active=P2),
        (cand(P1, 10, I), cand(P2, 20, I, reason=R.LATENCY_ABOVE_THRESHOLD), cand(P3, 30, H)),
        Decision(SWITCH, R.LATENCY_ABOVE_THRESHOLD, P3),
    ),
    case(
        "impaired active, only impaired candidates",
        view(),
        (cand(P1, 10, I), cand(P2, 20, I), cand(P3, 30, D)),
        stay(R.NO_BETTER_PATH),
    ),
    case(
        "impaired active, dwell not met",
        view(),
        (cand(P1, 10, I), cand(P2, 20, H)),
        stay(R.DWELL_NOT_MET),
        now=11.999,
    ),
    case(
        "impaired active, no bound_since counts as dwell met",
        view(bound_since=None),
        (cand(P1, 10, I), cand(P2, 20, H)),
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P2),
        now=0.0,
    ),
    case(
        "impaired active, rate exhausted -> DEGRADE",
        view(state=S.VOLATILE, rate_has_room=False),
        (cand(P1, 10, I), cand(P2, 20, H)),
        Decision(DEGRADE, R.SWITCH_RATE_EXCEEDED, P2),
    ),
    case(
        "impaired active, already DEGRADED -> STAY RATE_LIMITED",
        view(state=S.DEGRADED, rate_has_room=False),
        (cand(P1, 10, I), cand(P2, 20, H)),
        stay(R.RATE_LIMITED),
    ),
    case(
        "impaired active in DEGRADED with room switches",
        view(state=S.DEGRADED),
        (cand(P1, 10, I), cand(P2, 20, H)),
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P2),
    ),
    # -- healthy active path: only a preferred path may pull it away --------------------------------
    case(
        "healthy active, nothing preferred",
        view(active=P1),
        (cand(P1, 10, H), cand(P2, 20, H, healthy_since=0.0)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "healthy active, preferred path after return dwell",
        view(active=P2),
        (cand(P1, 10, H, healthy_since=15.0), cand(P2, 20, H)),
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P1),
    ),
    case(
        "healthy active, preferred path 1 ms before return dwell",
        view(active=P2),
        (cand(P1, 10, H, healthy_since=15.0), cand(P2, 20, H)),
        stay(R.ACTIVE_PATH_HEALTHY),
        now=19.999,
    ),
    case(
        "healthy active, preferred path with no healthy_since",
        view(active=P2),
        (cand(P1, 10, H), cand(P2, 20, H)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "healthy active, preferred path only impaired",
        view(active=P2),
        (cand(P1, 10, I), cand(P2, 20, H)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "healthy active, equal priority is not preferred",
        view(active=P2),
        (cand(P1, 20, H, healthy_since=0.0), cand(P2, 20, H)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "healthy active, preferred path but min dwell not met",
        view(active=P2, bound_since=19.0),
        (cand(P1, 10, H, healthy_since=0.0), cand(P2, 20, H)),
        stay(R.DWELL_NOT_MET),
    ),
    case(
        "healthy active, optional switch rate-limited -> STAY, not DEGRADE",
        view(active=P2, rate_has_room=False),
        (cand(P1, 10, H, healthy_since=0.0), cand(P2, 20, H)),
        stay(R.RATE_LIMITED),
    ),
    case(
        "healthy active, best preferred path chosen",
        view(active=P3),
        (cand(P2, 20, H, healthy_since=0.0), cand(P1, 10, H, healthy_since=0.0), cand(P3, 30, H)),
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P1),
    ),
    case(
        "healthy active, best preferred path still in dwell so the next one is chosen",
        view(active=P3),
        (cand(P2, 20, H, healthy_since=0.0), cand(P1, 10, H, healthy_since=19.0), cand(P3, 30, H)),
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P2),
    ),
    # -- cost: a metered path only when no unmetered one is HEALTHY ---------------------------
    case(
        "unbound, a healthy unmetered path beats a preferred metered one",
        unbound(recovery_cause=R.MISSED_PROBES),
        (cand(P1, 10, H, metered=True), cand(P3, 30, H)),
        Decision(SWITCH, R.MISSED_PROBES, P3),
    ),
    case(
        "unbound, a healthy metered path beats an impaired unmetered one",
        unbound(recovery_cause=R.MISSED_PROBES),
        (cand(P2, 20, I), cand(P3, 30, H, metered=True)),
        Decision(SWITCH, R.MISSED_PROBES, P3),
    ),
    case(
        "impaired active, the healthy unmetered path rather than the preferred metered one",
        view(active=P1, bound_since=0.0),
        (cand(P1, 10, I), cand(P2, 20, H, metered=True), cand(P3, 30, H)),
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P3),
    ),
    case(
        "on a metered path, an unmetered one healthy for the return dwell takes over, whatever its priority",
        view(active=P1, bound_since=0.0),
        (cand(P1, 10, H, metered=True), cand(P3, 30, H, healthy_since=15.0)),
        Decision(SWITCH, R.UNMETERED_AVAILABLE, P3),
    ),
    case(
        "on a metered path, an unmetered one still in its return dwell waits",
        view(active=P1, bound_since=0.0),
        (cand(P1, 10, H, metered=True), cand(P3, 30, H, healthy_since=15.001)),
        stay(R.ACTIVE_PATH_HEALTHY),
    ),
    case(
        "on an unmetered path, a preferred path that is metered is not taken back",
        view(active=P2, bound_since=0.0),
        (cand(P1, 10, H, healthy_since=0.0, metered=True), cand(P2, 20, H)),
        stay(R.METERED_AVOIDED),
    ),
    case(
        "on an unmetered path, a preferred unmetered path is taken back over a better metered one",
        view(active=P3, bound_since=0.0),
        (cand(P1, 10, H, healthy_since=0.0, metered=True), cand(P2, 20, H, healthy_since=0.0), cand(P3, 30, H)),
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P2),
    ),
    case(
        "between metered paths the preference order holds",
        view(active=P3, bound_since=0.0),
        (cand(P2, 20, H, healthy_since=0.0, metered=True), cand(P3, 30, H, metered=True)),
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P2),
    ),
    case(
        "an operator's pin overrides cost",
        view(active=P3, bound_since=0.0, pinned=P2),
        (cand(P2, 20, H, metered=True), cand(P3, 30, H)),
        Decision(SWITCH, R.OPERATOR_PIN, P2),
    ),
]


@pytest.mark.parametrize(("v", "candidates", "expected", "now"), CASES)
def test_decide(v: SwitchView, candidates: tuple[Candidate, ...], expected: Decision, now: float) -> None:
    assert decide(v, candidates, POLICY, now=now) == expected


@pytest.mark.parametrize(("v", "candidates", "expected", "now"), CASES)
def test_decide_does_not_depend_on_candidate_order(
    v: SwitchView, candidates: tuple[Candidate, ...], expected: Decision, now: float
) -> None:
    for order in itertools.permutations(candidates):
        assert decide(v, order, POLICY, now=now) == expected


# -- dwell boundaries ------------------------------------------------------------------------------


#: (id, view, candidates, policy, the edge: the first instant the switch is allowed, the switch, 1 ms before)
DWELL_EDGES = [
    pytest.param(
        view(bound_since=10.0),
        (cand(P1, 10, I), cand(P2, 20, H)),
        POLICY,
        12.0,
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P2),
        stay(R.DWELL_NOT_MET),
        id="min dwell",
    ),
    pytest.param(
        view(bound_since=10.0),
        (cand(P1, 10, I), cand(P2, 20, H)),
        attrs.evolve(POLICY, min_dwell_ms=500),
        10.5,
        Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P2),
        stay(R.DWELL_NOT_MET),
        id="min dwell comes from the policy",
    ),
    pytest.param(
        view(active=P2),
        (cand(P1, 10, H, healthy_since=15.0), cand(P2, 20, H)),
        POLICY,
        20.0,
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P1),
        stay(R.ACTIVE_PATH_HEALTHY),
        id="return dwell",
    ),
    pytest.param(
        view(active=P2, bound_since=0.0),
        (cand(P1, 10, H, healthy_since=3.2), cand(P2, 20, H)),
        POLICY,
        3.2 + POLICY.return_dwell_ms / 1000.0,  # not a binary fraction: the edge holds for any since
        Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P1),
        stay(R.ACTIVE_PATH_HEALTHY),
        id="return dwell met at since plus dwell for any since",
    ),
]


@pytest.mark.parametrize(("v", "candidates", "policy", "edge", "switch", "before"), DWELL_EDGES)
def test_a_dwell_is_met_exactly_at_its_edge(
    v: SwitchView, candidates: tuple[Candidate, ...], policy: Policy, edge: float, switch: Decision, before: Decision
) -> None:
    assert decide(v, candidates, policy, now=edge) == switch
    assert decide(v, candidates, policy, now=edge - 0.001) == before


def test_zero_dwell_policy_switches_at_once() -> None:
    policy = attrs.evolve(POLICY, min_dwell_ms=0, return_dwell_ms=0)
    v = view(active=P2, bound_since=20.0)
    candidates = (cand(P1, 10, H, healthy_since=20.0), cand(P2, 20, H))
    assert decide(v, candidates, policy, now=20.0) == Decision(SWITCH, R.PREFERRED_PATH_RESTORED, P1)


# -- ranking ----------------------------------------------------------------------------------------


def test_rank_key() -> None:
    assert rank(cand(P3, 5, H)) == (0, False, 5, 3)
    assert rank(cand(P3, 5, I)) == (1, False, 5, 3)
    assert rank(attrs.evolve(cand(P3, 5, H), metered=True)) == (0, True, 5, 3)


def test_ranking_order_verdict_then_priority_then_path_id() -> None:
    c = [
        cand(P4, 5, I),
        cand(P3, 30, H),
        cand(P2, 10, H),
        cand(P1, 10, I),
        cand(PathId(9), 10, H),
        cand(PathId(7), 30, H),
    ]
    assert [x.path.value for x in sorted(c, key=rank)] == [2, 9, 3, 7, 4, 1]


@pytest.mark.parametrize(
    ("candidates", "target"),
    [
        ((cand(P2, 10, H), cand(P3, 5, I)), P2),  # healthy before impaired, whatever the priority
        ((cand(P3, 20, H), cand(P2, 30, H)), P3),  # then lower priority
        ((cand(P3, 20, H), cand(P2, 20, H), cand(P4, 20, H)), P2),  # priority tie: lower path id
        ((cand(P4, 20, I), cand(P3, 20, I)), P3),  # tie among impaired paths too
        ((cand(P2, 0, D), cand(P3, 0, U), cand(P4, 99, I)), P4),  # dead and unknown never chosen
    ],
)
def test_recovery_target_follows_the_ranking(candidates: tuple[Candidate, ...], target: PathId) -> None:
    for order in itertools.permutations(candidates):
        assert decide(unbound(), order, POLICY, now=20.0) == Decision(SWITCH, R.LINK_DOWN, target)


def test_impaired_active_switch_target_tie_on_priority() -> None:
    candidates = (cand(P1, 10, I), cand(P4, 20, H), cand(P3, 20, H), cand(P2, 20, I))
    assert decide(view(), candidates, POLICY, now=20.0) == Decision(SWITCH, R.LOSS_ABOVE_THRESHOLD, P3)


def test_active_path_is_never_its_own_target() -> None:
    # p1 is active and the best by every key; the decision must not "switch" to it.
    candidates = (cand(P1, 1, H, healthy_since=0.0),)
    assert decide(view(), candidates, POLICY, now=20.0) == stay(R.ACTIVE_PATH_HEALTHY)
