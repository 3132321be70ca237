"""The live UI loop: a bounded frame rate from the published snapshot, keys, and plain-line mode.

Theory of operation
-------------------
The UI never takes part in a decision.  The supervisor publishes a frozen
``RuntimeStatus`` after every core call (``runtime.status``, a trio-util
``AsyncValue``); the UI only *reads* ``status.value`` when it draws, and only
*submits* inputs through ``submit_nowait`` (which never waits: a full inbox
drops and counts).  Events reach it through its own bounded subscription to
the event sink, which drops (and counts) for the UI alone if it falls behind.

:class:`LiveUi` runs in one Trio task and, in one nursery:

- the **frame loop** (the task itself): at most ``max_fps`` (<= 10) frames a
  second via ``trio_util.periodic``; each frame builds an immutable view
  model (``views.build_view_model`` at ``now = trio.current_time()``) and a
  fresh renderable, then hands it to the :class:`Screen`.  The frame loop
  waits for the screen before the next frame, so a slow terminal just makes
  frames come later (they are dropped, not queued);
- the **event collector**: moves events from the subscription into a
  bounded deque (the newest :data:`EVENT_HISTORY`);
- the **key reader** (``keys.serve_keys``) when a terminal is attached.

:class:`LiveScreen` wraps ``rich.live.Live(auto_refresh=False)`` (no refresh
thread) and does every terminal write in a worker thread
(``trio.to_thread.run_sync``), so a terminal that stops reading blocks that
thread and the frame loop, never the Trio thread that runs the supervisor,
the receivers and the probers.  On every exit path (quit, cancellation, an
error) the UI drains pending events, draws a last frame and restores the
terminal, each step bounded by :data:`STOP_TIMEOUT_S` and shielded so a
cancelled owner still gets a clean screen.

Without a terminal (or with ``--no-tui``) :class:`PlainPrinter` prints one
line per event (:func:`jvpn_trio.ui.lines.format_event_line`) from the same
kind of subscription, writing in a worker thread.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol, TextIO

import attrs
import trio
import trio_util
from rich.console import Console, RenderableType
from rich.live import Live

from jvpn_trio.ui.lines import format_event_line
from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.core.ids import PathId
from jvpn_trio.drivers.client import RuntimeStatus
from jvpn_trio.drivers.event_sink import EventSink
from jvpn_trio.ui.keys import Command, Key, serve_keys, terminal_keys
from jvpn_trio.ui.views import ViewModel, build_view_model, render

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


class UiRuntime(Protocol):
    """What the UI needs from a runtime (``ClientRuntime`` and ``ClientAgent`` have it).

    The agent's ``status`` is one stream for its whole life: each session's
    runtime publishes into it, and between sessions it carries no snapshot.
    """

    status: trio_util.AsyncValue[RuntimeStatus | None]

    def submit_nowait(self, event: Any) -> bool: ...


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


@attrs.frozen
class UiState:
    """The UI's own toggles; replaced whole on a key press."""

    detail: bool = False
    help: bool = False
    message: str = ""
    message_until: float = float("-inf")


def next_pin(current: PathId | None, paths: Sequence[PathId]) -> PathId | None:
    """``p`` cycles: unpinned -> first path -> ... -> last path -> unpinned.  Pure."""
    ordered = sorted(paths)
    if not ordered:
        return None
    if current is None or current not in ordered:
        return ordered[0]
    index = ordered.index(current)
    return ordered[index + 1] if index + 1 < len(ordered) else None


