"""PNG plots of a ``jvpn-trio bench`` report: throughput per system, every fault trial's outage, and how each one looked.

    jvpn-trio bench --plots DIR                     # after a run
    jvpn-trio bench --replot report.json --plots DIR  # from a saved JSON report; runs nothing, needs no root

Theory of operation
-------------------
Rendering works from the report's JSON document (:meth:`jvpn_trio.lab.bench.BenchReport.to_json`),
never from live objects, so a report saved months ago renders the same way as one just measured.
It happens in two steps:

1. :func:`plot_data` (pure, no matplotlib) checks the document and turns it into what will be
   drawn: one bar per system and test with every round's value, one point per fault trial.
   A document that is not a bench report raises :class:`NotAReport` with one line naming the
   first field that is wrong.  Trials that did not recover (the outage lasted the whole fault,
   so its figure is a lower bound) are kept as points of their own kind, never dropped.
2. :func:`render_throughput`, :func:`render_outages` and :func:`render_timelines` draw those with
   matplotlib's Agg canvas (no display, no pyplot and so no global figure registry) and return
   what they drew, so a test can check the points and labels without reading pixels.

The timelines figure shows, per fault trial, the probe arrivals the report kept around the gap
(``runs[i].timeline``: times since the fault, a bounded number on each side of it), so one can
see whether the stream stopped at once and came back at full rate or trickled.  Reports written
before the bench kept timelines have none: that figure is then not drawn, the other two are.
Likewise reports written before the bench measured the TCP download (``tcp_down_mbit``) load and
plot, with that throughput panel saying "not measured".

matplotlib is an optional dependency (``pip install 'jvpn-trio[plots]'``): it is imported inside
the rendering functions only, and its absence raises :class:`PlotsUnavailable` with that hint.
A gateway or a client never imports this module (tests/test_import_weight.py).  The report's
vocabulary (systems, faults, statuses, ratios) comes from :mod:`jvpn_trio.lab.bench_report`, never
from :mod:`jvpn_trio.lab.bench`: the bench imports this module to draw, so the arrow runs one way.
Kernel MPTCP's outage points are its stream's longest receive stalls, not probe gaps; a note under
every figure says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from jvpn_trio.lab.bench_report import (
    BLACKHOLE,
    FAULTS,
    JVPN,
    LABELS,
    LINK_DOWN,
    MBIT_METRICS,
    MEASURED,
    MPTCP,
    MPTCP_OUTAGE_SHORT,
    PROBE_HZ,
    RATIO_COLUMNS,
    REFERENCE,
    REPORT_KIND,
    UDP_PAYLOAD_BYTES,
    Ratio,
    format_ratio,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: What to install when matplotlib is missing.
INSTALL_HINT = "pip install 'jvpn-trio[plots]'"

THROUGHPUT_FILE = "throughput.png"
OUTAGES_FILE = "outages.png"
TIMELINES_FILE = "outage-timelines.png"

DPI = 120
#: Inches: the throughput figure (three panels side by side) and each outage panel.
THROUGHPUT_SIZE_IN = (15.0, 5.5)
OUTAGE_PANEL_SIZE_IN = (4.2, 5.5)
#: Inches of the timelines figure: its width; above the panels (titles), below them (axis label,
#: footer, legend), between two panels (a title and tick labels); each trial's row, and the fewest
#: rows a panel is tall (a one-trial panel stays readable).
TIMELINE_WIDTH_IN = 11.0
TIMELINE_TOP_IN = 1.1
TIMELINE_BOTTOM_IN = 1.5
TIMELINE_PANEL_GAP_IN = 0.6
TIMELINE_ROW_IN = 0.32
TIMELINE_MIN_ROWS = 2
#: Fractions of the figure's width left of the panels (trial labels) and right of them (outage labels).
TIMELINE_LEFT = 0.2
TIMELINE_RIGHT = 0.86
#: A timeline panel's time axis turns symmetric-log when its longest gap exceeds its shortest by more
#: than LOG_SCALE_SPAN; it stays linear within this many probe intervals of the fault, which covers
#: the TIMELINE_CONTEXT_PROBES the bench keeps before it, so the stream before the fault reads evenly.
TIMELINE_LINEAR_PROBES = 100.0
#: Height of a trial's gap bar, as a fraction of its row, and its opacity (the ticks show through).
GAP_BAR_HEIGHT = 0.6
GAP_ALPHA = 0.35
#: Probe ticks: height (points) and line width (points), thin enough that 1 ms apart stay apart.
TICK_SIZE = 7.0
TICK_WIDTH = 0.6
#: Room beside a timeline panel's data, as a fraction of its span, and how many such pads on the
#: right (where each row's outage is written).
TIMELINE_PAD = 0.03
TIMELINE_LABEL_ROOM = 6.0
#: A panel switches to a log scale when its largest value exceeds its smallest by more than this.
LOG_SCALE_SPAN = 20.0
#: Trial points of one system are spread over this fraction of its slot, in trial order (no randomness).
TRIAL_SPREAD = 0.5
#: Width of a median marker and of a bar, as a fraction of a system's slot.
MEDIAN_WIDTH = 0.6
BAR_WIDTH = 0.6
#: Room above a linear outage panel's highest point, as a fraction of it (for the median's label).
Y_HEADROOM = 0.1
NO_RECOVERY = "no recovery"
#: Colours: trials that recovered, trials that did not (lower bounds), medians, the reference bar.
RECOVERED_COLOR = "tab:blue"
NO_RECOVERY_COLOR = "tab:red"
MEDIAN_COLOR = "black"
BAR_COLOR = "tab:blue"
JVPN_BAR_COLOR = "tab:orange"
REFERENCE_COLOR = "lightgray"

#: The throughput panels: (metric in the ratios, title, unit).
THROUGHPUT_PANELS = (
    ("tcp_mbit", "TCP, one stream", "Mbit/s"),
    ("tcp_down_mbit", "TCP download, one stream", "Mbit/s"),
    ("udp64_pps", f"UDP {UDP_PAYLOAD_BYTES} B received", "packets/s"),
)
#: The TCP panels' JSON fields in a system's entry: metric -> (median, every round), named after the
#: metric as ``SystemResult.to_json`` writes them.  Reports written before the bench measured the
#: download have no ``tcp_down_mbit``: that panel is then empty.
MBIT_FIELDS = {metric: (metric, f"{metric}_runs") for metric in MBIT_METRICS}
FAULT_TITLES = {LINK_DOWN: "link down", BLACKHOLE: "blackhole"}
#: The idle section's failovers (jvpn-trio, one group per probing policy): JSON field -> panel title.
IDLE_FAILOVERS = (
    ("failover_blackhole", "blackhole, by probing policy"),
    ("failover_blackhole_while_idle", "blackhole while idle, by probing policy"),
)


class NotAReport(ValueError):
    """The JSON is not a ``jvpn-trio bench`` report (or one this version cannot read); one line."""


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


# -----------------------------------------------------------------------------
# Pure part: the report's JSON -> what will be drawn
# -----------------------------------------------------------------------------


@attrs.frozen
class Bar:
    """One system's median for one test, with every round's value; ``reference`` if not measured in this run."""

    system: str
    value: float
    runs: tuple[float, ...]
    reference: bool = False


@attrs.frozen
class ThroughputPanel:
    metric: str
    title: str
    unit: str
    bars: tuple[Bar, ...]
    #: Same-run ratios as text, ``"jvpn / OpenVPN 0.62×"``.
    ratios: tuple[str, ...]


@attrs.frozen
class Timeline:
    """The probe arrivals a report kept around one trial's gap, in seconds since the fault."""

    gap_start: float
    gap_end: float
    arrivals: tuple[float, ...]
    #: The fault's window (``[0, window]``): a gap that reaches its end did not close by itself.
    window: float


