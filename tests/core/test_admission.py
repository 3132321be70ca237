"""Admission: tunnel addresses, replaced sessions and ownership claims, as pure decisions.

Determinism: no clock, no randomness; session ids are built from counters,
and the stateful test draws its call sequences from hypothesis.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jvpn_trio.core.admission import (
    Admissions,
    Admit,
    Claimed,
    OwnershipClaim,
    Refusal,
    Refuse,
    usable_host,
)
from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, OwnershipRecord
from jvpn_trio.core.states import ReasonCode

NODE = "gw-a"
TUNNEL = ipaddress.IPv4Interface("10.66.0.1/29")  # hosts .1-.6; .1 is the gateway
ALICE, BOB, CAROL, DAVE = b"A" * 32, b"B" * 32, b"C" * 32, b"D" * 32


def ip(last: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.66.0.{last}")


_ids = itertools.count(1)


def sid() -> SessionId:
    return SessionId(next(_ids).to_bytes(16, "big"))


def record(session_id: SessionId, *, owner: str = NODE, revision: int = 7) -> OwnershipRecord:
    return OwnershipRecord(session_id=session_id, owner=owner, revision=revision)


def admitted(table: Admissions, peer: bytes) -> Admit:
    decision = table.admit(peer, session_id=sid())
    assert isinstance(decision, Admit), decision
    return decision


def start(table: Admissions, peer: bytes, *, revision: int = 7) -> Claimed:
    """Admit ``peer`` and settle its claim as the store would on success."""
    decision = admitted(table, peer)
    outcome = table.settle_claim(decision.session_id, succeeded=True, record=record(decision.session_id, revision=revision))
    assert isinstance(outcome, Claimed), outcome
    return outcome


def table(fixed: dict[bytes, ipaddress.IPv4Address] | None = None, tunnel: ipaddress.IPv4Interface = TUNNEL) -> Admissions:
    return Admissions(tunnel=tunnel, fixed=fixed or {}, node_id=NODE)


# -- the address pool ----------------------------------------------------------------


def test_pool_hands_out_the_lowest_free_host_skipping_the_gateway() -> None:
    t = table()
    assert [start(t, peer).address for peer in (ALICE, BOB, CAROL)] == [ip(2), ip(3), ip(4)]


def test_a_released_address_is_handed_out_again_lowest_first() -> None:
    t = table()
    a, b, _ = (start(t, peer) for peer in (ALICE, BOB, CAROL))
    t.release(b.session_id)
    t.release(a.session_id)
    assert start(t, DAVE).address == ip(2)
    assert start(t, ALICE).address == ip(3)
    assert start(t, BOB).address == ip(5)


def test_an_exhausted_pool_refuses_and_takes_nothing() -> None:
    t = table()
    peers = [bytes([i]) * 32 for i in range(5)]
    for peer in peers:
        start(t, peer)
    before = t.snapshot()
    assert before.pool_free == 0
    assert t.admit(b"X" * 32, session_id=sid()) == Refuse(reason=Refusal.POOL_EXHAUSTED)
    assert t.snapshot() == before


def test_the_claim_creates_the_record_for_this_node() -> None:
    t = table()
    decision = admitted(t, ALICE)
    assert decision.claim == OwnershipClaim(
        session_id=decision.session_id, owner=NODE, expected_revision=ABSENT_REVISION
    )
    assert decision.replaces is None
    assert ABSENT_REVISION == 0  # MemoryOwnershipStore's "no record yet", as etcd's create_revision 0


@pytest.mark.parametrize(
    "network, pool",
    [
        ("10.0.0.1/30", ["10.0.0.2"]),
        ("10.0.0.0/31", ["10.0.0.1"]),  # both addresses of a /31 are hosts
        ("10.0.0.1/32", []),  # the only host is the gateway's
    ],
)
def test_small_tunnel_networks(network: str, pool: list[str]) -> None:
    t = table(tunnel=ipaddress.IPv4Interface(network))
    assert t.snapshot().pool_free == len(pool)
    got: list[str] = []
    while isinstance(decision := t.admit(bytes([len(got)]) * 32, session_id=sid()), Admit):
        got.append(str(decision.address))
    assert got == pool and decision == Refuse(reason=Refusal.POOL_EXHAUSTED)


def test_a_large_tunnel_network_is_not_listed_up_front() -> None:
    t = table(tunnel=ipaddress.IPv4Interface("10.0.0.1/8"))
    assert t.snapshot().pool_free == 2**24 - 3
    assert start(t, ALICE).address == ipaddress.IPv4Address("10.0.0.2")


# -- configured addresses -------------------------------------------------------------


def test_a_configured_address_goes_to_its_peer_and_is_never_in_the_pool() -> None:
    t = table({BOB: ip(2)})
    assert start(t, ALICE).address == ip(3)
    assert start(t, BOB).address == ip(2)
    assert t.snapshot().pool_free == 3


def test_a_configured_address_is_never_handed_to_another_peer_even_when_the_pool_is_empty() -> None:
    t = table({ALICE: ip(6)})
    for i in range(4):
        assert start(t, bytes([i]) * 32).address != ip(6)
    assert t.admit(BOB, session_id=sid()) == Refuse(reason=Refusal.POOL_EXHAUSTED)
    assert start(t, ALICE).address == ip(6)


def test_a_configured_address_is_not_pooled_after_its_session_ends_or_fails() -> None:
    t = table({ALICE: ip(2)})
    t.release(start(t, ALICE).session_id)
    failed = admitted(t, ALICE)
    assert t.settle_claim(failed.session_id, succeeded=False, record=None) == Refuse(reason=Refusal.CLAIM_FAILED)
    assert [start(t, bytes([i]) * 32).address for i in range(4)] == [ip(3), ip(4), ip(5), ip(6)]


@pytest.mark.parametrize(
    "fixed, problem",
    [
        ({ALICE: ip(1)}, "not a free host"),  # the gateway's own address
        ({ALICE: ip(0)}, "not a free host"),  # the network address
        ({ALICE: ip(7)}, "not a free host"),  # the broadcast address
        ({ALICE: ipaddress.IPv4Address("10.67.0.2")}, "not a free host"),
        ({ALICE: ip(2), BOB: ip(2)}, "two peers"),
    ],
)
def test_unusable_configured_addresses_are_refused(fixed: dict[bytes, ipaddress.IPv4Address], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        table(fixed)


def test_usable_host() -> None:
    assert usable_host(TUNNEL, ip(2)) and usable_host(TUNNEL, ip(6))
    assert not any(usable_host(TUNNEL, ip(n)) for n in (0, 1, 7, 8))


# -- a peer that handshakes again ---------------------------------------------------------


def test_a_new_session_replaces_the_peers_previous_one_and_inherits_its_address() -> None:
    t = table()
    first = start(t, ALICE)
    second = admitted(t, ALICE)
    assert second.replaces == first.session_id
    assert second.address == first.address
    assert t.session_of(ALICE) == second.session_id
    assert t.address_of(first.session_id) is None


def test_repeated_handshakes_cannot_exhaust_the_pool() -> None:
    t = table()
    free = t.snapshot().pool_free
    previous = start(t, ALICE)
    for _ in range(1000):
        current = start(t, ALICE)
        assert current.address == previous.address
        t.release(previous.session_id)  # the driver reaps the replaced session later
        previous = current
    assert t.snapshot().pool_free == free - 1
    assert [start(t, peer).address for peer in (BOB, CAROL)] == [ip(3), ip(4)]


def test_reaping_the_replaced_session_does_not_free_its_successors_address() -> None:
    t = table()
    first = start(t, ALICE)
    second = start(t, ALICE)
    t.release(first.session_id)
    t.release(first.session_id)  # idempotent
    assert t.address_of(second.session_id) == first.address
    assert start(t, BOB).address == ip(3)  # not ALICE's, which her new session still holds


def test_one_admission_per_peer_waits_for_its_claim() -> None:
    t = table()
    pending = admitted(t, ALICE)
    before = t.snapshot()
    assert t.admit(ALICE, session_id=sid()) == Refuse(reason=Refusal.ADMISSION_IN_FLIGHT)
    assert t.snapshot() == before
    assert isinstance(t.admit(BOB, session_id=sid()), Admit)  # other peers are not held up
    t.settle_claim(pending.session_id, succeeded=True, record=record(pending.session_id))
    assert admitted(t, ALICE).replaces == pending.session_id


def test_a_failed_claim_of_a_replacement_hands_the_address_back_to_the_session_it_would_replace() -> None:
    t = table()
    first = start(t, ALICE)
    second = admitted(t, ALICE)
    refused = t.settle_claim(second.session_id, succeeded=False, record=None)
    assert refused == Refuse(reason=Refusal.CLAIM_FAILED, restored=first.session_id)
    assert t.session_of(ALICE) == first.session_id  # a handshake the store refused ends nobody
    assert [(h.session_id, h.address) for h in t.snapshot().holdings] == [(first.session_id, first.address)]
    assert start(t, BOB).address != first.address


def test_a_store_failure_on_a_replacement_restores_the_session_it_would_replace() -> None:
    t = table()
    first = start(t, ALICE)
    second = admitted(t, ALICE)
    refused = t.abandon_claim(second.session_id, ReasonCode.STORE_UNAVAILABLE)
    assert refused == Refuse(reason=Refusal.STORE_UNAVAILABLE, restored=first.session_id)
    again = admitted(t, ALICE)  # the restored session is replaceable as before
    assert again.replaces == first.session_id and again.address == first.address


def test_a_replaced_session_that_ended_meanwhile_is_not_restored() -> None:
    t = table()
    first = start(t, ALICE)
    second = admitted(t, ALICE)
    t.release(first.session_id)  # it ended while its successor's claim was out
    assert t.settle_claim(second.session_id, succeeded=False, record=None) == Refuse(reason=Refusal.CLAIM_FAILED)
    assert t.session_of(ALICE) is None and t.snapshot().holdings == ()
    assert start(t, BOB).address == first.address


def test_a_replacement_a_reload_revoked_restores_nothing() -> None:
    t = table()
    start(t, ALICE)
    second = admitted(t, ALICE)
    assert t.reconfigure(peers=[BOB], fixed={}) == (second.session_id,)
    assert t.settle_claim(second.session_id, succeeded=True, record=record(second.session_id)) == Refuse(
        reason=Refusal.PEER_REMOVED
    )
    assert t.snapshot().holdings == ()


# -- the ownership claim ---------------------------------------------------------------------


def test_a_successful_claim_starts_the_session_at_the_records_revision() -> None:
    t = table()
    decision = admitted(t, ALICE)
    outcome = t.settle_claim(decision.session_id, succeeded=True, record=record(decision.session_id, revision=42))
    assert outcome == Claimed(session_id=decision.session_id, address=ip(2), held_revision=42)
    assert t.snapshot().holdings[0].pending is False


@pytest.mark.parametrize(
    "succeeded, owner, other_session",
    [
        (False, NODE, False),  # the CAS lost
        (True, "gw-b", False),  # "succeeded", but the record names another node
        (True, NODE, True),  # "succeeded", but for another session
    ],
)
def test_a_claim_that_does_not_prove_ownership_fails(succeeded: bool, owner: str, other_session: bool) -> None:
    t = table()
    decision = admitted(t, ALICE)
    shown = record(sid() if other_session else decision.session_id, owner=owner)
    assert t.settle_claim(decision.session_id, succeeded=succeeded, record=shown) == Refuse(reason=Refusal.CLAIM_FAILED)
    assert t.snapshot().holdings == () and t.session_of(ALICE) is None
    assert start(t, BOB).address == ip(2)


def test_a_claim_without_a_record_fails() -> None:
    t = table()
    decision = admitted(t, ALICE)
    assert t.settle_claim(decision.session_id, succeeded=True, record=None) == Refuse(reason=Refusal.CLAIM_FAILED)


def test_settling_a_claim_that_is_not_outstanding_is_a_bug() -> None:
    t = table()
    claimed = start(t, ALICE)
    with pytest.raises(ValueError, match="no claim outstanding"):
        t.settle_claim(claimed.session_id, succeeded=True, record=record(claimed.session_id))
    with pytest.raises(ValueError, match="no claim outstanding"):
        t.settle_claim(sid(), succeeded=True, record=None)


def test_a_session_id_already_in_the_table_is_a_bug() -> None:
    t = table()
    claimed = start(t, ALICE)
    with pytest.raises(ValueError, match="already admitted"):
        t.admit(BOB, session_id=claimed.session_id)


def test_releasing_a_pending_admission_abandons_it() -> None:
    t = table()
    decision = admitted(t, ALICE)
    t.release(decision.session_id)
    assert t.session_of(ALICE) is None and t.snapshot().pool_free == 5
    with pytest.raises(ValueError):
        t.settle_claim(decision.session_id, succeeded=True, record=record(decision.session_id))


def test_the_same_calls_give_the_same_decisions() -> None:
    def run() -> list[object]:
        t = table({CAROL: ip(6)})
        ids = (SessionId(bytes([n]) * 16) for n in range(1, 100))
        out: list[object] = []
        for peer in (ALICE, BOB, ALICE, CAROL, DAVE, ALICE):
            decision = t.admit(peer, session_id=next(ids))
            out.append(decision)
            if isinstance(decision, Admit):
                out.append(t.settle_claim(decision.session_id, succeeded=True, record=record(decision.session_id)))
        out.append(t.snapshot())
        return out

    assert run() == run()


# -- any order of calls -----------------------------------------------------------------------

PEERS = [bytes([i]) * 32 for i in range(8)]  # more peers than pool addresses
FIXED = {PEERS[0]: ip(5), PEERS[1]: ip(6)}  # the pool is .2-.4


class AdmissionMachine(RuleBasedStateMachine):
    """Random admits, claim outcomes, releases and reloads; the invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.table = table(dict(FIXED))
        self.fixed = dict(FIXED)
        self.fixed6: dict[bytes, ipaddress.IPv6Address] = {}
        self.peers = set(PEERS)
        self.hosts = 5  # .2-.6
        self.counter = itertools.count(1)
        self.pending: list[SessionId] = []
        self.revoked: list[SessionId] = []
        self.known: list[SessionId] = []  # every id ever admitted, including replaced and ended ones
        self.replacing: dict[SessionId, SessionId] = {}  # pending admission -> the live session it replaces

    @property
    def pool_size(self) -> int:
        """Hosts minus the configured addresses and the twins of configured IPv6 ones."""
        twins = {TUNNEL.network[int(a) - int(TUNNEL6.network.network_address)] for a in self.fixed6.values()}
        return self.hosts - len(set(self.fixed.values()) | twins)

    def fixed6_after(self, kept: set[bytes], fixed: dict[bytes, ipaddress.IPv4Address]) -> dict[bytes, ipaddress.IPv6Address] | None:
        """The configured IPv6 addresses after a reload; None if the config layer would refuse it."""
        return {}

    @rule(peer=st.sampled_from(PEERS))
    def admit(self, peer: bytes) -> None:
        if peer not in self.peers:  # the driver refuses an unknown key before it asks for admission
            return
        current = self.table.session_of(peer)
        held_elsewhere = {h.address for h in self.table.snapshot().holdings if h.peer != peer}
        twins = {TUNNEL.network[int(a) - int(TUNNEL6.network.network_address)] for a in self.fixed6.values()}
        unavailable = held_elsewhere | set(self.fixed.values()) | twins
        lowest_free = min((ip(n) for n in range(2, 7) if ip(n) not in unavailable), default=None)
        new = SessionId(next(self.counter).to_bytes(16, "big"))
        decision = self.table.admit(peer, session_id=new)
        if isinstance(decision, Refuse):
            if decision.reason is Refusal.POOL_EXHAUSTED:
                assert current is None and peer not in self.fixed
                assert self.table.snapshot().pool_free == 0
            else:
                assert decision.reason is Refusal.ADMISSION_IN_FLIGHT and current in self.pending
            return
        assert decision.address not in held_elsewhere
        assert decision.replaces == current
        if peer in self.fixed:
            assert decision.address == self.fixed[peer]
        elif current is None:
            assert decision.address == lowest_free, "the pool did not hand out its lowest free address"
        self.pending.append(new)
        self.known.append(new)
        if current is not None:
            self.replacing[new] = current

    @rule(
        kept=st.sets(st.sampled_from(PEERS), min_size=1),
        addresses=st.lists(st.sampled_from([ip(n) for n in range(2, 7)]), unique=True, max_size=3),
    )
    def reload(self, kept: set[bytes], addresses: list[ipaddress.IPv4Address]) -> None:
        """A new peer set and new configured addresses: what must end is gone at once, the rest stays."""
        before = {h.session_id: h for h in self.table.snapshot().holdings}
        fixed = dict(zip(sorted(kept), addresses))
        fixed6 = self.fixed6_after(kept, fixed)
        if fixed6 is None:
            return
        ending = self.table.reconfigure(peers=kept, fixed=fixed, fixed6=fixed6)
        for session_id, held in before.items():
            stays = (
                held.peer in kept
                and self.fixed.get(held.peer) == fixed.get(held.peer)
                and self.fixed6.get(held.peer) == fixed6.get(held.peer)
                and (held.address not in fixed.values() or fixed.get(held.peer) == held.address)
                and (held.address6 not in fixed6.values() or fixed6.get(held.peer) == held.address6)
            )
            assert (session_id not in ending) == stays
            assert (self.table.address_of(session_id) == held.address) == stays
        for session_id in ending:
            if session_id in self.pending:
                self.pending.remove(session_id)
                self.revoked.append(session_id)
        self.fixed, self.fixed6, self.peers = fixed, fixed6, kept

    @precondition(lambda self: self.revoked)
    @rule(data=st.data())
    def settle_revoked(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(self.revoked))
        self.revoked.remove(session_id)
        self.replacing.pop(session_id, None)
        assert self.table.settle_claim(session_id, succeeded=True, record=record(session_id)) == Refuse(
            reason=Refusal.PEER_REMOVED
        )

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def settle(self, data: st.DataObject, ok: bool) -> None:
        session_id = data.draw(st.sampled_from(self.pending))
        self.pending.remove(session_id)
        address = self.table.address_of(session_id)
        assert address is not None
        address6 = self.table.address6_of(session_id)
        replaced = self.replacing.pop(session_id, None)
        outcome = self.table.settle_claim(session_id, succeeded=ok, record=record(session_id) if ok else None)
        if ok:
            assert outcome == Claimed(session_id=session_id, address=address, held_revision=7, address6=address6)
        else:
            assert outcome == Refuse(reason=Refusal.CLAIM_FAILED, restored=replaced)
            if replaced is not None:  # the session it would have replaced goes on with the same addresses
                assert self.table.address_of(replaced) == address and self.table.address6_of(replaced) == address6

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(self.known))
        self.table.release(session_id)
        if session_id in self.pending:
            self.pending.remove(session_id)
        self.replacing.pop(session_id, None)
        for pending, replaced in list(self.replacing.items()):
            if replaced == session_id:  # ended while its successor's claim was out: nothing to restore
                del self.replacing[pending]

    @invariant()
    def addresses_are_exclusive_and_conserved(self) -> None:
        snap = self.table.snapshot()
        addresses = [h.address for h in snap.holdings]
        assert len(addresses) == len(set(addresses)), "two sessions hold one address"
        peers = [h.peer for h in snap.holdings]
        assert len(peers) == len(set(peers)), "a peer holds two addresses"
        for h in snap.holdings:
            if h.address in self.fixed.values():
                assert self.fixed.get(h.peer) == h.address, "a configured address went to another peer"
            assert h.peer in self.peers, "a removed peer still holds an address"
            assert usable_host(TUNNEL, h.address)
            assert self.table.session_of(h.peer) == h.session_id
            assert h.pending == (h.session_id in self.pending)
        pooled = sum(1 for a in addresses if a not in self.fixed.values())
        assert pooled + snap.pool_free == self.pool_size, "an address leaked from the pool"


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- IPv6: each session's address pair -------------------------------------------------

