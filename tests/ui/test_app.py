"""The UI loop, keys and plain-line mode.

Determinism rules: the frame loop runs on the autojump mock clock against a
fake runtime and a recording screen, so frame counts are exact per virtual
second; keys go through a real pseudo-terminal (``os.openpty``) and are
read by the real reader; the plain printer writes into a StringIO.  Every
trio test is bounded by ``fail_after``.
"""

from __future__ import annotations

import io
import os
import termios
from typing import Any

import pytest
import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.client import RuntimeStatus
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.ui import app as ui_app
from jvpn_trio.ui.app import LiveUi, PlainPrinter, RecordingScreen, next_pin, use_tui
from jvpn_trio.ui.keys import Command, decode_keys, serve_keys, terminal_keys
from jvpn_trio.ui.views import ViewModel

from .test_views import live_session_status


class FakeRuntime:
    def __init__(self, status: RuntimeStatus | None = None) -> None:
        self.status = trio_util.AsyncValue[RuntimeStatus | None](status)
        self.submitted: list[Any] = []

    def submit_nowait(self, event: Any) -> bool:
        self.submitted.append(event)
        return True


def client_event(t: float, kind: EventKind = EventKind.STATE_CHANGE, **details: object) -> EmitEvent:
    return EmitEvent(
        kind=kind, t=t, role=Role.CLIENT, session="00" * 16, version=1, reason=ReasonCode.HANDSHAKE_COMPLETE,
        policy="0" * 16, details=details,  # type: ignore[arg-type]
    )


# -- keys -----------------------------------------------------------------------------------


def test_decode_keys_skips_escape_sequences() -> None:
    assert decode_keys(b"qpse?h") == [
        Command.QUIT, Command.PIN, Command.REEVALUATE, Command.TOGGLE_DETAIL, Command.TOGGLE_HELP,
        Command.TOGGLE_HELP,
    ]
    # Up/down arrows move a selection; ctrl-arrow, F1 and unknown keys are skipped; digits pick a row.
    assert decode_keys(b"\x1b[A\x1b[1;5Cp\x1bOPx\x1b[B3\r") == [Command.UP, Command.PIN, Command.DOWN, 3, Command.ENTER]
    assert decode_keys(b"udcri") == [Command.UNPIN, Command.DISCONNECT, Command.RECONNECT, Command.REEVALUATE, Command.DETAILS]
    assert decode_keys(b"\x1b") == [Command.CLOSE_HELP]
    assert decode_keys(b"") == []


def test_next_pin_cycles_then_unpins() -> None:
    paths = [PathId(3), PathId(1), PathId(2)]
    seen = []
    current = None
    for _ in range(5):
        current = next_pin(current, paths)
        seen.append(current)
    assert seen == [PathId(1), PathId(2), PathId(3), None, PathId(1)]
    assert next_pin(None, []) is None
    assert next_pin(PathId(9), paths) == PathId(1)


async def test_keys_from_a_real_terminal_and_the_mode_is_restored() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        got: list[Command | int] = []
        with trio.fail_after(5):
            with terminal_keys(slave):
                during = termios.tcgetattr(slave)
                assert not during[3] & termios.ECHO and not during[3] & termios.ICANON
                assert during[3] & termios.ISIG  # Ctrl-C still raises SIGINT
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve_keys, slave, got.append)
                    os.write(master, b"p\x1b[Ae?q")
                    while len(got) < 5:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        assert got == [Command.PIN, Command.UP, Command.TOGGLE_DETAIL, Command.TOGGLE_HELP, Command.QUIT]
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_terminal_mode_is_restored_when_the_block_raises() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(KeyboardInterrupt):
            with terminal_keys(slave):
                raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_key_commands_become_inputs_or_toggles() -> None:
    status, _emitted, _now = live_session_status()
    runtime = FakeRuntime(status)
    quits: list[bool] = []
    ui = LiveUi(runtime, screen=RecordingScreen(), gateway="gw", on_quit=lambda: quits.append(True))

    async def main() -> None:
        ui.handle(Command.PIN)
        ui.handle(Command.REEVALUATE)
        ui.handle(Command.TOGGLE_DETAIL)
        ui.handle(Command.TOGGLE_HELP)
        assert ui.state.detail and ui.state.help
        ui.handle(Command.CLOSE_HELP)
        assert not ui.state.help
        ui.handle(Command.QUIT)

    trio.run(main)
    assert runtime.submitted == [ev.PinRequested(path=PathId(1)), ev.ReevaluateRequested()]
    assert quits == [True]
    assert "closing" in ui.state.message


