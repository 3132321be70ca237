"""Proxy ARP by the owning gateway: return routing that follows the session's owner on the LAN.

Theory of operation
-------------------
When a gateway takes a session over (docs/cluster.md), hosts on its LAN must send traffic for
the client's tunnel address to the new owner.  This is VRRP's trick, applied per address: the
owner answers ARP for the address and, when it takes it over, says so at once.

* :meth:`Announcer.announce` adds a proxy neighbour entry (``pneigh``: what ``ip neigh add
  proxy ADDR dev IF`` adds) on the announce interface, tagged ``proto 74``
  (:data:`~jvpn_trio.drivers.routes.RTPROT_JVPN`), so the kernel answers ARP requests for the
  address with the interface's MAC.  Then it sends gratuitous ARP on that interface: a
  broadcast ARP request and a broadcast ARP reply, each with sender IP = target IP = ADDR and
  sender MAC = the interface's MAC (:func:`gratuitous_arp_frame`).  A neighbour that has an
  entry for ADDR (pointing at the old owner) updates it at once: Linux takes a frame with
  sender IP = target IP as gratuitous and lets it override the entry's ``locktime``.  It
  creates no entry it did not have (unless ``arp_accept``): those hosts ask, and the proxy
  entry answers.  The request's target MAC is zero (unused in a request); the reply's is
  the sender MAC, as RFC 2002 section 4.6 says, and Linux takes a reply as gratuitous only
  then (one with a zero or broadcast target MAC waits out ``locktime`` like any answer;
  tests/integration/test_announce_netns.py sends each frame alone to check it).
* :meth:`Announcer.withdraw` deletes the entry (already gone is fine); :meth:`Announcer.aclose`
  withdraws every address still announced, so a clean stop hands the addresses back.

What the kernel needs before it answers ARP for a ``pneigh`` entry (net/ipv4/arp.c):

* forwarding on the *announce interface* (``net.ipv4.conf.<if>.forwarding``, which the
  kernel checks on the interface the request came in by).  drivers/forwarding.py switches it
  on for the TUN and the egress, so the announce interface should be the egress (or have
  forwarding on otherwise);
* the route to the address leaves by *another* interface (the TUN, where the gateway routes
  its clients' addresses) and is unicast;
* broadcast requests are answered after a random delay of up to
  ``net.ipv4.neigh.<if>.proxy_delay`` (0.8 s by default); the gratuitous ARP does not wait.

``arp_ignore`` does not get in the way: it governs answers for the host's *own* addresses,
not proxy answers (tests/integration/test_announce_netns.py checks it with
``arp_ignore=1`` on every host).

IPv6 is **not** done here: no NDP proxy entry and no unsolicited Neighbor Advertisement.
:meth:`Announcer.announce` takes IPv4 addresses only (TypeError for anything else).

Blocking: pyroute2's synchronous API runs an asyncio loop inside and must not run on the
Trio thread (docs/platform-notes.md 1, 6), so each change runs in ``trio.to_thread`` with a
fresh ``IPRoute``, as in drivers/routes.py, and sends its frames from that thread on the
announcer's non-blocking ``AF_PACKET`` socket.  Changes are serialised by a lock, so an
announce and a withdraw of one address reach the kernel in the order they were asked for.

Imports: this module loads pyroute2 (through drivers/netlink.py, which loads it without its
package ``__init__``) only when an announcer opens, so importing it costs ``serve`` nothing.
"""

from __future__ import annotations

import errno
import importlib
import ipaddress
import json
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from jvpn_trio.drivers.log import LineLimiter, stderr_line

__all__ = [
    "ANNOUNCE_CLEANUP_TIMEOUT_S",
    "ANNOUNCE_LOG_INTERVAL_S",
    "ARPOP_REPLY",
    "ARPOP_REQUEST",
    "ARP_FRAME_LEN",
    "DEFAULT_GRATUITOUS_ROUNDS",
    "AnnounceError",
    "Announcer",
    "AnnouncerStatistics",
    "gratuitous_arp_frame",
    "open_announcer",
]