TUNNEL6 = ipaddress.IPv6Interface("fd6a:7670::1/64")


def ip6(host: int) -> ipaddress.IPv6Address:
    return TUNNEL6.network[host]


def table6(
    fixed: dict[bytes, ipaddress.IPv4Address] | None = None,
    fixed6: dict[bytes, ipaddress.IPv6Address] | None = None,
    tunnel6: ipaddress.IPv6Interface = TUNNEL6,
) -> Admissions:
    return Admissions(tunnel=TUNNEL, fixed=fixed or {}, node_id=NODE, tunnel6=tunnel6, fixed6=fixed6)


def test_without_an_ipv6_tunnel_a_session_has_no_ipv6_address() -> None:
    t = table()
    decision = admitted(t, ALICE)
    assert decision.address6 is None and t.address6_of(decision.session_id) is None


def test_admission_gives_the_ipv6_twin_with_the_ipv4_address() -> None:
    t = table6()
    decision = admitted(t, ALICE)
    assert (decision.address, decision.address6) == (ip(2), ip6(2))
    claimed = t.settle_claim(decision.session_id, succeeded=True, record=record(decision.session_id))
    assert isinstance(claimed, Claimed) and (claimed.address, claimed.address6) == (ip(2), ip6(2))
    assert [(h.address, h.address6) for h in t.snapshot().holdings] == [(ip(2), ip6(2))]


