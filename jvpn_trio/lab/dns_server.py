"""A tiny DNS responder and query tool for the lab: who asked which resolver what.

    python -m jvpn_trio.lab.dns_server serve --listen 10.99.0.1:53 --answer vpn.test=10.77.0.7 \\
        [--answer vpn.test=fd77::7] [--ttl S] --report FILE [--ready FILE] [--timeout S] [--max N]
    python -m jvpn_trio.lab.dns_server query --name vpn.test [--type A|AAAA] [--server ADDR:PORT]
        [--resolv-conf FILE] [--device IF] [--timeout S] [--report FILE]

Why
---
"No DNS query leaves a physical interface" is checked by running one of these
on the tunnel's side (the resolver the client config names) and one on the
client's LAN side, asking a name from the client namespace, and reading both
reports: the tunnel's counts the query (with the client's tunnel address as
the asker), the LAN's counts nothing.

API (for tests and the lab)
---------------------------
``dns_server_argv("serve", "--listen", ..., "--report", ...)`` is the argv of
the tool with this interpreter (run it in a namespace with
``Lab.start_process``, wait for ``--ready``, stop it with SIGTERM, then read
``--report``).  In-process: ``await nursery.start(run_dns_server, listen,
answers=..., stop=event)`` returns the bound ``(host, port)`` and the task
returns a :class:`DnsServerReport`; ``await run_dns_query(server, name)`` returns
a :class:`QueryReport`.  The codec is pure: :func:`parse_query_untrusted`,
:func:`build_response`, :func:`build_query`, :func:`parse_response_untrusted`;
the two parsers raise only :class:`BadMessage`.

Theory of operation
-------------------
The server answers a standard query (QR=0, OPCODE=0, exactly one question) for
a configured name with its configured addresses of the asked type (A or AAAA,
class IN): NOERROR with answers, NOERROR without (NODATA) for another type or
class, NXDOMAIN for any other name.  The question is echoed byte for byte
(case included), the answer names point at it (``0xC00C``), AA and RA are set,
RD is copied.  A query carrying an EDNS OPT record gets one back (payload size
:data:`EDNS_PAYLOAD_BYTES`), so resolvers that speak EDNS do not degrade.
Anything else (short, a response, another opcode, several questions, a bad
name, trailing garbage in the question) is counted as ``malformed`` and not
answered.  Every datagram counts for its sender's address in ``askers``; the
log of well-formed queries is bounded (:data:`MAX_LOG_ENTRIES`).  The report is
written when the server stops: ``--timeout``, ``--max`` well-formed queries,
SIGTERM or SIGINT.  Exit codes as in traffic.py: 0 success, 1 failure (one
line on stderr, the report still written), 2 bad arguments.  ``query`` exits 1
unless it got an answer with addresses.  Only the standard library and Trio.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.errors import lone_exception_unwrapped
from jvpn_trio.lab.traffic import (
    EXIT_FAILED,
    EXIT_OK,
    endpoint_arg,
    format_endpoint,
    positive_arg,
    run_tool,
    write_report,
    write_text,
)

PROG = "jvpn_trio.lab.dns_server"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADER = struct.Struct("!HHHHHH")
QUESTION_TAIL = struct.Struct("!HH")
RR_TAIL = struct.Struct("!HHIH")
TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
TYPE_NAMES = {TYPE_A: "A", TYPE_AAAA: "AAAA"}
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
RCODE_MASK = 0x000F
#: A pointer to the question's name, which always starts right after the 12-byte header.
POINTER_TO_QUESTION = b"\xc0\x0c"
MAX_LABEL = 63
MAX_NAME = 255
#: Compression pointers followed while skipping a name in a response, at most.
MAX_POINTERS = 16
#: The EDNS UDP payload size we announce (the DNS flag day 2020 value).
EDNS_PAYLOAD_BYTES = 1232
#: Largest datagram read; larger ones are truncated by the kernel and then malformed.
RECV_BYTES = 4096
MAX_ADDRESSES_PER_NAME = 16
MAX_LOG_ENTRIES = 1000
DEFAULT_TTL_S = 60
MAX_TTL_S = 86400
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_QUERY_TIMEOUT_S = 2.0
DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"



class BadMessage(Exception):
    """A datagram that is not a well-formed DNS message of the kind expected."""


class DnsToolError(Exception):
    """A tool cannot run as asked (no server to ask, bad name); the message is one line."""


# -----------------------------------------------------------------------------
# Codec (pure)
# -----------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """``"VPN.Test."`` -> ``"vpn.test"``; raises ValueError for a name that cannot be encoded."""
    text = name.rstrip(".").lower() if name != "." else ""
    encode_name(text)
    return text


def encode_name(name: str) -> bytes:
    """A name in wire form (length-prefixed labels, no compression); raises ValueError if it cannot be."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii", errors="strict") if label.isascii() else b""
        if not 0 < len(raw) <= MAX_LABEL:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > MAX_NAME:
        raise ValueError(f"name too long: {name!r}")
    return bytes(out)


