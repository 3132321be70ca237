"""The client side of the control socket's attach protocol (v1): what a UI uses to attach to a running agent.

Theory of operation
-------------------
:func:`open_control_client` connects to the socket, says ``{"hello": 1}``
and checks the answer (protocol version, this peer's ``access``, the
commands it may use).  One reader task owns the receiving side: a reply
(``"id"``) completes the request waiting for it; an event line
(``"seq"``/``"event"``) or a ``"gap"`` notice goes into one bounded channel
that :meth:`ControlClient.subscribe` returns as an async iterator.  The
reader waits when that channel is full, so a UI that stops reading stops
reading the socket too: the agent then sees a stalled client, drops events
for it alone and, after its send timeout, disconnects it (docs/control.md);
the agent itself never waits.  Requests may be made while subscribed (the
UI steers on the connection it watches).

Every failure is a :class:`~jvpn_trio.drivers.control.ControlError` with
one line an operator can act on and, for a refusal by the agent, the
reply's :class:`~jvpn_trio.drivers.control.ErrorCode`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Union

import attrs
import trio

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.errors import lone_exception_unwrapped
from jvpn_trio.drivers.control import (
    EVENTS_COMMAND,
    MAX_REPLY_BYTES,
    PROTOCOL_VERSION,
    REQUEST_TIMEOUT_S,
    ControlError,
    ErrorCode,
    JsonObject,
    _connect,
    _LineReader,
    _LineTooLong,
    _parse_request,
    encode_line,
)

#: Stream items buffered in the client before its reader stops reading the socket.
CLIENT_EVENT_CAPACITY = 4096


@attrs.frozen(kw_only=True)
class Hello:
    """The agent's answer to hello: what this connection may do."""

    versions: tuple[int, ...]
    access: str
    commands: tuple[str, ...]
    uid: int | None
    run: str | None

    @property
    def can_steer(self) -> bool:
        return self.access == "steer"


@attrs.frozen(kw_only=True)
class AttachedEvent:
    """One event of the agent's log, with its ``seq``; ``event`` is None if this client cannot parse it."""

    seq: int
    data: Mapping[str, Any]
    event: EmitEvent | None


@attrs.frozen(kw_only=True)
class Gap:
    """The agent dropped ``missed`` events for this client (it read too slowly); ``next_seq`` comes next."""

    missed: int
    next_seq: int


StreamItem = Union[AttachedEvent, Gap]


@attrs.frozen(kw_only=True)
class Subscription:
    """The answer to ``events``: ``replay`` past events, then live ones, from ``items``."""

    replay: int
    missed: int
    next_seq: int
    run: str | None
    items: trio.MemoryReceiveChannel[StreamItem]

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self.items.__aiter__()


def _error_of(path: Path, reply: JsonObject) -> ControlError:
    error = reply.get("error")
    if isinstance(error, dict):
        try:
            code = ErrorCode(error.get("code"))
        except ValueError:
            code = ErrorCode.REFUSED  # a code of a newer server
        return ControlError(f"{path}: {error.get('message', 'error')}", code=code)
    text = str(error)
    return ControlError(f"{path}: {text}", code=ErrorCode.BUSY if text.startswith("busy") else ErrorCode.REFUSED)


