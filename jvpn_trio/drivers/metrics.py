"""Prometheus metrics for the gateway: a collector over its counters and a tiny Trio HTTP responder.

Theory of operation
-------------------
Nothing here runs on the packet path.  The gateway already counts what it
does (``GatewayRuntime.statistics()``), publishes its sessions
(``runtime.status``) and its event sink counts what it drops; the
:class:`GatewayCollector` reads those **at scrape time** and turns them into
metric families (``prometheus_client``'s custom-collector interface), so a
scrape costs one pass over the counters and the published sessions, and a
gateway nobody scrapes pays nothing.

A few numbers exist only as events (spec 12): switches, security events,
refused and accepted REATTACHes.  :class:`EventCounts` counts those as the
event sink hands each event over (its synchronous ``also`` hook, called once
per event, before any channel can drop it), so the counts are exact even
when the log drops lines.  Events are control-plane decisions, never one per
packet.

Serving: :func:`serve_metrics` listens on TCP inside the Trio program (no
thread, unlike ``prometheus_client.start_http_server``) and answers
``GET /metrics`` with the registry rendered in the format the scraper asks
for (``choose_encoder``: Prometheus text, or OpenMetrics).  It reads one
request head of at most :data:`MAX_REQUEST_BYTES`, within
:data:`SCRAPE_TIMEOUT_S` for the whole exchange, answers once and closes:
404 for another path, 405 for another method, 400 for anything it cannot
parse, 431 for an oversized head.  At most :data:`MAX_CONNECTIONS` are
served at once (the rest are closed unanswered), so a silent or slow client
holds one slot for one timeout and never blocks another scrape.  Nothing a
client sends raises out of the server.  The registry is private to the
server (never the library's global one), so two gateways in one process, or
two tests, cannot see each other's metrics.

The cluster store's latency (docs/cluster.md) is the one number measured
rather than counted: the etcd store times each of its calls and hands
(operation, outcome, seconds) to :meth:`StoreCallTimes.observe`, which puts
it into fixed buckets (a few increments per store call, never per packet);
the collector renders those as a histogram.  Ownership outcomes by reason
need nothing new: admissions are the gateway's ``handshake_*`` counters
(one per ``Refusal``), REATTACH denials the events counted here.

Label values are lowercase: a reason is its ``ReasonCode`` (or the
counter's name in ``jvpn-trio status --json``) without its prefix, a state
its ``SessionState``.  docs/metrics.md lists every metric.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import attrs
import trio
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.states import LIVE_STATES, ReasonCode
from jvpn_trio.drivers.event_sink import EventSink
from jvpn_trio.drivers.gateway import GatewayRuntime, GatewayStatistics

#: Where Prometheus scrapes (its default ``metrics_path``).
METRICS_PATH = "/metrics"
#: Bound on one connection: reading the request, rendering and sending the answer.
SCRAPE_TIMEOUT_S = 10.0
#: Largest request head (request line and headers) read; a longer one is answered 431.
MAX_REQUEST_BYTES = 8 * 1024
#: Connections served at once; more are closed unanswered (a scraper retries at its next interval).
MAX_CONNECTIONS = 8
#: listen() backlog.
LISTEN_BACKLOG = 16
#: Every metric's name starts with this.
NAMESPACE = "jvpn"
#: Upper bounds (seconds) of the store latency histogram's buckets: a healthy etcd on the LAN
#: answers in about a millisecond, a disk sync or a leader election takes tens to hundreds, and
#: the top buckets hold the calls that ran into the request timeout (2 s by default) or tried
#: several endpoints.
STORE_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip

_RECEIVE_CHUNK = 4096
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REASON_PHRASES = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class MetricsError(Exception):
    """The metrics endpoint cannot start (e.g. its address is taken): one line for the operator."""


# -- what the gateway counts ---------------------------------------------------------------------

#: Counters of ``GatewayStatistics`` that become one sample each: field -> (metric, labels).
_FIELD_SAMPLES: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "sessions_created": ("handshakes_accepted", {"kind": "new_session"}),
    "reattach_accepted": ("reattaches_accepted", {}),
    "rekeys": ("handshakes_accepted", {"kind": "rekey"}),
    "rekey_unknown_session": ("handshakes_rejected", {"reason": "rekey_unknown_session"}),
    "rx_packets": ("data_packets", {"direction": "rx"}),
    "rx_bytes": ("data_bytes", {"direction": "rx"}),
    "tx_packets": ("data_packets", {"direction": "tx"}),
    "tx_bytes": ("data_bytes", {"direction": "tx"}),
    "stray_data": ("dropped_packets", {"direction": "rx", "reason": "stray_data"}),
    "rx_tun_full": ("dropped_packets", {"direction": "rx", "reason": "tun_full"}),
    "tx_not_ipv4": ("dropped_packets", {"direction": "tx", "reason": "not_ip"}),
    "tx_no_binding": ("dropped_packets", {"direction": "tx", "reason": "no_binding"}),
    "send_no_port": ("dropped_packets", {"direction": "tx", "reason": "no_port"}),
    "keys_exhausted": ("dropped_packets", {"direction": "tx", "reason": "keys_exhausted"}),
    "inbox_full": ("supervisor_inputs_dropped", {"reason": "inbox_full"}),
    "input_for_unknown_session": ("supervisor_inputs_dropped", {"reason": "unknown_session"}),
    "tx_lease_unproven": ("dropped_packets", {"direction": "tx", "reason": "lease_unproven"}),
    "reattach_store_unavailable": ("store_failures", {"operation": "reattach_read"}),
    "store_release_failed": ("store_failures", {"operation": "release"}),
    "reports_shed": ("supervisor_inputs_dropped", {"reason": "reports_shed"}),
    "takeovers": ("handshakes_accepted", {"kind": "takeover"}),
    "takeover_store_unavailable": ("store_failures", {"operation": "takeover_read"}),
    "reattach_store_busy": ("store_failures", {"operation": "reattach_busy"}),
    "store_ticket_forget_failed": ("store_failures", {"operation": "forget_ticket"}),
    "announce_failed": ("announce_failures", {}),
}
#: Counters named after a reason (gateway.py builds these names from its reason tables):
#: prefix -> (metric, fixed labels); the rest of the field's name is the ``reason`` label.
_REASON_PREFIXES: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "handshake_": ("handshakes_rejected", {}),
    "takeover_": ("takeovers_refused", {}),
    "terminated_": ("sessions_ended", {}),
    "drop_": ("dropped_packets", {"direction": "rx"}),
}
#: Each counter metric fed by ``GatewayStatistics``, with its help text and label names.
_GATEWAY_COUNTERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "handshakes_accepted": ("Handshakes answered: new sessions and rekeys of live ones", ("kind",)),
    "handshakes_rejected": ("Handshakes refused or dropped, by reason", ("reason",)),
    "reattaches_accepted": ("REATTACH requests answered with an ACK: moves, and retries for the bound path", ()),
    "sessions_ended": ("Sessions that ended, by reason (Property 10)", ("reason",)),
    "data_packets": ("Inner packets carried: rx from peers to the TUN, tx from the TUN to peers", ("direction",)),
    "data_bytes": ("Inner bytes carried: rx from peers to the TUN, tx from the TUN to peers", ("direction",)),
    "dropped_packets": ("Datagrams and packets dropped, by direction and reason", ("direction", "reason")),
    "supervisor_inputs_dropped": ("Inputs the session supervisor never got to see, by reason", ("reason",)),
    "store_failures": ("Ownership store calls without a certain answer, by operation (docs/cluster.md)", ("operation",)),
    "takeovers_refused": ("Resumes of another gateway's session its ticket did not allow, by reason", ("reason",)),
    "announce_failures": ("Proxy ARP announcements or withdrawals the kernel refused (docs/cluster.md)", ()),
}


def _field_plan() -> dict[str, tuple[str, dict[str, str]]]:
    """Every ``GatewayStatistics`` field -> (metric, labels); a field nothing maps is left out.

    (tests/drivers/test_metrics.py checks that every field is mapped.)
    """
    plan: dict[str, tuple[str, dict[str, str]]] = {}
    for field in attrs.fields(GatewayStatistics):
        name = field.name
        if name in _FIELD_SAMPLES:
            metric, labels = _FIELD_SAMPLES[name]
            plan[name] = (metric, dict(labels))
            continue
        for prefix, (metric, fixed) in _REASON_PREFIXES.items():
            if name.startswith(prefix):
                plan[name] = (metric, {**fixed, "reason": name[len(prefix) :]})
                break
    return plan


def _label(reason: ReasonCode) -> str:
    return reason.value.lower()


class EventCounts:
    """What only the event log says, counted: switches, security events, REATTACH verdicts.

    Give :meth:`count` to the event sink as its ``also`` hook; it is as cheap
    and total as the sink asks (a few dict increments, never raises).  A
    REATTACH refusal is a REATTACH_REJECTED event or, when it is a security
    matter, a SECURITY_EVENT carrying the request's ``nonce`` (a forged frame's
    SECURITY_EVENT has none): counted in both.  Accepted REATTACHes are the
    gateway's own counter (``reattach_accepted``): a retry for the path already
    bound is answered but logs nothing.
    """

    def __init__(self) -> None:
        self.switches = 0
        self.reattaches_rejected: Counter[str] = Counter()
        self.security_events: Counter[str] = Counter()

    def count(self, event: EmitEvent) -> None:
        kind = event.kind
        if kind is EventKind.TRANSPORT_SWITCH:
            self.switches += 1
        elif kind is EventKind.REATTACH_REJECTED:
            self.reattaches_rejected[_label(event.reason)] += 1
        elif kind is EventKind.SECURITY_EVENT:
            self.security_events[_label(event.reason)] += 1
            if event.detail("nonce") is not None:
                self.reattaches_rejected[_label(event.reason)] += 1


@attrs.define
class _LatencySeries:
    """One (operation, outcome)'s observations: a count per bucket (the last is +Inf), and their sum."""

    counts: list[int]
    total_s: float = 0.0