@attrs.frozen
class Question:
    #: Lowercase, without the trailing dot; "" is the root.
    name: str
    qtype: int
    qclass: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.qtype, f"TYPE{self.qtype}")


@attrs.frozen
class Query:
    query_id: int
    flags: int
    question: Question
    #: The question section exactly as received (echoed in the response).
    question_bytes: bytes
    #: The query carried an EDNS OPT record.
    edns: bool


def _read_name_uncompressed(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` (no pointers allowed: a query's question has none) and the offset after it."""
    labels: list[str] = []
    length = 0
    while True:
        if offset >= len(data):
            raise BadMessage("name runs past the end")
        n = data[offset]
        offset += 1
        if n == 0:
            break
        if n > MAX_LABEL:
            raise BadMessage(f"label length byte {n:#x} (compression is not allowed here)")
        label = data[offset : offset + n]
        if len(label) != n:
            raise BadMessage("label runs past the end")
        length += n + 1
        if length + 1 > MAX_NAME:
            raise BadMessage("name too long")
        labels.append(label.decode("ascii", errors="replace").lower())
        offset += n
    return ".".join(labels), offset


def parse_query_untrusted(data: bytes) -> Query:
    """A standard query with one question; raises only BadMessage."""
    if len(data) < HEADER.size:
        raise BadMessage(f"short datagram ({len(data)} bytes)")
    query_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        raise BadMessage("a response, not a query")
    if flags & OPCODE_MASK:
        raise BadMessage(f"opcode {(flags & OPCODE_MASK) >> 11} is not QUERY")
    if qdcount != 1:
        raise BadMessage(f"{qdcount} questions")
    name, offset = _read_name_uncompressed(data, HEADER.size)
    if offset + QUESTION_TAIL.size > len(data):
        raise BadMessage("question runs past the end")
    qtype, qclass = QUESTION_TAIL.unpack_from(data, offset)
    end = offset + QUESTION_TAIL.size
    rest = data[end:]
    if ancount or nscount:
        raise BadMessage("a query with answer or authority records")
    edns = False
    if arcount:
        # Only an EDNS OPT record (root name, type 41) is expected after the question.
        if arcount != 1 or len(rest) < 11 or rest[0] != 0 or struct.unpack_from("!H", rest, 1)[0] != TYPE_OPT:
            raise BadMessage("additional records other than one EDNS OPT")
        (rdlength,) = struct.unpack_from("!H", rest, 9)
        if len(rest) != 11 + rdlength:
            raise BadMessage("OPT record length does not match the datagram")
        edns = True
    elif rest:
        raise BadMessage(f"{len(rest)} bytes after the question")
    return Query(query_id, flags, Question(name, qtype, qclass), data[HEADER.size : end], edns)


def _opt_record() -> bytes:
    return b"\x00" + RR_TAIL.pack(TYPE_OPT, EDNS_PAYLOAD_BYTES, 0, 0)


def answers_for(question: Question, table: Mapping[str, Sequence[IPAddress]]) -> tuple[int, tuple[IPAddress, ...]]:
    """(rcode, addresses) for ``question``: the pure policy of the server."""
    if question.name not in table:
        return RCODE_NXDOMAIN, ()
    if question.qclass != CLASS_IN or question.qtype not in (TYPE_A, TYPE_AAAA):
        return RCODE_NOERROR, ()
    version = 4 if question.qtype == TYPE_A else 6
    return RCODE_NOERROR, tuple(a for a in table[question.name] if a.version == version)[:MAX_ADDRESSES_PER_NAME]


def build_response(query: Query, rcode: int, addresses: Sequence[IPAddress], *, ttl: int = DEFAULT_TTL_S) -> bytes:
    """The answer to ``query``: its question echoed, then one A/AAAA record per address (and OPT if asked)."""
    flags = FLAG_QR | FLAG_AA | FLAG_RA | (query.flags & FLAG_RD) | (rcode & RCODE_MASK)
    records = b"".join(
        POINTER_TO_QUESTION
        + RR_TAIL.pack(TYPE_A if a.version == 4 else TYPE_AAAA, CLASS_IN, ttl, len(a.packed))
        + a.packed
        for a in addresses
    )
    header = HEADER.pack(query.query_id, flags, 1, len(addresses), 0, 1 if query.edns else 0)
    return header + query.question_bytes + records + (_opt_record() if query.edns else b"")


def build_query(name: str, qtype: int, *, query_id: int, edns: bool = False) -> bytes:
    """A recursive query for ``name``/``qtype`` class IN; raises ValueError for a bad name."""
    header = HEADER.pack(query_id, FLAG_RD, 1, 0, 0, 1 if edns else 0)
    return header + encode_name(name) + QUESTION_TAIL.pack(qtype, CLASS_IN) + (_opt_record() if edns else b"")


@attrs.frozen
class Response:
    query_id: int
    rcode: int
    #: The A/AAAA records of the answer section, in order.
    addresses: tuple[IPAddress, ...]


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``."""
    while True:
        if offset >= len(data):
            raise BadMessage("name runs past the end")
        n = data[offset]
        if n == 0:
            return offset + 1
        if n & 0xC0 == 0xC0:
            if offset + 2 > len(data):
                raise BadMessage("pointer runs past the end")
            return offset + 2
        if n > MAX_LABEL:
            raise BadMessage(f"label length byte {n:#x}")
        offset += 1 + n


def parse_response_untrusted(data: bytes, *, query_id: int) -> Response:
    """A response to query ``query_id``: its rcode and A/AAAA answers; raises only BadMessage."""
    if len(data) < HEADER.size:
        raise BadMessage(f"short datagram ({len(data)} bytes)")
    rid, flags, qdcount, ancount, _ns, _ar = HEADER.unpack_from(data)
    if rid != query_id or not flags & FLAG_QR:
        raise BadMessage("not the response to our query")
    offset = HEADER.size
    for _ in range(qdcount):
        offset = _skip_name(data, offset) + QUESTION_TAIL.size
    addresses: list[IPAddress] = []
    for _ in range(ancount):
        offset = _skip_name(data, offset)
        if offset + RR_TAIL.size > len(data):
            raise BadMessage("record runs past the end")
        rtype, rclass, _ttl, rdlength = RR_TAIL.unpack_from(data, offset)
        offset += RR_TAIL.size
        rdata = data[offset : offset + rdlength]
        if len(rdata) != rdlength:
            raise BadMessage("record data runs past the end")
        offset += rdlength
        if rclass == CLASS_IN and (rtype, rdlength) in ((TYPE_A, 4), (TYPE_AAAA, 16)):
            addresses.append(ipaddress.ip_address(rdata))
    return Response(rid, flags & RCODE_MASK, tuple(addresses))


# -----------------------------------------------------------------------------
# Reports
# -----------------------------------------------------------------------------


@attrs.frozen
class DnsServerReport:
    """What the server saw.  ``askers``: datagrams per source address (malformed ones too)."""

    listen: str
    datagrams: int
    queries: int
    answered: int
    nodata: int
    nxdomain: int
    malformed: int
    askers: Mapping[str, int]
    names: Mapping[str, int]
    log: tuple[Mapping[str, Any], ...]
    log_dropped: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "askers": dict(self.askers), "names": dict(self.names),
                "log": [dict(e) for e in self.log]}  # fmt: skip


@attrs.frozen
class QueryReport:
    server: str
    name: str
    type: str
    rcode: str | None
    addresses: tuple[str, ...]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rcode == "NOERROR" and bool(self.addresses)

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "addresses": list(self.addresses)}


# -----------------------------------------------------------------------------
# Server and client
# -----------------------------------------------------------------------------


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def run_dns_server(
    listen: tuple[str, int],
    *,
    answers: Mapping[str, Sequence[IPAddress]],
    ttl: int = DEFAULT_TTL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_queries: int | None = None,
    stop: trio.Event | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> DnsServerReport:
    """Answer queries on ``listen`` until ``timeout_s``, ``max_queries`` well-formed queries, or ``stop``.

    ``task_status.started((host, port))`` once bound.  ``answers`` maps
    normalized names to addresses.  Raises OSError if it cannot bind.
    """
    table = {normalize_name(k): tuple(v) for k, v in answers.items()}
    askers: dict[str, int] = {}
    names: dict[str, int] = {}
    log: list[Mapping[str, Any]] = []
    counts = {"datagrams": 0, "queries": 0, "answered": 0, "nodata": 0, "nxdomain": 0, "malformed": 0, "dropped": 0}
    sock = trio.socket.socket(_family(listen[0]), socket.SOCK_DGRAM)
    with sock:
        await sock.bind(listen)
        bound = sock.getsockname()[:2]
        task_status.started(bound)
        async with trio.open_nursery() as nursery:
            if stop is not None:

                async def stopper() -> None:
                    await stop.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stopper)
            with trio.move_on_after(timeout_s):
                while max_queries is None or counts["queries"] < max_queries:
                    data, addr = await sock.recvfrom(RECV_BYTES)
                    counts["datagrams"] += 1
                    askers[addr[0]] = askers.get(addr[0], 0) + 1
                    try:
                        query = parse_query_untrusted(data)
                    except BadMessage:
                        counts["malformed"] += 1
                        continue
                    counts["queries"] += 1
                    q = query.question
                    names[q.name] = names.get(q.name, 0) + 1
                    rcode, addresses = answers_for(q, table)
                    kind = "nxdomain" if rcode == RCODE_NXDOMAIN else "answered" if addresses else "nodata"
                    counts[kind] += 1
                    if len(log) < MAX_LOG_ENTRIES:
                        log.append({"from": format_endpoint((addr[0], addr[1])), "name": q.name, "type": q.type_name,
                                    "rcode": RCODE_NAMES[rcode], "answers": len(addresses)})  # fmt: skip
                    else:
                        counts["dropped"] += 1
                    try:
                        await sock.sendto(build_response(query, rcode, addresses, ttl=ttl), addr)
                    except OSError:
                        pass  # the asker's path went away; its query is counted all the same
            nursery.cancel_scope.cancel()
    return DnsServerReport(
        listen=format_endpoint(bound), datagrams=counts["datagrams"], queries=counts["queries"],
        answered=counts["answered"], nodata=counts["nodata"], nxdomain=counts["nxdomain"],
        malformed=counts["malformed"], askers=askers, names=names, log=tuple(log), log_dropped=counts["dropped"],
        error=None,
    )  # fmt: skip


def nameservers_of(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf text, in order (others skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(fields[1])))
            except ValueError:
                continue
    return out


async def run_dns_query(
    server: tuple[str, int],
    name: str,
    *,
    qtype: int = TYPE_A,
    timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
    device: str | None = None,
) -> QueryReport:
    """Ask ``server`` one question and wait ``timeout_s`` for its answer (no retries: one query, one count)."""
    query_id = secrets.randbits(16)
    where = format_endpoint(server)
    type_name = TYPE_NAMES.get(qtype, f"TYPE{qtype}")
    try:
        packet = build_query(name, qtype, query_id=query_id)
    except ValueError as exc:
        raise DnsToolError(str(exc)) from None
    with trio.socket.socket(_family(server[0]), socket.SOCK_DGRAM) as sock:
        if device is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            except OSError as exc:
                raise DnsToolError(f"cannot bind to device {device!r}: {exc.strerror or exc}") from None
        try:
            await sock.connect(server)
            await sock.send(packet)
        except OSError as exc:
            return QueryReport(where, name, type_name, None, (), f"cannot send to {where}: {exc.strerror or exc}")
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    data = await sock.recv(RECV_BYTES)
                except OSError as exc:  # ECONNREFUSED: nothing listens there
                    return QueryReport(where, name, type_name, None, (), f"{where}: {exc.strerror or exc}")
                try:
                    response = parse_response_untrusted(data, query_id=query_id)
                except BadMessage:
                    continue
                rcode = RCODE_NAMES.get(response.rcode, str(response.rcode))
                return QueryReport(where, name, type_name, rcode, tuple(str(a) for a in response.addresses), None)
    return QueryReport(where, name, type_name, None, (), f"no answer from {where} within {timeout_s:g} s")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def dns_server_argv(subcommand: str, *args: str) -> list[str]:
    """The argv that runs ``python -m jvpn_trio.lab.dns_server <subcommand> <args>`` with this interpreter."""
    return [sys.executable, "-m", PROG, subcommand, *args]


def _empty_server_report(listen: tuple[str, int], error: str) -> DnsServerReport:
    return DnsServerReport(format_endpoint(listen), 0, 0, 0, 0, 0, 0, {}, {}, (), 0, error)


async def _cmd_serve(args: argparse.Namespace) -> tuple[int, str | None]:
    stop = trio.Event()
    answers: dict[str, list[IPAddress]] = {}
    for name, address in args.answer:
        answers.setdefault(name, []).append(address)
    result: list[DnsServerReport] = []
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with lone_exception_unwrapped(), trio.open_nursery() as nursery:

                async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    result.append(await run_dns_server(
                        args.listen, answers=answers, ttl=args.ttl, timeout_s=args.timeout, max_queries=args.max,
                        stop=stop, task_status=task_status,
                    ))  # fmt: skip
                    nursery.cancel_scope.cancel()  # the signal watcher

                async def on_signal() -> None:
                    async for _ in signals:
                        stop.set()  # the server stops and returns what it saw

                nursery.start_soon(on_signal)
                bound = await nursery.start(serve)
                if args.ready is not None:
                    await write_text(args.ready, format_endpoint(bound) + "\n")
        report = result[0]
    except OSError as exc:
        report = _empty_server_report(args.listen, f"cannot listen on {format_endpoint(args.listen)}: "
                                                   f"{exc.strerror or exc}")  # fmt: skip
    await write_report(args.report, report.to_json())
    return (EXIT_OK, None) if report.ok else (EXIT_FAILED, report.error)


async def _cmd_query(args: argparse.Namespace) -> tuple[int, str | None]:
    qtype = {"A": TYPE_A, "AAAA": TYPE_AAAA}[args.type]
    try:
        if args.server is not None:
            server = args.server
        else:
            text = await trio.to_thread.run_sync(Path(args.resolv_conf).read_text)
            servers = nameservers_of(text)
            if not servers:
                raise DnsToolError(f"no nameserver in {args.resolv_conf}")
            server = (servers[0], DNS_PORT)
        report = await run_dns_query(server, args.name, qtype=qtype, timeout_s=args.timeout, device=args.device)
    except (DnsToolError, OSError) as exc:
        text = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        report = QueryReport(format_endpoint(args.server) if args.server else "", args.name, args.type, None, (), text)
    await write_report(args.report, report.to_json())
    print(json.dumps(report.to_json(), sort_keys=True))
    if report.ok:
        return EXIT_OK, None
    return EXIT_FAILED, report.error or f"{report.server} answered {report.rcode} with no address"


def _answer_arg(text: str) -> tuple[str, IPAddress]:
    name, sep, address = text.partition("=")
    try:
        if not sep:
            raise ValueError(f"expected NAME=ADDRESS, got {text!r}")
        return normalize_name(name), ipaddress.ip_address(address)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(text: str) -> int:
    value: int = positive_arg(int)(text)
    if value > MAX_TTL_S:
        raise argparse.ArgumentTypeError(f"TTL at most {MAX_TTL_S} s, got {text!r}")
    return value


Handler = Callable[[argparse.Namespace], Awaitable[tuple[int, str | None]]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="A tiny DNS responder and query tool for the lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(handler=handler)
        return p

    p = add("serve", _cmd_serve, "answer A/AAAA queries for the given names; count every query and who asked")
    p.add_argument("--listen", type=endpoint_arg(), required=True, metavar="ADDR:PORT")
    p.add_argument("--answer", type=_answer_arg, action="append", default=[], metavar="NAME=ADDR",
                   help="answer NAME with ADDR (A or AAAA by its family); repeat for more")  # fmt: skip
    p.add_argument("--ttl", type=_ttl, default=DEFAULT_TTL_S, metavar="S")
    p.add_argument("--report", required=True, metavar="FILE", help="JSON written when the server stops")
    p.add_argument("--ready", metavar="FILE", help="written with ADDR:PORT once bound")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_TIMEOUT_S, metavar="S")
    p.add_argument("--max", type=positive_arg(int), default=None, metavar="N", help="stop after N well-formed queries")

    p = add("query", _cmd_query, "ask one question; exit 0 iff the answer has addresses; JSON on stdout")
    p.add_argument("--name", required=True)
    p.add_argument("--type", choices=("A", "AAAA"), default="A")
    p.add_argument("--server", type=endpoint_arg(DNS_PORT), metavar="ADDR[:PORT]",
                   help="default: the first nameserver of --resolv-conf, port 53")  # fmt: skip
    p.add_argument("--resolv-conf", default=RESOLV_CONF, metavar="FILE")
    p.add_argument("--device", metavar="IF", help="SO_BINDTODEVICE")
    p.add_argument("--timeout", type=positive_arg(float), default=DEFAULT_QUERY_TIMEOUT_S, metavar="S")
    p.add_argument("--report", metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one tool, print at most one error line, return its exit code."""
    return run_tool(build_parser(), argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
