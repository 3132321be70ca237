"""The local control socket: ``jvpn-trio status``, ``down`` and the attach protocol of the live UI.

Theory of operation
-------------------
A running client or gateway serves a unix stream socket (the config's
``control_socket``, e.g. ``/run/jvpn-trio/client.sock``).  The protocol is
JSON lines both ways, specified in docs/control.md:

* **v0** (what ``jvpn-trio status``, ``down`` and the lab's
  :func:`query_control` send): one JSON object naming its command in
  ``"cmd"``, answered by the bare reply object, or ``{"error": "text"}``.
  A request without ``"v"`` on a connection that did not say hello is v0,
  so these clients keep working unchanged.
* **v1** (:data:`PROTOCOL_VERSION`, what an attached UI speaks: see
  ``drivers/attach.py``): ``{"hello": 1}`` first (or ``"v": 1`` in each
  request); requests carry an ``"id"`` echoed in the reply
  ``{"v": 1, "id": ..., "ok": true, "result": {...}}`` or
  ``{"v": 1, "id": ..., "ok": false, "error": {"code": ..., "message": ...}}``
  (:class:`ErrorCode`).  ``events`` answers, then streams the recent
  events from the event sink's history followed by every live event
  (``{"v": 1, "seq": N, "event": {...}}``) on the same connection, which
  can still carry requests (steering) until the client closes it.

**The agent never waits for a client** (spec 12: observability must not
block correctness).  Events reach a connection through the sink's
:meth:`~jvpn_trio.drivers.event_sink.EventSink.attach`, a bounded channel
filled with ``send_nowait``: a client that reads slowly loses events (its
channel's drops are counted; the client sees a ``gap`` notice and the jump
in ``seq``), and one that takes nothing for :data:`SEND_TIMEOUT_S` is
disconnected and counted (``stalled_disconnects``).  Each connection is its
own task; nothing the agent does waits on one.

**Access.**  With a group (:class:`ControlAccess`, default
:data:`DEFAULT_GROUP`) that exists, the socket file is ``0660`` and owned
by that group, and a directory this code creates for it ``0750``;
otherwise it stays owner-only (``0600``, directory ``0700``) and one line
is logged.  Whatever the file mode lets through, each connection's peer
credentials (``SO_PEERCRED``, groups by ``SO_PEERGROUPS``) decide
(:func:`access_of`): root and the server's own uid may do everything; a
member of the group may use :data:`READ_COMMANDS` (``status``,
``events``), and steering too when ``steer_group`` is set; anyone else gets
``permission_denied`` for every request.  Unknown commands count as steering.

Robustness, since status is observability and must not block correctness
(spec 12):

* Requests are bounded (:data:`MAX_REQUEST_BYTES`); a longer line gets an
  error reply and the connection is closed (it cannot be re-synchronised).
* A malformed line (not UTF-8 JSON, or not an object), an unknown command,
  a missing or bad field, a refused permission: each gets an error reply,
  is counted by code (:meth:`ControlServer.statistics`) and the connection
  stays usable.  Nothing a client sends raises out of the server.
* Until a connection subscribes, each request (read, handle, reply) runs
  under ``fail_after`` (:data:`REQUEST_TIMEOUT_S`): a silent client is
  disconnected.  A subscribed connection may stay silent (it is reading
  events); its handling and every send stay bounded.  At most
  :data:`MAX_CONNECTIONS` are served at once (the rest get a "busy"
  reply), so clients cannot pile up tasks.
* The handler refuses a request by raising :class:`ControlError`, which
  becomes the reply's error.  Any other exception from the handler is a bug
  and propagates (crashing the owner's nursery): no broad excepts.

Start-up replaces a *stale* socket file (one nobody listens on: connecting
is refused) but refuses to start when another instance answers, or when the
path is something other than a socket.  Between the check and ``bind`` there
is a small window in which two instances starting at once could both
proceed; the loser's socket file is then orphaned, not shared.  On exit the
socket file is removed if it is still ours (same device and inode).

The file-system calls (mkdir, lstat, bind, chmod, chown, unlink of the
socket file, the group lookup) are made directly, not through
``trio.to_thread``: they are metadata operations on a local runtime
directory, made once at start and once at exit (in a ``finally``, where
awaiting would need a shield), and a worker thread would be invisible to
``autojump_clock``, which would jump virtual time past every deadline while
the thread ran.
"""

from __future__ import annotations

import enum
import errno
import functools
import grp
import inspect
import json
import os
import socket as stdlib_socket
import stat
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol, Union

import attrs
import trio

