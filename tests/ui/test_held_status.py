"""A held agent's status and attached UI: it says why no session runs (a disconnect, another client).

Determinism: pure functions over literal status dicts; no clock, no sockets.
"""

from __future__ import annotations

import pytest

from jvpn_trio.core.states import ReasonCode
from jvpn_trio.ui.status import CONNECTING, HELD_STATES, HELD_TEXTS, client_status, render_status_text
from jvpn_trio.ui.views import STATE_STYLES, attached_view_model


@pytest.mark.parametrize(
    ("held", "state", "because"),
    [
        (ReasonCode.SESSION_REPLACED, "REPLACED", "replaced by another client with the same key"),
        (ReasonCode.OPERATOR_DISCONNECT, "DISCONNECTED", "disconnected by an operator"),
    ],
)
def test_a_held_agent_says_why(held: ReasonCode, state: str, because: str) -> None:
    status = client_status(None, sessions_started=1, held=held)
    assert (status["state"], status["held"], status["held_because"]) == (state, held.value, because)
    assert f"{because} ({held.value})" in render_status_text(status)
    view = attached_view_model(status, [], now=1.0, received_at=0.0, origin=0.0, gateway="gw")
    assert view.state == state and view.message == f"{because}: c reconnects"
    # A key's own feedback wins over the standing note.
    pressed = attached_view_model(status, [], now=1.0, received_at=0.0, origin=0.0, gateway="gw", message="reconnecting")
    assert pressed.message == "reconnecting"


def test_every_hold_has_a_state_a_style_and_a_text() -> None:
    assert set(HELD_STATES) == set(HELD_TEXTS)
    assert all(state in STATE_STYLES for state in HELD_STATES.values())


def test_an_agent_that_is_not_held_is_connecting_as_before() -> None:
    status = client_status(None, sessions_started=1)
    assert status["state"] == CONNECTING and "held" not in status and "held:" not in render_status_text(status)