@attrs.frozen
class Trial:
    """One fault trial's outage; ``recovered`` False: ``seconds`` is a lower bound (the fault's whole window)."""

    system: str
    index: int
    seconds: float
    recovered: bool
    #: None in reports written before the bench kept timelines.
    timeline: Timeline | None = None

    @property
    def text(self) -> str:
        shown = f"{self.seconds:.3f} s" if self.recovered else f"> {self.seconds:.3f} s ({NO_RECOVERY})"
        return f"{self.system}, trial {self.index + 1}: {shown}"


@attrs.frozen
class OutagePanel:
    fault: str
    title: str
    #: Group labels in column order (systems, or the idle section's probing policies).
    systems: tuple[str, ...]
    trials: tuple[Trial, ...]
    #: system -> (median seconds, median recovered), as the report computed it.
    medians: Mapping[str, tuple[float, bool]]


@attrs.frozen
class PlotData:
    """Everything the figures show, read and checked from one report."""

    title: str
    #: The run's date and machine, for every figure's subtitle.
    subtitle: str
    throughput: tuple[ThroughputPanel, ...]
    outages: tuple[OutagePanel, ...]
    #: Systems shown nowhere and why (``OpenVPN: not available: ...``).
    notes: tuple[str, ...]
    probe_hz: float