class StoreCallTimes:
    """How long the ownership store's calls took, by operation and outcome (the etcd store's observer).

    Give :meth:`observe` to the store (``observer=``); it is a few increments and never raises.
    Series appear with their first observation.  Buckets are fixed at construction.
    """

    def __init__(self, buckets_s: Iterable[float] = STORE_LATENCY_BUCKETS_S) -> None:
        bounds = tuple(sorted(buckets_s))
        if not bounds or bounds[0] <= 0 or len(set(bounds)) != len(bounds):
            raise ValueError(f"latency buckets must be distinct positive bounds, got {bounds}")
        self.buckets_s = bounds
        self._series: dict[tuple[str, str], _LatencySeries] = {}

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        """Count one finished call; a negative duration (a clock never runs backwards) counts as 0."""
        seconds = max(seconds, 0.0)
        series = self._series.get((operation, outcome))
        if series is None:
            series = self._series[(operation, outcome)] = _LatencySeries([0] * (len(self.buckets_s) + 1))
        series.counts[bisect.bisect_left(self.buckets_s, seconds)] += 1  # bucket i holds bound[i-1] < s <= bound[i]
        series.total_s += seconds

    def calls(self, operation: str, outcome: str) -> int:
        """How many calls of ``operation`` ended with ``outcome``."""
        series = self._series.get((operation, outcome))
        return sum(series.counts) if series is not None else 0

    def histogram(self, name: str, text: str) -> HistogramMetricFamily:
        """The observations as one histogram family labelled ``operation`` and ``outcome``."""
        family = HistogramMetricFamily(name, text, labels=["operation", "outcome"])
        for (operation, outcome), series in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(repr, self.buckets_s), "+Inf"), series.counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric([operation, outcome], buckets, sum_value=series.total_s)
        return family


