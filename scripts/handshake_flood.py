"""Measure a real gateway under a HANDSHAKE_INIT flood (issue 15; docs/threat-model.md, "Handshake floods").

usage (root): python scripts/handshake_flood.py [SECONDS] [RATE] [MODE ...]
  MODE: random (spoofed random sources) and/or single (one spoofed source); default both.
        junk: instead of inits, REATTACHes that fail authentication but name the live session's
        receiver index (it travels in clear: sniffed from the client's own PROBEs), the attack on
        the log (docs/threat-model.md, "Floods that aim at the log").

A lab (namespaces, real ``serve`` and ``up``) with a live session; from the
client namespace ``ping -i 0.01`` through the tunnel (100 Hz) for the whole
flood; from the gateway namespace a raw-socket flood of inits with a valid
mac1 from an unknown static key (the attacker knows the gateway's public key,
as every client does), and, halfway through, a second configured peer's
handshake timed to the HANDSHAKE_RESP (cookie reply and mac2 retry included).
Prints one JSON line per mode, with the gateway's event log growth (bytes, and the most in any
one second).  The ``attack`` and ``newcomer`` sub-commands
are what runs inside the gateway namespace.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONTROL_PORT = 51821  # lab PORT + the default control port offset
#: Inits sent per tick; ticks are TICK_S apart.
TICK_S = 0.01
#: Distinct inits the flood cycles through (each costs the attacker two X25519 to make).
DISTINCT_INITS = 256
#: How long the newcomer waits for an answer before it sends a fresh init (the default handshake retry).
NEWCOMER_RETRY_S = 1.0


def _gateway_public(directory: Path) -> bytes:
    from jvpn_trio.keyfile import load_public_key_text

    text = (directory / "client.toml").read_text()
    match = re.search(r'gateway_public_key = "([^"]+)"', text)
    assert match is not None
    return load_public_key_text(match.group(1))


def attack(gateway: str, rate: int, seconds: float, mode: str, directory: str, out: str) -> None:
    """Raw IPv4/UDP inits to the control port from random (or one) spoofed sources."""
    from jvpn_trio.core import wire
    from jvpn_trio.core.ids import PathId
    from jvpn_trio.core.noise import InitiatorHandshake, generate_static

    public = _gateway_public(Path(directory))
    junk = generate_static(os.urandom)
    inits = []
    for i in range(DISTINCT_INITS):
        _, init = InitiatorHandshake.create(
            junk, public, sender_index=i, random_bytes=os.urandom, wall_time_ns=time.time_ns(), path_id=PathId(1)
        )
        inits.append(wire.encode_handshake_init(init))
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sock.setblocking(False)
    dst = socket.inet_aton(gateway)
    rng = random.Random(20)

    def datagram(n: int) -> tuple[bytes, tuple[str, int]]:
        if mode == "random":
            src = struct.pack("!I", rng.randrange(0x0B000000, 0xDF000000))  # 11.0.0.0 .. 222.255.255.255
            sport = rng.randrange(1024, 65536)
        else:
            src, sport = socket.inet_aton("198.18.0.66"), 6666
        payload = inits[n % DISTINCT_INITS]
        udp = struct.pack("!HHHH", sport, CONTROL_PORT, 8 + len(payload), 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0, 64, 17, 0, src, dst)
        return ip + udp + payload, (gateway, 0)

    Path(out).write_text(json.dumps(_paced(sock, datagram, rate, seconds)))


def _paced(sock: socket.socket, datagram: Any, rate: int, seconds: float) -> dict[str, Any]:
    """Send ``datagram(n)`` at ``rate`` a second for ``seconds`` on the non-blocking ``sock``."""
    per_tick = max(1, round(rate * TICK_S))
    sent = blocked = tick = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(per_tick):
            try:
                sock.sendto(*datagram(sent))
                sent += 1
            except BlockingIOError:
                blocked += 1
        tick += 1
        delay = start + tick * TICK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start
    return {"sent": sent, "send_blocked": blocked, "seconds": round(elapsed, 2), "rate": round(sent / elapsed)}


#: How long the junk after a REATTACH's transport header is (a real one's sealed body is longer).
JUNK_BYTES = 96


def _sniff_receiver_index(gateway: str) -> tuple[int, int, int]:
    """(version, receiver index, destination port) of the first PROBE to ``gateway`` seen on the wire."""
    from jvpn_trio.core.wire import MessageType

    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sniff.settimeout(10)
    target = socket.inet_aton(gateway)
    try:
        while True:
            frame = sniff.recv(65535)
            if frame[12:14] != b"\x08\x00":  # IPv4 over Ethernet only
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17 or ip[16:20] != target:
                continue
            udp = ip[ihl:]
            payload = udp[8:]
            if len(payload) >= 16 and payload[1] == MessageType.PROBE:
                return payload[0], struct.unpack("!I", payload[4:8])[0], struct.unpack("!H", udp[2:4])[0]
    finally:
        sniff.close()


def junk(gateway: str, rate: int, seconds: float, out: str) -> None:
    """REATTACHes that name the live receiver index and fail authentication, at ``rate`` a second."""
    from jvpn_trio.core.wire import MessageType

    version, index, port = _sniff_receiver_index(gateway)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    rng = random.Random(15)

    def datagram(_n: int) -> tuple[bytes, tuple[str, int]]:
        header = struct.pack("!BBHIQ", version, MessageType.REATTACH, 0, index, rng.getrandbits(64))
        return header + rng.randbytes(JUNK_BYTES), (gateway, port)

    Path(out).write_text(json.dumps({**_paced(sock, datagram, rate, seconds), "receiver_index": index}))


def newcomer(gateway: str, directory: str, out: str, give_up_s: str) -> None:
    """A configured peer's first handshake, as the client does it: cookie reply -> same init with mac2."""
    from jvpn_trio.core import wire
    from jvpn_trio.core.cookie import open_cookie_reply
    from jvpn_trio.core.ids import PathId
    from jvpn_trio.core.noise import InitiatorHandshake, StaticKeypair, add_mac2
    from jvpn_trio.keyfile import load_private_key

    public = _gateway_public(Path(directory))
    static = StaticKeypair(load_private_key(Path(directory) / "newcomer.key"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((gateway, 0))
    start = time.monotonic()
    attempts = cookies = 0
    result: dict[str, Any] = {"ok": False}
    while time.monotonic() - start < float(give_up_s):
        attempts += 1
        state, init = InitiatorHandshake.create(
            static, public, sender_index=attempts, random_bytes=os.urandom, wall_time_ns=time.time_ns(), path_id=PathId(1)
        )
        sock.sendto(wire.encode_handshake_init(init), (gateway, CONTROL_PORT))
        retried = False
        deadline = time.monotonic() + NEWCOMER_RETRY_S
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            kind = wire.peek_type_untrusted(data)
            if kind is wire.MessageType.COOKIE_REPLY and not retried:
                cookie = open_cookie_reply(wire.decode_cookie_reply_untrusted(data), gateway_public=public, init_mac1=init.mac1)
                if cookie is not None:
                    cookies += 1
                    retried = True
                    sock.sendto(wire.encode_handshake_init(add_mac2(init, cookie)), (gateway, CONTROL_PORT))
            elif kind is wire.MessageType.HANDSHAKE_RESP:
                state.consume_response(wire.decode_handshake_resp_untrusted(data))
                result = {"ok": True}
                break
        if result["ok"]:
            break
    result.update(seconds=round(time.monotonic() - start, 3), attempts=attempts, cookie_replies=cookies)
    Path(out).write_text(json.dumps(result))


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def stream(destination: str, hz: str, count: str, out: str) -> None:
    """ICMP echo requests at ``hz`` through the tunnel; loss and the longest gap between replies."""
    import select

    rate, total = int(hz), int(count)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    answered: set[int] = set()
    stamps: list[float] = []
    start = time.monotonic()
    sent = 0
    end = start + total / rate + 1.0
    while time.monotonic() < end:
        if sent < total and time.monotonic() >= start + sent / rate:
            header = struct.pack("!BBHHH", 8, 0, 0, ident, sent)
            body = b"jvpn" * 4
            sock.sendto(struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + body), ident, sent) + body, (destination, 0))
            sent += 1
            continue
        wait = max(0.0, start + sent / rate - time.monotonic()) if sent < total else 0.05
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            data = sock.recv(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, who, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and who == ident and seq not in answered:
                answered.add(seq)
                stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip([start, *stamps], [*stamps, start + total / rate])]
    Path(out).write_text(json.dumps({
        "sent": sent, "received": len(answered), "loss_pct": round(100 * (sent - len(answered)) / max(1, sent), 2),
        "max_gap_ms": round(1000 * max(gaps), 1),
    }))  # fmt: skip


