"""The cluster store's metrics: call latency by operation and outcome, ownership outcomes by reason.

Determinism rules: no sockets and no etcd.  The etcd store runs on an ``httpx.MockTransport``
whose handler (a scripted etcd, tests/drivers/test_store_etcd.py) first sleeps
:data:`ETCD_DELAY_S` of virtual time, under ``autojump_clock``: every duration the observer
hears is an exact multiple of it (or the request timeout), so the tests compare exact values.
The histogram tests feed :class:`StoreCallTimes` by hand and parse the rendered exposition.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from jvpn_trio.core.admission import Refusal
from jvpn_trio.core.ownership import ABSENT_REVISION, OwnershipRecord
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.event_sink import EventSink
from jvpn_trio.drivers.gateway import REFUSAL_COUNTERS
from jvpn_trio.drivers.metrics import (
    STORE_LATENCY_BUCKETS_S,
    EventCounts,
    GatewayCollector,
    StoreCallTimes,
)
from jvpn_trio.drivers.store_etcd import (
    EtcdClient,
    EtcdOwnershipStore,
    NodeIdInUse,
    StoreAmbiguous,
    StoreObserver,
    StoreOperation,
    StoreOutcome,
    StoreUnavailable,
)
from tests.drivers.test_metrics import core_events, samples, scrape_text, value
from tests.drivers.test_runtime_memory import World
from tests.drivers.test_store_etcd import (
    ENDPOINT,
    HEADER,
    LEASE,
    SID,
    ScriptedEtcd,
    granted,
    kv,
    ok,
    txn_lost,
    txn_won,
)
from tests.pair import lone_gateway, valid_reattach

#: How long the scripted etcd takes to answer each request (virtual time).
ETCD_DELAY_S = 0.125
#: The store's request timeout in these tests.
REQUEST_TIMEOUT_S = 0.5
KEEPALIVE_S = 1.0

Observed = tuple[str, str, float]


class SlowEtcd(ScriptedEtcd):
    """The scripted etcd, answering each request after :data:`ETCD_DELAY_S` (or never: ``hang``)."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await trio.sleep(ETCD_DELAY_S)
        return self(request)


def make_store(etcd: SlowEtcd, heard: list[Observed]) -> EtcdOwnershipStore:
    """A store on ``etcd`` whose observer appends every call to ``heard``."""
    return observed_store(etcd, lambda operation, outcome, seconds: heard.append((operation, outcome, seconds)))


def observed_store(etcd: SlowEtcd, observer: StoreObserver) -> EtcdOwnershipStore:
    client = EtcdClient((ENDPOINT,), request_timeout_s=REQUEST_TIMEOUT_S, transport=httpx.MockTransport(etcd.handle))
    return EtcdOwnershipStore(
        client,
        lease_ttl_ms=3000,
        lease_margin_s=0.25,
        keepalive_interval_s=KEEPALIVE_S,
        attempt_ids=lambda: "att-1",
        observer=observer,
    )


def absent() -> httpx.Response:
    return ok({"header": {**HEADER, "revision": "4"}})


# -- the store reports each call once, as its caller sees it -------------------------------------------------


async def test_claims_are_timed_by_outcome_including_their_re_read(autojump_clock: trio.abc.Clock) -> None:
    """Won, lost, and ambiguous (the txn and its re-read are one claim of two round trips)."""
    etcd = SlowEtcd({
        "/v3/lease/grant": [granted()],
        "/v3/kv/txn": [ok(txn_won(2)), ok(txn_lost(3, kv("gw-b", "att-9", 3))), httpx.Response(500, text="?")],
        "/v3/kv/range": [ok({"header": {**HEADER, "revision": "3"}, "kvs": [kv("gw-b", "att-9", 3)]})],
    })  # fmt: skip
    heard: list[Observed] = []
    async with trio.open_nursery() as nursery:
        store = make_store(etcd, heard)
        await store.start(nursery)
        assert (await store.claim(SID, "gw-a", expected_revision=ABSENT_REVISION)).succeeded
        assert not (await store.claim(SID, "gw-a", expected_revision=2)).succeeded
        with pytest.raises(StoreAmbiguous):
            await store.claim(SID, "gw-a", expected_revision=3)
        nursery.cancel_scope.cancel()
    assert heard == [
        ("grant", "ok", ETCD_DELAY_S),
        ("claim", "ok", ETCD_DELAY_S),
        ("claim", "conflict", ETCD_DELAY_S),
        ("claim", "ambiguous", 2 * ETCD_DELAY_S),
    ]