# -- the ARP frame (RFC 826 over Ethernet II) --------------------------------------------

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
#: A neighbour message's flag for a proxy entry (linux/neighbour.h).
NTF_PROXY = 0x08
MAC_LEN = 6
IPV4_LEN = 4
BROADCAST_MAC = b"\xff" * MAC_LEN
ZERO_MAC = b"\x00" * MAC_LEN
#: Ethernet header (destination, source, EtherType), then the ARP packet for IPv4 over Ethernet:
#: htype, ptype, hlen, plen, oper, sender MAC, sender IP, target MAC, target IP.
_ARP_FRAME = struct.Struct("!6s6sH HHBBH6s4s6s4s")
#: 14 bytes of Ethernet header and 28 of ARP.
ARP_FRAME_LEN = _ARP_FRAME.size

#: Gratuitous ARP rounds per announce (each one request and one reply, back to back): one, since
#: a neighbour that misses both still finds the owner through the proxy answer when it asks.
DEFAULT_GRATUITOUS_ROUNDS = 1
#: How long withdrawing everything on close may take, shielded from cancellation.
ANNOUNCE_CLEANUP_TIMEOUT_S = 5.0
#: Failure lines of one kind are printed at most this often; every failure is counted.
ANNOUNCE_LOG_INTERVAL_S = 10.0

#: The interface is gone (or was never there): counted and logged, never raised, after open.
_GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO})
#: Sends that found the interface down or its queue full: counted and logged.
_SEND_DROP_ERRNOS = frozenset({errno.ENETDOWN, errno.ENOBUFS, errno.EAGAIN})
#: "Not allowed": no CAP_NET_ADMIN for the entry, no CAP_NET_RAW for the socket.
_DENIED_ERRNOS = frozenset({errno.EPERM, errno.EACCES})
#: Deleting an entry that is not there (or whose interface is gone with it).
_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH}) | _GONE_ERRNOS


def gratuitous_arp_frame(mac: bytes, address: ipaddress.IPv4Address, *, op: int) -> bytes:
    """The 42-byte broadcast frame saying "``address`` is at ``mac``" (sender IP = target IP).

    ``op`` is :data:`ARPOP_REQUEST` (target MAC zero: a request's is unused) or
    :data:`ARPOP_REPLY` (target MAC = ``mac``: only such a reply is gratuitous to Linux).  Pure.  Raises ValueError for a MAC that is not 6 bytes or an unknown ``op``.
    """
    if len(mac) != MAC_LEN:
        raise ValueError(f"an Ethernet MAC is {MAC_LEN} bytes, got {len(mac)}")
    if op not in (ARPOP_REQUEST, ARPOP_REPLY):
        raise ValueError(f"ARP op {op} is neither a request ({ARPOP_REQUEST}) nor a reply ({ARPOP_REPLY})")
    ip = address.packed
    target_mac = ZERO_MAC if op == ARPOP_REQUEST else mac
    return _ARP_FRAME.pack(
        BROADCAST_MAC, mac, ETH_P_ARP, ARPHRD_ETHER, ETH_P_IP, MAC_LEN, IPV4_LEN, op, mac, ip, target_mac, ip
    )


# -- errors and statistics ----------------------------------------------------------------


