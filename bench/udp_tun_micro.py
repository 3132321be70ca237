"""Micro-benchmark of the UDP and TUN drivers: datagrams (or packets) per second.

    python bench/udp_tun_micro.py [--seconds 2] [--size 1200] [--json out.json]

Prints a table, then the same numbers as JSON (to stdout, or to --json FILE).
UDP runs on loopback in the root namespace, without root:

* ``send_nowait``: one Trio task calls ``PathSocket.send_nowait`` in a tight loop
  (a checkpoint every 64 sends) towards a socket nobody reads.
* ``send_segments_nowait``: the same with 32-segment GSO batches (segments/s).
* ``recv_batch``: a child process blasts datagrams with a blocking stdlib socket;
  one Trio task counts what ``recv_batch(64)`` returns.  The rate is what was
  received, so it is bounded by the sender too (2 CPUs: the numbers are
  noisy, +-20 % as platform-notes section 4 says).
* ``recv_batch+GRO``: the child sends 32-segment GSO batches to a GRO socket.

With root, ``tun echo`` also runs: inside a throwaway namespace ``jvtu-bench-*``
one Trio task writes 32 ICMP echo requests to a TUN device with
``write_nowait`` and reads the kernel's 32 replies with ``read_batch(64)``,
in a loop (packets/s counted in each direction).  The namespace is removed at
the end.  This is a benchmark: it measures wall-clock time on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import struct
import sys
import time
from typing import Any

import trio

from jvpn_trio.drivers.tun import open_tun
from jvpn_trio.drivers.udp import SendResult, open_listener_socket

_GSO_SEGMENTS = 32

_BLASTER = r"""
import socket, struct, sys, time
port, size, seconds, gso = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = ("127.0.0.1", port)
payload = b"b" * size
cmsg = [(socket.IPPROTO_UDP, 103, struct.pack("=H", size))]
burst = payload * gso
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(64):
        if gso:
            s.sendmsg([burst], cmsg, 0, dst)
        else:
            s.sendto(payload, dst)
"""


async def bench_send(seconds: float, size: int, *, gso: bool) -> dict[str, Any]:
    payload = b"s" * size
    segments = [payload] * _GSO_SEGMENTS
    async with open_listener_socket(("127.0.0.1", 0), rcvbuf=4096) as sink, \
            open_listener_socket(("127.0.0.1", 0)) as sender:
        dst = sink.local_address
        sent = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                if gso:
                    sent += sender.send_segments_nowait(segments, dst).sent
                elif sender.send_nowait(payload, dst) is SendResult.OK:
                    sent += 1
            await trio.lowlevel.checkpoint()
        elapsed = time.perf_counter() - start
        stats = sender.statistics()
    return {"datagrams": sent, "seconds": elapsed, "rate": sent / elapsed,
            "would_block": stats.sends_would_block, "errors": dict(stats.send_errors)}


async def bench_recv(seconds: float, size: int, *, gro: bool) -> dict[str, Any]:
    async with open_listener_socket(("127.0.0.1", 0), gro=gro) as sock:
        port = sock.local_address[1]
        received = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.run_process, [sys.executable, "-c", _BLASTER, str(port), str(size),
                                                  str(seconds + 0.5), str(_GSO_SEGMENTS if gro else 0)])
            first = await sock.recv_batch(64)  # start timing once the child is sending
            start = time.perf_counter()
            deadline = start + seconds
            while time.perf_counter() < deadline:
                received += len(await sock.recv_batch(64))
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        stats = sock.statistics()
    del first
    return {"datagrams": received, "seconds": elapsed, "rate": received / elapsed,
            "wakeups": stats.recv_wakeups, "max_batch": stats.max_batch,
            "gro_buffers": stats.gro_buffers}


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(seq: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4A56, seq & 0xFFFF) + b"x" * 56
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq & 0xFFFF, 0x4000, 64, 1, 0,
                         socket.inet_aton("10.233.0.2"), socket.inet_aton("10.233.0.1"))
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + icmp


async def bench_tun(seconds: float) -> dict[str, Any]:
    requests = [_echo_request(i) for i in range(32)]
    async with open_tun(f"jvtu{secrets.token_hex(3)}", address="10.233.0.1", prefixlen=24, mtu=1400) as tun:
        written = read = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for packet in requests:
                written += tun.write_nowait(packet)
            pending = len(requests)
            while pending > 0:
                got = await tun.read_batch(64)
                read += len(got)
                pending -= sum(1 for p in got if p[0] >> 4 == 4)
        elapsed = time.perf_counter() - start
        stats = tun.statistics()
    return {"packets_written": written, "packets_read": read, "seconds": elapsed,
            "rate": written / elapsed, "max_batch": stats.max_batch, "read_wakeups": stats.read_wakeups}


def _tun_in_netns(seconds: float) -> dict[str, Any] | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        return None
    from pyroute2 import IPRoute, netns

    name = f"jvtu-bench-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            return trio.run(bench_tun, seconds)
        finally:
            netns.popns()
    finally:
        netns.remove(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--size", type=int, default=1200, help="UDP payload bytes")
    parser.add_argument("--json", metavar="FILE", help="write the JSON there instead of stdout")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "send_nowait": trio.run(lambda: bench_send(args.seconds, args.size, gso=False)),
        "send_segments_nowait": trio.run(lambda: bench_send(args.seconds, args.size, gso=True)),
        "recv_batch": trio.run(lambda: bench_recv(args.seconds, args.size, gro=False)),
        "recv_batch+GRO": trio.run(lambda: bench_recv(args.seconds, args.size, gro=True)),
    }
    tun = _tun_in_netns(args.seconds)
    if tun is not None:
        results["tun echo"] = tun

    print(f"{'benchmark':<22} {'per second':>12}  {'count':>10}  notes")
    for key, r in results.items():
        count = r.get("datagrams", r.get("packets_written"))
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("datagrams", "packets_written", "seconds",
                                                                       "rate"))
        print(f"{key:<22} {r['rate']:>12,.0f}  {count:>10,}  {notes}")
    if tun is None:
        print("tun echo: skipped (needs root and /dev/net/tun)")

    document = {"python": platform.python_version(), "kernel": platform.release(), "size": args.size,
                "seconds": args.seconds, "results": results}
    text = json.dumps(document, indent=2, sort_keys=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
