"""Golden frames: fixed view models rendered through rich's recording console.

Each test renders a screen into ``Console(file=StringIO(), width=100,
height=30, record=True)`` and compares ``export_text()`` with
``tests/data/ui/<name>.txt``.  Nothing here reads a clock: view models are
built from fixed values, or from a real ``ClientSession`` fed inputs at
exact ``now`` values (no trio, no sockets).  The policy fingerprint is
scrubbed so that a change of the default policy does not invalidate frames.

To accept new frames after an intended change of the views::

    python -m pytest tests/ui --regen      # or: JVPN_UI_REGEN=1 python -m pytest tests/ui
    git diff tests/data/ui                 # review every changed frame

A frame is rewritten only with ``--regen`` (or the variable); otherwise a
missing or different golden file fails the test with a unified diff.
"""

from __future__ import annotations

import difflib
import io
import os
import pathlib
import re

import attrs
import pytest
from rich.console import Console, RenderableType
from rich.panel import Panel
from rich.text import Text

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.client import ClientStatistics, RuntimeStatus
from jvpn_trio.ui import views
from jvpn_trio.ui.views import CountersView, EventView, PathView, ViewModel, build_view_model, render

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "ui"
WIDTH, HEIGHT = 100, 30
_FINGERPRINT = re.compile(r"\b[0-9a-f]{16}\b")


def regen_requested(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen", default=False)) or os.environ.get("JVPN_UI_REGEN") == "1"


def frame_text(renderable: RenderableType, *, height: int = HEIGHT) -> str:
    console = Console(
        file=io.StringIO(), width=WIDTH, height=height, record=True, color_system="truecolor", _environ={}
    )
    console.print(renderable)
    text = console.export_text(styles=False)
    text = _FINGERPRINT.sub("<fingerprint...>", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def check_golden(request: pytest.FixtureRequest, name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if regen_requested(request):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"no golden frame {path}; run `python -m pytest tests/ui --regen` and review it"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), text.splitlines(keepends=True), str(path), "rendered"
            )
        )
        pytest.fail(f"frame {name} differs from its golden file:\n{diff}")


# -- view models ---------------------------------------------------------------------------

SID = SessionId(bytes(range(16)))
PATHS = ((PathId(1), "eth0", "ethernet"), (PathId(2), "wifi0", "wifi"), (PathId(3), "lte0", "lte"))
ENDPOINTS = {1: ("127.0.0.1", 40001), 2: ("127.0.0.1", 40002), 3: ("127.0.0.1", 40003)}


def live_session_status() -> tuple[RuntimeStatus, list[EmitEvent], float]:
    """A real client core: eth0 down, wifi0 carrying the session, 2 s of probes with fixed RTTs."""
    session = ClientSession(policy=Policy(), session_id=SID, now=100.0)
    emitted: list[EmitEvent] = [a for a in session.creation_events() if isinstance(a, EmitEvent)]

    def feed(event: object, now: float) -> None:
        emitted.extend(a for a in session.handle(event, now=now) if isinstance(a, EmitEvent))  # type: ignore[arg-type]

    for i, priority in ((1, 10), (2, 20), (3, 30)):
        feed(ev.PathAdded(path=PathId(i), priority=priority, endpoint=ENDPOINTS[i]), 100.0)
    feed(ev.HandshakeCompleted(session_id=SID, binding=Binding(PathId(2), ENDPOINTS[2]), gateway_version=1), 100.0)
    feed(ev.LinkChanged(path=PathId(1), up=False), 100.0)
    rtt_s = {2: 0.012, 3: 0.038}  # acks arrive before the next probes leave (time never runs back)
    t = 100.0
    for seq in range(1, 41):
        for p in (1, 2, 3):
            feed(ev.ProbeSent(path=PathId(p), seq=seq), t)
        for p in (2, 3):
            wobble = (seq % 5) * 0.002 if p == 3 else (seq % 3) * 0.0005
            # As a real gateway answers: it names its binding only to probes from the bound endpoint.
            bound = PathId(2) if p == 2 else None
            feed(ev.ProbeAcked(path=PathId(p), seq=seq, gateway_version=1, gateway_bound_path=bound), t + rtt_s[p] + wobble)
        t = round(t + 0.05, 6)
    status = RuntimeStatus(
        snapshot=session.snapshot(now=t),
        paths=PATHS,
        tunnel_address="10.66.0.2/24",
        statistics=ClientStatistics(rx_bytes=1_234_567, rx_packets=1_300, tx_bytes=45_678, tx_packets=210),
    )
    return status, emitted, t


def path_view(n: int, **changes: object) -> PathView:
    base = dict(
        path=f"p{n}",
        interface=PATHS[n - 1][1],
        kind=PATHS[n - 1][2],
        endpoint=f"127.0.0.1:4000{n}",
        rtt_ms=[2.1, 13.4, 61.7][n - 1],
        jitter_ms=[0.2, 1.1, 7.9][n - 1],
        loss_pct=0.0,
        verdict="HEALTHY",
        reason="WITHIN_THRESHOLDS",
        active=False,
        pinned=False,
        link_up=True,
        rtt_history_ms=tuple([61.0, 64.5, 58.2, 70.1, 62.0, 55.3, 66.6, 61.7] * 2) if n == 3 else (13.0, 13.4),
    )
    base.update(changes)
    return PathView(**base)  # type: ignore[arg-type]


