"""The ten formal properties, checked on generated traces of a client/gateway pair.

Determinism rules: no sockets, no sleeps, no wall clock.  Time is the Pair's
virtual ``now``; hypothesis chooses the inputs (probe rounds, losses, delays,
link flaps, blackholes, time jumps past every policy bound, operator pins,
store changes, forged/replayed/stale REATTACHes, closes) and the policy
(small bounds, so rate limits, recovery windows and TTLs are really reached).
After every rule, ``checks.PairTracer`` feeds both sides' new steps to the
trace checker, which raises on the first property violation -- including an
illegal transition: each machine's ``counters["invalid_transitions"]`` must
stay 0 at every step and at the end of every trace (Property 3).

Two test machines: ``PairProperties`` (everything, attackers and the store
included) and ``FlapProperties`` (network and time only, under policies built
to hit the switch-rate limit).  Under ``HYPOTHESIS_PROFILE=ci`` each runs
500 derandomized traces of up to 50 rules (tests/properties/conftest.py).

The tests can fail, and three groups show it: hand-made bad traces (real
traces with one defect planted) that the checker must reject with the right
property; the same state machines run against a sabotaged core or a
transition table missing a row (monkeypatched for one test) that must be
caught; and minimal reproductions of the core bugs these tests found, kept as
regression tests -- the open ones fail until the core is fixed.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, Phase, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import (
    BindTransport,
    EmitEvent,
    EventKind,
    ReleaseTransport,
    Role,
    SendReattach,
    Terminate,
)
from jvpn_trio.core.health import Verdict
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.ownership import OwnershipRecord
from jvpn_trio.core.policy import Policy, PolicyError
from jvpn_trio.core.session import GatewaySession
from jvpn_trio.core.states import TRANSITIONS
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from tests.pair import (
    ATTACKER_ENDPOINT,
    FORGERY_KINDS,
    NODE,
    Pair,
    client_endpoint,
    gateway_endpoint,
    genuine_reattach,
    lone_gateway,
    valid_reattach,
)
from tests.policies import ONE_SWITCH_A_MINUTE, SCENARIO_POLICY, SHORT_RECOVERY_POLICY
from tests.properties.checks import (
    GatewayIdentity,
    PairTracer,
    PropertyViolation,
    Step,
    check_trace,
)

#: Totals over every generated trace in this process (printed by conftest's summary hook).
RUN_STATS: collections.Counter[str] = collections.Counter()
#: Rows of states.TRANSITIONS that some generated trace took.
ROWS_SEEN: set[tuple[S, R]] = set()

PATHS = (1, 2, 3)


# =============================================================================
# Policies with small bounds
# =============================================================================


@st.composite
def small_policies(draw: st.DrawFn, *, flappy: bool = False) -> Policy:
    """Policies whose bounds a short trace actually reaches.

    The values are chosen to satisfy Policy's cross-field checks; should those
    grow stricter, a combination they refuse is skipped (``assume``), not failed.
    """
    probe_interval = draw(st.sampled_from([100, 200]))
    probe_timeout = draw(st.sampled_from([150, 300]))
    dead_after = draw(st.integers(2, 3))
    detect = dead_after * probe_interval + probe_timeout
    ttl = draw(st.sampled_from([1_000, 2_000, 4_000]).filter(lambda v: v >= detect))
    reattach_timeout = draw(st.sampled_from([100, 250]))
    window = draw(st.sampled_from([300, 800, ttl]).filter(lambda v: reattach_timeout < v <= ttl))
    fields: dict[str, Any] = dict(
        probe_interval_ms=probe_interval,
        probe_timeout_ms=probe_timeout,
        dead_after_missed_probes=dead_after,
        transport_loss_ttl_ms=ttl,
        max_recovery_window_ms=window,
        reattach_timeout_ms=reattach_timeout,
        max_switches_per_minute=draw(st.integers(1, 2) if flappy else st.integers(1, 4)),
        min_dwell_ms=draw(st.sampled_from([0, 0, 300]) if flappy else st.sampled_from([0, 300, 2_000])),
        return_dwell_ms=draw(st.sampled_from([0, 200]) if flappy else st.sampled_from([0, 500, 5_000])),
        session_ttl_s=draw(st.sampled_from([20, 90])),
        freshness_window_ms=draw(st.sampled_from([1_000, 5_000])),
        loss_window_probes=draw(st.sampled_from([4, 10])),
        loss_threshold_pct=draw(st.sampled_from([10.0, 30.0])),
        # Both under the probe timeout (a slower reply is a loss, not a latency sample).
        latency_threshold_ms=draw(st.sampled_from([40.0, 0.8 * probe_timeout])),
        jitter_threshold_ms=draw(st.sampled_from([10.0, 0.5 * probe_timeout])),
    )
    try:
        return attrs.evolve(Policy(), **fields)
    except PolicyError:
        assume(False)
        raise  # unreachable: assume(False) aborts the example


JUMPS = ("probe_timeout", "reattach_timeout", "recovery_window", "loss_ttl", "rate_window", "session_ttl")


def jump_seconds(policy: Policy, target: str) -> float:
    return {
        "probe_timeout": policy.probe_timeout_ms / 1000.0,
        "reattach_timeout": policy.reattach_timeout_ms / 1000.0,
        "recovery_window": policy.max_recovery_window_ms / 1000.0,
        "loss_ttl": policy.transport_loss_ttl_ms / 1000.0,
        "rate_window": 60.0,
        "session_ttl": float(policy.session_ttl_s),
    }[target]


# =============================================================================
# The state machines
# =============================================================================


class _PairMachine(RuleBasedStateMachine):
    """Time, probing and the network: what both machines below share."""

    policy_strategy = small_policies()

    def __init__(self) -> None:
        super().__init__()
        self.tracer = PairTracer()
        self.pair: Pair | None = None

    @initialize(data=st.data(), two_paths=st.booleans(), no_handshake=st.integers(0, 15))
    def start(self, data: st.DataObject, two_paths: bool, no_handshake: int) -> None:
        policy = data.draw(self.policy_strategy, label="policy")
        paths = ((1, 10), (2, 20)) if two_paths else ((1, 10), (2, 20), (3, 30))
        # One trace in sixteen starts from a handshake that never completed (both sides in BIRTH).
        handshake = no_handshake != 1
        self.pair = Pair.start(policy=policy, paths=paths, attach=self.tracer.attach, handshake=handshake)
        RUN_STATS["traces"] += 1
        RUN_STATS["traces_without_handshake"] += not handshake

    @property
    def p(self) -> Pair:
        assert self.pair is not None
        return self.pair

    # Time only moves through ``Pair.advance``, which raises DeadlineStuck if a timer fires
    # again and again at one instant without moving ``next_deadline()`` on: the driver's
    # timer loop would spin forever, so that fails the test too.  (The rate-window timer
    # once did: see ``test_rate_window_deadline_makes_progress_at_the_float_boundary``.)

    # -- time and probing ---------------------------------------------------------
    @rule()
    def probe(self) -> None:
        self.p.probe_round()

    @rule(acked=st.sets(st.sampled_from(PATHS)))
    def probe_lossy(self, acked: set[int]) -> None:
        self.p.probe_round_lossy(acked)

    @rule(delay=st.sampled_from([0.02, 0.06, 0.14]), acked=st.sets(st.sampled_from(PATHS), min_size=1))
    def probe_slow(self, delay: float, acked: set[int]) -> None:
        """Probes whose acks come back after ``delay`` (latency/jitter, or a timeout)."""
        seq = self.p.send_probes()
        self.p.advance(delay)
        self.p.ack_probes(seq, acked)

    @rule(seconds=st.sampled_from([0.3, 0.6, 1.2]))
    def run(self, seconds: float) -> None:
        """Probe at the policy interval for a while (the steady state)."""
        self.p.run(seconds)

    @rule(seconds=st.sampled_from([0.001, 0.05, 0.1, 0.15, 0.25]))
    def tick(self, seconds: float) -> None:
        self.p.advance(seconds)

    @rule(bound=st.sampled_from(JUMPS), offset=st.sampled_from([-0.001, 0.0, 0.001]))
    def jump(self, bound: str, offset: float) -> None:
        """Let a whole policy bound pass with no probes (just before, at, or just after it)."""
        self.p.advance(max(0.0, jump_seconds(self.p.policy, bound) + offset))

    @rule(seconds=st.sampled_from([10.0, 61.0]), roll=st.integers(0, 3))
    def coast(self, seconds: float, roll: int) -> None:
        """A long healthy stretch (one probe round every half TTL), taken one roll in four.

        Long enough for the rate window to clear (DEGRADED -> ATTACHED) and
        for the session TTL to end a live, bound session.
        """
        if roll != 0:
            return
        pair = self.p
        step = pair.policy.transport_loss_ttl_ms / 2000.0
        end = round(pair.now + seconds, 9)
        while round(pair.now + step, 9) <= end and not (pair.client.terminated and pair.gateway.terminated):
            pair.advance(step)
            pair.probe_round()
        pair.advance(max(0.0, end - pair.now))

    # -- the network ----------------------------------------------------------------
    @rule(path=st.sampled_from(PATHS), up=st.booleans())
    def link(self, path: int, up: bool) -> None:
        if PathId(path) in self.p.links:
            self.p.set_link(path, up=up)

    @rule(path=st.sampled_from(PATHS), on=st.booleans())
    def blackhole(self, path: int, on: bool) -> None:
        if PathId(path) in self.p.links:
            self.p.blackhole(path, on=on)

    @rule(on=st.booleans())
    def blackhole_active(self, on: bool) -> None:
        binding = self.p.client.record.binding
        if binding is not None:
            self.p.blackhole(binding.path.value, on=on)

    # -- the properties -----------------------------------------------------------------
    @invariant()
    def ten_properties_hold(self) -> None:
        if self.pair is None:
            return
        self.tracer.check()
        assert self.p.client.record.session_id == self.p.gateway.record.session_id

    def teardown(self) -> None:
        if self.pair is not None:
            self.tracer.check()
            RUN_STATS["client_steps"] += len(self.tracer.steps("client"))
            RUN_STATS["gateway_steps"] += len(self.tracer.steps("gateway"))
            for side in ("client", "gateway"):
                state = self.tracer.steps(side)[-1].record.state
                RUN_STATS[f"{side}_ended_{state.value}"] += 1
                events = [a for step in self.tracer.steps(side) for a in step.actions if isinstance(a, EmitEvent)]
                RUN_STATS[f"{side}_switches"] += sum(e.kind is EventKind.TRANSPORT_SWITCH for e in events)
                RUN_STATS[f"{side}_degraded"] += any(e.detail("to_state") == "DEGRADED" for e in events)
                if self.tracer.checkers[side].max_switches_in_window >= self.p.policy.max_switches_per_minute:
                    RUN_STATS[f"{side}_reached_switch_limit"] += 1
            security = [
                a
                for step in self.tracer.steps("gateway")
                for a in step.actions
                if isinstance(a, EmitEvent) and a.kind is EventKind.SECURITY_EVENT
            ]
            RUN_STATS["gateway_security_events"] += len(security)
            for side in ("client", "gateway"):
                for step in self.tracer.steps(side):
                    for a in step.actions:
                        if isinstance(a, EmitEvent) and a.kind is EventKind.STATE_CHANGE and a.version > 0:
                            ROWS_SEEN.add((S(a.detail("from_state")), a.reason))


class PairProperties(_PairMachine):
    """Everything: the network plus operators, the store, attackers and closes."""

    @rule(path=st.sampled_from((None, *PATHS)))
    def pin(self, path: int | None) -> None:
        self.p.pin(path)

    @rule(by=st.sampled_from(("", "uid 1000")))
    def reevaluate(self, by: str) -> None:
        """A fresh decision, asked by the agent itself or by a person."""
        self.p._client(ev.ReevaluateRequested(by=by))

    @rule(kind=st.sampled_from(("replay", *FORGERY_KINDS)), path=st.sampled_from(PATHS))
    def attack(self, kind: str, path: int) -> None:
        RUN_STATS[f"attack_{kind}"] += 1
        if kind == "replay":
            self.p.attack("replay")
        else:
            self.p.attack(kind, path=path)

    @rule(send=st.booleans())
    def hold_back(self, send: bool) -> None:
        """Issue 15: an on-path attacker takes the client's next REATTACH off the wire, then sends one
        he holds from his own address.  Path validation: his address never gets the binding."""
        if send and self.p.held_back:
            RUN_STATS["held_back_sent"] += 1
            self.p.send_held_back()
        else:
            RUN_STATS["hold_back"] += 1
            self.p.hold_back = True
        binding = self.p.gateway.record.binding
        assert binding is None or binding.endpoint != ATTACKER_ENDPOINT

    @rule(path=st.sampled_from(PATHS), from_client=st.booleans())
    def roam(self, path: int, from_client: bool) -> None:
        """A fully valid REATTACH the client did not send: a NAT rebinding, or a thief with the keys."""
        RUN_STATS["roam"] += 1
        endpoint = client_endpoint(PathId(path)) if from_client else ATTACKER_ENDPOINT
        self.p.attack("valid", path=path, endpoint=endpoint)

    @rule(path=st.sampled_from(PATHS), add=st.booleans())
    def path_set_changes(self, path: int, add: bool) -> None:
        """An interface disappears (PathRemoved) or comes back (PathAdded, same endpoint and priority)."""
        pid = PathId(path)
        if pid not in self.p.links:
            return
        if add:
            self.p._client(ev.PathAdded(path=pid, priority=10 * path, endpoint=gateway_endpoint(pid)))
        else:
            self.p._client(ev.PathRemoved(path=pid))

    @rule()
    def late_handshake(self) -> None:
        """The handshake of a trace that started without one completes now (no-op once attached)."""
        pair = self.p
        if pair.gateway.record.state is not S.BIRTH and pair.client.record.state is not S.BIRTH:
            return
        pair.complete_handshake()

    @rule(data=st.data())
    def replay_older(self, data: st.DataObject) -> None:
        """Replay any captured REATTACH, from the attacker or from the client's own address."""
        if not self.p.captured:
            return
        index = data.draw(st.integers(0, len(self.p.captured) - 1), label="captured index")
        original = self.p.captured[index]
        from_client = data.draw(st.booleans(), label="from the client's address")
        if from_client:
            self.p.replay_captured(index, endpoint=original.endpoint)
        else:
            self.p.replay_captured(index)

    @rule(kind=st.sampled_from(("owned", "owned", "other_owner", "missing", "new_revision")))
    def store(self, kind: str) -> None:
        self.p.set_store(kind)

    @rule(
        kind=st.sampled_from(("close", "operator_close", "peer_removed", "keys_exhausted", "ownership_lost")),
        side=st.sampled_from(("client", "gateway")),
        roll=st.integers(0, 7),
    )
    def end_session(self, kind: str, side: str, roll: int) -> None:
        """An explicit end, taken on one roll in eight so most traces live long enough to reach the bounds."""
        if roll != 0:
            return
        RUN_STATS[f"end_{kind}"] += 1
        if kind == "close":
            self.p.close(side)
        elif kind == "operator_close":  # disconnect/reconnect from the UI: logged, then LOCAL_CLOSE
            action = R.OPERATOR_DISCONNECT if roll % 2 else R.OPERATOR_RECONNECT
            self.p.close(side, ev.CloseRequested(by="uid 1000", action=action))
        elif kind == "peer_removed":  # the gateway's operator removed the peer (reload)
            self.p.close("gateway", ev.CloseRequested(reason=R.PEER_REMOVED))
        elif kind == "ownership_lost":
            self.p.lose_ownership()
        elif side == "client":
            self.p._client(ev.KeysExhausted())
        else:
            self.p._gateway(ev.KeysExhausted())