class AnnounceError(Exception):
    """The announce interface cannot be used: missing at open, not Ethernet, or no privilege.

    One line; ``errno`` is the kernel's error number where there is one.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@attrs.frozen(kw_only=True)
class AnnouncerStatistics:
    """What an :class:`Announcer` did and what it met."""

    announced: int = 0  # proxy entries added (an address announced again counts again)
    withdrawn: int = 0  # proxy entries deleted (or found gone)
    frames_sent: int = 0  # gratuitous ARP frames handed to the kernel
    interface_missing: int = 0  # announces that found no interface (it vanished after open)
    frames_dropped: int = 0  # gratuitous ARP frames the kernel refused (interface down or gone, queue full)
    withdraw_failed: int = 0  # deletions that failed or ran out of time on close
    lines_suppressed: int = 0  # failure lines held back by ANNOUNCE_LOG_INTERVAL_S


@attrs.frozen
class _Outcome:
    """What one announce did in its worker thread."""

    interface_found: bool
    frames_sent: int = 0
    frames_dropped: int = 0
    send_error: str | None = None


# -- the blocking parts (worker threads only) ---------------------------------------------


def _ethernet_link(ipr: Any, interface: str) -> tuple[int, bytes] | None:
    """(index, MAC) of ``interface``; None if there is none.  AnnounceError if it is not Ethernet."""
    found = ipr.link_lookup(ifname=interface)
    if not found:
        return None
    index = int(found[0])
    links = ipr.get_links(index)
    if not links:
        return None
    link = links[0]
    text = link.get_attr("IFLA_ADDRESS")
    if link["ifi_type"] != ARPHRD_ETHER or not isinstance(text, str):
        raise AnnounceError(f"{interface} is not an Ethernet interface: nothing to answer ARP on it")
    return index, bytes.fromhex(text.replace(":", ""))


def _netlink_error(exc: Any, what: str) -> AnnounceError:
    code = exc.code
    if code in _DENIED_ERRNOS:
        return AnnounceError(f"{what}: permission denied (needs root or CAP_NET_ADMIN)", code)
    return AnnounceError(f"{what}: netlink: {exc}", code)


def _call_netlink(netns: str | None, what: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(ipr)`` with a fresh ``IPRoute`` in this (worker) thread; NetlinkError -> AnnounceError."""
    from jvpn_trio.drivers.netlink import NetlinkError, open_iproute

    try:
        with open_iproute(netns) as ipr:
            return fn(ipr)
    except NetlinkError as exc:
        raise _netlink_error(exc, what) from exc
    except FileNotFoundError:
        if netns is None:
            raise
        raise AnnounceError(f"{what}: no network namespace named {netns!r}", errno.ENOENT) from None


def _check_interface_sync(netns: str | None, interface: str) -> None:
    link = _call_netlink(netns, f"looking up {interface}", lambda ipr: _ethernet_link(ipr, interface))
    if link is None:
        raise AnnounceError(f"no interface named {interface!r} to announce addresses on", errno.ENODEV)


def _open_packet_socket(netns: str | None) -> socket.socket:
    """A send-only raw packet socket (protocol 0: it receives nothing), in ``netns`` if given."""
    if netns is None:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    import jvpn_trio.drivers.netlink  # noqa: F401  (registers pyroute2 without its package __init__, first)

    pyroute2_netns = importlib.import_module("pyroute2.netns")
    # flags=0: a namespace that does not exist is an error (FileNotFoundError), never created.
    sock: socket.socket = pyroute2_netns.create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    return sock


def _open_sender_sync(netns: str | None, interface: str) -> socket.socket:
    try:
        sock = _open_packet_socket(netns)
    except PermissionError as exc:
        raise AnnounceError(
            f"cannot send gratuitous ARP on {interface}: permission denied (needs root or CAP_NET_RAW)", exc.errno
        ) from None
    sock.setblocking(False)
    return sock


def _announce_sync(
    netns: str | None, interface: str, address: ipaddress.IPv4Address, sender: socket.socket, rounds: int
) -> _Outcome:
    from jvpn_trio.drivers.netlink import NetlinkError
    from jvpn_trio.drivers.routes import RTPROT_JVPN

    def add(ipr: Any) -> tuple[int, bytes] | None:
        link = _ethernet_link(ipr, interface)
        if link is None:
            return None
        try:
            ipr.neigh("add", dst=str(address), ifindex=link[0], flags=NTF_PROXY, NDA_PROTOCOL=RTPROT_JVPN)
        except NetlinkError as exc:
            if exc.code in _GONE_ERRNOS:  # vanished between the lookup and the add
                return None
            raise
        return link

    link = _call_netlink(netns, f"announcing {address} on {interface}", add)
    if link is None:
        return _Outcome(interface_found=False)
    mac = link[1]
    frames = [gratuitous_arp_frame(mac, address, op=op) for op in (ARPOP_REQUEST, ARPOP_REPLY)] * rounds
    sent = dropped = 0
    error: str | None = None
    for frame in frames:
        try:
            sender.sendto(frame, (interface, ETH_P_ARP))
            sent += 1
        except OSError as exc:
            if exc.errno in _DENIED_ERRNOS:
                raise AnnounceError(f"sending gratuitous ARP on {interface}: permission denied", exc.errno) from None
            if exc.errno not in _GONE_ERRNOS | _SEND_DROP_ERRNOS:
                raise
            dropped += 1
            error = exc.strerror or str(exc)
    return _Outcome(interface_found=True, frames_sent=sent, frames_dropped=dropped, send_error=error)


