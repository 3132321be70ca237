"""systemd's service protocol without libsystemd: ``sd_notify(3)`` readiness, status, stopping, watchdog.

Theory of operation
-------------------
A ``Type=notify`` unit is started when the service says so: systemd passes
the path of a datagram socket in ``$NOTIFY_SOCKET`` and the service sends it
newline-separated ``KEY=VALUE`` assignments (``READY=1``, ``STATUS=...``,
``STOPPING=1``, ``WATCHDOG=1``; sd_notify(3)).  The protocol is one
``sendto`` on an ``AF_UNIX``/``SOCK_DGRAM`` socket, so it is done here with
the standard library:

* ``$NOTIFY_SOCKET`` is an absolute path, or ``@name`` for a socket in the
  abstract namespace (the ``@`` becomes a NUL byte).  Unset: every call is a
  no-op (a foreground ``sudo jvpn-trio up``, the lab, the tests).
* The socket is non-blocking, so a notification never blocks the Trio loop
  (systemd's receive queue full means ``EAGAIN``, counted like any failure).
* A notification can only fail (no such socket, a queue full, an address we
  cannot use): :class:`Notifier` never raises, counts every failure in
  :meth:`Notifier.statistics` and logs the first one only; the service runs
  on without systemd's view of it, which is systemd's news, not the VPN's.
* ``STATUS=`` lines follow a published value (:func:`publish_status`): only a
  changed text is sent, at most one every :data:`STATUS_MIN_INTERVAL_S`, and
  after a quiet spell the latest text, never a stale one.
* ``WatchdogSec=`` in the unit gives ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``);
  :func:`serve_watchdog` pings from a Trio task at half the interval, as
  sd_watchdog_enabled(3) advises, so a wedged event loop (a blocking call, a
  livelock) stops the pings and systemd restarts the unit.

Which moment is "ready" is the command's choice (docs/service.md); this module
only carries the messages.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from collections.abc import Callable, Mapping
from typing import TypeVar

import attrs
import trio
import trio_util

from jvpn_trio.drivers.log import stderr_line

__all__ = [
    "Notifier",
    "NotifierStatistics",
    "notify",
    "notify_address",
    "publish_status",
    "serve_watchdog",
    "under_systemd",
    "watchdog_interval",
]

#: The environment variables systemd sets for a service (systemd.exec(5), sd_notify(3), sd_watchdog_enabled(3)).
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
INVOCATION_ID_ENV = "INVOCATION_ID"

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"
STATUS_PREFIX = "STATUS="

#: A STATUS= text is cut to this many characters (``systemctl status`` shows it on one line).
STATUS_MAX_CHARS = 200
#: At most one STATUS= update per this many seconds; after a quiet spell the latest text is sent.
STATUS_MIN_INTERVAL_S = 1.0
#: Watchdog pings at this fraction of ``WatchdogSec=`` (sd_watchdog_enabled(3): "half").
WATCHDOG_PING_FRACTION = 0.5
#: A notification is one datagram; systemd reads at most this many bytes of it (NOTIFY_BUFFER_MAX is 4 KiB).
MAX_MESSAGE_BYTES = 4096

T = TypeVar("T")


class NotifyAddressError(ValueError):
    """``$NOTIFY_SOCKET`` holds something this module cannot send to (e.g. ``vsock:``, a relative path)."""


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs as a systemd service (``$INVOCATION_ID`` or ``$NOTIFY_SOCKET`` set).

    A service has no one at a terminal: ``up`` prints plain lines then, never the live UI.
    """
    env = os.environ if environ is None else environ
    return bool(env.get(INVOCATION_ID_ENV) or env.get(NOTIFY_SOCKET_ENV))


def notify_address(value: str) -> str:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value; ``@name`` is the abstract ``\\0name``.

    Raises :class:`NotifyAddressError` for anything but an absolute path or ``@name``.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyAddressError(f"{NOTIFY_SOCKET_ENV}={value!r} is neither an absolute path nor @abstract")


