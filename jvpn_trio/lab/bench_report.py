"""The vocabulary of a ``jvpn-trio bench`` report: its systems, faults, statuses, figures and ratios.

Theory of operation
-------------------
Two modules read a bench report: :mod:`jvpn_trio.lab.bench`, which measures and writes it (the
Markdown table, the JSON document), and :mod:`jvpn_trio.lab.plots`, which draws a JSON document
saved by it, perhaps months later.  Both must agree on what the report's keys mean: which
systems there are and what they are called, which faults, which statuses, what one UDP packet
and one probe stream are, and how a same-run ratio is computed and written.  That agreement
lives here, once, and imports nothing of the lab, so the arrows run one way:
``bench -> plots -> bench_report`` and ``bench -> bench_report``.

Everything here is pure: constants, two frozen values and the functions that combine and
format them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

#: The JSON document's ``benchmark`` field: what tells a bench report from any other JSON.
REPORT_KIND = "jvpn-trio bench"

# -- systems ------------------------------------------------------------------------------------------

BASELINE = "baseline"
JVPN = "jvpn-trio"
OPENVPN = "openvpn"
WIREGUARD = "wireguard-go"
#: Kernel MPTCP: not a tunnel but the transport a user could pick for surviving a dead path (issue 16).
MPTCP = "mptcp"
#: The peers.md wireguard-go figure, shown (as its own column) only when wireguard-go was not measured.
WIREGUARD_REFERENCE = "wireguard-go (peers.md)"
#: Systems the bench can measure, in their column order (the default set: all of them).
MEASURABLE = (BASELINE, JVPN, OPENVPN, WIREGUARD, MPTCP)

#: What ``../shared/peers.md`` (2026-11-22, same topology, a 2-core CI-class machine) reports.
#: Shown as a reference column only: it was not measured in this run.
PEERS_MD_DATE = "2026-11-22"
PEERS_MD_WIREGUARD: Mapping[str, Any] = {
    "label": "wireguard-go 0.0.20220316, keepalive 1 s",
    "tcp_mbit": 413.0,
    "tcp_cores": 1.37,
    "udp64_pps": 46_500.0,
    "link_down_s": 15.2,
    "link_down_recovered": True,
    "blackhole_s": 60.0,
    "blackhole_recovered": False,
}
PEERS_MD_BASELINE: Mapping[str, float] = {"tcp_mbit": 19_965.0, "udp64_pps": 260_000.0}

LABELS = {
    BASELINE: "bare veth",
    JVPN: "jvpn-trio",
    OPENVPN: "OpenVPN",
    WIREGUARD: "wireguard-go",
    MPTCP: "kernel MPTCP",
    WIREGUARD_REFERENCE: f"wireguard-go (peers.md {PEERS_MD_DATE}, NOT this run)",
}

# -- what a system's entry says about it --------------------------------------------------------------

MEASURED = "measured"
FAILED = "failed"
NOT_AVAILABLE = "not available"
REFERENCE = "not measured in this run; peers.md figure"

# -- faults and the units of the figures ---------------------------------------------------------------

LINK_DOWN = "link_down"
BLACKHOLE = "blackhole"
FAULTS = (LINK_DOWN, BLACKHOLE)
#: The idle section's second failover: the blackhole lands while the tunnel idles, before traffic.
IDLE_BLACKHOLE = "blackhole_while_idle"

#: The UDP throughput test's payload: the report's "UDP 64 B" figure is packets of this size.
UDP_PAYLOAD_BYTES = 64
#: Probes per second of the outage stream: at 1 kHz a gap is resolved to about 1 ms, so outages
#: below 10 ms can be told apart (before 2026-12-02 the bench used 100 Hz).
PROBE_HZ = 1000.0

#: What kernel MPTCP's outage figure is (it has no tunnel to send probes through): said beside it in the
#: table and the JSON (the plots use MPTCP_OUTAGE_SHORT).
MPTCP_OUTAGE_MEASURE = (
    f"longest receive stall of one MPTCP connection carrying a {PROBE_HZ:g} Hz stream of small "
    "timestamped writes, with subflows on eth0 and wifi0; "
    "the fault hits the path that carried the most of it; no throughput figures (not a tunnel)"
)
#: The same, short enough for a plot's footer.
MPTCP_OUTAGE_SHORT = f"longest receive stall of a {PROBE_HZ:g} Hz stream of writes (no tunnel)"

#: Same-run ratio columns: (other system, JSON name, table title); each present when both were run.
RATIO_COLUMNS = (
    (BASELINE, "jvpn_over_baseline", "jvpn / bare"),
    (OPENVPN, "jvpn_over_openvpn", "jvpn / OpenVPN"),
    (WIREGUARD, "jvpn_over_wireguard_go", "jvpn / wireguard-go"),
    (MPTCP, "jvpn_over_mptcp", "jvpn / MPTCP"),
)

# -- figures and ratios --------------------------------------------------------------------------------

#: The figures in Mbit/s: one TCP stream up (client to gateway) and down (``iperf3 -R``).
MBIT_METRICS = ("tcp_mbit", "tcp_down_mbit")


@attrs.frozen
class Figure:
    """A number, possibly only a lower bound (an outage that did not end within its window)."""

    value: float
    lower_bound: bool = False


@attrs.frozen
class Ratio:
    """``a / b`` of two figures; ``bound`` is ``=``, ``<=`` or ``>=``."""

    value: float
    bound: str = "="

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "bound": self.bound}


def ratio(numerator: Figure | None, denominator: Figure | None) -> Ratio | None:
    """``numerator / denominator``, carrying bounds through; None when it means nothing.

    If the denominator is only a lower bound the ratio is an upper bound, and the other way
    round; two lower bounds (or a zero or missing denominator) give None.
    """
    if numerator is None or denominator is None or denominator.value <= 0:
        return None
    if numerator.lower_bound and denominator.lower_bound:
        return None
    bound = ">=" if numerator.lower_bound else "<=" if denominator.lower_bound else "="
    return Ratio(numerator.value / denominator.value, bound)


def format_figure(metric: str, figure: Figure | None) -> str:
    """A table cell: ``—`` for nothing, ``> x (no recovery)`` for a lower bound."""
    if figure is None:
        return "—"
    v = figure.value
    if metric in MBIT_METRICS:
        text = f"{v:,.0f}"
    elif metric == "udp64_pps":
        text = f"{v / 1000:,.1f} k"
    elif metric in FAULTS:
        text = f"{v:.3f}"
    elif metric == "peak_rss":
        text = f"{v:,.1f}"
    else:
        text = f"{v:.2f}"
    return f"> {text} (no recovery)" if figure.lower_bound else text


def format_ratio(r: Ratio | None) -> str:
    """A ratio as the table and the plots write it: ``0.62×``, ``≤ 0.15×``; ``—`` for none."""
    if r is None:
        return "—"
    prefix = {"=": "", "<=": "≤ ", ">=": "≥ "}[r.bound]
    digits = 3 if r.value < 0.1 else 2
    return f"{prefix}{r.value:.{digits}f}×"