def _withdraw_sync(netns: str | None, interface: str, addresses: list[ipaddress.IPv4Address]) -> None:
    """Delete each address's proxy entry; one already gone (or whose interface is gone) is fine."""
    from jvpn_trio.drivers.netlink import NetlinkError

    def delete(ipr: Any) -> None:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return  # the kernel deleted the entries with the interface
        for address in addresses:
            try:
                ipr.neigh("del", dst=str(address), ifindex=int(found[0]), flags=NTF_PROXY)
            except NetlinkError as exc:
                if exc.code not in _ABSENT_ERRNOS:
                    raise

    _call_netlink(netns, f"withdrawing {', '.join(map(str, addresses))} on {interface}", delete)


def leftover_entries(listing: str) -> list[ipaddress.IPv4Address]:
    """The proxy entries ours (protocol 74) in ``ip -4 -j neigh show proxy dev IF``'s output.

    Raises ValueError for output that is not that listing.
    """
    from jvpn_trio.drivers.routes import RTPROT_JVPN

    rows = json.loads(listing or "[]")
    if not isinstance(rows, list):
        raise ValueError("not a neighbour listing")  # noqa: TRY004 - bad output, reported as a bad value
    found = []
    for row in rows:
        if isinstance(row, dict) and str(row.get("protocol")) == str(RTPROT_JVPN) and isinstance(row.get("dst"), str):
            found.append(ipaddress.IPv4Address(row["dst"]))
    return found


