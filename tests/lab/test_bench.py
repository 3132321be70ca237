"""``jvpn-trio bench``: the pure parts (parsing, statistics, ratios, table, JSON), plus one root smoke run.

Determinism rules: the pure tests use fixed inputs (iperf3 documents trimmed from real
output, hand-written /proc text, exact arrival times) and no clock.  The smoke test runs
the real bench (``--quick``, bare veth and jvpn-trio only) and asserts only that every
figure was produced, never how large it is: speeds are the bench's job, not a test's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.lab import bench
from jvpn_trio.lab.bench import (
    BASELINE,
    BLACKHOLE,
    JVPN,
    LINK_DOWN,
    MEASURED,
    NOT_AVAILABLE,
    OPENVPN,
    WIREGUARD,
    BenchError,
    BenchReport,
    BenchSettings,
    Figure,
    Outage,
    Ratio,
    SystemResult,
    UdpResult,
)
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
    assert bench.ratio(Figure(300.0), Figure(600.0)) == Ratio(0.5, "=")
    assert bench.ratio(Figure(0.25), Figure(2.5, lower_bound=True)) == Ratio(0.1, "<=")
    assert bench.ratio(Figure(2.5, lower_bound=True), Figure(0.25)) == Ratio(10.0, ">=")
    assert bench.ratio(Figure(3.0, lower_bound=True), Figure(3.0, lower_bound=True)) is None
    assert bench.ratio(Figure(1.0), Figure(0.0)) is None
    assert bench.ratio(None, Figure(1.0)) is None
    assert bench.ratio(Figure(1.0), None) is None


@pytest.mark.parametrize(
    "metric, figure, text",
    [
        ("tcp_mbit", Figure(19965.4), "19,965"),
        ("udp64_pps", Figure(46500.0), "46.5 k"),
        (LINK_DOWN, Figure(0.0127), "0.013"),
        (BLACKHOLE, Figure(2.9951, lower_bound=True), "> 2.995 (no recovery)"),
        ("cpu_tcp", Figure(1.374), "1.37"),
        ("peak_rss", Figure(103.24), "103.2"),
        ("tcp_mbit", None, "—"),
    ],
)
def test_format_figure(metric: str, figure: Figure | None, text: str) -> None:
    assert bench.format_figure(metric, figure) == text


def test_format_ratio() -> None:
    assert bench.format_ratio(None) == "—"
    assert bench.format_ratio(Ratio(0.5983)) == "0.60×"
    assert bench.format_ratio(Ratio(0.0252)) == "0.025×"
    assert bench.format_ratio(Ratio(0.1544, "<=")) == "≤ 0.15×"
    assert bench.format_ratio(Ratio(12.0, ">=")) == "≥ 12.00×"


# -- the report: table and JSON ------------------------------------------------------------------------


def _report(openvpn: SystemResult) -> BenchReport:
    settings = BenchSettings(runs=3, iperf_s=3.0, fault_s=3.0, systems=(BASELINE, JVPN, OPENVPN))
    baseline = SystemResult(key=BASELINE, status=MEASURED, version="no tunnel", tcp_mbit_runs=(15000.0, 14000.0, 16000.0),
                            udp64_runs=(UdpResult(200_000.0, 100_000.0, 50.0),))  # fmt: skip
    jvpn = SystemResult(
        key=JVPN, status=MEASURED, version="jvpn-trio 0.1.0", tcp_mbit_runs=(375.0, 380.0, 300.0),
        udp64_runs=(UdpResult(240_000.0, 20_000.0, 91.0), UdpResult(240_000.0, 24_000.0, 90.0),
                    UdpResult(240_000.0, 16_000.0, 93.0)),
        outages={LINK_DOWN: (_o(0.012), _o(0.014), _o(0.013)), BLACKHOLE: (_o(0.31), _o(0.29), _o(0.30))},
        cpu_runs={"tcp": ({"client": 0.35, "gateway": 0.6}, {"client": 0.4, "gateway": 0.7},
                          {"client": 0.3, "gateway": 0.5}),
                  "udp64": ({"client": 0.4, "gateway": 0.45},)},
        idle_cores_runs=(0.05, 0.04, 0.06),
        peak_rss_kib={"client": 53_000, "gateway": 52_000},
    )  # fmt: skip
    host = {"cpus": 2, "kernel": "6.18", "loadavg_start": "1.00 1.00 1.00", "loadavg_end": "1.00 1.00 1.00"}
    return BenchReport(settings, (baseline, jvpn, openvpn, bench.wireguard_reference()), host, "2026-11-22 04:31", 150.0)


OPENVPN_MEASURED = SystemResult(
    key=OPENVPN, status=MEASURED, version="OpenVPN 2.6.14, UDP, AES-256-GCM, float, keepalive 1 5",
    tcp_mbit_runs=(600.0,), udp64_runs=(UdpResult(390_000.0, 40_000.0, 88.0),),
    outages={LINK_DOWN: (_o(0.011), _o(0.010), _o(0.012)),
             BLACKHOLE: (_o(2.99, False), _o(2.99, False), _o(2.99, False))},
    cpu_runs={"tcp": ({"client": 0.7, "gateway": 0.7},), "udp64": ({"client": 0.4, "gateway": 0.4},)},
    peak_rss_kib={"client": 9_728, "gateway": 9_728},
)  # fmt: skip


def test_figures_are_medians_over_the_rounds() -> None:
    jvpn = _report(OPENVPN_MEASURED).result(JVPN)
    assert jvpn is not None
    assert jvpn.tcp_mbit == 375.0 and jvpn.udp64_pps == 20_000.0
    assert jvpn.cpu_cores("tcp") == {"client": 0.35, "gateway": 0.6, "total": 0.95}
    assert jvpn.cpu_cores("nothing") == {}
    assert jvpn.figure("cpu_tcp") == Figure(0.95)
    assert jvpn.figure(BLACKHOLE) == Figure(0.30)
    assert jvpn.figure("peak_rss") == Figure((53_000 + 52_000) / 1024)
    with pytest.raises(KeyError):
        jvpn.figure("latency")


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
    assert table["UDP 64 B received (packets/s, median of 3)"] == [
        "100.0 k", "20.0 k", "40.0 k", "0.20×", "0.50×", "46.5 k"
    ]  # fmt: skip
    assert table["outage, link down (s, median of 3)"] == ["—", "0.013", "0.011", "—", "1.18×", "15.2"]
    assert table["outage, blackhole (s, median of 3)"] == [
        "—", "0.300", "> 2.990 (no recovery)", "—", "≤ 0.10×", "> 60 (no recovery)"
    ]  # fmt: skip
    assert table["CPU during TCP, client + gateway (cores)"][1:3] == ["0.95", "1.40"]
    assert table["peak RSS, client + gateway (MiB)"][1:3] == ["102.5", "19.0"]


def test_an_unavailable_openvpn_is_said_so_and_gets_no_ratio() -> None:
    missing = SystemResult(key=OPENVPN, status=NOT_AVAILABLE, reason="openvpn is not installed (apt-get install -y openvpn)")
    text = bench.render_table(_report(missing))
    assert "- OpenVPN: not available: openvpn is not installed (apt-get install -y openvpn)" in text
    table = _table_rows(text)
    assert table["status"][2] == "not available: openvpn is not installed (apt-get install -y openvpn)"
    assert table["TCP, one stream (Mbit/s, median of 3)"][2] == "—"
    assert table["TCP, one stream (Mbit/s, median of 3)"][4] == "—"  # jvpn / OpenVPN
    assert "not measured in this run; peers.md figure" in text
    assert "- jvpn-trio: jvpn-trio 0.1.0; idle while the others were measured: 0.05 cores" in text


def test_json_document_round_trips_and_keeps_the_reference_apart() -> None:
    doc = json.loads(json.dumps(_report(OPENVPN_MEASURED).to_json()))
    systems = doc["systems"]
    assert list(systems) == [BASELINE, JVPN, OPENVPN, WIREGUARD]
    assert systems[WIREGUARD]["status"] == "not measured in this run; peers.md figure"
    assert systems[WIREGUARD]["reference"]["tcp_mbit"] == 413.0
    assert "tcp_mbit" not in systems[WIREGUARD]  # never mixed with same-run figures
    jv = systems[JVPN]
    assert jv["outage"][BLACKHOLE]["median_s"] == 0.3 and len(jv["outage"][BLACKHOLE]["runs"]) == 3
    assert jv["cpu_cores"]["tcp"]["median"]["total"] == 0.95 and len(jv["cpu_cores"]["tcp"]["runs"]) == 3
    assert jv["udp64_received_pps"] == 20_000.0 and len(jv["udp64_runs"]) == 3
    assert jv["tcp_mbit"] == 375.0 and jv["tcp_mbit_runs"] == [375.0, 380.0, 300.0]
    assert jv["idle_cores"] == 0.05
    assert set(doc["ratios"]) == {"jvpn_over_baseline", "jvpn_over_openvpn"}
    assert doc["ratios"]["jvpn_over_openvpn"][BLACKHOLE] == {"value": pytest.approx(0.1003, abs=1e-4), "bound": "<="}
    assert doc["ratios"]["jvpn_over_baseline"][LINK_DOWN] is None
    assert doc["settings"]["runs"] == 3 and doc["settings"]["jvpn_policy_overrides"] == dict(bench.JVPN_POLICY)


# -- options and configs ----------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return bench.build_parser().parse_args(list(argv))


def test_quick_defaults_and_explicit_options_win() -> None:
    assert bench.settings_from_args(_args()) == BenchSettings(3, 3.0, 3.0, (BASELINE, JVPN, OPENVPN))
    assert bench.settings_from_args(_args("--quick")) == BenchSettings(1, 3.0, 2.0, (BASELINE, JVPN, OPENVPN))
    quick = bench.settings_from_args(_args("--quick", "--runs", "2", "--iperf-seconds", "4", "--systems", "jvpn-trio,baseline"))
    assert (quick.runs, quick.iperf_s, quick.fault_s, quick.systems) == (2, 4.0, 2.0, (BASELINE, JVPN))
    assert _args("--json").json == "-" and _args("--json", "out.json").json == "out.json" and _args().json is None


@pytest.mark.parametrize("argv", [["--systems", "wireguard-go"], ["--systems", ""], ["--runs", "0"],
                                  ["--iperf-seconds", "0.5"], ["--fault-seconds", "x"]])  # fmt: skip
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _args(*argv)
    assert info.value.code == 2


def test_main_refuses_to_run_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert bench.main(_args("--quick")) == 2
    assert "needs root" in capsys.readouterr().err


def test_only_interrupts_looks_through_nested_groups() -> None:
    assert bench.only_interrupts(KeyboardInterrupt())
    assert bench.only_interrupts(BaseExceptionGroup("g", [KeyboardInterrupt(), BaseExceptionGroup("h", [KeyboardInterrupt()])]))
    assert not bench.only_interrupts(BaseExceptionGroup("g", [KeyboardInterrupt(), ValueError("bug")]))
    assert not bench.only_interrupts(ValueError("bug"))


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


# -- the real thing, briefly ------------------------------------------------------------------------------


@requires_lab
async def test_quick_bench_of_baseline_and_jvpn_produces_every_figure(tmp_path: Path) -> None:
    settings = BenchSettings(runs=1, iperf_s=bench.QUICK_IPERF_S, fault_s=bench.QUICK_FAULT_S,
                             systems=(BASELINE, JVPN), workdir=tmp_path)  # fmt: skip
    with trio.fail_after(120):
        report = await bench.run_bench(settings)
    baseline, jvpn = report.result(BASELINE), report.result(JVPN)
    assert baseline is not None and jvpn is not None
    assert (baseline.status, jvpn.status) == (MEASURED, MEASURED), jvpn.reason
    assert report.result(OPENVPN) is None
    for result in (baseline, jvpn):
        assert len(result.tcp_mbit_runs) == 1 and result.tcp_mbit_runs[0] > 0
        assert len(result.udp64_runs) == 1 and result.udp64_runs[0].received_pps > 0
    assert {fault: len(runs) for fault, runs in jvpn.outages.items()} == {LINK_DOWN: 1, BLACKHOLE: 1}
    assert set(jvpn.cpu_runs) == {"tcp", "udp64"} and set(jvpn.peak_rss_kib) == {"client", "gateway"}
    assert len(jvpn.idle_cores_runs) == 2  # read while the baseline's TCP and UDP tests ran
    # The CPU and memory figures are the tunnel processes' own, not an `ip netns exec` wrapper's.
    assert all(name.startswith("python") for name in jvpn.details["processes"].values())
    table = bench.render_table(report)
    assert "jvpn / bare" in table and "jvpn / OpenVPN" not in table
    json.dumps(report.to_json())
