"""The live UI of a running agent, attached over its control socket (``jvpn-trio``, the demo).

Theory of operation
-------------------
The UI is a client of the attach protocol (docs/control.md) and nothing
else: it takes part in no decision and the agent never waits for it.

- :class:`AttachedModel` is the UI's state, fed from two sources and free of
  I/O: the last ``status`` reply (polled every :data:`STATUS_PERIOD_S`, the
  time it arrived kept so countdowns advance between replies) and the event
  stream (the replayed history, then live events; a ``Gap`` becomes a line
  "N events missed").  It turns keys into :class:`Request` values and builds
  each frame's :class:`~jvpn_trio.ui.views.ViewModel` with the pure
  :func:`~jvpn_trio.ui.views.attached_view_model`.  The RTT sparkline is the
  history of the SRTTs the UI has polled (the status reply carries the
  current SRTT only).
- :class:`AttachedUi` runs, in one nursery: the frame loop (at most 10 frames
  a second, the same :class:`~jvpn_trio.ui.app.Screen` as the in-process UI),
  the status poller, the stream reader and the key reader.  A steering key
  starts its request in a task of its own, so a slow reply never stalls the
  frame loop; the reply or a refusal (``permission_denied`` for a read-only
  member of the group, ``refused``, ``unknown_path``) is one line in the
  footer, never an exception.
- ``q`` ends the UI only (``on_quit`` lets the demo end the demo); the agent
  goes on.  When the agent goes away (the stream ends, a status request
  fails) :meth:`AttachedUi.run` raises :class:`AgentGone`, one line; the
  command exits 2.  It does not wait and reconnect: a restarted agent is a
  new run (its events are numbered afresh), and the operator who started
  the UI is the one to tell.

The agent isolates every UI (docs/control.md): each has its own bounded
queue on the agent's side, dropped for it alone if it reads too slowly, and
a UI that stops reading is disconnected.  Here, the client reads the socket
in its own task into a bounded buffer, drained by the stream reader.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import AsyncIterable, Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, TextIO

import attrs
import trio
import trio_util
from rich.console import Console

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.drivers.attach import AttachedEvent, Gap, Hello, StreamItem, open_control_client
from jvpn_trio.drivers.control import ControlError, ErrorCode, JsonObject
from jvpn_trio.errors import lone_exception_unwrapped
from jvpn_trio.ui.app import (
    EVENT_HISTORY,
    MAX_FPS,
    MESSAGE_S,
    LiveScreen,
    Screen,
    terminal_key_fd,
)
from jvpn_trio.ui.lines import STOP_TIMEOUT_S, PlainPrinter
from jvpn_trio.ui.keys import Command, Key, serve_keys, terminal_keys
from jvpn_trio.ui.views import (
    PickerRow,
    PickerView,
    StreamEntry,
    ViewModel,
    attached_view_model,
    render,
    SPARK_WIDTH,
)

#: How often the UI asks for the status (the header, paths and counters move at this rate).
STATUS_PERIOD_S = 0.25
#: ``d`` asks to be pressed again within this long: a disconnect stops the traffic.
CONFIRM_S = 3.0


class AgentGone(ControlError):
    """The agent closed the connection or stopped answering: the UI ends (one line, exit 2)."""


class AttachClient(Protocol):
    """What the UI needs of :class:`~jvpn_trio.drivers.attach.ControlClient` (tests give a fake)."""

    hello: Hello | None

    async def status(self) -> JsonObject: ...

    async def request(self, cmd: str, **fields: Any) -> JsonObject: ...

    async def subscribe(self) -> AsyncIterable[StreamItem]: ...


@attrs.frozen(kw_only=True)
class Request:
    """A steering command a key asks for: ``cmd`` (``pin``, ``unpin``, ...) and its fields."""

    cmd: str
    path: str | None = None

    def fields(self) -> dict[str, Any]:
        return {} if self.path is None else {"path": self.path}


QUIT = "quit"


def describe_result(request: Request, result: JsonObject) -> str:
    """The footer's line after the agent took a request."""
    if request.cmd == "pin":
        return f"pin {result.get('path', request.path)} ({result.get('interface', '?')}) requested: OPERATOR_PIN"
    if request.cmd == "unpin":
        return "unpin requested"
    if request.cmd == "reevaluate":
        return "re-evaluation requested"
    if request.cmd == "disconnect":
        return "disconnected: session closed (LOCAL_CLOSE), none starts until c" if result.get("session_closed") else "disconnected: no session will start until c"
    if request.cmd == "reconnect":
        return "reconnecting: a new session starts" if not result.get("session_closed") else "reconnecting: the session closes, a new one starts"
    return f"{request.cmd}: ok"