def _leftovers_sync(netns: str | None, interface: str) -> list[ipaddress.IPv4Address]:
    """Our proxy entries already on ``interface``: a gateway killed before it could withdraw them.

    pyroute2 does not dump proxy entries, so this one read goes through iproute2's ``ip``.
    """
    where = ["-n", netns] if netns is not None else []
    argv = ["ip", *where, "-4", "-j", "neigh", "show", "proxy", "dev", interface]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=ANNOUNCE_CLEANUP_TIMEOUT_S, check=True)
        return leftover_entries(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise AnnounceError(f"listing the proxy ARP entries on {interface}: {exc}") from None


# -- the resource ---------------------------------------------------------------------------


class Announcer:
    """Proxy ARP for addresses on one LAN interface; made by :func:`open_announcer`.

    Every method that changes the kernel is a short netlink call (and two sends) in a worker
    thread, one at a time.
    """

    def __init__(
        self,
        interface: str,
        *,
        sender: socket.socket,
        netns: str | None,
        gratuitous_rounds: int,
        log: Callable[[str], None],
    ) -> None:
        self.interface = interface
        self._sender = sender
        self._netns = netns
        self._rounds = gratuitous_rounds
        self._log = log
        self._limiter = LineLimiter(ANNOUNCE_LOG_INTERVAL_S)
        self._lock = trio.Lock()
        self._announced: set[ipaddress.IPv4Address] = set()
        self._closed = False
        self._counts = {name: 0 for name in attrs.fields_dict(AnnouncerStatistics) if name != "lines_suppressed"}

    @property
    def announced(self) -> frozenset[ipaddress.IPv4Address]:
        """The addresses announced and not withdrawn (including ones whose interface was missing)."""
        return frozenset(self._announced)

    def statistics(self) -> AnnouncerStatistics:
        return AnnouncerStatistics(lines_suppressed=self._limiter.suppressed, **self._counts)

    async def announce(self, address: ipaddress.IPv4Address) -> bool:
        """Answer ARP for ``address`` from now on and tell the LAN with gratuitous ARP.

        Idempotent: announcing again re-sends the gratuitous ARP.  Returns False (counted in
        :class:`AnnouncerStatistics`, logged) if the interface has vanished, or is down so the
        frames were refused; the address stays recorded, so announcing it again later (the
        interface back) or closing does the right thing.  Raises :class:`AnnounceError` if
        the kernel refuses the entry (permission), TypeError for a non-IPv4 address
        (IPv6 is not supported), RuntimeError after close.
        """
        if not isinstance(address, ipaddress.IPv4Address):
            raise TypeError(f"only IPv4 addresses can be announced (no NDP proxy), got {address!r}")
        async with self._lock:
            self._check_open()
            self._announced.add(address)  # before the attempt: close withdraws even a partial announce
            outcome = await trio.to_thread.run_sync(
                _announce_sync, self._netns, self.interface, address, self._sender, self._rounds
            )
        if not outcome.interface_found:
            self._counts["interface_missing"] += 1
            self._report("missing", f"cannot announce {address}: interface {self.interface} is gone")
            return False
        self._counts["announced"] += 1
        self._counts["frames_sent"] += outcome.frames_sent
        self._counts["frames_dropped"] += outcome.frames_dropped
        if outcome.frames_dropped:
            self._report("send", f"gratuitous ARP for {address} on {self.interface} not sent: {outcome.send_error}")
            return False
        return True

    async def withdraw(self, address: ipaddress.IPv4Address) -> None:
        """Stop answering ARP for ``address`` (no error if it is not announced or already gone).

        Raises :class:`AnnounceError` if the kernel refuses the deletion (permission),
        RuntimeError after close.
        """
        async with self._lock:
            self._check_open()
            await trio.to_thread.run_sync(_withdraw_sync, self._netns, self.interface, [address])
            self._announced.discard(address)
            self._counts["withdrawn"] += 1

    async def aclose(self) -> None:
        """Withdraw every address still announced and close the socket (idempotent).

        Shielded from cancellation and bounded by :data:`ANNOUNCE_CLEANUP_TIMEOUT_S`; a failure
        is counted and logged, not raised: the gateway is stopping either way.
        """
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            async with self._lock:
                self._closed = True
                addresses = sorted(self._announced)
                self._announced.clear()
                try:
                    if addresses:
                        await self._withdraw_bounded(addresses)
                finally:
                    self._sender.close()

    async def _withdraw_bounded(self, addresses: list[ipaddress.IPv4Address]) -> None:
        failure = ""
        with trio.move_on_after(ANNOUNCE_CLEANUP_TIMEOUT_S) as scope:
            try:
                await trio.to_thread.run_sync(
                    _withdraw_sync, self._netns, self.interface, addresses, abandon_on_cancel=True
                )
                self._counts["withdrawn"] += len(addresses)
            except (AnnounceError, OSError) as exc:
                failure = str(exc)
        if scope.cancelled_caught:
            failure = f"took longer than {ANNOUNCE_CLEANUP_TIMEOUT_S} s"
        if failure:
            self._counts["withdraw_failed"] += len(addresses)
            self._log(f"could not withdraw the proxy ARP entries on {self.interface}: {failure}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the announcer is closed")

    def _report(self, kind: str, text: str) -> None:
        line = self._limiter.line(kind, text, now=trio.current_time())
        if line is not None:
            self._log(line)


@asynccontextmanager
async def open_announcer(
    interface: str,
    *,
    netns: str | None = None,
    gratuitous_rounds: int = DEFAULT_GRATUITOUS_ROUNDS,
    log: Callable[[str], None] = stderr_line,
) -> AsyncIterator[Announcer]:
    """An :class:`Announcer` on ``interface`` (``[cluster].announce_interface``) for the block.

    Checks at once that the interface exists and is Ethernet, and that we may send raw
    frames: :class:`AnnounceError` (one line) otherwise.  On exit every address still
    announced is withdrawn (:meth:`Announcer.aclose`).  ``gratuitous_rounds`` is how many
    request/reply pairs each announce sends (0: the proxy entry only); ``netns`` runs the
    announcer's netlink calls and socket in that named namespace (tests; ``serve`` runs inside
    its namespace already).
    """
    if gratuitous_rounds < 0:
        raise ValueError(f"gratuitous_rounds: {gratuitous_rounds} must be at least 0")
    await trio.to_thread.run_sync(_check_interface_sync, netns, interface)
    sender = await trio.to_thread.run_sync(_open_sender_sync, netns, interface)
    announcer = Announcer(interface, sender=sender, netns=netns, gratuitous_rounds=gratuitous_rounds, log=log)
    try:
        # A gateway killed here left its entries: this one owns nothing yet, so none may stay.
        leftovers = await trio.to_thread.run_sync(_leftovers_sync, netns, interface)
        if leftovers:
            await trio.to_thread.run_sync(_withdraw_sync, netns, interface, leftovers)
            log(f"removed {len(leftovers)} proxy ARP entr{'y' if len(leftovers) == 1 else 'ies'} a previous gateway left on {interface}")
        yield announcer
    finally:
        await announcer.aclose()
