"""The gateway's Prometheus metrics: what the collector reads, and the HTTP responder that serves it.

Determinism rules: the collector tests run a real gateway and client on the
in-memory network under ``autojump_clock`` and render the private registry
directly.  The HTTP tests use real loopback TCP sockets on the real clock,
every one under ``fail_after``; the one timeout test uses ``autojump_clock``
and asserts the exact virtual time (a loopback TCP connection has its bytes
in the kernel before the sender returns, so the clock only jumps when both
sides are really waiting).  Where a test must know the server has accepted a
connection it waits for that condition, never a fixed time.
"""

from __future__ import annotations

import functools
import socket as stdlib_socket
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
import attrs
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import LIVE_STATES, ReasonCode
from jvpn_trio.drivers import metrics
from jvpn_trio.drivers.event_sink import EventSink, open_event_sink
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime, GatewayStatistics
from jvpn_trio.drivers.metrics import EventCounts, GatewayCollector, MetricsError, MetricsServer, serve_metrics
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from tests.drivers.test_runtime_memory import GATEWAY_CONTROL, TUNNEL, World, client_addr, ipv4_packet, start
from tests.pair import genuine_reattach, lone_gateway, valid_reattach

IO_TIMEOUT_S = 10.0
LOOPBACK = ("127.0.0.1", 0)
#: Prometheus's rules for metric and label names (the exposition format's grammar).
METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"


# -- helpers -----------------------------------------------------------------------------------------------


def metered_world(sink: EventSink) -> World:
    """The in-memory client and gateway of test_runtime_memory, the gateway's events going to ``sink``."""
    world = World()
    world.gateway = GatewayRuntime(
        policy=world.policy,
        static=world.gw_static,
        peers=[GatewayPeer(name="laptop", public=world.cl_static.public)],
        tunnel=TUNNEL,
        store=MemoryOwnershipStore(),
        node_id="gw-test",
        emit=sink.emit,
        random_bytes=world.random_bytes,
    )
    return world


def scrape_text(collector: GatewayCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode("utf-8")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return table[(name, frozenset(labels.items()))]


class OneCounter:
    """A collector with one counter, for the responder tests (they are about HTTP, not the gateway)."""

    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        yield CounterMetricFamily("jvpn_test_scrapes", "Times this collector was read", value=self.scrapes)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send ``request`` and read everything until the server closes."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, code, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert int(headers["content-length"]) == len(body)
    return Reply(status=int(code), headers=headers, body=body)


async def get(address: tuple[str, int], path: str = "/metrics", *, extra: str = "") -> Reply:
    return parse_reply(await exchange(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()))


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsServer]:
    """A metrics server on loopback (a port of its own) serving :class:`OneCounter`."""
    async with trio.open_nursery() as nursery:
        server: MetricsServer = await nursery.start(serve_metrics, LOOPBACK, OneCounter())
        yield server
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (the server accepting a connection happens in its own time)."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)