def test_quit_without_a_handler_asks_the_runtime_to_close() -> None:
    runtime = FakeRuntime(None)
    ui = LiveUi(runtime, screen=RecordingScreen(), gateway="gw")

    async def main() -> None:
        ui.handle(Command.PIN)  # no session yet: nothing to pin
        ui.handle(Command.QUIT)

    trio.run(main)
    assert runtime.submitted == [ev.CloseRequested()]


def test_frame_rate_is_bounded() -> None:
    with pytest.raises(ValueError):
        LiveUi(FakeRuntime(), screen=RecordingScreen(), gateway="gw", max_fps=30)


# -- the loop -------------------------------------------------------------------------------


async def test_at_most_ten_frames_a_second_then_a_last_frame(autojump_clock: trio.abc.Clock) -> None:
    status, _emitted, _now = live_session_status()
    runtime = FakeRuntime(status)
    screen = RecordingScreen()
    send, receive = trio.open_memory_channel[EmitEvent](16)
    ui = LiveUi(runtime, screen=screen, gateway="gw", events=receive, origin=0.0, footer=lambda s: (f"at {s:.1f}",))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            assert screen.started
            await trio.sleep(5.0)
            frames = screen.frames
            send.send_nowait(client_event(5.0, from_state="BIRTH", to_state="ATTACHED"))
            nursery.cancel_scope.cancel()
    assert 45 <= frames <= 51  # 10 Hz for 5 virtual seconds (the first frame comes at once)
    assert screen.stopped and screen.frames == frames + 1  # the last frame, after the cancel
    last = ui.view(5.0)
    assert isinstance(last, ViewModel) and [e.t for e in last.events] == [5.0]  # drained before the last frame
    assert last.footer == ("at 5.0",)


async def test_a_slow_screen_drops_frames_instead_of_queueing(autojump_clock: trio.abc.Clock) -> None:
    class SlowScreen(RecordingScreen):
        async def show(self, renderable: Any) -> None:
            await trio.sleep(0.35)
            await super().show(renderable)

    screen = SlowScreen()
    ui = LiveUi(FakeRuntime(), screen=screen, gateway="gw")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            await trio.sleep(3.5)
            nursery.cancel_scope.cancel()
    assert screen.frames == 10  # one per 0.35 s, none queued behind


async def test_run_console_plain_mode_prints_one_line_per_event() -> None:
    out = io.StringIO()
    runtime = FakeRuntime()
    with trio.fail_after(10):
        async with open_event_sink(None, capacity=64) as sink:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: ui_app.run_console(
                        runtime, sink, gateway="gw", tui=False, origin=100.0, stdout=out, task_status=task_status
                    )
                )
                sink.emit(client_event(101.5, from_state="BIRTH", to_state="ATTACHED"))
                sink.emit(client_event(102.25, EventKind.TRANSPORT_SWITCH, from_path="p1", to_path="p2"))
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["1.500", "client", "STATE_CHANGE"]
    assert lines[1].split()[:3] == ["2.250", "client", "TRANSPORT_SWITCH"]
    assert "from_path=p1 to_path=p2" in lines[1]


async def test_plain_printer_flushes_what_is_queued_when_cancelled() -> None:
    out = io.StringIO()
    printer = PlainPrinter(out, origin=10.0)
    send, receive = trio.open_memory_channel[EmitEvent](16)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(printer.run, receive)
            await trio.sleep(0.05)
            printer.note(12.0, "SCENARIO_STEP", "wifi0: loss_pct=20.0")
            send.send_nowait(client_event(13.0))
            nursery.cancel_scope.cancel()  # before the printer got to run again
    text = out.getvalue()
    assert "2.000 demo    SCENARIO_STEP     wifi0: loss_pct=20.0" in text
    assert "3.000 client  STATE_CHANGE" in text


def test_use_tui() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_tui(False, Tty()) is True
    assert use_tui(True, Tty()) is False
    assert use_tui(False, io.StringIO()) is False
