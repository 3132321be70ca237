"""``jvpn-trio bench``: the pure parts (parsing, statistics, ratios, table, JSON), plus one root smoke run.

Determinism rules: the pure tests use fixed inputs (iperf3 documents trimmed from real
output, hand-written /proc text, exact arrival times) and no clock.  The smoke test runs
the real bench (``--quick``: bare veth, jvpn-trio and wireguard-go, or wireguard-go's
not-available row where it is not installed) and asserts only that every figure was
produced, never how large it is: speeds are the bench's job, not a test's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from jvpn_trio.lab import bench, bench_report
from jvpn_trio.lab.bench import (
    BenchError,
    BenchReport,
    BenchSettings,
    Outage,
    SystemResult,
    UdpResult,
)
from jvpn_trio.lab.bench_report import (
    BASELINE,
    BLACKHOLE,
    JVPN,
    LINK_DOWN,
    MEASURED,
    MPTCP,
    NOT_AVAILABLE,
    OPENVPN,
    WIREGUARD,
    WIREGUARD_REFERENCE,
    Figure,
    Ratio,
)
from jvpn_trio.lab.netns import DEFAULT_PATHS
from tests.netns import requires_lab

# -- iperf3 JSON ------------------------------------------------------------------------------

TCP_DOC: dict[str, Any] = {
    "start": {"test_start": {"protocol": "TCP", "duration": 2}},
    "end": {
        "sum_sent": {"start": 0, "end": 2.0, "seconds": 2.0, "bytes": 3872260096, "bits_per_second": 15.5e9},
        "sum_received": {"start": 0, "end": 2.002204, "seconds": 2.002204, "bytes": 3872260096,
                         "bits_per_second": 15471990250.743681},
        "cpu_utilization_percent": {"host_total": 38.4, "remote_total": 36.8},
    },
}  # fmt: skip

#: ``iperf3 -c 127.0.0.1 -t 1 -R -J`` (iperf 3.12): the server sent, the client received.  ``sum_sent`` is
#: then the server's count (with its retransmits), ``sum_received`` the client's own.
TCP_REVERSE_DOC: dict[str, Any] = {
    "start": {"test_start": {"protocol": "TCP", "num_streams": 1, "duration": 1, "reverse": 1}},
    "end": {
        "sum_sent": {"start": 0, "end": 1.001585, "seconds": 1.001585, "bytes": 1858600960,
                     "bits_per_second": 14845277914.50551, "retransmits": 14, "sender": False},
        "sum_received": {"start": 0, "end": 1.00005, "seconds": 1.00005, "bytes": 1851654144,
                         "bits_per_second": 14812492527.37363, "sender": False},
    },
}  # fmt: skip

UDP_DOC: dict[str, Any] = {
    "end": {
        "sum": {"seconds": 2.002783, "bytes": 22706560, "lost_packets": 166436, "packets": 354790,
                "lost_percent": 46.9, "sender": True},
        "sum_sent": {"seconds": 2.000026, "bytes": 22706560, "lost_packets": 0, "packets": 354790},
        "sum_received": {"seconds": 2.002783, "bytes": 12052288, "lost_packets": 166436, "packets": 354753},
    }
}  # fmt: skip


def test_tcp_throughput_is_the_receivers_rate_in_mbit() -> None:
    assert bench.parse_iperf_tcp(TCP_DOC) == pytest.approx(15471.990250743681)


def test_tcp_download_throughput_is_the_receiving_clients_rate() -> None:
    # With -R the receiver is the client itself: sum_received, not the server's sum_sent.
    assert bench.parse_iperf_tcp(TCP_REVERSE_DOC) == pytest.approx(14812.49252737363)


def test_udp_received_rate_counts_what_the_server_got() -> None:
    result = bench.parse_iperf_udp(UDP_DOC)
    assert result.received_pps == pytest.approx((354753 - 166436) / 2.002783)
    assert result.sent_pps == pytest.approx(354790 / 2.000026)
    assert result.lost_percent == pytest.approx(100 * 166436 / 354753)


def test_udp_without_sum_received_falls_back_to_sum() -> None:
    doc = {"end": {"sum": {"seconds": 2.0, "packets": 1000, "lost_packets": 200}}}
    result = bench.parse_iperf_udp(doc)
    assert result.received_pps == 400.0
    assert result.sent_pps == 500.0


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"error": "unable to connect to server: Connection refused"}, "Connection refused"),
        ({"start": {}}, "no end.sum_received"),
        ({"end": {"sum_received": {"bits_per_second": "fast"}}}, "not a number"),
        ({"end": {"sum_received": {"bits_per_second": float("nan")}}}, "not a number"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_tcp_documents_raise_bench_error(doc: Any, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        bench.parse_iperf_tcp(doc)


def test_bad_udp_documents_raise_bench_error() -> None:
    with pytest.raises(BenchError, match="seconds is 0"):
        bench.parse_iperf_udp({"end": {"sum_received": {"seconds": 0, "packets": 1, "lost_packets": 0}}})
    with pytest.raises(BenchError, match="lost_packets"):
        bench.parse_iperf_udp({"end": {"sum_received": {"seconds": 1.0, "packets": 1}}})


# -- /proc --------------------------------------------------------------------------------------


def test_cpu_ticks_sum_utime_and_stime_even_with_parentheses_in_the_name() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    text = "4242 (py (x) 3) S 1 4242 4242 0 -1 4194560 900 0 3 0 1234 567 0 0 20 0 3 0 100 0 0\n"
    assert bench.parse_cpu_ticks(text) == 1234 + 567


@pytest.mark.parametrize("text", ["", "4242 (python3) S 1 2", "no parentheses at all 1 2 3 4 5 6 7 8 9 10 11 12 13"])
def test_malformed_stat_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        bench.parse_cpu_ticks(text)


def test_peak_rss_is_vmhwm_in_kib() -> None:
    status = "Name:\topenvpn\nVmPeak:\t   12000 kB\nVmHWM:\t    9876 kB\nVmRSS:\t    9000 kB\n"
    assert bench.parse_vm_hwm_kib(status) == 9876
    assert bench.parse_vm_hwm_kib("Name:\tkthreadd\n") is None


def test_cores_is_cpu_seconds_over_wall_seconds() -> None:
    assert bench.cores(100, 400, 2.0, ticks_per_s=100.0) == 1.5
    with pytest.raises(ValueError):
        bench.cores(0, 1, 0.0, ticks_per_s=100.0)


# -- outages and medians --------------------------------------------------------------------------


def test_outage_ends_at_the_first_arrival_after_the_fault() -> None:
    # 100 Hz; nothing arrives from 10.00 to 10.30, then the stream flows again to its end.
    arrivals = [9.98, 9.99, 10.00, *(10.30 + i / 100 for i in range(250))]
    outage = bench.outage_from_arrivals(arrivals, fault_start=10.005, fault_end=12.0, stream_end=13.0, path="eth0")
    assert outage.recovered
    assert outage.seconds == pytest.approx(0.295)
    assert outage.window_s == pytest.approx(1.995)


def test_outage_with_no_arrival_before_the_fault_is_removed_is_a_lower_bound() -> None:
    arrivals = [9.99, 10.00, 12.01]  # back only after the fault was removed at 12.0
    outage = bench.outage_from_arrivals(arrivals, fault_start=10.005, fault_end=12.0, stream_end=13.0, path="eth0")
    assert not outage.recovered
    assert outage.seconds == pytest.approx(1.995)


def test_outage_window_is_clipped_to_the_stream() -> None:
    outage = bench.outage_from_arrivals([10.1], fault_start=10.0, fault_end=12.0, stream_end=11.0, path="wifi0")
    assert outage.window_s == pytest.approx(1.0) and outage.seconds == pytest.approx(0.9) and not outage.recovered
    with pytest.raises(ValueError):
        bench.outage_from_arrivals([], fault_start=10.0, fault_end=12.0, stream_end=9.0, path="eth0")


def _o(seconds: float, recovered: bool = True) -> Outage:
    return Outage(seconds=seconds, recovered=recovered, window_s=3.0, path="eth0")


def test_median_outage_odd_even_and_unrecovered_runs_rank_highest() -> None:
    assert bench.median_outage([]) is None
    assert bench.median_outage([_o(0.3), _o(0.1), _o(0.2)]) == _o(0.2)
    assert bench.median_outage([_o(0.4), _o(0.1), _o(0.2), _o(0.3)]) == _o(0.3)  # the higher middle run
    # A run that never recovered (2.9 s, a lower bound) ranks above a recovered 2.95 s.
    assert bench.median_outage([_o(2.9, False), _o(2.95), _o(0.1)]) == _o(2.95)
    assert bench.median_outage([_o(2.9, False), _o(2.95, False), _o(0.1)]) == _o(2.9, False)


def test_median_of_values() -> None:
    assert bench.median([]) is None
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5


# -- ratios and formatting ----------------------------------------------------------------------------


def test_ratio_carries_bounds() -> None:
    assert bench_report.ratio(Figure(300.0), Figure(600.0)) == Ratio(0.5, "=")
    assert bench_report.ratio(Figure(0.25), Figure(2.5, lower_bound=True)) == Ratio(0.1, "<=")
    assert bench_report.ratio(Figure(2.5, lower_bound=True), Figure(0.25)) == Ratio(10.0, ">=")
    assert bench_report.ratio(Figure(3.0, lower_bound=True), Figure(3.0, lower_bound=True)) is None
    assert bench_report.ratio(Figure(1.0), Figure(0.0)) is None
    assert bench_report.ratio(None, Figure(1.0)) is None
    assert bench_report.ratio(Figure(1.0), None) is None


@pytest.mark.parametrize(
    "metric, figure, text",
    [
        ("tcp_mbit", Figure(19965.4), "19,965"),
        ("tcp_down_mbit", Figure(18412.6), "18,413"),
        ("udp64_pps", Figure(46500.0), "46.5 k"),
        (LINK_DOWN, Figure(0.0127), "0.013"),
        (BLACKHOLE, Figure(2.9951, lower_bound=True), "> 2.995 (no recovery)"),
        ("cpu_tcp", Figure(1.374), "1.37"),
        ("peak_rss", Figure(103.24), "103.2"),
        ("tcp_mbit", None, "—"),
    ],
)
def test_format_figure(metric: str, figure: Figure | None, text: str) -> None:
    assert bench_report.format_figure(metric, figure) == text


def test_format_ratio() -> None:
    assert bench_report.format_ratio(None) == "—"
    assert bench_report.format_ratio(Ratio(0.5983)) == "0.60×"
    assert bench_report.format_ratio(Ratio(0.0252)) == "0.025×"
    assert bench_report.format_ratio(Ratio(0.1544, "<=")) == "≤ 0.15×"
    assert bench_report.format_ratio(Ratio(12.0, ">=")) == "≥ 12.00×"


# -- the report: table and JSON ------------------------------------------------------------------------


def _report(openvpn: SystemResult) -> BenchReport:
    settings = BenchSettings(runs=3, iperf_s=3.0, fault_s=3.0, systems=(BASELINE, JVPN, OPENVPN))
    baseline = SystemResult(key=BASELINE, status=MEASURED, version="no tunnel", tcp_mbit_runs=(15000.0, 14000.0, 16000.0),
                            tcp_down_mbit_runs=(16000.0, 15000.0, 17000.0),
                            udp64_runs=(UdpResult(200_000.0, 100_000.0, 50.0),))  # fmt: skip
    jvpn = SystemResult(
        key=JVPN, status=MEASURED, version="jvpn-trio 0.1.0", tcp_mbit_runs=(375.0, 380.0, 300.0),
        tcp_down_mbit_runs=(340.0, 320.0, 360.0),
        udp64_runs=(UdpResult(240_000.0, 20_000.0, 91.0), UdpResult(240_000.0, 24_000.0, 90.0),
                    UdpResult(240_000.0, 16_000.0, 93.0)),
        outages={LINK_DOWN: (_o(0.012), _o(0.014), _o(0.013)), BLACKHOLE: (_o(0.31), _o(0.29), _o(0.30))},
        cpu_runs={"tcp": ({"client": 0.35, "gateway": 0.6}, {"client": 0.4, "gateway": 0.7},
                          {"client": 0.3, "gateway": 0.5}),
                  "tcp_down": ({"client": 0.5, "gateway": 0.4}, {"client": 0.6, "gateway": 0.5},
                               {"client": 0.55, "gateway": 0.45}),
                  "udp64": ({"client": 0.4, "gateway": 0.45},)},
        idle_cores_runs=(0.05, 0.04, 0.06),
        peak_rss_kib={"client": 53_000, "gateway": 52_000},
    )  # fmt: skip
    host = {"cpus": 2, "kernel": "6.18", "loadavg_start": "1.00 1.00 1.00", "loadavg_end": "1.00 1.00 1.00"}
    return BenchReport(settings, (baseline, jvpn, openvpn, bench.wireguard_reference()), host, "2026-11-22 04:31", 150.0)


OPENVPN_MEASURED = SystemResult(
    key=OPENVPN, status=MEASURED, version="OpenVPN 2.6.14, UDP, AES-256-GCM, float, keepalive 1 5",
    tcp_mbit_runs=(600.0,), tcp_down_mbit_runs=(400.0,), udp64_runs=(UdpResult(390_000.0, 40_000.0, 88.0),),
    outages={LINK_DOWN: (_o(0.011), _o(0.010), _o(0.012)),
             BLACKHOLE: (_o(2.99, False), _o(2.99, False), _o(2.99, False))},
    cpu_runs={"tcp": ({"client": 0.7, "gateway": 0.7},), "tcp_down": ({"client": 0.8, "gateway": 0.8},),
              "udp64": ({"client": 0.4, "gateway": 0.4},)},
    peak_rss_kib={"client": 9_728, "gateway": 9_728},
)  # fmt: skip


def test_figures_are_medians_over_the_rounds() -> None:
    jvpn = _report(OPENVPN_MEASURED).result(JVPN)
    assert jvpn is not None
    assert jvpn.tcp_mbit == 375.0 and jvpn.udp64_pps == 20_000.0
    assert jvpn.tcp_down_mbit == 340.0 and jvpn.figure("tcp_down_mbit") == Figure(340.0)
    assert jvpn.cpu_cores("tcp") == {"client": 0.35, "gateway": 0.6, "total": 0.95}
    assert jvpn.figure("cpu_tcp_down") == Figure(1.0)
    assert jvpn.cpu_cores("nothing") == {}
    assert jvpn.figure("cpu_tcp") == Figure(0.95)
    assert jvpn.figure(BLACKHOLE) == Figure(0.30)
    assert jvpn.figure("peak_rss") == Figure((53_000 + 52_000) / 1024)
    with pytest.raises(KeyError):
        jvpn.figure("latency")


def test_the_download_has_its_rows_after_the_upload_and_is_measured_between_tcp_and_udp() -> None:
    assert [row.metric for row in bench.rows(1)] == [
        "tcp_mbit", "tcp_down_mbit", "udp64_pps", LINK_DOWN, BLACKHOLE, "cpu_tcp", "cpu_tcp_down", "cpu_udp64", "peak_rss",
    ]  # fmt: skip
    assert bench.THROUGHPUT_TESTS == (bench.TCP, bench.TCP_DOWN, bench.UDP64) == ("tcp", "tcp_down", "udp64")


class _IperfLab:
    """Just enough of a Lab for :func:`bench.run_iperf`: a server that says it listens, a client that
    answers with a canned iperf3 document, and the client's argv kept."""

    gateway_ns, client_ns = "gw", "cli"

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.client_argv: list[tuple[str, ...]] = []

    async def start_process(self, ns: str, argv: list[str], *, stdout_path: Path, stderr_path: Path) -> Any:
        assert ns == self.gateway_ns and "-s" in argv
        stdout_path.write_text("Server listening on 5201\n")

        class Server:
            returncode = None

            async def terminate(self) -> None:
                pass

        return Server()

    async def run(self, ns: str, *argv: str, check: bool = True) -> Any:
        assert ns == self.client_ns
        self.client_argv.append(argv)
        return argparse.Namespace(stdout=json.dumps(self.doc).encode(), stderr=b"", returncode=0)