def event(t: float, kind: str, version: int, reason: str, summary: str, role: str = "client", **details: str) -> EventView:
    return EventView(
        t=t, role=role, kind=kind, version=version, reason=reason, summary=summary, details=tuple(details.items())
    )


def recovering_model(**changes: object) -> ViewModel:
    base = dict(
        title="jvpn-trio demo · demo",
        state="RECOVERING",
        session="00010203",
        version=5,
        uptime_s=18.4,
        gateway="127.0.0.1:51820",
        policy="680fe55a5e28ad6e",
        tunnel="10.66.0.2/24",
        paths=(
            path_view(1, verdict="DEAD", reason="LINK_DOWN", link_up=False, rtt_ms=None, jitter_ms=None, loss_pct=100.0,
                      rtt_history_ms=()),
            path_view(2, verdict="DEAD", reason="LINK_DOWN", link_up=False, loss_pct=35.0),
            path_view(3, verdict="DEAD", reason="MISSED_PROBES", loss_pct=20.0, pinned=True),
        ),
        events=(
            event(18.261, "STATE_CHANGE", 5, "MISSED_PROBES", "VOLATILE → RECOVERING", path="p3", measured="3.0",
                  threshold="3.0"),
            event(18.210, "STATE_CHANGE", 4, "LOSS_ABOVE_THRESHOLD", "ATTACHED → VOLATILE", path="p3"),
            event(9.496, "TRANSPORT_SWITCH", 3, "LOSS_ABOVE_THRESHOLD", "wifi0 → lte0",
                  binding="p3@127.0.0.1:40003", switches_last_minute="1"),
            event(9.456, "TRANSPORT_SWITCH", 2, "REATTACH_CONFIRMED", "wifi0 → lte0", role="gateway"),
            event(0.525, "STATE_CHANGE", 1, "HANDSHAKE_COMPLETE", "BIRTH → ATTACHED", binding="p2@127.0.0.1:40002"),
            event(0.525, "STATE_CHANGE", 0, "SESSION_CREATED", "· → BIRTH"),
        ),
        counters=CountersView(tx_bytes=98_765, tx_packets=360, rx_bytes=2_345_678, rx_packets=720, tx_dropped=7),
        switches_last_minute=1,
        max_switches_per_minute=6,
        recovery_left_s=1.2,
        unbound_left_s=29.7,
        pinned="lte0",
        pending=None,
        footer=(
            "emulated: eth0 link down  ·  wifi0 link down  ·  lte0 blackhole, 30±8 ms",
            "scenario demo:  18.4 / 60 s  ·  at 18 s: LTE blackholed  ·  next at 27 s: LTE delivers again",
        ),
    )
    base.update(changes)
    return ViewModel(**base)  # type: ignore[arg-type]


# -- golden frames -------------------------------------------------------------------------


def test_frame_from_a_live_core_snapshot(request: pytest.FixtureRequest) -> None:
    status, emitted, now = live_session_status()
    vm = build_view_model(status, emitted, now=now, origin=100.0, gateway="127.0.0.1:51820", title="jvpn-trio")
    assert vm.state == "ATTACHED" and [p.active for p in vm.paths] == [False, True, False]
    check_golden(request, "attached", frame_text(render(vm)))


def test_frame_while_recovering(request: pytest.FixtureRequest) -> None:
    check_golden(request, "recovering", frame_text(render(recovering_model())))


def test_frame_with_event_details(request: pytest.FixtureRequest) -> None:
    check_golden(request, "recovering_detail", frame_text(render(recovering_model(detail=True, message="unpin requested"))))


def test_frame_while_handshaking(request: pytest.FixtureRequest) -> None:
    vm = build_view_model(None, [], now=0.2, origin=0.0, gateway="127.0.0.1:51820", title="jvpn-trio")
    assert vm.state == views.HANDSHAKING
    check_golden(request, "handshaking", frame_text(render(vm), height=18))


def test_frame_with_help(request: pytest.FixtureRequest) -> None:
    check_golden(request, "help", frame_text(render(recovering_model(help=True))))


def test_frame_after_termination(request: pytest.FixtureRequest) -> None:
    vm = recovering_model(
        state="TERMINATED",
        version=9,
        recovery_left_s=None,
        unbound_left_s=None,
        events=(
            event(60.003, "STATE_CHANGE", 4, "PEER_CLOSE", "ATTACHED → TERMINATED", role="gateway"),
            event(60.002, "STATE_CHANGE", 9, "LOCAL_CLOSE", "ATTACHED → TERMINATED"),
        ),
        footer=(),
    )
    check_golden(request, "terminated", frame_text(render(vm), height=20))


# -- properties of the views (no golden) ----------------------------------------------------