@attrs.frozen
class NotifierStatistics:
    """What the notifier did: messages sent, and failed (each failure after the first is only counted)."""

    enabled: bool
    sent: int
    failed: int
    last_error: str | None


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET``; a no-op without one.  Never raises.

    The address is read once, at construction (:meth:`from_environ`).  The
    socket is opened at the first message and is non-blocking.
    """

    def __init__(self, address: str | None, *, log: Callable[[str], None] = stderr_line) -> None:
        self._log = log
        self._sock: socket.socket | None = None
        self._sent = 0
        self._failed = 0
        self._last_error: str | None = None
        self._target: str | None = None
        self.address = address
        if address:
            try:
                self._target = notify_address(address)
            except NotifyAddressError as exc:
                self._fail(str(exc))

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, log: Callable[[str], None] = stderr_line
    ) -> Notifier:
        """The notifier of this process: ``$NOTIFY_SOCKET`` from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET_ENV) or None, log=log)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (systemd runs this as a ``Type=notify`` service)."""
        return self._target is not None

    def _fail(self, why: str) -> None:
        self._failed += 1
        if self._last_error is None:
            self._log(f"cannot notify systemd: {why}; later failures are counted, not logged")
        self._last_error = why

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one message; True if it left.

        Without ``$NOTIFY_SOCKET`` it does nothing and returns False.  A
        failure is counted (the first one logged) and returns False.
        """
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", errors="replace")[:MAX_MESSAGE_BYTES]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._target)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN (queue full), EPERM, ...
            name = errno.errorcode.get(exc.errno or 0, "error")
            self._fail(f"{self.address}: {exc.strerror or exc} ({name})")
            return False
        self._sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: systemd considers the unit started (``Type=notify``), with an optional status."""
        return self.notify(READY, *([status_assignment(status)] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=text``: the line ``systemctl status`` shows."""
        return self.notify(status_assignment(text))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service has begun to shut down."""
        return self.notify(STOPPING, *([status_assignment(status)] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.notify(WATCHDOG)

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(
            enabled=self.enabled, sent=self._sent, failed=self._failed, last_error=self._last_error
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_assignment(text: str) -> str:
    """``STATUS=<text>`` on one line, cut to :data:`STATUS_MAX_CHARS`."""
    line = " ".join(text.split())
    if len(line) > STATUS_MAX_CHARS:
        line = line[: STATUS_MAX_CHARS - 1] + "…"
    return STATUS_PREFIX + line


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """One-shot ``sd_notify``: send ``assignments`` to ``$NOTIFY_SOCKET`` if set.  Never raises.

    For a long-running service keep a :class:`Notifier` (one socket, one logged failure).
    """
    notifier = Notifier.from_environ(environ)
    try:
        return notifier.notify(*assignments)
    finally:
        notifier.close()


def watchdog_interval(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """``WatchdogSec=`` in seconds from ``$WATCHDOG_USEC``, or None when no watchdog is asked of this process.

    ``$WATCHDOG_PID``, when set, must be this process (``pid``, default ``os.getpid()``):
    a child that inherited the environment is not the one being watched.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def serve_watchdog(
    notifier: Notifier, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping ``WATCHDOG=1`` every ``interval_s * WATCHDOG_PING_FRACTION`` from this Trio task, until cancelled.

    The first ping goes at once.  If the event loop stops running tasks, the
    pings stop and systemd acts (``Restart=on-failure`` restarts the unit).
    """
    task_status.started()
    async for _ in trio_util.periodic(interval_s * WATCHDOG_PING_FRACTION):
        notifier.watchdog()


async def publish_status(
    notifier: Notifier,
    value: trio_util.AsyncValue[T],
    render: Callable[[T], str],
    *,
    min_interval_s: float = STATUS_MIN_INTERVAL_S,
) -> None:
    """Send ``STATUS=render(value)`` whenever the text changes, at most once per ``min_interval_s``.

    The text is rendered again after the wait, so the one sent is the latest;
    a text that changed and changed back within the interval is not sent.
    Runs until cancelled; returns at once when the notifier is disabled.
    """
    if not notifier.enabled:
        return
    last_text: str | None = None
    last_sent = -math.inf
    while True:
        text = render(value.value)
        if text != last_text:
            await trio.sleep_until(last_sent + min_interval_s)
            text = render(value.value)
            if text != last_text:
                notifier.status(text)
                last_text, last_sent = text, trio.current_time()
                continue
        sent = last_text
        await value.wait_value(lambda v: render(v) != sent)