@pytest.mark.parametrize(
    ("test", "doc", "reversed_", "collected"),
    [(bench.TCP, TCP_DOC, False, "tcp"), (bench.TCP_DOWN, TCP_REVERSE_DOC, True, "tcp_down")],
)
async def test_the_download_is_iperf3_reversed_and_collected_apart_from_the_upload(
    tmp_path: Path, test: str, doc: dict[str, Any], reversed_: bool, collected: str
) -> None:
    lab = _IperfLab(doc)
    system = bench.Running(key=JVPN, lab=cast(Any, lab), workdir=tmp_path, target="10.66.0.1", version="jvpn-trio")
    settings = BenchSettings(runs=1, iperf_s=1.0, fault_s=1.0, systems=(JVPN,))
    await bench._throughput_test(system, [system], test, settings, f"{test}-1")
    (argv,) = lab.client_argv
    assert argv[:3] == ("iperf3", "-c", "10.66.0.1") and ("-R" in argv) == reversed_ and "-u" not in argv
    expected = bench.parse_iperf_tcp(doc)
    assert (system.tcp, system.tcp_down) == (([expected], []) if collected == "tcp" else ([], [expected]))
    assert system.result().tcp_down_mbit_runs == tuple(system.tcp_down)
    assert (tmp_path / f"iperf-{test}-1-client.json").exists()