def describe_refusal(request: Request, error: ControlError) -> str:
    """One line for a refusal; the agent's reason, without the socket's path."""
    text = str(error)
    _path, sep, rest = text.partition(": ")
    reason = rest if sep and rest else text
    if error.code is ErrorCode.PERMISSION_DENIED:
        return f"{request.cmd} refused: this UI may look, not steer ({reason})"
    return f"{request.cmd} refused: {reason}"


class AttachedModel:
    """The UI's state: the last status, the event history, the UI's toggles.  No I/O; ``now`` is passed in."""

    def __init__(
        self,
        *,
        title: str = "jvpn-trio",
        gateway: str | None = None,
        origin: float | None = None,
        footer: Callable[[float], Sequence[str]] | None = None,
        history: int = EVENT_HISTORY,
    ) -> None:
        self.title = title
        self.gateway = gateway
        self.origin = origin
        self._footer = footer
        self.status: JsonObject | None = None
        self.received_at = 0.0
        self.entries: deque[StreamEntry] = deque(maxlen=history)
        self.last_seq = 0
        self.missed = 0
        self.rtt: dict[str, deque[float]] = {}
        self._status_now: float | None = None
        # toggles
        self.detail = False
        self.help = False
        self.picker: PickerView | None = None
        self.selected_event: int | None = None
        self.show_event = False
        self.message = ""
        self.message_until = -math.inf
        self.confirm_until = -math.inf

    # -- inputs from the agent ---------------------------------------------------------
    def on_status(self, reply: JsonObject, now: float) -> None:
        """A status reply arrived at ``now`` (the UI's clock)."""
        self.status = reply
        self.received_at = now
        agent_now = reply.get("now_s")
        fresh = isinstance(agent_now, (int, float)) and agent_now != self._status_now
        if fresh:
            self._status_now = float(agent_now)  # type: ignore[arg-type]
        for row in reply.get("paths") or ():
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                continue
            srtt = row.get("srtt_ms")
            if fresh and isinstance(srtt, (int, float)) and not isinstance(srtt, bool):
                self.rtt.setdefault(row["path"], deque(maxlen=SPARK_WIDTH)).append(float(srtt))
        if self.picker is not None:
            self.picker = attrs.evolve(self._picker_rows(), selected=self.picker.selected)

    def on_item(self, item: StreamItem) -> None:
        """One item of the event stream: an event (replayed or live) or a gap notice."""
        if isinstance(item, Gap):
            self.missed += item.missed
            self.entries.append(StreamEntry(seq=None, event=None, missed=item.missed))
            return
        self.last_seq = max(self.last_seq, item.seq)
        if self.origin is None:
            t = item.event.t if item.event is not None else item.data.get("t")
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                self.origin = float(t)
        self.entries.append(StreamEntry(seq=item.seq, event=item.event, data=dict(item.data)))

    # -- what a frame shows ------------------------------------------------------------
    def view(self, now: float) -> ViewModel:
        origin = self.origin if self.origin is not None else 0.0
        rtt = {path: tuple(values) for path, values in self.rtt.items()}
        vm = attached_view_model(
            self.status,
            tuple(self.entries),
            now=now,
            received_at=self.received_at,
            origin=origin,
            gateway=self.gateway,
            title=self.title,
            rtt_history=rtt,
            detail=self.detail,
            help=self.help,
            footer=tuple(self._footer(now - origin)) if self._footer is not None else (),
            message=self.message if now < self.message_until else "",
            picker=self.picker,
            selected_event=self.selected_event,
        )
        if self.show_event and vm.selected_event is not None:
            vm = attrs.evolve(vm, event_detail=vm.events[vm.selected_event])
        return vm

    def flash(self, message: str, now: float) -> None:
        self.message = message
        self.message_until = now + MESSAGE_S

    def _picker_rows(self) -> PickerView:
        rows: list[PickerRow] = []
        paths = self.status.get("paths") if self.status is not None else None
        for row in paths if isinstance(paths, list) else ():
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                continue
            rows.append(
                PickerRow(
                    number=len(rows) + 1,
                    path=row["path"],
                    interface=str(row.get("interface") or row["path"]),
                    kind=str(row.get("kind") or ""),
                    verdict=str(row.get("verdict") or "UNKNOWN") if row.get("link_up") is not False else "DOWN",
                    active=row.get("active") is True,
                    pinned=row.get("pinned") is True,
                )
            )
        return PickerView(rows=tuple(rows), selected=0)

    # -- keys ----------------------------------------------------------------------------
    def handle(self, key: Key, now: float) -> Request | str | None:
        """Act on one key: toggles change the model; the rest return the :class:`Request` to send, or ``QUIT``."""
        if key is Command.QUIT:
            return QUIT
        if key is Command.TOGGLE_HELP:
            self.help = not self.help
            return None
        if key is Command.CLOSE_HELP:
            self.help = False
            self.picker = None
            self.show_event = False
            return None
        if self.picker is not None:
            return self._handle_picker(key, now)
        if key is Command.PIN:
            picker = self._picker_rows()
            if not picker.rows:
                self.flash("no paths to pin yet", now)
                return None
            current = next((i for i, r in enumerate(picker.rows) if r.pinned), None)
            if current is None:
                current = next((i for i, r in enumerate(picker.rows) if r.active), 0)
            self.picker = attrs.evolve(picker, selected=current)
            self.show_event = False
            return None
        if key is Command.UNPIN:
            return Request(cmd="unpin")
        if key is Command.REEVALUATE:
            return Request(cmd="reevaluate")
        if key is Command.RECONNECT:
            return Request(cmd="reconnect")
        if key is Command.DISCONNECT:
            if now < self.confirm_until:
                self.confirm_until = -math.inf
                return Request(cmd="disconnect")
            self.confirm_until = now + CONFIRM_S
            self.flash("disconnect closes the session and starts none (traffic stops): press d again", now)
            self.message_until = self.confirm_until
            return None
        if key is Command.TOGGLE_DETAIL:
            self.detail = not self.detail
            return None
        if key in (Command.UP, Command.DOWN):
            if self.selected_event is None:
                self.selected_event = 0
            else:
                step = -1 if key is Command.UP else 1
                self.selected_event = max(0, self.selected_event + step)
            return None
        if key in (Command.ENTER, Command.DETAILS):
            if self.selected_event is None:
                self.selected_event = 0
            self.show_event = not self.show_event if key is Command.DETAILS else True
            return None
        return None

    def _handle_picker(self, key: Key, now: float) -> Request | str | None:
        picker = self.picker
        assert picker is not None
        count = len(picker.rows)
        if isinstance(key, int):
            if 1 <= key <= count:
                self.picker = attrs.evolve(picker, selected=key - 1)
            return None
        if key is Command.UP and count:
            self.picker = attrs.evolve(picker, selected=(picker.selected - 1) % count)
        elif key is Command.DOWN and count:
            self.picker = attrs.evolve(picker, selected=(picker.selected + 1) % count)
        elif key is Command.ENTER:
            self.picker = None
            if count:
                return Request(cmd="pin", path=picker.rows[min(picker.selected, count - 1)].path)
        elif key is Command.UNPIN:
            self.picker = None
            return Request(cmd="unpin")
        elif key is Command.PIN:
            self.picker = None
        return None