def _field(node: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(node, Mapping) or key not in node:
        raise NotAReport(f"not a jvpn-trio bench report: no {where}{key}")
    value = node[key]
    if not isinstance(value, kind):
        raise NotAReport(f"not a jvpn-trio bench report: {where}{key} is {type(value).__name__}")
    return value


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NotAReport(f"not a jvpn-trio bench report: {where} is not a finite number")
    return float(value)


def _number(node: Any, key: str, where: str) -> float:
    return _finite(_field(node, key, (int, float), where), f"{where}{key}")


def _list(node: Mapping[str, Any], key: str, where: str) -> list[Any]:
    """``node[key]`` if it is a list, [] if absent; NotAReport otherwise."""
    return list(_field(node, key, list, where)) if key in node else []


def _optional_number(node: Mapping[str, Any], key: str, where: str) -> float | None:
    return None if node.get(key) is None else _number(node, key, where)


def _trials(system: str, runs: Any, where: str) -> tuple[Trial, ...]:
    if not isinstance(runs, list):
        raise NotAReport(f"not a jvpn-trio bench report: {where}runs is not a list")
    return tuple(
        Trial(system, i, _number(run, "seconds", f"{where}runs[{i}]."),
              bool(_field(run, "recovered", bool, f"{where}runs[{i}].")),
              _timeline(run, f"{where}runs[{i}]."))
        for i, run in enumerate(runs)
    )  # fmt: skip


def _timeline(run: Mapping[str, Any], where: str) -> Timeline | None:
    """A run's ``timeline``, None if the report has none (written before the bench kept them)."""
    if run.get("timeline") is None:
        return None
    node = _field(run, "timeline", Mapping, where)
    inner = f"{where}timeline."
    arrivals = tuple(_finite(t, f"{inner}arrivals_s[{k}]") for k, t in enumerate(_list(node, "arrivals_s", inner)))
    return Timeline(
        gap_start=_number(node, "gap_start_s", inner),
        gap_end=_number(node, "gap_end_s", inner),
        arrivals=arrivals,
        window=_number(run, "window_s", where),
    )


def _median(node: Mapping[str, Any], where: str) -> tuple[float, bool] | None:
    seconds = _optional_number(node, "median_s", where)
    if seconds is None:
        return None
    return seconds, bool(_field(node, "median_recovered", bool, where))


def _subtitle(doc: Mapping[str, Any]) -> str:
    host: Mapping[str, Any] = doc["host"] if isinstance(doc.get("host"), Mapping) else {}
    parts = [f"{doc.get('started_utc', '?')} UTC", f"jvpn-trio {doc.get('jvpn_trio_version', '?')}"]
    parts += [f"{host['cpus']} CPUs"] if host.get("cpus") is not None else []
    parts += [f"kernel {host['kernel']}"] if host.get("kernel") else []
    if host.get("loadavg_start") or host.get("loadavg_end"):
        parts.append(f"load average {host.get('loadavg_start')} -> {host.get('loadavg_end')}")
    return ", ".join(parts)


def _ratio_texts(doc: Mapping[str, Any], metric: str) -> tuple[str, ...]:
    ratios = doc.get("ratios")
    if not isinstance(ratios, Mapping):
        return ()
    out = []
    for _, name, title in RATIO_COLUMNS:
        entry = ratios.get(name, {}).get(metric) if isinstance(ratios.get(name), Mapping) else None
        if isinstance(entry, Mapping) and entry.get("value") is not None:
            r = Ratio(_number(entry, "value", f"ratios.{name}.{metric}."), str(entry.get("bound", "=")))
            out.append(f"{title} {format_ratio(r)}")
    return tuple(out)


def plot_data(doc: Any) -> PlotData:
    """Read a bench report's JSON document into what the figures show; NotAReport (one line) if it is not one."""
    if not isinstance(doc, Mapping) or doc.get("benchmark") != REPORT_KIND:
        raise NotAReport(f'not a jvpn-trio bench report (no "benchmark": "{REPORT_KIND}")')
    systems = _field(doc, "systems", Mapping, "")
    settings: Mapping[str, Any] = doc["settings"] if isinstance(doc.get("settings"), Mapping) else {}
    probe_hz = _optional_number(settings, "probe_hz", "settings.") or PROBE_HZ
    bars: dict[str, list[Bar]] = {metric: [] for metric, _, _ in THROUGHPUT_PANELS}
    faults: dict[str, list[Trial]] = {}
    medians: dict[str, dict[str, tuple[float, bool]]] = {}
    fault_systems: dict[str, list[str]] = {}
    notes: list[str] = []
    for key, entry in systems.items():
        where = f"systems.{key}."
        label = str(_field(entry, "label", str, where))
        status = str(_field(entry, "status", str, where))
        if status == REFERENCE:
            ref = _field(entry, "reference", Mapping, where)
            for metric, _, _ in THROUGHPUT_PANELS:
                value = _optional_number(ref, metric, f"{where}reference.")
                if value is not None:
                    bars[metric].append(Bar(label, value, (), reference=True))
            notes.append(f"{label}: {REFERENCE} (throughput bars hatched; no ratio, no outage points)")
            continue
        if status != MEASURED:
            notes.append(f"{label}: {status}: {entry.get('reason')}")
        elif key == MPTCP:  # no tunnel: its outage points are not a UDP probe stream's gaps
            notes.append(f"{label}'s outage: {MPTCP_OUTAGE_SHORT}")
        for metric, (field, runs_field) in MBIT_FIELDS.items():
            mbit = _optional_number(entry, field, where)
            if mbit is not None:
                values = enumerate(_list(entry, runs_field, where))
                runs = tuple(_finite(v, f"{where}{runs_field}[{i}]") for i, v in values)
                bars[metric].append(Bar(label, mbit, runs))
        udp = _optional_number(entry, "udp64_received_pps", where)
        if udp is not None:
            runs = tuple(_number(r, "received_pps", f"{where}udp64_runs[{i}].")
                         for i, r in enumerate(_list(entry, "udp64_runs", where)))
            bars["udp64_pps"].append(Bar(label, udp, runs))
        outage = entry.get("outage", {})
        if not isinstance(outage, Mapping):
            raise NotAReport(f"not a jvpn-trio bench report: {where}outage is not an object")
        for fault, by_fault in outage.items():
            trials = _trials(label, _field(by_fault, "runs", list, f"{where}outage.{fault}."), f"{where}outage.{fault}.")
            if not trials:
                continue
            faults.setdefault(fault, []).extend(trials)
            fault_systems.setdefault(fault, []).append(label)
            med = _median(by_fault, f"{where}outage.{fault}.")
            if med is not None:
                medians.setdefault(fault, {})[label] = med
    throughput = tuple(
        ThroughputPanel(metric, title, unit, tuple(bars[metric]), _ratio_texts(doc, metric))
        for metric, title, unit in THROUGHPUT_PANELS
    )
    order = [f for f in FAULTS if f in faults] + [f for f in faults if f not in FAULTS]
    outages = [
        OutagePanel(f, FAULT_TITLES.get(f, f.replace("_", " ")), tuple(fault_systems[f]), tuple(faults[f]),
                    medians.get(f, {}))
        for f in order
    ]  # fmt: skip
    outages += _idle_panels(doc.get("idle"))
    return PlotData(
        title=f"{REPORT_KIND}: jvpn-trio, a bare veth and its peers, same run",
        subtitle=_subtitle(doc),
        throughput=throughput,
        outages=tuple(outages),
        notes=tuple(notes),
        probe_hz=probe_hz,
    )


def _idle_panels(idle: Any) -> list[OutagePanel]:
    """The idle section's failovers, one group per probing policy (jvpn-trio only)."""
    if idle is None:
        return []
    policies = _field(idle, "policies", Mapping, "idle.")
    panels = []
    for field, title in IDLE_FAILOVERS:
        trials: list[Trial] = []
        labels: list[str] = []
        medians: dict[str, tuple[float, bool]] = {}
        for key, entry in policies.items():
            where = f"idle.policies.{key}.{field}."
            label = str(_field(entry, "label", str, f"idle.policies.{key}."))
            node = entry.get(field)
            if not isinstance(node, Mapping):
                continue
            found = _trials(label, _field(node, "runs", list, where), where)
            if found:
                trials.extend(found)
                labels.append(label)
                med = _median(node, where)
                if med is not None:
                    medians[label] = med
        if trials:
            panels.append(OutagePanel(field, f"jvpn-trio, {title}", tuple(labels), tuple(trials), medians))
    return panels


# -----------------------------------------------------------------------------
# Rendering (matplotlib, imported here only)
# -----------------------------------------------------------------------------


@attrs.frozen
class Drawn:
    """One PNG written, and the text of every bar or point it shows (for tests and progress lines)."""

    path: Path
    items: tuple[str, ...]


def _new_figure(size_in: tuple[float, float]) -> Figure:
    """A figure on the Agg canvas: no display, no pyplot state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(f"the plots need matplotlib: {INSTALL_HINT}") from None
    figure = Figure(figsize=size_in, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def require_matplotlib() -> None:
    """Raise PlotsUnavailable now rather than after a run of several minutes."""
    _new_figure((1.0, 1.0))


def _wants_log(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SCALE_SPAN


def _wrap(label: str) -> str:
    """Long labels (``wireguard-go (peers.md ..., NOT this run)``) on two lines under a bar."""
    head, sep, tail = label.partition(" (")
    return f"{head}\n({tail}" if sep else label


def _footer(figure: Figure, data: PlotData, extra: Sequence[str] = ()) -> None:
    lines = [*extra, *data.notes]
    if lines:
        figure.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom", ha="left")


def _headers(figure: Figure, title: str, data: PlotData) -> None:
    figure.suptitle(title, fontsize=12)
    figure.text(0.5, 0.925, data.subtitle, fontsize=8, ha="center", va="top")


def render_throughput(data: PlotData, path: Path) -> Drawn:
    """Bars of TCP Mbit/s (upload, download) and UDP 64 B packets/s per system (every round as a dot), same-run
    ratios in the titles."""
    figure = _new_figure(THROUGHPUT_SIZE_IN)
    axes = figure.subplots(1, len(data.throughput), squeeze=False)[0]
    items: list[str] = []
    for ax, panel in zip(axes, data.throughput):
        _throughput_panel(ax, panel, items)
    _headers(figure, f"{data.title}: throughput (medians; dots: each round)", data)
    _footer(figure, data)
    figure.subplots_adjust(top=0.7, bottom=0.22, wspace=0.3)  # room for three ratio lines
    figure.savefig(path, format="png")
    return Drawn(path, tuple(items))


def _throughput_panel(ax: Axes, panel: ThroughputPanel, items: list[str]) -> None:
    ratios = "\n".join(panel.ratios) if panel.ratios else "no same-run ratio"
    ax.set_title(f"{panel.title} ({panel.unit})\n{ratios}", fontsize=9)
    if not panel.bars:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    values = [b.value for b in panel.bars] + [v for b in panel.bars for v in b.runs]
    if _wants_log(values):
        ax.set_yscale("log")
    for x, bar in enumerate(panel.bars):
        color = REFERENCE_COLOR if bar.reference else JVPN_BAR_COLOR if bar.system == LABELS[JVPN] else BAR_COLOR
        ax.bar(x, bar.value, width=BAR_WIDTH, color=color, hatch="//" if bar.reference else None, edgecolor="black")
        if bar.runs:
            ax.plot([x] * len(bar.runs), bar.runs, linestyle="none", marker=".", color=MEDIAN_COLOR)
        ax.annotate(f"{bar.value:,.0f}", (x, bar.value), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
        items.append(f"{panel.metric}: {bar.system}: {bar.value:,.1f} {panel.unit}"
                     + (" (reference, not this run)" if bar.reference else ""))  # fmt: skip
    ax.set_xticks(range(len(panel.bars)), [_wrap(b.system) for b in panel.bars], fontsize=7)
    ax.set_ylabel(panel.unit)


def render_outages(data: PlotData, path: Path) -> Drawn:
    """Per fault and system, every trial's outage as a point and the median as a line; trials that did
    not recover are drawn as their own marker at their lower bound and listed, never dropped."""
    panels = data.outages or (OutagePanel("none", "no fault trials in this report", (), (), {}),)
    width, height = OUTAGE_PANEL_SIZE_IN
    figure = _new_figure((width * len(panels), height))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    items: list[str] = []
    for ax, panel in zip(axes, panels):
        _outage_panel(ax, panel, data.probe_hz, items)
    _legend(figure)
    _headers(figure, f"{data.title}: outage per fault trial ({data.probe_hz:g} Hz probe stream)", data)
    bounds = "a triangle: the outage lasted the whole fault (no recovery), its value is a lower bound"
    _footer(figure, data, [bounds])
    figure.subplots_adjust(top=0.8, bottom=0.28, wspace=0.35)
    figure.savefig(path, format="png")
    return Drawn(path, tuple(items))


def _outage_panel(ax: Axes, panel: OutagePanel, probe_hz: float, items: list[str]) -> None:
    ax.set_title(panel.title, fontsize=9)
    if not panel.trials:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    # A 0 s outage is shown at the probe stream's resolution (one probe interval), the log scale's floor.
    floor = 1.0 / probe_hz
    values = [max(t.seconds, floor) for t in panel.trials]
    log = _wants_log(values)
    if log:
        ax.set_yscale("log")
    ticks = []
    for x, system in enumerate(panel.systems):
        mine = [t for t in panel.trials if t.system == system]
        for k, trial in enumerate(mine):
            offset = (k / (len(mine) - 1) - 0.5) * TRIAL_SPREAD if len(mine) > 1 else 0.0
            y = max(trial.seconds, floor) if log else trial.seconds
            if trial.recovered:
                ax.plot(x + offset, y, linestyle="none", marker="o", color=RECOVERED_COLOR, alpha=0.8)
            else:
                ax.plot(x + offset, y, linestyle="none", marker="^", color=NO_RECOVERY_COLOR, markersize=8)
            items.append(f"{panel.fault}: {trial.text}")
        unrecovered = sum(not t.recovered for t in mine)
        med = panel.medians.get(system)
        if med is not None:
            seconds, recovered = med
            y = max(seconds, floor) if log else seconds
            ax.hlines(y, x - MEDIAN_WIDTH / 2, x + MEDIAN_WIDTH / 2, color=MEDIAN_COLOR, linewidth=2)
            shown = f"{seconds:.3f} s" if recovered else f"> {seconds:.3f} s"
            ax.annotate(shown, (x + MEDIAN_WIDTH / 2, y), fontsize=7, va="center", xytext=(2, 0),
                        textcoords="offset points")  # fmt: skip
            items.append(f"{panel.fault}: {system}, median: {shown}" + ("" if recovered else f" ({NO_RECOVERY})"))
        ticks.append(_wrap(system) + (f"\n{NO_RECOVERY}: {unrecovered}/{len(mine)}" if unrecovered else ""))
    ax.set_xticks(range(len(panel.systems)), ticks, fontsize=7)
    ax.set_xlim(-0.6, len(panel.systems) - 0.4)
    if not log:
        ax.set_ylim(0.0, max(values) * (1.0 + Y_HEADROOM))
    ax.set_ylabel("outage (s)" + (", log scale" if log else ""))


def _legend(figure: Figure) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], linestyle="none", marker="o", color=RECOVERED_COLOR, label="trial"),
        Line2D([], [], linestyle="none", marker="^", color=NO_RECOVERY_COLOR, label=f"trial, {NO_RECOVERY} (lower bound)"),
        Line2D([], [], color=MEDIAN_COLOR, linewidth=2, label="median"),
    ]  # fmt: skip
    figure.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)


@attrs.frozen
class _TimelineRow:
    system: str
    trial: Trial
    timeline: Timeline


def _timeline_rows(panel: OutagePanel) -> list[_TimelineRow]:
    """The panel's trials that carry a timeline, system by system in column order, each in trial order."""
    return [
        _TimelineRow(system, t, t.timeline)
        for system in panel.systems
        for t in panel.trials
        if t.system == system and t.timeline is not None
    ]


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def timelines_height_in(panel_heights_in: Sequence[float]) -> float:
    """The timelines figure's height for panels this tall (inches): theirs, the gaps between them, the margins."""
    gaps = TIMELINE_PANEL_GAP_IN * (len(panel_heights_in) - 1)
    return TIMELINE_TOP_IN + sum(panel_heights_in) + gaps + TIMELINE_BOTTOM_IN


def render_timelines(data: PlotData, path: Path) -> Drawn | None:
    """Per fault, one row per trial: the probe arrivals around its gap (ticks) and the gap itself (a bar).

    Time runs from the fault (0 ms).  A gap that did not close before the fault was removed is red
    and reaches the fault window's end (dotted).  Returns None, and writes nothing, when the
    report has no timelines (written before the bench kept them).
    """
    panels = [(panel, rows) for panel in data.outages if (rows := _timeline_rows(panel))]
    if not panels:
        return None
    heights = [max(len(rows), TIMELINE_MIN_ROWS) * TIMELINE_ROW_IN for _, rows in panels]
    height = timelines_height_in(heights)
    figure = _new_figure((TIMELINE_WIDTH_IN, height))
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    items: list[str] = []
    for ax, (panel, rows) in zip(axes, panels):
        _timeline_panel(ax, panel, rows, data.probe_hz, items)
    axes[-1].set_xlabel("ms since the fault was applied")
    _timeline_legend(figure)
    _headers(figure, f"{data.title}: probe arrivals around each outage ({data.probe_hz:g} Hz)", data)
    _footer(figure, data, ["ticks: probes that arrived (only those nearest the gap are kept); bar: the outage"])
    # hspace is relative to the mean panel height: this makes the gap TIMELINE_PANEL_GAP_IN inches.
    figure.subplots_adjust(top=1.0 - TIMELINE_TOP_IN / height, bottom=TIMELINE_BOTTOM_IN / height,
                           left=TIMELINE_LEFT, right=TIMELINE_RIGHT,
                           hspace=TIMELINE_PANEL_GAP_IN / (sum(heights) / len(heights)))  # fmt: skip
    figure.savefig(path, format="png")
    return Drawn(path, tuple(items))


def _timeline_panel(ax: Axes, panel: OutagePanel, rows: Sequence[_TimelineRow], probe_hz: float, items: list[str]) -> None:
    ax.set_title(panel.title, fontsize=9)
    gaps = [max(r.timeline.gap_end - r.timeline.gap_start, 1.0 / probe_hz) for r in rows]
    if _wants_log(gaps):
        ax.set_xscale("symlog", linthresh=_ms(TIMELINE_LINEAR_PROBES / probe_hz))
    # The axis spans what was kept (arrivals and gaps), not the fault's window: a 10 ms outage in a
    # 3 s fault would otherwise be a sliver.  The window's end is marked where it falls inside.
    # From the fault (0) or earlier: a trial whose fault came first (the idle section's) has no arrival before its gap.
    first = min(0.0, *(_ms(min(r.timeline.arrivals, default=r.timeline.gap_start)) for r in rows))
    last = max(_ms(max(r.timeline.arrivals, default=r.timeline.gap_end)) for r in rows)
    last = max(last, *(_ms(r.timeline.gap_end) for r in rows), first + _ms(1.0 / probe_hz))  # never an empty span
    labels = []
    for y, row in enumerate(rows):
        line, trial = row.timeline, row.trial
        color = RECOVERED_COLOR if trial.recovered else NO_RECOVERY_COLOR
        start, end = _ms(line.gap_start), _ms(line.gap_end)
        ax.barh(y, end - start, left=start, height=GAP_BAR_HEIGHT, color=color, alpha=GAP_ALPHA)
        if line.arrivals:
            ax.plot([_ms(t) for t in line.arrivals], [y] * len(line.arrivals), linestyle="none", marker="|",
                    color=MEDIAN_COLOR, markersize=TICK_SIZE, markeredgewidth=TICK_WIDTH)  # fmt: skip
        if _ms(line.window) <= last:
            ax.vlines(_ms(line.window), y - GAP_BAR_HEIGHT, y + GAP_BAR_HEIGHT, colors=MEDIAN_COLOR, linestyles="dotted")
        shown = f"{end - start:.1f} ms" if trial.recovered else f"> {end - start:.1f} ms ({NO_RECOVERY})"
        row_end = max(end, *(_ms(t) for t in line.arrivals))
        ax.annotate(shown, (row_end, y), fontsize=7, va="center", xytext=(4, 0), textcoords="offset points")
        labels.append(f"{_wrap(row.system)} #{trial.index + 1}")
        items.append(f"{panel.fault}: {row.system}, trial {trial.index + 1}: gap {start:.1f} .. {end:.1f} ms, "
                     f"{len(line.arrivals)} arrivals" + ("" if trial.recovered else f" ({NO_RECOVERY})"))  # fmt: skip
    ax.axvline(0.0, color=NO_RECOVERY_COLOR, linewidth=1)
    pad = (last - first) * TIMELINE_PAD
    ax.set_xlim(first - pad, last + pad * TIMELINE_LABEL_ROOM)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first trial on top
    ax.tick_params(axis="x", labelsize=7)


def _timeline_legend(figure: Figure) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], linestyle="none", marker="|", color=MEDIAN_COLOR, label="probe arrived"),
        Patch(color=RECOVERED_COLOR, alpha=GAP_ALPHA, label="outage"),
        Patch(color=NO_RECOVERY_COLOR, alpha=GAP_ALPHA, label=f"outage, {NO_RECOVERY} (lower bound)"),
        Line2D([], [], color=NO_RECOVERY_COLOR, linewidth=1, label="fault applied"),
        Line2D([], [], color=MEDIAN_COLOR, linestyle="dotted", label="fault removed"),
    ]
    figure.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)


def render_all(doc: Any, directory: Path) -> list[Drawn]:
    """The figures of a report's JSON document into ``directory`` (created if needed).

    Throughput and outages always; the outage timelines when the report has any (see
    :func:`render_timelines`).

    Raises NotAReport for a document that is not a bench report, PlotsUnavailable without
    matplotlib, OSError if the directory cannot be written.
    """
    data = plot_data(doc)
    require_matplotlib()
    directory.mkdir(parents=True, exist_ok=True)
    drawn = [render_throughput(data, directory / THROUGHPUT_FILE), render_outages(data, directory / OUTAGES_FILE)]
    timelines = render_timelines(data, directory / TIMELINES_FILE)
    return drawn if timelines is None else [*drawn, timelines]