def test_rotation_changes_who_goes_first_each_round() -> None:
    keys = [BASELINE, JVPN, OPENVPN]
    assert [bench.rotated(keys, r)[0] for r in range(4)] == [BASELINE, JVPN, OPENVPN, BASELINE]
    assert sorted(bench.rotated(keys, 2)) == sorted(keys)
    assert bench.rotated([], 3) == []


def _table_rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_table_has_every_system_the_ratios_and_a_labelled_reference_column() -> None:
    table = _table_rows(bench.render_table(_report(OPENVPN_MEASURED)))
    assert table["metric"] == [
        "bare veth", "jvpn-trio", "OpenVPN", "jvpn / bare", "jvpn / OpenVPN",
        "wireguard-go (peers.md 2026-11-22, NOT this run)",
    ]  # fmt: skip
    assert table["status"] == ["measured", "measured", "measured", "", "", "not measured in this run; peers.md figure"]
    assert table["TCP, one stream (Mbit/s, median of 3)"] == ["15,000", "375", "600", "0.025×", "0.62×", "413"]
    # peers.md measured no download: its column has no figure there.
    assert table["TCP download, one stream (Mbit/s, median of 3)"] == ["16,000", "340", "400", "0.021×", "0.85×", "—"]
    assert table["UDP 64 B received (packets/s, median of 3)"] == [
        "100.0 k", "20.0 k", "40.0 k", "0.20×", "0.50×", "46.5 k"
    ]  # fmt: skip
    assert table["outage, link down (s, median of 3)"] == ["—", "0.013", "0.011", "—", "1.18×", "15.2"]
    assert table["outage, blackhole (s, median of 3)"] == [
        "—", "0.300", "> 2.990 (no recovery)", "—", "≤ 0.10×", "> 60 (no recovery)"
    ]  # fmt: skip
    assert table["CPU during TCP, client + gateway (cores)"][1:3] == ["0.95", "1.40"]
    assert table["CPU during TCP download, client + gateway (cores)"] == ["—", "1.00", "1.60", "—", "0.62×", "—"]
    titles = list(table)
    assert titles.index("TCP download, one stream (Mbit/s, median of 3)") == titles.index(
        "TCP, one stream (Mbit/s, median of 3)") + 1
    assert titles.index("CPU during TCP download, client + gateway (cores)") == titles.index(
        "CPU during TCP, client + gateway (cores)") + 1
    assert table["peak RSS, client + gateway (MiB)"][1:3] == ["102.5", "19.0"]


