"""The transition table as data: its shape, its guards, and the generated docs (spec 4, Properties 3, 4, 10).

Determinism: pure table lookups; no clock.  The docs check reads
``docs/state-machine.md`` if it exists.
"""

from __future__ import annotations

import itertools
import pathlib
import runpy

import pytest

from jvpn_trio.core import states
from jvpn_trio.core.states import (
    IMPAIRMENT_REASONS,
    LIVE_STATES,
    PATH_DEATH_REASONS,
    TERMINATION_REASONS,
    TRANSITIONS,
    BindingEffect,
    Guard,
    ReasonCode,
    Rejected,
    Rule,
    SessionState,
    plan_transition,
    render_markdown,
)

S = SessionState
R = ReasonCode
B = BindingEffect
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "state-machine.md"
ROWS = sorted(TRANSITIONS.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value))


def row_id(row: tuple[tuple[SessionState, ReasonCode], Rule]) -> str:
    (state, reason), _rule = row
    return f"{state.value}-{reason.value}"


def successors(state: SessionState) -> set[SessionState]:
    return {rule.to for (src, _reason), rule in TRANSITIONS.items() if src is state}


def test_enum_values_are_their_names() -> None:
    for enum_type in (SessionState, ReasonCode, BindingEffect, Guard):
        for member in enum_type:
            assert member.value == member.name


def test_spec_states() -> None:
    assert [s.value for s in SessionState] == [
        "BIRTH",
        "ATTACHED",
        "VOLATILE",
        "DEGRADED",
        "RECOVERING",
        "TERMINATED",
    ]
    assert LIVE_STATES == (S.BIRTH, S.ATTACHED, S.VOLATILE, S.DEGRADED, S.RECOVERING)


def test_row_count() -> None:
    # 7 single rows + 3 death reasons x 3 states + 4 impairments + 4 reattach confirmations
    # + 3 rate-exceeded rows + 5 live states x 7 terminations that need no unbound guard.
    assert len(TRANSITIONS) == 7 + 9 + 4 + 4 + 3 + 35 == 62


def test_terminated_has_no_outgoing_rows() -> None:
    assert not [key for key in TRANSITIONS if key[0] is S.TERMINATED]


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.value)
def test_every_live_state_can_reach_terminated(state: SessionState) -> None:
    seen = {state}
    frontier = [state]
    while frontier:
        for nxt in successors(frontier.pop()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert S.TERMINATED in seen


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.value)
def test_every_live_state_terminates_directly_on_local_close(state: SessionState) -> None:
    assert TRANSITIONS[(state, R.LOCAL_CLOSE)] == Rule(S.TERMINATED, B.RELEASE)


