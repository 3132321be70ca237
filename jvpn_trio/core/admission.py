"""Admission: which authenticated peer gets a new session, at which tunnel address.

Theory of operation
-------------------
A HANDSHAKE_INIT that authenticates and asks for a new session is a request
for admission.  :meth:`Admissions.admit` answers it from the table of
addresses it keeps, and the gateway driver carries the answer out:

1. ``admit(peer, session_id=...)`` returns :class:`Admit` (the address, the
   session it replaces, the ownership claim to write) or :class:`Refuse`.
   The table is updated at once, so a second handshake racing the first sees
   the first one's effect.
2. The driver writes the claim by compare-and-swap and reports the store's
   answer to :meth:`settle_claim` (or, with no certain answer, calls
   :meth:`abandon_claim`), which returns :class:`Claimed` (the revision the
   new session holds) or :class:`Refuse`.  Only a claimed session ends the
   one it replaces (SESSION_REPLACED: the same key handshook again, from
   this machine or another).  A refused one frees its address, or hands it
   back to the session it would have replaced (``Refuse.restored``): a
   handshake the store could not confirm ends nobody.
3. When a session is gone the driver calls :meth:`release`.

A *takeover* (:meth:`adopt`) is an admission for a session another gateway made: the peer
authenticated, asked to resume that SessionID, and the store's ticket names it
(``ownership.judge_takeover``).  The session keeps its id and its address, which must be the
peer's configured one here (a pool address belongs to the gateway that handed it out).  Its
claim is the store's ``take_over`` at the ticket's revision; the rest is as for ``admit``.
4. A reload (:meth:`reconfigure`) gives a new set of peers and configured
   addresses; it returns the sessions that must end (their peer is gone, its
   configured address changed, or they hold an address now configured for
   another peer), already out of the table, and an admission of theirs still
   waiting for its claim is settled as PEER_REMOVED.

Invariants, whatever the order of calls (``tests/core/test_admission.py``):

* an address is held by at most one session, so two peers never share one;
* a peer's configured address is held only by that peer's sessions and is
  never in the pool;
* a peer holds at most one address: a new session inherits the address of
  the session it replaces, so handshaking again and again never drains the
  pool;
* a peer has at most one admission waiting for its claim, so a burst of
  handshakes cannot pile up claims in the store.

The pool hands out the lowest free host address of the tunnel network,
skipping the gateway's own and every configured one.  Nothing here reads a
clock or draws randomness: the driver passes the new SessionId in.

IPv6 (``tunnel6``): a session's IPv6 address comes with its IPv4 one, as a
pair.  It is the peer's configured ``address6`` if it has one, else the
*twin* of its IPv4 address: the same host number in the IPv6 tunnel network
(``10.66.0.7`` in ``10.66.0.0/24`` -> ``fd6a:7670::7`` in
``fd6a:7670::/64``, as ``config.host_number`` says).  The pool never hands out
an IPv4 address whose twin is configured for another peer or is the gateway's
own IPv6 address, so two sessions never share an IPv6 address either; an
address whose twin would fall outside the IPv6 network (a network smaller than
the IPv4 one) gets no IPv6.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Collection, Iterator, Mapping

import attrs

from jvpn_trio.core.states import ReasonCode
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, Ownership, OwnershipRecord, classify

#: Networks this long have no network or broadcast address: every address is a host.
_NO_BROADCAST_PREFIX = 31

PeerKey = bytes


class Refusal(enum.Enum):
    """Why a handshake gets no session; the driver counts it as ``handshake_<value in lower case>``."""

    POOL_EXHAUSTED = "POOL_EXHAUSTED"
    CLAIM_FAILED = "CLAIM_FAILED"
    ADMISSION_IN_FLIGHT = "ADMISSION_IN_FLIGHT"
    PEER_REMOVED = "PEER_REMOVED"  # a reload removed the peer (or changed its address) while its claim was out
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the ownership store gave no answer (or our lease is unproven)
    OWNERSHIP_AMBIGUOUS = "OWNERSHIP_AMBIGUOUS"  # the claim was sent, its outcome is unknown
    NOT_PORTABLE = "NOT_PORTABLE"  # a takeover for a peer without a configured address here


@attrs.frozen(kw_only=True)
class OwnershipClaim:
    """A compare-and-swap for the store: ``owner`` owns ``session_id`` iff its revision is ``expected_revision``."""

    session_id: SessionId
    owner: str
    expected_revision: int
    #: A takeover: the revision of the ticket it was judged on (the store compares it); None for a new session.
    ticket_revision: int | None = None


@attrs.frozen(kw_only=True)
class Admit:
    """Create ``session_id`` at ``address`` (and ``address6``) once ``claim`` is written, then end ``replaces``."""

    session_id: SessionId
    address: ipaddress.IPv4Address
    replaces: SessionId | None
    claim: OwnershipClaim
    #: The IPv6 address paired with ``address``; None when the tunnel carries no IPv6.
    address6: ipaddress.IPv6Address | None = None


@attrs.frozen(kw_only=True)
class Refuse:
    """No session for this handshake; nothing is left held by it."""

    reason: Refusal
    #: The session the refused admission would have replaced, back in the table with its address: it goes on.
    restored: SessionId | None = None


@attrs.frozen(kw_only=True)
class Claimed:
    """The store confirmed the claim: the session may start, holding ``held_revision``."""

    session_id: SessionId
    address: ipaddress.IPv4Address
    held_revision: int
    address6: ipaddress.IPv6Address | None = None


@attrs.frozen(kw_only=True)
class Holding:
    """One row of :class:`AdmissionSnapshot`."""

    address: ipaddress.IPv4Address
    session_id: SessionId
    peer: PeerKey
    pending: bool
    address6: ipaddress.IPv6Address | None = None


@attrs.frozen(kw_only=True)
class AdmissionSnapshot:
    """Every held address, lowest first, and how many pool addresses are still free."""

    holdings: tuple[Holding, ...]
    pool_free: int


def _is_host(network: ipaddress.IPv4Network, address: ipaddress.IPv4Address) -> bool:
    """Whether ``address`` is one of ``network.hosts()``, without listing them."""
    if address not in network:
        return False
    if network.prefixlen >= _NO_BROADCAST_PREFIX:
        return True
    return address not in (network.network_address, network.broadcast_address)


def _host_count(network: ipaddress.IPv4Network) -> int:
    edges = 0 if network.prefixlen >= _NO_BROADCAST_PREFIX else 2
    return network.num_addresses - edges


def usable_host(tunnel: ipaddress.IPv4Interface, address: ipaddress.IPv4Address) -> bool:
    """Whether ``address`` may be given to a peer: a host of the tunnel network other than the gateway."""
    return address != tunnel.ip and _is_host(tunnel.network, address)


def usable_host6(tunnel6: ipaddress.IPv6Interface, address: ipaddress.IPv6Address) -> bool:
    """Whether ``address`` may be given to a peer: in the IPv6 tunnel network, not the gateway's, not the network's own."""
    network = tunnel6.network
    return address in network and address not in (tunnel6.ip, network.network_address)


def twin6(
    address: ipaddress.IPv4Address, tunnel: ipaddress.IPv4Interface, tunnel6: ipaddress.IPv6Interface
) -> ipaddress.IPv6Address | None:
    """The IPv6 address with ``address``'s host number in ``tunnel6``'s network, or None if it has none there.

    The same rule as ``config.host_number``: ``10.66.0.7`` in ``10.66.0.0/24``
    pairs with ``fd6a:7670::7`` in ``fd6a:7670::/64``.
    """
    host = int(address) - int(tunnel.network.network_address)
    network = tunnel6.network
    if not 0 < host < network.num_addresses:
        return None
    candidate = network[host]
    return candidate if usable_host6(tunnel6, candidate) else None


class _Pool:
    """Pool addresses, lowest first: returned ones from a heap, then the never-used rest in order.

    Every returned address was handed out before the unused ones still ahead,
    so the heap always holds the lowest free addresses.  Nothing is listed up
    front, so a large tunnel network costs nothing until it is used.
    """

    def __init__(self, tunnel: ipaddress.IPv4Interface, excluded: frozenset[ipaddress.IPv4Address]) -> None:
        """``excluded``: usable hosts that are not the pool's now (configured, or held since before a reload)."""
        network = tunnel.network
        self._unused: Iterator[ipaddress.IPv4Address] = (
            a for a in network.hosts() if a != tunnel.ip and a not in excluded
        )
        gateway = 1 if _is_host(network, tunnel.ip) else 0
        self._unused_left = _host_count(network) - gateway - len(excluded)
        self._returned: list[ipaddress.IPv4Address] = []
        #: The lowest never-used address, looked at ahead: after a reload a returned one may be higher.
        self._next_unused = next(self._unused, None)

    @property
    def free(self) -> int:
        return self._unused_left + len(self._returned)

    def take(self) -> ipaddress.IPv4Address | None:
        if self._returned and (self._next_unused is None or self._returned[0] < self._next_unused):
            return heapq.heappop(self._returned)
        address = self._next_unused
        if address is not None:
            self._unused_left -= 1
            self._next_unused = next(self._unused, None)
        return address

    def give_back(self, address: ipaddress.IPv4Address) -> None:
        heapq.heappush(self._returned, address)