async def test_reads_and_releases_are_timed_once_each(autojump_clock: trio.abc.Clock) -> None:
    present = ok({"kvs": [kv("gw-a", "x", 5)]})
    deleted = {"header": {"revision": "6"}, "succeeded": True,
               "responses": [{"response_delete_range": {"deleted": "1"}}]}  # fmt: skip
    etcd = SlowEtcd({
        "/v3/kv/range": [present, present, present, httpx.ConnectError("refused")],
        "/v3/kv/txn": [ok(deleted)],
    })  # fmt: skip
    heard: list[Observed] = []
    store = make_store(etcd, heard)
    assert await store.read(SID) == OwnershipRecord(session_id=SID, owner="gw-a", revision=5)
    assert not (await store.release(SID, "gw-b", expected_revision=5)).succeeded  # read only: not the owner
    assert (await store.release(SID, "gw-a", expected_revision=5)).succeeded  # read, then the delete txn
    with pytest.raises(StoreUnavailable):
        await store.read_record(SID)
    assert heard == [
        ("read", "ok", ETCD_DELAY_S),
        ("release", "conflict", ETCD_DELAY_S),
        ("release", "ok", 2 * ETCD_DELAY_S),
        ("read", "unavailable", ETCD_DELAY_S),
    ]


async def test_keepalives_are_timed_and_a_lost_lease_is_its_own_outcome(autojump_clock: trio.abc.Clock) -> None:
    alive = ok({"result": {"header": HEADER, "ID": str(LEASE), "TTL": "3"}})
    gone = ok({"result": {"header": HEADER, "ID": str(LEASE)}})
    no_leader = ok({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}})
    etcd = SlowEtcd({"/v3/lease/grant": [granted()], "/v3/lease/keepalive": [alive, httpx.ReadTimeout("slow"), no_leader, gone]})
    heard: list[Observed] = []
    async with trio.open_nursery() as nursery:
        store = make_store(etcd, heard)
        await store.start(nursery)
        await store.wait_lost()
        nursery.cancel_scope.cancel()
    assert heard == [
        ("grant", "ok", ETCD_DELAY_S),
        ("keepalive", "ok", ETCD_DELAY_S),
        ("keepalive", "unavailable", ETCD_DELAY_S),
        ("keepalive", "unavailable", ETCD_DELAY_S),
        ("keepalive", "lease_lost", ETCD_DELAY_S),
    ]


