"""``jvpn-trio bench``: jvpn-trio, a bare veth, OpenVPN, wireguard-go and kernel MPTCP measured side by side.

    jvpn-trio bench [--quick] [--runs N] [--fault-runs N] [--systems baseline,jvpn-trio,openvpn,wireguard-go,mptcp]
                    [--idle S] [--idle-only] [--json [FILE]] [--plots DIR]
    jvpn-trio bench --replot REPORT.json --plots DIR

Theory of operation
-------------------
The machines this runs on are shared and noisy (``../shared/STYLE.md``): a neighbour's
burst of work can halve a throughput figure for half a minute.  So absolute numbers from
different runs are not comparable, and even within one run, measuring system A for a minute
and then system B for a minute lets such a burst land on one of them only.  This command
therefore keeps every system up *side by side* for the whole run and *interleaves* the
measurements: round ``r`` measures every system once, starting with system ``r mod n`` so no
system always goes first, and each figure is the median over the rounds.  The ratios between
systems (same run, same rounds) are the result; the absolute numbers describe this machine
at this moment.

Each system has its own fresh lab (:func:`jvpn_trio.lab.netns.open_lab`: a client and a gateway
namespace joined by eth0 / wifi0 / lte0 with route metrics 10 / 20 / 30, the gateway's /32 on
its loopback: the topology of ``peers.md``).  The labs are torn down at the end, however the
run ends.  While one system is measured the other tunnels sit idle; the CPU they use meanwhile
is measured too and reported (jvpn-trio's probing costs a few hundredths of a core).

Measurements:

1. *Throughput*, ``--runs`` rounds: ``iperf3`` one TCP stream for ``--iperf-seconds`` from the
   client namespace to the gateway (upload; the receiver's Mbit/s), then the same stream the
   other way, ``iperf3 -R`` (download: the gateway's server sends and the client namespace
   receives, what a laptop mostly does and the only test of the VPN client's receive path; the
   receiver's Mbit/s again, now the client's own count), then ``iperf3 -u -l 64 -b 0`` (64-byte
   payloads at the highest rate the sender manages; the figure is the packets the server
   *received* per second).  Servers run in the gateway namespace, bound to the address the
   tunnel delivers to; clients run in the client namespace.  Around each test the CPU time
   (utime + stime of all threads, from ``/proc/<pid>/stat``) of every tunnel's client and
   gateway process is read: CPU seconds / wall seconds = cores.  The memory figure is the peak
   RSS (``VmHWM`` in ``/proc/<pid>/status``) at the end of the run.
2. *Outage* (tunnels only), ``--fault-runs`` times for each fault (default
   :data:`DEFAULT_FAULT_RUNS`, or ``--runs`` if that is more), link down and blackhole: a
   :data:`PROBE_HZ` UDP probe stream (``jvpn_trio.lab.traffic``) runs from the client namespace through the tunnel;
   once probes arrive, the fault is put on the path the tunnel is using, held for
   ``--fault-seconds``, then removed.  The outage is :func:`jvpn_trio.lab.traffic.longest_gap` of
   the probe arrivals within ``[fault applied, fault removed]``.  If no probe got through
   after the fault until it was removed, the system did not recover by itself: the figure is
   then a lower bound, shown as ``> x``.  The median run is reported (for an even count the
   higher of the two middle runs, so a bound is never averaged with a measurement).  Before
   each fault the bench waits (bounded) until the tunnel is back on the preferred path, eth0.
   Each trial keeps its *arrival timeline* too: the :data:`TIMELINE_CONTEXT_PROBES` arrivals on
   either side of its gap, as times since the fault (:func:`arrival_timeline`; bounded, however
   long the fault), from which ``--plots`` draws how the stream stopped and came back.
3. *Idle cost and failover by probing policy* (jvpn-trio only, ``--idle`` seconds, after the
   systems' labs are gone): two more labs, one with the default policy (a probing cadence per
   role, ``docs/policy.md``) and one with every path probed at ``probe_interval_ms`` (the
   behaviour before per-role probing), the client's lte0 marked ``metered = true``.  Once each
   is ATTACHED on eth0, idle (no traffic for ``idle_after_ms``), with wifi0 and lte0 HEALTHY at
   their standby roles, both are left alone
   over the same window: CPU percent of one core of the client and the gateway process (from
   ``/proc/<pid>/stat``) and bytes/s on each of the client's path interfaces (``ip -s link``,
   both directions, everything on the wire).  Then ``--runs`` blackholes of the active path
   each, measured as in 2.  Side by side, so a neighbour's burst lands on both policies.

jvpn-trio runs as the real ``jvpn-trio serve`` / ``jvpn-trio up`` processes, full tunnel, with
:data:`JVPN_POLICY` over the default policy: it changes only how soon the session returns to
eth0 once a fault is removed and the switch budget, so ``--fault-runs`` faults fit in one run; the
detection and failover bounds are the defaults.  OpenVPN (when installed) runs in server mode
over UDP with AES-256-GCM, ``float`` and ``keepalive 1 5``, as ``peers.md`` measured it, with
a CA, certificates and a tls-crypt key generated for the run.  wireguard-go (when it and
``wg`` are installed: Debian's ``wireguard-go`` and ``wireguard-tools``) runs as a userspace
TUN interface in each namespace, configured with ``wg setconf`` from keys generated for the
run, the client's peer endpoint being the gateway's /32 over the lab paths (the kernel's route,
as for OpenVPN) with persistent keepalive :data:`WIREGUARD_KEEPALIVE_S`.  WireGuard has one
endpoint and no path failover: after a fault on the path it uses it comes back only when the
kernel's route or the endpoint changes, and its outage column says what happened.  A peer that
is not installed or cannot be set up is reported with the reason (``not available: ...``),
never dropped; when wireguard-go was not measured in the run, the ``peers.md`` figure is shown
in a separate column labelled as not measured in this run, and no ratio is computed against it.

Kernel MPTCP (issue 16) is no tunnel, so it has no throughput figures and its outage is measured
differently (:mod:`jvpn_trio.lab.mptcp`): in its lab the in-kernel path manager gets a ``subflow``
endpoint on wifi0, so one MPTCP connection from the client namespace to the gateway's /32 runs
over eth0 (the route) and wifi0 at once; each fault trial streams :data:`PROBE_HZ` small
timestamped writes over a fresh connection, puts the fault on the path that carried the most of
them during :data:`PROBE_LEAD_S`, and takes the longest receive stall while the fault is on
(median and bounds as above).  Each trial checks, from both namespaces' MPTCP counters and both
sockets' ``MPTCP_INFO``, that MPTCP was negotiated and the second subflow joined, and keeps that
evidence in the JSON (``outage.<fault>.runs[i].details``); a trial where MPTCP fell back to plain
TCP or no subflow joined fails the system with that reason instead of giving a figure.  A kernel
without MPTCP, or one where the first check stream does not join, is ``not available``.

Every wait is bounded and every process is started through its lab, so the lab's teardown
kills it at the latest.  Output: a Markdown table (stdout, or stderr when the JSON goes to
stdout) and, with ``--json``, one JSON document; with ``--plots DIR``, PNG plots of that document
(:mod:`jvpn_trio.lab.plots`; ``--replot`` draws them from a saved one); progress lines on stderr.
The report's vocabulary (system keys and labels, faults, statuses, ratios) is
:mod:`jvpn_trio.lab.bench_report`, shared with the plots.  Exit codes: 0
every requested system that can run here was measured; 1 a measurement failed (the rest is
still reported); 2 the bench cannot run as asked (not root, iperf3 missing, bad options).

This is a benchmark: it measures wall-clock time on purpose, and asserts nothing about it.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import datetime
import functools
import ipaddress
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import attrs
import trio

from jvpn_trio import __version__
from jvpn_trio.config import ConfigError, load_policy
from jvpn_trio.core.policy import DEFAULT_POLICY
from jvpn_trio.lab import mptcp as labmptcp
from jvpn_trio.lab import processes as labrun
from jvpn_trio.lab.bench_report import (
    BASELINE,
    BLACKHOLE,
    FAILED,
    FAULTS,
    IDLE_BLACKHOLE,
    JVPN,
    LABELS,
    LINK_DOWN,
    MEASURABLE,
    MEASURED,
    MPTCP,
    MPTCP_OUTAGE_MEASURE,
    NOT_AVAILABLE,
    OPENVPN,
    PEERS_MD_BASELINE,
    PEERS_MD_DATE,
    PEERS_MD_WIREGUARD,
    PROBE_HZ,
    RATIO_COLUMNS,
    REFERENCE,
    REPORT_KIND,
    UDP_PAYLOAD_BYTES,
    WIREGUARD,
    WIREGUARD_REFERENCE,
    Figure,
    Ratio,
    format_figure,
    format_ratio,
    ratio,
)
from jvpn_trio.lab.netns import Lab, LabError, LabPath, LabProcess, LabSpec, open_lab
from jvpn_trio.lab.traffic import Gap, format_endpoint, longest_gap, traffic_argv

# -----------------------------------------------------------------------------
# Settings and named constants
# -----------------------------------------------------------------------------

#: Systems that are someone else's software: absent or not coming up is NOT_AVAILABLE, not FAILED.
PEERS = (OPENVPN, WIREGUARD, MPTCP)

TCP = "tcp"
#: One TCP stream the other way (``iperf3 -R``): the gateway sends, the client namespace receives.
TCP_DOWN = "tcp_down"
UDP64 = "udp64"
THROUGHPUT_TESTS = (TCP, TCP_DOWN, UDP64)

DEFAULT_RUNS = 3
#: Fault trials per system and fault in the full run: outages vary more between trials than
#: throughput does between rounds, and the issue asks for at least five.
DEFAULT_FAULT_RUNS = 5
DEFAULT_IPERF_S = 3.0
DEFAULT_FAULT_S = 3.0
QUICK_RUNS = 1
QUICK_IPERF_S = 3.0
QUICK_FAULT_S = 2.0
MAX_RUNS = 15
MAX_IPERF_S = 60.0
MAX_FAULT_S = 60.0

#: New bench labs are this plus 4 random hex digits (``jvbn3fa2``), told apart from ``jvlab*``.
PREFIX_FAMILY = "jvbn"

IPERF_PORT = 5201
#: iperf3 needs this long beyond ``-t`` to connect, exchange results and exit.
IPERF_SLACK_S = 15.0
IPERF_CONNECT_TIMEOUT_MS = 3000

PROBE_PORT = 5002
#: Probes flow this long (after the first one arrived) before the fault is applied.
PROBE_LEAD_S = 0.5
#: The probe stream is scheduled this much longer than lead + fault, to outlast the restore.
PROBE_SLACK_S = 1.0
#: Probe arrivals kept on each side of a trial's outage gap in its arrival timeline (the JSON's
#: ``timeline``, drawn by ``--plots``): at PROBE_HZ, 50 ms of the stream before the gap and after it.
#: A timeline is at most twice this many numbers, however long the fault.
TIMELINE_CONTEXT_PROBES = 50
#: A death while idle: the active path is blackholed this long before the stream starts, well inside
#: the idle detection bound (dead_after_missed_probes standby probes), so the first packets meet a
#: path not yet known dead; the outage counts from the stream's first packet.
IDLE_FAULT_LEAD_S = 0.5

#: Bounds on waits for a process or a condition; polled every POLL_S.
READY_TIMEOUT_S = 10.0
ATTACH_TIMEOUT_S = 20.0
PREFERRED_TIMEOUT_S = 15.0
POLL_S = 0.05
#: Quiet time on the preferred path before the next fault (>= JVPN_POLICY's min_dwell_ms).
SETTLE_S = 0.6
#: Safety net over the whole run (each step has its own, tighter bound).
TOTAL_TIMEOUT_S = 900.0

#: jvpn-trio's policy for the bench: defaults, except a faster return to eth0 once a fault is
#: removed and a switch budget for ``--fault-runs`` x 2 faults x (away + back) within a minute.
JVPN_POLICY: Mapping[str, int] = {"min_dwell_ms": 500, "return_dwell_ms": 1000, "max_switches_per_minute": 30}
JVPN_PORT = labrun.PORT
JVPN_GATEWAY_TUNNEL = labrun.GATEWAY_TUNNEL
JVPN_CLIENT_TUNNEL = labrun.CLIENT_TUNNEL

OPENVPN_PORT = 1194
OPENVPN_GATEWAY_TUNNEL = "10.67.0.1"
OPENVPN_POOL = ("10.67.0.2", "10.67.0.200")
OPENVPN_NETMASK = "255.255.255.0"
OPENVPN_READY_TEXT = "Initialization Sequence Completed"
OPENVPN_INSTALL_HINT = "apt-get install -y openvpn"
#: Certificates only need to outlive the run.
CERT_DAYS = 2

WIREGUARD_PORT = 51820
WIREGUARD_GATEWAY_TUNNEL = "10.68.0.1"
WIREGUARD_CLIENT_TUNNEL = "10.68.0.2"
WIREGUARD_PREFIXLEN = 24
#: The client's persistent keepalive (seconds), as peers.md ran wireguard-go ("keepalive 1 s").
WIREGUARD_KEEPALIVE_S = 1
WIREGUARD_INSTALL_HINT = "apt-get install -y wireguard-go wireguard-tools"
#: The binaries the wireguard-go column needs: the daemon and the tool that configures it.
WIREGUARD_TOOLS = ("wireguard-go", "wg")
#: Where wireguard-go puts its UAPI socket (``<interface>.sock``).  This directory is not per
#: namespace, so interface names carry the lab's unique prefix.
WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")
#: Interface-name suffixes after the lab prefix (``jvbn3fa2wgc``), within IFNAMSIZ.
WIREGUARD_CLIENT_SUFFIX = "wgc"
WIREGUARD_GATEWAY_SUFFIX = "wgg"
#: A Curve25519 key in ``wg``'s base64 form is 32 bytes.
WIREGUARD_KEY_BYTES = 32


#: Where the gateway namespace's MPTCP stream sink listens (on the gateway's /32).
MPTCP_PORT = 5003
#: The stream's budget for the second subflow to join (a few ms in the lab); the fault waits for it.
MPTCP_JOIN_TIMEOUT_S = 0.5
#: Length of the stream that checks, before any fault, that MPTCP negotiates and joins here.
MPTCP_CHECK_S = 0.3
#: The sink reads on this long past the stream's scheduled end for records a stall still holds back (a
#: stall can outlast its fault); the trial's figure is the stall within the fault either way.
MPTCP_DRAIN_S = 2.0
#: The stream goes on this long after its fault is removed, then stops (the source's stop file): room for
#: the timeline's TIMELINE_CONTEXT_PROBES arrivals after the gap, and no longer (a trial's length counts in --quick).
MPTCP_TAIL_S = 0.3


class BenchError(Exception):
    """A measurement cannot be made (a tool failed, a tunnel did not come up); one line."""


# -----------------------------------------------------------------------------
# Pure parts: parsing, statistics, ratios, the document and the table
# -----------------------------------------------------------------------------


@attrs.frozen
class UdpResult:
    """iperf3 UDP: what the sender sent and what the server received, per second."""

    sent_pps: float
    received_pps: float
    lost_percent: float


def _iperf_error(doc: Mapping[str, Any]) -> None:
    if not isinstance(doc, Mapping):
        raise BenchError("iperf3 output is not a JSON object")
    if doc.get("error"):
        raise BenchError(f"iperf3: {doc['error']}")


def _section(doc: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    node: Any = doc
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise BenchError(f"iperf3 output has no {'.'.join(keys)}")
        node = node[key]
    if not isinstance(node, Mapping):
        raise BenchError(f"iperf3 output: {'.'.join(keys)} is not an object")
    return node


def _number(section: Mapping[str, Any], key: str, where: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BenchError(f"iperf3 output: {where}.{key} is not a number ({value!r})")
    return float(value)


def parse_iperf_tcp(doc: Mapping[str, Any]) -> float:
    """Mbit/s the receiver got, from ``iperf3 -J`` TCP output; BenchError if it reports an error.

    ``end.sum_received`` is the receiving end's count in either direction: the server's without
    ``-R`` (sent back to the client at the end), the client's own with ``-R`` (``end.sum_sent``
    is then the server's), so the download test reuses this unchanged.
    """
    _iperf_error(doc)
    received = _section(doc, "end", "sum_received")
    return _number(received, "bits_per_second", "end.sum_received") / 1e6


def parse_iperf_udp(doc: Mapping[str, Any]) -> UdpResult:
    """Packets per second sent and received, from ``iperf3 -u -J`` client output.

    The received count is the server's (``packets - lost_packets`` of ``end.sum_received``,
    which the client gets back at the end of the test); outputs without ``sum_received``
    (iperf3 before 3.11) fall back to ``end.sum``, where those fields are also the server's.
    BenchError if iperf3 reports an error or a field is missing.
    """
    _iperf_error(doc)
    end = _section(doc, "end")
    key = "sum_received" if "sum_received" in end else "sum"
    received = _section(doc, "end", key)
    where = f"end.{key}"
    seconds = _number(received, "seconds", where)
    if seconds <= 0:
        raise BenchError(f"iperf3 output: {where}.seconds is {seconds}")
    packets = _number(received, "packets", where)
    lost = _number(received, "lost_packets", where)
    sent_key = "sum_sent" if "sum_sent" in end else key
    sent = _section(doc, "end", sent_key)
    sent_seconds = _number(sent, "seconds", f"end.{sent_key}")
    sent_packets = _number(sent, "packets", f"end.{sent_key}")
    return UdpResult(
        sent_pps=sent_packets / sent_seconds if sent_seconds > 0 else 0.0,
        received_pps=max(0.0, packets - lost) / seconds,
        lost_percent=100.0 * lost / packets if packets > 0 else 0.0,
    )


def parse_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself,
    so fields are counted from the last ``)``.  Raises ValueError on malformed text.
    """
    _, paren, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 13:
        raise ValueError("not a /proc/<pid>/stat line")
    # After the command: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(14) stime(15): indices 11 and 12 of the remainder.
    return int(fields[11]) + int(fields[12])