def ipv6_loopback() -> bool:
    try:
        with stdlib_socket.socket(stdlib_socket.AF_INET6, stdlib_socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- the collector -----------------------------------------------------------------------------------------


def test_every_gateway_counter_is_exported() -> None:
    """A counter the runtime gains is a metric too, or this fails and names it."""
    names = {f.name for f in attrs.fields(GatewayStatistics)}
    assert names - set(metrics._field_plan()) == set()


def test_reason_counters_become_a_reason_label() -> None:
    plan = metrics._field_plan()
    assert plan["handshake_bad_mac"] == ("handshakes_rejected", {"reason": "bad_mac"})
    assert plan["terminated_peer_close"] == ("sessions_ended", {"reason": "peer_close"})
    assert plan["drop_replayed_counter"] == ("dropped_packets", {"direction": "rx", "reason": "replayed_counter"})
    assert plan["tx_no_binding"] == ("dropped_packets", {"direction": "tx", "reason": "no_binding"})


def core_events(actions: Iterable[object]) -> list[EmitEvent]:
    return [a for a in actions if isinstance(a, EmitEvent)]


def test_event_counts_tell_reattach_refusals_from_forged_frames() -> None:
    """Accepted, refused (security or not) REATTACHes and a forged frame, as a real gateway core logs them."""
    gw = lone_gateway()
    counts = EventCounts()
    happened = core_events(genuine_reattach(gw, valid_reattach(gw, path=PathId(2), now=1.0), now=1.0))
    happened += core_events(gw.handle(valid_reattach(gw, path=PathId(3), now=2.0, nonce=gw.last_nonce), now=2.0))
    happened += core_events(
        gw.handle(valid_reattach(gw, path=PathId(3), now=3.0, expected_version=gw.record.version - 1), now=3.0)
    )
    forged = ev.FrameDropped(reason=ReasonCode.DECRYPT_FAILED, endpoint=("203.0.113.66", 6666), frame="REATTACH")
    happened += core_events(gw.handle(forged, now=4.0))
    for event in happened:
        counts.count(event)
    assert [e.kind for e in happened if e.kind is not EventKind.STATE_CHANGE] == [
        EventKind.TRANSPORT_SWITCH, EventKind.SECURITY_EVENT, EventKind.REATTACH_REJECTED, EventKind.SECURITY_EVENT,
    ]  # fmt: skip
    assert counts.switches == 1
    assert counts.reattaches_rejected == {"replayed_nonce": 1, "stale_version": 1}
    assert counts.security_events == {"replayed_nonce": 1, "decrypt_failed": 1}


async def test_a_gateway_with_traffic_and_a_switch(autojump_clock: trio.abc.Clock) -> None:
    counts = EventCounts()
    async with open_event_sink(None, capacity=64, also=counts.count) as sink:
        world = metered_world(sink)
        collector = GatewayCollector(world.gateway, sink=sink, events=counts)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                before = samples(scrape_text(collector))
                assert value(before, "jvpn_gateway_sessions", state="attached") == 0
                await start(nursery, world)
                await trio.sleep(1.0)
                up = ipv4_packet("10.66.0.2", "10.66.0.1", b"hello gateway")
                world.cl_packets.inject(up)
                assert await world.gw_packets.delivered.receive() == up
                down = ipv4_packet("10.66.0.1", "10.66.0.2", b"hello laptop")
                world.gw_packets.inject(down)
                assert await world.cl_packets.delivered.receive() == down
                # Path 1 goes dark: the client reattaches on path 2 (a switch the gateway accepts).
                world.net.blocked.add(client_addr(1))
                await trio.sleep(2.0)
                # Junk from a stranger: a dropped datagram, counted by reason.
                attacker = world.net.port(("203.0.113.66", 6666))
                attacker.send_nowait(b"\x01" * 40, GATEWAY_CONTROL)
                await trio.sleep(0.1)
                table = samples(scrape_text(collector))
                stats = world.gateway.statistics()
                emitted = sink.statistics().emitted
                nursery.cancel_scope.cancel()
    assert value(table, "jvpn_gateway_sessions", state="attached") == 1
    assert sum(value(table, "jvpn_gateway_sessions", state=s.value.lower()) for s in LIVE_STATES) == 1
    assert value(table, "jvpn_gateway_handshakes_accepted_total", kind="new_session") == 1
    assert value(table, "jvpn_gateway_handshakes_accepted_total", kind="rekey") == 0
    for direction in ("rx", "tx"):
        assert value(table, "jvpn_gateway_data_packets_total", direction=direction) == getattr(stats, f"{direction}_packets")
        assert value(table, "jvpn_gateway_data_bytes_total", direction=direction) == getattr(stats, f"{direction}_bytes")
    assert value(table, "jvpn_gateway_data_bytes_total", direction="rx") >= len(up)
    assert value(table, "jvpn_gateway_data_bytes_total", direction="tx") >= len(down)
    assert value(table, "jvpn_gateway_dropped_packets_total", direction="rx", reason="malformed") == stats.drop_malformed
    assert stats.drop_malformed + stats.drop_unknown_index >= 1
    assert value(table, "jvpn_gateway_switches_total") == 1
    assert value(table, "jvpn_gateway_reattaches_accepted_total") == 1
    assert value(table, "jvpn_gateway_sessions_ended_total", reason="peer_close") == 0
    assert value(table, "jvpn_gateway_info", node_id="gw-test", policy=world.policy.fingerprint) == 1
    assert value(table, "jvpn_event_sink_events_total") == emitted > 0
    assert value(table, "jvpn_event_sink_dropped_events_total", reason="full") == 0


def test_names_and_labels_follow_the_prometheus_conventions() -> None:
    """Counters end in _total, units are base units, every name is jvpn_-prefixed and lowercase."""
    import re

    world = World()
    sink = EventSink(None, capacity=1)
    counts = EventCounts()
    counts.security_events["replayed_nonce"] = 2  # so label-carrying event families have a sample
    counts.reattaches_rejected["stale_version"] = 1
    families = list(text_string_to_metric_families(scrape_text(GatewayCollector(world.gateway, sink=sink, events=counts))))
    assert families
    kinds: dict[str, str] = {}
    for family in families:
        kinds[family.name] = family.type
        assert re.fullmatch(METRIC_NAME, family.name) and family.name.startswith("jvpn_")
        assert family.name == family.name.lower()
        assert family.documentation
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == f"{family.name}_total"
            else:
                assert not sample.name.endswith("_total")
            for label, label_value in sample.labels.items():
                assert re.fullmatch(LABEL_NAME, label) and not label.startswith("__")
                assert label_value == label_value.lower() or label in ("node_id", "policy")
        assert not re.search(r"(milli|micro|kilo|mega)|_ms\b|_kb\b", family.name)
    assert {name for name, kind in kinds.items() if kind == "counter"} >= {
        "jvpn_gateway_handshakes_accepted", "jvpn_gateway_handshakes_rejected", "jvpn_gateway_reattaches_accepted",
        "jvpn_gateway_reattaches_rejected", "jvpn_gateway_switches", "jvpn_gateway_security_events",
        "jvpn_gateway_data_bytes", "jvpn_gateway_data_packets", "jvpn_gateway_dropped_packets",
        "jvpn_gateway_sessions_ended", "jvpn_event_sink_dropped_events",
    }  # fmt: skip
    assert kinds["jvpn_gateway_sessions"] == "gauge"


# -- the HTTP responder ------------------------------------------------------------------------------------


async def test_a_scrape_over_http_gets_the_text_format(endpoint: MetricsServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        reply = await get(endpoint.address)
        again = await get(endpoint.address, "/metrics?debug=1")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert reply.headers["connection"] == "close"
    (family,) = text_string_to_metric_families(reply.body.decode())
    assert family.name == "jvpn_test_scrapes" and family.samples[0].value == 1
    assert again.status == 200


async def test_openmetrics_when_the_scraper_asks_for_it(endpoint: MetricsServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        reply = await get(endpoint.address, extra="Accept: application/openmetrics-text; version=1.0.0\r\n")
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")


async def test_a_real_http_client_scrapes_the_gateway_collector() -> None:
    """urllib (in a thread) against the real collector of an idle gateway: an HTTP client we did not write."""
    world = World()
    async with open_event_sink(None, capacity=8) as sink, trio.open_nursery() as nursery:
        collector = GatewayCollector(world.gateway, sink=sink, events=EventCounts())
        server: MetricsServer = await nursery.start(serve_metrics, LOOPBACK, collector)
        url = f"http://{server.address[0]}:{server.address[1]}/metrics"

        def fetch() -> tuple[int, str]:
            with urllib.request.urlopen(url, timeout=IO_TIMEOUT_S) as response:
                return response.status, response.read().decode()

        with trio.fail_after(IO_TIMEOUT_S):
            status, text = await trio.to_thread.run_sync(fetch)
        nursery.cancel_scope.cancel()
    assert status == 200
    table = samples(text)
    assert value(table, "jvpn_gateway_sessions", state="attached") == 0
    assert value(table, "jvpn_gateway_switches_total") == 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"\x00\xff\xfe\xfd\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/9.9\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"G\x00T /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\n\n", 200),  # bare newlines are tolerated
    ],
)
async def test_other_paths_methods_and_junk_get_an_error_never_a_crash(
    endpoint: MetricsServer, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        reply = parse_reply(await exchange(endpoint.address, request_bytes))
        assert reply.status == status
        if status == 405:
            assert reply.headers["allow"] == "GET"
        assert (await get(endpoint.address)).status == 200  # still serving
    assert dict(endpoint.statistics().answered)[status] >= 1


async def test_an_oversized_request_head_is_refused(endpoint: MetricsServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        reply = parse_reply(await exchange(endpoint.address, b"G" * (metrics.MAX_REQUEST_BYTES + 1)))
        assert reply.status == 431
        assert (await get(endpoint.address)).status == 200


async def test_a_client_that_leaves_mid_request_is_not_answered(endpoint: MetricsServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await trio.open_tcp_stream(*endpoint.address)
        async with stream:
            await stream.send_all(b"GET /metr")
            await stream.send_eof()
            assert await stream.receive_some(1024) == b""
        assert (await get(endpoint.address)).status == 200
    assert endpoint.statistics().answered == ((200, 1),)


async def test_a_silent_client_does_not_block_another_scrape(endpoint: MetricsServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        silent = await trio.open_tcp_stream(*endpoint.address)
        async with silent:
            await until(lambda: endpoint.active == 1)
            assert (await get(endpoint.address)).status == 200
            assert endpoint.active == 1  # the silent one is still waiting, unanswered


async def test_a_silent_client_is_dropped_after_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    timeout = 3.0
    async with trio.open_nursery() as nursery:
        server: MetricsServer = await nursery.start(
            functools.partial(serve_metrics, LOOPBACK, OneCounter(), timeout_s=timeout)
        )
        with trio.fail_after(4 * timeout):
            silent = await trio.open_tcp_stream(*server.address)
            connected = trio.current_time()
            async with silent:
                assert await silent.receive_some(1024) == b""  # closed by the server, unanswered
        assert trio.current_time() == pytest.approx(connected + timeout)
        assert server.statistics().timed_out == 1
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_are_closed_unanswered() -> None:
    async with trio.open_nursery() as nursery:
        server: MetricsServer = await nursery.start(
            functools.partial(serve_metrics, LOOPBACK, OneCounter(), max_connections=2)
        )
        with trio.fail_after(IO_TIMEOUT_S):
            first, second = await trio.open_tcp_stream(*server.address), await trio.open_tcp_stream(*server.address)
            await until(lambda: server.active == 2)
            assert await exchange(server.address, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
            assert server.statistics().refused_busy == 1
            await first.aclose()
            await until(lambda: server.active == 1)
            assert (await get(server.address)).status == 200
            await second.aclose()
        nursery.cancel_scope.cancel()


async def test_an_ipv6_listen_address() -> None:
    if not ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1) to listen on")
    async with trio.open_nursery() as nursery:
        server: MetricsServer = await nursery.start(serve_metrics, ("::1", 0), OneCounter())
        assert server.address[0] == "::1"
        with trio.fail_after(IO_TIMEOUT_S):
            assert (await get(server.address)).status == 200
        nursery.cancel_scope.cancel()


async def test_an_address_in_use_is_one_clear_error() -> None:
    with stdlib_socket.socket() as taken:
        taken.bind(LOOPBACK)
        taken.listen()
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(MetricsError) as info:
                await nursery.start(serve_metrics, ("127.0.0.1", port), OneCounter())
    assert str(info.value) == f"metrics endpoint 127.0.0.1:{port}: cannot listen: Address already in use"


async def test_the_registry_is_private(endpoint: MetricsServer) -> None:
    """What a server serves never lands in prometheus_client's global registry."""
    with trio.fail_after(IO_TIMEOUT_S):
        assert b"jvpn_test_scrapes" in (await get(endpoint.address)).body
    assert b"jvpn_" not in generate_latest(REGISTRY)