from jvpn_trio.core import events as ev
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.event_sink import Attachment, SequencedEvent
from jvpn_trio.drivers.log import stderr_line

#: A runtime's status (``GatewayRuntime.status``, ``ClientRuntime.status``) takes in what changed
#: inside its sessions (versions, bytes, health) at most this often: the rate ``jvpn-trio attach``
#: polls a status at (ui/attached.py STATUS_PERIOD_S).  Building one costs O(sessions) on the
#: gateway and a snapshot on the client, so it cannot follow every input; what a watcher waits on
#: (a session started or ended, a state change) is published at once.
STATUS_INTERVAL_S = 0.25

JsonObject = dict[str, Any]
Handler = Callable[[JsonObject], Union[JsonObject, Awaitable[JsonObject]]]

#: Largest request line accepted, newline excluded.
MAX_REQUEST_BYTES = 64 * 1024
#: Largest reply :func:`query_control` reads (a gateway status lists every session).
MAX_REPLY_BYTES = 16 * 1024 * 1024
#: Bound on reading, handling and answering one request.
REQUEST_TIMEOUT_S = 5.0
#: Connections served at once; more get a "busy" reply.
MAX_CONNECTIONS = 16
#: Without a usable group the socket is owner-only; so is a directory we create for it.
SOCKET_MODE = 0o600
DIR_MODE = 0o700
#: With a group: its members may connect (the peer's credentials then decide what they may do).
GROUP_SOCKET_MODE = 0o660
GROUP_DIR_MODE = 0o750
#: The group whose members may look (status, the live view); ``ControlAccess(group=...)`` changes it.
DEFAULT_GROUP = "jvpn-trio"
#: The attach protocol's version (docs/control.md); v0 is the bare single request/reply of old clients.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)
#: What a group member may do without ``steer_group``; every other command is steering.
READ_COMMANDS = frozenset({"status", "events"})
#: The command that attaches: replay, then live events on the same connection.
EVENTS_COMMAND = "events"
#: A client that takes none of a line for this long is stalled, and disconnected.
SEND_TIMEOUT_S = 5.0
#: Events queued for one attached client before it starts losing them (a counted gap).
SUBSCRIBER_CAPACITY = 1024
#: Live events written to a client in one send, at most.
EVENT_BATCH = 256
#: How long start-up waits for an existing socket to answer before calling it live.
STALE_PROBE_TIMEOUT_S = 1.0
#: listen() backlog.
LISTEN_BACKLOG = 16
#: The request ``jvpn-trio status`` sends.
STATUS_REQUEST: Mapping[str, Any] = {"cmd": "status"}

_RECEIVE_CHUNK = 16 * 1024


class ErrorCode(enum.Enum):
    """The ``code`` of a v1 error reply (docs/control.md, "Errors")."""

    MALFORMED = "malformed"  # not UTF-8 JSON, or not an object
    TOO_LONG = "too_long"  # the line exceeds the limit; the connection closes
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_REQUEST = "bad_request"  # a field is missing or has the wrong type or value
    UNKNOWN_COMMAND = "unknown_command"
    PERMISSION_DENIED = "permission_denied"
    UNKNOWN_PATH = "unknown_path"  # pin names no path of the agent
    REFUSED = "refused"  # the agent cannot do it now (e.g. no live session)
    UNAVAILABLE = "unavailable"  # this instance does not serve the command (e.g. no event source)
    BUSY = "busy"  # too many connections
    INTERNAL = "internal"  # the server's own reply could not be built: a bug, counted


class ControlError(Exception):
    """A control-socket failure, as one line an operator can act on (the CLI prints it).

    ``code`` says which kind of refusal it is (the v1 reply carries it).
    """

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.REFUSED) -> None:
        super().__init__(message)
        self.code = code


class _LineTooLong(Exception):
    pass


def encode_line(obj: Mapping[str, Any]) -> bytes:
    """One protocol line: sorted keys, compact, ASCII, strict JSON (no NaN).  Raises TypeError/ValueError."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


class _LineReader:
    """Splits a byte stream into lines of at most ``max_bytes`` (newline excluded)."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._max = max_bytes
        self._buf = bytearray()
        self._scanned = 0

    async def read_line(self) -> bytes | None:
        """The next line; at EOF a final unterminated line, then None.  Raises _LineTooLong."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                if end > self._max:
                    raise _LineTooLong
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > self._max:
                raise _LineTooLong
            data = await self._stream.receive_some(_RECEIVE_CHUNK)
            if not data:
                if not self._buf:
                    return None
                line = bytes(self._buf)
                self._buf.clear()
                self._scanned = 0
                return line
            self._buf += data


def _parse_request(line: bytes) -> JsonObject | str:
    """The request object, or the text of the error to reply."""
    try:
        request = json.loads(line.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"malformed request: {exc}"
    except RecursionError:  # "[[[[..." within the size limit nests deeper than json can
        return "malformed request: nested too deeply"
    if not isinstance(request, dict):
        return f"malformed request: expected a JSON object, got {type(request).__name__}"
    return request



# -- access ---------------------------------------------------------------------------


class Access(enum.Enum):
    """What a connection may do, from its peer's credentials (:func:`access_of`)."""

    NONE = "none"
    READ = "read"
    STEER = "steer"


