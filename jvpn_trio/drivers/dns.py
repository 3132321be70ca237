"""DNS through the tunnel: systemd-resolved over D-Bus, else ``resolvconf``, else ``/etc/resolv.conf``.

Why
---
A full tunnel that lets the laptop keep asking the café's resolver leaks every
name it looks up.  ``dns = [...]`` and ``dns_search = [...]`` in the client
config name the resolvers reached through the tunnel; ``jvpn-trio up`` hands
them to whatever manages the machine's DNS, and ``jvpn-trio down`` takes them
back, even after a crash (docs/dns.md).

API (what ``commands/up.py`` and ``commands/down.py`` call)
--------------------------------------------------------
``await apply_dns(tun_name, servers, search, full_tunnel=..., system=DnsSystem())``
    -> :class:`AppliedDns` (the method used, why the others were not, notes).
``await revert_dns(system=DnsSystem())``
    -> :class:`RevertedDns`, or None when nothing was applied (no state file).
Both raise only :class:`DnsError`, whose message is one line.  :class:`DnsSystem`
carries everything a test injects: the state directory, the D-Bus address, the
resolv.conf path, the ``resolvconf`` command and the time bounds.

Theory of operation
-------------------
*The plan is pure.*  :func:`resolved_plan`, :func:`resolvconf_plan` and
:func:`resolv_conf_text` turn (tunnel, servers, search domains, full tunnel)
into exactly what is applied: D-Bus calls with their signatures and bodies,
a ``resolvconf`` argv and its stdin, or the new resolv.conf text.  Tests assert
them without a bus.

*Choosing a method*, in this order:

1. ``resolved``: the system bus answers and ``org.freedesktop.resolve1`` has an
   owner (``GetNameOwner``; we never bus-activate resolved).  The tunnel link
   gets the servers (``SetLinkDNS``), the search domains (``SetLinkDomains``,
   not routing-only) and, with a full tunnel, the routing-only domain ``.``
   (``resolvectl``'s ``~.``) and ``SetLinkDefaultRoute(true)``: every name
   matches ``~.``, so every query is routed to the tunnel link and none to a
   physical one (a longer routing domain on another link still wins: see
   docs/dns.md).  DNSSEC and DNS-over-TLS are left as configured.  Revert:
   ``RevertLink``; if the link is gone (or its index now names another link),
   resolved has already forgotten it and nothing is called.
2. ``resolvconf``: the command exists.  ``resolvconf -a <tun>.jvpn-trio`` with
   ``nameserver``/``search`` lines on stdin; with a full tunnel ``-x``
   (openresolv: exclusive; systemd's resolvconf: ``~.``).  A resolvconf that
   refuses ``-x`` (Debian's) gets the record without it, and a logged note.
   Revert: ``resolvconf -d <tun>.jvpn-trio``.
3. ``file``: /etc/resolv.conf is rewritten with a header naming jvpn-trio and
   ``jvpn-trio down``, after its previous content is saved byte for byte.

*In a namespace of its own* (``ip netns exec``, the lab's clients) the file
method is chosen without trying the others: the system bus socket is reachable
there, but resolved lives in the machine's namespace and would take our link
index for one of its own links, and resolvconf keeps its records in the
machine's /run.  ``/etc/netns/<ns>/resolv.conf`` is what that namespace reads.

*A state file makes revert independent of the process that applied.*  Before
changing anything, apply writes ``<state_dir>/dns.json`` (atomically):
``{"format": 1, "method": ..., "tun_name": ..., ...}`` with the link index
(resolved), the command and record name (resolvconf), or the resolv.conf path,
what it was (``regular``, ``symlink`` or ``absent``), the backup's path, the
symlink's target and the SHA-256 of the text we wrote (file).  ``revert_dns``
reads only that file, so ``jvpn-trio down`` after a crash undoes what the dead
process did.  It removes the state (and the backup) only once the revert has
succeeded; a failed revert raises and keeps them for the next try.  An apply
that finds a state file first reverts it, so applying twice and reverting once
restores the original byte for byte.

*Writing /etc/resolv.conf.*  A regular file is written in place (truncate and
write, as openresolv's ``cat >`` does), never renamed over: inside
``ip netns exec`` (and in containers) it is a bind mount, where ``rename``
fails with EBUSY, and writing in place keeps its inode, mode and owner.  A
symlink (typically to systemd-resolved's stub, left behind by a resolved that
is not running, else method 1 would have been chosen) is *replaced* by a
regular file, never written through: its target belongs to resolved.  Revert
re-creates the symlink with the same target.  A missing file is created and
removed again on revert.  If the file is no longer what we wrote when revert
runs (a DHCP client rewrote it), it is left alone with a logged note: the
newer file is better than our old backup.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from jeepney import DBusAddress, HeaderFields, MessageType, message_bus, new_method_call
from jeepney.io.trio import DBusConnection, open_dbus_connection

from jvpn_trio.drivers.dbus import BUS_ERRORS, NAME_HAS_NO_OWNER, CallFailed, bus_label
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.errors import describe, first_leaf

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: systemd-resolved's manager object (org.freedesktop.resolve1(5)).
RESOLVE1_BUS_NAME = "org.freedesktop.resolve1"
RESOLVE1_PATH = "/org/freedesktop/resolve1"
RESOLVE1_MANAGER = "org.freedesktop.resolve1.Manager"
#: The routing-only domain that matches every name (``~.`` in resolvectl's syntax).
ROUTE_EVERYTHING = "."
#: resolved's answers to a caller polkit did not authorize (a non-root agent without the polkit rule).
ACCESS_DENIED_ERRORS = frozenset(
    {"org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"}
)

DEFAULT_STATE_DIR = Path("/run/jvpn-trio")
STATE_FILE_NAME = "dns.json"
BACKUP_FILE_NAME = "dns-resolv.conf.backup"
STATE_FORMAT = 1
RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVCONF_COMMAND = "resolvconf"
#: ``resolvconf -a <tun>.<this>``: the protocol part of the record's name.
RESOLVCONF_PROTOCOL = "jvpn-trio"
#: The first line of the resolv.conf we write.
HEADER_MARK = "# Generated by jvpn-trio"
#: Connecting to the bus, and each D-Bus call, in seconds; resolved answers in milliseconds.
CONNECT_TIMEOUT_S = 5.0
#: How long one ``resolvconf`` run may take, in seconds.
COMMAND_TIMEOUT_S = 10.0
#: Why a client in a namespace of its own writes resolv.conf: resolved and resolvconf serve the machine's.
PRIVATE_NETNS_REASON = (
    "in a network namespace of its own: the machine's systemd-resolved and resolvconf serve another one"
)
#: Mode of a resolv.conf we create (when the previous one was a symlink or missing).
RESOLV_CONF_MODE = 0o644


class DnsError(Exception):
    """DNS cannot be applied or reverted as asked; the message is one line, ready for the CLI."""


class Method(enum.Enum):
    RESOLVED = "resolved"
    RESOLVCONF = "resolvconf"
    FILE = "file"


# -----------------------------------------------------------------------------
# The plan (pure)
# -----------------------------------------------------------------------------


def _servers(values: Sequence[IPAddress | str]) -> tuple[IPAddress, ...]:
    out = tuple(ipaddress.ip_address(v) for v in values)
    if not out:
        raise ValueError("no DNS servers: with an empty dns list, leave DNS alone (do not call apply_dns)")
    return out


def _search(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class DnsRequest:
    """What the client config asks for, for one tunnel."""

    tun_name: str
    servers: tuple[IPAddress, ...] = attrs.field(converter=_servers)
    search: tuple[str, ...] = attrs.field(default=(), converter=_search)
    full_tunnel: bool


@attrs.frozen
class DbusCall:
    """One method call on resolved's manager: member, D-Bus signature, body."""

    member: str
    signature: str
    body: tuple[Any, ...]


