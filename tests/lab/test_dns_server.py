"""The lab's tiny DNS responder (lab/dns_server.py): the codec, real UDP on loopback, and the command line.

Determinism rules: servers bind 127.0.0.1 port 0 and are used only once bound
(``nursery.start`` in process, the ready file for the command); one socket
serves datagrams in order, so garbage sent before a good query has been counted
once that query's answer is back.  Servers stop by ``stop``, ``--max`` or
SIGTERM, never by waiting out a timeout.  Every test is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio.lab.dns_server import (
    EDNS_PAYLOAD_BYTES,
    HEADER,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    BadMessage,
    Question,
    answers_for,
    build_query,
    build_response,
    dns_server_argv,
    nameservers_of,
    parse_query_untrusted,
    parse_response_untrusted,
    run_dns_query,
    run_dns_server,
)

TIMEOUT = 10.0
V4 = ipaddress.ip_address("10.77.0.7")
V6 = ipaddress.ip_address("fd77::7")
TABLE = {"vpn.test": (V4, V6), "v4only.test": (V4,)}


def test_a_query_round_trips_and_its_question_is_echoed_byte_for_byte() -> None:
    data = build_query("VPN.Test", TYPE_A, query_id=0x1234)
    query = parse_query_untrusted(data)
    assert query.query_id == 0x1234 and not query.edns
    assert query.question == Question("vpn.test", TYPE_A, 1)
    assert query.question_bytes == b"\x03VPN\x04Test\x00\x00\x01\x00\x01"  # case kept for the echo

    rcode, addresses = answers_for(query.question, TABLE)
    response = build_response(query, rcode, addresses, ttl=30)
    assert response[HEADER.size : HEADER.size + len(query.question_bytes)] == query.question_bytes
    parsed = parse_response_untrusted(response, query_id=0x1234)
    assert (parsed.rcode, parsed.addresses) == (RCODE_NOERROR, (V4,))
    _id, flags, *_counts = HEADER.unpack_from(response)
    assert flags == 0x8000 | 0x0400 | 0x0100 | 0x0080  # QR, AA, RD copied, RA


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "expected"),
    [
        ("vpn.test", TYPE_AAAA, RCODE_NOERROR, (V6,)),
        ("v4only.test", TYPE_AAAA, RCODE_NOERROR, ()),  # NODATA
        ("vpn.test", 15, RCODE_NOERROR, ()),  # MX: NODATA
        ("elsewhere.test", TYPE_A, RCODE_NXDOMAIN, ()),
    ],
)
def test_answers_by_name_and_type(name: str, qtype: int, rcode: int, expected: tuple[object, ...]) -> None:
    query = parse_query_untrusted(build_query(name, qtype, query_id=7))
    got = answers_for(query.question, TABLE)
    assert got == (rcode, expected)
    parsed = parse_response_untrusted(build_response(query, *got), query_id=7)
    assert (parsed.rcode, parsed.addresses) == got


def test_an_edns_query_gets_an_opt_record_back() -> None:
    query = parse_query_untrusted(build_query("vpn.test", TYPE_A, query_id=9, edns=True))
    assert query.edns
    response = build_response(query, *answers_for(query.question, TABLE))
    assert HEADER.unpack_from(response)[5] == 1  # ARCOUNT
    assert response.endswith(b"\x00\x00\x29" + EDNS_PAYLOAD_BYTES.to_bytes(2, "big") + bytes(6))
    assert parse_response_untrusted(response, query_id=9).addresses == (V4,)


GOOD = build_query("vpn.test", TYPE_A, query_id=1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        GOOD[:11],
        GOOD[:-1],  # question cut short
        GOOD + b"\x00",  # trailing garbage
        GOOD[:2] + b"\x81\x00" + GOOD[4:],  # a response
        GOOD[:2] + b"\x28\x00" + GOOD[4:],  # opcode 5 (UPDATE)
        GOOD[:4] + b"\x00\x02" + GOOD[6:],  # two questions
        GOOD[:4] + b"\x00\x00" + GOOD[6:],  # none
        GOOD[:12] + b"\xc0\x0c" + GOOD[-4:],  # a compression pointer in the question
        GOOD[:12] + b"\x40" + b"a" * 64 + b"\x00" + GOOD[-4:],  # a 64-byte label
        HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
        GOOD[:10] + b"\x00\x01" + GOOD[12:] + b"\x00\x00\x01",  # an additional record that is not OPT
    ],
)
def test_malformed_queries_raise_bad_message(data: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_query_untrusted(data)


@given(st.binary(max_size=300))
def test_garbage_only_ever_raises_bad_message(data: bytes) -> None:
    for parse in (parse_query_untrusted, lambda d: parse_response_untrusted(d, query_id=1)):
        try:
            parse(data)
        except BadMessage:
            pass


@given(st.binary(max_size=40))
def test_a_good_header_with_garbage_behind_it_only_raises_bad_message(tail: bytes) -> None:
    for data in (GOOD[:12] + tail, HEADER.pack(1, 0x8000, 1, 3, 0, 0) + tail):
        try:
            parse_query_untrusted(data)
            parse_response_untrusted(data, query_id=1)
        except BadMessage:
            pass


def test_nameservers_are_read_from_resolv_conf_text() -> None:
    text = "# comment\nnameserver 10.77.0.53\nnameserver not-an-address\nsearch x\nnameserver fd77::53 \n"
    assert nameservers_of(text) == ["10.77.0.53", "fd77::53"]


async def test_queries_over_udp_are_answered_and_every_datagram_is_counted_by_asker() -> None:
    stop = trio.Event()
    reports: list[object] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
                reports.append(await run_dns_server(("127.0.0.1", 0), answers=TABLE, stop=stop,
                                                    task_status=task_status))  # fmt: skip

            server = await nursery.start(serve)
            a = await run_dns_query(server, "vpn.test")
            aaaa = await run_dns_query(server, "vpn.test", qtype=TYPE_AAAA)
            missing = await run_dns_query(server, "nowhere.test")
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                for garbage in (b"", b"\x00" * 5, GOOD + b"junk", GOOD[:2] + b"\x81\x00" + GOOD[4:]):
                    await raw.sendto(garbage, server)
            after = await run_dns_query(server, "v4only.test")  # answered after the garbage was counted
            stop.set()

    assert (a.rcode, a.addresses, a.ok) == ("NOERROR", ("10.77.0.7",), True)
    assert (aaaa.rcode, aaaa.addresses) == ("NOERROR", ("fd77::7",))
    assert (missing.rcode, missing.addresses, missing.ok) == ("NXDOMAIN", (), False)
    assert after.ok
    (report,) = reports
    data = report.to_json()  # type: ignore[attr-defined]
    assert {k: data[k] for k in ("datagrams", "queries", "answered", "nodata", "nxdomain", "malformed", "askers")} == {
        "datagrams": 8, "queries": 4, "answered": 3, "nodata": 0, "nxdomain": 1, "malformed": 4,
        "askers": {"127.0.0.1": 8},
    }  # fmt: skip
    assert data["names"] == {"vpn.test": 2, "nowhere.test": 1, "v4only.test": 1}
    assert [(e["name"], e["type"], e["rcode"], e["answers"]) for e in data["log"]] == [
        ("vpn.test", "A", "NOERROR", 1), ("vpn.test", "AAAA", "NOERROR", 1),
        ("nowhere.test", "A", "NXDOMAIN", 0), ("v4only.test", "A", "NOERROR", 1),
    ]  # fmt: skip
    assert all(e["from"].startswith("127.0.0.1:") for e in data["log"]) and data["error"] is None


async def test_a_query_to_a_silent_server_times_out_as_a_report_not_an_exception(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent, trio.fail_after(TIMEOUT):
        await silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        report = await run_dns_query(("127.0.0.1", port), "vpn.test", timeout_s=2.0)
    assert report.error == f"no answer from 127.0.0.1:{port} within 2 s" and not report.ok


async def test_the_command_serves_until_sigterm_and_writes_its_report(tmp_path: Path) -> None:
    ready, report = tmp_path / "dns.ready", tmp_path / "dns.json"
    argv = dns_server_argv("serve", "--listen", "127.0.0.1:0", "--answer", "vpn.test=10.77.0.7",
                           "--answer", "VPN.test.=fd77::7", "--ready", str(ready), "--report", str(report))  # fmt: skip
    with trio.fail_after(TIMEOUT):
        process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
        try:
            while not ready.exists():
                assert process.poll() is None, "the server exited before it was ready"
                await trio.sleep(0.01)
            endpoint = ready.read_text().strip()
            query = await trio.run_process(
                dns_server_argv("query", "--server", endpoint, "--name", "vpn.test", "--type", "AAAA"),
                capture_stdout=True, check=False,
            )  # fmt: skip
            assert query.returncode == 0
            assert json.loads(query.stdout)["addresses"] == ["fd77::7"]
            missing = await trio.run_process(
                dns_server_argv("query", "--server", endpoint, "--name", "nowhere.test"),
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert missing.returncode == 1
            assert missing.stderr.decode() == (
                f"jvpn_trio.lab.dns_server query: {endpoint} answered NXDOMAIN with no address\n"
            )
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            process.kill()
            await process.wait()
    data = json.loads(report.read_text())
    assert (data["queries"], data["answered"], data["nxdomain"], data["askers"]) == (2, 1, 1, {"127.0.0.1": 2})
    assert data["listen"] == endpoint


async def test_the_command_stops_after_max_queries_by_itself(tmp_path: Path) -> None:
    ready, report = tmp_path / "dns.ready", tmp_path / "dns.json"
    argv = dns_server_argv("serve", "--listen", "127.0.0.1:0", "--answer", "vpn.test=10.77.0.7", "--max", "1",
                           "--ready", str(ready), "--report", str(report))  # fmt: skip
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            done = await nursery.start(_run_to_end, argv)
            while not ready.exists():
                await trio.sleep(0.01)
            endpoint = ready.read_text().strip()
            (host, port) = endpoint.rsplit(":", 1)
            answered = await run_dns_query((host, int(port)), "vpn.test")
            assert answered.ok
            await done.wait()
    assert json.loads(report.read_text())["queries"] == 1


async def _run_to_end(argv: list[str], task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED) -> None:
    done = trio.Event()
    task_status.started(done)
    result = await trio.run_process(argv, check=False)
    assert result.returncode == 0
    done.set()


def test_bad_arguments_exit_2_and_a_port_in_use_is_one_line_and_a_report(tmp_path: Path) -> None:
    bad = subprocess.run(dns_server_argv("serve", "--listen", "nowhere:53", "--report", "x"),
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert bad.returncode == 2 and "expected a literal IP address" in bad.stderr
    bad = subprocess.run(dns_server_argv("serve", "--listen", "127.0.0.1:0", "--answer", "x", "--report", "x"),
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert bad.returncode == 2 and "expected NAME=ADDRESS" in bad.stderr

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        report = tmp_path / "r.json"
        busy = subprocess.run(dns_server_argv("serve", "--listen", f"127.0.0.1:{port}", "--report", str(report)),
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert busy.returncode == 1
    assert busy.stderr == (f"jvpn_trio.lab.dns_server serve: cannot listen on 127.0.0.1:{port}: "
                           "Address already in use\n")  # fmt: skip
    assert json.loads(report.read_text())["error"].endswith("Address already in use")


def test_query_reads_the_first_nameserver_of_a_resolv_conf(tmp_path: Path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("search x\n")
    result = subprocess.run(dns_server_argv("query", "--name", "vpn.test", "--resolv-conf", str(empty)),
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"jvpn_trio.lab.dns_server query: no nameserver in {empty}\n"
    assert json.loads(result.stdout)["error"] == f"no nameserver in {empty}"