class ControlClient:
    """A v1 connection to an agent; build it with :func:`open_control_client`."""

    def __init__(self, path: Path, stream: trio.SocketStream, *, timeout: float, event_capacity: int) -> None:
        self.path = path
        self._stream = stream
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[JsonObject]]] = {}
        self._items_send, self._items_receive = trio.open_memory_channel[StreamItem](event_capacity)
        self._subscribed = False
        self._closed_reason: str | None = None
        self._reader_done = trio.Event()
        self._send_lock = trio.Lock()
        self.hello: Hello | None = None
        #: Lines the client could not use (not JSON, or of no known shape): counted, skipped.
        self.unknown_lines = 0

    async def request(self, cmd: str, **fields: Any) -> JsonObject:
        """Send ``cmd`` and return the reply's ``result``.  Raises ControlError (with the agent's code)."""
        return await self._call({"cmd": cmd, **fields})

    async def _call(self, body: JsonObject) -> JsonObject:
        if self._closed_reason is not None:
            raise ControlError(f"{self.path}: {self._closed_reason}", code=ErrorCode.UNAVAILABLE)
        rid = next(self._ids)
        done = trio.Event()
        slot: list[JsonObject] = []
        self._pending[rid] = (done, slot)
        try:
            with trio.fail_after(self._timeout):
                async with self._send_lock:
                    await self._stream.send_all(encode_line({"v": PROTOCOL_VERSION, "id": rid, **body}))
                await done.wait()
        except trio.TooSlowError:
            raise ControlError(f"no reply from {self.path} within {self._timeout:g} s (timed out)") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The agent may have said why before closing ("busy"): let the reader finish that line.
            with trio.move_on_after(self._timeout):
                await self._reader_done.wait()
            raise ControlError(
                f"{self.path}: {self._closed_reason or 'the connection broke'}", code=ErrorCode.UNAVAILABLE
            ) from None
        finally:
            self._pending.pop(rid, None)
        if not slot:
            raise ControlError(f"{self.path}: {self._closed_reason or 'connection closed'}", code=ErrorCode.UNAVAILABLE)
        reply = slot[0]
        if reply.get("ok") is not True:
            raise _error_of(self.path, reply)
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    # -- the commands ----------------------------------------------------------------
    async def status(self) -> JsonObject:
        return await self.request("status")

    async def pin(self, path: str) -> JsonObject:
        """Pin a path, by id (``"p2"``) or interface name; the agent answers which it pinned."""
        return await self.request("pin", path=path)

    async def unpin(self) -> JsonObject:
        return await self.request("unpin")

    async def reevaluate(self) -> JsonObject:
        return await self.request("reevaluate")

    async def disconnect(self) -> JsonObject:
        return await self.request("disconnect")

    async def reconnect(self) -> JsonObject:
        return await self.request("reconnect")

    async def subscribe(self, *, replay: int | None = None, since: int | None = None) -> Subscription:
        """Ask for the recent events (all kept, the last ``replay``, or those after ``since``), then live ones.

        Once per connection.  The items end when the connection does.
        """
        if self._subscribed:
            raise ControlError(f"{self.path}: this connection is already subscribed", code=ErrorCode.BAD_REQUEST)
        body: JsonObject = {"cmd": EVENTS_COMMAND}
        if replay is not None:
            body["replay"] = replay
        if since is not None:
            body["since"] = since
        result = await self._call(body)
        self._subscribed = True
        run = result.get("run")
        return Subscription(
            replay=int(result.get("replay", 0)),
            missed=int(result.get("missed", 0)),
            next_seq=int(result.get("next_seq", 1)),
            run=run if isinstance(run, str) else None,
            items=self._items_receive,
        )

    # -- the reader --------------------------------------------------------------------
    async def _read(self, max_line_bytes: int) -> None:
        reader = _LineReader(self._stream, max_line_bytes)
        reason = "the agent closed the connection"
        try:
            while True:
                try:
                    line = await reader.read_line()
                except _LineTooLong:
                    reason = f"a line from the agent exceeds {max_line_bytes} bytes"
                    return
                if line is None:
                    return
                await self._dispatch(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "the connection broke"
        finally:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._items_send.close()
            for done, _slot in self._pending.values():
                done.set()
            self._reader_done.set()

    async def _dispatch(self, line: bytes) -> None:
        message = _parse_request(line)
        if isinstance(message, str):
            self.unknown_lines += 1
            return
        if "event" in message and isinstance(message.get("seq"), int) and isinstance(message["event"], dict):
            data = message["event"]
            try:
                event: EmitEvent | None = EmitEvent.from_dict(data)
            except ValueError:
                event = None  # a kind or reason of a newer agent: the UI still shows the raw record
            await self._items_send.send(AttachedEvent(seq=message["seq"], data=data, event=event))
            return
        gap = message.get("gap")
        if isinstance(gap, dict):
            await self._items_send.send(Gap(missed=int(gap.get("missed", 0)), next_seq=int(gap.get("next_seq", 0))))
            return
        rid = message.get("id")
        pending = self._pending.get(rid) if isinstance(rid, int) else None
        if pending is None:
            # A refusal before any request was read ("busy"), in the v0 shape: it ends the connection.
            if "error" in message and rid is None and message.get("ok") is None:
                self._closed_reason = str(message["error"])
            self.unknown_lines += 1
            return
        done, slot = pending
        slot.append(message)
        done.set()


@asynccontextmanager
async def open_control_client(
    path: Path,
    *,
    timeout: float = REQUEST_TIMEOUT_S,
    max_line_bytes: int = MAX_REPLY_BYTES,
    event_capacity: int = CLIENT_EVENT_CAPACITY,
) -> AsyncIterator[ControlClient]:
    """Connect to the agent at ``path`` and say hello; the client lives for the block.

    Raises ControlError: the connect errors of
    :func:`~jvpn_trio.drivers.control.query_control` (socket missing,
    permission denied, refused, timed out), ``busy``, or
    ``unsupported_version`` when the agent does not speak v1.
    """
    path = Path(path)
    try:
        with trio.fail_after(timeout):
            stream = await _connect(path)
    except trio.TooSlowError:
        raise ControlError(f"no reply from {path} within {timeout:g} s (timed out)") from None
    async with stream:
        client = ControlClient(path, stream, timeout=timeout, event_capacity=event_capacity)
        async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(client._read, max_line_bytes)
            try:
                result = await client._call({"hello": PROTOCOL_VERSION})
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            client.hello = Hello(
                versions=tuple(int(v) for v in result.get("versions", ())),
                access=str(result.get("access", "none")),
                commands=tuple(str(c) for c in result.get("commands", ())),
                uid=result.get("uid") if isinstance(result.get("uid"), int) else None,
                run=result.get("run") if isinstance(result.get("run"), str) else None,
            )
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()


__all__ = [
    "CLIENT_EVENT_CAPACITY",
    "AttachedEvent",
    "ControlClient",
    "Gap",
    "Hello",
    "StreamItem",
    "Subscription",
    "open_control_client",
]
