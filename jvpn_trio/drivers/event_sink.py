"""The event sink: EmitEvent actions -> a JSON-lines file and in-process subscribers.

Theory of operation
-------------------
Spec section 12: "Observability MUST NOT block correctness" and "Logging
failure MUST NOT alter state".  So the only thing the session's owner ever
calls is :meth:`EventSink.emit`, which is synchronous and cannot block: it
puts the event into bounded memory channels with ``send_nowait`` and, when
one is full, counts a drop and returns.  It never raises.

Behind the file channel a single writer task (started by
:func:`open_event_sink` in its own nursery) takes whatever is queued as one
batch, renders each event with ``EmitEvent.to_json_line()`` plus ``"\\n"``,
and appends the batch to the file in a worker thread
(``trio.to_thread.run_sync``), so a slow disk stalls only the writer.
Lines are written in ``emit`` order, byte-identical to ``to_json_line``.

* Each batch opens the file (``O_APPEND | O_CREAT``, mode
  :data:`LOG_FILE_MODE` when created), hands all of it to the kernel with
  ``os.write`` and closes it: there is no user-space buffer left to flush, a
  rotated or deleted file is simply recreated, and a failure affects one
  batch.  There is no fsync: the log is for operators, not a journal.
* A failing file (``OSError``: disk full, permission, missing directory) is
  counted in ``write_failures`` with its text in ``last_error``; that
  batch's unwritten lines are counted in ``dropped_failed`` and discarded.
  Nothing is raised, ``emit`` keeps working, and the next batch tries again.
  If a failure cut a line short, the next successful batch starts with a
  newline so that only the cut line is damaged.
* Subscribers (the UI, tests) get their own bounded channel from
  :meth:`EventSink.subscribe`, with their own drop counter, so a slow
  subscriber loses only its own events and never delays the file.
* Every event gets a sequence number (``seq``: 1 for the first event
  emitted, then one more per event, dropped or not), and the last
  ``history`` events are kept in a ring (:data:`HISTORY_EVENTS` by
  default).  :meth:`EventSink.attach` returns, in one synchronous step, the
  recent events from the ring *and* a bounded live feed of
  :class:`SequencedEvent` that starts with the very next event, so a
  consumer that replays then follows sees no gap and no duplicate; a gap
  in its ``seq`` numbers is exactly what its full channel dropped.  This is
  what the control socket's ``events`` command serves (docs/control.md).
* Attacks are logged within a bound (issue 15, docs/events.md "Bounded logging
  of attacks"): a :class:`~jvpn_trio.core.loglimit.SecurityLogLimiter`
  (``limits``, on by default) decides, at ``emit``, which SECURITY_EVENTs
  are written in full and which are only counted, to be reported by a
  summary line.  ``also`` (the metrics' counters) sees every event before
  the limiter; the file, the history and subscribers see what it lets
  through, and a summary task writes summaries when they fall due, so a
  flood that stops is still summed up.  ``seq`` numbers the lines that go
  out (summaries included), so a gap is still only a full channel's drop.
* On exit, whatever is still queued is written within one bounded, shielded
  drain (:data:`DRAIN_TIMEOUT_S` by default), even when the exit is a
  cancellation: a batch being written is shielded until that deadline, so a
  cancelled owner does not abandon it mid-write.  What is left after the
  deadline (including a batch whose thread was abandoned: it may still land)
  is counted in ``dropped_closed``, as are events emitted after the close.

Accounting, at any instant::

    emitted + summaries == written + queued + dropped_full + dropped_failed
                           + dropped_unencodable + dropped_closed + suppressed

(with a file; ``queued`` counts events in the channel or in the batch being
written; ``suppressed`` the events the limiter held back, ``summaries`` the
lines it made of them).  With ``path=None`` only ``emitted``, the limiter's
counters and the subscriber counters move.

Tests: the writer waits on worker threads, which ``autojump_clock`` does not
see as work, so a test that writes a real file under ``autojump_clock`` may
find the exit drain's deadline jumped to at once.  Use the real clock (and
``fail_after``) for real files, and a fake ``_append`` under virtual time.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from jvpn_trio.errors import lone_exception_unwrapped

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.core.loglimit import DEFAULT_LOG_LIMITS, LimiterStatistics, LogLimits, SecurityLogLimiter

#: Upper bound on the exit drain: shutdown is never held up longer by a slow disk.
DRAIN_TIMEOUT_S = 1.0
#: Mode of a log file the sink creates (event lines carry endpoints and session IDs).
LOG_FILE_MODE = 0o600
#: ``last_error`` is a one-line summary; longer OS messages are cut to this length.
MAX_ERROR_TEXT = 200
#: Recent events kept for :meth:`EventSink.attach` (the history a UI sees when it attaches).
HISTORY_EVENTS = 1000

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


@attrs.frozen(kw_only=True)
class SequencedEvent:
    """An event with its place in the sink's order: ``seq`` 1 is the first event ever emitted."""

    seq: int
    event: EmitEvent


