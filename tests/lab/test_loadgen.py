"""``jvpn-trio loadgen``: the pure parts (sizes, endpoints, packets, /proc text, table), plus one root run.

The pure tests use fixed inputs and no clock.  The root test runs the real thing (a gateway
process in a namespace lab, the worker speaking the protocol from 50 source ports) and checks
the report's shape and that the gateway itself counts the sessions; never how fast it was.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import trio

from jvpn_trio.cli import build_parser
from jvpn_trio.config import load_gateway_config
from jvpn_trio.keyfile import generate_private_key_text, write_private_key
from jvpn_trio.lab import loadgen
from jvpn_trio.lab.loadgen import (
    LoadSettings,
    SizeResult,
    WorkerPlan,
    endpoints_needed,
    icmp_echo_reply_untrusted,
    icmp_echo_request,
    kib_per_session,
    loss_pct,
    parse_cpu_ticks,
    parse_sizes,
    parse_vm_rss_kib,
    percentile,
    render_table,
    source_endpoint,
    source_hosts,
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
    settings = loadgen.settings_from_args(args)
    assert settings.sizes == (50,) and settings.window == 8
    assert settings.live_hz == loadgen.DEFAULT_LIVE_HZ


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


# -- config, plan, table ------------------------------------------------------------------------


def test_the_gateway_config_loads_with_one_peer_per_key(tmp_path: Path) -> None:
    write_private_key(tmp_path / "gateway.key", generate_private_key_text(os.urandom))
    keys = [loadgen.base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 4)]
    (tmp_path / "gateway.toml").write_text(
        loadgen.gateway_config_text(public_keys=keys, listen="10.99.0.1:51820", directory=tmp_path)
    )
    config = load_gateway_config(tmp_path / "gateway.toml")
    assert [p.name for p in config.peers] == ["load0", "load1", "load2"]
    assert config.policy.transport_loss_ttl_ms == loadgen.LOAD_POLICY["transport_loss_ttl_ms"]
    assert config.nat is False and config.events_file is not None


def test_plan_round_trips_through_json() -> None:
    plan = WorkerPlan(
        gateway_public="x", gateway_host="10.99.0.1", gateway_tunnel="10.64.0.1", keys_file="k", hosts=("10.77.1.10",),
        sizes=(20, 50), window=8, reattaches=10, settle_s=1.0, idle_s=1.0, live_s=1.0, live_hz=100.0,
        phase_timeout_s=60.0, gateway_pid=1,
    )  # fmt: skip
    assert WorkerPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_table_shows_every_size_and_a_missing_figure_as_na() -> None:
    size = SizeResult(sessions=1000, established=1000, handshakes_per_s=512.0, rss_kib=80_000).to_json()
    report = {
        "started_utc": "2026-12-02 10:00", "host": {"cpus": 2}, "peers": 1000, "gateway_startup_s": 1.0,
        "rss0_kib": 60_000, "sizes": [size], "gateway_session_count": 1000, "policy": dict(loadgen.LOAD_POLICY),
    }  # fmt: skip
    table = render_table(report)
    assert "| 1,000 | 1,000 | 512 | 78.1 | n/a |" in table
    assert "gateway status: 1000 sessions" in table
    assert not loadgen.short_of_target(report)


# -- the real thing -----------------------------------------------------------------------------


@requires_lab
async def test_fifty_sessions_are_established_and_measured(tmp_path: Path) -> None:
    settings = LoadSettings(
        sizes=(20, 50), window=16, reattaches=5, settle_s=0.2, idle_s=0.5, live_s=1.0, phase_timeout_s=60.0,
        workdir=tmp_path,
    )  # fmt: skip
    with trio.fail_after(180):
        report = await loadgen.run_load(settings)
    assert [s["sessions"] for s in report["sizes"]] == [20, 50]
    assert report["gateway_session_count"] == 50  # the gateway's own count (status --json)
    last = report["sizes"][-1]
    assert last["established"] == 50 and not last["timed_out"]
    assert last["handshakes_per_s"] > 0 and last["rss_kib"] > 0 and last["kib_per_session"] is not None
    assert last["reattach_sent"] == 5 and last["reattach_acked"] == 5
    assert last["live_sent"] == int(settings.live_s * settings.live_hz) and last["live_received"] > 0
    assert (tmp_path / "gateway-events.jsonl").stat().st_size > 0  # the event sink was on
    assert "| 50 | 50 |" in render_table(report)