def test_an_unavailable_openvpn_is_said_so_and_gets_no_ratio() -> None:
    missing = SystemResult(key=OPENVPN, status=NOT_AVAILABLE, reason="openvpn is not installed (apt-get install -y openvpn)")
    text = bench.render_table(_report(missing))
    assert "- OpenVPN: not available: openvpn is not installed (apt-get install -y openvpn)" in text
    table = _table_rows(text)
    assert table["status"][2] == "not available: openvpn is not installed (apt-get install -y openvpn)"
    assert table["TCP, one stream (Mbit/s, median of 3)"][2] == "—"
    assert table["TCP, one stream (Mbit/s, median of 3)"][4] == "—"  # jvpn / OpenVPN
    assert table["TCP download, one stream (Mbit/s, median of 3)"][2::2] == ["—", "—"]  # OpenVPN, jvpn / OpenVPN
    assert "not measured in this run; peers.md figure" in text
    assert "- jvpn-trio: jvpn-trio 0.1.0; idle while the others were measured: 0.05 cores" in text


def test_json_document_round_trips_and_keeps_the_reference_apart() -> None:
    doc = json.loads(json.dumps(_report(OPENVPN_MEASURED).to_json()))
    systems = doc["systems"]
    assert list(systems) == [BASELINE, JVPN, OPENVPN, WIREGUARD_REFERENCE]
    assert systems[WIREGUARD_REFERENCE]["status"] == "not measured in this run; peers.md figure"
    assert systems[WIREGUARD_REFERENCE]["reference"]["tcp_mbit"] == 413.0
    assert "tcp_mbit" not in systems[WIREGUARD_REFERENCE]  # never mixed with same-run figures
    jv = systems[JVPN]
    assert jv["outage"][BLACKHOLE]["median_s"] == 0.3 and len(jv["outage"][BLACKHOLE]["runs"]) == 3
    assert jv["cpu_cores"]["tcp"]["median"]["total"] == 0.95 and len(jv["cpu_cores"]["tcp"]["runs"]) == 3
    assert jv["udp64_received_pps"] == 20_000.0 and len(jv["udp64_runs"]) == 3
    assert jv["tcp_mbit"] == 375.0 and jv["tcp_mbit_runs"] == [375.0, 380.0, 300.0]
    assert jv["tcp_down_mbit"] == 340.0 and jv["tcp_down_mbit_runs"] == [340.0, 320.0, 360.0]
    assert jv["cpu_cores"]["tcp_down"]["median"] == {"client": 0.55, "gateway": 0.45, "total": 1.0}
    assert "tcp_down_mbit" not in systems[WIREGUARD_REFERENCE]["reference"]  # peers.md has no download figure
    assert jv["idle_cores"] == 0.05
    assert set(doc["ratios"]) == {"jvpn_over_baseline", "jvpn_over_openvpn"}
    assert doc["ratios"]["jvpn_over_openvpn"][BLACKHOLE] == {"value": pytest.approx(0.1003, abs=1e-4), "bound": "<="}
    assert doc["ratios"]["jvpn_over_openvpn"]["tcp_down_mbit"] == {"value": 0.85, "bound": "="}
    assert doc["ratios"]["jvpn_over_openvpn"]["cpu_tcp_down"] == {"value": 0.625, "bound": "="}
    assert doc["ratios"]["jvpn_over_baseline"]["tcp_down_mbit"] == {"value": 0.0213, "bound": "="}
    assert doc["ratios"]["jvpn_over_baseline"][LINK_DOWN] is None
    assert doc["settings"]["runs"] == 3 and doc["settings"]["jvpn_policy_overrides"] == dict(bench.JVPN_POLICY)


# -- idle cost and failover by probing policy ------------------------------------------------------------


def _stat(utime: int, stime: int) -> str:
    return f"4242 (python3) S 1 4242 4242 0 -1 4194560 900 0 3 0 {utime} {stime} 0 0 20 0 3 0 100 0 0\n"


def test_cpu_percent_is_of_one_core_from_two_stat_readings() -> None:
    # 30 ticks of 100 per second over 60 s: 0.3 CPU seconds, 0.5 % of one core.
    assert bench.cpu_percent(_stat(1000, 200), _stat(1020, 210), 60.0, ticks_per_s=100.0) == pytest.approx(0.5)
    assert bench.cpu_percent(_stat(5, 5), _stat(5, 5), 1.0, ticks_per_s=100.0) == 0.0
    with pytest.raises(ValueError, match="backwards"):
        bench.cpu_percent(_stat(1000, 200), _stat(10, 2), 60.0, ticks_per_s=100.0)
    with pytest.raises(ValueError):
        bench.cpu_percent(_stat(1, 1), _stat(2, 2), 0.0, ticks_per_s=100.0)
    with pytest.raises(ValueError):
        bench.cpu_percent("garbage", _stat(2, 2), 1.0, ticks_per_s=100.0)


def _link(name: str, rx: int, tx: int) -> dict[str, Any]:
    return {"ifindex": 2, "ifname": name, "stats64": {"rx": {"bytes": rx, "packets": 1}, "tx": {"bytes": tx, "packets": 1}}}


def test_link_bytes_come_from_ip_json_stats64() -> None:
    text = json.dumps([_link("lo", 0, 0), _link("eth0", 1000, 2000)])
    assert bench.parse_link_bytes(text) == {"lo": bench.LinkBytes(0, 0), "eth0": bench.LinkBytes(rx=1000, tx=2000)}
    for bad in ("not json", json.dumps({"ifname": "eth0"}), json.dumps([{"ifname": "eth0"}]),
                json.dumps([_link("eth0", True, 1)])):  # fmt: skip
        with pytest.raises(ValueError, match="ip -j -s link"):
            bench.parse_link_bytes(bad)


def test_bytes_per_second_per_path_and_direction() -> None:
    before = {"eth0": bench.LinkBytes(rx=1000, tx=2000), "wifi0": bench.LinkBytes(rx=0, tx=0), "lo": bench.LinkBytes(5, 5)}
    after = {"eth0": bench.LinkBytes(rx=7000, tx=14000), "wifi0": bench.LinkBytes(rx=600, tx=1200), "lo": bench.LinkBytes(9, 9)}
    rates = bench.bytes_per_second(before, after, 60.0, names=["eth0", "wifi0"])
    assert set(rates) == {"eth0", "wifi0"}
    assert (rates["eth0"].tx_bps, rates["eth0"].rx_bps, rates["eth0"].total_bps) == (200.0, 100.0, 300.0)
    assert rates["wifi0"].to_json() == {"tx_Bps": 20.0, "rx_Bps": 10.0, "total_Bps": 30.0}
    with pytest.raises(ValueError, match="lte0"):
        bench.bytes_per_second(before, after, 60.0, names=["lte0"])
    with pytest.raises(ValueError, match="backwards"):
        bench.bytes_per_second(after, before, 60.0, names=["eth0"])
    with pytest.raises(ValueError):
        bench.bytes_per_second(before, after, 0.0, names=["eth0"])


