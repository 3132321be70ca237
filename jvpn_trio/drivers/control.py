"""The local control socket behind ``jvpn-trio status [--json]``.

Theory of operation
-------------------
A running client or gateway serves a unix stream socket (the config's
``control_socket``, e.g. ``/run/jvpn-trio/client.sock``).  The protocol is
JSON lines: each request is one JSON object on one line, answered by one JSON
object on one line; a connection may carry several requests in turn.  By
convention a request names its command in ``"cmd"`` (:func:`command_handler`
dispatches on it, :data:`STATUS_REQUEST` is what ``status`` sends), and a
reply whose key ``"error"`` is present is a refusal: that key is reserved.

Access control is the file system: the parent directory is created 0700 if
missing, and the socket is chmod-ed :data:`SOCKET_MODE` (owner only: root,
for a daemon run as root) right after ``bind``.

Robustness, since status is observability and must not block correctness
(spec 12):

* Requests are bounded (:data:`MAX_REQUEST_BYTES`); a longer line gets an
  error reply and the connection is closed (it cannot be re-synchronised).
* A malformed line (not UTF-8 JSON, or not an object) gets
  ``{"error": "..."}`` and the connection stays usable.
* Each request (read, handle, reply) runs under ``fail_after``
  (:data:`REQUEST_TIMEOUT_S`): a silent or stalled client is disconnected,
  and at most :data:`MAX_CONNECTIONS` are served at once (the rest get a
  "busy" reply), so clients cannot pile up tasks.
* The handler refuses a request by raising :class:`ControlError`, which
  becomes the reply's ``"error"``.  Any other exception from the handler is
  a bug and propagates (crashing the owner's nursery): no broad excepts.

Start-up replaces a *stale* socket file (one nobody listens on: connecting
is refused) but refuses to start when another instance answers, or when the
path is something other than a socket.  Between the check and ``bind`` there
is a small window in which two instances starting at once could both
proceed; the loser's socket file is then orphaned, not shared.  On exit the
socket file is removed if it is still ours (same device and inode).

The file-system calls (mkdir, lstat, bind, chmod, unlink of the socket file)
are made directly, not through ``trio.to_thread``: they are metadata operations
on a local runtime directory, made once at start and once at exit (in a
``finally``, where awaiting would need a shield), and a worker thread would
be invisible to ``autojump_clock``, which would jump virtual time past every
deadline while the thread ran.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import socket as stdlib_socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, Union

import trio

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
#: The socket is owner-only; so is a directory we create for it.
SOCKET_MODE = 0o600
DIR_MODE = 0o700
#: How long start-up waits for an existing socket to answer before calling it live.
STALE_PROBE_TIMEOUT_S = 1.0
#: listen() backlog.
LISTEN_BACKLOG = 16
#: The request ``jvpn-trio status`` sends.
STATUS_REQUEST: Mapping[str, Any] = {"cmd": "status"}

_RECEIVE_CHUNK = 16 * 1024


class ControlError(Exception):
    """A control-socket failure, as one line an operator can act on (the CLI prints it)."""


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


async def _answer(line: bytes, handler: Handler) -> bytes:
    request = _parse_request(line)
    if isinstance(request, str):
        return encode_line({"error": request})
    try:
        result = handler(request)
        if inspect.isawaitable(result):
            result = await result
    except ControlError as exc:
        return encode_line({"error": str(exc)})
    if not isinstance(result, dict):
        return encode_line({"error": f"internal error: handler returned {type(result).__name__}"})
    try:
        return encode_line(result)
    except (TypeError, ValueError) as exc:
        return encode_line({"error": f"internal error: reply is not JSON: {exc}"})


async def _serve_connection(
    stream: trio.SocketStream,
    *,
    handler: Handler,
    limiter: trio.CapacityLimiter,
    request_timeout_s: float,
    max_request_bytes: int,
) -> None:
    async with stream:
        try:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                with trio.fail_after(request_timeout_s):
                    await stream.send_all(encode_line({"error": "busy: too many control connections"}))
                return
            try:
                reader = _LineReader(stream, max_request_bytes)
                while True:
                    with trio.fail_after(request_timeout_s):
                        try:
                            line = await reader.read_line()
                        except _LineTooLong:
                            message = f"request exceeds {max_request_bytes} bytes"
                            await stream.send_all(encode_line({"error": message}))
                            return
                        if line is None:
                            return
                        await stream.send_all(await _answer(line, handler))
            finally:
                limiter.release()
        except trio.TooSlowError:
            return  # a silent or stalled client: drop the connection
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away


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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on a unix socket at ``path`` until cancelled.

    ``handler`` gets each request object and returns (or awaits to) the reply
    object; it refuses by raising :class:`ControlError`.  Calls
    ``task_status.started()`` once the socket is bound, owner-only and
    listening.  Raises ControlError if another instance answers at ``path``,
    if ``path`` is not a socket, or if it cannot be bound.  Removes the
    socket file on exit.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
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
            os.chmod(path, SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)
            serve_one = functools.partial(
                _serve_connection,
                handler=handler,
                limiter=trio.CapacityLimiter(max_connections),
                request_timeout_s=request_timeout_s,
                max_request_bytes=max_request_bytes,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, serve_one, [trio.SocketListener(sock)])
                task_status.started()
        finally:
            _remove_if_ours(path, identity)
    raise AssertionError("unreachable: serve_listeners never returns")  # pragma: no cover


def command_handler(commands: Mapping[str, Handler]) -> Handler:
    """A handler dispatching on the request's ``"cmd"``; unknown or missing commands are refused."""
    table = dict(commands)

    async def handle(request: JsonObject) -> JsonObject:
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise ControlError('request needs "cmd" (a string)')
        fn = table.get(cmd)
        if fn is None:
            raise ControlError(f"unknown command {cmd!r} (known: {', '.join(sorted(table))})")
        result = fn(request)
        if inspect.isawaitable(result):
            result = await result
        return result

    return handle


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
    "DIR_MODE",
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