def test_every_state_is_reachable_from_birth() -> None:
    seen = {S.BIRTH}
    frontier = [S.BIRTH]
    while frontier:
        for nxt in successors(frontier.pop()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(SessionState)


def test_every_bind_row_ends_in_attached() -> None:
    binds = [(key, rule) for key, rule in TRANSITIONS.items() if rule.effect is B.BIND]
    assert binds
    assert all(rule.to is S.ATTACHED for _key, rule in binds)
    assert {reason for (_state, reason), _rule in binds} == {R.HANDSHAKE_COMPLETE, R.REATTACH_CONFIRMED}


def test_rows_into_terminated_use_only_termination_reasons() -> None:
    # Property 10: termination only on TTLs, policy bounds or security, always reason-coded.
    into = {reason for (_state, reason), rule in TRANSITIONS.items() if rule.to is S.TERMINATED}
    assert into == set(TERMINATION_REASONS)
    for reason in TERMINATION_REASONS:
        rows = [rule for (_state, r), rule in TRANSITIONS.items() if r is reason]
        assert rows and all(rule.to is S.TERMINATED for rule in rows)


def test_path_death_rows() -> None:
    for reason in PATH_DEATH_REASONS:
        assert TRANSITIONS[(S.ATTACHED, reason)] == Rule(S.RECOVERING, B.RELEASE, Guard.BOUND)
        assert TRANSITIONS[(S.VOLATILE, reason)] == Rule(S.RECOVERING, B.RELEASE, Guard.BOUND)
        assert TRANSITIONS[(S.DEGRADED, reason)] == Rule(S.DEGRADED, B.RELEASE, Guard.BOUND)
        assert (S.RECOVERING, reason) not in TRANSITIONS
        assert (S.BIRTH, reason) not in TRANSITIONS


def test_impairment_rows() -> None:
    for reason in IMPAIRMENT_REASONS:
        assert TRANSITIONS[(S.ATTACHED, reason)] == Rule(S.VOLATILE, B.KEEP, Guard.BOUND)
        assert [state for state, r in TRANSITIONS if r is reason] == [S.ATTACHED]


def test_transport_loss_ttl_needs_an_unbound_session() -> None:
    # Property 4: an unbound session past TransportLossTTL terminates, from every unbound state.
    rows = {state: rule for (state, reason), rule in TRANSITIONS.items() if reason is R.TRANSPORT_LOSS_TTL_EXPIRED}
    assert set(rows) == {S.BIRTH, S.RECOVERING, S.DEGRADED}
    assert all(rule == Rule(S.TERMINATED, B.KEEP, Guard.UNBOUND) for rule in rows.values())


def test_rate_rows() -> None:
    for state in (S.ATTACHED, S.VOLATILE, S.RECOVERING):
        assert TRANSITIONS[(state, R.SWITCH_RATE_EXCEEDED)] == Rule(S.DEGRADED, B.KEEP)
    assert (S.DEGRADED, R.SWITCH_RATE_EXCEEDED) not in TRANSITIONS
    assert TRANSITIONS[(S.DEGRADED, R.RATE_WINDOW_CLEARED)] == Rule(S.ATTACHED, B.KEEP, Guard.BOUND)
    assert TRANSITIONS[(S.RECOVERING, R.RECOVERY_WINDOW_EXCEEDED)] == Rule(S.DEGRADED, B.KEEP, Guard.UNBOUND)


def test_handshake_only_from_birth() -> None:
    assert [state for state, reason in TRANSITIONS if reason is R.HANDSHAKE_COMPLETE] == [S.BIRTH]
    assert TRANSITIONS[(S.BIRTH, R.HANDSHAKE_COMPLETE)] == Rule(S.ATTACHED, B.BIND, Guard.UNBOUND)


# -- plan_transition -----------------------------------------------------------------------


def allowed(guard: Guard, bound: bool) -> bool:
    return guard is Guard.ANY or (guard is Guard.BOUND) == bound


@pytest.mark.parametrize("row", ROWS, ids=row_id)
@pytest.mark.parametrize("bound", [True, False], ids=["bound", "unbound"])
def test_plan_transition_enforces_each_rows_guard(
    row: tuple[tuple[SessionState, ReasonCode], Rule], bound: bool
) -> None:
    (state, reason), rule = row
    planned = plan_transition(state, reason, bound=bound)
    if allowed(rule.guard, bound):
        assert planned is rule
    elif rule.guard is Guard.BOUND:
        assert planned == Rejected(state, reason, f"{reason.value} needs an active binding")
    else:
        assert planned == Rejected(state, reason, f"{reason.value} needs the session to be unbound")


def test_plan_transition_guard_messages() -> None:
    assert plan_transition(S.ATTACHED, R.LINK_DOWN, bound=False) == Rejected(
        S.ATTACHED, R.LINK_DOWN, "LINK_DOWN needs an active binding"
    )
    assert plan_transition(S.BIRTH, R.HANDSHAKE_COMPLETE, bound=True) == Rejected(
        S.BIRTH, R.HANDSHAKE_COMPLETE, "HANDSHAKE_COMPLETE needs the session to be unbound"
    )


def test_plan_transition_any_guard_accepts_both() -> None:
    for bound in (True, False):
        assert plan_transition(S.RECOVERING, R.REATTACH_CONFIRMED, bound=bound) == Rule(S.ATTACHED, B.BIND)


def test_every_pair_missing_from_the_table_is_rejected() -> None:
    missing = [
        (state, reason)
        for state, reason in itertools.product(SessionState, ReasonCode)
        if (state, reason) not in TRANSITIONS
    ]
    assert len(missing) == len(SessionState) * len(ReasonCode) - len(TRANSITIONS)
    for state, reason in missing:
        for bound in (True, False):
            assert plan_transition(state, reason, bound=bound) == Rejected(
                state, reason, f"no transition from {state.value} on {reason.value}"
            )


def test_terminated_rejects_even_close() -> None:
    assert plan_transition(S.TERMINATED, R.LOCAL_CLOSE, bound=False) == Rejected(
        S.TERMINATED, R.LOCAL_CLOSE, "no transition from TERMINATED on LOCAL_CLOSE"
    )


# -- generated docs ------------------------------------------------------------------------------


def test_render_markdown_lists_every_row() -> None:
    text = render_markdown()
    table_lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| from")]
    assert len(table_lines) == len(TRANSITIONS)
    for (state, reason), rule in TRANSITIONS.items():
        row = f"| {state.value} | {reason.value} | {rule.to.value} | {rule.effect.value} | {rule.guard.value} |"
        assert row in table_lines


def test_render_markdown_diagram_has_every_edge() -> None:
    text = render_markdown()
    diagram = text.split("```mermaid\n", 1)[1].split("```", 1)[0].splitlines()
    assert diagram[0] == "stateDiagram-v2"
    edges = {}
    for line in diagram[1:]:
        arrow, reasons = line.strip().split(": ", 1)
        src, dst = arrow.split(" --> ")
        edges[(src, dst)] = set(reasons.split(", "))
    expected: dict[tuple[str, str], set[str]] = {}
    for (state, reason), rule in TRANSITIONS.items():
        expected.setdefault((state.value, rule.to.value), set()).add(reason.value)
    assert edges == expected


def test_render_markdown_shape() -> None:
    text = render_markdown()
    assert text.startswith("# State machine\n")
    assert text.endswith("|\n")
    assert "| from | reason | to | binding | guard |\n|---|---|---|---|---|\n" in text
    assert render_markdown() == text


def test_module_main_prints_the_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m jvpn_trio.core.states` runs this file as __main__.
    runpy.run_path(str(pathlib.Path(states.__file__)), run_name="__main__")
    assert capsys.readouterr().out == render_markdown()


def test_docs_state_machine_is_generated_from_the_table() -> None:
    if not DOC.exists():
        pytest.skip(f"{DOC} not generated yet (run: python -m jvpn_trio.core.states > docs/state-machine.md)")
    assert DOC.read_text(encoding="utf-8") == render_markdown(), (
        "docs/state-machine.md is stale: run python -m jvpn_trio.core.states > docs/state-machine.md"
    )