class GatewayCollector(Collector):
    """A gateway's metrics, read from its counters when Prometheus scrapes (see the module docstring).

    ``sink``: the event sink whose drops to report; ``events``: the
    :class:`EventCounts` that sink feeds; ``store_calls``: the
    :class:`StoreCallTimes` the cluster store reports to.  Any may be None
    (its metrics are then left out).
    """

    def __init__(
        self,
        runtime: GatewayRuntime,
        *,
        sink: EventSink | None = None,
        events: EventCounts | None = None,
        store_calls: StoreCallTimes | None = None,
    ) -> None:
        self._runtime = runtime
        self._sink = sink
        self._events = events
        self._store_calls = store_calls
        self._plan = _field_plan()

    def collect(self) -> Iterator[Metric]:
        yield from self._gateway_counters(self._runtime.statistics())
        yield from self._sessions()
        if self._events is not None:
            yield from self._event_counters(self._events)
        if self._sink is not None:
            yield from self._sink_metrics(self._sink)
        if self._store_calls is not None:
            yield self._store_calls.histogram(
                self._name("store_call_duration_seconds"),
                "Ownership store calls, by operation and outcome: how long each took (docs/cluster.md)",
            )

    @staticmethod
    def _name(name: str) -> str:
        return f"{NAMESPACE}_gateway_{name}"

    def _gateway_counters(self, stats: GatewayStatistics) -> Iterator[Metric]:
        families = {
            metric: CounterMetricFamily(self._name(metric), text, labels=labels)
            for metric, (text, labels) in _GATEWAY_COUNTERS.items()
        }
        for field, (metric, labels) in self._plan.items():
            family = families[metric]
            family.add_metric([labels[name] for name in _GATEWAY_COUNTERS[metric][1]], getattr(stats, field))
        yield from families.values()

    def _sessions(self) -> Iterator[Metric]:
        status = self._runtime.status.value
        by_state = Counter(p.snapshot.record.state for p in status.peers) if status is not None else Counter()
        sessions = GaugeMetricFamily(self._name("sessions"), "Live sessions, by state", labels=["state"])
        for state in LIVE_STATES:
            sessions.add_metric([state.value.lower()], by_state[state])
        yield sessions
        info = GaugeMetricFamily(
            self._name("info"), "This gateway: its node id and policy fingerprint (value 1)", labels=["node_id", "policy"]
        )
        info.add_metric([self._runtime.node_id, self._runtime.policy.fingerprint], 1)
        yield info

    def _event_counters(self, events: EventCounts) -> Iterator[Metric]:
        yield CounterMetricFamily(
            self._name("switches"), "Transport switches: a session's binding moved to another path", value=events.switches
        )
        yield _by_reason(
            self._name("reattaches_rejected"), "REATTACH requests refused, by reason", events.reattaches_rejected
        )
        yield _by_reason(
            self._name("security_events"), "SECURITY_EVENTs: inputs refused as attacks, by reason", events.security_events
        )

    @staticmethod
    def _sink_metrics(sink: EventSink) -> Iterator[Metric]:
        stats = sink.statistics()
        prefix = f"{NAMESPACE}_event_sink"
        yield CounterMetricFamily(f"{prefix}_events", "Events emitted", value=stats.emitted)
        yield CounterMetricFamily(f"{prefix}_written_events", "Events written to the log file", value=stats.written)
        dropped = CounterMetricFamily(
            f"{prefix}_dropped_events", "Events the log file lost, by reason (docs/events.md)", labels=["reason"]
        )
        for reason, value in (
            ("full", stats.dropped_full),
            ("write_failed", stats.dropped_failed),
            ("unencodable", stats.dropped_unencodable),
            ("closed", stats.dropped_closed),
        ):
            dropped.add_metric([reason], value)
        yield dropped
        yield CounterMetricFamily(f"{prefix}_write_failures", "Batches the log file refused", value=stats.write_failures)
        yield GaugeMetricFamily(f"{prefix}_queued_events", "Events waiting for the log writer", value=stats.queued)