class CostProperties(PairProperties):
    """Everything PairProperties does, with the second path metered (a laptop tethered to a phone).

    After every core call that sends a REATTACH: if its target is metered and is not the operator's
    pin (nor a rebinding of the active path), no unmetered path was HEALTHY at that instant.
    The ten properties are checked as in PairProperties.
    """

    @initialize(data=st.data(), two_paths=st.booleans(), no_handshake=st.integers(0, 15))
    def start(self, data: st.DataObject, two_paths: bool, no_handshake: int) -> None:
        policy = data.draw(self.policy_strategy, label="policy")
        paths = ((1, 10), (2, 20)) if two_paths else ((1, 10), (2, 20), (3, 30))
        self.pair = Pair.start(
            policy=policy, paths=paths, attach=self._attach, handshake=no_handshake != 1, metered={2}
        )
        RUN_STATS["cost_traces"] += 1

    def _attach(self, side: str, machine: Any) -> Any:
        tap = self.tracer.attach(side, machine)
        if side != "client":
            return tap

        def checked(event: object, now: float, actions: list[Any]) -> None:
            tap(event, now, actions)
            pending = machine.pending
            if pending is None or not any(isinstance(a, SendReattach) for a in actions):
                return
            if pending.cause is R.ENDPOINT_CHANGED or machine.pinned == pending.path:
                return  # a rebinding of the active path, or the operator's own choice
            paths = {p.path: p for p in machine.snapshot(now=now).paths}
            if paths[pending.path].metered:
                RUN_STATS["cost_switches_to_metered"] += 1
                free = [p.path for p in paths.values() if not p.metered and p.verdict.verdict is Verdict.HEALTHY]
                assert not free, f"at {now}: REATTACH onto metered {pending.path} while {free} HEALTHY"

        return checked