def parse_status_kib(status_text: str, field: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``) in KiB; None if absent."""
    for line in status_text.splitlines():
        if line.startswith(f"{field}:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def parse_vm_hwm_kib(status_text: str) -> int | None:
    """Peak resident set size in KiB (``VmHWM``); None if absent."""
    return parse_status_kib(status_text, "VmHWM")


def cores(ticks_before: int, ticks_after: int, wall_s: float, *, ticks_per_s: float) -> float:
    """CPU cores used on average: CPU seconds over wall seconds.  ValueError if ``wall_s <= 0``."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return (ticks_after - ticks_before) / ticks_per_s / wall_s


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """``items`` starting at position ``round_index mod len``: who goes first changes every round."""
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


@attrs.frozen
class Outage:
    """One fault's outage: the longest probe gap, and whether traffic came back before the fault went.

    ``recovered`` False means no probe got through between the fault and its removal: then
    ``seconds`` is a lower bound (the system did not recover by itself within the window).
    """

    seconds: float
    recovered: bool
    window_s: float
    path: str
    #: The probe arrivals around the gap; None for an outage recorded without them.
    timeline: ArrivalTimeline | None = None
    #: What else the trial recorded (kernel MPTCP: the subflow evidence, bytes per path before the fault).
    details: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 4),
            "recovered": self.recovered,
            "window_s": round(self.window_s, 4),
            "path": self.path,
        }
        if self.timeline is not None:
            out["timeline"] = self.timeline.to_json()
        if self.details:
            out["details"] = dict(self.details)
        return out


@attrs.frozen
class ArrivalTimeline:
    """How the probe stream stopped and came back: arrivals around one outage's gap, in seconds since the fault.

    Only the last ``context`` arrivals up to the gap and the first ``context`` from its end are
    kept (:func:`arrival_timeline`), so a report stays small however long the fault was; the
    arrivals before the fault (negative times) show the stream flowing when it struck.
    """

    gap_start_s: float
    gap_end_s: float
    arrivals_s: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "gap_start_s": round(self.gap_start_s, 4),
            "gap_end_s": round(self.gap_end_s, 4),
            "arrivals_s": [round(t, 4) for t in self.arrivals_s],
        }


def arrival_timeline(arrivals: Sequence[float], gap: Gap, *, fault_start: float, context: int) -> ArrivalTimeline:
    """The ``context`` arrivals up to ``gap`` and the ``context`` from its end, relative to ``fault_start``.

    Arrivals may come in any order; at most ``2 * context`` are kept.  ValueError if ``context < 0``.
    """
    if context < 0:
        raise ValueError(f"timeline context must be >= 0, got {context}")
    ordered = sorted(arrivals)
    up_to_gap = bisect.bisect_right(ordered, gap.start)
    from_gap_end = max(up_to_gap, bisect.bisect_left(ordered, gap.end))  # an arrival on both edges: once
    kept = ordered[max(0, up_to_gap - context) : up_to_gap] + ordered[from_gap_end : from_gap_end + context]
    return ArrivalTimeline(
        gap_start_s=gap.start - fault_start,
        gap_end_s=gap.end - fault_start,
        arrivals_s=tuple(t - fault_start for t in kept),
    )


def outage_from_arrivals(
    arrivals: Sequence[float],
    *,
    fault_start: float,
    fault_end: float,
    stream_end: float,
    path: str,
    context: int = TIMELINE_CONTEXT_PROBES,
) -> Outage:
    """The outage of one fault from absolute probe arrival times (same clock as the fault times).

    The window is ``[fault_start, min(fault_end, stream_end)]``; if the longest gap reaches the
    window's end with no arrival closing it, it is a lower bound (not recovered).  The outage
    carries the arrivals around its gap (``context`` on each side, :func:`arrival_timeline`).
    ValueError if the window is empty or inverted.
    """
    end = min(fault_end, stream_end)
    if end <= fault_start:
        raise ValueError(f"empty outage window [{fault_start}, {end}]")
    gap = longest_gap(arrivals, fault_start, end)
    return Outage(
        seconds=gap.seconds,
        recovered=gap.end < end,
        window_s=end - fault_start,
        path=path,
        timeline=arrival_timeline(arrivals, gap, fault_start=fault_start, context=context),
    )


def median_outage(runs: Sequence[Outage]) -> Outage | None:
    """The median run (unrecovered runs rank above every recovered one); None for no runs.

    For an even count the higher of the two middle runs is taken, so a lower bound is never
    averaged with a measurement.
    """
    if not runs:
        return None
    ordered = sorted(runs, key=lambda o: (not o.recovered, o.seconds))
    return ordered[len(ordered) // 2]


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``, None when there are none."""
    return statistics.median(values) if values else None


CpuSample = Mapping[str, float]


@attrs.frozen
class SystemResult:
    """Everything measured for one system (or why it was not), with every round kept."""

    key: str
    status: str
    reason: str | None = None
    version: str | None = None
    tcp_mbit_runs: tuple[float, ...] = ()
    #: The download direction (``iperf3 -R``), one per round.
    tcp_down_mbit_runs: tuple[float, ...] = ()
    udp64_runs: tuple[UdpResult, ...] = ()
    #: fault -> the outage of each run, in the order they ran.
    outages: Mapping[str, tuple[Outage, ...]] = attrs.field(factory=dict)
    #: test (tcp, tcp_down, udp64) -> one {role: cores} per round.
    cpu_runs: Mapping[str, tuple[CpuSample, ...]] = attrs.field(factory=dict)
    #: client + gateway cores while another system was being measured (the tunnel idle).
    idle_cores_runs: tuple[float, ...] = ()
    #: process role -> peak RSS in KiB.
    peak_rss_kib: Mapping[str, int] = attrs.field(factory=dict)
    details: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)

    @property
    def tcp_mbit(self) -> float | None:
        return median(self.tcp_mbit_runs)

    @property
    def tcp_down_mbit(self) -> float | None:
        return median(self.tcp_down_mbit_runs)

    @property
    def udp64_pps(self) -> float | None:
        return median([u.received_pps for u in self.udp64_runs])

    def outage(self, fault: str) -> Outage | None:
        return median_outage(self.outages.get(fault, ()))

    def cpu_cores(self, test: str) -> dict[str, float]:
        """Median cores per role and of the client + gateway total, over the rounds of ``test``."""
        samples = self.cpu_runs.get(test, ())
        if not samples:
            return {}
        out = {role: statistics.median(s[role] for s in samples) for role in samples[0]}
        out["total"] = statistics.median(sum(s.values()) for s in samples)
        return out

    def figure(self, metric: str) -> Figure | None:
        """This system's figure for a table row (see :func:`rows`), None if not measured."""
        value: float | None
        if metric == "tcp_mbit":
            value = self.tcp_mbit
        elif metric == "tcp_down_mbit":
            value = self.tcp_down_mbit
        elif metric == "udp64_pps":
            value = self.udp64_pps
        elif metric in FAULTS:
            o = self.outage(metric)
            return Figure(o.seconds, lower_bound=not o.recovered) if o is not None else None
        elif metric.startswith("cpu_"):
            value = self.cpu_cores(metric[len("cpu_") :]).get("total")
        elif metric == "peak_rss":
            value = sum(self.peak_rss_kib.values()) / 1024 if self.peak_rss_kib else None
        else:
            raise KeyError(metric)
        return Figure(value) if value is not None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "status": self.status, "reason": self.reason, "version": self.version}
        if self.status == REFERENCE:
            out["reference"] = {"source": f"../shared/peers.md ({PEERS_MD_DATE})", **self.details}
            return out
        out["tcp_mbit"] = _round_or_none(self.tcp_mbit, 1)
        out["tcp_mbit_runs"] = [round(v, 1) for v in self.tcp_mbit_runs]
        out["tcp_down_mbit"] = _round_or_none(self.tcp_down_mbit, 1)
        out["tcp_down_mbit_runs"] = [round(v, 1) for v in self.tcp_down_mbit_runs]
        out["udp64_received_pps"] = _round_or_none(self.udp64_pps, 1)
        out["udp64_runs"] = [
            {"received_pps": round(u.received_pps, 1), "sent_pps": round(u.sent_pps, 1),
             "lost_percent": round(u.lost_percent, 2)}
            for u in self.udp64_runs
        ]  # fmt: skip
        outages: dict[str, Any] = {}
        for fault, runs in self.outages.items():
            med = median_outage(runs)
            outages[fault] = {
                "median_s": None if med is None else round(med.seconds, 4),
                "median_recovered": None if med is None else med.recovered,
                "runs": [o.to_json() for o in runs],
            }
        out["outage"] = outages
        out["cpu_cores"] = {
            test: {
                "median": {role: round(v, 3) for role, v in self.cpu_cores(test).items()},
                "runs": [{role: round(v, 3) for role, v in s.items()} for s in samples],
            }
            for test, samples in self.cpu_runs.items()
        }
        out["idle_cores"] = _round_or_none(median(self.idle_cores_runs), 3)
        out["peak_rss_kib"] = dict(self.peak_rss_kib)
        out["details"] = dict(self.details)
        return out


def _round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def wireguard_reference() -> SystemResult:
    """The peers.md figures for wireguard-go, labelled as such (never a same-run measurement)."""
    ref = PEERS_MD_WIREGUARD
    return SystemResult(
        key=WIREGUARD_REFERENCE,
        status=REFERENCE,
        reason="wireguard-go was not measured in this run",
        version=str(ref["label"]),
        details=dict(ref),
    )


@attrs.frozen
class Row:
    metric: str
    title: str


def _median_of(runs: int) -> str:
    return f"median of {runs}" if runs > 1 else "1 run"


def rows(runs: int, fault_runs: int | None = None) -> tuple[Row, ...]:
    """The table's rows; titles say over how many rounds (or fault trials) the median is."""
    of, faults_of = _median_of(runs), _median_of(runs if fault_runs is None else fault_runs)
    return (
        Row("tcp_mbit", f"TCP, one stream (Mbit/s, {of})"),
        Row("tcp_down_mbit", f"TCP download, one stream (Mbit/s, {of})"),
        Row("udp64_pps", f"UDP 64 B received (packets/s, {of})"),
        Row(LINK_DOWN, f"outage, link down (s, {faults_of})"),
        Row(BLACKHOLE, f"outage, blackhole (s, {faults_of})"),
        Row("cpu_tcp", "CPU during TCP, client + gateway (cores)"),
        Row("cpu_tcp_down", "CPU during TCP download, client + gateway (cores)"),
        Row("cpu_udp64", "CPU during UDP 64 B, client + gateway (cores)"),
        Row("peak_rss", "peak RSS, client + gateway (MiB)"),
    )


def _reference_cell(metric: str) -> str:
    """peers.md's figure for a row; ``—`` where it has none (it measured no download)."""
    ref = PEERS_MD_WIREGUARD
    if metric == "tcp_mbit":
        return f"{ref['tcp_mbit']:,.0f}"
    if metric == "udp64_pps":
        return f"{ref['udp64_pps'] / 1000:,.1f} k"
    if metric == LINK_DOWN:
        return f"{ref['link_down_s']:.1f}"
    if metric == BLACKHOLE:
        return f"> {ref['blackhole_s']:.0f} (no recovery)"
    if metric == "cpu_tcp":
        return f"{ref['tcp_cores']:.2f}"
    return "—"