def test_a_configured_ipv6_address_wins_over_the_twin() -> None:
    t = table6(fixed={ALICE: ip(5)}, fixed6={ALICE: ip6(0x99)})
    assert (start(t, ALICE).address, start(t, ALICE).address6) == (ip(5), ip6(0x99))


def test_the_pair_passes_to_the_session_that_replaces_and_is_freed_together() -> None:
    t = table6()
    first = start(t, ALICE)
    again = start(t, ALICE)  # replaces the first: same pair
    assert (again.address, again.address6) == (first.address, first.address6) == (ip(2), ip6(2))
    t.release(again.session_id)
    assert t.address6_of(again.session_id) is None
    bob = start(t, BOB)
    assert (bob.address, bob.address6) == (ip(2), ip6(2))


def test_the_pool_skips_an_address_whose_twin_another_peer_holds() -> None:
    # Carol's configured IPv6 is the twin of .2 and the gateway's ::3 the twin of .3: Alice gets .4.
    t = table6(fixed6={CAROL: ip6(2)}, tunnel6=ipaddress.IPv6Interface("fd6a:7670::3/64"))
    alice = start(t, ALICE)
    assert (alice.address, alice.address6) == (ip(4), ip6(4))
    carol = start(t, CAROL)
    assert (carol.address, carol.address6) == (ip(5), ip6(2))
    assert t.snapshot().pool_free == 1  # .6 (.2 and .3 are out of the pool, .4 and .5 held)


