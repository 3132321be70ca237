"""The etcd store without etcd: JSON requests and replies, outcome decisions, fail-closed I/O.

Determinism rules: no sockets and no etcd.  The pure functions take and return plain values;
the I/O tests put an ``httpx.MockTransport`` (a scripted etcd: replies by path, in order)
under :class:`EtcdClient`, and the keepalive test runs on ``autojump_clock``, so every
instant it asserts is exact virtual time.  Reply shapes are copied from etcd 3.4.23.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import ABSENT_REVISION, OwnershipRecord
from jvpn_trio.core.ownership import lease_ttl_s as ttl_seconds
from jvpn_trio.drivers.store_etcd import (
    DEFAULT_PREFIX,
    BadReply,
    EtcdClient,
    EtcdOwnershipStore,
    EtcdRecord,
    LeaseState,
    Resolution,
    StoreAmbiguous,
    StoredValue,
    StoreUnavailable,
    TxnOutcome,
    claim_result,
    claim_txn_request,
    decode_grant_reply_untrusted,
    decode_keepalive_reply_untrusted,
    decode_range_reply_untrusted,
    decode_timetolive_reply_untrusted,
    decode_txn_reply_untrusted,
    error_reason,
    lease_valid_until,
    may_release,
    parse_json_untrusted,
    range_request,
    release_result,
    release_txn_request,
    resolve_attempt,
    session_key,
)
from jvpn_trio.drivers.store_memory import CasResult, OwnershipStore

SID = SessionId(bytes(range(16)))
KEY = session_key(DEFAULT_PREFIX, SID)
LEASE = 4111120392082531846
HEADER = {"cluster_id": "15118495548433857066", "member_id": "13668033151171901709", "raft_term": "2"}
ENDPOINT = "http://etcd.test:2379"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kv(owner: str, attempt: str, revision: int, *, key: bytes = KEY) -> dict[str, Any]:
    value = StoredValue(owner=owner, attempt=attempt).to_bytes()
    return {"key": b64(key), "create_revision": str(revision), "mod_revision": str(revision), "version": "1",
            "value": b64(value), "lease": str(LEASE)}  # fmt: skip


def rec(owner: str, revision: int) -> OwnershipRecord:
    return OwnershipRecord(session_id=SID, owner=owner, revision=revision)


def etcd_rec(owner: str, attempt: str, revision: int) -> EtcdRecord:
    return EtcdRecord(record=rec(owner, revision), attempt=attempt, lease_id=LEASE)


def txn_won(revision: int) -> dict[str, Any]:
    return {"header": {**HEADER, "revision": str(revision)}, "succeeded": True,
            "responses": [{"response_put": {"header": {"revision": str(revision)}}}]}  # fmt: skip


def txn_lost(revision: int, *kvs: dict[str, Any]) -> dict[str, Any]:
    """A failed txn as etcd 3.4 sends it: no ``succeeded``; ``kvs`` omitted when empty."""
    rng: dict[str, Any] = {"header": {"revision": str(revision)}}
    if kvs:
        rng |= {"kvs": list(kvs), "count": str(len(kvs))}
    return {"header": {**HEADER, "revision": str(revision)}, "responses": [{"response_range": rng}]}


# --- requests ---------------------------------------------------------------------------------


def test_the_key_is_the_prefix_and_the_session_hex() -> None:
    assert KEY == b"/jvpn-trio/sessions/000102030405060708090a0b0c0d0e0f"


def test_reads_are_never_serializable() -> None:
    assert range_request(KEY) == {"key": b64(KEY)}


def test_a_new_session_is_created_only_if_absent() -> None:
    body = claim_txn_request(KEY, expected_revision=ABSENT_REVISION, value=b"v", lease_id=LEASE)
    assert body["compare"] == [{"target": "CREATE", "key": b64(KEY), "result": "EQUAL", "create_revision": "0"}]
    assert body["success"] == [{"request_put": {"key": b64(KEY), "value": b64(b"v"), "lease": str(LEASE)}}]
    assert body["failure"] == [{"request_range": {"key": b64(KEY)}}]


def test_a_takeover_compares_the_mod_revision_as_a_string() -> None:
    body = claim_txn_request(KEY, expected_revision=41, value=b"v", lease_id=LEASE)
    assert body["compare"] == [{"target": "MOD", "key": b64(KEY), "result": "EQUAL", "mod_revision": "41"}]


def test_a_release_deletes_at_the_revision_or_reads() -> None:
    body = release_txn_request(KEY, expected_revision=7)
    assert body["compare"][0]["mod_revision"] == "7"
    assert body["success"] == [{"request_delete_range": {"key": b64(KEY)}}]
    assert body["failure"] == [{"request_range": {"key": b64(KEY)}}]


def test_the_value_round_trips_and_rejects_foreign_values() -> None:
    value = StoredValue(owner="gw-a", attempt="ab12")
    assert StoredValue.from_bytes_untrusted(value.to_bytes()) == value
    for bad in (b"", b"hello", b"[]", b'{"v": 2, "owner": "a", "attempt": "b"}', b'{"v": 1, "owner": "a"}',
                b'{"v": 1, "owner": "", "attempt": "b"}', b"\xff\xfe"):  # fmt: skip
        with pytest.raises(BadReply):
            StoredValue.from_bytes_untrusted(bad)


def test_lease_ttl_ms_becomes_whole_seconds_rounded_up() -> None:
    assert [ttl_seconds(ms) for ms in (1, 1000, 1001, 2500, 10_000)] == [1, 1, 2, 3, 10]


def test_the_lease_is_valid_until_send_time_plus_ttl_minus_margin() -> None:
    assert lease_valid_until(100.0, 5, 0.5) == 104.5


# --- replies ----------------------------------------------------------------------------------


def test_an_absent_key_reads_as_none() -> None:
    assert decode_range_reply_untrusted({"header": {**HEADER, "revision": "1"}}, KEY, SID) is None


def test_a_present_key_reads_with_its_mod_revision_attempt_and_lease() -> None:
    reply = {"header": {**HEADER, "revision": "9"}, "kvs": [kv("gw-a", "x1", 5)], "count": "1"}
    assert decode_range_reply_untrusted(reply, KEY, SID) == etcd_rec("gw-a", "x1", 5)


def test_a_reply_for_another_key_is_refused() -> None:
    reply = {"kvs": [kv("gw-a", "x1", 5, key=b"/other")]}
    with pytest.raises(BadReply, match="another key"):
        decode_range_reply_untrusted(reply, KEY, SID)


def test_a_won_txn_is_our_record_at_the_txn_revision() -> None:
    outcome = decode_txn_reply_untrusted(txn_won(12), KEY, SID)
    assert outcome == TxnOutcome(succeeded=True, revision=12, current=None)
    assert claim_result(outcome, SID, "gw-a") == CasResult(True, rec("gw-a", 12))


def test_a_failed_txn_has_no_succeeded_field_and_returns_the_winner() -> None:
    outcome = decode_txn_reply_untrusted(txn_lost(12, kv("gw-b", "y", 11)), KEY, SID)
    assert outcome == TxnOutcome(succeeded=False, revision=12, current=etcd_rec("gw-b", "y", 11))
    assert claim_result(outcome, SID, "gw-a") == CasResult(False, rec("gw-b", 11))


def test_a_failed_txn_on_an_absent_key_returns_no_record() -> None:
    outcome = decode_txn_reply_untrusted(txn_lost(12), KEY, SID)
    assert claim_result(outcome, SID, "gw-a") == CasResult(False, None)
    assert release_result(outcome) == CasResult(False, None)


def test_a_won_release_leaves_no_record() -> None:
    reply = {"header": {**HEADER, "revision": "13"}, "succeeded": True,
             "responses": [{"response_delete_range": {"header": {"revision": "13"}, "deleted": "1"}}]}  # fmt: skip
    assert release_result(decode_txn_reply_untrusted(reply, KEY, SID)) == CasResult(True, None)


@pytest.mark.parametrize(
    "reply",
    [
        [],
        {"succeeded": True, "responses": []},
        {"header": {"revision": "x"}, "responses": [{}]},
        {"header": {"revision": "3"}, "succeeded": "yes", "responses": [{}]},
        {"header": {"revision": "3"}, "succeeded": True, "responses": [{"response_range": {}}]},
        {"header": {"revision": "3"}, "responses": [{"response_range": {"kvs": [{"key": "%%%"}]}}]},
    ],
)
def test_a_malformed_txn_reply_is_bad(reply: Any) -> None:
    with pytest.raises(BadReply):
        decode_txn_reply_untrusted(reply, KEY, SID)


def test_only_the_owner_at_its_revision_may_release() -> None:
    assert may_release(etcd_rec("gw-a", "x", 5), "gw-a", 5)
    assert not may_release(etcd_rec("gw-a", "x", 5), "gw-b", 5)
    assert not may_release(etcd_rec("gw-a", "x", 5), "gw-a", 4)
    assert not may_release(None, "gw-a", 5)


def test_an_ambiguous_claim_is_resolved_by_its_attempt_id() -> None:
    ours, theirs = etcd_rec("gw-a", "mine", 9), etcd_rec("gw-b", "other", 9)
    assert resolve_attempt(ours, expected_revision=ABSENT_REVISION, attempt="mine") is Resolution.WON
    assert resolve_attempt(theirs, expected_revision=ABSENT_REVISION, attempt="mine") is Resolution.LOST
    assert resolve_attempt(None, expected_revision=9, attempt="mine") is Resolution.LOST
    # Unchanged: the txn may still be applied later, so nothing is known.
    assert resolve_attempt(None, expected_revision=ABSENT_REVISION, attempt="mine") is Resolution.UNKNOWN
    assert resolve_attempt(theirs, expected_revision=9, attempt="mine") is Resolution.UNKNOWN


def test_lease_replies() -> None:
    grant = {"header": {**HEADER, "revision": "1"}, "ID": str(LEASE), "TTL": "2"}
    assert decode_grant_reply_untrusted(grant).ttl_s == 2
    alive = {"result": {"header": {**HEADER, "revision": "3"}, "ID": str(LEASE), "TTL": "2"}}
    assert decode_keepalive_reply_untrusted(alive, LEASE) == 2
    gone = {"result": {"header": {**HEADER, "revision": "3"}, "ID": str(LEASE)}}
    assert decode_keepalive_reply_untrusted(gone, LEASE) is None
    assert decode_timetolive_reply_untrusted({"ID": str(LEASE), "TTL": "-1"}) is None
    assert decode_timetolive_reply_untrusted({"ID": str(LEASE), "TTL": "4", "grantedTTL": "5"}) == 4
    for bad in ({"error": {"message": "etcdserver: no leader"}}, {"result": {"ID": "1", "TTL": "2"}}, {"result": []}):
        with pytest.raises(BadReply):
            decode_keepalive_reply_untrusted(bad, LEASE)
    with pytest.raises(BadReply):
        decode_grant_reply_untrusted({"header": {}, "ID": "0", "TTL": "0", "error": "too many requests"})


def test_error_reasons_quote_etcd_or_the_status() -> None:
    message = b'"etcdserver: requested lease not found"'
    body = b'{"error":' + message + b',"message":' + message + b',"code":5}'
    assert error_reason(404, body) == "HTTP 404: etcdserver: requested lease not found"
    assert error_reason(502, b"<html>bad gateway</html>") == "HTTP 502"


def test_a_keepalive_stream_reply_is_read_by_its_first_line() -> None:
    assert parse_json_untrusted(b'{"result":{"ID":"1"}}\n\n') == {"result": {"ID": "1"}}


#: Field names etcd's replies use, so that generated garbage reaches past the first check.
REPLY_FIELDS = ["kvs", "key", "value", "mod_revision", "header", "revision", "succeeded", "responses",
                "response_range", "result", "ID", "TTL", "lease", "error"]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(REPLY_FIELDS), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_garbage_replies_only_raise_bad_reply(reply: Any) -> None:
    decoders: list[Callable[[Any], object]] = [
        lambda r: decode_range_reply_untrusted(r, KEY, SID),
        lambda r: decode_txn_reply_untrusted(r, KEY, SID),
        decode_grant_reply_untrusted,
        lambda r: decode_keepalive_reply_untrusted(r, LEASE),
        decode_timetolive_reply_untrusted,
    ]
    for decode in decoders:
        try:
            decode(reply)
        except BadReply:
            pass


@given(st.binary(max_size=64))
def test_garbage_bodies_only_raise_bad_reply(body: bytes) -> None:
    try:
        parse_json_untrusted(body)
    except BadReply:
        pass
    try:
        StoredValue.from_bytes_untrusted(body)
    except BadReply:
        pass


# --- I/O against a scripted etcd ----------------------------------------------------------------

Reply = httpx.Response | Exception


class ScriptedEtcd:
    """Replies per path, in order; records every request as (endpoint, path, body)."""

    def __init__(self, script: dict[str, list[Reply]]) -> None:
        self.script = script
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((f"{request.url.scheme}://{request.url.netloc.decode()}", request.url.path, body))
        reply = self.script[request.url.path].pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


def ok(body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json=body)


def granted(ttl_s: int = 3) -> httpx.Response:
    return ok({"header": {**HEADER, "revision": "1"}, "ID": str(LEASE), "TTL": str(ttl_s)})


def make_store(
    etcd: ScriptedEtcd, *, endpoints: tuple[str, ...] = (ENDPOINT,), attempt: str = "att-1"
) -> EtcdOwnershipStore:
    client = EtcdClient(endpoints, request_timeout_s=0.5, transport=httpx.MockTransport(etcd))
    return EtcdOwnershipStore(
        client, lease_ttl_ms=3000, lease_margin_s=0.25, keepalive_interval_s=1.0, attempt_ids=lambda: attempt
    )


async def started(etcd: ScriptedEtcd, nursery: trio.Nursery, **kwargs: Any) -> EtcdOwnershipStore:
    store = make_store(etcd, **kwargs)
    await store.start(nursery)
    return store


def test_the_store_is_an_ownership_store() -> None:
    store: OwnershipStore = make_store(ScriptedEtcd({}))
    assert store is not None


def test_a_keepalive_that_cannot_fit_in_the_lease_is_refused() -> None:
    client = EtcdClient([ENDPOINT], request_timeout_s=1.0)
    with pytest.raises(ValueError, match="below the lease TTL"):
        EtcdOwnershipStore(client, lease_ttl_ms=2000, lease_margin_s=0.5, keepalive_interval_s=1.0)
    with pytest.raises(ValueError, match="at least one endpoint"):
        EtcdClient([], request_timeout_s=1.0)


async def test_a_claim_puts_our_value_under_our_lease(autojump_clock: trio.abc.Clock) -> None:
    etcd = ScriptedEtcd({"/v3/lease/grant": [granted()], "/v3/kv/txn": [ok(txn_won(2))], "/v3/lease/revoke": [ok({})]})
    async with trio.open_nursery() as nursery:
        store = await started(etcd, nursery)
        assert await store.claim(SID, "gw-a", expected_revision=ABSENT_REVISION) == CasResult(True, rec("gw-a", 2))
        await store.aclose()
    put = etcd.requests[1][2]["success"][0]["request_put"]
    assert put["lease"] == str(LEASE)
    assert StoredValue.from_bytes_untrusted(base64.b64decode(put["value"])) == StoredValue("gw-a", "att-1")
    assert etcd.paths() == ["/v3/lease/grant", "/v3/kv/txn", "/v3/lease/revoke"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (httpx.Response(404, json={"message": "etcdserver: requested lease not found"}), StoreUnavailable),
        (httpx.ConnectError("refused"), StoreUnavailable),
        (httpx.Response(503, json={"message": "etcdserver: request timed out"}), StoreAmbiguous),
        (httpx.Response(500, text="oops"), StoreAmbiguous),
        (httpx.ReadTimeout("slow"), StoreAmbiguous),
        (httpx.RemoteProtocolError("reset"), StoreAmbiguous),
        (httpx.Response(200, text="not json"), StoreAmbiguous),
        (ok({"header": {"revision": "3"}}), StoreAmbiguous),
    ],
)
async def test_a_claim_fails_closed(autojump_clock: trio.abc.Clock, reply: Reply, error: type[Exception]) -> None:
    """Unsent or refused: StoreUnavailable.  Sent with unknown outcome and the key unchanged: StoreAmbiguous."""
    absent = ok({"header": {**HEADER, "revision": "1"}})
    etcd = ScriptedEtcd({"/v3/lease/grant": [granted()], "/v3/kv/txn": [reply], "/v3/kv/range": [absent]})
    async with trio.open_nursery() as nursery:
        store = await started(etcd, nursery)
        with pytest.raises(error):
            await store.claim(SID, "gw-a", expected_revision=ABSENT_REVISION)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ([kv("gw-a", "att-1", 7)], CasResult(True, rec("gw-a", 7))),
        ([kv("gw-b", "att-9", 7)], CasResult(False, rec("gw-b", 7))),
    ],
)
async def test_an_ambiguous_claim_is_settled_by_rereading(
    autojump_clock: trio.abc.Clock, found: list[dict[str, Any]], expected: CasResult
) -> None:
    etcd = ScriptedEtcd({
        "/v3/lease/grant": [granted()],
        "/v3/kv/txn": [httpx.Response(500, json={"message": "etcdserver: request timed out"})],
        "/v3/kv/range": [ok({"header": {**HEADER, "revision": "7"}, "kvs": found, "count": "1"})],
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        store = await started(etcd, nursery)
        assert await store.claim(SID, "gw-a", expected_revision=ABSENT_REVISION) == expected
        nursery.cancel_scope.cancel()


async def test_a_read_moves_on_to_the_next_endpoint(autojump_clock: trio.abc.Clock) -> None:
    second = "http://etcd2.test:2379"
    etcd = ScriptedEtcd({"/v3/kv/range": [httpx.ConnectError("refused"), ok({"kvs": [kv("gw-a", "x", 3)]})]})
    store = make_store(etcd, endpoints=(ENDPOINT, second))
    assert await store.read(SID) == rec("gw-a", 3)
    assert [endpoint for endpoint, _, _ in etcd.requests] == [ENDPOINT, second]


async def test_a_read_fails_closed_when_every_endpoint_fails(autojump_clock: trio.abc.Clock) -> None:
    no_leader = httpx.Response(503, json={"message": "no leader"})
    etcd = ScriptedEtcd({"/v3/kv/range": [no_leader, httpx.ConnectError("refused"), ok({"kvs": "x"})]})
    store = make_store(etcd, endpoints=(ENDPOINT, "http://etcd2.test:2379"))
    with pytest.raises(StoreUnavailable, match="HTTP 503: no leader"):
        await store.read(SID)
    with pytest.raises(StoreUnavailable, match="kvs is not a list"):
        await store.read(SID)


async def test_a_claim_without_a_lease_is_refused() -> None:
    with pytest.raises(StoreUnavailable, match="no live lease"):
        await make_store(ScriptedEtcd({})).claim(SID, "gw-a", expected_revision=ABSENT_REVISION)


async def test_only_the_owner_releases_and_only_at_its_revision(autojump_clock: trio.abc.Clock) -> None:
    present = ok({"kvs": [kv("gw-a", "x", 5)]})
    deleted = {"header": {"revision": "6"}, "succeeded": True,
               "responses": [{"response_delete_range": {"deleted": "1"}}]}  # fmt: skip
    etcd = ScriptedEtcd({"/v3/kv/range": [present, present, present], "/v3/kv/txn": [ok(deleted)]})
    store = make_store(etcd)
    assert await store.release(SID, "gw-b", expected_revision=5) == CasResult(False, rec("gw-a", 5))
    assert await store.release(SID, "gw-a", expected_revision=4) == CasResult(False, rec("gw-a", 5))
    assert await store.release(SID, "gw-a", expected_revision=5) == CasResult(True, None)
    assert etcd.paths().count("/v3/kv/txn") == 1


async def test_keepalives_extend_validity_from_their_send_time(autojump_clock: trio.abc.Clock) -> None:
    """Grant at t=0 (TTL 3, margin 0.25): valid until 2.75; the keepalive at t=1 moves it to 3.75."""
    alive = ok({"result": {"header": HEADER, "ID": str(LEASE), "TTL": "3"}})
    gone = ok({"result": {"header": HEADER, "ID": str(LEASE)}})
    etcd = ScriptedEtcd({
        "/v3/lease/grant": [granted()],
        "/v3/lease/keepalive": [alive, httpx.ReadTimeout("slow"), alive, gone],
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        store = await started(etcd, nursery)
        assert store.lease == LeaseState(LEASE, start + 2.75)
        await trio.sleep(1.5)
        assert store.lease == LeaseState(LEASE, start + 3.75)
        await trio.sleep(1.0)  # the keepalive at t=2 timed out: validity unchanged
        assert store.lease == LeaseState(LEASE, start + 3.75)
        assert store.lease_valid(start + 3.7) and not store.lease_valid(start + 3.75)
        await trio.sleep(1.0)  # t=3: renewed again
        assert store.lease == LeaseState(LEASE, start + 5.75)
        await trio.sleep(1.0)  # t=4: etcd says the lease is gone; the task ends
        assert store.lease is not None and store.lease.lost and not store.lease_valid(start + 4.0)
        with pytest.raises(StoreUnavailable, match="no live lease"):
            await store.claim(SID, "gw-a", expected_revision=ABSENT_REVISION)
    assert etcd.paths().count("/v3/lease/keepalive") == 4
