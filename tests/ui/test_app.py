"""The terminal side of the live UI: keys, the frame loop's bounds, screens and plain-line mode.

The live UI itself is ``ui/attached.py`` (its model, picker and socket are
tested in ``test_attached.py``); here: what it draws on and how often.

Determinism rules: the frame loop runs on the autojump mock clock against a
fake attach client and a recording screen, so frame counts are exact per
virtual second; keys go through a real pseudo-terminal (``os.openpty``) and
are read by the real reader; the plain printer and the live screen write
into a StringIO; the end-to-end plain mode uses a unix socket in a temp dir
(no root).  Every trio test is bounded by ``fail_after``.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
import termios
from typing import Any

import pytest
import trio
from rich.console import Console
from rich.text import Text

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.attach import Gap, StreamItem
from jvpn_trio.drivers.control import ControlAccess, command_handler, serve_control
from jvpn_trio.drivers.event_sink import open_event_sink
from jvpn_trio.ui.app import MAX_FPS, LiveScreen, RecordingScreen, use_tui
from jvpn_trio.ui.lines import PlainPrinter
from jvpn_trio.ui.attached import (
    AgentGone,
    AttachedModel,
    AttachedPrinter,
    AttachedUi,
    run_attached,
)
from jvpn_trio.ui.keys import Command, decode_keys, serve_keys, terminal_keys
from jvpn_trio.ui.views import ViewModel

from .test_attached import FakeClient, attached, status_reply


def client_event(t: float, kind: EventKind = EventKind.STATE_CHANGE, **details: object) -> EmitEvent:
    return EmitEvent(
        kind=kind, t=t, role=Role.CLIENT, session="00" * 16, version=1, reason=ReasonCode.HANDSHAKE_COMPLETE,
        policy="0" * 16, details=details,
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
        with pytest.raises(KeyboardInterrupt), terminal_keys(slave):
            raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# -- the frame loop (of the attached UI) --------------------------------------------------------


def test_frame_rate_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_fps"):
        AttachedUi(FakeClient(), screen=RecordingScreen(), model=AttachedModel(), max_fps=3 * MAX_FPS)
    with pytest.raises(ValueError, match="max_fps"):
        AttachedUi(FakeClient(), screen=RecordingScreen(), model=AttachedModel(), max_fps=0)


async def test_at_most_ten_frames_a_second_then_a_last_frame(autojump_clock: trio.abc.Clock) -> None:
    client = FakeClient()
    screen = RecordingScreen()
    model = AttachedModel(gateway="gw", origin=0.0, footer=lambda s: (f"at {s:.1f}",))
    ui = AttachedUi(client, screen=screen, model=model)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            start = trio.current_time()
            await trio.sleep(5.0)
            frames = screen.frames
            client.send.send_nowait(attached(1, client_event(5.0, from_state="BIRTH", to_state="ATTACHED")))
            await ui.seen.wait_value(1)
            nursery.cancel_scope.cancel()
    assert screen.started
    assert 45 <= frames <= 51  # 10 Hz for 5 virtual seconds (the first frame comes at once)
    assert screen.stopped and screen.frames == frames + 1  # the last frame, after the cancel
    last = ui.model.view(start + 5.0)
    assert isinstance(last, ViewModel) and [e.t for e in last.events] == [5.0]
    assert last.footer == (f"at {start + 5.0:.1f}",)


async def test_a_slow_screen_drops_frames_instead_of_queueing(autojump_clock: trio.abc.Clock) -> None:
    class SlowScreen(RecordingScreen):
        async def show(self, renderable: Any) -> None:
            await trio.sleep(0.35)
            await super().show(renderable)

    screen = SlowScreen()
    ui = AttachedUi(FakeClient(), screen=screen, model=AttachedModel())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ui.run)
            await trio.sleep(3.5)
            nursery.cancel_scope.cancel()
    assert screen.frames == 10  # one per 0.35 s, none queued behind


async def test_live_screen_draws_in_a_worker_thread() -> None:
    out = io.StringIO()
    screen = LiveScreen(Console(file=out, width=40, height=5, force_terminal=True, _environ={}), alt_screen=False)
    with trio.fail_after(10):
        await screen.start()
        await screen.show(Text("frame one"))
        await screen.show(Text("frame two"))
        await screen.stop()
    text = out.getvalue()
    assert text.index("frame one") < text.index("frame two")


# -- plain lines ----------------------------------------------------------------------------


async def test_attached_printer_prints_one_line_per_event_and_per_gap() -> None:
    out = io.StringIO()
    plain = AttachedPrinter(PlainPrinter(out, origin=100.0))
    send, items = trio.open_memory_channel[StreamItem](16)
    send.send_nowait(attached(1, client_event(101.5, from_state="BIRTH", to_state="ATTACHED")))
    send.send_nowait(Gap(missed=3, next_seq=5))
    send.send_nowait(attached(5, client_event(102.25, EventKind.TRANSPORT_SWITCH, from_path="p1", to_path="p2")))
    send.close()  # the agent goes away: the printer says so, after printing what it got
    with trio.fail_after(10):
        with pytest.raises(AgentGone, match="event stream ended"):
            await plain.run(items)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and plain.seen.value == 5
    # Lines in the stream's order: the gap's note between the events it sits between.
    assert [line.split()[:3] for line in lines] == [
        ["1.500", "client", "STATE_CHANGE"], ["1.500", "demo", "GAP"], ["2.250", "client", "TRANSPORT_SWITCH"],
    ]  # fmt: skip
    assert "from_path=p1 to_path=p2" in lines[2] and lines[1].split()[3:] == ["3", "events", "missed"]


async def test_run_attached_plain_mode_through_the_socket(tmp_path: pathlib.Path) -> None:
    out = io.StringIO()
    path = tmp_path / "agent.sock"
    handler = command_handler({"status": lambda _r: status_reply()})
    with trio.fail_after(20):
        async with open_event_sink(None, capacity=64) as sink:
            sink.emit(client_event(101.5, from_state="BIRTH", to_state="ATTACHED"))  # before the UI: replayed
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(serve_control, path, handler, events=sink, access=ControlAccess(group=None), log=lambda _l: None)
                )
                plain = await nursery.start(functools.partial(run_attached, path, tui=False, origin=100.0, stdout=out))
                assert isinstance(plain, AttachedPrinter)
                sink.emit(client_event(102.25, EventKind.TRANSPORT_SWITCH, from_path="p1", to_path="p2"))
                await plain.seen.wait_value(2)
                nursery.cancel_scope.cancel()
    lines = out.getvalue().splitlines()
    assert [line.split()[:3] for line in lines] == [["1.500", "client", "STATE_CHANGE"], ["2.250", "client", "TRANSPORT_SWITCH"]]


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
