"""The attached UI: its model from a fake attach client, golden frames of the picker and notices, end to end.

Determinism rules: the model tests pass ``now`` explicitly (no clock, no
sockets); the UI-loop tests use a fake client on the autojump clock; the
end-to-end test runs ``serve_control`` with a fake handler and a real
EventSink on a unix socket in a temp dir (no root), under ``fail_after``.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import pytest
import trio

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.attach import AttachedEvent, Gap, Hello, StreamItem
from jvpn_trio.drivers.control import ControlAccess, ControlError, ErrorCode, command_handler, serve_control
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.ui.app import RecordingScreen
from jvpn_trio.ui.attached import (
    QUIT,
    AgentGone,
    AttachedModel,
    AttachedUi,
    Request,
    run_attached,
)
from jvpn_trio.ui.keys import Command
from jvpn_trio.ui.views import render

from .test_views import check_golden, frame_text

SESSION = "ab" * 16


def status_reply(*, pinned: str | None = None, now_s: float = 100.0, srtt: float = 12.5) -> dict[str, Any]:
    """A client status reply as ``client_status`` builds it (the fields the UI reads)."""

    def path(pid: str, iface: str, kind: str, *, active: bool, verdict: str = "HEALTHY", up: bool = True) -> dict[str, Any]:
        return {
            "path": pid, "interface": iface, "kind": kind, "priority": 0, "endpoint": "192.0.2.1:51820",
            "active": active, "pinned": pid == pinned, "link_up": up, "verdict": verdict,
            "reason": "WITHIN_THRESHOLDS", "srtt_ms": srtt, "jitter_ms": 1.5, "loss_pct": 0.0,
        }  # fmt: skip

    return {
        "role": "client", "session": SESSION, "state": "ATTACHED", "version": 3, "policy": "0123456789abcdef",
        "now_s": now_s, "session_age_s": 42.0, "binding": "p2@192.0.2.1:51820", "active_path": "p2",
        "pinned_path": pinned, "pending_reattach": None, "switches_last_minute": 1, "max_switches_per_minute": 6,
        "recovery_deadline_in_s": None, "unbound_deadline_in_s": None, "tunnel_address": "10.66.0.2/24",
        "paths": [
            path("p1", "eth0", "ethernet", active=False, verdict="DEAD", up=False),
            path("p2", "wlan0", "wifi", active=True),
            path("p3", "wwan0", "lte", active=False),
        ],
        "counters": {"tx_bytes": 2048, "tx_packets": 16, "rx_bytes": 4096, "rx_packets": 8},
    }  # fmt: skip


def event(t: float, kind: EventKind = EventKind.STATE_CHANGE, reason: ReasonCode = ReasonCode.HANDSHAKE_COMPLETE,
          **details: object) -> EmitEvent:  # fmt: skip
    return EmitEvent(
        kind=kind, t=t, role=Role.CLIENT, session=SESSION, version=1, reason=reason, policy="0" * 16,
        details=details,  # type: ignore[arg-type]
    )  # fmt: skip


def attached(seq: int, e: EmitEvent) -> AttachedEvent:
    return AttachedEvent(seq=seq, data=e.to_dict(), event=e)


class FakeClient:
    """An attach client without a socket: scripted status replies, a stream, and recorded requests."""

    def __init__(self, *, access: str = "steer", refuse: ControlError | None = None) -> None:
        self.hello = Hello(versions=(1,), access=access, commands=(), uid=1000, run="r1")
        self.reply = status_reply()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.refuse = refuse
        self.send, self.items = trio.open_memory_channel[StreamItem](64)

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return self.reply

    async def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.requests.append((cmd, fields))
        if self.refuse is not None:
            raise self.refuse
        return {"input": "PinRequested", **fields, "interface": "wwan0"}

    async def subscribe(self) -> trio.MemoryReceiveChannel[StreamItem]:
        await trio.lowlevel.checkpoint()
        return self.items


# -- the model, without sockets ------------------------------------------------------------


def test_model_shows_status_replayed_events_and_gaps() -> None:
    model = AttachedModel(gateway="192.0.2.1:51820")
    model.on_status(status_reply(), now=10.0)
    model.on_item(attached(1, event(5.0, from_state="BIRTH", to_state="ATTACHED")))
    model.on_item(Gap(missed=7, next_seq=9))
    model.on_item(attached(9, event(6.5, EventKind.TRANSPORT_SWITCH, ReasonCode.OPERATOR_PIN, from_path="p2", to_path="p3")))
    vm = model.view(now=12.0)
    assert (vm.state, vm.session, vm.version, vm.tunnel) == ("ATTACHED", SESSION[:8], 3, "10.66.0.2/24")
    assert vm.uptime_s == 44.0  # 42 s in the reply, 2 s since it arrived
    assert [(p.path, p.interface, p.kind, p.active) for p in vm.paths] == [
        ("p1", "eth0", "ethernet", False), ("p2", "wlan0", "wifi", True), ("p3", "wwan0", "lte", False),
    ]  # fmt: skip
    assert vm.counters.tx_bytes == 2048 and vm.counters.rx_packets == 8
    # Newest first; times from the first event seen; the gap is a line of its own.
    assert [(e.kind, e.missed, e.seq) for e in vm.events] == [
        ("TRANSPORT_SWITCH", 0, 9), ("GAP", 7, None), ("STATE_CHANGE", 0, 1),
    ]  # fmt: skip
    assert vm.events[0].t == 1.5 and vm.events[0].summary == "wlan0 → wwan0"
    assert model.last_seq == 9 and model.missed == 7


def test_model_keeps_an_rtt_history_from_the_polled_srtts() -> None:
    model = AttachedModel()
    for i, srtt in enumerate((10.0, 11.0, 12.0)):
        model.on_status(status_reply(now_s=100.0 + i, srtt=srtt), now=float(i))
    model.on_status(status_reply(now_s=102.0, srtt=99.0), now=3.0)  # the same snapshot again: no new sample
    assert tuple(model.rtt["p2"]) == (10.0, 11.0, 12.0)
    assert model.view(3.0).paths[1].rtt_history_ms == (10.0, 11.0, 12.0)


def test_before_the_first_reply_the_ui_is_attaching() -> None:
    vm = AttachedModel().view(now=0.0)
    assert vm.state == "ATTACHING" and vm.paths == ()
    between = AttachedModel()
    between.on_status({"role": "client", "session": None, "state": "CONNECTING", "paths": []}, now=0.0)
    assert between.view(0.0).state == "CONNECTING"


def test_the_picker_lists_paths_and_enter_pins_the_chosen_one() -> None:
    model = AttachedModel()
    model.on_status(status_reply(), now=0.0)
    assert model.handle(Command.PIN, 0.0) is None
    picker = model.picker
    assert picker is not None and picker.selected == 1  # starts on the active path
    assert [(r.number, r.path, r.interface, r.kind, r.verdict) for r in picker.rows] == [
        (1, "p1", "eth0", "ethernet", "DOWN"), (2, "p2", "wlan0", "wifi", "HEALTHY"), (3, "p3", "wwan0", "lte", "HEALTHY"),
    ]  # fmt: skip
    model.handle(Command.DOWN, 0.0)
    assert model.picker is not None and model.picker.selected == 2
    model.handle(Command.DOWN, 0.0)  # wraps
    model.handle(3, 0.0)  # a digit selects its row
    assert model.handle(Command.ENTER, 0.0) == Request(cmd="pin", path="p3")
    assert model.picker is None
    # Esc cancels; u in the picker unpins.
    model.handle(Command.PIN, 0.0)
    model.handle(Command.CLOSE_HELP, 0.0)
    assert model.picker is None
    model.handle(Command.PIN, 0.0)
    assert model.handle(Command.UNPIN, 0.0) == Request(cmd="unpin")


def test_keys_map_to_one_request_each_and_disconnect_asks_first() -> None:
    model = AttachedModel()
    model.on_status(status_reply(), now=0.0)
    assert model.handle(Command.UNPIN, 0.0) == Request(cmd="unpin")
    assert model.handle(Command.REEVALUATE, 0.0) == Request(cmd="reevaluate")
    assert model.handle(Command.RECONNECT, 0.0) == Request(cmd="reconnect")
    assert model.handle(Command.DISCONNECT, 1.0) is None  # asks to confirm
    assert "press d again" in model.view(1.5).message
    assert model.handle(Command.DISCONNECT, 2.0) == Request(cmd="disconnect")
    assert model.handle(Command.DISCONNECT, 10.0) is None  # a fresh d asks again
    assert model.handle(Command.QUIT, 0.0) == QUIT
    model.handle(Command.PIN, 0.0)
    model.handle(Command.PIN, 0.0)  # p again closes the picker
    assert model.picker is None


def test_an_event_can_be_selected_and_shown_with_every_detail() -> None:
    model = AttachedModel()
    model.on_item(attached(1, event(1.0, from_state="BIRTH", to_state="ATTACHED", binding="p2@192.0.2.1:51820")))
    model.on_item(attached(2, event(2.0, EventKind.TRANSPORT_SWITCH, ReasonCode.OPERATOR_PIN, from_path="p2", to_path="p3")))
    model.handle(Command.DOWN, 0.0)  # selects the newest
    model.handle(Command.DOWN, 0.0)
    model.handle(Command.ENTER, 0.0)
    vm = model.view(0.0)
    assert vm.selected_event == 1 and vm.event_detail is not None and vm.event_detail.seq == 1
    assert ("binding", "p2@192.0.2.1:51820") in vm.event_detail.details
    model.handle(Command.CLOSE_HELP, 0.0)
    assert model.view(0.0).event_detail is None


def test_an_event_of_a_newer_agent_is_shown_raw() -> None:
    model = AttachedModel(origin=0.0)
    model.on_item(AttachedEvent(seq=1, data={"kind": "NEW_KIND", "t": 3.0, "role": "client", "reason": "NEW", "x": 1}, event=None))
    model.detail = True
    (row,) = model.view(0.0).events
    assert (row.kind, row.reason, row.t, row.details) == ("NEW_KIND", "NEW", 3.0, (("x", "1"),))


# -- golden frames --------------------------------------------------------------------------


def _model_with_events() -> AttachedModel:
    model = AttachedModel(title="jvpn-trio", gateway="192.0.2.1:51820", origin=0.0)
    model.on_status(status_reply(pinned="p3"), now=0.0)
    model.on_item(attached(1, event(1.0, from_state="BIRTH", to_state="ATTACHED")))
    model.on_item(Gap(missed=12, next_seq=14))
    model.on_item(attached(14, event(9.25, EventKind.TRANSPORT_SWITCH, ReasonCode.OPERATOR_PIN, from_path="p2", to_path="p3")))
    return model


def test_frame_of_the_path_picker(request: pytest.FixtureRequest) -> None:
    model = _model_with_events()
    model.handle(Command.PIN, 0.0)
    model.handle(Command.DOWN, 0.0)
    check_golden(request, "attached_picker", frame_text(render(model.view(0.0))))


def test_frame_with_a_refusal_notice_and_a_gap(request: pytest.FixtureRequest) -> None:
    model = _model_with_events()
    model.flash("pin refused: this UI may look, not steer (permission denied)", 0.0)
    check_golden(request, "attached_notice", frame_text(render(model.view(0.0))))


def test_frame_of_an_event_detail(request: pytest.FixtureRequest) -> None:
    model = _model_with_events()
    model.handle(Command.DETAILS, 0.0)
    check_golden(request, "attached_event_detail", frame_text(render(model.view(0.0))))


# -- the loop with a fake client --------------------------------------------------------------


async def test_keys_send_requests_and_a_refusal_is_a_notice(autojump_clock: trio.abc.Clock) -> None:
    client = FakeClient(refuse=ControlError("/run/x.sock: permission denied", code=ErrorCode.PERMISSION_DENIED))
    screen = RecordingScreen()
    ui = AttachedUi(client, screen=screen, model=AttachedModel())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            client.send.send_nowait(attached(1, event(1.0)))
            await trio.sleep(0.5)
            ui.handle(Command.PIN)
            ui.handle(Command.ENTER)  # the active path, p2
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    assert client.requests == [("pin", {"path": "p2"})]
    assert ui.model.message == "pin refused: this UI may look, not steer (permission denied)"
    assert ui.seen.value == 1 and screen.frames >= 5 and screen.stopped


async def test_q_ends_the_ui_only(autojump_clock: trio.abc.Clock) -> None:
    client = FakeClient()
    ui = AttachedUi(client, screen=RecordingScreen(), model=AttachedModel())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            ui.handle(Command.QUIT)
    assert client.requests == []  # nothing asked of the agent


async def test_the_agent_going_away_ends_the_ui_with_one_line(autojump_clock: trio.abc.Clock) -> None:
    client = FakeClient()
    ui = AttachedUi(client, screen=RecordingScreen(), model=AttachedModel())
    with trio.fail_after(10):
        client.send.close()  # the agent closed the connection
        with pytest.raises(AgentGone, match="the agent went away"):
            await ui.run()


# -- end to end over a real socket, no root ----------------------------------------------------


async def test_attached_ui_replays_then_follows_and_pins_through_the_socket(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.sock"
    pins: list[dict[str, Any]] = []

    def pin(request: dict[str, Any]) -> dict[str, Any]:
        pins.append(request)
        return {"input": "PinRequested", "path": request["path"], "interface": "wwan0", "reason": "OPERATOR_PIN"}

    handler = command_handler({"status": lambda _r: status_reply(), "pin": pin})
    screen = RecordingScreen()
    with trio.fail_after(20):
        async with open_event_sink(None, capacity=64) as sink:
            sink.emit(event(1.0, from_state="BIRTH", to_state="ATTACHED"))  # before the UI: replayed
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(serve_control, path, handler, events=sink, access=ControlAccess(group=None), log=lambda _l: None)
                )
                ui = await nursery.start(functools.partial(run_attached, path, tui=True, screen=screen, keys=False))
                assert isinstance(ui, AttachedUi)
                sink.emit(event(2.0, EventKind.TRANSPORT_SWITCH, ReasonCode.OPERATOR_PIN, from_path="p2", to_path="p3"))
                await ui.seen.wait_value(lambda seq: seq >= 2)
                ui.handle(Command.PIN)
                ui.handle(3)
                ui.handle(Command.ENTER)
                while not pins or "OPERATOR_PIN" not in ui.model.message:
                    await trio.sleep(0.01)
                vm = ui.model.view(trio.current_time())
                nursery.cancel_scope.cancel()
    assert [e.seq for e in vm.events] == [2, 1]  # the replayed one, then the live one
    assert [p.interface for p in vm.paths] == ["eth0", "wlan0", "wwan0"]
    assert pins == [{"v": 1, "id": pins[0]["id"], "cmd": "pin", "path": "p3"}] or [p.get("path") for p in pins] == ["p3"]
    assert ui.model.message == "pin p3 (wwan0) requested: OPERATOR_PIN"
    assert screen.frames >= 1


async def test_without_an_agent_run_attached_says_so(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(5):
        with pytest.raises(ControlError, match="socket missing"):
            await run_attached(tmp_path / "none.sock", tui=True, screen=RecordingScreen(), keys=False)