@attrs.frozen(kw_only=True)
class ResolvedPlan:
    ifindex: int
    #: ``(address family, packed address)`` per server, as ``SetLinkDNS`` takes them.
    servers: tuple[tuple[int, bytes], ...]
    #: ``(domain, routing_only)``: the search domains, plus ``(".", True)`` with a full tunnel.
    domains: tuple[tuple[str, bool], ...]
    #: ``SetLinkDefaultRoute(true)`` with a full tunnel; None: not called (resolved decides).
    default_route: bool | None

    def calls(self) -> tuple[DbusCall, ...]:
        """The calls that apply the plan, in order."""
        calls = [
            DbusCall("SetLinkDNS", "ia(iay)", (self.ifindex, list(self.servers))),
            DbusCall("SetLinkDomains", "ia(sb)", (self.ifindex, list(self.domains))),
        ]
        if self.default_route is not None:
            calls.append(DbusCall("SetLinkDefaultRoute", "ib", (self.ifindex, self.default_route)))
        return tuple(calls)

    def revert_call(self) -> DbusCall:
        return revert_link_call(self.ifindex)


def revert_link_call(ifindex: int) -> DbusCall:
    """``RevertLink``: drops every DNS setting of the link (servers, domains, default route)."""
    return DbusCall("RevertLink", "i", (ifindex,))


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def resolved_plan(request: DnsRequest, ifindex: int) -> ResolvedPlan:
    """The resolved calls for ``request`` on the link ``ifindex``.

    With a full tunnel every query must go to the tunnel, so the link gets the
    routing-only domain ``.`` (matching every name) and is a default route;
    with a split tunnel it only gets the servers and search domains.
    """
    domains = tuple((d, False) for d in request.search)
    if request.full_tunnel:
        domains += ((ROUTE_EVERYTHING, True),)
    return ResolvedPlan(
        ifindex=ifindex,
        servers=tuple((_family(s), s.packed) for s in request.servers),
        domains=domains,
        default_route=True if request.full_tunnel else None,
    )