# -- idle cost and failover by probing policy --------------------------------------------------------

PER_ROLE = "per_role"
FLAT = "flat"
#: The probing policies the idle section compares, in column order (each over JVPN_POLICY): the
#: defaults, a cadence per role; and every path at the active cadence, as before per-role probing
#: (issue 12's "today's policy", reproduced by setting both standby intervals to probe_interval_ms).
IDLE_POLICIES: Mapping[str, Mapping[str, int]] = {
    PER_ROLE: {},
    FLAT: {
        "standby_probe_interval_ms": DEFAULT_POLICY.probe_interval_ms,
        "metered_probe_interval_ms": DEFAULT_POLICY.probe_interval_ms,
    },
}
IDLE_LABELS = {
    PER_ROLE: "default policy (cadence per role)",
    FLAT: f"previous: every path at {DEFAULT_POLICY.probe_interval_ms} ms",
}
#: The lab paths whose client ``[[path]]`` says ``metered = true`` (LTE is metered by kind as well).
IDLE_METERED_PATHS = ("lte0",)
DEFAULT_IDLE_S = 60.0
QUICK_IDLE_S = 10.0
MAX_IDLE_S = 600.0
#: Bound on the wait for the idle state: ATTACHED on the preferred path, every path HEALTHY, the
#: others at their standby role.
IDLE_SETTLE_TIMEOUT_S = 30.0
#: Then this long before the window opens, so the first standby probes and their acks are behind.
IDLE_LEAD_S = 1.0
#: Probing roles of a path the session is not bound to (``ProbeRole`` values, docs/policy.md).
STANDBY_ROLES = ("standby", "metered")
#: The bound path's role once the tunnel carried nothing for ``idle_after_ms``.
IDLE_ROLE = "idle"
HEALTHY = "HEALTHY"
ATTACHED = "ATTACHED"

#: Issue 12's targets, printed beside the figures; a benchmark reports them, no test asserts them.
TARGET_CLIENT_CPU_PCT = 1.0
TARGET_GATEWAY_CPU_PCT = 0.5
TARGET_STANDBY_BPS = 200.0
TARGET_METERED_BPS = 30.0


def cpu_percent(stat_before: str, stat_after: str, wall_s: float, *, ticks_per_s: float) -> float:
    """Percent of one core a process used between two readings of its ``/proc/<pid>/stat``.

    ValueError on malformed text, a non-positive wall time, or CPU time that went backwards
    (two different processes).
    """
    before, after = parse_cpu_ticks(stat_before), parse_cpu_ticks(stat_after)
    if after < before:
        raise ValueError(f"CPU ticks went backwards ({before} -> {after}): not the same process")
    return 100.0 * cores(before, after, wall_s, ticks_per_s=ticks_per_s)


@attrs.frozen
class LinkBytes:
    """An interface's byte counters: received and sent."""

    rx: int
    tx: int


def parse_link_bytes(text: str) -> dict[str, LinkBytes]:
    """Bytes received and sent per interface, from ``ip -j -s link show`` (its ``stats64``).

    ValueError if the text is not that JSON or an interface has no byte counters.
    """
    try:
        links = json.loads(text)
    except ValueError:
        raise ValueError("ip -j -s link: output is not JSON") from None
    if not isinstance(links, list):
        raise ValueError("ip -j -s link: output is not a list")
    out = {}
    for link in links:
        name = link.get("ifname") if isinstance(link, dict) else None
        stats = link.get("stats64") if isinstance(link, dict) else None
        try:
            rx, tx = stats["rx"]["bytes"], stats["tx"]["bytes"]  # type: ignore[index]
        except (KeyError, TypeError):
            raise ValueError(f"ip -j -s link: no byte counters for {name!r}") from None
        if not isinstance(name, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (rx, tx)):
            raise ValueError(f"ip -j -s link: bad entry for {name!r}")
        out[name] = LinkBytes(rx=rx, tx=tx)
    return out


@attrs.frozen
class PathRate:
    """Bytes per second on one path's wire, each direction as the client sees it."""

    tx_bps: float
    rx_bps: float

    @property
    def total_bps(self) -> float:
        return self.tx_bps + self.rx_bps

    def to_json(self) -> dict[str, float]:
        return {"tx_Bps": round(self.tx_bps, 1), "rx_Bps": round(self.rx_bps, 1), "total_Bps": round(self.total_bps, 1)}


def bytes_per_second(
    before: Mapping[str, LinkBytes], after: Mapping[str, LinkBytes], wall_s: float, *, names: Sequence[str]
) -> dict[str, PathRate]:
    """Each of ``names``' bytes per second between two counter readings ``wall_s`` apart.

    ValueError if a name is missing from a reading, a counter went backwards (the interface was
    recreated), or ``wall_s <= 0``.
    """
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    out = {}
    for name in names:
        if name not in before or name not in after:
            raise ValueError(f"no byte counters for {name} in both readings")
        b, a = before[name], after[name]
        if a.rx < b.rx or a.tx < b.tx:
            raise ValueError(f"{name}: byte counters went backwards (interface recreated?)")
        out[name] = PathRate(tx_bps=(a.tx - b.tx) / wall_s, rx_bps=(a.rx - b.rx) / wall_s)
    return out


def path_entries(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The client status's path entries by interface name."""
    entries = status.get("paths")
    if not isinstance(entries, list):
        return {}
    return {str(e["interface"]): e for e in entries if isinstance(e, Mapping) and e.get("interface") is not None}


def idle_ready(paths: Sequence[LabPath], status: Mapping[str, Any]) -> bool:
    """True once the client idles as measured: ATTACHED on the preferred path (lowest metric) at the
    idle role, every path HEALTHY with an answered probe, and every other path at a standby role."""
    if status.get("state") != ATTACHED or not paths:
        return False
    entries = path_entries(status)
    preferred = min(paths, key=lambda p: p.metric).name
    for path in paths:
        entry = entries.get(path.name)
        if entry is None or entry.get("verdict") != HEALTHY or entry.get("last_delivery_ago_s") is None:
            return False
        if path.name == preferred:
            if not entry.get("active") or entry.get("probing") != IDLE_ROLE:
                return False
        elif entry.get("probing") not in STANDBY_ROLES:
            return False
    return True


def probe_roles(status: Mapping[str, Any]) -> dict[str, str]:
    """Interface name -> how it is probed (``active``, ``standby``, ``metered``), from a client status."""
    return {name: str(e.get("probing")) for name, e in path_entries(status).items()}


@attrs.frozen
class IdleSnapshot:
    """What the idle window compares at its two ends: one reading of everything, at ``at``."""

    at: float
    #: process role -> the text of its /proc/<pid>/stat.
    stat: Mapping[str, str]
    links: Mapping[str, LinkBytes]
    #: interface -> probing role, and the active path, from the client's status.
    roles: Mapping[str, str]
    active: str | None


@attrs.frozen
class IdleFigures:
    wall_s: float
    cpu_pct: Mapping[str, float]
    rates: Mapping[str, PathRate]


def idle_figures(
    before: IdleSnapshot, after: IdleSnapshot, *, names: Sequence[str], ticks_per_s: float
) -> IdleFigures:
    """CPU percent per process and bytes/s per path over the window between two snapshots (ValueError if
    the window is empty or a reading is inconsistent)."""
    wall = after.at - before.at
    if set(before.stat) != set(after.stat):
        raise ValueError("the two snapshots read different processes")
    cpu = {role: cpu_percent(before.stat[role], after.stat[role], wall, ticks_per_s=ticks_per_s) for role in before.stat}
    return IdleFigures(wall_s=wall, cpu_pct=cpu, rates=bytes_per_second(before.links, after.links, wall, names=names))


@attrs.frozen
class IdleResult:
    """One probing policy's idle cost and failover times (or why it was not measured)."""

    key: str
    status: str
    overrides: Mapping[str, int]
    reason: str | None = None
    figures: IdleFigures | None = None
    #: interface -> probing role at the window's start and end; the active path at both ends.
    roles: Mapping[str, str] = attrs.field(factory=dict)
    roles_end: Mapping[str, str] = attrs.field(factory=dict)
    active: str | None = None
    active_end: str | None = None
    #: Blackholes of the active path, in the order they ran: while traffic flows, and while idle.
    failovers: tuple[Outage, ...] = ()
    idle_failovers: tuple[Outage, ...] = ()

    @property
    def label(self) -> str:
        return IDLE_LABELS.get(self.key, self.key)

    @property
    def failover(self) -> Outage | None:
        return median_outage(self.failovers)

    @property
    def idle_failover(self) -> Outage | None:
        return median_outage(self.idle_failovers)

    def to_json(self) -> dict[str, Any]:
        med, idle_med, f = self.failover, self.idle_failover, self.figures
        return {
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            "policy_overrides": {**JVPN_POLICY, **self.overrides},
            "wall_s": None if f is None else round(f.wall_s, 3),
            "cpu_percent_of_one_core": {} if f is None else {r: round(v, 3) for r, v in f.cpu_pct.items()},
            "paths": {} if f is None else {n: {"role": self.roles.get(n), **r.to_json()} for n, r in f.rates.items()},
            "roles_end": dict(self.roles_end),
            "active_path": self.active,
            "active_path_end": self.active_end,
            "failover_blackhole": {
                "median_s": None if med is None else round(med.seconds, 4),
                "median_recovered": None if med is None else med.recovered,
                "runs": [o.to_json() for o in self.failovers],
            },
            "failover_blackhole_while_idle": {
                "median_s": None if idle_med is None else round(idle_med.seconds, 4),
                "median_recovered": None if idle_med is None else idle_med.recovered,
                "runs": [o.to_json() for o in self.idle_failovers],
            },
        }


@attrs.frozen
class IdleSection:
    """The idle section of a report: the window's length and one result per policy, in column order."""

    seconds: float
    results: tuple[IdleResult, ...]
    metered: tuple[str, ...] = IDLE_METERED_PATHS

    def to_json(self) -> dict[str, Any]:
        return {
            "idle_seconds": self.seconds,
            "metered_paths": list(self.metered),
            "policies": {r.key: r.to_json() for r in self.results},
            "targets": {
                "client_cpu_pct": TARGET_CLIENT_CPU_PCT,
                "gateway_cpu_pct": TARGET_GATEWAY_CPU_PCT,
                "standby_Bps": TARGET_STANDBY_BPS,
                "metered_Bps": TARGET_METERED_BPS,
                "failover": f"no slower than {IDLE_LABELS[FLAT]}",
            },
            "notes": {
                FLAT: "issue 12's 'today's policy': standby_probe_interval_ms = metered_probe_interval_ms = "
                f"probe_interval_ms ({DEFAULT_POLICY.probe_interval_ms})",
                "bytes": "on the client's path interfaces (ip -s link), both directions, the whole wire "
                "(probes, acks, keepalives, ARP/ND)",
            },
        }


def _role_name(result: IdleResult | None, name: str, metered: Sequence[str]) -> str:
    role = result.roles.get(name) if result is not None else None
    if role is None:
        return "metered" if name in metered else "?"
    return "metered standby" if role == "metered" else role


def _path_target(role: str) -> str:
    if role == "standby":
        return f"≤ {TARGET_STANDBY_BPS:.0f}"
    if role == "metered standby":
        return f"≤ {TARGET_METERED_BPS:.0f}"
    return "—"


def _rate_cell(rate: PathRate | None) -> str:
    if rate is None:
        return "—"
    return f"{rate.total_bps:,.0f} ({rate.tx_bps:,.0f} out, {rate.rx_bps:,.0f} in)"


def render_idle(section: IdleSection, runs: int, paths: Sequence[str]) -> str:
    """The idle section's Markdown table: one column per policy, issue 12's targets last."""
    results = section.results
    of = f"median of {runs}" if runs > 1 else "1 run"
    headers = ["idle, jvpn-trio", *(r.label for r in results), "target"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.append("| " + " | ".join(["status", *(_status_text(r.status, r.reason) for r in results), ""]) + " |")

    def cpu(role: str) -> list[str]:
        return [f"{r.figures.cpu_pct[role]:.2f}" if r.figures and role in r.figures.cpu_pct else "—" for r in results]

    lines.append("| " + " | ".join([f"client CPU (% of one core, {section.seconds:g} s idle)", *cpu("client"),
                                    f"≤ {TARGET_CLIENT_CPU_PCT:g}"]) + " |")  # fmt: skip
    lines.append("| " + " | ".join(["gateway CPU (% of one core, one idle session)", *cpu("gateway"),
                                    f"≤ {TARGET_GATEWAY_CPU_PCT:g}"]) + " |")  # fmt: skip
    reference = next((r for r in results if r.key == PER_ROLE), results[0] if results else None)
    for name in paths:
        role = _role_name(reference, name, section.metered)
        cells = [_rate_cell(r.figures.rates.get(name) if r.figures else None) for r in results]
        lines.append("| " + " | ".join([f"{name} ({role}), B/s on the wire", *cells, _path_target(role)]) + " |")
    def outages(which: Callable[[IdleResult], Outage | None]) -> list[str]:
        cells = []
        for r in results:
            o = which(r)
            cells.append("—" if o is None else format_figure(BLACKHOLE, Figure(o.seconds, lower_bound=not o.recovered)))
        return cells

    victim = next((o.path for r in results for o in r.failovers), "the active path")
    lines.append("| " + " | ".join([f"failover, blackhole of {victim} (s, {of})", *outages(lambda r: r.failover),
                                    "no slower than previous"]) + " |")  # fmt: skip
    lines.append("| " + " | ".join([f"failover, {victim} blackholed while idle, from the first packet (s, {of})",
                                    *outages(lambda r: r.idle_failover), "—"]) + " |")  # fmt: skip
    notes = [
        "",
        f"- {IDLE_LABELS[FLAT]}: issue 12's 'today's policy', reproduced with standby_probe_interval_ms = "
        f"metered_probe_interval_ms = {DEFAULT_POLICY.probe_interval_ms}; both over the bench's overrides "
        f"{dict(JVPN_POLICY)} (dwell and switch budget only, not probing).",
        f"- {', '.join(section.metered)}: `metered = true` in the client's [[path]]; bytes counted on the client's "
        "path interfaces, both directions (probes, acks, keepalives, ARP/ND); out = client to gateway.",
        "- failover: longest gap in a "
        f"{PROBE_HZ:g} Hz UDP probe stream through the tunnel while the active path is blackholed.",
        f"- while idle: the active path is blackholed {IDLE_FAULT_LEAD_S:g} s before the stream starts, on a tunnel "
        "idle for idle_after_ms; the outage counts from the stream's first packet (the cost of probing an idle "
        "path at its standby cadence: the death is seen after the first packet, docs/policy.md).",
    ]
    for r in results:
        if r.status == MEASURED and (r.active != r.active_end or r.roles != r.roles_end):
            notes.append(f"- {r.label}: the roles changed during the window ({r.roles} -> {r.roles_end})")
    return "\n".join(lines + notes) + "\n"


def _status_text(status: str, reason: str | None) -> str:
    return status if status == MEASURED else f"{status}: {reason}"


@attrs.frozen
class BenchSettings:
    runs: int
    iperf_s: float
    fault_s: float
    systems: tuple[str, ...]
    workdir: Path | None = None
    #: The idle section's window per policy; 0: no idle section.
    idle_s: float = 0.0
    #: Trials of each fault per tunnel; None: as many as ``runs``.
    fault_runs: int | None = None
    #: jvpn-trio's TUNs with checksum and TSO offloads (the default), or without (to measure what they give).
    tun_offload: bool = True
    #: ``--jvpn-policy``: the fields of a policy file that differ from the laptop default, under JVPN_POLICY.
    jvpn_policy: Mapping[str, Any] = attrs.field(factory=dict)
    #: Where they came from (the report names it); "" for the laptop default.
    jvpn_policy_source: str = ""

    @property
    def outage_runs(self) -> int:
        """Trials of each fault per tunnel."""
        return self.runs if self.fault_runs is None else self.fault_runs

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "fault_runs": self.outage_runs,
            "iperf_seconds": self.iperf_s,
            "fault_seconds": self.fault_s,
            "systems": list(self.systems),
            "idle_seconds": self.idle_s,
            "tun_offload": self.tun_offload,
            "probe_hz": PROBE_HZ,
            "udp_payload_bytes": UDP_PAYLOAD_BYTES,
            "jvpn_policy_overrides": dict(JVPN_POLICY),
            "jvpn_policy_file": self.jvpn_policy_source or None,
            "jvpn_policy_file_fields": dict(self.jvpn_policy),
        }


@attrs.frozen
class BenchReport:
    settings: BenchSettings
    results: tuple[SystemResult, ...]
    host: Mapping[str, Any]
    started_utc: str
    elapsed_s: float
    idle: IdleSection | None = None

    def result(self, key: str) -> SystemResult | None:
        return next((r for r in self.results if r.key == key), None)

    def ratios(self) -> dict[str, dict[str, Ratio | None]]:
        """``{"jvpn_over_baseline": {metric: Ratio}, "jvpn_over_openvpn": {...}, ...}`` (same run only)."""
        out: dict[str, dict[str, Ratio | None]] = {}
        jv = self.result(JVPN)
        for other, name, _ in RATIO_COLUMNS:
            peer = self.result(other)
            if jv is None or peer is None:
                continue
            out[name] = {row.metric: ratio(jv.figure(row.metric), peer.figure(row.metric)) for row in rows(1)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": REPORT_KIND,
            "jvpn_trio_version": __version__,
            "started_utc": self.started_utc,
            "elapsed_s": round(self.elapsed_s, 1),
            "host": dict(self.host),
            "settings": self.settings.to_json(),
            "systems": {r.key: r.to_json() for r in self.results},
            "ratios": {
                name: {metric: (r.to_json() if r is not None else None) for metric, r in by_metric.items()}
                for name, by_metric in self.ratios().items()
            },
            "notes": {
                "ratios": "same run only: the jvpn-trio figure divided by the other system's, both medians",
                "wireguard-go": (
                    f"measured in this run when installed; '{WIREGUARD_REFERENCE}' (present only when it was "
                    f"not measured) is {REFERENCE} ({PEERS_MD_DATE}) and no ratio is computed against it"
                ),
                "mptcp": (
                    f"outage = {MPTCP_OUTAGE_MEASURE}; each trial's evidence that MPTCP ran over two subflows "
                    "(namespace counters, both sockets' MPTCP_INFO) is in outage.<fault>.runs[i].details"
                ),
            },
            "idle": None if self.idle is None else self.idle.to_json(),
        }

    @property
    def failed(self) -> bool:
        """True if a measurement failed (exit code 1)."""
        statuses = [r.status for r in self.results]
        statuses += [r.status for r in self.idle.results] if self.idle is not None else []
        return FAILED in statuses


def _status_cell(result: SystemResult) -> str:
    return _status_text(result.status, result.reason)


def render_table(report: BenchReport) -> str:
    """The Markdown tables, with a short header and notes, for a report: the systems, then the idle section."""
    by_key = {r.key: r for r in report.results}
    columns = [k for k in MEASURABLE if k in by_key]
    s, host = report.settings, report.host
    first = (
        f"jvpn-trio bench, {report.started_utc} UTC, {report.elapsed_s:.0f} s; {host.get('cpus')} CPUs, "
        f"kernel {host.get('kernel')}, load average {host.get('loadavg_start')} -> {host.get('loadavg_end')}"
    )
    idle_table = "" if report.idle is None else render_idle(report.idle, s.runs, [p.name for p in lab_spec().paths])
    if not columns:
        return f"{first}\n\n{idle_table}"
    if idle_table:
        idle_table = "\n" + idle_table
    ratios = report.ratios()
    ratio_columns = [(name, title) for _, name, title in RATIO_COLUMNS if name in ratios]
    reference = WIREGUARD_REFERENCE in by_key
    headers = ["metric", *(by_key[k].label for k in columns), *(t for _, t in ratio_columns)]
    headers += [LABELS[WIREGUARD_REFERENCE]] if reference else []
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    status = ["status", *(_status_cell(by_key[k]) for k in columns), *("" for _ in ratio_columns)]
    status += [REFERENCE] if reference else []
    lines.append("| " + " | ".join(status) + " |")
    for row in rows(s.runs, s.outage_runs):
        cells = [row.title]
        cells += [format_figure(row.metric, by_key[k].figure(row.metric)) for k in columns]
        cells += [format_ratio(ratios[name][row.metric]) for name, _ in ratio_columns]
        cells += [_reference_cell(row.metric)] if reference else []
        lines.append("| " + " | ".join(cells) + " |")
    header = [
        first,
        f"{s.runs} interleaved round(s): iperf3 {s.iperf_s:g} s per test; {s.outage_runs} trial(s) per fault: "
        f"outage = longest gap in a {PROBE_HZ:g} Hz UDP probe stream while the fault ({s.fault_s:g} s) is on "
        "the active path",
        *([f"jvpn-trio runs under {s.jvpn_policy_source}: {dict(s.jvpn_policy)}"] if s.jvpn_policy_source else []),
        "",
    ]
    notes = [""]
    for key in columns:
        r = by_key[key]
        line = f"- {r.label}: {r.version}" if r.status == MEASURED else f"- {r.label}: {_status_cell(r)}"
        idle = median(r.idle_cores_runs)
        if idle is not None:
            line += f"; idle while the others were measured: {idle:.2f} cores"
        notes.append(line)
    if MPTCP in columns:
        notes.append(f"- {LABELS[MPTCP]}'s outage: {MPTCP_OUTAGE_MEASURE}; its '> x (no recovery)': a stall that "
                     "began x before the fault was removed had not ended by then.")
    if reference:
        notes.append(
            f"- {LABELS[WIREGUARD_REFERENCE]}: {REFERENCE}; that run measured the bare veth at "
            f"{PEERS_MD_BASELINE['tcp_mbit']:,.0f} Mbit/s and {PEERS_MD_BASELINE['udp64_pps'] / 1000:,.0f} k packets/s."
        )
    notes.append(
        "- ratios: jvpn-trio / the other system, same run; '> x (no recovery)': no probe got through "
        "until the fault was removed, so x is a lower bound."
    )
    return "\n".join(header + lines + notes) + "\n" + idle_table


# -----------------------------------------------------------------------------
# Processes and files (drivers)
# -----------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "a step did not finish within its time bound"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


#: What a failing measurement may raise; anything else is a bug and propagates.
MEASUREMENT_ERRORS = (BenchError, LabError, OSError, ValueError, trio.TooSlowError)


async def _read_text(path: Path) -> str:
    try:
        return await trio.Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def _tail(path: Path, lines: int = 2) -> str:
    text = [line.strip() for line in (await _read_text(path)).splitlines() if line.strip()]
    return " / ".join(text[-lines:]) if text else "(no output)"


async def _wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, process: LabProcess | None = None,
    log: Path | None = None,
) -> None:  # fmt: skip
    """Poll ``condition`` until true; BenchError after ``timeout_s`` or if ``process`` exits first."""
    with trio.move_on_after(timeout_s):
        while True:
            if await condition():
                return
            if process is not None and process.returncode is not None:
                tail = await _tail(log) if log is not None else ""
                raise BenchError(f"{what}: process exited {process.returncode} first: {tail}")
            await trio.sleep(POLL_S)
    tail = f": {await _tail(log)}" if log is not None else ""
    raise BenchError(f"{what}: not within {timeout_s:g} s{tail}")