class Admissions:
    """The gateway's table of who holds which tunnel address (see the module docstring).

    Synchronous and pure: each call completes its change before returning,
    so callers in different tasks never see a half-made decision.
    """

    def __init__(
        self,
        *,
        tunnel: ipaddress.IPv4Interface,
        fixed: Mapping[PeerKey, ipaddress.IPv4Address],
        node_id: str,
        tunnel6: ipaddress.IPv6Interface | None = None,
        fixed6: Mapping[PeerKey, ipaddress.IPv6Address] | None = None,
    ) -> None:
        """Raises ValueError if a configured address (of either family) is not a usable host or is given to two peers.

        ``tunnel6`` is the gateway's IPv6 tunnel address (None: no IPv6);
        ``fixed6`` the peers' configured IPv6 addresses (``PeerConfig.address6``).
        """
        self._tunnel = tunnel
        self._tunnel6 = tunnel6
        fixed6 = dict(fixed6 or {})
        excluded = self._excluded(fixed, fixed6)
        self._fixed = dict(fixed)
        self._fixed6 = fixed6
        self._node_id = node_id
        self._pool = _Pool(tunnel, excluded)
        self._pool_excluded = excluded
        self._address: dict[SessionId, ipaddress.IPv4Address] = {}
        self._address6: dict[SessionId, ipaddress.IPv6Address] = {}
        self._peer: dict[SessionId, PeerKey] = {}
        self._current: dict[PeerKey, SessionId] = {}
        self._pending: set[SessionId] = set()
        #: Admissions a reload ended while their claim was out: settled as PEER_REMOVED.
        self._revoked: set[SessionId] = set()
        #: Pending admission -> the session it replaces, restored if the claim fails and it is still alive.
        self._replacing: dict[SessionId, SessionId] = {}

    def _excluded(
        self, fixed: Mapping[PeerKey, ipaddress.IPv4Address], fixed6: Mapping[PeerKey, ipaddress.IPv6Address]
    ) -> frozenset[ipaddress.IPv4Address]:
        """The addresses the pool must not hand out for these configured ones; ValueError if they are not valid."""
        tunnel, tunnel6 = self._tunnel, self._tunnel6
        seen: set[ipaddress.IPv4Address] = set()
        for address in fixed.values():
            if not usable_host(tunnel, address):
                raise ValueError(f"{address} is not a free host address of {tunnel.network}")
            if address in seen:
                raise ValueError(f"{address} is configured for two peers")
            seen.add(address)
        if fixed6 and tunnel6 is None:
            raise ValueError("configured IPv6 addresses need an IPv6 tunnel address")
        seen6: set[ipaddress.IPv6Address] = set()
        for address6 in fixed6.values():
            if tunnel6 is None or not usable_host6(tunnel6, address6):
                raise ValueError(f"{address6} is not a free host address of {tunnel6.network if tunnel6 else 'the tunnel'}")
            if address6 in seen6:
                raise ValueError(f"{address6} is configured for two peers")
            seen6.add(address6)
        # Pool addresses whose twin is taken (another peer's configured IPv6, the gateway's own) stay out of the pool.
        excluded = set(seen)
        if tunnel6 is not None:
            taken6 = seen6 | {tunnel6.ip}
            for address6 in taken6:
                host = int(address6) - int(tunnel6.network.network_address)
                if 0 < host < tunnel.network.num_addresses:
                    twin = tunnel.network[host]
                    if usable_host(tunnel, twin):
                        excluded.add(twin)
        return frozenset(excluded)

    def reconfigure(
        self,
        *,
        peers: Collection[PeerKey],
        fixed: Mapping[PeerKey, ipaddress.IPv4Address],
        fixed6: Mapping[PeerKey, ipaddress.IPv6Address] | None = None,
    ) -> tuple[SessionId, ...]:
        """A reload: ``peers`` are the authorised peers now, ``fixed``/``fixed6`` their configured addresses.

        Returns the sessions that must end, already out of the table: a peer
        no longer listed, a peer whose configured address (either family)
        changed, and a session holding an address now configured for another
        peer.  Every other session keeps its address.  Raises ValueError as
        ``__init__`` does, before anything changes.
        """
        fixed6 = dict(fixed6 or {})
        excluded = self._excluded(fixed, fixed6)
        configured4, configured6 = set(fixed.values()), set(fixed6.values())
        ending = []
        for session_id, peer in sorted(self._peer.items(), key=lambda item: item[0].hex):
            address, address6 = self._address[session_id], self._address6.get(session_id)
            gone = peer not in peers
            moved = self._fixed.get(peer) != fixed.get(peer) or self._fixed6.get(peer) != fixed6.get(peer)
            taken = (address in configured4 and fixed.get(peer) != address) or (
                address6 is not None and address6 in configured6 and fixed6.get(peer) != address6
            )
            if gone or moved or taken:
                ending.append(session_id)
        for session_id in ending:
            if session_id in self._pending:
                self._revoked.add(session_id)
            self._forget(session_id)
        self._fixed, self._fixed6 = dict(fixed), fixed6
        held = frozenset(a for a in self._address.values() if a not in excluded)
        self._pool = _Pool(self._tunnel, excluded | held)
        self._pool_excluded = excluded
        return tuple(ending)

    # -- decisions ----------------------------------------------------------------------
    def admit(self, peer: PeerKey, *, session_id: SessionId) -> Admit | Refuse:
        """Decide on a new session for an authenticated ``peer``; the table changes at once.

        The address is the one the peer's current session holds (which the new
        session then replaces: ``Admit.replaces``, ended SESSION_REPLACED), else the peer's configured one, else the
        lowest free pool address.  Refuses POOL_EXHAUSTED when the pool is
        empty and ADMISSION_IN_FLIGHT while the peer's previous admission
        still waits for its claim.  Raises ValueError if ``session_id`` is
        already in the table (the caller's ids must be fresh).
        """
        if session_id in self._peer:
            raise ValueError(f"session {session_id.short} is already admitted")
        previous = self._current.get(peer)
        if previous is not None and previous in self._pending:
            return Refuse(reason=Refusal.ADMISSION_IN_FLIGHT)
        if previous is not None:
            address = self._address[previous]
        elif peer in self._fixed:
            address = self._fixed[peer]
        else:
            taken = self._pool.take()
            if taken is None:
                return Refuse(reason=Refusal.POOL_EXHAUSTED)
            address = taken
        return self._hold(peer, session_id, address, previous)

    def adopt(self, peer: PeerKey, *, session_id: SessionId, ticket_revision: int) -> Admit | Refuse:
        """Decide on taking ``session_id`` over for ``peer`` (see the module docstring).

        The caller has checked the ticket (``ownership.judge_takeover``) against
        :meth:`configured_address`.  Refuses NOT_PORTABLE for a peer without a configured
        address, ADMISSION_IN_FLIGHT while the peer's previous admission waits for its claim
        or this session is already being admitted.  A session the peer holds here is replaced.
        """
        address = self._fixed.get(peer)
        if address is None:
            return Refuse(reason=Refusal.NOT_PORTABLE)
        previous = self._current.get(peer)
        if session_id in self._peer or (previous is not None and previous in self._pending):
            return Refuse(reason=Refusal.ADMISSION_IN_FLIGHT)
        return self._hold(peer, session_id, address, previous, ticket_revision=ticket_revision)

    def _hold(
        self,
        peer: PeerKey,
        session_id: SessionId,
        address: ipaddress.IPv4Address,
        previous: SessionId | None,
        *,
        ticket_revision: int | None = None,
    ) -> Admit:
        """Enter an admission in the table (its claim outstanding), in place of ``previous``."""
        if previous is not None:
            self._forget(previous)
            self._replacing[session_id] = previous
        address6 = self._pair6(peer, address)
        self._address[session_id] = address
        if address6 is not None:
            self._address6[session_id] = address6
        self._peer[session_id] = peer
        self._current[peer] = session_id
        self._pending.add(session_id)
        claim = OwnershipClaim(
            session_id=session_id, owner=self._node_id, expected_revision=ABSENT_REVISION, ticket_revision=ticket_revision
        )
        return Admit(session_id=session_id, address=address, replaces=previous, claim=claim, address6=address6)

    def configured_address(self, peer: PeerKey) -> ipaddress.IPv4Address | None:
        """The peer's configured tunnel address here, if it has one (the one a takeover keeps)."""
        return self._fixed.get(peer)

    def _pair6(self, peer: PeerKey, address: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
        """The IPv6 address that goes with ``address`` for ``peer``: its configured one, else the twin."""
        if self._tunnel6 is None:
            return None
        configured = self._fixed6.get(peer)
        if configured is not None:
            return configured
        return twin6(address, self._tunnel, self._tunnel6)

    def settle_claim(
        self, session_id: SessionId, *, succeeded: bool, record: OwnershipRecord | None
    ) -> Claimed | Refuse:
        """The store's answer to an admission's claim.

        The claim holds only if the compare-and-swap succeeded and the record
        names this session and this node (``ownership.classify``); otherwise
        the admission is undone and CLAIM_FAILED returned.  Raises ValueError
        if ``session_id`` has no claim outstanding.
        """
        if session_id in self._revoked:  # a reload ended it while the store was being asked
            self._revoked.discard(session_id)
            self._replacing.pop(session_id, None)
            return Refuse(reason=Refusal.PEER_REMOVED)
        if session_id not in self._pending:
            raise ValueError(f"session {session_id.short} has no claim outstanding")
        if (
            not succeeded
            or record is None
            or classify(record, session_id=session_id, node_id=self._node_id, held_revision=record.revision).ownership
            is not Ownership.OWNED
        ):
            return self._undo(session_id, Refusal.CLAIM_FAILED)
        self._pending.discard(session_id)
        self._replacing.pop(session_id, None)
        return Claimed(
            session_id=session_id,
            address=self._address[session_id],
            held_revision=record.revision,
            address6=self._address6.get(session_id),
        )

    def abandon_claim(self, session_id: SessionId, failure: ReasonCode) -> Refuse:
        """The store gave no certain answer to the claim: undo the admission (fail closed).

        Like a failed claim, but refused for the store's ``failure`` (STORE_UNAVAILABLE or
        OWNERSHIP_AMBIGUOUS, ``core.ownership.store_failure_reason``), the refusal of that name.
        Raises ValueError if ``session_id`` has no claim outstanding.
        """
        if session_id in self._revoked:
            self._revoked.discard(session_id)
            self._replacing.pop(session_id, None)
            return Refuse(reason=Refusal.PEER_REMOVED)
        if session_id not in self._pending:
            raise ValueError(f"session {session_id.short} has no claim outstanding")
        return self._undo(session_id, Refusal(failure.value))

    def _undo(self, session_id: SessionId, reason: Refusal) -> Refuse:
        """Undo a pending admission: its address goes back to the session it replaced, if alive, else to the pool."""
        previous = self._replacing.pop(session_id, None)
        if previous is None:
            self.release(session_id)
            return Refuse(reason=reason)
        address, address6, peer = self._address[session_id], self._address6.get(session_id), self._peer[session_id]
        self._forget(session_id)
        self._address[previous] = address
        if address6 is not None:
            self._address6[previous] = address6
        self._peer[previous] = peer
        self._current[peer] = previous
        return Refuse(reason=reason, restored=previous)

    def release(self, session_id: SessionId) -> None:
        """``session_id`` is gone (ended, or its admission abandoned): free what it holds.  Idempotent."""
        for pending, replaced in list(self._replacing.items()):
            if replaced == session_id:  # it ended while its successor's claim was out: nothing to restore
                del self._replacing[pending]
        self._replacing.pop(session_id, None)
        address = self._address.get(session_id)
        self._forget(session_id)
        if address is not None and address not in self._pool_excluded:
            self._pool.give_back(address)

    # -- reading ------------------------------------------------------------------------
    def address_of(self, session_id: SessionId) -> ipaddress.IPv4Address | None:
        return self._address.get(session_id)

    def address6_of(self, session_id: SessionId) -> ipaddress.IPv6Address | None:
        return self._address6.get(session_id)

    def session_of(self, peer: PeerKey) -> SessionId | None:
        """The peer's current session (admitted, claimed or not), if any."""
        return self._current.get(peer)

    def snapshot(self) -> AdmissionSnapshot:
        rows = sorted(
            (
                Holding(
                    address=address,
                    session_id=sid,
                    peer=self._peer[sid],
                    pending=sid in self._pending,
                    address6=self._address6.get(sid),
                )
                for sid, address in self._address.items()
            ),
            key=lambda h: h.address,
        )
        return AdmissionSnapshot(holdings=tuple(rows), pool_free=self._pool.free)

    # -- internals ----------------------------------------------------------------------
    def _forget(self, session_id: SessionId) -> None:
        """Drop ``session_id`` from the table without returning its address (it may pass to a successor)."""
        self._address.pop(session_id, None)
        self._address6.pop(session_id, None)
        self._pending.discard(session_id)
        peer = self._peer.pop(session_id, None)
        if peer is not None and self._current.get(peer) == session_id:
            del self._current[peer]