def resolver_lines(request: DnsRequest) -> str:
    """``nameserver`` lines and a ``search`` line, as resolv.conf(5) and resolvconf take them."""
    lines = [f"nameserver {s}" for s in request.servers]
    if request.search:
        lines.append("search " + " ".join(request.search))
    return "\n".join(lines) + "\n"


@attrs.frozen(kw_only=True)
class ResolvconfPlan:
    #: The record's name, ``<tun>.jvpn-trio``.
    interface: str
    #: Fed to ``resolvconf -a`` on stdin.
    text: str
    #: ``-x``: with a full tunnel, the record's servers are the only ones used.
    exclusive: bool

    def apply_argv(self, command: str, *, exclusive: bool | None = None) -> list[str]:
        x = self.exclusive if exclusive is None else exclusive
        return [command, *(["-x"] if x else []), "-a", self.interface]

    def revert_argv(self, command: str) -> list[str]:
        return [command, "-d", self.interface]


def resolvconf_interface(tun_name: str) -> str:
    return f"{tun_name}.{RESOLVCONF_PROTOCOL}"


def resolvconf_plan(request: DnsRequest) -> ResolvconfPlan:
    return ResolvconfPlan(
        interface=resolvconf_interface(request.tun_name), text=resolver_lines(request), exclusive=request.full_tunnel
    )


def resolv_conf_text(request: DnsRequest, backup: Path | None) -> str:
    """The resolv.conf the file method writes: a header naming us and how to undo it, then the servers."""
    kept = f"the previous one is kept in {backup}" if backup is not None else "the previous one is restored"
    return (
        f"{HEADER_MARK} for the tunnel {request.tun_name}: DNS goes through the tunnel.\n"
        f"# Written while jvpn-trio runs; {kept} and put back by `jvpn-trio down`.\n"
        + resolver_lines(request)
    )