async def _file_contains(path: Path, text: str) -> bool:
    return text in await _read_text(path)


async def _exists(path: Path) -> bool:
    return await trio.Path(path).exists()


class ProcStats:
    """CPU ticks and peak RSS of a tunnel's processes, read from /proc (no new dependency)."""

    def __init__(self, processes: Mapping[str, LabProcess]) -> None:
        self.processes = dict(processes)
        self.ticks_per_s = float(os.sysconf("SC_CLK_TCK"))

    async def ticks(self) -> dict[str, int]:
        """utime + stime per role; BenchError if a process has exited."""
        out = {}
        for role, proc in self.processes.items():
            text = await _read_text(Path(f"/proc/{proc.pid}/stat"))
            if not text or proc.returncode is not None:
                raise BenchError(f"the {role} process ({proc.pid}) is not running")
            out[role] = parse_cpu_ticks(text)
        return out

    async def peak_rss_kib(self) -> dict[str, int]:
        out = {}
        for role, proc in self.processes.items():
            value = parse_vm_hwm_kib(await _read_text(Path(f"/proc/{proc.pid}/status")))
            if value is not None:
                out[role] = value
        return out

    async def commands(self) -> dict[str, str]:
        """Each process's ``comm``: shows the pid is the tunnel itself, not an ``ip netns exec``."""
        return {role: (await _read_text(Path(f"/proc/{p.pid}/comm"))).strip() for role, p in self.processes.items()}


ActivePath = Callable[[], Awaitable[str | None]]
#: A system's own fault trial (``fault``, the settings, ``tag`` for file names) -> its outage, for systems whose
#: outage is not a probe stream's gap through a tunnel (kernel MPTCP).
OutageTrial = Callable[[str, BenchSettings, str], Awaitable[Outage]]


@attrs.define
class Running:
    """A system that came up, during the run: where to send traffic and what it measured so far.

    Mutable on purpose and owned by :func:`run_bench` alone; it becomes a frozen
    :class:`SystemResult` at the end.  ``failure`` set means later measurements skip it.
    """

    key: str
    lab: Lab
    workdir: Path
    #: Where servers bind in the gateway namespace (the tunnel's far end, or the /32 for baseline).
    target: str
    version: str
    stats: ProcStats | None = None
    #: The client's active path, for tunnels (None: the system has no outage to measure).
    active_path: ActivePath | None = None
    final_details: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: jvpn-trio's client status (``{}`` while the control socket does not answer).
    status: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    #: Its own fault trial, run instead of a probe stream through ``active_path`` (kernel MPTCP).
    outage_trial: OutageTrial | None = None
    #: Whether iperf3 measures it (False: no tunnel address to send to; kernel MPTCP).
    throughput: bool = True
    failure: str | None = None
    tcp: list[float] = attrs.Factory(list)
    tcp_down: list[float] = attrs.Factory(list)
    udp: list[UdpResult] = attrs.Factory(list)
    cpu: dict[str, list[CpuSample]] = attrs.Factory(dict)
    idle: list[float] = attrs.Factory(list)
    outages: dict[str, list[Outage]] = attrs.Factory(dict)
    details: dict[str, Any] = attrs.Factory(dict)
    peak_rss: dict[str, int] = attrs.Factory(dict)

    def result(self) -> SystemResult:
        return SystemResult(
            key=self.key,
            status=MEASURED if self.failure is None else FAILED,
            reason=self.failure,
            version=self.version,
            tcp_mbit_runs=tuple(self.tcp),
            tcp_down_mbit_runs=tuple(self.tcp_down),
            udp64_runs=tuple(self.udp),
            outages={fault: tuple(runs) for fault, runs in self.outages.items()},
            cpu_runs={test: tuple(samples) for test, samples in self.cpu.items()},
            idle_cores_runs=tuple(self.idle),
            peak_rss_kib=dict(self.peak_rss),
            details=dict(self.details),
        )


async def run_iperf(
    lab: Lab, target: str, *, udp: bool, seconds: float, workdir: Path, tag: str, reverse: bool = False
) -> tuple[Any, float]:
    """One iperf3 test from the client ns to a one-off server on ``target`` in the gateway ns.

    ``reverse`` (``-R``): the server sends and the client receives, the download direction.
    Returns the client's JSON document and the wall time the client ran.
    """
    out, err = workdir / f"iperf-{tag}-server.out", workdir / f"iperf-{tag}-server.err"
    server = await lab.start_process(
        lab.gateway_ns,
        ["iperf3", "-s", "-1", "-B", target, "-p", str(IPERF_PORT), "--forceflush"],
        stdout_path=out,
        stderr_path=err,
    )
    try:
        await _wait_for(
            lambda: _file_contains(out, "listening"), timeout_s=READY_TIMEOUT_S, what=f"iperf3 server on {target}",
            process=server, log=err,
        )  # fmt: skip
        argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", str(IPERF_CONNECT_TIMEOUT_MS)]  # fmt: skip
        if udp:
            argv += ["-u", "-l", str(UDP_PAYLOAD_BYTES), "-b", "0"]
        if reverse:
            argv.append("-R")
        started = time.monotonic()
        with trio.fail_after(seconds + IPERF_SLACK_S):
            result = await lab.run(lab.client_ns, *argv, check=False)
        wall = time.monotonic() - started
    finally:
        await server.terminate()
    await trio.Path(workdir / f"iperf-{tag}-client.json").write_bytes(result.stdout)
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        stderr = result.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"iperf3 client exit {result.returncode}: {stderr[-1] if stderr else 'no JSON output'}") from None
    return doc, wall


