"""The etcd store's tickets and takeover transaction as JSON, without etcd (docs/cluster.md, "Takeover")."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pytest

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import SessionTicket, peer_fingerprint
from jvpn_trio.drivers.store_etcd import (
    DEFAULT_PREFIX,
    BadReply,
    claim_txn_request,
    decode_succeeded_untrusted,
    decode_ticket_range_untrusted,
    decode_ticket_untrusted,
    decode_txn_reply_untrusted,
    encode_ticket,
    forget_ticket_txn_request,
    session_key,
    takeover_txn_request,
    ticket_key,
    with_ticket,
)

S = SessionId(bytes(range(16)))
PEER = peer_fingerprint(b"P" * 32)
TICKET = SessionTicket(
    peer=PEER,
    session_id=S,
    owner="gw-a",
    address=ipaddress.IPv4Address("10.66.0.2"),
    address6=ipaddress.IPv6Address("fd6a:7670::2"),
    revision=41,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_ticket_key_lives_beside_the_session_keys_and_never_collides() -> None:
    key = ticket_key(DEFAULT_PREFIX, PEER)
    assert key == f"{DEFAULT_PREFIX}peer/{PEER}".encode()
    assert key != session_key(DEFAULT_PREFIX, S)  # session keys are bare hex: no slash


def test_a_ticket_round_trips_with_its_revision_from_the_key() -> None:
    value = encode_ticket(TICKET)
    assert "revision" not in json.loads(value) and PEER not in value.decode()  # both come from the key
    assert decode_ticket_untrusted(value, peer=PEER, revision=41) == TICKET
    without6 = SessionTicket(peer=PEER, session_id=S, owner="gw-b", address=TICKET.address, revision=7)
    assert decode_ticket_untrusted(encode_ticket(without6), peer=PEER, revision=7) == without6


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[]",
        b'{"v": 2, "session": "00", "owner": "a", "address": "10.0.0.1"}',
        b'{"v": 1, "owner": "a", "address": "10.0.0.1"}',
        b'{"v": 1, "session": "zz", "owner": "a", "address": "10.0.0.1"}',
        b'{"v": 1, "session": "000102030405060708090a0b0c0d0e0f", "owner": "", "address": "10.0.0.1"}',
        b'{"v": 1, "session": "000102030405060708090a0b0c0d0e0f", "owner": "a", "address": "300.0.0.1"}',
        b'{"v": 1, "session": "000102030405060708090a0b0c0d0e0f", "owner": "a", "address": "10.0.0.1", "address6": 5}',
        b'[' * 100000,
    ],
)
def test_a_foreign_ticket_is_a_bad_reply(value: bytes) -> None:
    with pytest.raises(BadReply):
        decode_ticket_untrusted(value, peer=PEER, revision=1)


def test_a_claim_with_a_ticket_puts_both_and_only_the_record_under_the_lease() -> None:
    key = session_key(DEFAULT_PREFIX, S)
    body = with_ticket(claim_txn_request(key, expected_revision=0, value=b"v", lease_id=9), ticket_key(DEFAULT_PREFIX, PEER), b"t")
    puts = [op["request_put"] for op in body["success"]]
    assert [p["key"] for p in puts] == [b64(key), b64(ticket_key(DEFAULT_PREFIX, PEER))]
    assert puts[0]["lease"] == "9" and "lease" not in puts[1]  # the ticket outlives the owner
    assert body["failure"] == [{"request_range": {"key": b64(key)}}]


def test_a_takeover_compares_no_record_and_the_unchanged_ticket() -> None:
    key, tkey = session_key(DEFAULT_PREFIX, S), ticket_key(DEFAULT_PREFIX, PEER)
    body = takeover_txn_request(key, ticket_key_=tkey, ticket_revision=41, value=b"v", ticket_value=b"t", lease_id=9)
    assert body["compare"] == [
        {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"},
        {"target": "MOD", "key": b64(tkey), "result": "EQUAL", "mod_revision": "41"},
    ]
    assert body["success"][0]["request_put"]["lease"] == "9" and "lease" not in body["success"][1]["request_put"]


def test_a_won_txn_may_answer_with_several_puts_a_lost_one_with_its_read() -> None:
    key = session_key(DEFAULT_PREFIX, S)
    won: dict[str, Any] = {"header": {"revision": "50"}, "succeeded": True, "responses": [{"response_put": {}}] * 2}
    assert decode_txn_reply_untrusted(won, key, S).succeeded
    lost: dict[str, Any] = {"header": {"revision": "50"}, "responses": [{"response_range": {}}, {"response_range": {}}]}
    with pytest.raises(BadReply):
        decode_txn_reply_untrusted(lost, key, S)
    mixed: dict[str, Any] = {"header": {"revision": "50"}, "succeeded": True, "responses": [{"response_range": {}}]}
    with pytest.raises(BadReply):
        decode_txn_reply_untrusted(mixed, key, S)


def test_a_ticket_read_and_the_forget_txn() -> None:
    tkey = ticket_key(DEFAULT_PREFIX, PEER)
    assert decode_ticket_range_untrusted({"header": {}}, tkey, PEER) is None
    kv = {"key": b64(tkey), "value": b64(encode_ticket(TICKET)), "mod_revision": "41"}
    assert decode_ticket_range_untrusted({"kvs": [kv]}, tkey, PEER) == TICKET
    with pytest.raises(BadReply):
        decode_ticket_range_untrusted({"kvs": [{**kv, "key": b64(b"other")}]}, tkey, PEER)
    body = forget_ticket_txn_request(tkey, expected_revision=41)
    assert body["compare"][0]["mod_revision"] == "41" and "failure" not in body
    assert decode_succeeded_untrusted({"succeeded": True}) and not decode_succeeded_untrusted({})
    with pytest.raises(BadReply):
        decode_succeeded_untrusted({"succeeded": "yes"})