def _by_reason(name: str, text: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=["reason"])
    for reason, value in sorted(counts.items()):
        family.add_metric([reason], value)
    return family


# -- the HTTP responder --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MetricsServerStatistics:
    """What the endpoint answered, counted by status code, and what it closed unanswered."""

    answered: tuple[tuple[int, int], ...]  # (status code, count), sorted
    timed_out: int
    refused_busy: int
    broken: int


@attrs.define(eq=False)
class MetricsServer:
    """A running :func:`serve_metrics`: where it listens, and its counters."""

    address: tuple[str, int]
    registry: CollectorRegistry
    timeout_s: float
    max_request_bytes: int
    max_connections: int
    active: int = 0
    answered: Counter[int] = attrs.Factory(Counter)
    timed_out: int = 0
    refused_busy: int = 0
    broken: int = 0

    def statistics(self) -> MetricsServerStatistics:
        return MetricsServerStatistics(
            answered=tuple(sorted(self.answered.items())),
            timed_out=self.timed_out,
            refused_busy=self.refused_busy,
            broken=self.broken,
        )

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection: one request, one answer, then close.  Never raises on client input."""
        if self.active >= self.max_connections:
            self.refused_busy += 1
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            with trio.move_on_at(trio.current_time() + self.timeout_s) as scope:
                await self._exchange(stream)
            if scope.cancelled_caught:
                self.timed_out += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken += 1  # the client went away mid-exchange
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        head = bytearray()
        while (end := _HEAD_END.search(head)) is None:
            if len(head) > self.max_request_bytes:
                await self._reply(stream, 431, b"request head too large\n")
                return
            chunk = await stream.receive_some(min(_RECEIVE_CHUNK, self.max_request_bytes + 1 - len(head)))
            if not chunk:
                return  # closed before a whole request: nobody to answer
            head += chunk
        if end.start() > self.max_request_bytes:
            await self._reply(stream, 431, b"request head too large\n")
            return
        request = _parse_head_untrusted(bytes(head[: end.start()]))
        if request is None:
            await self._reply(stream, 400, b"bad request\n")
        elif request.path != METRICS_PATH:
            await self._reply(stream, 404, f"not found: try {METRICS_PATH}\n".encode())
        elif request.method != "GET":
            await self._reply(stream, 405, b"method not allowed\n", extra=(("Allow", "GET"),))
        else:
            encoder, content_type = choose_encoder(request.accept)
            await self._reply(stream, 200, encoder(self.registry), content_type=content_type)

    async def _reply(
        self,
        stream: trio.SocketStream,
        code: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"), *extra]
        lines = [f"HTTP/1.1 {code} {_REASON_PHRASES[code]}", *(f"{k}: {v}" for k, v in headers), "", ""]
        await stream.send_all("\r\n".join(lines).encode("ascii") + body)
        self.answered[code] += 1


@attrs.frozen
class _Request:
    method: str
    path: str
    accept: str


def _parse_head_untrusted(head: bytes) -> _Request | None:
    """The request line and the Accept header of an HTTP/1.x request head; None if it is not one."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        return None
    target = parts[1].split(b"?", 1)[0]
    if not target.startswith(b"/") or not target.isascii():
        return None
    accept = ""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return None
        if name.lower() == b"accept":
            accept = value.strip().decode("latin-1")
    return _Request(method=parts[0].decode("ascii"), path=target.decode("ascii"), accept=accept)