def _path(interface: str, *, active: bool = False, probing: str = "standby", verdict: str = "HEALTHY",
          last: float | None = 0.01) -> dict[str, Any]:  # fmt: skip
    return {"interface": interface, "active": active, "probing": probing, "verdict": verdict, "last_delivery_ago_s": last}


def test_idle_ready_wants_the_preferred_path_active_and_idle_and_healthy_standbys() -> None:
    paths = DEFAULT_PATHS
    idle = [_path("eth0", active=True, probing="idle"), _path("wifi0"), _path("lte0", probing="metered")]
    assert bench.idle_ready(paths, {"state": "ATTACHED", "paths": idle})
    busy = [_path("eth0", active=True, probing="active"), *idle[1:]]
    assert not bench.idle_ready(paths, {"state": "ATTACHED", "paths": busy})
    assert not bench.idle_ready(paths, {"state": "RECOVERING", "paths": idle})
    assert not bench.idle_ready(paths, {})
    assert not bench.idle_ready(paths, {"state": "ATTACHED", "paths": idle[:2]})
    on_wifi = [_path("eth0"), _path("wifi0", active=True, probing="active"), _path("lte0", probing="metered")]
    assert not bench.idle_ready(paths, {"state": "ATTACHED", "paths": on_wifi})
    impaired = [idle[0], _path("wifi0", probing="active", verdict="IMPAIRED"), idle[2]]
    assert not bench.idle_ready(paths, {"state": "ATTACHED", "paths": impaired})
    unanswered = [idle[0], idle[1], _path("lte0", probing="metered", last=None)]
    assert not bench.idle_ready(paths, {"state": "ATTACHED", "paths": unanswered})
    assert bench.probe_roles({"paths": idle}) == {"eth0": "idle", "wifi0": "standby", "lte0": "metered"}


NAMES = [p.name for p in DEFAULT_PATHS]


