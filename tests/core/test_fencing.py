"""The fencing epoch on the client (docs/cluster.md, docs/wire-format.md "REATTACH_ACK").

The gateway sends the ownership store revision it holds for a session (its
``held_revision``) as ``owner_epoch`` in HANDSHAKE_RESP and every REATTACH_ACK.
The client keeps the highest epoch it has seen and refuses an ack below it with
a SECURITY_EVENT ``STALE_EPOCH`` that changes nothing: a gateway that lost the
session to another node may still hold its keys, and must not move the client.

Determinism: no clock, no randomness but a fixed byte stream for the handshake
keys; every ``now`` is a literal.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvpn_trio.core import events as ev
from jvpn_trio.core import wire
from jvpn_trio.core.actions import (
    Action,
    EmitEvent,
    EventKind,
    SendReattach,
    SendReattachAck,
)
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.keyring import KeyRing
from jvpn_trio.core.noise import (
    HandshakeResult,
    InitiatorHandshake,
    PeerRecord,
    ResponderHandshake,
    StaticKeypair,
    clamp_private,
)
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.session import ClientSession, PendingReattach
from jvpn_trio.core.states import ReasonCode as R
from jvpn_trio.core.states import SessionState as S
from tests.pair import (
    PATHS,
    SID,
    gateway_endpoint,
    genuine_reattach,
    lone_gateway,
    valid_reattach,
)

P1, P2 = PathId(1), PathId(2)
#: The epoch the client learnt from its handshake.
HANDSHAKE_EPOCH = 5


def epoch_client(*, epoch: int = HANDSHAKE_EPOCH, policy: Policy | None = None) -> ClientSession:
    """A client with p1 and p2, attached on p1 by a handshake whose response carried ``epoch``."""
    client = ClientSession(policy=policy or Policy(), session_id=SID, now=0.0)
    for p, priority in PATHS[:2]:
        path = PathId(p)
        client.handle(ev.PathAdded(path=path, priority=priority, endpoint=gateway_endpoint(path)), now=0.0)
    binding = Binding(path=P1, endpoint=gateway_endpoint(P1))
    client.handle(ev.HandshakeCompleted(session_id=SID, binding=binding, gateway_version=1, owner_epoch=epoch), now=0.0)
    return client


def ask_to_reattach(client: ClientSession, now: float) -> SendReattach:
    """Make ``client`` send a REATTACH on p1 (its active path got a new address)."""
    (send,) = [a for a in client.handle(ev.PathReaddressed(path=P1), now=now) if isinstance(a, SendReattach)]
    return send


def ack(send: SendReattach | PendingReattach, *, epoch: int, new_version: int = 2) -> ev.ReattachAcked:
    return ev.ReattachAcked(path=send.path, nonce=send.nonce, new_version=new_version, owner_epoch=epoch)


def security_events(actions: list[Action]) -> list[EmitEvent]:
    return [a for a in actions if isinstance(a, EmitEvent) and a.kind is EventKind.SECURITY_EVENT]


def test_the_handshake_epoch_is_remembered_and_shown() -> None:
    client = epoch_client()
    assert client.owner_epoch == HANDSHAKE_EPOCH
    assert client.snapshot(now=0.0).owner_epoch == HANDSHAKE_EPOCH


def test_an_ack_with_a_lower_epoch_is_refused_and_changes_nothing() -> None:
    client = epoch_client()
    send = ask_to_reattach(client, now=0.3)
    record, version, pending = client.record, client.gateway_version, client.pending
    actions = client.handle(ack(send, epoch=HANDSHAKE_EPOCH - 1), now=0.31)
    (event,) = security_events(actions)
    assert event.reason is R.STALE_EPOCH
    assert (event.detail("owner_epoch"), event.detail("highest_epoch"), event.detail("nonce")) == (
        HANDSHAKE_EPOCH - 1,
        HANDSHAKE_EPOCH,
        send.nonce,
    )
    assert all(isinstance(a, EmitEvent) for a in actions)  # no binding, no send
    assert client.record == record and client.record.version == 1
    assert client.gateway_version == version and client.pending == pending
    assert client.owner_epoch == HANDSHAKE_EPOCH
    assert client.counters["stale_epoch_acks"] == 1
    # The REATTACH is still pending: the genuine owner's ack confirms it.
    confirmed = client.handle(ack(send, epoch=HANDSHAKE_EPOCH), now=0.32)
    assert not security_events(confirmed)
    assert client.record.version == 2 and client.record.state is S.ATTACHED


def test_an_ack_with_the_same_epoch_is_accepted() -> None:
    client = epoch_client()
    send = ask_to_reattach(client, now=0.3)
    actions = client.handle(ack(send, epoch=HANDSHAKE_EPOCH), now=0.31)
    assert not security_events(actions)
    assert [a.reason for a in actions if isinstance(a, EmitEvent) and a.kind is EventKind.STATE_CHANGE] == [
        R.REATTACH_CONFIRMED
    ]
    assert client.record.version == 2 and client.pending is None
    assert client.owner_epoch == HANDSHAKE_EPOCH


def test_a_higher_epoch_is_accepted_and_raises_the_fence() -> None:
    client = epoch_client()
    first = ask_to_reattach(client, now=0.3)
    client.handle(ack(first, epoch=HANDSHAKE_EPOCH + 4), now=0.31)  # another node took the session over
    assert client.record.version == 2 and client.owner_epoch == HANDSHAKE_EPOCH + 4
    assert client.snapshot(now=0.31).owner_epoch == HANDSHAKE_EPOCH + 4
    # The handshake's epoch is stale now.
    second = ask_to_reattach(client, now=0.5)
    refused = client.handle(ack(second, epoch=HANDSHAKE_EPOCH, new_version=3), now=0.51)
    assert [e.reason for e in security_events(refused)] == [R.STALE_EPOCH]
    assert client.record.version == 2 and client.pending is not None


def test_a_stray_ack_with_a_higher_epoch_raises_nothing() -> None:
    # Only an ack that confirms our own REATTACH is accepted, so only such an ack moves the fence.
    client = epoch_client()
    client.handle(ev.ReattachAcked(path=P1, nonce=99, new_version=7, owner_epoch=HANDSHAKE_EPOCH + 1), now=0.1)
    assert client.owner_epoch == HANDSHAKE_EPOCH and client.counters["stray_reattach_answers"] == 1


def test_a_handshake_without_an_epoch_starts_the_fence_at_zero() -> None:
    # A trace recorded before protocol version 4 carries no epoch: 0, which any ack matches.
    client = ClientSession(policy=Policy(), session_id=SID, now=0.0)
    client.handle(ev.PathAdded(path=P1, priority=10, endpoint=gateway_endpoint(P1)), now=0.0)
    binding = Binding(path=P1, endpoint=gateway_endpoint(P1))
    client.handle(ev.HandshakeCompleted(session_id=SID, binding=binding, gateway_version=1), now=0.0)
    assert client.owner_epoch == 0
    send = ask_to_reattach(client, now=0.3)
    client.handle(ev.ReattachAcked(path=send.path, nonce=send.nonce, new_version=2), now=0.31)
    assert client.record.version == 2


@pytest.mark.parametrize("held", [1, 42, wire.U64_MAX])
def test_the_gateway_acks_with_the_revision_it_holds(held: int) -> None:
    gw = lone_gateway(held_revision=held)
    actions = genuine_reattach(gw, valid_reattach(gw, path=P2, now=0.5), now=0.5)
    (answer,) = [a for a in actions if isinstance(a, SendReattachAck)]
    assert answer.owner_epoch == held == gw.held_revision


# ---------------------------------------------------------------------------
# The holder of a valid key: a stale owner that still has the session's keys
# ---------------------------------------------------------------------------

CLIENT_STATIC = StaticKeypair(clamp_private(bytes(range(1, 33))))
GATEWAY_STATIC = StaticKeypair(clamp_private(bytes(range(101, 133))))


def _stream(seed: bytes) -> Callable[[int], bytes]:
    """Reproducible ``random_bytes``: each call returns SHA-256(seed || call number), cut to ``n`` (n <= 32)."""
    calls = iter(range(1 << 30))
    return lambda n: hashlib.sha256(seed + next(calls).to_bytes(4, "big")).digest()[:n]


def handshake(*, epoch: int, seed: bytes, index: int, rekey: SessionId | None = None, version: int = 0) -> tuple[
    HandshakeResult, HandshakeResult
]:
    """A full handshake answered at ``epoch``: (client's result, gateway's result)."""
    state, init = InitiatorHandshake.create(
        CLIENT_STATIC, GATEWAY_STATIC.public, sender_index=index, random_bytes=_stream(seed + b"i"),
        wall_time_ns=1_700_000_000_000_000_000 + index, path_id=P1, rekey_session=rekey, state_version=version,
    )  # fmt: skip
    responder = ResponderHandshake.consume_init(
        init, GATEWAY_STATIC, lookup_peer={CLIENT_STATIC.public: PeerRecord(public=CLIENT_STATIC.public)}.get
    )
    resp, gateway = responder.respond(
        session_id=SID, state_version=1 if rekey is None else version, owner_epoch=epoch,
        tunnel_ipv4=ipaddress.IPv4Address("10.77.0.2"), prefix_len=24, sender_index=index + 1,
        random_bytes=_stream(seed + b"r"),
    )  # fmt: skip
    return state.consume_response(resp), gateway


def carry(sender: KeyRing, receiver: KeyRing, msg: wire.InnerMessage, *, now: float) -> wire.InnerMessage:
    """Seal ``msg`` with ``sender``'s current keys, and open and decode it as the receiver's driver does."""
    msg_type, plaintext = wire.encode_plaintext(msg)
    datagram = wire.encode(sender.seal_frame(msg_type, plaintext))
    frame = wire.decode_transport_untrusted(datagram)
    opened, _ = receiver.open_frame(frame, now=now)
    return wire.decode_plaintext_untrusted(frame.header.msg_type, opened)


def client_input(msg: wire.InnerMessage, path: PathId) -> ev.ReattachAcked:
    """What drivers/client.py makes of an authenticated REATTACH_ACK."""
    assert isinstance(msg, wire.ReattachAck)
    return ev.ReattachAcked(path=path, nonce=msg.nonce, new_version=msg.new_version, owner_epoch=msg.owner_epoch)


def test_a_stale_owner_holding_valid_keys_cannot_ack_a_reattach() -> None:
    policy = Policy()
    # Gateway A serves the session at epoch 3; the client learns 3 from the response.
    client_keys, old_keys = KeyRing(policy), KeyRing(policy)
    first_client, first_gateway = handshake(epoch=3, seed=b"a", index=10)
    assert first_client.owner_epoch == 3
    client_keys.install_current(first_client.keypair(created_at=0.0))
    old_keys.install_next(first_gateway.keypair(created_at=0.0))
    carry(client_keys, old_keys, wire.Data(b""), now=0.0)  # the first packet confirms A's keys
    client = epoch_client(epoch=first_client.owner_epoch, policy=policy)

    # Gateway B takes the session over at epoch 7: a resume handshake with new keys. A keeps the old ones.
    rekey_client, rekey_gateway = handshake(epoch=7, seed=b"b", index=20, rekey=SID, version=client.record.version)
    new_keys = KeyRing(policy)
    client_keys.install_current(rekey_client.keypair(created_at=1.0))  # A's keys stay "previous", still accepted
    new_keys.install_next(rekey_gateway.keypair(created_at=1.0))
    carry(client_keys, new_keys, wire.Data(b""), now=1.0)
    first = ask_to_reattach(client, now=1.1)
    b_ack = wire.ReattachAck(session_id=SID, nonce=first.nonce, new_version=2, path_id=P1, owner_epoch=7)
    client.handle(client_input(carry(new_keys, client_keys, b_ack, now=1.2), P1), now=1.2)
    assert client.owner_epoch == 7 and client.record.version == 2

    # A, the stale owner, answers the client's next REATTACH with a frame that authenticates.
    second = ask_to_reattach(client, now=2.0)
    forged = wire.ReattachAck(session_id=SID, nonce=second.nonce, new_version=9, path_id=P1, owner_epoch=3)
    received = carry(old_keys, client_keys, forged, now=2.1)  # the AEAD alone cannot tell
    record, pending = client.record, client.pending
    actions = client.handle(client_input(received, P1), now=2.1)
    assert [e.reason for e in security_events(actions)] == [R.STALE_EPOCH]
    assert client.record == record and client.pending == pending and client.gateway_version == 2
    assert client.owner_epoch == 7
    # B's genuine answer still confirms the move.
    genuine = wire.ReattachAck(session_id=SID, nonce=second.nonce, new_version=3, path_id=P1, owner_epoch=7)
    client.handle(client_input(carry(new_keys, client_keys, genuine, now=2.2), P1), now=2.2)
    assert client.record.version == 3 and client.pending is None


@settings(max_examples=50, deadline=None)
@given(epochs=st.lists(st.integers(0, 12), min_size=1, max_size=10))
def test_the_fence_only_rises_and_a_refused_ack_changes_nothing(epochs: list[int]) -> None:
    client = epoch_client(policy=Policy(max_switches_per_minute=60))
    highest, now = HANDSHAKE_EPOCH, 0.3
    for epoch in epochs:
        pending = client.pending
        send = ask_to_reattach(client, now=now) if pending is None else pending
        record = client.record
        actions = client.handle(ack(send, epoch=epoch, new_version=record.version + 1), now=now + 0.01)
        if epoch < highest:
            assert [e.reason for e in security_events(actions)] == [R.STALE_EPOCH]
            assert client.record == record and client.pending is not None
        else:
            assert not security_events(actions) and client.record.version == record.version + 1
            highest = epoch
        assert client.owner_epoch == highest
        now += 0.2