def _where(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics(
    listen: tuple[str, int],
    collector: Collector,
    *,
    timeout_s: float = SCRAPE_TIMEOUT_S,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[MetricsServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``collector`` on ``listen`` (a numeric host and a port) until cancelled.

    Starts (``task_status.started``) with the :class:`MetricsServer`, once
    listening; its ``address`` has the port bound (useful with port 0).
    Raises :class:`MetricsError` if it cannot listen.
    """
    registry = CollectorRegistry()
    registry.register(collector)
    host, port = listen
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise MetricsError(f"metrics endpoint {_where(listen)}: cannot listen: {exc.strerror or exc}") from None
    bound = listeners[0].socket.getsockname()
    server = MetricsServer(
        address=(bound[0], bound[1]),
        registry=registry,
        timeout_s=timeout_s,
        max_request_bytes=max_request_bytes,
        max_connections=max_connections,
    )
    task_status.started(server)
    await trio.serve_listeners(server.handle, listeners)


__all__ = [
    "LISTEN_BACKLOG",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "METRICS_PATH",
    "NAMESPACE",
    "SCRAPE_TIMEOUT_S",
    "STORE_LATENCY_BUCKETS_S",
    "EventCounts",
    "GatewayCollector",
    "MetricsError",
    "MetricsServer",
    "MetricsServerStatistics",
    "StoreCallTimes",
    "serve_metrics",
]