TestCostProperties = CostProperties.TestCase
#: The ten properties get their examples in PairProperties; this variant adds one cost rule on the same
#: machine, so it takes a share of the profile's examples (CI time, not coverage, is what it saves).
COST_SHARE = 0.4
_PROFILE = settings()  # the profile tests/properties/conftest.py loaded
TestCostProperties.settings = settings(_PROFILE, max_examples=max(1, int(_PROFILE.max_examples * COST_SHARE)))


class FlapProperties(_PairMachine):
    """Only the network and time, under policies built to hit the switch-rate limit."""

    policy_strategy = small_policies(flappy=True)

    @rule(path=st.sampled_from(PATHS))
    def flap(self, path: int) -> None:
        """Down, a short wait, up again: the storm that Property 6 must damp."""
        if PathId(path) in self.p.links:
            self.p.set_link(path, up=False)
            self.p.advance(self.p.policy.probe_interval_ms / 1000.0)
            self.p.probe_round()
            self.p.set_link(path, up=True)


TestPairProperties = PairProperties.TestCase
TestFlapProperties = FlapProperties.TestCase


# =============================================================================
# The checker can fail: hand-made bad traces
# =============================================================================

OTHER_SID = SessionId(b"\xee" * 16)


def _scenario() -> tuple[PairTracer, Pair]:
    """A real trace: probing, a link-down switch, every forgery, a replay, a switch back, a close."""
    tracer = PairTracer()
    pair = Pair.start(policy=SCENARIO_POLICY, attach=tracer.attach)
    pair.run(0.5)
    pair.set_link(1, up=False)  # switch p1 -> p2
    for kind in FORGERY_KINDS:
        pair.attack(kind)
    pair.attack("replay")
    pair.run(0.5)
    pair.set_link(1, up=True)
    pair.run(3.0)  # p1 earns HEALTHY back (loss window), then the switch back (return_dwell 0)
    pair.close("client")
    tracer.check()
    return tracer, pair