@attrs.frozen(kw_only=True)
class ControlAccess:
    """Who besides root may use the socket: members of ``group`` look; they steer too if ``steer_group``.

    ``group=None`` keeps the socket owner-only (``0600``).
    """

    group: str | None = DEFAULT_GROUP
    steer_group: bool = False


@attrs.frozen(kw_only=True)
class PeerCredentials:
    """The connecting process, as the kernel saw it at ``connect`` (``SO_PEERCRED``, ``SO_PEERGROUPS``)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def access_of(peer: PeerCredentials | None, *, owner_uid: int, group_gid: int | None, steer_group: bool) -> Access:
    """Root and the server's own uid: everything; the group: read (or steer); else nothing.  Pure.

    Unknown credentials (``None``) get nothing: fail closed.
    """
    if peer is None:
        return Access.NONE
    if peer.uid == 0 or peer.uid == owner_uid:
        return Access.STEER
    if group_gid is not None and (peer.gid == group_gid or group_gid in peer.groups):
        return Access.STEER if steer_group else Access.READ
    return Access.NONE


#: Not in Python's socket module before 3.13 (Linux >= 4.13).
_SO_PEERGROUPS = getattr(stdlib_socket, "SO_PEERGROUPS", 59)
_PEERCRED = struct.Struct("3i")
#: NGROUPS_MAX on Linux: the largest SO_PEERGROUPS answer.
_MAX_GROUPS = 65536


def peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials | None:
    """The peer of a connected unix socket; None if the kernel will not say."""
    try:
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    groups: tuple[int, ...] = ()
    for size in (64, _MAX_GROUPS):
        try:
            raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue  # more groups than the first buffer holds
            break  # an older kernel: the primary gid decides alone
        groups = tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        break
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=groups)


def _resolve_group(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


# -- the server ------------------------------------------------------------------------


class EventSource(Protocol):
    """What ``events`` reads: :class:`~jvpn_trio.drivers.event_sink.EventSink` is one."""

    run_id: str

    def attach(
        self, capacity: int, *, replay: int | None = None, since: int | None = None, name: str = ""
    ) -> Attachment: ...


@attrs.frozen(kw_only=True)
class ControlStatistics:
    """Counters of a :class:`ControlServer`, frozen at the call."""

    connections: int
    active: int
    busy: int
    requests: int
    subscribers: int
    events_sent: int
    gaps: int
    events_missed: int
    events_unencodable: int
    stalled_disconnects: int
    errors: tuple[tuple[str, int], ...]

    def counters(self, prefix: str = "control.") -> dict[str, int]:
        """Flat ``{name: count}`` for a status report (``control.errors.malformed`` ...)."""
        out = {f"{prefix}{k}": v for k, v in attrs.asdict(self).items() if isinstance(v, int)}
        out.update({f"{prefix}errors.{code}": n for code, n in self.errors})
        return out


class _Stalled(Exception):
    """A send took longer than the send timeout: the client is not reading."""


def _valid_id(value: object) -> bool:
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


def _non_negative_int(request: JsonObject, key: str) -> int | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ControlError(f'"{key}" must be a non-negative integer', code=ErrorCode.BAD_REQUEST)
    return value


class ControlServer:
    """Serves connections for :func:`serve_control`; its :meth:`statistics` belong in a status report."""

    def __init__(
        self,
        handler: Handler,
        *,
        events: EventSource | None = None,
        access: ControlAccess = ControlAccess(),
        group_gid: int | None = None,
        owner_uid: int | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        subscriber_capacity: int = SUBSCRIBER_CAPACITY,
    ) -> None:
        self.handler = handler
        self.events = events
        self.access = access
        self.group_gid = group_gid
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.request_timeout_s = request_timeout_s
        self.send_timeout_s = send_timeout_s
        self.max_request_bytes = max_request_bytes
        self.subscriber_capacity = subscriber_capacity
        self._limiter = trio.CapacityLimiter(max_connections)
        self.errors: Counter[str] = Counter()
        self.connections = 0
        self.active = 0
        self.busy = 0
        self.requests = 0
        self.subscribers = 0
        self.events_sent = 0
        self.gaps = 0
        self.events_missed = 0
        self.events_unencodable = 0
        self.stalled_disconnects = 0

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(
            connections=self.connections,
            active=self.active,
            busy=self.busy,
            requests=self.requests,
            subscribers=self.subscribers,
            events_sent=self.events_sent,
            gaps=self.gaps,
            events_missed=self.events_missed,
            events_unencodable=self.events_unencodable,
            stalled_disconnects=self.stalled_disconnects,
            errors=tuple(sorted(self.errors.items())),
        )

    def access_for(self, peer: PeerCredentials | None) -> Access:
        return access_of(peer, owner_uid=self.owner_uid, group_gid=self.group_gid, steer_group=self.access.steer_group)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """One connection, until the client closes it, misbehaves past repair, or stalls."""
        async with stream:
            try:
                try:
                    self._limiter.acquire_nowait()
                except trio.WouldBlock:
                    self.busy += 1
                    self.errors[ErrorCode.BUSY.value] += 1
                    with trio.fail_after(self.request_timeout_s):
                        await stream.send_all(encode_line({"error": "busy: too many control connections"}))
                    return
                self.connections += 1
                self.active += 1
                try:
                    peer = peer_credentials(stream.socket)
                    connection = _Connection(self, stream, peer, self.access_for(peer))
                    async with trio.open_nursery() as nursery:
                        connection.nursery = nursery
                        await connection.run()
                        nursery.cancel_scope.cancel()
                finally:
                    self.active -= 1
                    self._limiter.release()
            except (trio.TooSlowError, _Stalled):
                return  # a silent or stalled client: drop the connection
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the client went away


class _Connection:
    """One client: its framing (v0 until hello or ``"v"``), its access, its subscription."""

    def __init__(self, server: ControlServer, stream: trio.SocketStream, peer: PeerCredentials | None, access: Access) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.access = access
        self.v1 = False
        self.subscribed = False
        self.number = server.connections
        self.nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        """Write ``data`` whole, in turn with the other writer; raises _Stalled after the send timeout."""
        async with self._send_lock:
            with trio.move_on_after(self.server.send_timeout_s) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise _Stalled

    async def run(self) -> None:
        """Read and answer requests until EOF, a fatal error (too long, stalled, timed out) or a broken socket."""
        server = self.server
        reader = _LineReader(self.stream, server.max_request_bytes)
        try:
            while True:
                try:
                    if self.subscribed:
                        line = await reader.read_line()
                    else:
                        with trio.fail_after(server.request_timeout_s):
                            line = await reader.read_line()
                except _LineTooLong:
                    message = f"request exceeds {server.max_request_bytes} bytes"
                    await self.send(self._error(None, ErrorCode.TOO_LONG, message, v1=self.v1))
                    return
                if line is None:
                    return
                with trio.fail_after(server.request_timeout_s):
                    await self._serve_request(line)
        except _Stalled:
            server.stalled_disconnects += 1
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # silent, or gone: drop the connection

    def _error(self, rid: object, code: ErrorCode, message: str, *, v1: bool, **extra: Any) -> bytes:
        self.server.errors[code.value] += 1
        if not v1:
            return encode_line({"error": message})
        return encode_line(
            {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": {"code": code.value, "message": message, **extra}}
        )

    @staticmethod
    def _ok(rid: object, result: JsonObject) -> bytes:
        return encode_line({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})

    async def _serve_request(self, line: bytes) -> None:
        self.server.requests += 1
        request = _parse_request(line)
        if isinstance(request, str):
            await self.send(self._error(None, ErrorCode.MALFORMED, request, v1=self.v1))
            return
        if "hello" in request:
            await self.send(self._hello(request))
            return
        version = request.get("v")
        v1 = self.v1 or version is not None
        rid = request.get("id")
        if version is not None and (version not in SUPPORTED_VERSIONS or isinstance(version, bool)):
            message = f"protocol version {version!r} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            await self.send(self._error(rid if _valid_id(rid) else None, ErrorCode.UNSUPPORTED_VERSION, message, v1=True, versions=list(SUPPORTED_VERSIONS)))
            return
        if v1 and not _valid_id(rid):
            await self.send(self._error(None, ErrorCode.BAD_REQUEST, '"id" must be a string or an integer', v1=True))
            return
        cmd = request.get("cmd")
        denied = self._denied(cmd)
        if denied is not None:
            await self.send(self._error(rid, ErrorCode.PERMISSION_DENIED, denied, v1=v1))
            return
        if cmd == EVENTS_COMMAND and self.server.events is not None:
            await self._subscribe(request, rid, v1=v1)
            return
        try:
            # The kernel's word on who asks, never the client's: a "caller" it sent is overwritten.
            result = self.server.handler({**request, CALLER_FIELD: self.caller})
            if inspect.isawaitable(result):
                result = await result
        except ControlError as exc:
            await self.send(self._error(rid, exc.code, str(exc), v1=v1))
            return
        if not isinstance(result, dict):
            await self.send(self._error(rid, ErrorCode.INTERNAL, f"internal error: handler returned {type(result).__name__}", v1=v1))
            return
        try:
            reply = self._ok(rid, result) if v1 else encode_line(result)
        except (TypeError, ValueError) as exc:
            reply = self._error(rid, ErrorCode.INTERNAL, f"internal error: reply is not JSON: {exc}", v1=v1)
        await self.send(reply)

    @property
    def caller(self) -> str:
        """Who this connection is, for the event log of a steering action ("uid 1000")."""
        return f"uid {self.peer.uid}" if self.peer is not None else "unknown"

    def _denied(self, cmd: object) -> str | None:
        """Why this connection may not run ``cmd``, or None."""
        if self.access is Access.STEER:
            return None
        who = f"uid {self.peer.uid}" if self.peer is not None else "a peer without credentials"
        group = self.server.access.group
        if self.access is Access.NONE:
            member = f" nor in group {group!r}" if group is not None and self.server.group_gid is not None else ""
            return f"permission denied: {who} is not root{member}"
        if isinstance(cmd, str) and cmd in READ_COMMANDS:
            return None
        return f"permission denied: {cmd!r} steers the agent; {who} may only use {', '.join(sorted(READ_COMMANDS))}"

    def _hello(self, request: JsonObject) -> bytes:
        rid = request.get("id")
        if not _valid_id(rid):
            return self._error(None, ErrorCode.BAD_REQUEST, '"id" must be a string or an integer', v1=True)
        version = request["hello"]
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            message = f"protocol version {version!r} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            return self._error(rid, ErrorCode.UNSUPPORTED_VERSION, message, v1=True, versions=list(SUPPORTED_VERSIONS))
        self.v1 = True
        known = getattr(self.server.handler, "commands", None)
        commands = set(known) if isinstance(known, frozenset) else set()
        if self.server.events is not None:
            commands.add(EVENTS_COMMAND)
        allowed = sorted(c for c in commands if self._denied(c) is None)
        result: JsonObject = {
            "server": "jvpn-trio",
            "versions": list(SUPPORTED_VERSIONS),
            "access": self.access.value,
            "commands": allowed,
            "uid": self.peer.uid if self.peer is not None else None,
            "run": self.server.events.run_id if self.server.events is not None else None,
        }
        return self._ok(rid, result)

    async def _subscribe(self, request: JsonObject, rid: object, *, v1: bool) -> None:
        server = self.server
        assert server.events is not None  # checked by the caller
        if not v1:
            message = 'events needs protocol v1: send {"hello": 1} first, or "v": 1 in the request'
            await self.send(self._error(rid, ErrorCode.BAD_REQUEST, message, v1=False))
            return
        if self.subscribed:
            await self.send(self._error(rid, ErrorCode.BAD_REQUEST, "this connection is already subscribed", v1=True))
            return
        try:
            replay = _non_negative_int(request, "replay")
            since = _non_negative_int(request, "since")
            attachment = server.events.attach(server.subscriber_capacity, replay=replay, since=since, name=self._name())
        except ControlError as exc:
            await self.send(self._error(rid, exc.code, str(exc), v1=True))
            return
        except ValueError as exc:
            await self.send(self._error(rid, ErrorCode.BAD_REQUEST, str(exc), v1=True))
            return
        self.subscribed = True
        server.subscribers += 1
        server.events_missed += attachment.missed
        head = self._ok(
            rid,
            {
                "replay": len(attachment.replayed),
                "missed": attachment.missed,
                "next_seq": attachment.next_seq,
                "run": server.events.run_id,
            },
        )
        lines = [head, *(self._event_line(item) for item in attachment.replayed)]
        await self.send(b"".join(lines))
        assert self.nursery is not None
        self.nursery.start_soon(self._pump, attachment)

    def _name(self) -> str:
        number = f"#{self.number}"
        return f"control{number} (pid {self.peer.pid})" if self.peer is not None else f"control{number}"

    def _event_line(self, item: SequencedEvent) -> bytes:
        try:
            line = encode_line({"v": PROTOCOL_VERSION, "seq": item.seq, "event": item.event.to_dict()})
        except (TypeError, ValueError):  # a detail JSON cannot carry: the client sees a gap
            self.server.events_unencodable += 1
            return b""
        self.server.events_sent += 1
        return line

    async def _pump(self, attachment: Attachment) -> None:
        """Live events to the client, in order, gaps announced; a stall ends the connection."""
        server = self.server
        expected = attachment.next_seq
        try:
            with attachment.live:
                async for first in attachment.live:
                    batch = [first, *_take_ready(attachment.live, EVENT_BATCH - 1)]
                    lines: list[bytes] = []
                    for item in batch:
                        if item.seq != expected:
                            server.gaps += 1
                            server.events_missed += item.seq - expected
                            lines.append(
                                encode_line({"v": PROTOCOL_VERSION, "gap": {"missed": item.seq - expected, "next_seq": item.seq}})
                            )
                        lines.append(self._event_line(item))
                        expected = item.seq + 1
                    await self.send(b"".join(lines))
        except _Stalled:
            server.stalled_disconnects += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            server.subscribers -= 1
        # The sink closed (shutdown), the client stalled or went away: end the connection.
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()


def _take_ready(receive: trio.MemoryReceiveChannel[SequencedEvent], limit: int) -> list[SequencedEvent]:
    out: list[SequencedEvent] = []
    while len(out) < limit:
        try:
            out.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return out


def _socket_identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


async def _clear_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody listens on; raise ControlError if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as probe:
        try:
            with trio.fail_after(STALE_PROBE_TIMEOUT_S):
                await probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)  # stale: its server is gone
            return
        except FileNotFoundError:
            return  # removed meanwhile
        except trio.TooSlowError:
            raise ControlError(f"another instance is running at {path} (it is not accepting)") from None
        except OSError as exc:
            raise ControlError(f"cannot check the existing socket at {path}: {exc.strerror or exc}") from exc
    raise ControlError(f"another instance is running at {path}")


def _remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    """Unlink the socket file unless someone else's replaced it.  Synchronous: runs in a finally."""
    try:
        if _socket_identity(os.lstat(path)) == identity:
            os.unlink(path)
    except (FileNotFoundError, PermissionError):
        pass  # already gone, or not ours to remove: a later start treats it as stale