def test_a_twin_outside_a_small_ipv6_network_means_no_ipv6() -> None:
    t = table6(tunnel6=ipaddress.IPv6Interface("fd6a:7670::1/126"))  # hosts ::1..::3
    assert [start(t, p).address6 for p in (ALICE, BOB, CAROL)] == [ip6(2), ip6(3), None]


@pytest.mark.parametrize(
    ("fixed6", "tunnel6", "message"),
    [
        ({ALICE: ipaddress.IPv6Address("fd00::2")}, TUNNEL6, "is not a free host address"),
        ({ALICE: TUNNEL6.ip}, TUNNEL6, "is not a free host address"),
        ({ALICE: ip6(0)}, TUNNEL6, "is not a free host address"),
        ({ALICE: ip6(7), BOB: ip6(7)}, TUNNEL6, "configured for two peers"),
    ],
)
def test_bad_configured_ipv6_addresses_are_refused(
    fixed6: dict[bytes, ipaddress.IPv6Address], tunnel6: ipaddress.IPv6Interface, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        table6(fixed6=fixed6, tunnel6=tunnel6)
    with pytest.raises(ValueError, match="need an IPv6 tunnel address"):
        Admissions(tunnel=TUNNEL, fixed={}, node_id=NODE, fixed6={ALICE: ip6(7)})


FIXED6 = {PEERS[2]: ip6(3)}  # the twin of .3, so .3 leaves the pool


class AdmissionMachine6(AdmissionMachine):
    """The same random calls with an IPv6 tunnel: IPv6 addresses are exclusive too, and come in pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.table = table6(dict(FIXED), dict(FIXED6))
        self.fixed6 = dict(FIXED6)

    def fixed6_after(self, kept: set[bytes], fixed: dict[bytes, ipaddress.IPv4Address]) -> dict[bytes, ipaddress.IPv6Address] | None:
        fixed6 = {peer: address6 for peer, address6 in FIXED6.items() if peer in kept}
        twins = {ip6(int(a) - int(TUNNEL.network.network_address)): p for p, a in fixed.items() if p not in fixed6}
        if any(twins.get(a6, p) != p for p, a6 in fixed6.items()):
            return None  # another peer's configured IPv4 twins onto a configured IPv6: config.py refuses it
        return fixed6

    @invariant()
    def ipv6_addresses_are_exclusive_and_paired(self) -> None:
        holdings = self.table.snapshot().holdings
        addresses6 = [h.address6 for h in holdings]
        assert None not in addresses6, "a session without its IPv6 address"
        assert len(addresses6) == len(set(addresses6)), "two sessions hold one IPv6 address"
        for h in holdings:
            expected = self.fixed6.get(h.peer, ip6(int(h.address) - int(TUNNEL.network.network_address)))
            assert h.address6 == expected, "an IPv6 address that is neither configured nor the twin"
            assert h.address6 != TUNNEL6.ip


TestAdmissionMachine6 = AdmissionMachine6.TestCase
TestAdmissionMachine6.settings = TestAdmissionMachine.settings