def _gateway_identity() -> GatewayIdentity:
    return GatewayIdentity(node_id=NODE, held_revision=1)


def _check(steps: list[Step], role: Role, policy: Policy) -> None:
    check_trace(steps, role=role, policy=policy, gateway=_gateway_identity() if role is Role.GATEWAY else None)


def _expect(prop: int, steps: list[Step], role: Role, policy: Policy, match: str | None = None) -> PropertyViolation:
    with pytest.raises(PropertyViolation) as info:
        _check(steps, role, policy)
    assert info.value.prop == prop, str(info.value)
    assert f"Property {prop} " in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return info.value


def _index(steps: list[Step], pred) -> int:  # type: ignore[no-untyped-def]
    return next(i for i, step in enumerate(steps) if pred(step))


def _has_event(step: Step, kind: EventKind, reason: R | None = None) -> bool:
    return any(
        isinstance(a, EmitEvent) and a.kind is kind and (reason is None or a.reason is reason) for a in step.actions
    )


def _switch_step(steps: list[Step]) -> int:
    return _index(steps, lambda s: _has_event(s, EventKind.TRANSPORT_SWITCH))


def _reattach_input(steps: list[Step], i: int) -> ev.ReattachReceived:
    """The REATTACH step ``i`` judged: its input, or the one its PATH_RESPONSE completed (path validation)."""
    step = steps[i]
    if isinstance(step.input, ev.PathResponseReceived):
        return steps[i - 1].challenges[step.input.endpoint].request
    assert isinstance(step.input, ev.ReattachReceived), step.input
    return step.input


def _replace(steps: list[Step], i: int, **changes: Any) -> list[Step]:
    out = list(steps)
    out[i] = attrs.evolve(out[i], **changes)
    return out


def _map_actions(step: Step, fn) -> tuple:  # type: ignore[no-untyped-def]
    return tuple(a for a in (fn(a) for a in step.actions) if a is not None)


def _edit_events(step: Step, kind: EventKind, **changes: Any) -> tuple:  # type: ignore[type-arg]
    """The step's actions, every ``kind`` event changed; a change may be a function of the event."""
    return _map_actions(
        step,
        lambda a: attrs.evolve(a, **{k: v(a) if callable(v) else v for k, v in changes.items()})
        if isinstance(a, EmitEvent) and a.kind is kind
        else a,
    )


def _without(step: Step, what: type | EventKind) -> tuple:  # type: ignore[type-arg]
    """The step's actions minus those of type ``what``, or the events of kind ``what``."""
    if isinstance(what, EventKind):
        return _map_actions(step, lambda a: None if isinstance(a, EmitEvent) and a.kind is what else a)
    return _map_actions(step, lambda a: None if isinstance(a, what) else a)


@pytest.fixture(scope="module")
def scenario() -> tuple[PairTracer, Pair]:
    return _scenario()


