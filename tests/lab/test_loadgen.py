"""``jvpn-trio loadgen``: the pure parts (sizes, endpoints, packets, /proc text, table), plus one root run.

The pure tests use fixed inputs and no clock.  The root test runs the real thing (a gateway
process in a namespace lab, one worker or three speaking the protocol from 50 source ports)
and checks the report's shape and that the gateway itself counts the sessions; never how fast
it was.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import resource
from pathlib import Path

import pytest
import trio

from jvpn_trio.cli import build_parser
from jvpn_trio.config import load_gateway_config
from jvpn_trio.keyfile import generate_private_key_text, write_private_key
from jvpn_trio.lab import loadgen
from jvpn_trio.lab.bench import parse_cpu_ticks
from jvpn_trio.lab.etcd import etcd_binary
from jvpn_trio.lab.loadgen import (
    LoadError,
    LoadSettings,
    Share,
    SizeResult,
    WorkerPlan,
    endpoints_needed,
    icmp_echo_reply_untrusted,
    icmp_echo_request,
    kib_per_session,
    latency_summary,
    loss_pct,
    parse_sizes,
    parse_vm_rss_kib,
    partition,
    percentile,
    render_comparison,
    render_store_ops,
    render_table,
    source_endpoint,
    source_hosts,
    split_evenly,
    window_shares,
    worker_capacity,
)
from tests.netns import requires_lab

# -- options ------------------------------------------------------------------------------------


def test_sizes_are_sorted_distinct_and_accept_k() -> None:
    assert parse_sizes("10k, 1000,1000,100000") == (1_000, 10_000, 100_000)


@pytest.mark.parametrize("text", ["", "0", "ten", "1,-5", f"{loadgen.MAX_SESSIONS + 1}"])
def test_bad_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sizes(text)


def test_cli_knows_loadgen_and_its_defaults() -> None:
    args = build_parser().parse_args(["loadgen", "--sessions", "50", "--window", "8"])
    (settings,) = loadgen.settings_from_args(args)
    assert settings.sizes == (50,) and settings.window == 8
    assert settings.live_hz == loadgen.DEFAULT_LIVE_HZ


def test_stores_keep_their_order_and_come_once() -> None:
    assert loadgen.parse_stores("etcd, memory,etcd") == ("etcd", "memory")
    assert loadgen.parse_stores("ETCD3") == ("etcd3",)


@pytest.mark.parametrize("text", ["", ",", "redis", "memory,zk"])
def test_bad_stores_are_one_line_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        loadgen.parse_stores(text)


def test_cli_gives_one_run_per_store_in_order() -> None:
    args = build_parser().parse_args(["loadgen", "--sessions", "50", "--store", "memory,etcd3", "--store-ops", "10"])
    runs = loadgen.settings_from_args(args)
    assert [r.store for r in runs] == ["memory", "etcd3"]
    assert all(r.store_ops == 10 and r.sizes == (50,) for r in runs)
    (default,) = loadgen.settings_from_args(build_parser().parse_args(["loadgen"]))
    assert default.store == "memory" and default.store_ops == loadgen.DEFAULT_STORE_OPS


def test_several_stores_keep_their_workdirs_apart() -> None:
    args = build_parser().parse_args(["loadgen", "--store", "memory,etcd", "--workdir", "/tmp/w"])
    assert [r.workdir for r in loadgen.settings_from_args(args)] == [Path("/tmp/w/memory"), Path("/tmp/w/etcd")]
    args = build_parser().parse_args(["loadgen", "--store", "etcd", "--workdir", "/tmp/w"])
    assert [r.workdir for r in loadgen.settings_from_args(args)] == [Path("/tmp/w")]


def test_settings_refuse_an_unknown_store() -> None:
    with pytest.raises(ValueError):
        LoadSettings(store="redis")


def test_cli_rejects_a_window_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--window", "0"])
    assert "expected 1..16384" in capsys.readouterr().err


# -- endpoints ----------------------------------------------------------------------------------


def test_endpoints_fill_one_address_then_the_next() -> None:
    hosts = ["10.77.1.10", "10.77.1.11"]
    per_host = loadgen.ports_per_host()
    assert source_endpoint(0, hosts) == ("10.77.1.10", loadgen.FIRST_SOURCE_PORT)
    assert source_endpoint(per_host, hosts) == ("10.77.1.11", loadgen.FIRST_SOURCE_PORT)
    with pytest.raises(IndexError):
        source_endpoint(2 * per_host, hosts)


def test_source_hosts_stay_in_the_slash_24() -> None:
    assert source_hosts("10.77.1.2", 2) == ["10.77.1.10", "10.77.1.11"]
    with pytest.raises(ValueError):
        source_hosts("10.77.1.2", 300)


def test_each_reattach_needs_a_socket_of_its_own() -> None:
    # 20 sessions + 10 movers, then 30 more + 10 movers (session 0, the live one, never moves).
    assert endpoints_needed((20, 50), 10) == 70
    assert endpoints_needed((1,), 10) == 1


# -- workers ------------------------------------------------------------------------------------


def test_split_evenly_puts_the_remainder_first() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        split_evenly(5, 0)


def test_one_worker_when_everything_fits() -> None:
    (share,) = partition((20, 50), 10, capacity=1_000)
    assert share.slices == ((0, 20), (20, 50)) and share.reattaches == (10, 10)
    assert share.first_endpoint == 0 and share.endpoints == endpoints_needed((20, 50), 10) == 70


def test_every_size_is_split_over_all_workers_in_disjoint_slices() -> None:
    shares = partition((1_000, 100_000), 100, capacity=16_000)
    assert len(shares) == 7  # 100,100 sockets (sessions + movers) / 16,000 per worker
    for index, (previous, size) in enumerate(((0, 1_000), (1_000, 100_000))):
        slices = [s.slices[index] for s in shares]
        assert slices[0][0] == previous and slices[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))  # contiguous, no overlap, no gap
        assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1  # even
        assert sum(s.reattaches[index] for s in shares) == 100
    assert all(s.endpoints <= 16_000 for s in shares)


def test_workers_own_disjoint_blocks_of_source_endpoints() -> None:
    shares = partition((1_000, 100_000), 100, capacity=16_000)
    assert [s.index for s in shares] == list(range(len(shares)))
    assert shares[0].first_endpoint == 0
    for a, b in itertools.pairwise(shares):
        assert b.first_endpoint == a.first_endpoint + a.endpoints
    assert sum(s.endpoints for s in shares) == endpoints_needed((1_000, 100_000), 100)


def test_the_live_session_never_moves_and_stays_with_worker_zero() -> None:
    shares = partition((3,), 10, capacity=2)
    assert shares[0].slices[0][0] == 0
    # 3 sessions + 2 movers = 5 sockets, 2 per worker: 3 workers, and worker 0's one session stays put.
    assert [s.slices[0] for s in shares] == [(0, 1), (1, 2), (2, 3)]
    assert [s.reattaches[0] for s in shares] == [0, 1, 1]
    assert all(s.endpoints <= 2 for s in shares)


def test_rounding_over_the_capacity_adds_a_worker() -> None:
    # 2 sizes of 3 new sessions each: 6 sockets fit 2 workers of 3 only on paper (3 = 2 + 1 per size).
    shares = partition((3, 6), 0, capacity=3)
    assert all(s.endpoints <= 3 for s in shares)
    assert sum(b - a for s in shares for a, b in s.slices) == 6


def test_partition_needs_room_for_a_socket() -> None:
    with pytest.raises(ValueError):
        partition((10,), 0, capacity=0)


def test_the_window_is_shared_by_the_workers_with_work() -> None:
    assert window_shares(32, [100, 100, 100]) == [11, 11, 10]
    assert window_shares(32, [100, 0, 100]) == [16, 0, 16]
    assert window_shares(2, [5, 5, 5]) == [1, 1, 1]  # at least one each
    assert window_shares(8, [0, 0]) == [0, 0]


def test_worker_capacity_stays_below_the_hard_limit() -> None:
    assert worker_capacity(20_000) == loadgen.MAX_ENDPOINTS_PER_WORKER
    assert worker_capacity(10_000) == 10_000 - loadgen.SPARE_FDS
    assert worker_capacity(resource.RLIM_INFINITY) == loadgen.MAX_ENDPOINTS_PER_WORKER
    with pytest.raises(LoadError):
        worker_capacity(loadgen.SPARE_FDS)


def test_a_group_of_load_errors_reports_its_first() -> None:
    first, second = LoadError("worker 0 exited 1"), LoadError("worker 1 exited 1")
    assert loadgen.first_load_error(ExceptionGroup("x", [first, ExceptionGroup("y", [second])])) is first
    assert loadgen.first_load_error(ExceptionGroup("x", [first, ValueError("bug")])) is None
    assert loadgen.first_load_error(KeyboardInterrupt()) is None


def test_share_round_trips_through_json() -> None:
    share = Share(index=1, slices=((3, 5), (10, 20)), reattaches=(1, 2), first_endpoint=7, endpoints=15)
    assert Share.from_json(json.loads(json.dumps(share.to_json()))) == share


# -- packets and /proc --------------------------------------------------------------------------


def test_echo_request_has_valid_checksums_and_a_reply_parses() -> None:
    request = icmp_echo_request("10.64.0.2", "10.64.0.1", ident=7, seq=300)
    assert loadgen._checksum(request[:20]) == 0  # a correct header sums to zero
    assert loadgen._checksum(request[20:]) == 0
    reply = bytearray(request)
    reply[20] = loadgen.ICMP_ECHO_REPLY
    assert icmp_echo_reply_untrusted(bytes(reply)) == (7, 300)
    assert icmp_echo_reply_untrusted(request) is None  # a request is not a reply
    assert icmp_echo_reply_untrusted(b"\x45" + bytes(10)) is None


def test_proc_parsing() -> None:
    assert parse_vm_rss_kib("Name:\tpython\nVmHWM:\t  9000 kB\nVmRSS:\t  8192 kB\n") == 8192
    assert parse_vm_rss_kib("Name:\tpython\n") is None
    stat = "42 (py thon) S 1 42 42 0 -1 4194560 1 0 0 0 150 25 0 0 20 0 1"
    assert parse_cpu_ticks(stat) == 175
    with pytest.raises(ValueError):
        parse_cpu_ticks("garbage")


def test_figures() -> None:
    assert kib_per_session(1000, 3000, 100) == 20.0
    assert kib_per_session(None, 3000, 100) is None and kib_per_session(1000, 3000, 0) is None
    assert loss_pct(200, 199) == 0.5 and loss_pct(0, 0) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and percentile([], 0.5) is None
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_latency_summary_is_nearest_rank_in_milliseconds() -> None:
    summary = latency_summary([i / 1000.0 for i in range(100, 0, -1)])  # 1..100 ms, in any order
    assert summary == pytest.approx({"p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0})
    assert latency_summary([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None}


def test_latencies_travel_as_whole_microseconds() -> None:
    assert loadgen.to_us([0.0012344, 1.5]) == [1234, 1_500_000]
    assert loadgen.from_us([1234, 1_500_000]) == [0.001234, 1.5]


def test_size_result_takes_a_phase_latency() -> None:
    result = SizeResult(sessions=3)
    result.set_latency("reattach", [0.002, 0.001, 0.004])
    assert (result.reattach_p50_ms, result.reattach_max_ms) == pytest.approx((2.0, 4.0))
    assert result.handshake_p50_ms is None


def test_op_summary_counts_only_successes() -> None:
    summary = loadgen.op_summary([0.001, 0.003], seconds=0.5, failed=1)
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["ops_per_s"] == 4.0
    assert summary["latency_p50_ms"] == pytest.approx(1.0) and summary["latency_max_ms"] == pytest.approx(3.0)


async def test_timed_calls_bound_their_concurrency_and_drop_failures() -> None:
    from jvpn_trio.core.ownership import StoreUnavailable

    in_flight, most = 0, 0

    async def call(i: int) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await trio.lowlevel.checkpoint()  # let the other calls start, if the limit allows
        in_flight -= 1
        if i == 3:
            raise StoreUnavailable("down")
        return i % 2 == 0

    durations, succeeded, _seconds = await loadgen.timed_calls(call, list(range(10)), 4)
    assert succeeded == [0, 2, 4, 6, 8] and len(durations) == 5
    assert most == 4


# -- config, plan, table ------------------------------------------------------------------------


def test_the_gateway_config_loads_with_one_peer_per_key(tmp_path: Path) -> None:
    write_private_key(tmp_path / "gateway.key", generate_private_key_text(os.urandom))
    keys = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 4)]
    (tmp_path / "gateway.toml").write_text(
        loadgen.gateway_config_text(public_keys=keys, listen="10.99.0.1:51820", directory=tmp_path)
    )
    config = load_gateway_config(tmp_path / "gateway.toml")
    assert [p.name for p in config.peers] == ["load0", "load1", "load2"]
    assert config.policy.transport_loss_ttl_ms == loadgen.LOAD_POLICY["transport_loss_ttl_ms"]
    assert config.nat is False and config.events_file is not None
    assert config.cluster.store == "memory"


def test_the_gateway_config_names_etcd_in_a_cluster_table(tmp_path: Path) -> None:
    write_private_key(tmp_path / "gateway.key", generate_private_key_text(os.urandom))
    endpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:2381"]
    (tmp_path / "gateway.toml").write_text(
        loadgen.gateway_config_text(
            public_keys=[base64.b64encode(bytes(32)).decode()], listen="10.99.0.1:51820", directory=tmp_path,
            etcd_endpoints=endpoints,
        )
    )
    cluster = load_gateway_config(tmp_path / "gateway.toml").cluster
    assert cluster.store == "etcd" and list(cluster.etcd_endpoints) == endpoints
    default = type(cluster)()
    assert cluster.lease_ttl_ms == default.lease_ttl_ms and cluster.request_timeout_ms == default.request_timeout_ms
    assert loadgen.cluster_text([]) == ""


def test_plan_round_trips_through_json() -> None:
    plan = WorkerPlan(
        gateway_public="x", gateway_host="10.99.0.1", gateway_tunnel="10.64.0.1", keys_file="k", hosts=("10.77.1.10",),
        sizes=(20, 50), shares=partition((20, 50), 10, capacity=40), control_socket="/tmp/x.sock", live_s=1.0,
        live_hz=100.0, phase_timeout_s=60.0, budget_s=300.0, gateway_pid=1,
    )  # fmt: skip
    assert WorkerPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_table_shows_every_size_and_a_missing_figure_as_na() -> None:
    size = SizeResult(sessions=1000, established=1000, handshakes_per_s=512.0, rss_kib=80_000).to_json()
    report = {
        "started_utc": "2026-12-02 10:00", "host": {"cpus": 2}, "peers": 1000, "gateway_startup_s": 1.0,
        "rss0_kib": 60_000, "sizes": [size], "gateway_session_count": 1000, "policy": dict(loadgen.LOAD_POLICY),
    }  # fmt: skip
    table = render_table(report)
    assert "| 1,000 | 1,000 | 512 | n/a / n/a / n/a | 78.1 | n/a |" in table
    assert "gateway status: 1000 sessions" in table and "store memory," in table
    assert "store alone" not in table
    assert not loadgen.short_of_target(report)


def _etcd_report() -> dict[str, object]:
    size = SizeResult(sessions=1000, established=1000, handshakes_per_s=150.0, reattach_sent=10, reattach_acked=10,
                      reattaches_per_s=400.0)  # fmt: skip
    size.set_latency("handshake", [0.010, 0.020, 0.030])
    size.set_latency("reattach", [0.0015, 0.0025])
    figures = loadgen.op_summary([0.004, 0.006], seconds=0.01, failed=0)
    passes = {mode: {op: figures for op in loadgen.STORE_OPS} for mode in ("sequential", "concurrent")}
    return {
        "started_utc": "2026-12-03 02:00", "host": {"cpus": 2}, "peers": 1000, "gateway_startup_s": 1.0,
        "rss0_kib": 60_000, "sizes": [size.to_json()], "gateway_session_count": 1000,
        "policy": dict(loadgen.LOAD_POLICY), "store": "etcd3",
        "store_ops": {"count": 2, "concurrency": 16, "prefix": loadgen.STORE_OPS_PREFIX, "passes": passes},
    }  # fmt: skip


def test_table_shows_latencies_and_calls_handshakes_ownership_changes() -> None:
    table = render_table(_etcd_report())
    assert "store etcd3 (3 members)," in table
    assert "| handshakes/s = ownership changes/s | handshake p50 / p99 / max ms |" in table
    assert "| 1,000 | 1,000 | 150 | 20.0 / 30.0 / 30.0 |" in table
    assert "| 400 (10/10) | 1.5 / 2.5 / 2.5 |" in table
    assert "store alone (etcd3 (3 members), EtcdOwnershipStore, 2 calls per operation and pass):" in table


def test_store_ops_table_has_a_row_per_operation() -> None:
    text = render_store_ops(_etcd_report()["store_ops"])  # type: ignore[arg-type]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| operation")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(loadgen.STORE_OPS)
    assert "| claim | 200 | 4.0 / 6.0 / 6.0 | 200 | 4.0 / 6.0 / 6.0 | 0 |" in text
    assert "| 16 at a time: ops/s |" in text


def test_stores_side_by_side() -> None:
    memory = {**_etcd_report(), "store": "memory", "store_ops": None}
    text = render_comparison([memory, _etcd_report()])
    assert "| memory | 1,000 | 150 | 20.0 / 30.0 / 30.0 | 400 (10/10) | 1.5 / 2.5 / 2.5 |" in text
    assert "| etcd3 (3 members) | 1,000 |" in text
    both = loadgen.render_reports([memory, _etcd_report()])
    assert both.count("jvpn-trio loadgen,") == 2 and "| store | sessions |" in both
    assert "| store | sessions |" not in loadgen.render_reports([memory])
    assert loadgen.report_document([memory]) is memory
    assert loadgen.report_document([memory, memory]) == {"runs": [memory, memory]}


# -- the real thing -----------------------------------------------------------------------------


@requires_lab
@pytest.mark.parametrize(("sockets_per_worker", "workers"), [(None, 1), (25, 3)])
async def test_fifty_sessions_are_established_and_measured(
    tmp_path: Path, sockets_per_worker: int | None, workers: int
) -> None:
    settings = LoadSettings(
        sizes=(20, 50), window=16, reattaches=5, settle_s=0.2, idle_s=0.5, live_s=1.0, phase_timeout_s=60.0,
        sockets_per_worker=sockets_per_worker, workdir=tmp_path,
    )  # fmt: skip
    with trio.fail_after(180):
        report = await loadgen.run_load(settings)
    assert report["workers"] == workers  # 60 sockets (50 sessions + 10 movers), at most 25 per worker
    assert [s["sessions"] for s in report["sizes"]] == [20, 50]
    assert report["gateway_session_count"] == 50  # the gateway's own count (status --json)
    last = report["sizes"][-1]
    assert last["established"] == 50 and not last["timed_out"]
    assert last["handshakes_per_s"] > 0 and last["rss_kib"] > 0 and last["kib_per_session"] is not None
    assert last["reattach_sent"] == 5 and last["reattach_acked"] == 5
    assert last["live_sent"] == int(settings.live_s * settings.live_hz) and last["live_received"] > 0
    assert (tmp_path / "gateway-events.jsonl").stat().st_size > 0  # the event sink was on
    assert "| 50 | 50 |" in render_table(report)


@requires_lab
@pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server)")
async def test_the_etcd_store_is_measured_through_the_gateway_and_alone(tmp_path: Path) -> None:
    settings = LoadSettings(
        sizes=(20,), window=8, reattaches=5, settle_s=0.2, idle_s=0.5, live_s=1.0, phase_timeout_s=60.0,
        workdir=tmp_path, store="etcd", store_ops=12,
    )  # fmt: skip
    with trio.fail_after(240):
        report = await loadgen.run_load(settings)
    assert report["store"] == "etcd" and report["etcd_members"] == 1
    assert report["etcd_endpoints"] == ["http://127.0.0.1:2379"]  # the gateway namespace's loopback
    assert "[cluster]" in (tmp_path / "gateway.toml").read_text()
    (size,) = report["sizes"]
    assert size["established"] == 20 and report["gateway_session_count"] == 20
    assert size["reattach_acked"] == 5
    assert size["handshake_p50_ms"] is not None and size["reattach_max_ms"] is not None
    for figures in report["store_ops"]["passes"].values():
        assert {op: f["ok"] for op, f in figures.items()} == dict.fromkeys(loadgen.STORE_OPS, 12)
    assert "store alone" in render_table(report)