def _drain(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    items: list[Any] = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items


class LiveUi:
    """The live dashboard of one client runtime; see the module docstring."""

    def __init__(
        self,
        runtime: UiRuntime,
        *,
        screen: Screen,
        gateway: str,
        events: trio.MemoryReceiveChannel[EmitEvent] | None = None,
        title: str = "jvpn-trio",
        origin: float | None = None,
        on_quit: Callable[[], object] | None = None,
        footer: Callable[[float], Sequence[str]] | None = None,
        max_fps: float = MAX_FPS,
    ) -> None:
        if not 0 < max_fps <= MAX_FPS:
            raise ValueError(f"max_fps must be in (0, {MAX_FPS}], got {max_fps}")
        self._runtime = runtime
        self._screen = screen
        self._gateway = gateway
        self._events_in = events
        self._title = title
        self._origin = origin
        self._on_quit = on_quit
        self._footer = footer
        self._period = 1.0 / max_fps
        self._events: deque[EmitEvent] = deque(maxlen=EVENT_HISTORY)
        self.state = UiState()
        self.frames = 0

    # -- the pure part: what a frame shows ------------------------------------------
    def view(self, now: float) -> ViewModel:
        state = self.state
        origin = self._origin if self._origin is not None else now
        return build_view_model(
            self._runtime.status.value,
            tuple(self._events),
            now=now,
            origin=origin,
            gateway=self._gateway,
            title=self._title,
            detail=state.detail,
            help=state.help,
            footer=tuple(self._footer(now - origin)) if self._footer is not None else (),
            message=state.message if now < state.message_until else "",
        )

    # -- keys ------------------------------------------------------------------------
    def handle(self, command: Key) -> None:
        """Act on one key command: toggles change the UI only; the rest are inputs to the core.

        This in-process UI knows the keys of the first UI (``p`` cycles the pin); the attached UI
        (``ui/attached.py``) has the picker, unpin, disconnect and reconnect.
        """
        state = self.state
        if command is Command.TOGGLE_DETAIL:
            self.state = attrs.evolve(state, detail=not state.detail)
        elif command is Command.TOGGLE_HELP:
            self.state = attrs.evolve(state, help=not state.help)
        elif command is Command.CLOSE_HELP:
            self.state = attrs.evolve(state, help=False)
        elif command is Command.QUIT:
            self._flash("closing the session (LOCAL_CLOSE)…")
            if self._on_quit is not None:
                self._on_quit()
            else:
                self._runtime.submit_nowait(ev.CloseRequested())
        elif command is Command.REEVALUATE:
            self._runtime.submit_nowait(ev.ReevaluateRequested())
            self._flash("re-evaluation requested")
        elif command is Command.UNPIN:
            self._runtime.submit_nowait(ev.PinRequested(path=None))
            self._flash("unpin requested")
        elif command is Command.PIN:
            status = self._runtime.status.value
            if status is None or status.snapshot is None:
                self._flash("no session yet: nothing to pin")
                return
            target = next_pin(status.snapshot.pinned, [p.path for p in status.snapshot.paths])
            self._runtime.submit_nowait(ev.PinRequested(path=target))
            names = {str(path): name for path, name, _kind in status.paths}
            self._flash(f"pin {target} ({names.get(str(target), '?')}) requested" if target else "unpin requested")

    def _flash(self, message: str) -> None:
        self.state = attrs.evolve(self.state, message=message, message_until=trio.current_time() + MESSAGE_S)

    # -- the loop ----------------------------------------------------------------------
    async def run(
        self, *, key_fd: int | None = None, task_status: trio.TaskStatus[LiveUi] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Draw until cancelled.  Never returns on its own (``q`` asks ``on_quit`` to end things)."""
        if self._origin is None:
            self._origin = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                if self._events_in is not None:
                    nursery.start_soon(self._collect, self._events_in)
                if key_fd is not None:
                    nursery.start_soon(serve_keys, key_fd, self.handle)
                # Started before the first terminal write: a terminal that blocks from the
                # start must not hold up whoever is starting the UI (and then the runtimes).
                task_status.started(self)
                await self._screen.start()
                async for _ in trio_util.periodic(self._period):
                    await self._draw()
        finally:
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                if self._events_in is not None:
                    self._events.extend(_drain(self._events_in))
                    self._events_in.close()
                await self._draw()
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                await self._screen.stop()

    async def _collect(self, events: trio.MemoryReceiveChannel[EmitEvent]) -> None:
        async for event in events:
            self._events.append(event)

    async def _draw(self) -> None:
        frame = render(self.view(trio.current_time()))
        await self._screen.show(frame)
        self.frames += 1


def _key_fd() -> int | None:
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


async def run_ui(
    runtime: UiRuntime,
    *,
    gateway: str,
    events: trio.MemoryReceiveChannel[EmitEvent] | None = None,
    title: str = "jvpn-trio",
    origin: float | None = None,
    on_quit: Callable[[], object] | None = None,
    footer: Callable[[float], Sequence[str]] | None = None,
    console: Console | None = None,
    screen: Screen | None = None,
    keys: bool = True,
    max_fps: float = MAX_FPS,
    task_status: trio.TaskStatus[LiveUi] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The full-screen live UI on ``console`` (default: stdout) until cancelled.

    ``screen`` replaces the terminal altogether (tests, pictures for the docs).
    Keys are read from stdin in cbreak mode when it is a terminal (and
    ``keys``); the terminal mode is restored on every exit path.
    """
    ui = LiveUi(
        runtime,
        screen=screen or LiveScreen(console or Console()),
        gateway=gateway,
        events=events,
        title=title,
        origin=origin,
        on_quit=on_quit,
        footer=footer,
        max_fps=max_fps,
    )
    fd = _key_fd() if keys else None
    with terminal_keys(fd) if fd is not None else nullcontext():
        await ui.run(key_fd=fd, task_status=task_status)


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


async def run_console(
    runtime: UiRuntime,
    sink: EventSink,
    *,
    gateway: str,
    tui: bool,
    title: str = "jvpn-trio",
    origin: float | None = None,
    on_quit: Callable[[], object] | None = None,
    footer: Callable[[float], Sequence[str]] | None = None,
    printer: PlainPrinter | None = None,
    stdout: TextIO | None = None,
    screen: Screen | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What ``up`` and ``demo`` show: the live UI (``tui``) or plain event lines, until cancelled.

    Subscribes to ``sink`` before reporting started, so no event emitted
    after ``await nursery.start(run_console, ...)`` returns is missed.
    """
    stream = sys.stdout if stdout is None else stdout
    events = sink.subscribe(UI_EVENT_CAPACITY, name="ui" if tui else "printer")
    if tui:
        await run_ui(
            runtime,
            gateway=gateway,
            events=events,
            title=title,
            origin=origin,
            on_quit=on_quit,
            footer=footer,
            console=Console(file=stream),
            screen=screen,
            task_status=task_status,
        )
    else:
        plain = printer or PlainPrinter(stream, origin=origin if origin is not None else trio.current_time())
        task_status.started()
        await plain.run(events)