def test_every_state_and_verdict_has_a_colour() -> None:
    for state in SessionState:
        assert views.STATE_STYLES[state.value]
    assert views.STATE_STYLES[views.HANDSHAKING]
    assert set(views.VERDICT_STYLES) == {"HEALTHY", "IMPAIRED", "DEAD", "UNKNOWN"}


def test_header_colours_the_state() -> None:
    panel = views.render_header(recovering_model())
    assert isinstance(panel, Panel)
    text = panel.renderable
    assert isinstance(text, Text)
    styled = {text.plain[span.start : span.end].strip(): str(span.style) for span in text.spans}
    assert styled["RECOVERING"] == views.STATE_STYLES["RECOVERING"]


def test_build_view_model_uses_now_for_countdowns_and_names_paths() -> None:
    status, emitted, now = live_session_status()
    later = build_view_model(status, emitted, now=now + 30.0, origin=100.0, gateway="gw")
    assert later.uptime_s == pytest.approx(now + 30.0 - 100.0)
    assert [(p.interface, p.kind) for p in later.paths] == [("eth0", "ethernet"), ("wifi0", "wifi"), ("lte0", "lte")]
    # Headlines only by default; every kind (PATH_HEALTH too) with detail.
    assert {e.kind for e in later.events} <= {"STATE_CHANGE", "TRANSPORT_SWITCH", "SECURITY_EVENT"}
    detailed = build_view_model(status, emitted, now=now, origin=100.0, gateway="gw", detail=True)
    assert "PATH_HEALTH" in {e.kind for e in detailed.events}
    assert detailed.events[0].t >= detailed.events[-1].t  # newest first


def test_counters_come_from_the_runtime_statistics() -> None:
    status, emitted, now = live_session_status()
    stats = ClientStatistics(tx_bytes=1, tx_packets=2, rx_bytes=3, rx_packets=4, tx_dropped_unbound=5, rx_tun_full=6)
    vm = build_view_model(attrs.evolve(status, statistics=stats), emitted, now=now, origin=100.0, gateway="gw")
    assert vm.counters == CountersView(tx_bytes=1, tx_packets=2, rx_bytes=3, rx_packets=4, tx_dropped=5)


def test_event_view_summaries() -> None:
    names = {"p2": "wifi0", "p3": "lte0"}

    def make(kind: EventKind, reason: ReasonCode, **details: object) -> EmitEvent:
        return EmitEvent(kind=kind, t=12.5, role=Role.CLIENT, session="00" * 16, version=3, reason=reason,
                         policy="0" * 16, details=details)  # type: ignore[arg-type]

    switch = views.event_view(
        make(EventKind.TRANSPORT_SWITCH, ReasonCode.LINK_DOWN, from_path="p2", to_path="p3", binding="p3@x:1"),
        origin=10.0,
        names=names,
    )
    assert (switch.t, switch.summary, switch.details) == (2.5, "wifi0 → lte0", (("binding", "p3@x:1"),))
    created = views.event_view(make(EventKind.STATE_CHANGE, ReasonCode.SESSION_CREATED, from_state=None,
                                    to_state="BIRTH"), origin=0.0)
    assert created.summary == "· → BIRTH"
    denied = views.event_view(make(EventKind.SWITCH_DENIED, ReasonCode.SWITCH_RATE_EXCEEDED, target="p3",
                                   switches_last_minute=6, max_switches_per_minute=6), origin=0.0, names=names)
    assert denied.summary == "lte0 6/6"
    security = views.event_view(make(EventKind.SECURITY_EVENT, ReasonCode.REPLAYED_NONCE, endpoint="203.0.113.1:9"),
                                origin=0.0)
    assert security.summary == "from 203.0.113.1:9"


def test_sparkline_and_formatting() -> None:
    assert views.sparkline([]) == ""
    assert views.sparkline([10.0, 10.0, 10.0]) == "▁▁▁"  # steady: flat and low
    assert views.sparkline([10.0, 20.0, 30.0]) == "▁▅█"
    assert len(views.sparkline(list(range(100)))) == views.SPARK_WIDTH
    assert views.format_bytes(512) == "512 B"
    assert views.format_bytes(1_234_567) == "1.2 MiB"
    assert views.format_duration(3725.9) == "1:02:05"
    assert views.format_duration(None) == views.NONE_TEXT


def test_between_sessions_the_agent_is_connecting_and_keeps_its_counters() -> None:
    status = RuntimeStatus(
        snapshot=None,
        paths=((PathId(1), "eth0", "ethernet"),),
        tunnel_address="10.66.0.2/24",
        statistics=ClientStatistics(tx_packets=5, tx_dropped_unbound=3),
        sessions_started=1,
    )
    vm = build_view_model(status, [], now=9.0, origin=0.0, gateway="gw")
    assert (vm.state, vm.session, vm.tunnel) == (views.CONNECTING, None, "10.66.0.2/24")
    assert (vm.counters.tx_packets, vm.counters.tx_dropped) == (5, 3)
    assert views.STATE_STYLES[views.CONNECTING]
    assert "CONNECTING" in frame_text(render(vm), height=18)