def _snapshot(at: float, ticks: int, octets: int) -> bench.IdleSnapshot:
    return bench.IdleSnapshot(
        at=at, stat={"client": _stat(ticks, 0), "gateway": _stat(ticks // 2, 0)},
        links={n: bench.LinkBytes(rx=octets, tx=2 * octets) for n in NAMES},
        roles={"eth0": "active", "wifi0": "standby", "lte0": "metered"}, active="eth0",
    )  # fmt: skip


def test_idle_figures_over_the_window_between_two_snapshots() -> None:
    figures = bench.idle_figures(_snapshot(100.0, 100, 0), _snapshot(160.0, 160, 600), names=NAMES, ticks_per_s=100.0)
    assert figures.wall_s == 60.0
    assert figures.cpu_pct == {"client": pytest.approx(1.0), "gateway": pytest.approx(0.5)}
    assert {n: (r.tx_bps, r.rx_bps) for n, r in figures.rates.items()} == {n: (20.0, 10.0) for n in NAMES}
    with pytest.raises(ValueError):
        bench.idle_figures(_snapshot(100.0, 100, 0), _snapshot(100.0, 100, 0), names=NAMES, ticks_per_s=100.0)


def _idle_section() -> bench.IdleSection:
    flat = bench.idle_figures(_snapshot(0.0, 0, 0), _snapshot(60.0, 300, 6000), names=NAMES, ticks_per_s=100.0)
    per_role = bench.idle_figures(_snapshot(0.0, 0, 0), _snapshot(60.0, 30, 600), names=NAMES, ticks_per_s=100.0)
    roles = {"eth0": "idle", "wifi0": "standby", "lte0": "metered"}
    results = (
        bench.IdleResult(key=bench.PER_ROLE, status=MEASURED, overrides={}, figures=per_role, roles=roles,
                         roles_end=roles, active="eth0", active_end="eth0",
                         failovers=(_o(0.30), _o(0.27), _o(0.29)), idle_failovers=(_o(0.42), _o(0.38))),
        bench.IdleResult(key=bench.FLAT, status=bench_report.FAILED, overrides=bench.IDLE_POLICIES[bench.FLAT], figures=flat,
                         reason="BenchError: the client process (7) is not running", roles=roles, roles_end=roles,
                         active="eth0", active_end="eth0", failovers=(_o(0.31),)),
    )  # fmt: skip
    return bench.IdleSection(seconds=60.0, results=results)


def test_idle_table_has_a_column_per_policy_and_a_row_per_path() -> None:
    text = bench.render_idle(_idle_section(), 3, NAMES)
    table = _table_rows(text)
    assert table["idle, jvpn-trio"] == ["default policy (cadence per role)", "previous: every path at 50 ms", "target"]
    assert table["status"][1] == "failed: BenchError: the client process (7) is not running"
    assert table["client CPU (% of one core, 60 s idle)"][:2] == ["0.50", "5.00"]
    assert table["gateway CPU (% of one core, one idle session)"][:2] == ["0.25", "2.50"]
    assert table["eth0 (idle), B/s on the wire"][0] == "30 (20 out, 10 in)"
    assert table["wifi0 (standby), B/s on the wire"][1] == "300 (200 out, 100 in)"
    assert "lte0 (metered standby), B/s on the wire" in table
    assert table["failover, blackhole of eth0 (s, median of 3)"][:2] == ["0.290", "0.310"]
    # Two runs: the higher middle one, never an average.
    assert table["failover, eth0 blackholed while idle, from the first packet (s, median of 3)"][:2] == ["0.420", "—"]
    assert "standby_probe_interval_ms = metered_probe_interval_ms = 50" in text


def test_idle_json_and_the_report_without_systems() -> None:
    settings = BenchSettings(runs=3, iperf_s=3.0, fault_s=3.0, systems=(), idle_s=60.0)
    report = BenchReport(settings, (), {"cpus": 2}, "2026-12-02 11:00", 130.0, _idle_section())
    doc = json.loads(json.dumps(report.to_json()))
    idle = doc["idle"]
    assert idle["idle_seconds"] == 60.0 and idle["metered_paths"] == ["lte0"]
    assert list(idle["policies"]) == [bench.PER_ROLE, bench.FLAT]
    per_role, flat = idle["policies"][bench.PER_ROLE], idle["policies"][bench.FLAT]
    assert per_role["cpu_percent_of_one_core"] == {"client": 0.5, "gateway": 0.25}
    assert per_role["paths"]["wifi0"] == {"role": "standby", "tx_Bps": 20.0, "rx_Bps": 10.0, "total_Bps": 30.0}
    assert per_role["failover_blackhole"]["median_s"] == 0.29 and len(per_role["failover_blackhole"]["runs"]) == 3
    assert per_role["failover_blackhole_while_idle"]["median_s"] == 0.42
    assert flat["failover_blackhole_while_idle"] == {"median_s": None, "median_recovered": None, "runs": []}
    assert flat["policy_overrides"]["standby_probe_interval_ms"] == 50 == flat["policy_overrides"]["metered_probe_interval_ms"]
    assert doc["systems"] == {} and doc["settings"]["idle_seconds"] == 60.0
    assert report.failed  # the flat policy's failure is an exit code 1
    text = bench.render_table(report)
    assert "| idle, jvpn-trio |" in text and "| metric |" not in text


# -- options and configs ----------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return bench.build_parser().parse_args(list(argv))


def test_quick_defaults_and_explicit_options_win() -> None:
    everyone = (BASELINE, JVPN, OPENVPN, WIREGUARD, MPTCP)
    full = bench.settings_from_args(_args())
    assert full == BenchSettings(3, 3.0, 3.0, everyone, idle_s=bench.DEFAULT_IDLE_S, fault_runs=5)
    assert full.outage_runs == bench.DEFAULT_FAULT_RUNS == 5  # at least five fault trials in the full run
    quick = bench.settings_from_args(_args("--quick"))
    assert quick == BenchSettings(1, 3.0, 2.0, everyone, idle_s=bench.QUICK_IDLE_S, fault_runs=1)
    assert bench.settings_from_args(_args("--runs", "7")).outage_runs == 7  # never fewer trials than rounds
    assert bench.settings_from_args(_args("--fault-runs", "2")).outage_runs == 2
    assert bench.settings_from_args(_args("--quick", "--runs", "2")).outage_runs == 2
    assert bench.settings_from_args(_args("--quick", "--idle", "0")).idle_s == 0.0
    idle_only = bench.settings_from_args(_args("--idle-only", "--idle", "5"))
    assert (idle_only.systems, idle_only.idle_s) == ((), 5.0)
    quick = bench.settings_from_args(_args("--quick", "--runs", "2", "--iperf-seconds", "4", "--systems", "jvpn-trio,baseline"))
    assert (quick.runs, quick.iperf_s, quick.fault_s, quick.systems) == (2, 4.0, 2.0, (BASELINE, JVPN))
    assert bench.settings_from_args(_args("--systems", "wireguard-go,baseline")).systems == (BASELINE, WIREGUARD)
    assert bench.settings_from_args(_args("--quick", "--systems", "mptcp,jvpn-trio")).systems == (JVPN, MPTCP)
    assert _args("--json").json == "-" and _args("--json", "out.json").json == "out.json" and _args().json is None


def test_a_policy_file_runs_jvpn_trio_under_its_fields_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "policies"
    fast = bench.settings_from_args(_args("--quick", "--jvpn-policy", str(examples / "fast-failover.toml")))
    # Only the fields that differ from the laptop default are carried, and they reach the JSON.
    assert fast.jvpn_policy["probe_interval_ms"] == 20 and fast.jvpn_policy["silence_probe_after_ms"] == 15
    assert "max_recovery_window_ms" not in fast.jvpn_policy
    assert fast.to_json()["jvpn_policy_file_fields"] == dict(fast.jvpn_policy)
    laptop = bench.settings_from_args(_args("--jvpn-policy", str(examples / "laptop.toml")))
    assert laptop.jvpn_policy == {}  # the laptop default written out: nothing to override
    assert bench.settings_from_args(_args()).to_json()["jvpn_policy_file"] is None
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nprobe_interval_ms = 0\n")
    with pytest.raises(bench.BenchError, match="probe_interval_ms"):
        bench.settings_from_args(_args("--jvpn-policy", str(bad)))
    with pytest.raises(bench.BenchError):
        bench.settings_from_args(_args("--jvpn-policy", str(tmp_path / "missing.toml")))


@pytest.mark.parametrize("argv", [["--systems", "ipsec"], ["--systems", ""], ["--runs", "0"], ["--fault-runs", "0"],
                                  ["--iperf-seconds", "0.5"], ["--fault-seconds", "x"], ["--idle", "0.5"],
                                  ["--idle", "601"], ["--idle", "soon"]])  # fmt: skip
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _args(*argv)
    assert info.value.code == 2


def test_idle_only_without_a_window_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "_preflight", lambda: None)
    assert bench.main(_args("--idle-only", "--idle", "0")) == 2
    assert capsys.readouterr().err == "jvpn-trio bench: --idle-only needs an idle window (--idle S with S > 0)\n"


def test_main_refuses_to_run_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert bench.main(_args("--quick")) == 2
    assert "needs root" in capsys.readouterr().err


def test_only_interrupts_looks_through_nested_groups() -> None:
    assert bench.only_interrupts(KeyboardInterrupt())
    assert bench.only_interrupts(BaseExceptionGroup("g", [KeyboardInterrupt(), BaseExceptionGroup("h", [KeyboardInterrupt()])]))
    assert not bench.only_interrupts(BaseExceptionGroup("g", [KeyboardInterrupt(), ValueError("bug")]))
    assert not bench.only_interrupts(ValueError("bug"))


def test_idle_configs_mark_lte0_metered_and_set_each_probing_policy(tmp_path: Path) -> None:
    from jvpn_trio.config import load_client_config
    from jvpn_trio.lab import processes
    from jvpn_trio.lab.netns import Lab, LabSpec

    lab = Lab(LabSpec(prefix="jvbnt000"))  # not opened: nothing is built
    flat = {**bench.JVPN_POLICY, **bench.IDLE_POLICIES[bench.FLAT]}
    bench._jvpn_configs(tmp_path, lab, flat, processes.TunnelOptions(metered=bench.IDLE_METERED_PATHS))
    config = load_client_config(tmp_path / "client.toml")
    assert [(r.interface, r.metered) for r in config.path_rules.rules] == [("eth0", None), ("wifi0", None), ("lte0", True)]
    assert config.policy.standby_probe_interval_ms == config.policy.metered_probe_interval_ms == 50
    with pytest.raises(ValueError, match="metered paths must be paths of the lab"):
        bench._jvpn_configs(tmp_path, lab, flat, processes.TunnelOptions(metered=("wwan9",)))


def test_openvpn_configs_are_the_peers_md_setup() -> None:
    server, client = bench.openvpn_configs("10.99.0.1")
    for conf in (server, client):
        lines = conf.splitlines()
        for directive in ("proto udp4", "data-ciphers AES-256-GCM", "keepalive 1 5", "float", "tls-crypt tls-crypt.key"):
            assert directive in lines
        assert not any(line.startswith(("redirect-gateway", "secret ", "cipher ")) for line in lines)
    assert "local 10.99.0.1" in server.splitlines() and "remote 10.99.0.1 1194" in client.splitlines()


async def test_openvpn_not_installed_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    async with contextlib.AsyncExitStack() as stack:
        result = await bench._bring_up(OPENVPN, stack, tmp_path)
    assert isinstance(result, SystemResult)
    assert (result.status, result.reason) == (NOT_AVAILABLE, "openvpn is not installed (apt-get install -y openvpn)")
    assert result.figure("tcp_mbit") is None and result.figure(BLACKHOLE) is None


# -- wireguard-go ----------------------------------------------------------------------------------------

#: Fixed keys in ``wg``'s base64 form (32 bytes each); never used on a network.
KEYS = bench.WireguardKeys(
    gateway_private="oK" + "A" * 41 + "=", gateway_public="gP" + "B" * 41 + "=",
    client_private="cK" + "C" * 41 + "=", client_public="cP" + "D" * 41 + "=",
)  # fmt: skip


def _conf(text: str) -> dict[str, dict[str, str]]:
    """``wg setconf`` text -> {section: {key: value}} (one [Peer] in ours)."""
    out: dict[str, dict[str, str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
        elif line.strip():
            key, _, value = line.partition(" = ")
            out[section][key] = value
    return out


def test_wireguard_configs_pair_the_keys_with_keepalive_on_the_client() -> None:
    gateway, client = bench.wireguard_configs("10.99.0.1", KEYS)
    gw, cl = _conf(gateway), _conf(client)
    assert gw == {
        "Interface": {"PrivateKey": KEYS.gateway_private, "ListenPort": "51820"},
        "Peer": {"PublicKey": KEYS.client_public, "AllowedIPs": "10.68.0.2/32"},
    }
    assert cl == {
        "Interface": {"PrivateKey": KEYS.client_private},
        "Peer": {"PublicKey": KEYS.gateway_public, "AllowedIPs": "10.68.0.0/24", "Endpoint": "10.99.0.1:51820",
                 "PersistentKeepalive": "1"},
    }  # fmt: skip
    assert KEYS.gateway_private not in repr(KEYS) and KEYS.client_private not in repr(KEYS)


def test_wireguard_keys_are_checked() -> None:
    key = "x" * 43 + "="
    assert bench.wireguard_key(f"{key}\n", "client private key") == key
    for bad in ("", "short=", "!" * 44, "A" * 40 + "===="):
        with pytest.raises(BenchError, match="client private key is not a base64 32-byte key"):
            bench.wireguard_key(bad, "client private key")


def test_wireguard_interface_names_carry_the_lab_prefix_and_fit_ifnamsiz() -> None:
    client, gateway = bench.wireguard_interfaces(bench.lab_spec().prefix)
    assert client != gateway and client.startswith(bench.PREFIX_FAMILY) and gateway.startswith(bench.PREFIX_FAMILY)
    assert max(len(client), len(gateway)) <= 15  # IFNAMSIZ - 1


def test_latest_handshakes_parse_and_reject_garbage() -> None:
    text = f"{KEYS.gateway_public}\t1796238467\n{KEYS.client_public}\t0\n\n"
    assert bench.parse_latest_handshakes(text) == {KEYS.gateway_public: 1796238467, KEYS.client_public: 0}
    assert bench.parse_latest_handshakes("") == {}
    with pytest.raises(ValueError, match="latest-handshakes"):
        bench.parse_latest_handshakes(f"{KEYS.gateway_public}\tsoon\n")


WIREGUARD_MEASURED = SystemResult(
    key=WIREGUARD, status=MEASURED, version="wireguard-go v0.0.20220316, wireguard-tools v1.0.20210914",
    tcp_mbit_runs=(400.0,), tcp_down_mbit_runs=(425.0,), udp64_runs=(UdpResult(90_000.0, 32_000.0, 64.0),),
    outages={LINK_DOWN: (_o(1.99, False),), BLACKHOLE: (_o(1.99, False),)},
    cpu_runs={"tcp": ({"client": 0.6, "gateway": 0.5},), "tcp_down": ({"client": 0.5, "gateway": 0.75},),
              "udp64": ({"client": 0.5, "gateway": 0.5},)},
    peak_rss_kib={"client": 10_240, "gateway": 10_240},
)  # fmt: skip


def _report_with(*peers: SystemResult, fault_runs: int | None = None) -> BenchReport:
    base = _report(OPENVPN_MEASURED)
    settings = BenchSettings(runs=3, iperf_s=3.0, fault_s=3.0, systems=bench_report.MEASURABLE, fault_runs=fault_runs)
    results = (*base.results[:3], *peers)
    return BenchReport(settings, results, base.host, base.started_utc, base.elapsed_s)


def test_a_measured_wireguard_gets_a_column_and_ratios_and_no_reference() -> None:
    report = _report_with(WIREGUARD_MEASURED, fault_runs=5)
    table = _table_rows(bench.render_table(report))
    assert table["metric"] == [
        "bare veth", "jvpn-trio", "OpenVPN", "wireguard-go", "jvpn / bare", "jvpn / OpenVPN", "jvpn / wireguard-go",
    ]  # fmt: skip
    assert table["status"][3] == "measured"
    assert table["TCP, one stream (Mbit/s, median of 3)"][3::3] == ["400", "0.94×"]
    assert table["TCP download, one stream (Mbit/s, median of 3)"][3::3] == ["425", "0.80×"]
    assert table["CPU during TCP download, client + gateway (cores)"][3::3] == ["1.25", "0.80×"]
    assert table["UDP 64 B received (packets/s, median of 3)"][3] == "32.0 k"
    # The outage rows count the fault trials, not the throughput rounds.
    assert table["outage, blackhole (s, median of 5)"][3] == "> 1.990 (no recovery)"
    assert table["outage, blackhole (s, median of 5)"][6] == "≤ 0.15×"
    assert table["peak RSS, client + gateway (MiB)"][3] == "20.0"
    doc = json.loads(json.dumps(report.to_json()))
    assert list(doc["systems"]) == [BASELINE, JVPN, OPENVPN, WIREGUARD]
    assert doc["systems"][WIREGUARD]["tcp_mbit"] == 400.0
    assert doc["ratios"]["jvpn_over_wireguard_go"]["tcp_mbit"] == {"value": 0.9375, "bound": "="}
    assert doc["ratios"]["jvpn_over_wireguard_go"]["tcp_down_mbit"] == {"value": 0.8, "bound": "="}
    assert doc["systems"][WIREGUARD]["tcp_down_mbit_runs"] == [425.0]
    assert doc["ratios"]["jvpn_over_wireguard_go"][LINK_DOWN] == {"value": pytest.approx(0.0065, abs=1e-4), "bound": "<="}
    assert doc["settings"]["fault_runs"] == 5


def test_a_missing_wireguard_is_a_row_with_the_reason_and_the_reference_stays_apart() -> None:
    missing = SystemResult(key=WIREGUARD, status=NOT_AVAILABLE, reason=bench.wireguard_missing_reason(["wg"]))
    report = _report_with(missing, bench.wireguard_reference())
    text = bench.render_table(report)
    table = _table_rows(text)
    reason = "wg is not installed (apt-get install -y wireguard-go wireguard-tools)"
    assert table["metric"][3] == "wireguard-go" and table["metric"][-1].endswith("NOT this run)")
    assert table["status"][3] == f"not available: {reason}"
    assert table["TCP, one stream (Mbit/s, median of 3)"][3] == "—"
    assert table["TCP, one stream (Mbit/s, median of 3)"][6] == "—"  # jvpn / wireguard-go: nothing to divide by
    assert table["TCP, one stream (Mbit/s, median of 3)"][-1] == "413"  # the reference, in its own column
    assert table["TCP download, one stream (Mbit/s, median of 3)"][-1] == "—"  # peers.md measured no download
    assert table["CPU during TCP download, client + gateway (cores)"][-1] == "—"
    assert f"- wireguard-go: not available: {reason}" in text
    doc = json.loads(json.dumps(report.to_json()))
    assert (doc["systems"][WIREGUARD]["status"], doc["systems"][WIREGUARD]["reason"]) == (NOT_AVAILABLE, reason)
    assert doc["systems"][WIREGUARD]["tcp_mbit"] is None
    assert (doc["systems"][WIREGUARD]["tcp_down_mbit"], doc["systems"][WIREGUARD]["tcp_down_mbit_runs"]) == (None, [])
    assert doc["systems"][WIREGUARD_REFERENCE]["status"] == bench_report.REFERENCE
    assert all(v is None for v in doc["ratios"]["jvpn_over_wireguard_go"].values())
    assert bench.wireguard_missing_reason(["wireguard-go", "wg"]).startswith("wireguard-go and wg are not installed")


@pytest.mark.parametrize("present", [set(), {"wireguard-go"}, {"wg"}])
async def test_wireguard_not_installed_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, present: set[str]
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name in present else None)
    async with contextlib.AsyncExitStack() as stack:
        result = await bench._bring_up(WIREGUARD, stack, tmp_path)
    assert isinstance(result, SystemResult)
    missing = [tool for tool in ("wireguard-go", "wg") if tool not in present]
    assert (result.status, result.reason) == (NOT_AVAILABLE, bench.wireguard_missing_reason(missing))
    assert result.figure("tcp_mbit") is None and result.figure(BLACKHOLE) is None
    assert result.figure("tcp_down_mbit") is None


# -- the real thing, briefly ------------------------------------------------------------------------------

#: The idle section's short form: long enough for both readings, far too short for a figure to mean much.
SHORT_IDLE_S = 2.0


@requires_lab
async def test_quick_bench_of_baseline_jvpn_and_wireguard_produces_every_figure(tmp_path: Path) -> None:
    settings = BenchSettings(runs=1, iperf_s=bench.QUICK_IPERF_S, fault_s=bench.QUICK_FAULT_S,
                             systems=(BASELINE, JVPN, WIREGUARD), workdir=tmp_path, idle_s=SHORT_IDLE_S)  # fmt: skip
    wireguard_installed = not bench.missing_tools(bench.WIREGUARD_TOOLS)
    with trio.fail_after(300):
        report = await bench.run_bench(settings)
    baseline, jvpn, wireguard = report.result(BASELINE), report.result(JVPN), report.result(WIREGUARD)
    assert baseline is not None and jvpn is not None and wireguard is not None
    assert (baseline.status, jvpn.status) == (MEASURED, MEASURED), jvpn.reason
    assert report.result(OPENVPN) is None
    tunnels = (jvpn, wireguard) if wireguard_installed else (jvpn,)
    for result in (baseline, *tunnels):
        assert len(result.tcp_mbit_runs) == 1 and result.tcp_mbit_runs[0] > 0
        assert len(result.tcp_down_mbit_runs) == 1 and result.tcp_down_mbit_runs[0] > 0  # iperf3 -R: the download
        assert result.figure("tcp_down_mbit") is not None
        assert len(result.udp64_runs) == 1 and result.udp64_runs[0].received_pps > 0
    for result in tunnels:
        assert result.status == MEASURED, result.reason
        assert {fault: len(runs) for fault, runs in result.outages.items()} == {LINK_DOWN: 1, BLACKHOLE: 1}
        assert set(result.cpu_runs) == {"tcp", "tcp_down", "udp64"} and set(result.peak_rss_kib) == {"client", "gateway"}
        assert result.figure("cpu_tcp_down") is not None
        # Read while the others' TCP upload, TCP download and UDP tests ran.
        assert len(result.idle_cores_runs) == len(bench.THROUGHPUT_TESTS) * len(tunnels)
    # The CPU and memory figures are the tunnel processes' own, not an `ip netns exec` wrapper's.
    assert all(name.startswith("python") for name in jvpn.details["processes"].values())
    if wireguard_installed:
        assert set(wireguard.details["processes"].values()) == {"wireguard-go"}
        assert report.result(WIREGUARD_REFERENCE) is None  # measured: no peers.md stand-in
        assert "jvpn / wireguard-go" in bench.render_table(report)
        # The daemons are gone with their labs, and so are their UAPI sockets.
        assert not any((bench.WIREGUARD_SOCKET_DIR / f"{name}.sock").exists()
                       for name in wireguard.details["interfaces"].values())  # fmt: skip
    else:  # CI without the packages: reported with the reason, never dropped
        assert (wireguard.status, wireguard.reason) == (
            NOT_AVAILABLE, bench.wireguard_missing_reason(bench.missing_tools(bench.WIREGUARD_TOOLS))
        )  # fmt: skip
        assert report.result(WIREGUARD_REFERENCE) is not None
    # The idle section, in its short form: every figure there, for both policies (never their size).
    assert report.idle is not None
    assert [r.key for r in report.idle.results] == [bench.PER_ROLE, bench.FLAT]
    for idle in report.idle.results:
        assert idle.status == MEASURED, idle.reason
        assert idle.figures is not None and set(idle.figures.cpu_pct) == {"client", "gateway"}
        assert set(idle.figures.rates) == {p.name for p in DEFAULT_PATHS}
        assert idle.active == "eth0" and idle.roles["lte0"] == "metered" and idle.roles["wifi0"] == "standby"
        assert idle.roles["eth0"] == "idle"
        assert len(idle.failovers) == 1 and idle.failovers[0].path == "eth0"
        assert len(idle.idle_failovers) == 1 and idle.idle_failovers[0].recovered
    table = bench.render_table(report)
    assert "jvpn / bare" in table and "jvpn / OpenVPN" not in table
    download = _table_rows(table)["TCP download, one stream (Mbit/s, 1 run)"]
    assert "—" not in download[: 1 + len(tunnels)]  # the bare veth and every tunnel measured
    assert json.loads(json.dumps(report.to_json()))["systems"][JVPN]["tcp_down_mbit"] is not None
    assert "| idle, jvpn-trio |" in table
    assert json.loads(json.dumps(report.to_json()))["idle"]["policies"][bench.FLAT]["status"] == MEASURED