async def _all_ticks(systems: Sequence[Running]) -> dict[str, dict[str, int]]:
    return {s.key: await s.stats.ticks() for s in systems if s.stats is not None and s.failure is None}


async def _throughput_test(system: Running, everyone: Sequence[Running], test: str, settings: BenchSettings, tag: str) -> None:
    """One iperf3 test through ``system``; CPU of every live tunnel is read around it."""
    before = await _all_ticks(everyone)
    doc, wall = await run_iperf(
        system.lab, system.target, udp=test == UDP64, seconds=settings.iperf_s, workdir=system.workdir, tag=tag,
        reverse=test == TCP_DOWN,
    )
    after = await _all_ticks(everyone)
    for other in everyone:
        if other.key not in before or other.key not in after or other.stats is None:
            continue
        tps = other.stats.ticks_per_s
        sample = {role: cores(before[other.key][role], after[other.key][role], wall, ticks_per_s=tps) for role in before[other.key]}
        if other is system:
            system.cpu.setdefault(test, []).append(sample)
        else:
            other.idle.append(sum(sample.values()))
    if test == TCP:
        system.tcp.append(parse_iperf_tcp(doc))
        _progress(f"  {system.key}: TCP {system.tcp[-1]:,.0f} Mbit/s")
    elif test == TCP_DOWN:
        system.tcp_down.append(parse_iperf_tcp(doc))
        _progress(f"  {system.key}: TCP download {system.tcp_down[-1]:,.0f} Mbit/s")
    else:
        udp = parse_iperf_udp(doc)
        system.udp.append(udp)
        _progress(f"  {system.key}: UDP 64 B {udp.received_pps / 1000:,.1f} k packets/s received "
                  f"({udp.sent_pps / 1000:,.1f} k sent)")  # fmt: skip


async def _wait_preferred(lab: Lab, active_path: ActivePath) -> str:
    """Wait (bounded) until the tunnel uses the preferred path, then settle; return the active path.

    If it does not return to the preferred path in time, the fault goes on whatever is active.
    """
    preferred = min(lab.paths, key=lambda p: p.metric).name
    with trio.move_on_after(PREFERRED_TIMEOUT_S):
        while await active_path() != preferred:
            await trio.sleep(POLL_S)
    await trio.sleep(SETTLE_S)
    current = await active_path()
    if current is None:
        raise BenchError("the tunnel has no active path")
    return current


async def _apply_fault(lab: Lab, fault: str, victim: str) -> float:
    """Put ``fault`` on the client path ``victim``; return when it was applied (``time.monotonic()``)."""
    at = time.monotonic()
    if fault == LINK_DOWN:
        await lab.link_down(victim)
    else:
        await lab.blackhole(victim, True)
    return at


async def _one_outage(
    system: Running, fault: str, victim: str, settings: BenchSettings, tag: str, *, fault_first: bool = False
) -> Outage:
    """Run one probe stream, put ``fault`` on ``victim`` while it flows, and return the outage.

    ``fault_first``: the fault is on :data:`IDLE_FAULT_LEAD_S` before the stream starts (a death while
    the tunnel idles), and the outage counts from the stream's first packet.
    """
    lab, workdir = system.lab, system.workdir
    ready, report, first = (workdir / f"probe-{tag}.{ext}" for ext in ("ready", "json", "first"))
    sink_err, source_err = workdir / f"probe-{tag}-sink.err", workdir / f"probe-{tag}-source.err"
    listen = format_endpoint((system.target, PROBE_PORT))
    duration = PROBE_LEAD_S + settings.fault_s + PROBE_SLACK_S
    sink = await lab.start_process(
        lab.gateway_ns,
        traffic_argv("udp-probe-sink", "--listen", listen, "--ready", str(ready), "--report", str(report),
                     "--first-probe", str(first), "--timeout", f"{duration + READY_TIMEOUT_S + 5:g}"),
        stderr_path=sink_err,
    )  # fmt: skip
    await _wait_for(lambda: _exists(ready), timeout_s=READY_TIMEOUT_S, what="probe sink", process=sink, log=sink_err)

    async def apply_fault() -> float:
        return await _apply_fault(lab, fault, victim)

    if fault_first:
        fault_start = await apply_fault()
        await trio.sleep(IDLE_FAULT_LEAD_S)
    source = await lab.start_process(
        lab.client_ns,
        traffic_argv("udp-probe-source", "--connect", listen, "--hz", f"{PROBE_HZ:g}", "--duration", f"{duration:g}",
                     "--report", str(workdir / f"probe-{tag}-source.json")),
        stderr_path=source_err,
    )  # fmt: skip
    if not fault_first:
        await _wait_for(
            lambda: _exists(first), timeout_s=READY_TIMEOUT_S, what="first probe through the tunnel",
            process=source, log=source_err,
        )  # fmt: skip
        await trio.sleep(PROBE_LEAD_S)
        fault_start = await apply_fault()
    await trio.sleep(settings.fault_s)
    fault_end = time.monotonic()
    await lab.restore(victim)
    with trio.fail_after(duration + READY_TIMEOUT_S + 10):
        await source.wait()
        await sink.wait()
    data = json.loads(await _read_text(report) or "null")
    if not isinstance(data, dict) or data.get("start") is None or data.get("end") is None:
        raise BenchError(f"probe sink wrote no usable report: {await _tail(sink_err)}")
    start = float(data["start"])
    arrivals = [start + float(t) for _, t in data.get("arrivals", [])]
    if fault_first:
        fault_start = start
    return outage_from_arrivals(
        arrivals, fault_start=fault_start, fault_end=fault_end, stream_end=float(data["end"]), path=victim
    )


async def _idle_outage_run(system: Running, settings: BenchSettings, run: int) -> None:
    """A blackhole of the active path while the tunnel idles, then traffic (:func:`_one_outage`'s ``fault_first``)."""
    assert system.active_path is not None and system.status is not None  # jvpn-trio systems only
    victim = await _wait_preferred(system.lab, system.active_path)
    status, lab = system.status, system.lab

    async def idle() -> bool:
        return idle_ready(lab.paths, await status())

    await _wait_for(idle, timeout_s=IDLE_SETTLE_TIMEOUT_S, what="the tunnel idle again", process=None, log=None)
    outage = await _one_outage(system, BLACKHOLE, victim, settings, f"idle-blackhole-{run + 1}", fault_first=True)
    system.outages.setdefault(IDLE_BLACKHOLE, []).append(outage)
    shown = f"{outage.seconds:.3f} s" if outage.recovered else f"> {outage.seconds:.3f} s (no recovery)"
    _progress(f"  {system.key}: run {run + 1}/{settings.runs} blackhole while idle on {victim}: outage {shown}")


async def _outage_run(system: Running, fault: str, settings: BenchSettings, run: int) -> None:
    tag = f"{fault}-{run + 1}"
    if system.outage_trial is not None:
        outage = await system.outage_trial(fault, settings, tag)
        victim = outage.path
    else:
        assert system.active_path is not None  # callers pass tunnels only (not input validation)
        victim = await _wait_preferred(system.lab, system.active_path)
        outage = await _one_outage(system, fault, victim, settings, tag)
    system.outages.setdefault(fault, []).append(outage)
    shown = f"{outage.seconds:.3f} s" if outage.recovered else f"> {outage.seconds:.3f} s (no recovery)"
    _progress(f"  {system.key}: run {run + 1}/{settings.outage_runs} {fault.replace('_', ' ')} on {victim}: "
              f"outage {shown}")  # fmt: skip


# -----------------------------------------------------------------------------
# Bringing each system up
# -----------------------------------------------------------------------------


def lab_spec() -> LabSpec:
    return LabSpec(prefix=PREFIX_FAMILY + secrets.token_hex(2))


async def start_baseline(lab: Lab, workdir: Path) -> Running:
    """Nothing to start: iperf3 goes straight over the veths to the gateway's /32 (via eth0)."""
    return Running(key=BASELINE, lab=lab, workdir=workdir, target=lab.gateway_address, version="no tunnel")


def _jvpn_configs(
    directory: Path, lab: Lab, policy: Mapping[str, Any] = JVPN_POLICY, options: labrun.TunnelOptions | None = None
) -> None:
    """Keys and TOML files for one gateway and one full-tunnel client over every lab path."""
    labrun.write_configs(directory, lab, policy=policy, options=options or labrun.TunnelOptions())


def jvpn_active_path(lab: Lab, status: Mapping[str, Any]) -> str | None:
    """The lab path an ATTACHED client's session is bound to (a path's priority is its metric)."""
    if status.get("state") != "ATTACHED":
        return None
    for entry in status.get("paths", []):
        if isinstance(entry, Mapping) and entry.get("active"):
            return next((p.name for p in lab.paths if p.metric == entry.get("priority")), None)
    return None


async def start_jvpn(
    lab: Lab, workdir: Path, *, key: str = JVPN, policy: Mapping[str, Any] = JVPN_POLICY,
    options: labrun.TunnelOptions | None = None,
) -> Running:  # fmt: skip
    """The real ``serve`` and ``up`` processes, full tunnel; returns once the session is ATTACHED."""
    from jvpn_trio.drivers.control import ControlError, query_control

    await trio.to_thread.run_sync(_jvpn_configs, workdir, lab, policy, options)
    py = sys.executable
    gateway = await lab.start_process(
        lab.gateway_ns, [py, "-m", "jvpn_trio", "serve", "--config", str(workdir / "gateway.toml"), "--quiet"],
        stderr_path=workdir / "gateway.err",
    )  # fmt: skip
    await _wait_for(
        lambda: _exists(workdir / "gateway.sock"), timeout_s=READY_TIMEOUT_S,
        what="jvpn-trio gateway control socket", process=gateway, log=workdir / "gateway.err",
    )  # fmt: skip
    client = await lab.start_process(
        lab.client_ns, [py, "-m", "jvpn_trio", "up", "--config", str(workdir / "client.toml"), "--quiet"],
        stderr_path=workdir / "client.err",
    )  # fmt: skip

    async def status() -> Mapping[str, Any]:
        try:
            reply: Mapping[str, Any] = await query_control(workdir / "client.sock", {"cmd": "status"}, timeout=2.0)
        except ControlError:
            return {}
        return reply

    async def attached() -> bool:
        return (await status()).get("state") == "ATTACHED"

    await _wait_for(
        attached, timeout_s=ATTACH_TIMEOUT_S, what="jvpn-trio session ATTACHED", process=client,
        log=workdir / "client.err",
    )  # fmt: skip

    async def active_path() -> str | None:
        return jvpn_active_path(lab, await status())

    async def final_details() -> dict[str, Any]:
        reply = await status()
        return {"client_counters": reply.get("counters", {}), "policy_fingerprint": reply.get("policy")}

    stats = ProcStats({"client": client, "gateway": gateway})
    return Running(
        key=key, lab=lab, workdir=workdir, target=JVPN_GATEWAY_TUNNEL, version=f"jvpn-trio {__version__}",
        stats=stats, active_path=active_path, final_details=final_details, status=status,
        details={"processes": await stats.commands()},
    )  # fmt: skip


async def _checked(argv: Sequence[str], *, cwd: Path) -> None:
    """Run a local command that touches no network (openssl, openvpn --genkey); BenchError on failure."""
    with trio.fail_after(READY_TIMEOUT_S * 3):
        result = await trio.run_process(list(argv), cwd=str(cwd), capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{argv[0]} {argv[1]}: exit {result.returncode}: {lines[-1] if lines else ''}")


async def openvpn_version() -> str | None:
    """``OpenVPN 2.6.14`` if the binary is installed and runs, else None."""
    if shutil.which("openvpn") is None:
        return None
    with trio.fail_after(READY_TIMEOUT_S):
        result = await trio.run_process(["openvpn", "--version"], capture_stdout=True, capture_stderr=True, check=False)
    words = result.stdout.decode(errors="replace").split()
    return " ".join(words[:2]) if len(words) >= 2 and words[0] == "OpenVPN" else None


async def _openvpn_pki(directory: Path) -> None:
    """A throwaway CA, a server and a client certificate (P-256) and a tls-crypt key, for this run only."""
    if shutil.which("openssl") is None:
        raise BenchError("openssl not found (apt-get install -y openssl)")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    await _checked(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
                    "-days", str(CERT_DAYS), "-subj", "/CN=jvpn-bench-ca"], cwd=directory)  # fmt: skip
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        await trio.Path(directory / f"{role}.ext").write_text(
            f"basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = {usage}\n"
        )
        await _checked(["openssl", "req", "-new", *ec, "-keyout", f"{role}.key", "-out", f"{role}.csr",
                        "-subj", f"/CN=jvpn-bench-{role}"], cwd=directory)  # fmt: skip
        await _checked(["openssl", "x509", "-req", "-in", f"{role}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                        "-CAcreateserial", "-days", str(CERT_DAYS), "-extfile", f"{role}.ext",
                        "-out", f"{role}.crt"], cwd=directory)  # fmt: skip
    await _checked(["openvpn", "--genkey", "secret", "tls-crypt.key"], cwd=directory)


def openvpn_configs(gateway_address: str) -> tuple[str, str]:
    """``(server.conf, client.conf)``: UDP, AES-256-GCM, float, keepalive 1 5, no DCO, no redirect.

    The client keeps its routing table (no redirect-gateway): the kernel's route to the server
    (eth0, metric 10, or the next path when eth0 is down) is what ``float`` follows, and the
    measured traffic goes to the server's tunnel address only.
    """
    common = "\n".join(
        [
            "proto udp4",
            "dev jvbovpn0",
            "dev-type tun",
            "ca ca.crt",
            "tls-crypt tls-crypt.key",
            "data-ciphers AES-256-GCM",
            "keepalive 1 5",
            "float",
            "disable-dco",
            "verb 3",
        ]
    )
    server = f"""mode server
tls-server
local {gateway_address}
port {OPENVPN_PORT}
topology subnet
ifconfig {OPENVPN_GATEWAY_TUNNEL} {OPENVPN_NETMASK}
ifconfig-pool {OPENVPN_POOL[0]} {OPENVPN_POOL[1]} {OPENVPN_NETMASK}
push "topology subnet"
push "route-gateway {OPENVPN_GATEWAY_TUNNEL}"
cert server.crt
key server.key
dh none
{common}
"""
    client = f"""client
remote {gateway_address} {OPENVPN_PORT}
nobind
remote-cert-tls server
cert client.crt
key client.key
{common}
"""
    return server, client