@attrs.frozen(kw_only=True)
class Attachment:
    """What :meth:`EventSink.attach` returns: the replayed past, then the live feed, with no gap between.

    ``replayed`` ends with event ``next_seq - 1``; ``live`` starts at
    ``next_seq`` (minus what its full channel dropped).  ``missed`` counts
    events asked for (``since``) that had already left the history.
    Closing ``live`` unsubscribes.
    """

    replayed: tuple[SequencedEvent, ...]
    live: trio.MemoryReceiveChannel[SequencedEvent]
    next_seq: int
    missed: int


@attrs.frozen(kw_only=True)
class SubscriberStatistics:
    """One subscriber's channel: what it was given and what it lost by being slow."""

    name: str
    capacity: int
    delivered: int
    dropped_full: int
    closed: bool


@attrs.frozen(kw_only=True)
class EventSinkStatistics:
    """Counters of an :class:`EventSink`, frozen at the call (see the module docstring)."""

    emitted: int
    written: int
    queued: int
    dropped_full: int
    dropped_failed: int
    dropped_unencodable: int
    dropped_closed: int
    suppressed: int
    summaries: int
    write_failures: int
    failing: bool
    last_error: str | None
    subscribers: tuple[SubscriberStatistics, ...]
    history: int
    limiter: LimiterStatistics | None = None


@attrs.define
class _Subscriber:
    name: str
    capacity: int
    send: trio.MemorySendChannel[EmitEvent] | None = None
    send_seq: trio.MemorySendChannel[SequencedEvent] | None = None
    delivered: int = 0
    dropped_full: int = 0
    closed: bool = False

    def statistics(self) -> SubscriberStatistics:
        return SubscriberStatistics(
            name=self.name,
            capacity=self.capacity,
            delivered=self.delivered,
            dropped_full=self.dropped_full,
            closed=self.closed,
        )

    def close(self) -> None:
        if self.send is not None:
            self.send.close()
        if self.send_seq is not None:
            self.send_seq.close()


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")


def _error_text(exc: OSError) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _append_sync(path: Path, data: bytes, lock: threading.Lock) -> tuple[int, OSError | None]:
    """Append ``data`` to ``path`` (worker thread).  Returns (bytes written, the error if any).

    The lock keeps batches in order even if an earlier call was abandoned by
    a cancellation and is still running in its thread.
    """
    done = 0
    with lock:
        try:
            fd = os.open(path, _OPEN_FLAGS, LOG_FILE_MODE)
        except OSError as exc:
            return 0, exc
        try:
            view = memoryview(data)
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError as exc:
            return done, exc
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the data was handed over; a close error cannot un-write it
    return done, None