async def serve_control(
    path: Path,
    handler: Handler,
    *,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    events: EventSource | None = None,
    access: ControlAccess = ControlAccess(),
    send_timeout_s: float = SEND_TIMEOUT_S,
    subscriber_capacity: int = SUBSCRIBER_CAPACITY,
    log: Callable[[str], None] = stderr_line,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` (and, with ``events``, the attach stream) on a unix socket at ``path`` until cancelled.

    ``handler`` gets each request object and returns (or awaits to) the reply
    object; it refuses by raising :class:`ControlError`.  ``events`` (the
    event sink) enables the ``events`` command.  ``access`` names the group
    that may look (and steer, if allowed); a missing group leaves the socket
    owner-only and logs one line.  Calls ``task_status.started(server)`` with
    the :class:`ControlServer` once the socket is bound, has its mode and is
    listening.  Raises ControlError if another instance answers at ``path``,
    if ``path`` is not a socket, or if it cannot be bound.  Removes the
    socket file on exit.
    """
    path = Path(path)
    gid = _resolve_group(access.group)
    if access.group is not None and gid is None:
        log(f"group {access.group!r} does not exist: the control socket {path} is for its owner only")
    created = not path.parent.exists()
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if created and gid is not None:
            os.chown(path.parent, -1, gid)
            os.chmod(path.parent, GROUP_DIR_MODE)
    except OSError as exc:
        raise ControlError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    if gid is not None and not created:
        _warn_if_unreachable(path.parent, gid, access.group, log)
    await _clear_stale_socket(path)
    raw = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        raw.bind(str(path))  # directly: trio's AF_UNIX bind uses a worker thread (see above)
    except OSError as exc:
        raw.close()
        raise ControlError(f"cannot bind the control socket at {path}: {exc.strerror or exc}") from exc
    with trio.socket.from_stdlib_socket(raw) as sock:
        identity = _socket_identity(os.lstat(path))
        try:
            if gid is None:
                os.chmod(path, SOCKET_MODE)
            else:
                os.chmod(path, SOCKET_MODE)  # never group-open before the group is ours
                os.chown(path, -1, gid)
                os.chmod(path, GROUP_SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)
            server = ControlServer(
                handler,
                events=events,
                access=access,
                group_gid=gid,
                request_timeout_s=request_timeout_s,
                send_timeout_s=send_timeout_s,
                max_request_bytes=max_request_bytes,
                max_connections=max_connections,
                subscriber_capacity=subscriber_capacity,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, server.serve_connection, [trio.SocketListener(sock)])
                task_status.started(server)
        finally:
            _remove_if_ours(path, identity)
    raise AssertionError("unreachable: serve_listeners never returns")  # pragma: no cover


def _warn_if_unreachable(directory: Path, gid: int, group: str | None, log: Callable[[str], None]) -> None:
    """One line if members of the group cannot traverse ``directory`` (we do not change a directory we did not create)."""
    try:
        st = os.stat(directory)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o001 or (st.st_gid == gid and mode & 0o010):
        return
    log(f"members of group {group!r} cannot reach {directory} (mode {mode:04o}): the control socket is for its owner only")


class CommandHandler:
    """A handler dispatching on the request's ``"cmd"``; unknown or missing commands are refused.

    ``commands`` names what it serves (the v1 hello lists them).
    """

    def __init__(self, commands: Mapping[str, Handler]) -> None:
        self._table = dict(commands)
        self.commands = frozenset(self._table)

    async def __call__(self, request: JsonObject) -> JsonObject:
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise ControlError('request needs "cmd" (a string)', code=ErrorCode.BAD_REQUEST)
        fn = self._table.get(cmd)
        if fn is None:
            known = ", ".join(sorted(self._table))
            raise ControlError(f"unknown command {cmd!r} (known: {known})", code=ErrorCode.UNKNOWN_COMMAND)
        result = fn(request)
        if inspect.isawaitable(result):
            result = await result
        return result


def command_handler(commands: Mapping[str, Handler]) -> CommandHandler:
    """A handler dispatching on the request's ``"cmd"``; unknown or missing commands are refused."""
    return CommandHandler(commands)


# -- steering -------------------------------------------------------------------------


class _NamedPath(Protocol):
    @property
    def name(self) -> str: ...


class Steerable(Protocol):
    """What the steering commands act on: :class:`~jvpn_trio.drivers.agent.ClientAgent` is one."""

    @property
    def paths(self) -> Mapping[PathId, _NamedPath]: ...

    def submit_nowait(self, event: Any) -> bool: ...

    def disconnect_nowait(self, by: str = ...) -> bool: ...

    def reconnect_nowait(self, by: str = ...) -> bool: ...


#: The field the server adds to every request it hands a handler: the caller as the kernel saw it.
CALLER_FIELD = "caller"


def caller_of(request: JsonObject) -> str:
    """Who sent ``request`` (set by the server from SO_PEERCRED); "operator" when called in-process."""
    caller = request.get(CALLER_FIELD)
    return caller if isinstance(caller, str) and caller else "operator"


#: The steering commands (docs/control.md, "Steering"); each is one core input or one agent call.
STEERING_COMMANDS = ("pin", "unpin", "reevaluate", "disconnect", "reconnect")


def _find_path(paths: Mapping[PathId, _NamedPath], wanted: str) -> PathId:
    for pid, p in sorted(paths.items(), key=lambda item: item[0].value):
        if wanted in (str(pid), p.name):
            return pid
    known = ", ".join(f"{pid} ({p.name})" for pid, p in sorted(paths.items(), key=lambda item: item[0].value))
    raise ControlError(f"no path {wanted!r} (paths: {known or 'none'})", code=ErrorCode.UNKNOWN_PATH)


def steering_commands(target: Steerable) -> dict[str, Handler]:
    """``pin``, ``unpin``, ``reevaluate``, ``disconnect``, ``reconnect`` on ``target`` (merge into command_handler).

    Each maps to exactly one input of the live session (``PinRequested``,
    ``ReevaluateRequested``) or one agent call (``disconnect_nowait``,
    ``reconnect_nowait``: CloseRequested -> LOCAL_CLOSE).  Nothing waits:
    an input the agent cannot take now (no live session, a full inbox) is
    refused with code ``refused``, never queued here.
    """

    def submitted(event: object, what: str) -> None:
        if not target.submit_nowait(event):
            raise ControlError(f"{what} not delivered: no live session, or its inbox is full; try again", code=ErrorCode.REFUSED)

    def pin(request: JsonObject) -> JsonObject:
        wanted = request.get("path")
        if not isinstance(wanted, str) or not wanted:
            raise ControlError('pin needs "path": a path id ("p2") or its interface name', code=ErrorCode.BAD_REQUEST)
        paths = target.paths
        pid = _find_path(paths, wanted)
        submitted(ev.PinRequested(path=pid, by=caller_of(request)), "pin")
        return {"input": "PinRequested", "path": str(pid), "interface": paths[pid].name, "reason": ReasonCode.OPERATOR_PIN.value}

    def unpin(request: JsonObject) -> JsonObject:
        submitted(ev.PinRequested(path=None, by=caller_of(request)), "unpin")
        return {"input": "PinRequested", "path": None, "reason": ReasonCode.OPERATOR_UNPIN.value}

    def reevaluate(request: JsonObject) -> JsonObject:
        submitted(ev.ReevaluateRequested(by=caller_of(request)), "reevaluate")
        return {"input": "ReevaluateRequested", "reason": ReasonCode.OPERATOR_REEVALUATE.value}

    def closing_reply(closed: bool, reason: ReasonCode, *, held: bool) -> JsonObject:
        return {"input": "CloseRequested" if closed else None, "reason": reason.value, "session_closed": closed, "held": held}

    def disconnect(request: JsonObject) -> JsonObject:
        closed = target.disconnect_nowait(caller_of(request))
        return closing_reply(closed, ReasonCode.OPERATOR_DISCONNECT, held=True)

    def reconnect(request: JsonObject) -> JsonObject:
        closed = target.reconnect_nowait(caller_of(request))
        return closing_reply(closed, ReasonCode.OPERATOR_RECONNECT, held=False)

    return {"pin": pin, "unpin": unpin, "reevaluate": reevaluate, "disconnect": disconnect, "reconnect": reconnect}


async def _connect(path: Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(str(path))
    except FileNotFoundError:
        raise ControlError(f"no jvpn-trio running at {path} (socket missing)") from None
    except PermissionError:
        raise ControlError(f"permission denied at {path} (run as root)") from None
    except ConnectionRefusedError:
        raise ControlError(f"connection refused at {path} (stale socket?)") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise ControlError(f"no jvpn-trio running at {path} (socket missing)") from None
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from exc


async def query_control(
    path: Path, request: Mapping[str, Any], *, timeout: float, max_reply_bytes: int = MAX_REPLY_BYTES
) -> JsonObject:
    """Send one request to the instance at ``path`` and return its reply object.

    Raises ControlError with one line:

    * ``no jvpn-trio running at PATH (socket missing)``
    * ``permission denied at PATH (run as root)``
    * ``connection refused at PATH (stale socket?)``
    * ``no reply from PATH within T s (timed out)``
    * ``PATH: MESSAGE`` when the instance refused the request (an ``"error"`` reply)
    * ``malformed reply from PATH``, ``PATH closed the connection without replying``,
      ``reply from PATH exceeds N bytes``, ``connection to PATH broke``

    A request that is not JSON-serialisable raises TypeError/ValueError (a bug).
    """
    path = Path(path)
    line = encode_line(request)
    try:
        with trio.fail_after(timeout):
            stream = await _connect(path)
            async with stream:
                await stream.send_all(line)
                reply_line = await _LineReader(stream, max_reply_bytes).read_line()
    except trio.TooSlowError:
        raise ControlError(f"no reply from {path} within {timeout:g} s (timed out)") from None
    except _LineTooLong:
        raise ControlError(f"reply from {path} exceeds {max_reply_bytes} bytes") from None
    except trio.BrokenResourceError:
        raise ControlError(f"connection to {path} broke") from None
    if reply_line is None:
        raise ControlError(f"{path} closed the connection without replying")
    reply = _parse_request(reply_line)
    if isinstance(reply, str):
        raise ControlError(f"malformed reply from {path}")
    if "error" in reply:
        raise ControlError(f"{path}: {reply['error']}")
    return reply


__all__ = [
    "DEFAULT_GROUP",
    "DIR_MODE",
    "EVENTS_COMMAND",
    "GROUP_DIR_MODE",
    "GROUP_SOCKET_MODE",
    "PROTOCOL_VERSION",
    "READ_COMMANDS",
    "SEND_TIMEOUT_S",
    "STEERING_COMMANDS",
    "SUBSCRIBER_CAPACITY",
    "SUPPORTED_VERSIONS",
    "Access",
    "CommandHandler",
    "ControlAccess",
    "ControlServer",
    "ControlStatistics",
    "ErrorCode",
    "EventSource",
    "PeerCredentials",
    "Steerable",
    "access_of",
    "peer_credentials",
    "steering_commands",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_S",
    "SOCKET_MODE",
    "STATUS_REQUEST",
    "ControlError",
    "Handler",
    "JsonObject",
    "command_handler",
    "encode_line",
    "query_control",
    "serve_control",
]