async def _route_device(lab: Lab, address: str) -> str | None:
    """The client namespace's output device towards ``address`` (``ip route get``)."""
    result = await lab.run(lab.client_ns, "ip", "-j", "route", "get", address, check=False)
    if result.returncode != 0:
        return None
    try:
        routes = json.loads(result.stdout)
    except ValueError:
        return None
    device = routes[0].get("dev") if isinstance(routes, list) and routes and isinstance(routes[0], dict) else None
    return str(device) if device is not None else None


async def start_openvpn(lab: Lab, workdir: Path, version: str) -> Running:
    """Write the configs, start the server and then the client; return once the client is connected."""
    server_conf, client_conf = openvpn_configs(lab.gateway_address)
    await trio.Path(workdir / "server.conf").write_text(server_conf)
    await trio.Path(workdir / "client.conf").write_text(client_conf)
    logs = {role: workdir / f"{role}.log" for role in ("server", "client")}
    server = await lab.start_process(
        lab.gateway_ns, ["openvpn", "--cd", str(workdir), "--config", "server.conf"],
        stdout_path=logs["server"], stderr_path=workdir / "server.err",
    )  # fmt: skip
    await _wait_for(
        lambda: _file_contains(logs["server"], OPENVPN_READY_TEXT), timeout_s=READY_TIMEOUT_S,
        what="OpenVPN server", process=server, log=logs["server"],
    )  # fmt: skip
    client = await lab.start_process(
        lab.client_ns, ["openvpn", "--cd", str(workdir), "--config", "client.conf"],
        stdout_path=logs["client"], stderr_path=workdir / "client.err",
    )  # fmt: skip
    await _wait_for(
        lambda: _file_contains(logs["client"], OPENVPN_READY_TEXT), timeout_s=ATTACH_TIMEOUT_S,
        what="OpenVPN client connected", process=client, log=logs["client"],
    )  # fmt: skip

    async def active_path() -> str | None:
        return await _route_device(lab, lab.gateway_address)

    stats = ProcStats({"client": client, "gateway": server})
    return Running(
        key=OPENVPN, lab=lab, workdir=workdir, target=OPENVPN_GATEWAY_TUNNEL,
        version=f"{version}, UDP, AES-256-GCM, float, keepalive 1 5", stats=stats, active_path=active_path,
        details={"processes": await stats.commands(), "cipher": "AES-256-GCM", "dco": False},
    )  # fmt: skip


# -- wireguard-go ------------------------------------------------------------------------------------


@attrs.frozen
class WireguardKeys:
    """The run's two key pairs, in ``wg``'s base64 form (private halves kept out of reprs)."""

    gateway_private: str = attrs.field(repr=False)
    gateway_public: str
    client_private: str = attrs.field(repr=False)
    client_public: str