class EventSink:
    """Non-blocking fan-out of :class:`EmitEvent`; build it with :func:`open_event_sink`."""

    def __init__(
        self,
        path: Path | None,
        *,
        capacity: int,
        also: Callable[[EmitEvent], None] | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        history: int = HISTORY_EVENTS,
        limits: LogLimits | None = DEFAULT_LOG_LIMITS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``limits=None`` logs every event in full; ``clock`` is the limiter's ``now`` (Trio's clock)."""
        _check_capacity(capacity)
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise ValueError(f"history must be a non-negative int, got {history!r}")
        self._history: deque[SequencedEvent] = deque(maxlen=history)
        #: Names this sink's ``seq`` space: numbers restart at 1 with each sink (each run of the agent).
        self.run_id = os.urandom(8).hex()
        self._path = path
        self._also = also
        self._drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._send: trio.MemorySendChannel[EmitEvent] | None = None
        self._receive: trio.MemoryReceiveChannel[EmitEvent] | None = None
        if path is not None:
            self._send, self._receive = trio.open_memory_channel[EmitEvent](capacity)
        self._subscribers: list[_Subscriber] = []
        self._limiter = SecurityLogLimiter(limits) if limits is not None else None
        self._clock = clock
        # Set when the limiter starts holding events back: the summary task then has a deadline.
        self._summaries_wanted = trio.Event()
        self._seq = 0
        self._closed = False
        self._writer_done = trio.Event()
        self._file_lock = threading.Lock()
        self._needs_newline = False
        self._write_scope: trio.CancelScope | None = None
        self._in_flight = 0
        self._emitted = 0
        self._written = 0
        self._dropped_full = 0
        self._dropped_failed = 0
        self._dropped_unencodable = 0
        self._dropped_closed = 0
        self._write_failures = 0
        self._failing = False
        self._last_error: str | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    # -- the caller's side: never blocks, never raises ----------------------------

    def emit(self, event: EmitEvent) -> None:
        """Queue ``event`` for the file and every subscriber, or count it dropped.

        Synchronous and non-blocking (spec 12); call it from the Trio thread.
        ``also``, if given, is called first, in this task, for every event: it
        must be as cheap and as total as ``list.append`` (its exceptions are not
        caught).  Then the limiter decides what goes out (the event, nothing,
        or summaries before it).
        """
        self._emitted += 1
        if self._also is not None:
            self._also(event)
        limiter = self._limiter
        if limiter is None:
            self._log(event)
            return
        if event.kind in limiter.limits.kinds:
            lines = limiter.admit(event, now=self._clock())
            if not self._summaries_wanted.is_set() and limiter.next_deadline() is not None:
                self._summaries_wanted.set()
        else:
            lines = limiter.observe(event)
        for line in lines:
            self._log(line)

    def _log(self, event: EmitEvent) -> None:
        """One line out: numbered, kept in the history, offered to subscribers and the file."""
        self._seq += 1
        numbered = SequencedEvent(seq=self._seq, event=event)
        self._history.append(numbered)
        for sub in self._subscribers:
            if sub.closed:
                continue
            try:
                if sub.send is not None:
                    sub.send.send_nowait(event)
                elif sub.send_seq is not None:
                    sub.send_seq.send_nowait(numbered)
            except trio.WouldBlock:
                sub.dropped_full += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sub.closed = True  # the subscriber went away: stop offering it events
            else:
                sub.delivered += 1
        if self._send is None:
            return
        if self._closed:
            self._dropped_closed += 1
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped_full += 1

    def subscribe(self, capacity: int, *, name: str = "") -> trio.MemoryReceiveChannel[EmitEvent]:
        """A new bounded feed of every event emitted from now on.

        When the subscriber falls behind by ``capacity`` events, newer events
        are dropped for it alone (counted).  The channel ends when the sink
        closes; closing it unsubscribes.
        """
        _check_capacity(capacity)
        send, receive = trio.open_memory_channel[EmitEvent](capacity)
        self._add_subscriber(_Subscriber(name=self._subscriber_name(name), capacity=capacity, send=send))
        return receive

    def attach(self, capacity: int, *, replay: int | None = None, since: int | None = None, name: str = "") -> Attachment:
        """The recent history and, from the next event on, a bounded live feed (see :class:`Attachment`).

        ``since=N`` replays the events after ``seq`` N that are still in the
        history (``missed`` counts the ones that are not); otherwise the last
        ``replay`` events (all of the history when None).  Synchronous, so
        no event can fall between the two.  Raises ValueError for a capacity
        below 1, a negative ``replay``/``since`` or a ``since`` beyond the last
        event (numbers from another run: compare :attr:`run_id`).
        """
        _check_capacity(capacity)
        for label, value in (("replay", replay), ("since", since)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{label} must be a non-negative int, got {value!r}")
        if since is not None and since > self._seq:
            raise ValueError(f"since={since} is ahead of this sink (last seq {self._seq}: another run?)")
        history = tuple(self._history)
        missed = 0
        if since is not None:
            replayed = tuple(item for item in history if item.seq > since)
            oldest_kept = history[0].seq if history else self._seq + 1
            missed = max(0, min(oldest_kept, self._seq + 1) - since - 1)
        elif replay is None:
            replayed = history
        else:
            replayed = history[len(history) - replay :] if replay else ()
        send, receive = trio.open_memory_channel[SequencedEvent](capacity)
        self._add_subscriber(_Subscriber(name=self._subscriber_name(name), capacity=capacity, send_seq=send))
        return Attachment(replayed=replayed, live=receive, next_seq=self._seq + 1, missed=missed)

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next line that goes out will get."""
        return self._seq + 1

    def _subscriber_name(self, name: str) -> str:
        return name or f"subscriber-{len(self._subscribers) + 1}"

    def _add_subscriber(self, sub: _Subscriber) -> None:
        # Forget subscribers that went away, so many short attachments do not grow the list.
        self._subscribers = [s for s in self._subscribers if not s.closed or s.send is not None]
        if self._closed:
            sub.closed = True
            sub.close()
        self._subscribers.append(sub)

    def statistics(self) -> EventSinkStatistics:
        buffered = self._send.statistics().current_buffer_used if self._send is not None else 0
        limited = self._limiter.statistics() if self._limiter is not None else None
        return EventSinkStatistics(
            emitted=self._emitted,
            written=self._written,
            queued=buffered + self._in_flight,
            dropped_full=self._dropped_full,
            dropped_failed=self._dropped_failed,
            dropped_unencodable=self._dropped_unencodable,
            dropped_closed=self._dropped_closed,
            suppressed=limited.held + limited.overflowed if limited is not None else 0,
            summaries=limited.summaries if limited is not None else 0,
            write_failures=self._write_failures,
            failing=self._failing,
            last_error=self._last_error,
            subscribers=tuple(sub.statistics() for sub in self._subscribers),
            history=len(self._history),
            limiter=limited,
        )

    # -- lifecycle (driven by open_event_sink) --------------------------------------

    def _flush_summaries(self) -> None:
        """Every summary still pending goes out now: the log ends with the counts of what it held back."""
        if self._limiter is not None and not self._closed:
            for line in self._limiter.flush():
                self._log(line)

    async def _serve_summaries(
        self, limiter: SecurityLogLimiter, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the limiter's summaries when they fall due, so a flood that stops is still summed up."""
        task_status.started()
        while True:
            deadline = limiter.next_deadline()
            if deadline is None:
                await self._summaries_wanted.wait()
                self._summaries_wanted = trio.Event()
                continue
            await trio.sleep_until(deadline)
            for line in limiter.tick(now=max(deadline, self._clock())):
                self._log(line)

    def _close(self) -> None:
        """Stop accepting events; the writer drains what is queued, subscribers see the end."""
        self._flush_summaries()
        self._closed = True
        if self._send is not None:
            self._send.close()
        for sub in self._subscribers:
            sub.closed = True
            sub.close()

    def _get_drain_deadline(self) -> float:
        """One deadline for the whole exit drain, fixed by whoever asks first.

        It also bounds the write in progress, which until then is shielded so
        that an owner's cancellation does not abandon a batch mid-write.
        """
        if self._drain_deadline is None:
            self._drain_deadline = trio.current_time() + self._drain_timeout_s
            if self._write_scope is not None:
                self._write_scope.deadline = self._drain_deadline
        return self._drain_deadline

    async def _wait_drained(self) -> None:
        with trio.move_on_at(self._get_drain_deadline()) as scope:
            scope.shield = True
            await self._writer_done.wait()

    # -- the writer task --------------------------------------------------------------

    async def _serve_writer(
        self,
        path: Path,
        receive: trio.MemoryReceiveChannel[EmitEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        try:
            async for first in receive:
                await self._write_batch(path, [first, *self._take_ready(receive)])
        finally:
            # A batch whose write was abandoned by a cancellation may or may
            # not still land (its thread runs on): count it as lost at close.
            self._abandon_in_flight()
            with trio.move_on_at(self._get_drain_deadline()) as scope:
                scope.shield = True
                while batch := self._take_ready(receive):
                    await self._write_batch(path, batch)
            self._abandon_in_flight()
            self._dropped_closed += len(self._take_ready(receive))
            receive.close()
            self._writer_done.set()

    def _abandon_in_flight(self) -> None:
        self._dropped_closed += self._in_flight
        self._in_flight = 0

    @staticmethod
    def _take_ready(receive: trio.MemoryReceiveChannel[EmitEvent]) -> list[EmitEvent]:
        batch: list[EmitEvent] = []
        while True:
            try:
                batch.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return batch

    async def _write_batch(self, path: Path, batch: list[EmitEvent]) -> None:
        self._in_flight = len(batch)
        lines: list[bytes] = []
        for event in batch:
            try:
                lines.append(event.to_json_line().encode("utf-8") + b"\n")
            except (TypeError, ValueError):  # a detail json cannot encode: drop that line only
                self._dropped_unencodable += 1
                self._in_flight -= 1
        if not lines:
            return
        prefix = b"\n" if self._needs_newline else b""
        data = prefix + b"".join(lines)
        deadline = self._drain_deadline if self._drain_deadline is not None else math.inf
        self._write_scope = trio.CancelScope(shield=True, deadline=deadline)
        try:
            with self._write_scope:
                done, error = await self._append(path, data)
        finally:
            abandoned = self._write_scope.cancelled_caught
            self._write_scope = None
        if abandoned:  # the drain deadline passed mid-write: the batch is in doubt
            self._abandon_in_flight()
            return
        written_bytes = max(done - len(prefix), 0)
        complete = 0
        consumed = 0
        for line in lines:
            if consumed + len(line) > written_bytes:
                break
            consumed += len(line)
            complete += 1
        self._written += complete
        self._in_flight = 0
        if error is None:
            self._needs_newline = False
            self._failing = False
            return
        self._dropped_failed += len(lines) - complete
        self._write_failures += 1
        self._failing = True
        self._last_error = _error_text(error)
        if written_bytes != consumed:
            self._needs_newline = True  # a line was cut: keep the next one whole
        elif done >= len(prefix):
            self._needs_newline = False  # the pending newline (if any) went out

    async def _append(self, path: Path, data: bytes) -> tuple[int, OSError | None]:
        """Hand ``data`` to a worker thread.  Cancellable: a stuck disk cannot hold up shutdown."""
        return await trio.to_thread.run_sync(_append_sync, path, data, self._file_lock, abandon_on_cancel=True)


@asynccontextmanager
async def open_event_sink(
    path: Path | None,
    *,
    capacity: int,
    also: Callable[[EmitEvent], None] | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    history: int = HISTORY_EVENTS,
    limits: LogLimits | None = DEFAULT_LOG_LIMITS,
) -> AsyncIterator[EventSink]:
    """Run an :class:`EventSink` for the duration of the block.

    ``path=None`` writes no file (subscribers and ``also`` only).  On exit the
    queue is drained for at most ``drain_timeout_s`` (shielded), then the
    writer is stopped and subscriber channels end.  ``limits`` bounds the
    lines of attack (None: every event in full).  Raises ValueError for a
    capacity below 1 or a negative ``history``; file errors are never raised (they are counted).
    """
    sink = EventSink(
        path, capacity=capacity, also=also, drain_timeout_s=drain_timeout_s, history=history, limits=limits
    )
    async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
        if path is not None and sink._receive is not None:
            await nursery.start(sink._serve_writer, path, sink._receive)
        else:
            sink._writer_done.set()
        if sink._limiter is not None:
            await nursery.start(sink._serve_summaries, sink._limiter)
        try:
            yield sink
        finally:
            sink._close()
            await sink._wait_drained()
            nursery.cancel_scope.cancel()


__all__ = [
    "DRAIN_TIMEOUT_S",
    "HISTORY_EVENTS",
    "LOG_FILE_MODE",
    "Attachment",
    "EventSink",
    "EventSinkStatistics",
    "SequencedEvent",
    "SubscriberStatistics",
    "open_event_sink",
]