async def test_a_call_past_the_request_timeout_is_timed_at_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    heard: list[Observed] = []

    async def silent(_request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    client = EtcdClient((ENDPOINT,), request_timeout_s=REQUEST_TIMEOUT_S, transport=httpx.MockTransport(silent))
    store = EtcdOwnershipStore(
        client, lease_ttl_ms=3000, lease_margin_s=0.25, keepalive_interval_s=KEEPALIVE_S,
        observer=lambda *call: heard.append(call),
    )  # fmt: skip
    with pytest.raises(StoreUnavailable):
        await store.read(SID)
    assert heard == [("read", "unavailable", REQUEST_TIMEOUT_S)]


async def test_node_registration_and_revoke_are_timed(autojump_clock: trio.abc.Clock) -> None:
    taken = ok(txn_lost(9, kv("gw-a", "other", 9, key=b"/jvpn-trio/sessions/node/gw-a")))
    etcd = SlowEtcd({"/v3/lease/grant": [granted()], "/v3/kv/txn": [taken], "/v3/lease/revoke": [ok({})]})
    heard: list[Observed] = []
    async with trio.open_nursery() as nursery:
        store = make_store(etcd, heard)
        await store.start(nursery)
        with pytest.raises(NodeIdInUse):
            await store.register_node("gw-a")
        await store.aclose()
    assert heard == [
        ("grant", "ok", ETCD_DELAY_S),
        ("register_node", "conflict", ETCD_DELAY_S),
        ("revoke", "ok", ETCD_DELAY_S),
    ]


async def test_a_call_its_caller_cancels_has_no_outcome(autojump_clock: trio.abc.Clock) -> None:
    etcd = SlowEtcd({"/v3/kv/range": [absent()]})
    heard: list[Observed] = []
    store = make_store(etcd, heard)
    with trio.move_on_after(ETCD_DELAY_S / 2):
        await store.read(SID)
    assert heard == []


async def test_without_an_observer_nothing_is_timed(autojump_clock: trio.abc.Clock) -> None:
    etcd = SlowEtcd({"/v3/kv/range": [absent()]})
    client = EtcdClient((ENDPOINT,), request_timeout_s=REQUEST_TIMEOUT_S, transport=httpx.MockTransport(etcd.handle))
    store = EtcdOwnershipStore(client, lease_ttl_ms=3000, lease_margin_s=0.25, keepalive_interval_s=KEEPALIVE_S)
    assert await store.read(SID) is None


def test_operations_and_outcomes_are_lowercase_label_values() -> None:
    for label in (*StoreOperation, *StoreOutcome):
        assert label == label.lower() and label.isidentifier()


# -- the histogram ---------------------------------------------------------------------------------------------


def histogram_samples(times: StoreCallTimes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    family = times.histogram("jvpn_test_store_call_duration_seconds", "test")
    return {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}


def test_a_bucket_holds_the_calls_up_to_its_bound_inclusive() -> None:
    times = StoreCallTimes(buckets_s=(0.01, 0.1, 1.0))
    for seconds in (0.0, 0.01, 0.010001, 0.1, 0.5, 1.0, 7.0):
        times.observe("read", "ok", seconds)
    times.observe("claim", "ambiguous", 2.0)
    table = histogram_samples(times)

    def bucket(le: str, operation: str = "read", outcome: str = "ok") -> float:
        return table[("jvpn_test_store_call_duration_seconds_bucket",
                      frozenset({"operation": operation, "outcome": outcome, "le": le}.items()))]  # fmt: skip

    assert [bucket(le) for le in ("0.01", "0.1", "1.0", "+Inf")] == [2, 4, 6, 7]
    assert bucket("1.0", "claim", "ambiguous") == 0 and bucket("+Inf", "claim", "ambiguous") == 1
    read = frozenset({"operation": "read", "outcome": "ok"}.items())
    assert table[("jvpn_test_store_call_duration_seconds_count", read)] == 7
    assert table[("jvpn_test_store_call_duration_seconds_sum", read)] == pytest.approx(8.620001)
    assert times.calls("read", "ok") == 7 and times.calls("read", "unavailable") == 0


def test_a_negative_duration_counts_as_zero() -> None:
    times = StoreCallTimes(buckets_s=(0.01,))
    times.observe("read", "ok", -1.0)
    assert histogram_samples(times)[
        ("jvpn_test_store_call_duration_seconds_sum", frozenset({"operation": "read", "outcome": "ok"}.items()))
    ] == 0.0


@pytest.mark.parametrize("buckets", [(), (0.0, 1.0), (1.0, 1.0), (-1.0,)])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="latency buckets"):
        StoreCallTimes(buckets_s=buckets)


def test_the_default_buckets_reach_past_the_default_request_timeout() -> None:
    from jvpn_trio.config import ClusterConfig

    assert STORE_LATENCY_BUCKETS_S == tuple(sorted(STORE_LATENCY_BUCKETS_S))
    assert STORE_LATENCY_BUCKETS_S[-1] > ClusterConfig().request_timeout_ms / 1000.0


async def test_the_collector_serves_the_store_histogram(autojump_clock: trio.abc.Clock) -> None:
    """A store call timed by the real store appears in a scrape; without ``store_calls`` the family is absent."""
    times = StoreCallTimes()
    etcd = SlowEtcd({"/v3/kv/range": [absent()]})
    store = observed_store(etcd, times.observe)  # as serve wires it (open_ownership_store(observer=...))
    assert await store.read(SID) is None
    world = World()
    text = scrape_text(GatewayCollector(world.gateway, store_calls=times))
    table = samples(text)
    name = "jvpn_gateway_store_call_duration_seconds"
    assert value(table, f"{name}_count", operation="read", outcome="ok") == 1
    assert value(table, f"{name}_sum", operation="read", outcome="ok") == ETCD_DELAY_S
    assert value(table, f"{name}_bucket", operation="read", outcome="ok", le="0.1") == 0
    assert value(table, f"{name}_bucket", operation="read", outcome="ok", le="0.25") == 1
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    assert family.type == "histogram" and family.documentation
    assert name not in {f.name for f in text_string_to_metric_families(scrape_text(GatewayCollector(world.gateway)))}


# -- ownership outcomes by reason: already counted, and exported --------------------------------------------


def test_every_admission_refusal_is_a_handshake_rejection_reason() -> None:
    """Claimed admissions are ``handshakes_accepted{kind="new_session"}``; each Refusal has its reason label."""
    world = World()
    table = samples(scrape_text(GatewayCollector(world.gateway, sink=EventSink(None, capacity=1))))
    for refusal in Refusal:
        assert REFUSAL_COUNTERS[refusal] == f"handshake_{refusal.value.lower()}"
        assert value(table, "jvpn_gateway_handshakes_rejected_total", reason=refusal.value.lower()) == 0
    assert value(table, "jvpn_gateway_handshakes_accepted_total", kind="new_session") == 0
    for operation in ("reattach_read", "release"):
        assert value(table, "jvpn_gateway_store_failures_total", operation=operation) == 0


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ownership": OwnershipRecord(session_id=SID, owner="gw-other", revision=9)}, "not_owner"),
        ({"ownership": None, "store_failure": ReasonCode.STORE_UNAVAILABLE}, "store_unavailable"),
        ({"ownership": None, "store_failure": ReasonCode.OWNERSHIP_AMBIGUOUS}, "ownership_ambiguous"),
        ({"ownership": None}, "ownership_ambiguous"),  # no record: the lease expired?
    ],
)
def test_reattach_denials_for_ownership_are_counted_by_reason(changes: dict[str, Any], reason: str) -> None:
    """As a real gateway core refuses them: a SECURITY_EVENT with the request's nonce."""
    gw = lone_gateway()
    request = valid_reattach(gw, path=None, now=1.0, **changes)
    counts = EventCounts()
    for event in core_events(gw.handle(request, now=1.0)):
        counts.count(event)
    assert counts.reattaches_rejected == {reason: 1}
    assert counts.security_events == {reason: 1}
    table = samples(scrape_text(GatewayCollector(World().gateway, events=counts)))
    assert value(table, "jvpn_gateway_reattaches_rejected_total", reason=reason) == 1
