"""The lab's traffic tools: the pure analysis (exact numbers), the tools on loopback, and across a lab.

Pure tests use binary-exact floats so results compare with ``==``.  Loopback tests run the
tools in-process (no root) or as subprocesses through the real command line; the lab tests
need root (see ``tests/netns.py`` for the determinism rules) and route plainly between the
client and gateway namespaces, without any tunnel.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.lab import traffic
from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.traffic import (
    PATTERN_BLOCK_BYTES,
    BadProbe,
    Gap,
    Probe,
    decode_probe_untrusted,
    encode_probe,
    longest_gap,
    parse_endpoint,
    pattern_block,
    pattern_bytes,
    summarize_probes,
    traffic_argv,
)
from tests.netns import READY_POLL_S, lab, read_json, requires_lab, run_tool, start_server  # noqa: F401

TEST_TIMEOUT_S = 20


# -----------------------------------------------------------------------------
# longest_gap and summarize_probes (pure)
# -----------------------------------------------------------------------------


def test_longest_gap_without_arrivals_is_the_whole_window() -> None:
    assert longest_gap([], 1.0, 3.5) == Gap(1.0, 3.5)
    assert longest_gap([], 2.0, 2.0).seconds == 0.0


def test_longest_gap_between_arrivals() -> None:
    arrivals = [0.25, 0.5, 0.75, 2.0, 2.25]
    gap = longest_gap(arrivals, 0.0, 2.5)
    assert gap == Gap(0.75, 2.0)
    assert gap.seconds == 1.25


def test_longest_gap_counts_the_edges_of_the_window() -> None:
    assert longest_gap([0.25, 0.5], 0.0, 4.0) == Gap(0.5, 4.0)  # nothing after 0.5: outage until the end
    assert longest_gap([3.0, 3.25], 0.0, 3.5) == Gap(0.0, 3.0)  # nothing before 3.0


def test_longest_gap_ignores_order_and_arrivals_outside_the_window() -> None:
    assert longest_gap([2.0, -5.0, 1.0, 9.0, 1.5], 0.5, 2.5) == Gap(0.5, 1.0)


def test_longest_gap_ties_go_to_the_earliest() -> None:
    assert longest_gap([1.0, 2.0], 0.0, 3.0) == Gap(0.0, 1.0)


def test_longest_gap_rejects_an_inverted_window() -> None:
    with pytest.raises(ValueError):
        longest_gap([], 2.0, 1.0)


def test_summarize_counts_loss_duplicates_and_reordering() -> None:
    arrivals = [(0, 0.0), (1, 0.125), (3, 0.375), (2, 0.5), (3, 0.5), (7, 1.0), (99, 0.25)]
    summary = summarize_probes(arrivals, count=8, start=0.0, end=0.875)
    assert summary.expected == 8
    assert summary.received == 5  # 0, 1, 2, 3, 7 (99 is not part of the stream)
    assert summary.lost == 3  # 4, 5, 6
    assert summary.duplicates == 1
    assert summary.reordered == 1  # 2 after 3
    assert summary.longest_gap == Gap(0.5, 0.875)  # 7 arrived after the window closed


def test_summarize_an_empty_stream() -> None:
    summary = summarize_probes([], count=4, start=1.0, end=1.75)
    assert (summary.received, summary.lost, summary.longest_gap) == (0, 4, Gap(1.0, 1.75))


# -----------------------------------------------------------------------------
# Codecs and helpers (pure)
# -----------------------------------------------------------------------------


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.99.0.1:5000") == ("10.99.0.1", 5000)
    assert parse_endpoint("[::1]:53") == ("::1", 53)
    for bad in ("10.99.0.1", "host.example:80", "10.0.0.1:99999", ":80", "10.0.0.1:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    # The DNS tool's form: a bare address takes the default port.
    assert parse_endpoint("10.99.0.1", default_port=53) == ("10.99.0.1", 53)
    assert parse_endpoint("[fd00::1]", default_port=53) == ("fd00::1", 53)
    assert parse_endpoint("[fd00::1]:5353", default_port=53) == ("fd00::1", 5353)


def test_pattern_is_deterministic_and_block_aligned() -> None:
    seed = b"seed"
    assert pattern_block(seed, 0) == pattern_block(seed, 0) != pattern_block(b"other", 0)
    assert len(pattern_block(seed, 3)) == PATTERN_BLOCK_BYTES
    across = pattern_bytes(seed, PATTERN_BLOCK_BYTES - 10, 30)
    assert across == pattern_block(seed, 0)[-10:] + pattern_block(seed, 1)[:20]
    assert pattern_bytes(seed, 0, 0) == b""


def test_probe_round_trip() -> None:
    probe = Probe(stream_id=7, seq=3, count=10, hz=100.0, start=12.5, sent=12.53125)
    data = encode_probe(probe, 200)
    assert len(data) == 200
    assert decode_probe_untrusted(data) == probe
    assert probe.end == 12.5 + 9 / 100.0


def test_probe_decoder_raises_only_bad_probe() -> None:
    rng = random.Random(1234)
    good = encode_probe(Probe(stream_id=1, seq=0, count=1, hz=1.0, start=0.0, sent=0.0))
    samples = [b"", b"JVP1", good[:-30], b"XXXX" + good[4:]]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(80))) for _ in range(300)]
    samples += [bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.1 else b for b in good) for _ in range(300)]
    for data in samples:
        try:
            decode_probe_untrusted(data)
        except BadProbe:
            pass
    bad_count = traffic.PROBE_HEADER.pack(traffic.PROBE_MAGIC, 1, 5, 5, 1.0, 0.0, 0.0)  # seq == count
    with pytest.raises(BadProbe):
        decode_probe_untrusted(bad_count)
    nan_hz = traffic.PROBE_HEADER.pack(traffic.PROBE_MAGIC, 1, 0, 5, float("nan"), 0.0, 0.0)
    with pytest.raises(BadProbe):
        decode_probe_untrusted(nan_hz)


# -----------------------------------------------------------------------------
# The tools on loopback (no root)
# -----------------------------------------------------------------------------


async def test_tcp_source_and_sink_agree_on_loopback() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            reports: dict[str, traffic.TcpReport] = {}

            async def sink(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                reports["sink"] = await traffic.run_tcp_sink(("127.0.0.1", 0), timeout_s=10, task_status=task_status)

            address = await nursery.start(sink)
            reports["source"] = await traffic.run_tcp_source(address, nbytes=300_000, rate_mbit=100, seed=b"x")
    source, received = reports["source"], reports["sink"]
    assert source.ok and received.ok
    assert source.bytes == received.bytes == 300_000
    assert source.sha256 == received.sha256
    assert bytes.fromhex(source.sha256) == hashlib.sha256(pattern_bytes(b"x", 0, 300_000)).digest()


async def test_tcp_sink_records_a_reset() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            reports: dict[str, traffic.TcpReport] = {}

            async def sink(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                reports["sink"] = await traffic.run_tcp_sink(("127.0.0.1", 0), timeout_s=10, task_status=task_status)

            address = await nursery.start(sink)
            client = trio.socket.socket()
            await client.connect(address)
            await client.send(b"hello")
            # SO_LINGER with a zero timeout turns close() into a RST.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
    report = reports["sink"]
    assert report.reset is True
    assert report.error is not None and "ECONNRESET" in report.error
    assert not report.ok


async def test_udp_probe_stream_on_loopback() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            sinks: list[traffic.ProbeSinkReport] = []

            async def sink(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                report = await traffic.run_udp_probe_sink(
                    ("127.0.0.1", 0), timeout_s=5, linger_s=0.1, task_status=task_status
                )
                sinks.append(report)

            address = await nursery.start(sink)
            source = await traffic.run_udp_probe_source(address, hz=200, duration_s=0.25)
    (report,) = sinks
    assert source.count == 50 and source.sent + source.send_errors == 50
    assert report.stream_id == source.stream_id and report.summary is not None
    assert report.summary.expected == 50
    assert report.summary.received + report.summary.lost == 50
    assert report.summary.received > 0
    assert 0 < report.summary.longest_gap.seconds <= 0.25 * (1 + 1e-9)
    as_json = report.to_json()
    assert len(as_json["arrivals"]) == report.summary.received + report.summary.duplicates


def _cli(*args: str, timeout: float = TEST_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    # A blocking subprocess in a sync test: nothing else runs on this thread.
    return subprocess.run(traffic_argv(*args), capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_reports_an_empty_probe_window(tmp_path: Path) -> None:
    report = tmp_path / "sink.json"
    result = _cli("udp-probe-sink", "--listen", "127.0.0.1:0", "--timeout", "0.2", "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = read_json(report)
    assert data["received"] == 0 and data["expected"] is None and data["error"] is None


def test_cli_failure_is_one_line_and_still_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:  # find a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = tmp_path / "source.json"
    result = _cli(
        "tcp-source", "--connect", f"127.0.0.1:{port}", "--bytes", "10", "--rate-mbit", "1",
        "--connect-timeout", "0.2", "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("jvpn_trio.lab.traffic tcp-source: ")
    data = read_json(report)
    assert data["bytes"] == 0 and data["reset"] is False and "refused" in data["error"]


def test_cli_rejects_bad_arguments() -> None:
    result = _cli("tcp-source", "--connect", "nowhere", "--bytes", "1", "--rate-mbit", "1", "--report", "x")
    assert result.returncode == 2
    assert "ADDRESS:PORT" in result.stderr


def test_module_runs_as_a_script() -> None:
    assert traffic_argv("udp-ping")[:3] == [sys.executable, "-m", "jvpn_trio.lab.traffic"]


# -----------------------------------------------------------------------------
# Across a lab, plain routing (no tunnel)
# -----------------------------------------------------------------------------


@requires_lab
async def test_tcp_transfer_across_the_lab_is_intact(lab: Lab, tmp_path: Path) -> None:
    nbytes = 4_000_000
    with trio.fail_after(TEST_TIMEOUT_S):
        sink = await start_server(
            lab, lab.gateway_ns, "tcp-sink", f"{lab.gateway_address}:5001", "--timeout", "15",
            tmp_path=tmp_path, name="tcp-sink",
        )  # fmt: skip
        code, source = await run_tool(
            lab, lab.client_ns, "tcp-source", "--connect", f"{lab.gateway_address}:5001",
            "--bytes", str(nbytes), "--rate-mbit", "200", "--timeout", "15", tmp_path=tmp_path, name="tcp-source",
        )  # fmt: skip
        received = await sink.finish()
    assert code == 0, source
    assert sink.process.returncode == 0
    assert source["bytes"] == received["bytes"] == nbytes
    assert source["sha256"] == received["sha256"]
    assert source["reset"] is received["reset"] is False
    assert source["error"] is received["error"] is None


@requires_lab
async def test_probe_stream_shows_the_gap_of_a_link_down(lab: Lab, tmp_path: Path) -> None:
    hz, duration = 100, 2.0
    with trio.fail_after(TEST_TIMEOUT_S):
        first_probe = tmp_path / "first-probe"
        sink = await start_server(
            lab, lab.gateway_ns, "udp-probe-sink", f"{lab.gateway_address}:5002", "--timeout", "10",
            "--first-probe", str(first_probe), tmp_path=tmp_path, name="probe-sink",
        )  # fmt: skip
        source_report = tmp_path / "probe-source.json"
        # Pinned to eth0, so the kernel cannot route around the dead link.
        source = await lab.start_process(
            lab.client_ns,
            traffic_argv(
                "udp-probe-source", "--connect", f"{lab.gateway_address}:5002", "--hz", str(hz),
                "--duration", str(duration), "--device", "eth0", "--report", str(source_report),
            ),  # fmt: skip
        )
        # Take the link down a little after the stream has started to arrive.
        while not first_probe.exists():
            assert source.returncode is None, "the probe source stopped before a probe arrived"
            await trio.sleep(READY_POLL_S)
        await trio.sleep(0.3)
        await lab.link_down("eth0")
        await trio.sleep(0.5)
        await lab.link_up("eth0")
        assert await source.wait() == 0
        sink_data = await sink.finish()
    source_data = read_json(source_report)
    expected = round(hz * duration)
    assert source_data["count"] == expected
    assert source_data["sent"] + source_data["send_errors"] == expected
    assert source_data["send_errors"] > 0  # sends during the outage failed (ENETDOWN / ENETUNREACH)
    assert sink_data["stream_id"] == source_data["stream_id"]
    assert sink_data["expected"] == expected
    assert sink_data["received"] + sink_data["lost"] == expected
    assert sink_data["received"] <= source_data["sent"]
    assert sink_data["lost"] >= source_data["send_errors"]
    assert len(sink_data["arrivals"]) == sink_data["received"] + sink_data["duplicates"]
    # Causal, not a timing assertion: nothing was sent while the link was down for 0.5 s,
    # so the longest gap is far above the 10 ms probe spacing.
    assert 0.1 < sink_data["longest_gap_s"] <= duration
    assert 0.0 <= sink_data["gap_start_s"] < sink_data["gap_end_s"] <= duration