def wireguard_key(text: str, what: str) -> str:
    """One key as ``wg genkey`` / ``wg pubkey`` print it, checked: base64 of 32 bytes; BenchError if not."""
    word = text.strip()
    try:
        raw = base64.b64decode(word, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != WIREGUARD_KEY_BYTES:
        raise BenchError(f"wg: {what} is not a base64 {WIREGUARD_KEY_BYTES}-byte key")
    return word


def wireguard_interfaces(prefix: str) -> tuple[str, str]:
    """``(client, gateway)`` interface names for the lab ``prefix``: unique on the host (see WIREGUARD_SOCKET_DIR)."""
    return f"{prefix}{WIREGUARD_CLIENT_SUFFIX}", f"{prefix}{WIREGUARD_GATEWAY_SUFFIX}"


def wireguard_configs(gateway_address: str, keys: WireguardKeys) -> tuple[str, str]:
    """``(gateway.conf, client.conf)`` for ``wg setconf``: one peer each, no full tunnel.

    The gateway listens on WIREGUARD_PORT and learns the client's endpoint from its packets
    (WireGuard's roaming); the client sends to ``gateway_address`` over whatever path the
    kernel's route picks and keeps the session warm with WIREGUARD_KEEPALIVE_S.  Allowed IPs
    cover the tunnel subnet only, as OpenVPN's column does without redirect-gateway.
    """
    gateway = f"""[Interface]
PrivateKey = {keys.gateway_private}
ListenPort = {WIREGUARD_PORT}

[Peer]
PublicKey = {keys.client_public}
AllowedIPs = {WIREGUARD_CLIENT_TUNNEL}/32
"""
    client = f"""[Interface]
PrivateKey = {keys.client_private}

[Peer]
PublicKey = {keys.gateway_public}
AllowedIPs = {ipaddress.ip_interface(f"{WIREGUARD_GATEWAY_TUNNEL}/{WIREGUARD_PREFIXLEN}").network}
Endpoint = {gateway_address}:{WIREGUARD_PORT}
PersistentKeepalive = {WIREGUARD_KEEPALIVE_S}
"""
    return gateway, client


def parse_latest_handshakes(text: str) -> dict[str, int]:
    """``wg show <if> latest-handshakes``: public key -> Unix time of the last handshake (0: none yet).

    ValueError on a line that is not ``<key><TAB><integer>``.
    """
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"not a wg latest-handshakes line: {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def missing_tools(tools: Sequence[str]) -> list[str]:
    """The ``tools`` not on PATH, in order."""
    return [tool for tool in tools if shutil.which(tool) is None]


def wireguard_missing_reason(missing: Sequence[str]) -> str:
    """Why the wireguard-go column is empty when ``missing`` tools are not installed."""
    verb = "is" if len(missing) == 1 else "are"
    return f"{' and '.join(missing)} {verb} not installed ({WIREGUARD_INSTALL_HINT})"


async def wireguard_version() -> str | None:
    """``wireguard-go v0.0.20220316, wireguard-tools v1.0.20210914`` if both run, else None."""
    if missing_tools(WIREGUARD_TOOLS):
        return None
    words = []
    for tool in WIREGUARD_TOOLS:
        with trio.fail_after(READY_TIMEOUT_S):
            result = await trio.run_process([tool, "--version"], capture_stdout=True, capture_stderr=True, check=False)
        first = result.stdout.decode(errors="replace").split()
        if result.returncode != 0 or len(first) < 2:
            return None
        words.append(" ".join(first[:2]))
    return ", ".join(words)


async def _wg_output(argv: Sequence[str], stdin: bytes = b"") -> str:
    """A local ``wg`` command that touches no network (genkey, pubkey); its stdout; BenchError on failure."""
    with trio.fail_after(READY_TIMEOUT_S):
        result = await trio.run_process(list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(argv)}: exit {result.returncode}: {lines[-1] if lines else ''}")
    return result.stdout.decode(errors="replace")


async def wireguard_keys() -> WireguardKeys:
    """Two fresh key pairs from ``wg genkey`` / ``wg pubkey``, for this run only."""
    pairs = []
    for role in ("gateway", "client"):
        private = wireguard_key(await _wg_output(["wg", "genkey"]), f"{role} private key")
        public = wireguard_key(await _wg_output(["wg", "pubkey"], stdin=f"{private}\n".encode()), f"{role} public key")
        pairs += [private, public]
    return WireguardKeys(*pairs)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only (it holds a private key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _remove_wireguard_sockets(interfaces: Sequence[str]) -> None:
    """Remove UAPI sockets a killed wireguard-go left behind (it removes them itself on SIGTERM)."""
    for name in interfaces:
        with contextlib.suppress(FileNotFoundError):
            (WIREGUARD_SOCKET_DIR / f"{name}.sock").unlink()


async def _start_wireguard_side(
    lab: Lab, ns: str, interface: str, conf: Path, address: str, workdir: Path, role: str
) -> LabProcess:
    """One wireguard-go in ``ns``: start it, wait for its UAPI socket, configure it, address it, bring it up."""
    log = workdir / f"{role}.log"  # wireguard-go logs to stdout
    process = await lab.start_process(
        ns, ["wireguard-go", interface], stdout_path=log, stderr_path=workdir / f"{role}.err",
        env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
    )  # fmt: skip
    await _wait_for(
        lambda: _exists(WIREGUARD_SOCKET_DIR / f"{interface}.sock"), timeout_s=READY_TIMEOUT_S,
        what=f"wireguard-go {role} interface {interface}", process=process, log=log,
    )  # fmt: skip
    with trio.fail_after(READY_TIMEOUT_S):
        await lab.run(ns, "wg", "setconf", interface, str(conf))
        await lab.run(ns, "ip", "addr", "add", f"{address}/{WIREGUARD_PREFIXLEN}", "dev", interface)
        await lab.run(ns, "ip", "link", "set", interface, "up")
    return process


async def start_wireguard(lab: Lab, workdir: Path, version: str, keys: WireguardKeys) -> Running:
    """wireguard-go on both sides (gateway first); return once the client has completed a handshake."""
    client_if, gateway_if = wireguard_interfaces(lab.spec.prefix)
    gateway_conf, client_conf = wireguard_configs(lab.gateway_address, keys)
    confs = {"gateway": workdir / "gateway.conf", "client": workdir / "client.conf"}
    await trio.to_thread.run_sync(_write_private, confs["gateway"], gateway_conf)
    await trio.to_thread.run_sync(_write_private, confs["client"], client_conf)
    gateway = await _start_wireguard_side(
        lab, lab.gateway_ns, gateway_if, confs["gateway"], WIREGUARD_GATEWAY_TUNNEL, workdir, "gateway"
    )
    client = await _start_wireguard_side(
        lab, lab.client_ns, client_if, confs["client"], WIREGUARD_CLIENT_TUNNEL, workdir, "client"
    )

    async def handshake_done() -> bool:
        result = await lab.run(lab.client_ns, "wg", "show", client_if, "latest-handshakes", check=False)
        if result.returncode != 0:
            return False
        return parse_latest_handshakes(result.stdout.decode(errors="replace")).get(keys.gateway_public, 0) > 0

    await _wait_for(
        handshake_done, timeout_s=ATTACH_TIMEOUT_S, what="wireguard-go handshake", process=client,
        log=workdir / "client.log",
    )  # fmt: skip

    async def active_path() -> str | None:
        return await _route_device(lab, lab.gateway_address)

    stats = ProcStats({"client": client, "gateway": gateway})
    return Running(
        key=WIREGUARD, lab=lab, workdir=workdir, target=WIREGUARD_GATEWAY_TUNNEL,
        version=f"{version}, userspace TUN, persistent keepalive {WIREGUARD_KEEPALIVE_S} s", stats=stats,
        active_path=active_path,
        details={"processes": await stats.commands(), "interfaces": {"client": client_if, "gateway": gateway_if},
                 "persistent_keepalive_s": WIREGUARD_KEEPALIVE_S},
    )  # fmt: skip


# -- kernel MPTCP ------------------------------------------------------------------------------------


def mptcp_paths(lab: Lab) -> tuple[str, str]:
    """``(initial, second)``: the client paths of MPTCP's two subflows, the two lowest route metrics.

    The initial subflow leaves by the kernel's route (the lowest metric); the second is the
    ``subflow`` endpoint's.  BenchError if the lab has fewer than two paths.
    """
    ordered = sorted(lab.paths, key=lambda p: p.metric)
    if len(ordered) < 2:
        raise BenchError("kernel MPTCP needs two paths in the lab")
    return ordered[0].name, ordered[1].name


@attrs.frozen
class MptcpStream:
    """What one MPTCP stream left behind: the sink's and the source's reports, and the counters' evidence."""

    sink: Mapping[str, Any]
    source: Mapping[str, Any]
    evidence: labmptcp.SubflowEvidence

    @property
    def problem(self) -> str | None:
        """Why this stream does not count as MPTCP over two subflows (the counters, or either socket), or None."""
        if self.evidence.problem is not None:
            return self.evidence.problem
        for role, report in (("sink", self.sink), ("source", self.source)):
            info = report.get("mptcp")
            if isinstance(info, Mapping) and info.get("fallback"):
                return f"MPTCP fell back to plain TCP (the {role}'s MPTCP_INFO says so)"
        return None

    def details(self) -> dict[str, Any]:
        """The evidence a trial keeps in the JSON: counters and both sockets' MPTCP_INFO."""
        return {
            "subflows": self.evidence.to_json(),
            "sink_mptcp_info": self.sink.get("mptcp"),
            "source_mptcp_info": self.source.get("mptcp"),
            "source_error": self.source.get("error"),
            "sink_error": self.sink.get("error"),
            # A byte stream delivers every record written, in order; fewer received: a stall outlasted the
            # fault and the sink's MPTCP_DRAIN_S, or the connection broke.
            "records": {"written": self.source.get("written"), "received": self.sink.get("received"),
                        "in_order": self.sink.get("in_order")},
        }


async def _client_links(lab: Lab) -> dict[str, LinkBytes]:
    with trio.fail_after(READY_TIMEOUT_S):
        result = await lab.run(lab.client_ns, "ip", "-j", "-s", "link", "show")
    return parse_link_bytes(result.stdout.decode(errors="replace"))


async def _json_report(path: Path) -> dict[str, Any]:
    data = json.loads(await _read_text(path) or "null")
    return data if isinstance(data, dict) else {}


async def _mptcp_stream(
    lab: Lab, workdir: Path, tag: str, *, duration_s: float, during: Callable[[], Awaitable[None]]
) -> MptcpStream:
    """One MPTCP record stream from the client namespace to the gateway's /32, with ``during`` run while it flows.

    Starts the sink and the source (scheduled for at most ``duration_s``); once the first record
    has arrived and the second subflow has joined (the client's join counter moved, within
    :data:`MPTCP_JOIN_TIMEOUT_S`), awaits ``during``, then stops the stream and waits for both
    ends.  BenchError (the tools stopped) if no second subflow joins, saying whether MPTCP fell
    back, or if the sink wrote no usable report.
    """
    names = {ext: workdir / f"mptcp-{tag}.{ext}" for ext in ("ready", "first", "stop", "sink.json", "source.json",
                                                             "sink.err", "source.err")}  # fmt: skip
    for stale in names.values():  # a reused --workdir: a ready file of an earlier run means nothing now
        await trio.Path(stale).unlink(missing_ok=True)
    listen = format_endpoint((lab.gateway_address, MPTCP_PORT))
    client_before = await labmptcp.counters(lab, lab.client_ns)
    gateway_before = await labmptcp.counters(lab, lab.gateway_ns)

    async def evidence() -> labmptcp.SubflowEvidence:
        client, gateway = await labmptcp.counters(lab, lab.client_ns), await labmptcp.counters(lab, lab.gateway_ns)
        return labmptcp.subflow_evidence(client_before, client, gateway_before, gateway)

    sink = await lab.start_process(
        lab.gateway_ns,
        labmptcp.mptcp_argv("stream-sink", "--listen", listen, "--ready", str(names["ready"]),
                            "--report", str(names["sink.json"]), "--first-record", str(names["first"]),
                            "--timeout", f"{duration_s + READY_TIMEOUT_S + 5:g}", "--linger", f"{MPTCP_DRAIN_S:g}"),
        stderr_path=names["sink.err"],
    )  # fmt: skip
    source: LabProcess | None = None
    try:
        # Started together (each tool takes most of a second to start): the source retries while refused.
        source = await lab.start_process(
            lab.client_ns,
            labmptcp.mptcp_argv("stream-source", "--connect", listen, "--hz", f"{PROBE_HZ:g}",
                                "--duration", f"{duration_s:g}", "--report", str(names["source.json"]),
                                "--stop-file", str(names["stop"])),
            stderr_path=names["source.err"],
        )  # fmt: skip
        await _wait_for(lambda: _exists(names["ready"]), timeout_s=READY_TIMEOUT_S, what="MPTCP stream sink",
                        process=sink, log=names["sink.err"])  # fmt: skip
        await _wait_for(lambda: _exists(names["first"]), timeout_s=READY_TIMEOUT_S, what="first record over MPTCP",
                        process=source, log=names["source.err"])  # fmt: skip

        async def joined() -> bool:
            now = await labmptcp.counters(lab, lab.client_ns)
            return now.get(labmptcp.CLIENT_JOIN_COUNTER, 0) > client_before.get(labmptcp.CLIENT_JOIN_COUNTER, 0)

        try:
            await _wait_for(joined, timeout_s=MPTCP_JOIN_TIMEOUT_S, what="the second MPTCP subflow",
                            process=source, log=names["source.err"])  # fmt: skip
        except BenchError as exc:
            raise BenchError((await evidence()).problem or str(exc)) from None
        await during()
        await trio.Path(names["stop"]).write_text("stop\n")
        with trio.fail_after(duration_s + READY_TIMEOUT_S + 10):
            await source.wait()
            await sink.wait()
    finally:
        with trio.CancelScope(shield=True):  # the next trial listens on the same port
            for process in (source, sink):
                if process is not None:
                    await process.terminate()
    sink_report = await _json_report(names["sink.json"])
    if sink_report.get("start") is None or sink_report.get("end") is None:
        raise BenchError(f"MPTCP stream sink wrote no usable report: {await _tail(names['sink.err'])}")
    return MptcpStream(sink_report, await _json_report(names["source.json"]), await evidence())


async def _mptcp_outage(lab: Lab, workdir: Path, fault: str, settings: BenchSettings, tag: str) -> Outage:
    """One fault trial of kernel MPTCP: a stream over both subflows; after :data:`PROBE_LEAD_S`, ``fault``
    on the path that sent the most of it meanwhile, for ``settings.fault_s``; the outage is the
    longest receive stall while it was on.  BenchError if the trial was not MPTCP over two subflows."""
    initial, second = mptcp_paths(lab)
    trial: dict[str, Any] = {}

    async def fault_on_the_busiest_path() -> None:
        before = await _client_links(lab)
        await trio.sleep(PROBE_LEAD_S)
        after = await _client_links(lab)
        sent = {name: after[name].tx - before[name].tx for name in (initial, second)}
        victim = labmptcp.busiest_path(sent)
        trial.update(victim=victim, sent=sent)
        try:
            trial["start"] = await _apply_fault(lab, fault, victim)
            await trio.sleep(settings.fault_s)
            trial["end"] = time.monotonic()
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(READY_TIMEOUT_S):
                await lab.restore(victim)
        await trio.sleep(MPTCP_TAIL_S)

    stream = await _mptcp_stream(
        lab, workdir, tag, duration_s=MPTCP_JOIN_TIMEOUT_S + PROBE_LEAD_S + settings.fault_s + PROBE_SLACK_S,
        during=fault_on_the_busiest_path,
    )  # fmt: skip
    if stream.problem is not None:
        raise BenchError(f"{fault.replace('_', ' ')} trial: {stream.problem}")
    start = float(stream.sink["start"])
    arrivals = [start + float(t) for _, t in stream.sink.get("arrivals", [])]
    # The stream is scheduled to outlast the fault; should the connection die first, its stall lasts the fault.
    stream_end = max(float(stream.sink["end"]), trial["end"])
    outage = outage_from_arrivals(arrivals, fault_start=trial["start"], fault_end=trial["end"], stream_end=stream_end,
                                  path=trial["victim"])  # fmt: skip
    return attrs.evolve(outage, details={**stream.details(), "bytes_sent_before_fault": trial["sent"]})


async def start_mptcp(lab: Lab, workdir: Path) -> Running:
    """Set up the path manager (:func:`jvpn_trio.lab.mptcp.configure_lab`) and check, with one short stream,
    that MPTCP negotiates and a second subflow joins here; BenchError (the reason) if not."""
    for ns in (lab.client_ns, lab.gateway_ns):
        if not await labmptcp.enabled_in(lab, ns):
            raise BenchError(f"net.mptcp.enabled is not 1 in the lab namespace {ns}")
    initial, second = mptcp_paths(lab)
    with trio.fail_after(READY_TIMEOUT_S):
        setup = await labmptcp.configure_lab(lab, second)
        scheduler = await labmptcp.scheduler_in(lab, lab.client_ns)

    async def flow() -> None:
        await trio.sleep(MPTCP_CHECK_S)

    check = await _mptcp_stream(lab, workdir, "check", duration_s=MPTCP_JOIN_TIMEOUT_S + MPTCP_CHECK_S + PROBE_SLACK_S,
                                during=flow)  # fmt: skip
    if check.problem is not None:
        raise BenchError(check.problem)

    async def trial(fault: str, settings: BenchSettings, tag: str) -> Outage:
        return await _mptcp_outage(lab, workdir, fault, settings, tag)

    flags = " ".join(labmptcp.ENDPOINT_FLAGS)
    version = f"Linux {platform.release()}, in-kernel path manager" + (f", scheduler {scheduler}" if scheduler else "")
    version += f"; subflows on {initial} (initial) and {second} (endpoint: {flags})"
    return Running(
        key=MPTCP, lab=lab, workdir=workdir, target=lab.gateway_address, version=version, outage_trial=trial,
        throughput=False,
        details={"outage_measure": MPTCP_OUTAGE_MEASURE, "paths": [initial, second],
                 "endpoint_flags": list(labmptcp.ENDPOINT_FLAGS), "setup": setup.to_json(),
                 "stream": {"hz": PROBE_HZ, "record_bytes": labmptcp.RECORD_BYTES}, "check": check.details()},
    )  # fmt: skip


async def _bring_up(
    key: str, stack: contextlib.AsyncExitStack, workdir: Path, *, tun_offload: bool = True,
    jvpn_policy: Mapping[str, Any] | None = None,
) -> Running | SystemResult:
    """Open ``key``'s lab and start the system in it; the lab then closes with ``stack``.

    Returns the running system, or the result saying why it is not there (its lab is torn
    down at once, so nothing of it runs while the others are measured): a peer (OpenVPN,
    wireguard-go) not installed, not set up or not coming up is NOT_AVAILABLE with the reason;
    jvpn-trio not coming up is FAILED.
    """
    version: str | None = None
    keys: WireguardKeys | None = None
    if key == OPENVPN:
        version = await openvpn_version()
        if version is None:
            return SystemResult(key=key, status=NOT_AVAILABLE, reason=f"openvpn is not installed ({OPENVPN_INSTALL_HINT})")
        try:
            await _openvpn_pki(workdir)
        except (BenchError, OSError, trio.TooSlowError) as exc:
            return SystemResult(key=key, status=NOT_AVAILABLE, reason=f"cannot be set up here: {_reason(exc)}",
                                version=version)  # fmt: skip
    elif key == MPTCP:
        unavailable = labmptcp.unavailable_reason()
        if unavailable is not None:
            return SystemResult(key=key, status=NOT_AVAILABLE, reason=unavailable)
    elif key == WIREGUARD:
        missing = missing_tools(WIREGUARD_TOOLS)
        if missing:
            return SystemResult(key=key, status=NOT_AVAILABLE, reason=wireguard_missing_reason(missing))
        try:
            version = await wireguard_version()
            if version is None:
                raise BenchError("wireguard-go --version / wg --version did not answer")
            keys = await wireguard_keys()
        except (BenchError, OSError, trio.TooSlowError) as exc:
            return SystemResult(key=key, status=NOT_AVAILABLE, reason=f"cannot be set up here: {_reason(exc)}",
                                version=version)  # fmt: skip
    async with contextlib.AsyncExitStack() as own:
        spec = lab_spec()
        if key == WIREGUARD:  # runs after the lab's teardown has stopped the daemons
            own.callback(_remove_wireguard_sockets, wireguard_interfaces(spec.prefix))
        lab = await own.enter_async_context(open_lab(spec))
        _progress(f"{LABELS[key]}: lab {lab.spec.prefix}")
        try:
            if key == BASELINE:
                running = await start_baseline(lab, workdir)
            elif key == JVPN:
                running = await start_jvpn(
                    lab, workdir, policy={**(jvpn_policy or {}), **JVPN_POLICY},
                    options=labrun.TunnelOptions(tun_offload=tun_offload),
                )
            elif key == OPENVPN:
                running = await start_openvpn(lab, workdir, version or "OpenVPN")
            elif key == MPTCP:
                running = await start_mptcp(lab, workdir)
            else:
                assert keys is not None  # set above for WIREGUARD (not input validation)
                running = await start_wireguard(lab, workdir, version or "wireguard-go", keys)
        except MEASUREMENT_ERRORS as exc:
            if key in PEERS:
                return SystemResult(key=key, status=NOT_AVAILABLE, reason=f"does not come up here: {_reason(exc)}",
                                    version=version)  # fmt: skip
            return SystemResult(key=key, status=FAILED, reason=f"does not come up: {_reason(exc)}")
        stack.push_async_exit(own.pop_all())
        return running


async def _iperf_version() -> str:
    with trio.fail_after(READY_TIMEOUT_S):
        result = await trio.run_process(["iperf3", "--version"], capture_stdout=True, capture_stderr=True, check=False)
    words = result.stdout.decode(errors="replace").split()
    return " ".join(words[:2]) if words else "unknown"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def _measure(running: list[Running], settings: BenchSettings) -> None:
    """The interleaved rounds: throughput first, then outages; a failure retires only that system."""

    async def attempt(system: Running, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except MEASUREMENT_ERRORS as exc:
            system.failure = _reason(exc)
            _progress(f"  {system.key}: failed: {system.failure}")
            if system.stats is not None:  # a failed tunnel must not load the machine while others run
                for process in system.stats.processes.values():
                    await process.terminate()

    keys = [s.key for s in running]
    by_key = {s.key: s for s in running}
    for r in range(settings.runs):
        _progress(f"throughput round {r + 1}/{settings.runs}")
        for test in THROUGHPUT_TESTS:
            for key in rotated(keys, r):
                system = by_key[key]
                if system.failure is None and system.throughput:
                    step = functools.partial(_throughput_test, system, running, test, settings, f"{test}-{r + 1}")
                    await attempt(system, step)
    tunnels = [s.key for s in running if s.active_path is not None or s.outage_trial is not None]
    for r in range(settings.outage_runs):
        _progress(f"outage round {r + 1}/{settings.outage_runs}")
        for fault in FAULTS:
            for key in rotated(tunnels, r):
                system = by_key[key]
                if system.failure is None:
                    await attempt(system, functools.partial(_outage_run, system, fault, settings, r))
    for system in running:
        if system.stats is not None and system.failure is None:
            await attempt(system, functools.partial(_finish, system))


async def _finish(system: Running) -> None:
    assert system.stats is not None
    system.peak_rss = await system.stats.peak_rss_kib()
    if system.final_details is not None:
        system.details.update(await system.final_details())


async def _idle_snapshot(system: Running, *, status_first: bool) -> IdleSnapshot:
    """One reading of CPU ticks, the client's path byte counters and its status (status at the window's
    outer edges: the control query costs the client a little CPU, kept out of the window)."""
    assert system.stats is not None and system.status is not None  # jvpn-trio systems only

    async def read_status() -> Mapping[str, Any]:
        assert system.status is not None
        return await system.status()

    status = await read_status() if status_first else {}
    stat = {}
    for role, proc in system.stats.processes.items():
        text = await _read_text(Path(f"/proc/{proc.pid}/stat"))
        if not text or proc.returncode is not None:
            raise BenchError(f"the {role} process ({proc.pid}) is not running")
        stat[role] = text
    at = time.monotonic()
    with trio.fail_after(READY_TIMEOUT_S):
        result = await system.lab.run(system.lab.client_ns, "ip", "-j", "-s", "link", "show")
    links = parse_link_bytes(result.stdout.decode(errors="replace"))
    if not status_first:
        status = await read_status()
    return IdleSnapshot(
        at=at, stat=stat, links=links, roles=probe_roles(status), active=jvpn_active_path(system.lab, status)
    )


async def _idle_bring_up(key: str, stack: contextlib.AsyncExitStack, workdir: Path) -> Running | IdleResult:
    """A fresh lab with jvpn-trio under ``key``'s probing policy, idling as measured; or why not.

    The lab closes with ``stack``, or at once if the system does not get there.
    """
    overrides = IDLE_POLICIES[key]
    async with contextlib.AsyncExitStack() as own:
        lab = await own.enter_async_context(open_lab(lab_spec()))
        _progress(f"idle, {IDLE_LABELS[key]}: lab {lab.spec.prefix}")
        try:
            running = await start_jvpn(
                lab, workdir, key=key, policy={**JVPN_POLICY, **overrides},
                options=labrun.TunnelOptions(metered=IDLE_METERED_PATHS),
            )  # fmt: skip
            status = running.status
            assert status is not None
            client = running.stats.processes["client"] if running.stats is not None else None

            async def ready() -> bool:
                return idle_ready(lab.paths, await status())

            await _wait_for(
                ready, timeout_s=IDLE_SETTLE_TIMEOUT_S, process=client, log=workdir / "client.err",
                what="ATTACHED on the preferred path with every standby HEALTHY at its standby role",
            )  # fmt: skip
        except MEASUREMENT_ERRORS as exc:
            return IdleResult(key=key, status=FAILED, overrides=overrides, reason=f"does not come up: {_reason(exc)}")
        stack.push_async_exit(own.pop_all())
        return running


async def run_idle(settings: BenchSettings, workdir: Path) -> IdleSection:
    """The idle section: both probing policies side by side, idle over the same window, then blackholes.

    Each policy gets its own lab (client paths eth0 / wifi0 / lte0, lte0 marked metered); once
    each idles as measured (:func:`idle_ready`) and :data:`IDLE_LEAD_S` has passed, both are read,
    left alone for ``settings.idle_s`` and read again; then ``settings.runs`` blackholes of the
    active path each, interleaved as in the rest of the bench.  Side by side and over one window,
    so a neighbour's burst of work lands on both.
    """
    names = [p.name for p in lab_spec().paths]
    results: dict[str, IdleResult] = {}
    async with contextlib.AsyncExitStack() as stack:
        running: list[Running] = []
        for key in IDLE_POLICIES:
            sub = workdir / f"idle-{key}"
            await trio.Path(sub).mkdir(parents=True, exist_ok=True)
            outcome = await _idle_bring_up(key, stack, sub)
            if isinstance(outcome, Running):
                running.append(outcome)
            else:
                results[key] = outcome
                _progress(f"idle, {IDLE_LABELS[key]}: {outcome.reason}")
        await trio.sleep(IDLE_LEAD_S)
        before: dict[str, IdleSnapshot] = {}
        for system in running:
            try:
                before[system.key] = await _idle_snapshot(system, status_first=True)
            except MEASUREMENT_ERRORS as exc:
                system.failure = _reason(exc)
        _progress(f"idle: {len(before)} tunnel(s) left alone for {settings.idle_s:g} s")
        await trio.sleep(settings.idle_s)
        figures: dict[str, tuple[IdleFigures, IdleSnapshot]] = {}
        for system in running:
            if system.key not in before:
                continue
            try:
                after = await _idle_snapshot(system, status_first=False)
                assert system.stats is not None
                figures[system.key] = (
                    idle_figures(before[system.key], after, names=names, ticks_per_s=system.stats.ticks_per_s),
                    after,
                )
            except MEASUREMENT_ERRORS as exc:
                system.failure = _reason(exc)
        for r in range(settings.runs):
            for key in rotated([s.key for s in running if s.failure is None], r):
                system = next(s for s in running if s.key == key)
                try:
                    await _outage_run(system, BLACKHOLE, settings, r)
                    await _idle_outage_run(system, settings, r)
                except MEASUREMENT_ERRORS as exc:
                    system.failure = _reason(exc)
                    _progress(f"  {system.key}: failed: {system.failure}")
        for system in running:
            start = before.get(system.key)
            measured = figures.get(system.key)
            results[system.key] = IdleResult(
                key=system.key, status=MEASURED if system.failure is None else FAILED,
                overrides=IDLE_POLICIES[system.key], reason=system.failure,
                figures=measured[0] if measured else None,
                roles=start.roles if start else {}, active=start.active if start else None,
                roles_end=measured[1].roles if measured else {}, active_end=measured[1].active if measured else None,
                failovers=tuple(system.outages.get(BLACKHOLE, ())),
                idle_failovers=tuple(system.outages.get(IDLE_BLACKHOLE, ())),
            )  # fmt: skip
            if measured:
                f = measured[0]
                rates = ", ".join(f"{n} {f.rates[n].total_bps:,.0f} B/s" for n in names)
                _progress(f"  idle, {IDLE_LABELS[system.key]}: client {f.cpu_pct['client']:.2f} %, "
                          f"gateway {f.cpu_pct['gateway']:.2f} % of a core; {rates}")  # fmt: skip
        _progress("idle: tearing the labs down")
    return IdleSection(seconds=settings.idle_s, results=tuple(results[k] for k in IDLE_POLICIES if k in results))


async def run_bench(settings: BenchSettings) -> BenchReport:
    """Bring every system in ``settings.systems`` up in its own lab, measure them interleaved, tear down;
    then, with ``settings.idle_s``, the idle section (:func:`run_idle`) in labs of its own.

    A system that cannot start or fails is reported with its reason; the others still run.
    LabError from a lab that cannot be built at all (for instance not root) propagates.
    """
    started_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    host: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "iperf3": await _iperf_version(),
        "loadavg_start": _loadavg(),
    }
    temporary = settings.workdir is None
    if settings.workdir is None:
        workdir = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="jvpn-bench-")))
    else:
        workdir = settings.workdir
    results: dict[str, SystemResult] = {}
    idle: IdleSection | None = None
    try:
        with trio.fail_after(TOTAL_TIMEOUT_S + settings.idle_s):
            async with contextlib.AsyncExitStack() as stack:
                running: list[Running] = []
                for key in MEASURABLE:
                    if key in settings.systems:
                        sub = workdir / key
                        await trio.Path(sub).mkdir(parents=True, exist_ok=True)
                        outcome = await _bring_up(
                            key, stack, sub, tun_offload=settings.tun_offload, jvpn_policy=settings.jvpn_policy
                        )
                        if isinstance(outcome, Running):
                            running.append(outcome)
                        else:
                            results[key] = outcome
                            _progress(f"{LABELS[key]}: {outcome.status}: {outcome.reason}")
                if running:
                    await _measure(running, settings)
                results.update({s.key: s.result() for s in running})
                if running or results:
                    _progress("tearing the labs down")
            if settings.idle_s > 0:
                idle = await run_idle(settings, workdir)
    finally:
        if temporary:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))
    host["loadavg_end"] = _loadavg()
    ordered = tuple(results[k] for k in MEASURABLE if k in results)
    wireguard = results.get(WIREGUARD)
    if settings.systems and (wireguard is None or wireguard.status != MEASURED):
        ordered += (wireguard_reference(),)
    return BenchReport(settings, ordered, host, started_utc, time.monotonic() - t0, idle)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_RUNS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_RUNS}, got {value}")
    return value


