"""Plain event lines: one per event, for ``--no-tui``, pipes and logs read by people.

:class:`PlainPrinter` writes them in a worker thread from a bounded queue, so a
terminal that stops reading drops lines (counted) and never delays a
decision.  ``serve``, ``up`` without a terminal, the attached UI's plain mode
and the demo all print through it; :func:`use_tui` chooses between these lines
and the live UI.  Nothing here imports rich (tests/test_import_weight.py).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import attrs
import trio

from jvpn_trio.core.actions import EmitEvent

#: Lines waiting for the plain printer's writer thread; beyond this they are dropped and counted.
PRINTER_CAPACITY = 1024
#: Each teardown step (last frame, restoring the terminal, flushing lines) waits at most this long.
STOP_TIMEOUT_S = 1.0
_SHOWN_DETAILS = ("from_state", "to_state", "from_path", "to_path", "path", "verdict", "binding", "endpoint", "by", "applied")


def format_event_line(event: EmitEvent) -> str:
    """One plain line per event, for --no-tui or when stdout is not a terminal."""
    extra = " ".join(f"{k}={v}" for k, v in event.details if v is not None and k in _SHOWN_DETAILS)
    return (
        f"{event.t:10.3f} {event.role.value:7} {event.kind.value:17} v{event.version:<4} "
        f"{event.reason.value:26} {extra}".rstrip()
    )


def use_tui(no_tui: bool = False, stream: TextIO | None = None) -> bool:
    """The live UI only on a terminal and unless ``--no-tui``; otherwise plain lines.

    Here, not beside the live UI, so that deciding on plain lines never imports rich.
    """
    if no_tui:
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (ValueError, OSError):
        return False


def _drain(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    items: list[Any] = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items


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
