"""Kernel MPTCP as a bench peer: the pure parts (MPTCP_INFO, counters, evidence, setup), the bench's
handling of it, and one real link-down trial in a lab.

Determinism rules: the pure tests use hand-built kernel structures and /proc text and no clock;
the bench-handling tests fake the trial (no lab is built).  The root tests run the real stream
over the kernel's MPTCP and assert only causal facts (the second subflow joined, every record
written arrived, a client without an endpoint gets no second subflow and is reported so), never
how long a stall lasted: that is the bench's job.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from jvpn_trio.lab import bench
from jvpn_trio.lab import mptcp as labmptcp
from jvpn_trio.lab.bench import BenchError, BenchSettings, Outage, SystemResult
from jvpn_trio.lab.bench_report import (
    BLACKHOLE,
    JVPN,
    LINK_DOWN,
    MEASURED,
    MPTCP,
    MPTCP_OUTAGE_MEASURE,
    NOT_AVAILABLE,
)
from jvpn_trio.lab.netns import Lab, LabSpec, open_lab
from tests.netns import requires_lab, unique_prefix

# -- MPTCP_INFO and the counters --------------------------------------------------------------------------


def _info_bytes(*, subflows: int, total: int | None, size: int = 96) -> bytes:
    data = bytearray(size)
    struct.pack_into("=B", data, 0, subflows)
    struct.pack_into("=B", data, 3, 2)  # subflows_max
    struct.pack_into("=I", data, 44, 7)  # retransmits
    struct.pack_into("=QQQQ", data, 48, 64, 256_000, 1_000, 255_936)
    if total is not None:
        data[80] = total
    return bytes(data)


def test_mptcp_info_is_read_at_the_kernels_offsets() -> None:
    info = labmptcp.parse_mptcp_info(_info_bytes(subflows=1, total=2))
    assert info == labmptcp.MptcpInfo(
        fallback=False, subflows=1, subflows_max=2, subflows_total=2, retransmits=7, bytes_retrans=64,
        bytes_sent=256_000, bytes_received=1_000, bytes_acked=255_936,
    )  # fmt: skip
    assert labmptcp.parse_mptcp_info(_info_bytes(subflows=1, total=None, size=80)).subflows_total is None
    with pytest.raises(ValueError, match="MPTCP_INFO: 40 bytes"):
        labmptcp.parse_mptcp_info(bytes(40))


NETSTAT = """TcpExt: SyncookiesSent SyncookiesRecv
TcpExt: 0 0
MPTcpExt: MPCapableSYNRX MPCapableSYNACKRX MPJoinSynAckRx MPJoinAckRx MPCapableFallbackACK SubflowStale
MPTcpExt: 3 5 4 2 0 1
"""


def test_netstat_gives_the_mptcp_section_only() -> None:
    counters = labmptcp.parse_netstat(NETSTAT)
    assert counters == {"MPCapableSYNRX": 3, "MPCapableSYNACKRX": 5, "MPJoinSynAckRx": 4, "MPJoinAckRx": 2,
                        "MPCapableFallbackACK": 0, "SubflowStale": 1}  # fmt: skip
    assert labmptcp.parse_netstat("TcpExt: A\nTcpExt: 1\n") == {}  # a kernel without MPTCP
    with pytest.raises(ValueError, match="malformed"):
        labmptcp.parse_netstat("MPTcpExt: A B\nMPTcpExt: 1\n")
    with pytest.raises(ValueError, match="not integers"):
        labmptcp.parse_netstat("MPTcpExt: A\nMPTcpExt: x\n")


def _evidence(client: dict[str, int], server: dict[str, int]) -> labmptcp.SubflowEvidence:
    return labmptcp.subflow_evidence({}, client, {}, server)


def test_evidence_tells_two_subflows_from_a_fallback_and_from_a_missing_join() -> None:
    joined = _evidence({"MPCapableSYNACKRX": 1, "MPJoinSynAckRx": 1, "SubflowStale": 1}, {"MPJoinAckRx": 1})
    assert joined.problem is None and joined.to_json()["two_subflows"] and joined.stale == 1
    plain = _evidence({}, {})
    assert plain.problem is not None and plain.problem.startswith("MPTCP fell back to plain TCP")
    fell_back = _evidence({"MPCapableSYNACKRX": 1, "MPJoinSynAckRx": 1}, {"MPJoinAckRx": 1, "MPCapableFallbackACK": 1})
    assert fell_back.problem is not None and "fallbacks 1" in fell_back.problem
    alone = _evidence({"MPCapableSYNACKRX": 1}, {})
    assert alone.problem == "no second subflow joined (joins answered 0, completed 0)"
    before = {"MPCapableSYNACKRX": 9, "MPJoinSynAckRx": 9}  # counters only ever count up: deltas matter
    assert labmptcp.subflow_evidence(before, before, {}, {"MPJoinAckRx": 1}).problem is not None


def test_setup_is_limits_on_both_sides_and_one_active_subflow_endpoint() -> None:
    setup = labmptcp.setup_commands("wifi0", "10.77.2.2")
    assert setup.client[-1] == ("ip", "mptcp", "endpoint", "add", "10.77.2.2", "dev", "wifi0", "subflow")
    limits = ("ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
    assert limits in setup.client and limits in setup.gateway
    assert not any("endpoint" in argv and "add" in argv for argv in setup.gateway)
    assert setup.to_json()["client"][-1] == "ip mptcp endpoint add 10.77.2.2 dev wifi0 subflow"


def test_the_busiest_path_is_the_fault_victim() -> None:
    assert labmptcp.busiest_path({"eth0": 50_000, "wifi0": 20_000}) == "eth0"
    assert labmptcp.busiest_path({"eth0": 10, "wifi0": 20_000}) == "wifi0"
    assert labmptcp.busiest_path({"eth0": 5, "wifi0": 5}) == "eth0"  # ties: the first given
    with pytest.raises(ValueError):
        labmptcp.busiest_path({})


def test_records_are_cut_from_the_byte_stream() -> None:
    size = labmptcp.RECORD_BYTES
    records, rest = labmptcp.split_records(b"a" * size + b"b" * size + b"c" * 5)
    assert records == [b"a" * size, b"b" * size] and rest == b"ccccc"
    assert labmptcp.split_records(b"") == ([], b"")


# -- the bench's handling of it (no lab built) --------------------------------------------------------------


def test_the_subflow_paths_are_the_two_lowest_metrics() -> None:
    assert bench.mptcp_paths(Lab(LabSpec(prefix="jvbnt001"))) == ("eth0", "wifi0")


def test_a_stream_is_not_a_figure_when_either_socket_fell_back() -> None:
    joined = _evidence({"MPCapableSYNACKRX": 1, "MPJoinSynAckRx": 1}, {"MPJoinAckRx": 1})
    good = bench.MptcpStream({"mptcp": {"fallback": False}, "received": 3}, {"mptcp": {"fallback": False}, "written": 3},
                             joined)  # fmt: skip
    assert good.problem is None and good.details()["records"] == {"written": 3, "received": 3, "in_order": None}
    sink_fell_back = attrs.evolve(good, sink={"mptcp": {"fallback": True}})
    assert sink_fell_back.problem == "MPTCP fell back to plain TCP (the sink's MPTCP_INFO says so)"


async def test_a_kernel_without_mptcp_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reason = "the kernel has no MPTCP (socket(IPPROTO_MPTCP): EPROTONOSUPPORT: Protocol not supported)"
    monkeypatch.setattr(labmptcp, "unavailable_reason", lambda: reason)
    async with contextlib.AsyncExitStack() as stack:
        result = await bench._bring_up(MPTCP, stack, tmp_path)
    assert isinstance(result, SystemResult)
    assert (result.status, result.reason) == (NOT_AVAILABLE, reason)
    assert result.figure(LINK_DOWN) is None


def _o(seconds: float, recovered: bool = True) -> Outage:
    return Outage(seconds=seconds, recovered=recovered, window_s=2.0, path="eth0",
                  details={"subflows": {"two_subflows": True}})  # fmt: skip


async def test_mptcp_gets_fault_trials_interleaved_and_no_throughput_test() -> None:
    lab = Lab(LabSpec(prefix="jvbnt002"))  # not opened: the trials are faked
    calls: list[tuple[str, str, str]] = []

    async def trial(fault: str, settings: BenchSettings, tag: str) -> Outage:
        calls.append((MPTCP, fault, tag))
        return _o(0.2)

    async def fake_tunnel_trial(fault: str, settings: BenchSettings, tag: str) -> Outage:
        calls.append((JVPN, fault, tag))
        return _o(0.3)

    mptcp = bench.Running(key=MPTCP, lab=lab, workdir=Path("."), target="10.99.0.1", version="kernel",
                          outage_trial=trial, throughput=False)  # fmt: skip
    other = bench.Running(key=JVPN, lab=lab, workdir=Path("."), target="10.99.0.1", version="x",
                          outage_trial=fake_tunnel_trial, throughput=False)  # fmt: skip
    settings = BenchSettings(runs=1, iperf_s=1.0, fault_s=1.0, systems=(JVPN, MPTCP), fault_runs=2)
    await bench._measure([other, mptcp], settings)
    assert calls == [
        (JVPN, LINK_DOWN, "link_down-1"), (MPTCP, LINK_DOWN, "link_down-1"),
        (JVPN, BLACKHOLE, "blackhole-1"), (MPTCP, BLACKHOLE, "blackhole-1"),
        (MPTCP, LINK_DOWN, "link_down-2"), (JVPN, LINK_DOWN, "link_down-2"),  # round 2 starts with the other
        (MPTCP, BLACKHOLE, "blackhole-2"), (JVPN, BLACKHOLE, "blackhole-2"),
    ]  # fmt: skip
    result = mptcp.result()
    assert result.status == MEASURED and result.tcp_mbit_runs == () and result.udp64_runs == ()
    assert {fault: len(runs) for fault, runs in result.outages.items()} == {LINK_DOWN: 2, BLACKHOLE: 2}


def test_an_mptcp_column_has_outages_a_ratio_and_says_what_its_outage_is() -> None:
    jvpn = SystemResult(key=JVPN, status=MEASURED, version="jvpn-trio", tcp_mbit_runs=(300.0,),
                        outages={LINK_DOWN: (_o(0.02),), BLACKHOLE: (_o(0.3),)})  # fmt: skip
    mptcp = SystemResult(key=MPTCP, status=MEASURED, version="Linux 6.18", details={"outage_measure": MPTCP_OUTAGE_MEASURE},
                         outages={LINK_DOWN: (_o(0.4),), BLACKHOLE: (_o(2.0, recovered=False),)})  # fmt: skip
    settings = BenchSettings(runs=1, iperf_s=3.0, fault_s=2.0, systems=(JVPN, MPTCP))
    host = {"cpus": 2, "kernel": "6.18", "loadavg_start": "1", "loadavg_end": "1"}
    report = bench.BenchReport(settings, (jvpn, mptcp, bench.wireguard_reference()), host, "2026-12-03 10:00", 30.0)
    text = bench.render_table(report)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ")}  # fmt: skip
    assert rows["metric"][:3] == ["jvpn-trio", "kernel MPTCP", "jvpn / MPTCP"]
    assert rows["TCP, one stream (Mbit/s, 1 run)"][1:3] == ["—", "—"]
    assert rows["TCP download, one stream (Mbit/s, 1 run)"][1:3] == ["—", "—"]  # no tunnel, no download either
    assert rows["outage, link down (s, 1 run)"][1:3] == ["0.400", "0.050×"]
    assert rows["outage, blackhole (s, 1 run)"][1:3] == ["> 2.000 (no recovery)", "≤ 0.15×"]
    assert f"- kernel MPTCP's outage: {MPTCP_OUTAGE_MEASURE}; its '> x (no recovery)'" in text
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["systems"][MPTCP]["outage"][LINK_DOWN]["runs"][0]["details"]["subflows"]["two_subflows"]
    assert doc["ratios"]["jvpn_over_mptcp"][LINK_DOWN] == {"value": 0.05, "bound": "="}
    assert doc["ratios"]["jvpn_over_mptcp"]["tcp_mbit"] is None
    assert doc["notes"]["mptcp"].startswith(f"outage = {MPTCP_OUTAGE_MEASURE}")


# -- the real thing: one link-down trial in a lab ---------------------------------------------------------

#: Short faults: enough for the stream to move to the other subflow or not; the figure is not asserted.
FAULT_S = 1.0


@requires_lab
async def test_a_link_down_trial_runs_over_two_real_subflows(tmp_path: Path) -> None:
    if labmptcp.unavailable_reason() is not None:
        pytest.fail(f"this kernel has no MPTCP: {labmptcp.unavailable_reason()}")  # the bench machines all do
    settings = BenchSettings(runs=1, iperf_s=1.0, fault_s=FAULT_S, systems=(MPTCP,), fault_runs=1)
    with trio.fail_after(60):
        async with open_lab(LabSpec(prefix=unique_prefix())) as lab:
            system = await bench.start_mptcp(lab, tmp_path)
            assert system.details["check"]["subflows"]["two_subflows"]
            await bench._outage_run(system, LINK_DOWN, settings, 0)
            (outage,) = system.outages[LINK_DOWN]
            endpoints = (await lab.run(lab.client_ns, "ip", "mptcp", "endpoint", "show")).stdout.decode()
            faults_left = [lab.faults(p) for p in lab.paths if not lab.faults(p).clear]
    assert "10.77.2.2" in endpoints and "subflow" in endpoints and "dev wifi0" in endpoints
    assert faults_left == []  # the trial restored its victim
    assert outage.path in ("eth0", "wifi0") and 0 < outage.window_s and outage.timeline is not None
    details: dict[str, Any] = dict(outage.details)
    assert details["subflows"]["two_subflows"] and details["subflows"]["client_joins"] >= 1
    for side in ("sink_mptcp_info", "source_mptcp_info"):
        info = details[side]
        assert info["fallback"] is False and info["subflows"] >= 1  # the join, seen by the socket itself
        assert info["subflows_total"] in (None, 2)
    # Causal: a byte stream delivers in order, nothing more than was written (a stall that outlasts the fault
    # and the sink's drain time may hold the last records back, so not necessarily all of them).
    records = details["records"]
    assert records["in_order"] and 0 < records["received"] <= records["written"]
    assert details["source_error"] is None and details["sink_error"] is None
    assert set(details["bytes_sent_before_fault"]) == {"eth0", "wifi0"}


@requires_lab
async def test_a_client_without_its_endpoint_is_reported_not_measured(tmp_path: Path) -> None:
    settings = BenchSettings(runs=1, iperf_s=1.0, fault_s=FAULT_S, systems=(MPTCP,), fault_runs=1)
    with trio.fail_after(60):
        async with open_lab(LabSpec(prefix=unique_prefix())) as lab:
            system = await bench.start_mptcp(lab, tmp_path)
            await lab.run(lab.client_ns, "ip", "mptcp", "endpoint", "flush")  # no second subflow any more
            with pytest.raises(BenchError, match="no second subflow joined"):
                await bench._outage_run(system, BLACKHOLE, settings, 0)
            assert all(lab.faults(p).clear for p in lab.paths)  # raised before any fault went on
    assert BLACKHOLE not in system.outages


def test_the_plots_show_mptcp_trials_and_say_what_they_are() -> None:
    from jvpn_trio.lab import plots

    mptcp = SystemResult(key=MPTCP, status=MEASURED, version="Linux 6.18",
                         outages={LINK_DOWN: (_o(0.4), _o(0.5)), BLACKHOLE: (_o(2.0, recovered=False),)})  # fmt: skip
    settings = BenchSettings(runs=1, iperf_s=3.0, fault_s=2.0, systems=(MPTCP,))
    report = bench.BenchReport(settings, (mptcp,), {"cpus": 2}, "2026-12-03 10:00", 30.0)
    data = plots.plot_data(json.loads(json.dumps(report.to_json())))
    assert "kernel MPTCP's outage: longest receive stall of a 1000 Hz stream of writes (no tunnel)" in data.notes
    link_down = next(p for p in data.outages if p.fault == LINK_DOWN)
    assert link_down.systems == ("kernel MPTCP",) and [t.seconds for t in link_down.trials] == [0.4, 0.5]
    assert all(bar.system != "kernel MPTCP" for panel in data.throughput for bar in panel.bars)  # no tunnel: no bars


def test_the_sink_report_says_whether_records_came_in_order() -> None:
    def report(seqs: list[int]) -> dict[str, Any]:
        arrivals = tuple((seq, 100.0 + seq / 1000) for seq in seqs)
        return labmptcp.StreamSinkReport(7, 100.0, 101.0, arrivals, 0, True, None, None).to_json()

    assert report([0, 1, 2])["in_order"] and report([0, 1, 2])["arrivals"][2] == [2, 0.002]
    assert not report([0, 2])["in_order"] and not report([1, 0])["in_order"]
    assert report([])["in_order"] and report([])["received"] == 0