def _seconds(limit: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not 1.0 <= value <= limit:
            raise argparse.ArgumentTypeError(f"expected 1..{limit:g} seconds, got {text}")
        return value

    return parse


def _idle_seconds(text: str) -> float:
    """0 (no idle section) or 1..MAX_IDLE_S seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value != 0 and not 1.0 <= value <= MAX_IDLE_S:
        raise argparse.ArgumentTypeError(f"expected 0 (skip) or 1..{MAX_IDLE_S:g} seconds, got {text}")
    return value


def parse_systems(text: str) -> tuple[str, ...]:
    """``"baseline,jvpn-trio"`` -> the systems in column order; ArgumentTypeError names the known ones."""
    names = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [n for n in names if n not in MEASURABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"systems must be a comma list of {', '.join(MEASURABLE)}; got {text!r}")
    return tuple(k for k in MEASURABLE if k in names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jvpn-trio bench`` (shared by the CLI and ``python -m jvpn_trio.lab.bench``)."""
    parser.add_argument(
        "--quick", action="store_true",
        help=f"short version: {QUICK_RUNS} round, {QUICK_IPERF_S:g} s iperf3 tests, {QUICK_FAULT_S:g} s faults",
    )  # fmt: skip
    parser.add_argument("--runs", type=_positive_int, metavar="N",
                        help=f"interleaved rounds of every measurement; medians are reported (default {DEFAULT_RUNS})")  # fmt: skip
    parser.add_argument("--fault-runs", type=_positive_int, metavar="N",
                        help=f"trials of each fault per tunnel (default {DEFAULT_FAULT_RUNS}, or --runs if more; "
                             "with --quick: --runs)")  # fmt: skip
    parser.add_argument("--iperf-seconds", type=_seconds(MAX_IPERF_S), metavar="S",
                        help=f"length of each iperf3 test (default {DEFAULT_IPERF_S:g})")  # fmt: skip
    parser.add_argument("--fault-seconds", type=_seconds(MAX_FAULT_S), metavar="S",
                        help=f"how long each fault is held (default {DEFAULT_FAULT_S:g}); an outage that "
                             "lasts the whole fault is reported as a lower bound")  # fmt: skip
    parser.add_argument("--systems", type=parse_systems, default=MEASURABLE, metavar="LIST",
                        help=f"comma list of {', '.join(MEASURABLE)} (default: all; a peer that is not "
                             "installed is reported as not available)")  # fmt: skip
    parser.add_argument("--idle", type=_idle_seconds, metavar="S",
                        help=f"the idle section's window per probing policy (default {DEFAULT_IDLE_S:g}, "
                             f"{QUICK_IDLE_S:g} with --quick; 0 skips the section)")  # fmt: skip
    parser.add_argument("--tun-offload", choices=("on", "off"), default="on",
                        help="jvpn-trio's TUNs with checksum and TSO offloads (default), or without")
    parser.add_argument("--jvpn-policy", metavar="FILE",
                        help="run jvpn-trio under this policy file (e.g. examples/policies/fast-failover.toml) "
                             f"instead of the laptop default; the bench's own dwell and switch budget "
                             f"({', '.join(JVPN_POLICY)}) still apply")  # fmt: skip
    parser.add_argument("--idle-only", action="store_true",
                        help="only the idle section (idle cost and failover by probing policy), no systems")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the JSON document to FILE, or to stdout (the table then goes to stderr)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep configs, logs and raw iperf3 output here (default: a temporary directory)")  # fmt: skip
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="also write PNG plots (throughput, outages, outage timelines) to DIR; needs matplotlib "
                             "(pip install 'jvpn-trio[plots]')")  # fmt: skip
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="measure nothing: render --plots DIR from a saved --json report (no root needed)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Explicit options win over ``--quick``, which wins over the defaults."""
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    fault_runs = args.fault_runs or (runs if args.quick else max(DEFAULT_FAULT_RUNS, runs))
    iperf_s = args.iperf_seconds or (QUICK_IPERF_S if args.quick else DEFAULT_IPERF_S)
    fault_s = args.fault_seconds or (QUICK_FAULT_S if args.quick else DEFAULT_FAULT_S)
    idle_s = args.idle if args.idle is not None else (QUICK_IDLE_S if args.quick else DEFAULT_IDLE_S)
    if args.idle_only and idle_s == 0:
        raise BenchError("--idle-only needs an idle window (--idle S with S > 0)")
    systems = () if args.idle_only else tuple(args.systems)
    jvpn_policy: dict[str, Any] = {}
    if args.jvpn_policy:
        try:
            chosen = load_policy(args.jvpn_policy).to_mapping()
        except ConfigError as exc:
            raise BenchError(str(exc)) from None
        default = DEFAULT_POLICY.to_mapping()
        jvpn_policy = {k: v for k, v in chosen.items() if v != default[k]}
    return BenchSettings(runs=runs, iperf_s=iperf_s, fault_s=fault_s, systems=systems, workdir=args.workdir,
                         idle_s=idle_s, fault_runs=fault_runs, tun_offload=args.tun_offload == "on",
                         jvpn_policy=jvpn_policy, jvpn_policy_source=args.jvpn_policy or "")  # fmt: skip


def _preflight() -> str | None:
    """Why the bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "bench needs root (network namespaces, TUN devices)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("iperf3", "iperf3")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install -y {package})"
    return None


EXIT_INTERRUPTED = 130


def only_interrupts(exc: BaseException) -> bool:
    """True if ``exc`` is a KeyboardInterrupt, or a (nested) group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_interrupts(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def replot(report_path: Path, directory: Path) -> int:
    """``--replot``: render the plots of a saved JSON report, measuring nothing; 2 with one line on bad input."""
    from jvpn_trio.lab import plots

    try:
        doc = json.loads(report_path.read_text())
        drawn = plots.render_all(doc, directory)
    except (OSError, UnicodeDecodeError, ValueError, plots.PlotsUnavailable) as exc:  # NotAReport, bad JSON
        where = "" if isinstance(exc, OSError) else f"{report_path}: "  # an OSError names its own file
        print(f"jvpn-trio bench: {where}{_one_line(exc)}", file=sys.stderr)
        return 2
    _announce_plots([figure.path for figure in drawn], plots.TIMELINES_FILE)
    return 0


def _announce_plots(paths: Sequence[Path], timelines_file: str) -> None:
    """A progress line per PNG written, and one when the report had no outage timeline to draw."""
    for path in paths:
        _progress(f"wrote {path}")
    if all(path.name != timelines_file for path in paths):
        _progress(f"{timelines_file} not drawn: no fault trial in this report kept its probe arrivals")


def _one_line(exc: BaseException) -> str:
    """An error as one line; an OSError as ``file: reason``."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def main(args: argparse.Namespace) -> int:
    """Run the bench from parsed options; print the table (and the JSON); return the exit code."""
    if args.replot is not None:
        if args.plots is None:
            print("jvpn-trio bench: --replot needs --plots DIR (where to write the PNGs)", file=sys.stderr)
            return 2
        return replot(args.replot, args.plots)
    if args.plots is not None:
        from jvpn_trio.lab import plots

        try:  # before the run, not after minutes of it
            plots.require_matplotlib()
            args.plots.mkdir(parents=True, exist_ok=True)
        except (OSError, plots.PlotsUnavailable) as exc:
            print(f"jvpn-trio bench: --plots: {_one_line(exc)}", file=sys.stderr)
            return 2
    problem = _preflight()
    if problem is not None:
        print(f"jvpn-trio bench: {problem}", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except BenchError as exc:
        print(f"jvpn-trio bench: {exc}", file=sys.stderr)
        return 2
    try:
        report = trio.run(run_bench, settings)
    except LabError as exc:
        print(f"jvpn-trio bench: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        # Ctrl-C: the labs have been torn down by then; Trio's nurseries may wrap the interrupt.
        if not only_interrupts(exc):
            raise
        print("jvpn-trio bench: interrupted (labs removed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    document = json.dumps(report.to_json(), indent=2) + "\n"
    to_stdout = args.json == "-"
    print(render_table(report), file=sys.stderr if to_stdout else sys.stdout, end="")
    if to_stdout:
        sys.stdout.write(document)
    elif args.json is not None:
        Path(args.json).write_text(document)
    if args.plots is not None and replot_report(report, args.plots) != 0:
        return 1
    return 1 if report.failed else 0


def replot_report(report: BenchReport, directory: Path) -> int:
    """The plots of a finished run, from its JSON document (as ``--replot`` would draw them); 1 if they failed."""
    from jvpn_trio.lab import plots

    try:
        drawn = plots.render_all(json.loads(json.dumps(report.to_json())), directory)
    except (OSError, ValueError, plots.PlotsUnavailable) as exc:
        print(f"jvpn-trio bench: plots not written: {_one_line(exc)}", file=sys.stderr)
        return 1
    _announce_plots([figure.path for figure in drawn], plots.TIMELINES_FILE)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvpn-trio bench",
        description="Benchmark jvpn-trio against a bare veth, OpenVPN, wireguard-go and kernel MPTCP in fresh "
        "namespace labs (root).",
    )
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