class AttachedUi:
    """The live UI of an agent, over an attach client; see the module docstring."""

    def __init__(
        self,
        client: AttachClient,
        *,
        screen: Screen,
        model: AttachedModel,
        on_quit: Callable[[], object] | None = None,
        max_fps: float = MAX_FPS,
        status_period_s: float = STATUS_PERIOD_S,
    ) -> None:
        if not 0 < max_fps <= MAX_FPS:
            raise ValueError(f"max_fps must be in (0, {MAX_FPS}], got {max_fps}")
        self.client = client
        self.model = model
        self._screen = screen
        self._on_quit = on_quit
        self._period = 1.0 / max_fps
        self._status_period = status_period_s
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self.frames = 0
        #: The last ``seq`` seen (the demo waits for the last event before it ends the UI).
        self.seen = trio_util.AsyncValue(0)
        self.sent: list[Request] = []

    def handle(self, key: Key) -> None:
        now = trio.current_time()
        action = self.model.handle(key, now)
        if action == QUIT:
            if self._on_quit is not None:
                self.model.flash("closing the session (LOCAL_CLOSE)…", now)
                self._on_quit()
            else:
                self._done.set()
        elif isinstance(action, Request) and self._nursery is not None:
            self._nursery.start_soon(self.steer, action)

    async def steer(self, request: Request) -> None:
        """Send one steering request; its answer or refusal becomes the footer's line."""
        self.sent.append(request)
        try:
            result = await self.client.request(request.cmd, **request.fields())
        except ControlError as exc:
            self.model.flash(describe_refusal(request, exc), trio.current_time())
        else:
            self.model.flash(describe_result(request, result), trio.current_time())

    async def run(
        self, *, key_fd: int | None = None, task_status: trio.TaskStatus[AttachedUi] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Draw until ``q`` (without ``on_quit``) or cancelled; raises AgentGone if the agent goes away."""
        try:
            async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
                self._nursery = nursery
                subscription = await self.client.subscribe()
                await self._poll_once()
                nursery.start_soon(self._read_stream, subscription)
                nursery.start_soon(self._poll)
                if key_fd is not None:
                    nursery.start_soon(serve_keys, key_fd, self.handle)
                task_status.started(self)
                await self._screen.start()
                async with trio_util.move_on_when(self._done.wait):
                    async for _ in trio_util.periodic(self._period):
                        await self._draw()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                await self._draw()
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                await self._screen.stop()

    async def _poll_once(self) -> None:
        try:
            reply = await self.client.status()
        except ControlError as exc:
            raise AgentGone(f"the agent went away: {exc}", code=ErrorCode.UNAVAILABLE) from None
        self.model.on_status(reply, trio.current_time())

    async def _poll(self) -> None:
        async for _ in trio_util.periodic(self._status_period):
            await self._poll_once()

    async def _read_stream(self, subscription: AsyncIterable[StreamItem]) -> None:
        async for item in subscription:
            self.model.on_item(item)
            if isinstance(item, AttachedEvent):
                self.seen.value = item.seq
        raise AgentGone("the agent went away (its event stream ended)", code=ErrorCode.UNAVAILABLE)

    async def _draw(self) -> None:
        frame = render(self.model.view(trio.current_time()))
        await self._screen.show(frame)
        self.frames += 1


class AttachedPrinter:
    """Plain lines from the event stream (no terminal, ``--no-tui``): one per event, and one per gap."""

    def __init__(self, printer: PlainPrinter) -> None:
        self.printer = printer
        self.seen = trio_util.AsyncValue(0)

    async def run(self, subscription: AsyncIterable[StreamItem]) -> None:
        # The printer's own channel stays empty: its writer runs, and lines come by event()/note().
        _unused, no_events = trio.open_memory_channel[EmitEvent](0)
        last_t = 0.0
        async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(self.printer.run, no_events)
            async for item in subscription:
                if isinstance(item, Gap):
                    self.printer.note(last_t, "GAP", f"{item.missed} events missed")
                    continue
                if item.event is not None:
                    last_t = item.event.t
                    self.printer.event(item.event)  # the same queue as the notes: lines keep the stream's order
                else:
                    self.printer.note(last_t, str(item.data.get("kind", "?")), f"seq {item.seq} (unknown to this UI)")
                self.seen.value = item.seq
            raise AgentGone("the agent went away (its event stream ended)", code=ErrorCode.UNAVAILABLE)


async def run_attached(
    path: Path,
    *,
    tui: bool,
    title: str = "jvpn-trio",
    gateway: str | None = None,
    origin: float | None = None,
    on_quit: Callable[[], object] | None = None,
    footer: Callable[[float], Sequence[str]] | None = None,
    printer: PlainPrinter | None = None,
    stdout: TextIO | None = None,
    screen: Screen | None = None,
    keys: bool = True,
    task_status: trio.TaskStatus[AttachedUi | AttachedPrinter] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attach to the agent at ``path`` and show it (the live UI with ``tui``, else plain lines).

    Returns when the UI quits (``q`` without ``on_quit``); raises ControlError
    (one line) if there is no agent, AgentGone if it goes away.  Reports
    started once attached and subscribed.
    """
    stream = sys.stdout if stdout is None else stdout
    async with open_control_client(path) as client:
        if tui:
            ui = AttachedUi(
                client,
                screen=screen or LiveScreen(Console(file=stream)),
                model=AttachedModel(title=title, gateway=gateway, origin=origin, footer=footer),
                on_quit=on_quit,
            )
            fd = terminal_key_fd() if keys else None
            with terminal_keys(fd) if fd is not None else nullcontext():
                await ui.run(key_fd=fd, task_status=task_status)
            return
        plain = AttachedPrinter(printer or PlainPrinter(stream, origin=origin if origin is not None else 0.0))
        subscription = await client.subscribe()
        task_status.started(plain)
        await plain.run(subscription)


__all__ = [
    "CONFIRM_S",
    "STATUS_PERIOD_S",
    "AgentGone",
    "AttachClient",
    "AttachedModel",
    "AttachedPrinter",
    "AttachedUi",
    "Request",
    "describe_refusal",
    "describe_result",
    "run_attached",
]
