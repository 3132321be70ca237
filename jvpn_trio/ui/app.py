"""The terminal side of the live UI: screens, frame-rate bounds, and plain-line mode.

The live UI itself is :mod:`jvpn_trio.ui.attached`: ``up`` in the
foreground, bare ``jvpn-trio`` and the demo all attach to the agent over its
control socket, so there is one UI and one way in.  This module holds what
that UI draws on:

- :class:`LiveScreen` wraps ``rich.live.Live(auto_refresh=False)`` (no
  refresh thread) and does every terminal write in a worker thread
  (``trio.to_thread.run_sync``), so a terminal that stops reading blocks that
  thread and the frame loop, never the Trio thread.  :class:`RecordingScreen`
  keeps the last frame (tests, the pictures in docs/tui.md).
- Without a terminal (or with ``--no-tui``) :class:`PlainPrinter` prints one
  line per event (:func:`jvpn_trio.ui.lines.format_event_line`), writing in a
  worker thread, dropping and counting what a stalled stream cannot take.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO

import attrs
import trio
from rich.console import Console, RenderableType
from rich.live import Live

from jvpn_trio.ui.lines import format_event_line
from jvpn_trio.core.actions import EmitEvent

#: At most ten frames a second: a person cannot read faster, and each frame costs a terminal write.
MAX_FPS = 10.0
#: Events the UI keeps for the events pane (a bounded deque; older ones fall off).
EVENT_HISTORY = 256
#: The UI's subscription to the event sink; beyond this it drops (counted by the sink).
UI_EVENT_CAPACITY = 1024
#: Lines waiting for the plain printer's writer thread; beyond this they are dropped and counted.
PRINTER_CAPACITY = 1024
#: Each teardown step (last frame, restoring the terminal, flushing lines) waits at most this long.
STOP_TIMEOUT_S = 1.0
#: How long a key's feedback message stays in the footer.
MESSAGE_S = 3.0


class Screen(Protocol):
    """Where frames go.  ``show`` may take as long as the terminal needs; the UI waits for it."""

    async def start(self) -> None: ...

    async def show(self, renderable: RenderableType) -> None: ...

    async def stop(self) -> None: ...


class LiveScreen:
    """``rich.live.Live`` without its refresh thread; every write happens in a worker thread."""

    def __init__(self, console: Console, *, alt_screen: bool = True) -> None:
        self.console = console
        self._live = Live(
            console=console,
            screen=alt_screen,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
            vertical_overflow="crop",
        )

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._live.start, abandon_on_cancel=True)

    async def show(self, renderable: RenderableType) -> None:
        await trio.to_thread.run_sync(self._update, renderable, abandon_on_cancel=True)

    def _update(self, renderable: RenderableType) -> None:
        self._live.update(renderable, refresh=True)

    async def stop(self) -> None:
        await trio.to_thread.run_sync(self._live.stop, abandon_on_cancel=True)


class RecordingScreen:
    """A screen that keeps the last frame (tests, and docs/tui.md's picture)."""

    def __init__(self) -> None:
        self.frames = 0
        self.last: RenderableType | None = None
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def show(self, renderable: RenderableType) -> None:
        await trio.lowlevel.checkpoint()
        self.frames += 1
        self.last = renderable

    async def stop(self) -> None:
        self.stopped = True


def _drain(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    items: list[Any] = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items


def terminal_key_fd() -> int | None:
    """stdin's descriptor if it is a terminal we can read keys from."""
    stdin = sys.stdin
    try:
        if stdin is not None and stdin.isatty():
            return stdin.fileno()
    except (ValueError, OSError):  # closed, or replaced by a capture object
        pass
    return None


def use_tui(no_tui: bool = False, stream: TextIO | None = None) -> bool:
    """The live UI only on a terminal and unless ``--no-tui``; otherwise plain lines."""
    if no_tui:
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (ValueError, OSError):
        return False


# =============================================================================
# Plain lines
# =============================================================================


class PlainPrinter:
    """One line per event (``format_event_line``) and per note, written in a worker thread.

    Times are seconds since ``origin``.  A stalled stream blocks only the
    writer thread: lines then queue up to :data:`PRINTER_CAPACITY` and the
    rest are dropped and counted (``dropped``), never the session's work.
    """

    def __init__(self, stream: TextIO, *, origin: float = 0.0, capacity: int = PRINTER_CAPACITY) -> None:
        self._stream = stream
        self._origin = origin
        self._send, self._receive = trio.open_memory_channel[str](capacity)
        self._write_scope: trio.CancelScope | None = None
        self._closing = False
        self.dropped = 0

    def line(self, event: EmitEvent) -> str:
        return format_event_line(attrs.evolve(event, t=event.t - self._origin))

    def event(self, event: EmitEvent) -> None:
        """One event's line, queued in order with the notes (what an attached printer prints)."""
        self._offer(self.line(event))

    def note(self, t: float, kind: str, text: str) -> None:
        """A line that is not an event (the demo's scenario steps), in the same columns."""
        self._offer(f"{t - self._origin:10.3f} {'demo':7} {kind:17} {text}")

    def _offer(self, line: str) -> None:
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1

    def _write(self, lines: list[str]) -> None:
        try:
            self._stream.write("".join(line + "\n" for line in lines))
            self._stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # a closed terminal must not stop the VPN

    async def run(self, events: trio.MemoryReceiveChannel[EmitEvent]) -> None:
        """Print until cancelled; then print what is still queued (bounded, shielded)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    async for event in events:
                        self._offer(self.line(event))
                finally:
                    self._bound_write_in_progress()
        finally:
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                for event in _drain(events):
                    self._offer(self.line(event))
                events.close()
                pending = _drain(self._receive)
                if pending:
                    await trio.to_thread.run_sync(self._write, pending, abandon_on_cancel=True)

    def _bound_write_in_progress(self) -> None:
        """Teardown: the write in progress may finish, within :data:`STOP_TIMEOUT_S`."""
        self._closing = True
        if self._write_scope is not None:
            self._write_scope.deadline = trio.current_time() + STOP_TIMEOUT_S

    async def _writer(self) -> None:
        # A batch being written is shielded, so a cancellation cannot abandon it half-way (its
        # lines would then land after the ones written at teardown); the shield gets a deadline
        # once teardown starts, so a stuck terminal cannot hold it up for longer than that.
        while True:
            first = await self._receive.receive()
            batch = [first, *_drain(self._receive)]
            scope = trio.CancelScope(shield=True)
            if self._closing:
                scope.deadline = trio.current_time() + STOP_TIMEOUT_S
            self._write_scope = scope
            try:
                with scope:
                    await trio.to_thread.run_sync(self._write, batch, abandon_on_cancel=True)
            finally:
                self._write_scope = None
            if scope.cancelled_caught:
                self.dropped += len(batch)  # in doubt: the thread may still write them