async def measure_one(mode: str, seconds: float, rate: int, where: Path | None = None) -> dict[str, Any]:
    """One flood in a lab of its own; the lab's config writer is wrapped meanwhile to add the newcomer."""
    from jvpn_trio.keyfile import (
        generate_private_key_text,
        public_from_private_text,
        write_private_key,
    )
    from jvpn_trio.lab import processes

    directory = where if where is not None else Path(tempfile.mkdtemp(prefix=f"hsflood-{mode}-"))
    original = processes.write_configs

    def with_newcomer(directory: Path, lab: Any, **kwargs: Any) -> None:  # a second configured peer
        original(directory, lab, **kwargs)
        key = generate_private_key_text(os.urandom)
        write_private_key(directory / "newcomer.key", key)
        gateway_toml = directory / "gateway.toml"
        text = gateway_toml.read_text().replace(
            "[policy]", f'[[peer]]\nname = "newcomer"\npublic_key = "{public_from_private_text(key)}"\n\n[policy]', 1
        )
        gateway_toml.write_text(text)

    processes.write_configs = with_newcomer
    try:
        return await _measure(mode, seconds, rate, directory)
    finally:
        processes.write_configs = original  # nothing else run in this process sees the extra peer


async def _measure(mode: str, seconds: float, rate: int, directory: Path) -> dict[str, Any]:
    import trio

    from jvpn_trio.lab.netns import LabSpec, open_lab
    from jvpn_trio.lab.processes import GATEWAY_TUNNEL, start_tunnel

    result: dict[str, Any] = {"mode": mode, "seconds": seconds, "rate": rate, "directory": str(directory)}
    me = str(Path(__file__).resolve())
    async with open_lab(LabSpec()) as lab:
        await start_tunnel(lab, directory, policy={}, record=False)
        log = directory / "gateway-events.jsonl"
        with trio.fail_after(30):
            while not (log.exists() and '"to_state":"ATTACHED"' in log.read_text()):
                await trio.sleep(0.2)
        await trio.sleep(1.0)
        count = int(seconds * 100)

        async def ping() -> None:
            out = directory / "stream.json"
            await lab.run(lab.client_ns, sys.executable, me, "stream", GATEWAY_TUNNEL, "100", str(count), str(out))
            result["stream"] = json.loads(out.read_text())

        async def flood() -> None:
            out = directory / "attack.json"
            if mode == "junk":
                await lab.run(lab.gateway_ns, sys.executable, me, "junk", lab.spec.gateway_address, str(rate),
                              str(seconds), str(out))  # fmt: skip
            else:
                await lab.run(lab.gateway_ns, sys.executable, me, "attack", lab.spec.gateway_address, str(rate),
                              str(seconds), mode, str(directory), str(out))  # fmt: skip
            result["attack"] = json.loads(out.read_text())

        async def watch_log() -> None:
            base = previous = log.stat().st_size
            most = 0
            for _ in range(int(seconds) + 3):
                await trio.sleep(1.0)
                size = log.stat().st_size
                most, previous = max(most, size - previous), size
            result["log"] = {"bytes": previous - base, "max_bytes_in_a_second": most}

        async def join() -> None:
            await trio.sleep(seconds / 2)
            out = directory / "newcomer.json"
            await lab.run(lab.gateway_ns, sys.executable, me, "newcomer", lab.spec.gateway_address, str(directory),
                          str(out), str(seconds / 2))  # fmt: skip
            result["newcomer"] = json.loads(out.read_text())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            await trio.sleep(0.3)
            nursery.start_soon(flood)
            nursery.start_soon(watch_log)
            nursery.start_soon(join)
        status = await lab.run(lab.gateway_ns, sys.executable, "-m", "jvpn_trio", "status", "--json",
                               "--socket", str(directory / "gateway.sock"), check=False)  # fmt: skip
        try:
            counters = json.loads(status.stdout.decode()).get("counters", {})
            result["gateway_counters"] = {
                k: v for k, v in counters.items() if v and (k.startswith("handshake") or k in ("reports_shed", "inbox_full"))
            }
        except ValueError:
            result["gateway_counters"] = (status.stdout + status.stderr).decode()[-300:]
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "attack":
        attack(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "junk":
        junk(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "stream":
        stream(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "newcomer":
        newcomer(*sys.argv[2:6])
        return
    import trio

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    modes = sys.argv[3:] or ["random", "single"]

    async def run() -> None:
        for mode in modes:
            print(json.dumps(await measure_one(mode, seconds, rate)), flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