# -----------------------------------------------------------------------------
# The state file
# -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DnsState:
    """What ``<state_dir>/dns.json`` records: enough to revert without the process that applied.

    resolved: ``ifindex``; resolvconf: ``command`` and ``interface``; file:
    ``resolv_conf``, ``original`` (``regular`` / ``symlink`` / ``absent``),
    ``backup`` (regular only), ``symlink_target`` (symlink only) and
    ``written_sha256`` (of the text we wrote).
    """

    method: Method
    tun_name: str
    ifindex: int | None = None
    command: str | None = None
    interface: str | None = None
    resolv_conf: str | None = None
    original: str | None = None
    backup: str | None = None
    symlink_target: str | None = None
    written_sha256: str | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": STATE_FORMAT, "method": self.method.value}
        for field in attrs.fields(DnsState):
            value = getattr(self, field.name)
            if field.name != "method" and value is not None:
                data[field.name] = value
        return json.dumps(data, sort_keys=True) + "\n"

    @classmethod
    def from_json_untrusted(cls, text: str, *, where: str) -> DnsState:
        """Parse a state file; raises only DnsError (naming ``where``)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DnsError(f"{where} is not JSON ({exc}); check the DNS settings and remove it") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise DnsError(f"{where} is not a jvpn-trio DNS state of format {STATE_FORMAT}; check and remove it")
        try:
            method = Method(data.get("method"))
        except ValueError:
            raise DnsError(f"{where} names no known method: {data.get('method')!r}") from None
        kwargs: dict[str, Any] = {}
        for field in attrs.fields(DnsState):
            if field.name == "method" or field.name not in data:
                continue
            value = data[field.name]
            kind = int if field.name == "ifindex" else str
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DnsError(f"{where}: {field.name} is {value!r}, not a {kind.__name__}")
            kwargs[field.name] = value
        if not isinstance(kwargs.get("tun_name"), str):
            raise DnsError(f"{where} names no tunnel")
        required = {
            Method.RESOLVED: ("ifindex",),
            Method.RESOLVCONF: ("command", "interface"),
            Method.FILE: ("resolv_conf", "original", "written_sha256"),
        }[method]
        missing = [name for name in required if name not in kwargs]
        if method is Method.FILE and kwargs.get("original") not in ("regular", "symlink", "absent"):
            missing.append("original")
        if kwargs.get("original") == "regular" and "backup" not in kwargs:
            missing.append("backup")
        if kwargs.get("original") == "symlink" and "symlink_target" not in kwargs:
            missing.append("symlink_target")
        if missing:
            raise DnsError(f"{where}: method {method.value} without {', '.join(missing)}")
        return cls(method=method, **kwargs)


# -----------------------------------------------------------------------------
# Results and injected system
# -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DnsSystem:
    """Where DNS lives on this machine; tests point every field at their own doubles.

    ``bus_address`` None is the system bus; ``resolvconf`` is a command name
    looked up on PATH, or a path.
    """

    state_dir: Path = DEFAULT_STATE_DIR
    bus_address: str | None = None
    resolv_conf: Path = RESOLV_CONF
    resolvconf: str = RESOLVCONF_COMMAND
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    command_timeout_s: float = COMMAND_TIMEOUT_S

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE_NAME

    @property
    def backup_file(self) -> Path:
        return self.state_dir / BACKUP_FILE_NAME


@attrs.frozen(kw_only=True)
class AppliedDns:
    """What ``apply_dns`` did.

    ``detail`` says where (one line); ``skipped`` why the methods before it were
    not used; ``notes`` the conditions met on the way (each also logged).
    """

    method: Method
    tun_name: str
    servers: tuple[IPAddress, ...]
    search: tuple[str, ...]
    full_tunnel: bool
    detail: str
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class RevertedDns:
    """What ``revert_dns`` did: the method it undid, where, and notes (each also logged)."""

    method: Method
    tun_name: str
    detail: str
    notes: tuple[str, ...] = ()


# -----------------------------------------------------------------------------
# D-Bus
# -----------------------------------------------------------------------------


def _where(system: DnsSystem) -> str:
    return bus_label(system.bus_address)


async def _connect(system: DnsSystem) -> tuple[DBusConnection | None, str]:
    """An open connection to the bus, or None and why not."""
    bus = system.bus_address if system.bus_address is not None else "SYSTEM"
    where = _where(system)
    conn: DBusConnection | None = None
    failure = ""
    with trio.move_on_after(system.connect_timeout_s) as scope:
        try:
            conn = await open_dbus_connection(bus)
        except* (RuntimeError, ValueError) as group:  # jeepney's parse of the address
            failure = f"unusable D-Bus address {where}: {describe(first_leaf(group))}"
        except* BUS_ERRORS as group:
            failure = f"cannot use {where}: {describe(first_leaf(group))}"
    if scope.cancelled_caught:
        failure = f"{where} did not answer within {system.connect_timeout_s:g} s"
    if conn is not None and not failure:
        return conn, ""
    if conn is not None:
        await conn.aclose()
    return None, failure or f"cannot use {where}"


async def _call(conn: DBusConnection, msg: Any, *, timeout_s: float) -> tuple[Any, ...]:
    """Send a method call and return its reply's body; raises CallFailed or one of BUS_ERRORS.

    The connection carries nothing we asked for besides replies, so other messages
    (the bus's ``NameAcquired``) are dropped.  Raises trio.TooSlowError after ``timeout_s``.
    """
    with trio.fail_after(timeout_s):
        serial = next(conn.outgoing_serial)
        await conn.send(msg, serial=serial)
        while True:
            reply = await conn.receive()
            header = reply.header
            if header.fields.get(HeaderFields.reply_serial) != serial:
                continue
            if header.message_type is MessageType.error:
                name = str(header.fields.get(HeaderFields.error_name, "unknown D-Bus error"))
                body = reply.body
                text = str(body[0]) if body and isinstance(body[0], str) else ""
                raise CallFailed(name, text)
            return tuple(reply.body)


def _manager_call(call: DbusCall) -> Any:
    address = DBusAddress(RESOLVE1_PATH, bus_name=RESOLVE1_BUS_NAME, interface=RESOLVE1_MANAGER)
    return new_method_call(address, call.member, call.signature, call.body)


async def _resolved_owner(conn: DBusConnection, system: DnsSystem) -> str | None:
    """The unique name owning resolve1, or None when nobody does (resolved is not running)."""
    try:
        (owner,) = await _call(conn, message_bus.GetNameOwner(RESOLVE1_BUS_NAME), timeout_s=system.connect_timeout_s)
    except CallFailed as exc:
        if exc.name == NAME_HAS_NO_OWNER:
            return None
        raise
    return str(owner)


async def _run_calls(conn: DBusConnection, calls: Sequence[DbusCall], system: DnsSystem, tun_name: str) -> None:
    """Run resolved calls in order; raises DnsError naming the first that failed."""
    for call in calls:
        try:
            await _call(conn, _manager_call(call), timeout_s=system.connect_timeout_s)
        except CallFailed as exc:
            hint = unprivileged_hint(Method.RESOLVED) if exc.name in ACCESS_DENIED_ERRORS else ""
            raise DnsError(f"systemd-resolved refused {call.member} for {tun_name}: {exc}{hint}") from None
        except trio.TooSlowError:
            raise DnsError(
                f"systemd-resolved did not answer {call.member} for {tun_name} within {system.connect_timeout_s:g} s"
            ) from None
        except BUS_ERRORS as exc:
            raise DnsError(f"lost {_where(system)} during {call.member} for {tun_name}: {describe(exc)}") from None



# -----------------------------------------------------------------------------
# Files (synchronous: run in a worker thread)
# -----------------------------------------------------------------------------


def unprivileged_hint(method: Method, *, euid: int | None = None) -> str:
    """Why ``method`` refuses an agent that is not root (a unit's ``User=``), to append to its error; "" as root.

    resolved asks polkit about every caller but root; resolvconf and the file
    method write root's files.  docs/service.md, Privileges, has the measurements.
    """
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return ""
    if method is Method.RESOLVED:
        return f" (uid {uid} is not root: resolved asks polkit; install examples/systemd/jvpn-trio-resolved.rules)"
    return f" (uid {uid} is not root: the {method.value} DNS method needs root; docs/service.md, Privileges)"


def _os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{name}: {exc.strerror}{where}" if name else str(exc)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, *, mode: int = RESOLV_CONF_MODE) -> None:
    """Replace ``path`` (a file of ours or a symlink, never a mount point) atomically with ``data``."""
    tmp = path.with_name(f".{path.name}.jvpn-trio-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_in_place(path: Path, data: bytes) -> None:
    """Truncate and write the regular file ``path``: works on a bind mount, keeps inode, mode and owner."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _symlink_over(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.jvpn-trio-{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_state_sync(system: DnsSystem) -> DnsState | None:
    try:
        text = system.state_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = _os_error(exc) if isinstance(exc, OSError) else str(exc)
        raise DnsError(f"cannot read the DNS state {system.state_file}: {why}") from None
    return DnsState.from_json_untrusted(text, where=str(system.state_file))


def _write_state_sync(system: DnsSystem, state: DnsState) -> None:
    system.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_new(system.state_file, state.to_json().encode())


def _remove_state_sync(system: DnsSystem) -> None:
    system.state_file.unlink(missing_ok=True)


def _kind(path: Path) -> str:
    """``regular``, ``symlink`` or ``absent``; anything else (a directory...) raises DnsError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        raise DnsError(f"{path} is neither a file nor a symlink; DNS left alone")
    return "regular"


def _apply_file_sync(system: DnsSystem, request: DnsRequest) -> tuple[str, tuple[str, ...]]:
    """The file method: back up, record, then write.  Returns (detail, notes)."""
    path = system.resolv_conf
    kind = _kind(path)
    backup: Path | None = None
    target: str | None = None
    notes: list[str] = []
    if kind == "regular":
        backup = system.backup_file
        system.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        original = path.read_bytes()
        if original.startswith(HEADER_MARK.encode()):
            notes.append(f"{path} already says it was written by jvpn-trio; it is backed up as it is")
        _write_new(backup, original)
    elif kind == "symlink":
        target = os.readlink(path)
    text = resolv_conf_text(request, backup).encode()
    state = DnsState(
        method=Method.FILE,
        tun_name=request.tun_name,
        resolv_conf=str(path),
        original=kind,
        backup=str(backup) if backup is not None else None,
        symlink_target=target,
        written_sha256=hashlib.sha256(text).hexdigest(),
    )
    _write_state_sync(system, state)
    try:
        if kind == "regular":
            _write_in_place(path, text)
        else:
            _write_new(path, text)
    except OSError:
        # Put back what was there (a failed in-place write may have truncated it), forget the state.
        _restore_file_sync(state)
        _remove_state_sync(system)
        raise
    where = {"regular": f"backup at {backup}", "symlink": f"was a symlink to {target}", "absent": "was absent"}[kind]
    return f"{path} ({where})", tuple(notes)


def _restore_file_sync(state: DnsState) -> None:
    assert state.resolv_conf is not None  # checked by DnsState.from_json_untrusted / built by apply
    path = Path(state.resolv_conf)
    if state.original == "regular":
        assert state.backup is not None
        try:
            original = Path(state.backup).read_bytes()
        except FileNotFoundError:
            raise DnsError(
                f"the backup {state.backup} of {path} is missing: cannot restore it; "
                f"fix {path} by hand and remove the DNS state file"
            ) from None
        if _kind(path) == "regular":
            _write_in_place(path, original)
        else:
            _write_new(path, original)
    elif state.original == "symlink":
        assert state.symlink_target is not None
        _symlink_over(path, state.symlink_target)
    else:
        path.unlink(missing_ok=True)


def _revert_file_sync(system: DnsSystem, state: DnsState) -> tuple[str, tuple[str, ...]]:
    assert state.resolv_conf is not None
    path = Path(state.resolv_conf)
    notes: list[str] = []
    kind = _kind(path)
    ours = kind == "regular" and hashlib.sha256(path.read_bytes()).hexdigest() == state.written_sha256
    if ours:
        _restore_file_sync(state)
        detail = {"regular": "restored", "symlink": f"symlink to {state.symlink_target} restored",
                  "absent": "removed (there was none)"}[state.original or "absent"]  # fmt: skip
    else:
        kept = f"; the one before jvpn-trio's is still in {state.backup}" if state.backup else ""
        notes.append(f"{path} changed since jvpn-trio wrote it; left as it is{kept}")
        detail = "left as it is"
    if ours and state.backup is not None:
        Path(state.backup).unlink(missing_ok=True)
    _remove_state_sync(system)
    return f"{path} {detail}", tuple(notes)


# -----------------------------------------------------------------------------
# Commands
# -----------------------------------------------------------------------------


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


async def _run_command(argv: Sequence[str], stdin: bytes, system: DnsSystem) -> str | None:
    """Run ``argv``; None on exit 0, else one line saying how it failed."""
    shown = " ".join(argv)
    try:
        with trio.fail_after(system.command_timeout_s):
            result = await trio.run_process(
                list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        return f"`{shown}` did not finish within {system.command_timeout_s:g} s"
    except OSError as exc:
        return f"cannot run `{shown}`: {_os_error(exc)}"
    if result.returncode != 0:
        return f"`{shown}` exited {result.returncode}: {_last_line(result.stderr or result.stdout)}"
    return None


# -----------------------------------------------------------------------------
# Apply and revert
# -----------------------------------------------------------------------------


async def apply_dns(
    tun_name: str,
    servers: Sequence[IPAddress | str],
    search: Sequence[str] = (),
    *,
    full_tunnel: bool,
    system: DnsSystem = DnsSystem(),
    method: Method | None = None,
    log: Callable[[str], None] = stderr_line,
) -> AppliedDns:
    """Point the machine's DNS at ``servers`` through the tunnel ``tun_name``, by the first method available.

    ``method`` forces one.  Inside a network namespace other than PID 1's
    (``ip netns exec``: the lab) the file method is used unless forced: the
    machine's resolved would apply our link index to one of *its* links.  Writes the
    state file before changing anything; a state file left by an earlier run is
    reverted first.  Raises DnsError (one line) when DNS cannot be applied;
    then nothing is left changed and no state remains, as far as the machine
    let us.  ValueError if ``servers`` is empty (the config's "leave DNS alone").
    """
    request = DnsRequest(tun_name=tun_name, servers=tuple(servers), search=tuple(search), full_tunnel=full_tunnel)
    earlier = await trio.to_thread.run_sync(_read_state_sync, system)
    if earlier is not None:
        log(f"reverting the DNS settings an earlier run left ({earlier.method.value} on {earlier.tun_name})")
        await revert_dns(system=system, log=log)
    skipped: list[str] = []
    if method is None and await trio.to_thread.run_sync(_in_private_netns):
        skipped.append(PRIVATE_NETNS_REASON)
        method = Method.FILE
    if method in (None, Method.RESOLVED):
        applied = await _try_resolved(request, system, skipped)
        if applied is not None:
            return _logged(applied, log)
        if method is Method.RESOLVED:
            raise DnsError(f"systemd-resolved is not available: {skipped[-1]}")
    if method in (None, Method.RESOLVCONF):
        command = shutil.which(system.resolvconf)
        if command is not None:
            return _logged(await _apply_resolvconf(request, system, command, tuple(skipped)), log)
        skipped.append(f"no {system.resolvconf} command")
        if method is Method.RESOLVCONF:
            raise DnsError(f"resolvconf is not available: {skipped[-1]}")
    try:
        detail, notes = await trio.to_thread.run_sync(_apply_file_sync, system, request)
    except OSError as exc:
        hint = unprivileged_hint(Method.FILE) if isinstance(exc, PermissionError) else ""
        raise DnsError(f"cannot write {system.resolv_conf}: {_os_error(exc)}{hint}") from None
    applied = AppliedDns(
        method=Method.FILE, tun_name=tun_name, servers=request.servers, search=request.search,
        full_tunnel=full_tunnel, detail=detail, skipped=tuple(skipped), notes=notes,
    )  # fmt: skip
    return _logged(applied, log)


def _in_private_netns() -> bool:
    """True inside a network namespace other than PID 1's (``ip netns exec``); False if we cannot tell."""
    try:
        mine, init = os.stat("/proc/self/ns/net"), os.stat("/proc/1/ns/net")
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) != (init.st_dev, init.st_ino)


def _logged(applied: AppliedDns, log: Callable[[str], None]) -> AppliedDns:
    for note in applied.notes:
        log(f"DNS: {note}")
    return applied


async def _try_resolved(request: DnsRequest, system: DnsSystem, skipped: list[str]) -> AppliedDns | None:
    """Apply through resolved if it runs; None (with the reason appended to ``skipped``) if it does not."""
    conn, reason = await _connect(system)
    if conn is None:
        skipped.append(f"systemd-resolved: {reason}")
        return None
    async with conn:
        try:
            owner = await _resolved_owner(conn, system)
        except (CallFailed, trio.TooSlowError, *BUS_ERRORS) as exc:
            skipped.append(f"systemd-resolved: {_where(system)} did not say who owns {RESOLVE1_BUS_NAME}: "
                           f"{describe(exc)}")  # fmt: skip
            return None
        if owner is None:
            skipped.append(f"systemd-resolved: not running ({RESOLVE1_BUS_NAME} has no owner on {_where(system)})")
            return None
        try:
            ifindex = socket.if_nametoindex(request.tun_name)
        except OSError:
            raise DnsError(f"no interface named {request.tun_name} for systemd-resolved to configure") from None
        plan = resolved_plan(request, ifindex)
        state = DnsState(method=Method.RESOLVED, tun_name=request.tun_name, ifindex=ifindex)
        await _write_state(system, state)
        try:
            await _run_calls(conn, plan.calls(), system, request.tun_name)
        except DnsError:
            with trio.CancelScope(shield=True):
                await _best_effort_revert_link(conn, plan.revert_call(), system)
                await trio.to_thread.run_sync(_remove_state_sync, system)
            raise
    routed = "every query routed to it (~.)" if request.full_tunnel else "split tunnel: resolved routes by domain"
    return AppliedDns(
        method=Method.RESOLVED, tun_name=request.tun_name, servers=request.servers, search=request.search,
        full_tunnel=request.full_tunnel, detail=f"systemd-resolved on {request.tun_name} (link {ifindex}), {routed}",
        skipped=tuple(skipped),
    )  # fmt: skip


async def _best_effort_revert_link(conn: DBusConnection, call: DbusCall, system: DnsSystem) -> None:
    try:
        await _call(conn, _manager_call(call), timeout_s=system.connect_timeout_s)
    except (CallFailed, trio.TooSlowError, *BUS_ERRORS):
        pass  # the apply's own error is the one reported; the link's settings die with the link


async def _write_state(system: DnsSystem, state: DnsState) -> None:
    try:
        await trio.to_thread.run_sync(_write_state_sync, system, state)
    except OSError as exc:
        raise DnsError(f"cannot write the DNS state {system.state_file}: {_os_error(exc)}") from None


async def _apply_resolvconf(
    request: DnsRequest, system: DnsSystem, command: str, skipped: tuple[str, ...]
) -> AppliedDns:
    plan = resolvconf_plan(request)
    state = DnsState(method=Method.RESOLVCONF, tun_name=request.tun_name, command=command, interface=plan.interface)
    await _write_state(system, state)
    notes: list[str] = []
    stdin = plan.text.encode()
    failure = await _run_command(plan.apply_argv(command), stdin, system)
    if failure is not None and plan.exclusive:
        # Debian's resolvconf has no -x: the record still goes first (tun* in interface-order).
        retry = await _run_command(plan.apply_argv(command, exclusive=False), stdin, system)
        if retry is None:
            notes.append(f"{failure}; added the record without -x, so other interfaces' servers may stay listed")
            failure = None
    if failure is not None:
        with trio.CancelScope(shield=True):
            await _run_command(plan.revert_argv(command), b"", system)
            await trio.to_thread.run_sync(_remove_state_sync, system)
        raise DnsError(f"resolvconf refused the tunnel's DNS: {failure}{unprivileged_hint(Method.RESOLVCONF)}")
    return AppliedDns(
        method=Method.RESOLVCONF, tun_name=request.tun_name, servers=request.servers, search=request.search,
        full_tunnel=request.full_tunnel, detail=f"resolvconf record {plan.interface}" + (" (exclusive)" if
        plan.exclusive and not notes else ""), skipped=skipped, notes=tuple(notes),
    )  # fmt: skip


async def revert_dns(
    *, system: DnsSystem = DnsSystem(), log: Callable[[str], None] = stderr_line
) -> RevertedDns | None:
    """Undo what the state file says was applied; None if there is no state file (nothing to undo).

    Works after a crash: it needs only the state file.  Removes the state (and
    the backup) once reverted; raises DnsError (one line) and keeps them if the
    revert failed, so it can be tried again.
    """
    state = await trio.to_thread.run_sync(_read_state_sync, system)
    if state is None:
        return None
    if state.method is Method.RESOLVED:
        reverted = await _revert_resolved(state, system)
    elif state.method is Method.RESOLVCONF:
        assert state.command is not None and state.interface is not None
        argv = [state.command, "-d", state.interface]
        failure = await _run_command(argv, b"", system)
        if failure is not None:
            raise DnsError(f"cannot remove the tunnel's resolvconf record: {failure}")
        await trio.to_thread.run_sync(_remove_state_sync, system)
        reverted = RevertedDns(method=state.method, tun_name=state.tun_name,
                               detail=f"resolvconf record {state.interface} removed")  # fmt: skip
    else:
        try:
            detail, notes = await trio.to_thread.run_sync(_revert_file_sync, system, state)
        except OSError as exc:
            raise DnsError(f"cannot restore {state.resolv_conf}: {_os_error(exc)}") from None
        reverted = RevertedDns(method=state.method, tun_name=state.tun_name, detail=detail, notes=notes)
    for note in reverted.notes:
        log(f"DNS: {note}")
    return reverted


def _link_is_ours(state: DnsState) -> bool:
    try:
        return socket.if_nametoindex(state.tun_name) == state.ifindex
    except OSError:
        return False


async def _revert_resolved(state: DnsState, system: DnsSystem) -> RevertedDns:
    assert state.ifindex is not None
    notes: list[str] = []
    if not _link_is_ours(state):
        # resolved forgets a link's settings when the link goes; the index may name another link by now.
        notes.append(f"{state.tun_name} (link {state.ifindex}) is gone: resolved forgot its DNS with it")
    else:
        conn, reason = await _connect(system)
        if conn is None:
            raise DnsError(f"cannot revert {state.tun_name}'s DNS in systemd-resolved: {reason}")
        async with conn:
            try:
                owner = await _resolved_owner(conn, system)
            except (CallFailed, trio.TooSlowError, *BUS_ERRORS) as exc:
                raise DnsError(f"cannot revert {state.tun_name}'s DNS in systemd-resolved: {describe(exc)}") from None
            if owner is None:
                notes.append("systemd-resolved is not running: its link settings went with it")
            else:
                await _run_calls(conn, [revert_link_call(state.ifindex)], system, state.tun_name)
    await trio.to_thread.run_sync(_remove_state_sync, system)
    detail = f"systemd-resolved settings of {state.tun_name} reverted"
    return RevertedDns(method=state.method, tun_name=state.tun_name, detail=detail, notes=tuple(notes))