def test_the_real_scenario_satisfies_every_property(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    _check(tracer.steps("client"), Role.CLIENT, pair.policy)
    _check(tracer.steps("gateway"), Role.GATEWAY, pair.policy)
    switches = [e for e in pair.events("client") if e.kind is EventKind.TRANSPORT_SWITCH]
    assert len(switches) == 2  # the scenario really exercises what the mutations below break
    assert pair.client.record.state is S.TERMINATED and pair.gateway.record.state is S.TERMINATED


def test_p1_catches_a_changed_session_id(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _switch_step(steps)
    bad = _replace(steps, i, record=attrs.evolve(steps[i].record, session_id=OTHER_SID))
    _expect(1, bad, Role.CLIENT, pair.policy, "session_id changed")


def test_p1_catches_an_event_naming_another_session(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    renamed = _edit_events(steps[i], EventKind.TRANSPORT_SWITCH, session=OTHER_SID.hex)
    _expect(1, _replace(steps, i, actions=renamed), Role.GATEWAY, pair.policy, "names session")


def test_p2_catches_two_binds_without_a_release(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    # The switch back to p1 releases p2 and binds p1 in one step; drop the release.
    i = _index(steps, lambda s: {type(a) for a in s.actions} >= {ReleaseTransport, BindTransport})
    no_release = _without(steps[i], ReleaseTransport)
    _expect(2, _replace(steps, i, actions=no_release), Role.CLIENT, pair.policy, "still bound")


def test_p2_catches_a_duplicated_bind(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    actions = []
    for a in steps[i].actions:
        actions.append(a)
        if isinstance(a, BindTransport):
            actions.append(BindTransport(attrs.evolve(a.binding, endpoint=("203.0.113.9", 9))))
    _expect(2, _replace(steps, i, actions=tuple(actions)), Role.GATEWAY, pair.policy, "still bound")


def test_p2_catches_a_record_that_disagrees_with_the_actions(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _index(steps, lambda s: isinstance(s.input, ev.ProbeSent) and s.record.binding is not None)
    bad = _replace(steps, i, record=attrs.evolve(steps[i].record, binding=None))
    _expect(2, bad, Role.CLIENT, pair.policy, "record.binding")


def test_p3_catches_a_state_change_without_an_event(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _index(steps, lambda s: isinstance(s.input, ev.ProbeSent) and s.record.state is S.ATTACHED)
    bad = _replace(steps, i, record=attrs.evolve(steps[i].record, state=S.VOLATILE))
    _expect(3, bad, Role.CLIENT, pair.policy, "events say ATTACHED")


def test_p3_catches_a_transition_that_is_not_in_the_table(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _index(steps, lambda s: _has_event(s, EventKind.STATE_CHANGE, R.REATTACH_CONFIRMED))
    # (RECOVERING, PATH_HEALTHY_AGAIN) is not a row.
    relabelled = _edit_events(steps[i], EventKind.STATE_CHANGE, reason=R.PATH_HEALTHY_AGAIN)
    _expect(3, _replace(steps, i, actions=relabelled), Role.CLIENT, pair.policy, "not a row of the table")


def test_p3_catches_an_unannounced_rebind(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    silent = _without(steps[i], EmitEvent)
    bad = _replace(steps, i, actions=silent, record=attrs.evolve(steps[i].record, version=steps[i - 1].record.version))
    _expect(3, bad, Role.GATEWAY, pair.policy, "no STATE_CHANGE")


@pytest.mark.parametrize(
    "side, quiet",
    [("client", ev.ProbeSent), ("gateway", ev.PacketAuthenticated)],
)
def test_p3_catches_an_attempted_transition_the_table_refused(
    scenario: tuple[PairTracer, Pair], side: str, quiet: type
) -> None:
    tracer, pair = scenario
    steps = tracer.steps(side)
    role = Role(side)
    # A refused transition changes nothing: only the machine's counter shows the attempt.
    i = _index(steps, lambda s: isinstance(s.input, quiet) and not s.actions)
    _expect(3, _replace(steps, i, invalid_transitions=1), role, pair.policy, "invalid_transitions")
    _expect(3, _replace(steps, 0, invalid_transitions=1), role, pair.policy, "invalid_transitions")


def _all_links_down() -> tuple[PairTracer, Pair]:
    tracer = PairTracer()
    pair = Pair.start(policy=SHORT_RECOVERY_POLICY, attach=tracer.attach)
    pair.run(0.5)
    for path in (1, 2, 3):
        pair.set_link(path, up=False)
    tracer.check()
    assert pair.client.record.state is S.RECOVERING and pair.client.record.binding is None
    return tracer, pair


def test_p4_catches_unbounded_loss_of_transport() -> None:
    tracer, pair = _all_links_down()
    steps = tracer.steps("client")
    last = steps[-1]
    # 6 s later, still alive: a (DEGRADED) session unbound for longer than the 5 s TTL.
    degraded = attrs.evolve(last.record, state=S.DEGRADED, version=last.record.version + 1)
    change = EmitEvent(
        kind=EventKind.STATE_CHANGE,
        t=last.now + 1.0,
        role=Role.CLIENT,
        session=last.record.session_id.hex,
        version=last.record.version + 1,
        reason=R.RECOVERY_WINDOW_EXCEEDED,
        policy=pair.policy.fingerprint,
        details={"from_state": "RECOVERING", "to_state": "DEGRADED", "binding": None},
    )
    later = [
        Step(now=last.now + 1.0, input=ev.TimerFired(), actions=(change,), record=degraded),
        Step(now=last.now + 6.0, input=ev.TimerFired(), actions=(), record=degraded),
    ]
    _check(steps + later[:1], Role.CLIENT, pair.policy)  # the first step alone is fine
    _expect(4, steps + later, Role.CLIENT, pair.policy, "transport_loss_ttl_ms")


def test_p4_catches_an_endless_recovery() -> None:
    tracer, pair = _all_links_down()
    steps = tracer.steps("client")
    last = steps[-1]
    stuck = Step(now=last.now + 1.5, input=ev.TimerFired(), actions=(), record=last.record)
    _expect(4, steps + [stuck], Role.CLIENT, pair.policy, "max_recovery_window_ms")


def test_p5_catches_a_switch_event_that_resets_the_version(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _switch_step(steps)
    reset = _edit_events(steps[i], EventKind.TRANSPORT_SWITCH, version=0)
    _expect(5, _replace(steps, i, actions=reset), Role.CLIENT, pair.policy, "does not continue")


def test_p5_catches_a_switch_without_its_event(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    no_event = _without(steps[i], EventKind.TRANSPORT_SWITCH)
    _expect(5, _replace(steps, i, actions=no_event), Role.GATEWAY, pair.policy, "TRANSPORT_SWITCH")


def test_p6_catches_too_many_switches_per_minute(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    # The real trace switched twice within a minute; under a one-per-minute policy that is a violation.
    stricter = attrs.evolve(pair.policy, max_switches_per_minute=1)
    _expect(6, tracer.steps("client"), Role.CLIENT, stricter, "2 TRANSPORT_SWITCH events")
    _expect(6, tracer.steps("gateway"), Role.GATEWAY, stricter, "2 TRANSPORT_SWITCH events")


def test_p6_catches_a_denied_switch_that_does_not_degrade(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _index(steps, lambda s: isinstance(s.input, ev.ProbeSent) and s.record.state is S.ATTACHED)
    rec = steps[i].record
    denied = EmitEvent(
        kind=EventKind.SWITCH_DENIED,
        t=steps[i].now,
        role=Role.CLIENT,
        session=rec.session_id.hex,
        version=rec.version,
        reason=R.SWITCH_RATE_EXCEEDED,
        policy=pair.policy.fingerprint,
    )
    _expect(6, _replace(steps, i, actions=steps[i].actions + (denied,)), Role.CLIENT, pair.policy, "denied")


def _attack_step(steps: list[Step], reason: R) -> int:
    return _index(
        steps,
        lambda s: isinstance(s.input, ev.ReattachReceived)
        and any(isinstance(a, EmitEvent) and a.reason is reason for a in s.actions),
    )


def test_p7_catches_a_replay_that_moves_the_clock_offset(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _attack_step(steps, R.REPLAYED_NONCE)
    bad = _replace(steps, i, clock_offset_ms=(steps[i].clock_offset_ms or 0.0) + 5.0)
    _expect(7, bad, Role.GATEWAY, pair.policy, "must be rejected")


def test_p7_catches_a_forged_reattach_that_binds(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)  # a genuine accepted REATTACH...
    forged = attrs.evolve(_reattach_input(steps, i), proof_valid=False)  # ...had it been forged
    _expect(7, _replace(steps, i, input=forged), Role.GATEWAY, pair.policy, "forged")


def test_p7_catches_a_nonce_that_goes_backwards(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _index(steps, lambda s: isinstance(s.input, ev.PacketAuthenticated) and (s.last_nonce or 0) > 0)
    _expect(7, _replace(steps, i, last_nonce=0), Role.GATEWAY, pair.policy, "without a REATTACH")


def test_p8_catches_a_version_gap(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _switch_step(steps)
    gap = _edit_events(steps[i], EventKind.STATE_CHANGE, version=lambda e: e.version + 1)
    _expect(8, _replace(steps, i, actions=gap), Role.CLIENT, pair.policy, "STATE_CHANGE version")


def test_p8_catches_a_version_that_moves_without_a_transition(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _index(steps, lambda s: isinstance(s.input, ev.PacketAuthenticated) and not s.actions)
    bad = _replace(steps, i, record=attrs.evolve(steps[i].record, version=steps[i].record.version + 1))
    _expect(8, bad, Role.GATEWAY, pair.policy, "over 0 logged transition")


def test_p8_catches_a_stale_version_reattach_that_is_accepted(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    stale = attrs.evolve(_reattach_input(steps, i), expected_version=steps[i - 1].record.version - 1)
    _expect(8, _replace(steps, i, input=stale), Role.GATEWAY, pair.policy, "stale version")


@pytest.mark.parametrize(
    "ownership",
    [
        None,
        OwnershipRecord(session_id=SessionId(bytes(range(16))), owner="gw-b", revision=1),
        OwnershipRecord(session_id=SessionId(bytes(range(16))), owner=NODE, revision=2),
        OwnershipRecord(session_id=OTHER_SID, owner=NODE, revision=1),
    ],
    ids=["no-record", "other-owner", "other-revision", "other-session"],
)
def test_p9_catches_a_bind_without_ownership(
    scenario: tuple[PairTracer, Pair], ownership: OwnershipRecord | None
) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _switch_step(steps)
    unowned = attrs.evolve(_reattach_input(steps, i), ownership=ownership)
    _expect(9, _replace(steps, i, input=unowned), Role.GATEWAY, pair.policy, "ownership")


def test_p9_catches_a_gateway_that_keeps_serving_after_ownership_is_lost(
    scenario: tuple[PairTracer, Pair],
) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _index(
        steps, lambda s: isinstance(s.input, ev.PacketAuthenticated) and not s.actions and s.record.binding is not None
    )
    _expect(9, _replace(steps, i, input=ev.OwnershipLost()), Role.GATEWAY, pair.policy, "ownership lost")


def _termination_step(steps: list[Step]) -> int:
    return _index(steps, lambda s: any(isinstance(a, Terminate) for a in s.actions))


def test_p10_catches_termination_for_an_unlisted_reason(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _termination_step(steps)

    def relabel(a):  # type: ignore[no-untyped-def]
        if isinstance(a, EmitEvent) and a.kind is EventKind.STATE_CHANGE:
            return attrs.evolve(a, reason=R.MISSED_PROBES)
        if isinstance(a, Terminate):
            return Terminate(reason=R.MISSED_PROBES)
        return a

    _expect(10, _replace(steps, i, actions=_map_actions(steps[i], relabel)), Role.CLIENT, pair.policy, "MISSED_PROBES")


def test_p10_catches_termination_without_a_terminate_action(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("gateway")
    i = _termination_step(steps)
    silent = _without(steps[i], Terminate)
    _expect(10, _replace(steps, i, actions=silent), Role.GATEWAY, pair.policy, "Terminate actions")


def test_p10_catches_a_terminate_without_termination(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    i = _switch_step(steps)
    extra = steps[i].actions + (Terminate(reason=R.LOCAL_CLOSE),)
    _expect(10, _replace(steps, i, actions=extra), Role.CLIENT, pair.policy, "without a STATE_CHANGE")


def test_p10_catches_life_after_termination(scenario: tuple[PairTracer, Pair]) -> None:
    tracer, pair = scenario
    steps = tracer.steps("client")
    last = steps[-1]
    assert last.record.state is S.TERMINATED
    ghost = BindTransport(Binding(path=PathId(1), endpoint=("192.0.2.1", 51820)))
    after = Step(now=last.now + 1.0, input=ev.ReevaluateRequested(), actions=(ghost,), record=last.record)
    _expect(10, steps + [after], Role.CLIENT, pair.policy, "after TERMINATED")
    revived = Step(
        now=last.now + 1.0,
        input=ev.ReevaluateRequested(),
        actions=(),
        record=attrs.evolve(last.record, state=S.ATTACHED),
    )
    _expect(10, steps + [revived], Role.CLIENT, pair.policy, "after TERMINATED")



# =============================================================================
# The state machines can fail: the same tests against a sabotaged core
# (monkeypatched for one test, never edited) must find a violation
# =============================================================================


def _hunt(machine: type[RuleBasedStateMachine], prop: int) -> PropertyViolation:
    """Run a state machine until it fails; the violation it found must be of Property ``prop``."""
    fast = settings(
        max_examples=300,
        stateful_step_count=50,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # the first failure is enough: no shrinking
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    saved_stats, saved_rows = RUN_STATS.copy(), set(ROWS_SEEN)
    try:
        with pytest.raises(PropertyViolation) as info:
            run_state_machine_as_test(machine, settings=fast)
    finally:  # sabotaged runs do not count in the exploration totals
        RUN_STATS.clear()
        RUN_STATS.update(saved_stats)
        ROWS_SEEN.clear()
        ROWS_SEEN.update(saved_rows)
    assert info.value.prop == prop, str(info.value)
    return info.value


def test_machine_catches_a_core_that_forgets_the_nonce_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import jvpn_trio.core.session as session_module

    real = session_module.validate_reattach
    monkeypatch.setattr(
        session_module,
        "validate_reattach",
        lambda ctx, req, policy, *, now: real(attrs.evolve(ctx, last_nonce=-1), req, policy, now=now),
    )
    _hunt(PairProperties, 7)


def test_machine_catches_a_core_that_ignores_the_switch_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    import jvpn_trio.core.reattach as reattach_module
    import jvpn_trio.core.session as session_module

    for module in (session_module, reattach_module):
        monkeypatch.setattr(module, "rate_has_room", lambda switch_times, policy, now: True)
    _hunt(FlapProperties, 6)


def test_machine_catches_a_core_without_the_loss_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    from jvpn_trio.core.session import _SessionCore

    monkeypatch.setattr(_SessionCore, "unbound_deadline", lambda self: None)
    _hunt(FlapProperties, 4)


def test_machine_catches_a_core_that_trusts_any_ownership_record(monkeypatch: pytest.MonkeyPatch) -> None:
    import jvpn_trio.core.reattach as reattach_module
    from jvpn_trio.core.ownership import Ownership, OwnershipVerdict

    monkeypatch.setattr(
        reattach_module, "classify", lambda *args, **kwargs: OwnershipVerdict(Ownership.OWNED, None, "sabotaged")
    )
    _hunt(PairProperties, 9)


#: A row every trace that loses its active link takes.
LINK_DOWN_ROW = (S.ATTACHED, R.LINK_DOWN)


def test_machine_catches_a_core_whose_table_lost_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table without a row that normal traces take: the machine asks for it, is refused, and counts."""
    monkeypatch.delitem(TRANSITIONS, LINK_DOWN_ROW)
    violation = _hunt(FlapProperties, 3)
    assert "invalid_transitions" in str(violation)


@pytest.mark.parametrize(
    "row, side, first_refused",
    [
        (LINK_DOWN_ROW, "client", ev.LinkChanged),
        ((S.BIRTH, R.HANDSHAKE_COMPLETE), "gateway", ev.PacketAuthenticated),  # the gateway is checked first
    ],
    ids=["client-link-down", "gateway-handshake"],
)
def test_tracer_reports_the_step_whose_transition_the_table_refused(
    monkeypatch: pytest.MonkeyPatch, row: tuple[S, R], side: str, first_refused: type
) -> None:
    monkeypatch.delitem(TRANSITIONS, row)
    tracer = PairTracer()
    pair = Pair.start(policy=SCENARIO_POLICY, attach=tracer.attach)
    pair.run(0.5)
    pair.set_link(1, up=False)
    with pytest.raises(PropertyViolation) as info:
        tracer.check()
    assert (info.value.prop, info.value.role) == (3, side), str(info.value)
    assert isinstance(info.value.step.input, first_refused)
    assert "counters['invalid_transitions'] went 0 -> 1" in str(info.value)


def test_the_live_counter_is_checked_even_for_an_attempt_outside_handle() -> None:
    tracer = PairTracer()
    pair = Pair.start(policy=SCENARIO_POLICY, attach=tracer.attach)
    tracer.check()
    assert pair.client._transition(R.PATH_HEALTHY_AGAIN, pair.now) == []  # ATTACHED has no such row
    with pytest.raises(PropertyViolation, match="invalid_transitions'. is 1 at the end of the trace") as info:
        tracer.check()
    assert (info.value.prop, info.value.role) == (3, "client")


# =============================================================================
# Open: core bugs found by these tests, not fixed yet (these fail until they are)
# =============================================================================


def _birth_pair_after_a_valid_reattach() -> tuple[PairTracer, Pair, list[Any]]:
    """Both sides in BIRTH (no handshake); then a REATTACH the gateway validates, from the client's p2 address."""
    tracer = PairTracer()
    pair = Pair.start(attach=tracer.attach, handshake=False)
    actions = pair.attack("valid", path=2, endpoint=client_endpoint(PathId(2)))
    return tracer, pair, actions


def test_reattach_in_birth_attempts_no_transition_the_table_refuses() -> None:
    """Open (found by PairProperties once ``invalid_transitions`` was checked).

    Minimal generated trace: ``start(no_handshake)``, ``roam(from_client=False,
    path=1)``.  A BIRTH gateway validates a REATTACH (expected_version 0) as
    acceptable and asks the table for (BIRTH, REATTACH_CONFIRMED), which has no
    row: nothing changes and nothing is answered, but the attempt is an illegal
    transition (``counters["invalid_transitions"] == 1``).
    """
    tracer, _, _ = _birth_pair_after_a_valid_reattach()
    tracer.check()


@pytest.mark.parametrize("side", ["client", "gateway"])
def test_a_rate_limited_reattach_while_degraded_attempts_no_transition_the_table_refuses(side: str) -> None:
    """Open (found by PairProperties once ``invalid_transitions`` was checked).

    Minimal generated traces, under one switch a minute: gateway -- three
    valid REATTACHes from a thief, to p2, p1, p1; client -- ``blackhole_active``,
    ``roam(from_client=False, path=1)``, ``run(0.6)``.  Either machine, already
    DEGRADED by a rate-limited switch, meets a second RATE_LIMITED (the gateway
    refusing a REATTACH; the client hearing that refusal) and asks the table for
    (DEGRADED, SWITCH_RATE_EXCEEDED), which has no row.
    """
    tracer = PairTracer()
    pair = Pair.start(policy=ONE_SWITCH_A_MINUTE, attach=tracer.attach)
    pair.blackhole(1)
    pair.attack("valid", path=1)  # a thief with the keys takes the gateway's one switch of the minute
    pair.run(1.0)  # the client loses p1; its REATTACHes to p2 are RATE_LIMITED, again and again
    _check(tracer.steps(side), Role(side), pair.policy)


# =============================================================================
# Core bugs found by these tests, kept as regression tests (all fixed).
# =============================================================================


def test_reattach_in_birth_is_never_acknowledged_without_a_binding() -> None:
    """Regression: found by the exhaustive exploration's checker rule (an ACK implies the binding), fixed.

    A BIRTH gateway accepted a valid REATTACH, found no (BIRTH,
    REATTACH_CONFIRMED) row, changed no state and logged nothing, yet consumed
    the nonce and clock anchor and sent SendReattachAck(new_version=0).  (That
    it still asks the table for the row is the open bug above.)
    """
    _, pair, actions = _birth_pair_after_a_valid_reattach()
    acked = any(type(a).__name__ == "SendReattachAck" for a in actions)
    assert not acked or pair.gateway.record.binding is not None
    assert (pair.gateway.last_nonce, pair.gateway.clock_offset_ms) == (0, 0.0)


def _birth_gateway() -> GatewaySession:
    """A gateway that answered the handshake on p1 and has not seen the client's first packet yet."""
    p1 = PathId(1)
    return lone_gateway(SCENARIO_POLICY, bound=False, handshake_binding=Binding(path=p1, endpoint=client_endpoint(p1)))


def _birth_reattach(gw: GatewaySession, **changes: Any) -> ev.ReattachReceived:
    """The client's own first REATTACH (valid, fresh at t=0, on p1), with ``changes`` applied."""
    return valid_reattach(gw, path=PathId(1), **changes)


def _assert_rejected_without_mutation(gw: GatewaySession, req: ev.ReattachReceived, now: float, reason: R) -> None:
    before = (gw.record, gw.last_nonce, gw.clock_offset_ms)
    actions = gw.handle(req, now=now)
    assert [a.reason for a in actions if isinstance(a, EmitEvent)] == [reason]  # no STATE_CHANGE first
    assert not any(isinstance(a, (BindTransport, ReleaseTransport)) for a in actions)
    assert (gw.record, gw.last_nonce, gw.clock_offset_ms) == before


@pytest.mark.parametrize(
    "defect, now, reason",
    [
        (dict(client_ts_ms=1_000), 8.0, R.STALE_TIMESTAMP),  # sent at t=1 s, held back, delivered at 8 s
        (dict(nonce=0), 0.5, R.REPLAYED_NONCE),  # not above the last accepted nonce (0)
    ],
    ids=["held-back", "replayed-nonce"],
)
def test_rejected_reattach_in_birth_changes_nothing(
    defect: dict[str, Any], now: float, reason: R
) -> None:
    """Regression (Property 7): a BIRTH gateway once confirmed the handshake before judging the REATTACH."""
    gw = _birth_gateway()
    _assert_rejected_without_mutation(gw, _birth_reattach(gw, **defect), now, reason)


@pytest.mark.parametrize(
    "ownership, reason",
    [
        (OwnershipRecord(session_id=SessionId(bytes(range(16))), owner="gw-b", revision=1), R.NOT_OWNER),
        (None, R.OWNERSHIP_AMBIGUOUS),
    ],
    ids=["other-owner", "no-record"],
)
def test_reattach_in_birth_for_a_session_owned_elsewhere_changes_nothing(
    ownership: OwnershipRecord | None, reason: R
) -> None:
    """Regression (Property 9): such a REATTACH once bound the session on a gateway that does not own it."""
    gw = _birth_gateway()
    _assert_rejected_without_mutation(gw, _birth_reattach(gw, ownership=ownership), 0.5, reason)


def test_rate_window_deadline_makes_progress_at_the_float_boundary() -> None:
    """Regression: found by FlapProperties (a timer stuck at t = 60.797), fixed in the core meanwhile.

    ``rate_clear_deadline()`` was ``min(switch_times) + 60.0`` while the window
    counted a switch at ``t`` while ``t > now - 60.0``; at ``now = 0.797 + 60.0``
    the float ``now - 60.0`` is ``0.796999999999997 < 0.797``, so TimerFired at
    the deadline left the session DEGRADED with ``next_deadline() <= now``, and
    the driver's timer loop spun at one instant.  Both now use ``switch_expires_at``.
    """
    gw = lone_gateway(ONE_SWITCH_A_MINUTE)
    p2, p3 = PathId(2), PathId(3)
    genuine_reattach(gw, valid_reattach(gw, path=p2, now=0.797), now=0.797)  # switch 1 of 1 allowed a minute, t = 0.797
    gw.handle(valid_reattach(gw, path=p3, now=2.0), now=2.0)  # rate-limited: DEGRADED, still bound on p2
    assert gw.record.state is S.DEGRADED and gw.record.switch_times == (0.797,)
    for t in (25.0, 50.0):  # keep p2 alive (spec 6 silence bound)
        gw.handle(ev.PacketAuthenticated(endpoint=client_endpoint(p2), path=p2), now=t)
    deadline = gw.next_deadline()
    assert deadline == 0.797 + 60.0
    gw.handle(ev.TimerFired(), now=deadline)
    # The only switch (at 0.797) has left the window, so the rate window cleared and the timer moved on.
    assert gw.record.state is S.ATTACHED
    assert gw.next_deadline() is None or gw.next_deadline() > deadline
