"""Pure views: a runtime snapshot -> an immutable view model -> rich renderables.

Theory of operation
-------------------
Two pure steps, both free of clocks and I/O so that a test can render any
screen from fixed data and compare it with golden text:

1. :func:`build_view_model` turns what the supervisor published (a frozen
   :class:`~jvpn_trio.drivers.client.RuntimeStatus`, or None while the
   first handshake runs; one without a snapshot while the agent is
   between sessions), the recent events and the UI's own toggles into a
   :class:`ViewModel`, computing everything that depends on time from the
   ``now`` it is given (uptime, the recovery countdown);
2. :func:`render` turns a view model into a rich ``Layout``::

       ┌ header ─────────────────────────────────────────────────┐
       │ session · state (coloured) · version · uptime · gateway │
       ├ paths ──────────────────────────────────────────────────┤
       │ one row per path: health, markers, RTT sparkline        │
       ├ counters ───────────────────────────────────────────────┤
       │ bytes/packets each way, switches vs limit, countdowns   │
       ├ events ─────────────────────────────────────────────────┤
       │ newest first, reason codes, times                       │
       └─────────────────────────────────────────────────────────┘
        footer: scenario/emulation lines and the key hints

   ``?`` replaces the events pane with the help text.

The renderables are built fresh for each frame from the view model only,
never from live objects, so a frame drawn in another thread cannot see
state change under it.  Times on screen are seconds since ``origin`` (the
UI's or the demo's start): the driver's clock means nothing to a person.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from rich import box
from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.states import SessionState
from jvpn_trio.ui.keys import KEY_HELP

if TYPE_CHECKING:  # the views only read its fields; importing drivers at run time would pull in trio
    from jvpn_trio.drivers.client import ClientStatistics, RuntimeStatus

#: Shown in the header while the handshake runs (there is no session yet).
HANDSHAKING = "HANDSHAKING"
#: Shown in the header while the agent is between sessions (a new handshake is on its way).
CONNECTING = "CONNECTING"
#: Shown by an attached UI before the agent's first status reply.
ATTACHING = "ATTACHING"
#: Shown while the agent holds (status ``held``): an operator's disconnect, or another client with our key.
DISCONNECTED = "DISCONNECTED"
REPLACED = "REPLACED"
STATE_STYLES: Mapping[str, str] = {
    HANDSHAKING: "bold cyan",
    CONNECTING: "bold cyan",
    ATTACHING: "bold cyan",
    DISCONNECTED: "bold white on blue",
    REPLACED: "bold white on magenta",
    SessionState.BIRTH.value: "bold cyan",
    SessionState.ATTACHED.value: "bold green",
    SessionState.VOLATILE.value: "bold yellow",
    SessionState.RECOVERING.value: "bold red",
    SessionState.DEGRADED.value: "bold magenta",
    SessionState.TERMINATED.value: "bold white on red",
}
VERDICT_STYLES: Mapping[str, str] = {"HEALTHY": "green", "IMPAIRED": "yellow", "DEAD": "red", "UNKNOWN": "dim"}
KIND_STYLES: Mapping[str, str] = {
    EventKind.STATE_CHANGE.value: "cyan",
    EventKind.TRANSPORT_SWITCH.value: "bold green",
    EventKind.SECURITY_EVENT.value: "bold red",
    EventKind.SWITCH_DENIED.value: "magenta",
    EventKind.REATTACH_REJECTED.value: "yellow",
    EventKind.PATH_HEALTH.value: "dim",
    EventKind.OPERATOR_ACTION.value: "bold blue",
}
KIND_LABELS: Mapping[str, str] = {"ethernet": "Ethernet", "wifi": "Wi-Fi", "lte": "LTE"}
#: What the events pane shows by default; ``e`` (detail) shows every kind, with its details.
HEADLINE_KINDS = frozenset(
    {EventKind.STATE_CHANGE, EventKind.TRANSPORT_SWITCH, EventKind.SECURITY_EVENT, EventKind.OPERATOR_ACTION}
)
#: Events kept in a view model (newest first): more than any terminal shows.
MAX_EVENTS = 40
#: RTT samples in a sparkline (the core keeps ``health.RTT_HISTORY_LEN``).
SPARK_WIDTH = 16
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
#: The smallest RTT range (ms) a sparkline stretches over its full height.
SPARK_MIN_SPAN_MS = 5.0
ACTIVE_MARK = "▶"
PIN_MARK = "⚑"
NONE_TEXT = "-"
#: Details the compact summary already shows, left out of the detail line.
_SUMMARISED = frozenset({"from_state", "to_state", "from_path", "to_path"})


@attrs.frozen(kw_only=True)
class PathView:
    path: str
    interface: str
    kind: str
    endpoint: str
    rtt_ms: float | None
    jitter_ms: float | None
    loss_pct: float
    verdict: str
    reason: str
    active: bool
    pinned: bool
    link_up: bool
    rtt_history_ms: tuple[float, ...]


@attrs.frozen(kw_only=True)
class EventView:
    t: float  # seconds since the view's origin
    role: str
    kind: str
    version: int
    reason: str
    summary: str
    details: tuple[tuple[str, str], ...]
    seq: int | None = None  # its number in the agent's event log (attached UIs)
    missed: int = 0  # > 0: not an event but a gap in the stream, "N events missed"


@attrs.frozen(kw_only=True)
class PickerRow:
    number: int  # 1-based, the digit that picks it
    path: str
    interface: str
    kind: str
    verdict: str
    active: bool
    pinned: bool


@attrs.frozen(kw_only=True)
class PickerView:
    """The path picker (``p`` in an attached UI): the paths and the selected row."""

    rows: tuple[PickerRow, ...]
    selected: int  # index into rows


@attrs.frozen(kw_only=True)
class CountersView:
    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    tx_dropped: int = 0


@attrs.frozen(kw_only=True)
class ViewModel:
    """Everything one frame shows, as plain values."""

    title: str
    state: str
    session: str | None
    version: int | None
    uptime_s: float | None
    gateway: str
    policy: str | None
    tunnel: str | None
    paths: tuple[PathView, ...]
    events: tuple[EventView, ...]  # newest first
    counters: CountersView
    switches_last_minute: int | None
    max_switches_per_minute: int | None
    recovery_left_s: float | None
    unbound_left_s: float | None
    pinned: str | None
    pending: str | None
    detail: bool = False
    help: bool = False
    footer: tuple[str, ...] = ()
    message: str = ""
    #: The key hints of the footer.
    hints: tuple[tuple[str, str], ...] = (("q", "quit"), ("p", "pin"), ("s", "re-evaluate"), ("e", "details"), ("?", "help"))
    picker: PickerView | None = None  # shown instead of the events pane
    selected_event: int | None = None  # index into ``events`` (attached UIs)
    event_detail: EventView | None = None  # shown instead of the events pane
    message_line: bool = False  # the message on a line of its own above the hints (attached UIs)


#: The footer's hints in an attached UI.
ATTACHED_HINTS: tuple[tuple[str, str], ...] = (
    ("q", "quit"), ("p", "pin"), ("u", "unpin"), ("r", "re-evaluate"), ("d", "disconnect"), ("c", "reconnect"),
    ("i", "event"), ("?", "help"),
)


# =============================================================================
# Snapshot -> view model
# =============================================================================


def _endpoint(endpoint: Sequence[object]) -> str:
    host, port = str(endpoint[0]), endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _path_label(value: object, names: Mapping[str, str]) -> str:
    text = str(value)
    return names.get(text, text)


def event_view(event: EmitEvent, *, origin: float, names: Mapping[str, str] | None = None) -> EventView:
    """One event as the events pane shows it; ``names`` maps ``p2`` to ``wifi0``."""
    names = names or {}
    details = dict(event.details)
    kind = event.kind
    if kind is EventKind.STATE_CHANGE:
        summary = f"{details.get('from_state') or '·'} → {details.get('to_state')}"
    elif kind is EventKind.TRANSPORT_SWITCH:
        summary = f"{_path_label(details.get('from_path') or '·', names)} → {_path_label(details.get('to_path'), names)}"
    elif kind is EventKind.PATH_HEALTH:
        summary = f"{_path_label(details.get('path'), names)} {details.get('verdict')}"
    elif kind is EventKind.SECURITY_EVENT:
        summary = f"from {details.get('endpoint') or '?'}"
    elif kind is EventKind.OPERATOR_ACTION:
        target = details.get("path")
        refused = " (path gone: not applied)" if details.get("applied") is False else ""
        summary = f"{_path_label(target, names) + ' ' if target else ''}by {details.get('by') or '?'}{refused}"
    elif kind is EventKind.SWITCH_DENIED:
        target = details.get("target")
        summary = (
            f"{_path_label(target, names) if target else '·'} "
            f"{details.get('switches_last_minute')}/{details.get('max_switches_per_minute')}"
        )
    else:
        summary = f"{_path_label(details.get('path') or '·', names)}"
    shown = tuple((k, str(v)) for k, v in event.details if v is not None and k not in _SUMMARISED)
    return EventView(
        t=event.t - origin,
        role=event.role.value,
        kind=kind.value,
        version=event.version,
        reason=event.reason.value,
        summary=summary,
        details=shown,
    )


def build_view_model(
    status: RuntimeStatus | None,
    events: Sequence[EmitEvent],
    *,
    now: float,
    origin: float,
    gateway: str,
    title: str = "jvpn-trio",
    detail: bool = False,
    help: bool = False,
    footer: Sequence[str] = (),
    message: str = "",
) -> ViewModel:
    """The frame for ``status`` at ``now``.  Pure; ``events`` oldest first, as emitted."""
    names: dict[str, str] = {}
    kinds: dict[str, str] = {}
    if status is not None:
        for path_id, interface, kind in status.paths:
            names[str(path_id)] = interface
            kinds[str(path_id)] = kind
    wanted = [e for e in events if detail or e.kind in HEADLINE_KINDS]
    event_views = tuple(event_view(e, origin=origin, names=names) for e in reversed(wanted[-MAX_EVENTS:]))
    if status is None or status.snapshot is None:
        between = status is not None
        return ViewModel(
            title=title,
            state=CONNECTING if between else HANDSHAKING,
            session=None,
            version=None,
            uptime_s=None,
            gateway=gateway,
            policy=None,
            tunnel=status.tunnel_address if status is not None else None,
            paths=(),
            events=event_views,
            counters=_counters(status.statistics) if status is not None else CountersView(),
            switches_last_minute=None,
            max_switches_per_minute=None,
            recovery_left_s=None,
            unbound_left_s=None,
            pinned=None,
            pending=None,
            detail=detail,
            help=help,
            footer=tuple(footer),
            message=message,
        )
    snap = status.snapshot
    rec = snap.record
    terminated = rec.state is SessionState.TERMINATED
    stats = status.statistics
    paths = tuple(
        PathView(
            path=str(p.path),
            interface=names.get(str(p.path), str(p.path)),
            kind=kinds.get(str(p.path), ""),
            endpoint=_endpoint(p.endpoint),
            rtt_ms=p.stats.srtt_ms,
            jitter_ms=p.stats.jitter_ms,
            loss_pct=p.stats.loss_pct,
            verdict=p.verdict.verdict.value,
            reason=p.verdict.reason.value,
            active=p.active,
            pinned=p.pinned,
            link_up=p.stats.link_up,
            rtt_history_ms=p.stats.rtt_history_ms,
        )
        for p in snap.paths
    )
    recovery = snap.recovery_deadline
    unbound = snap.unbound_deadline
    return ViewModel(
        title=title,
        state=rec.state.value,
        session=rec.session_id.short,
        version=rec.version,
        uptime_s=max(0.0, (snap.now if terminated else now) - rec.created_at),
        gateway=gateway,
        policy=snap.policy_fingerprint,
        tunnel=status.tunnel_address,
        paths=paths,
        events=event_views,
        counters=_counters(stats),
        switches_last_minute=snap.switches_last_minute,
        max_switches_per_minute=snap.max_switches_per_minute,
        recovery_left_s=None if recovery is None or terminated else max(0.0, recovery - now),
        unbound_left_s=None if unbound is None or terminated else max(0.0, unbound - now),
        pinned=_path_label(snap.pinned, names) if snap.pinned is not None else None,
        pending=_path_label(snap.pending.path, names) if snap.pending is not None else None,
        detail=detail,
        help=help,
        footer=tuple(footer),
        message=message,
    )


def _counters(stats: ClientStatistics) -> CountersView:
    return CountersView(
        tx_bytes=stats.tx_bytes,
        tx_packets=stats.tx_packets,
        rx_bytes=stats.rx_bytes,
        rx_packets=stats.rx_packets,
        tx_dropped=stats.tx_dropped_unbound,
    )


# =============================================================================
# Formatting helpers (pure)
# =============================================================================


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """The last ``width`` values as block characters, from their minimum up.

    The scale spans at least :data:`SPARK_MIN_SPAN_MS`, so a steady path
    draws a flat low line instead of magnifying sub-millisecond noise.
    """
    recent = list(values)[-width:]
    if not recent:
        return ""
    low = min(recent)
    span = max(max(recent) - low, SPARK_MIN_SPAN_MS)
    last = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[min(last, max(0, round((v - low) / span * last)))] for v in recent)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE_TEXT
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _ms(value: float | None) -> str:
    return NONE_TEXT if value is None else f"{value:.1f}"


# =============================================================================
# View model -> renderables
# =============================================================================


def render_header(vm: ViewModel) -> RenderableType:
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append("session ", style="dim")
    line.append(vm.session or NONE_TEXT, style="bold")
    line.append("  ")
    line.append(f" {vm.state} ", style=STATE_STYLES.get(vm.state, "bold"))
    if vm.version is not None:
        line.append(f" v{vm.version}", style="bold")
    line.append("  up ", style="dim")
    line.append(format_duration(vm.uptime_s))
    line.append("  gateway ", style="dim")
    line.append(vm.gateway)
    line.append("  policy ", style="dim")
    line.append(vm.policy or NONE_TEXT)
    return Panel(line, title=Text(vm.title, style="bold"), title_align="left", box=box.ROUNDED, padding=(0, 1))


def render_paths(vm: ViewModel) -> RenderableType:
    table = Table(
        box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False, pad_edge=False, expand=True
    )
    table.add_column("", width=2, no_wrap=True)
    table.add_column("path", no_wrap=True)
    table.add_column("iface", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("endpoint", no_wrap=True, overflow="ellipsis")
    table.add_column("RTT ms", justify="right", no_wrap=True)
    table.add_column("jitter", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("RTT history", no_wrap=True, min_width=SPARK_WIDTH)
    for p in vm.paths:
        mark = Text(no_wrap=True)
        mark.append(ACTIVE_MARK if p.active else " ", style="bold green")
        mark.append(PIN_MARK if p.pinned else " ", style="bold yellow")
        verdict = p.verdict if p.link_up else "DOWN"
        row_style = "bold" if p.active else ""
        table.add_row(
            mark,
            Text(p.path, style=row_style),
            Text(p.interface, style=row_style),
            KIND_LABELS.get(p.kind, p.kind),
            p.endpoint,
            _ms(p.rtt_ms),
            _ms(p.jitter_ms),
            f"{p.loss_pct:.0f}%",
            Text(verdict, style=VERDICT_STYLES.get(p.verdict, "")),
            Text(sparkline(p.rtt_history_ms), style="cyan"),
        )
    body: RenderableType = table if vm.paths else Text("handshaking with the gateway…", style="dim")
    return Panel(body, title="paths", title_align="left", box=box.ROUNDED, padding=(0, 1))


def _summary_style(e: EventView) -> str:
    if e.kind == EventKind.STATE_CHANGE.value:
        return STATE_STYLES.get(e.summary.rsplit(" ", 1)[-1], "")
    return "bold" if e.kind == EventKind.TRANSPORT_SWITCH.value else ""


def render_events(vm: ViewModel) -> RenderableType:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(justify="right", no_wrap=True)  # time
    table.add_column(no_wrap=True)  # role
    table.add_column(no_wrap=True, min_width=len(EventKind.REATTACH_REJECTED.value))
    table.add_column(justify="right", no_wrap=True)  # version
    table.add_column(ratio=1, overflow="fold")  # what happened and why (+ details)
    for index, e in enumerate(vm.events):
        selected = index == vm.selected_event
        if e.missed:
            table.add_row(
                Text("›" if selected else "", style="bold"), "", Text("GAP", style="bold red"), "",
                Text(f"{e.missed} events missed", style="bold red"),
            )
            continue
        what = Text()
        what.append(e.summary, style=_summary_style(e))
        what.append("  ")
        what.append(e.reason)
        if vm.detail and e.details:
            what.append("\n")
            what.append("  ".join(f"{k}={v}" for k, v in e.details), style="dim")
        table.add_row(
            Text(f"› {e.t:.3f}" if selected else f"{e.t:.3f}", style="reverse" if selected else ""),
            Text("gw" if e.role == "gateway" else "cl", style="dim"),
            Text(e.kind, style=KIND_STYLES.get(e.kind, "")),
            f"v{e.version}",
            what,
        )
    title = "events: every kind, with details (e)" if vm.detail else "events (e: details)"
    body: RenderableType = table if vm.events else Text("no events yet", style="dim")
    return Panel(body, title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def render_counters(vm: ViewModel) -> RenderableType:
    grid = Table.grid(padding=(0, 1), expand=True)
    for _ in range(3):
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    c = vm.counters
    limit = vm.max_switches_per_minute
    if vm.switches_last_minute is None:
        switches = Text(NONE_TEXT)
    else:
        full = limit is not None and vm.switches_last_minute >= limit
        switches = Text(f"{vm.switches_last_minute} / {limit} in 60 s", style="bold red" if full else "")
    recovery = (
        Text(f"{vm.recovery_left_s:.1f} s left", style="bold red") if vm.recovery_left_s is not None else Text(NONE_TEXT)
    )
    unbound = Text(f"{vm.unbound_left_s:.1f} s left", style="red") if vm.unbound_left_s is not None else Text(NONE_TEXT)
    grid.add_row(
        "up", f"{format_bytes(c.tx_bytes)} · {c.tx_packets} pkt",
        "down", f"{format_bytes(c.rx_bytes)} · {c.rx_packets} pkt",
        "switches", switches,
    )
    grid.add_row(
        "recovery", recovery,
        "unbound", unbound,
        "not sent", f"{c.tx_dropped} pkt (unbound)",
    )
    grid.add_row(
        "pinned", vm.pinned or "none",
        "reattach", f"{vm.pending} pending" if vm.pending else NONE_TEXT,
        "tunnel", vm.tunnel or NONE_TEXT,
    )
    return Panel(grid, title="counters", title_align="left", box=box.ROUNDED, padding=(0, 1))


def render_help(vm: ViewModel) -> RenderableType:
    keys = Table.grid(padding=(0, 2))
    keys.add_column(style="bold cyan", no_wrap=True)
    keys.add_column()
    for key, what in KEY_HELP:
        keys.add_row(key, what)
    legend = Text()
    legend.append(f"{ACTIVE_MARK} active path   {PIN_MARK} pinned path   DOWN: link down\n", style="dim")
    legend.append("RTT ms: smoothed probe round trip; jitter: its variation; loss: over the last probes\n", style="dim")
    legend.append("States: ", style="dim")
    for state in SessionState:
        legend.append(f" {state.value} ", style=STATE_STYLES[state.value])
        legend.append(" ")
    return Panel(Group(keys, Text(""), legend), title="help (? to close)", title_align="left", box=box.ROUNDED)


def render_footer(vm: ViewModel) -> RenderableType:
    lines = [Text(line, style="dim", no_wrap=True, overflow="ellipsis") for line in vm.footer]
    hints = Text(no_wrap=True, overflow="ellipsis")
    for key, label in vm.hints:
        hints.append(f" {key} ", style="reverse")
        hints.append(f" {label}  ")
    if vm.message_line:
        lines.append(Text(vm.message, style="bold yellow", no_wrap=True, overflow="ellipsis"))
    elif vm.message:
        hints.append(vm.message, style="bold yellow")
    return Group(*lines, hints)


def footer_height(vm: ViewModel) -> int:
    return len(vm.footer) + 1 + (1 if vm.message_line else 0)


#: Rows of the counters panel (three lines plus its border).
COUNTERS_HEIGHT = 5


def render(vm: ViewModel) -> Layout:
    """The whole screen for one frame."""
    layout = Layout(name="root")
    layout.split_column(
        Layout(name="header", size=3),
        Layout(name="paths", size=max(len(vm.paths), 1) + 4),
        Layout(name="counters", size=COUNTERS_HEIGHT),
        Layout(name="events", ratio=1),
        Layout(name="footer", size=footer_height(vm)),
    )
    layout["header"].update(render_header(vm))
    layout["paths"].update(render_paths(vm))
    layout["counters"].update(render_counters(vm))
    if vm.help:
        layout["events"].update(render_help(vm))
    elif vm.picker is not None:
        layout["events"].update(render_picker(vm.picker))
    elif vm.event_detail is not None:
        layout["events"].update(render_event_detail(vm.event_detail))
    else:
        layout["events"].update(render_events(vm))
    layout["footer"].update(render_footer(vm))
    return layout


def render_picker(picker: PickerView) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, pad_edge=False, expand=True)
    table.add_column("", width=2, no_wrap=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("path", no_wrap=True)
    table.add_column("iface", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("", no_wrap=True)
    for index, row in enumerate(picker.rows):
        selected = index == picker.selected
        marks = ("active" if row.active else "") + (" pinned" if row.pinned else "")
        table.add_row(
            Text("›" if selected else "", style="bold"),
            str(row.number),
            row.path,
            row.interface,
            KIND_LABELS.get(row.kind, row.kind),
            Text(row.verdict, style=VERDICT_STYLES.get(row.verdict, "")),
            marks.strip(),
            style="reverse" if selected else "",
        )
    body: RenderableType = table if picker.rows else Text("no paths to pin", style="dim")
    return Panel(
        body, title="pin a path: ↑/↓ or 1-9, Enter pins, u unpins, Esc cancels", title_align="left", box=box.ROUNDED,
        padding=(0, 1),
    )  # fmt: skip


def render_event_detail(e: EventView) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    if e.missed:
        grid.add_row("gap", f"{e.missed} events missed (the agent dropped them for this UI: it read too slowly)")
    else:
        rows: list[tuple[str, str]] = [
            ("seq", str(e.seq) if e.seq is not None else NONE_TEXT),
            ("time", f"{e.t:.3f} s"),
            ("side", e.role),
            ("kind", e.kind),
            ("version", f"v{e.version}"),
            ("what", e.summary),
            ("reason", e.reason),
        ]
        for key, value in rows + list(e.details):
            grid.add_row(key, value)
    return Panel(grid, title="event (Esc closes)", title_align="left", box=box.ROUNDED, padding=(0, 1))


# =============================================================================
# An attached UI: the agent's status reply (JSON) -> view model
# =============================================================================


@attrs.frozen(kw_only=True)
class StreamEntry:
    """One line of an attached UI's event history: an event (parsed, or raw if unknown) or a gap."""

    seq: int | None
    event: EmitEvent | None
    data: Mapping[str, Any] = attrs.field(factory=dict)
    missed: int = 0


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def entry_view(entry: StreamEntry, *, origin: float, names: Mapping[str, str]) -> EventView:
    """One line of an attached UI's events pane.  Pure; a raw record of a newer agent is shown as it is."""
    if entry.missed:
        return EventView(t=0.0, role="", kind="GAP", version=0, reason="", summary="", details=(), seq=entry.seq,
                         missed=entry.missed)  # fmt: skip
    if entry.event is not None:
        return attrs.evolve(event_view(entry.event, origin=origin, names=names), seq=entry.seq)
    data = entry.data
    t = _num(data.get("t"))
    known = {"kind", "t", "role", "version", "reason", "session", "policy"}
    return EventView(
        t=(t if t is not None else origin) - origin,
        role=str(data.get("role", "?")),
        kind=str(data.get("kind", "?")),
        version=_int(data.get("version")),
        reason=str(data.get("reason", "?")),
        summary="",
        details=tuple((str(k), str(v)) for k, v in sorted(data.items()) if k not in known and v is not None),
        seq=entry.seq,
    )


def _shown(entry: StreamEntry, detail: bool) -> bool:
    if entry.missed or detail:
        return True
    return entry.event is not None and entry.event.kind in HEADLINE_KINDS


def attached_events(
    entries: Sequence[StreamEntry], *, origin: float, names: Mapping[str, str], detail: bool
) -> tuple[EventView, ...]:
    """The events pane's rows, newest first (headlines, or every kind with ``detail``; gaps always)."""
    wanted = [e for e in entries if _shown(e, detail)]
    return tuple(entry_view(e, origin=origin, names=names) for e in reversed(wanted[-MAX_EVENTS:]))


def status_paths(status: Mapping[str, Any] | None) -> tuple[tuple[str, str, str], ...]:
    """``(path, interface, kind)`` of each path in a status reply (untrusted JSON; bad rows are skipped)."""
    rows = status.get("paths") if status is not None else None
    out: list[tuple[str, str, str]] = []
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            out.append((row["path"], _str(row.get("interface")) or row["path"], _str(row.get("kind")) or ""))
    return tuple(out)


def attached_view_model(
    status: Mapping[str, Any] | None,
    entries: Sequence[StreamEntry],
    *,
    now: float,
    received_at: float,
    origin: float,
    gateway: str | None = None,
    title: str = "jvpn-trio",
    rtt_history: Mapping[str, Sequence[float]] | None = None,
    detail: bool = False,
    help: bool = False,
    footer: Sequence[str] = (),
    message: str = "",
    picker: PickerView | None = None,
    selected_event: int | None = None,
    event_detail: EventView | None = None,
) -> ViewModel:
    """The frame of an attached UI at ``now``: the agent's last ``status`` reply (received at ``received_at``,
    on the UI's clock) and the event history.  Pure.

    The reply is untrusted JSON from any version of the agent: a missing or mistyped field shows as
    ``-``, never raises.  Countdowns and the uptime advance from ``received_at`` to ``now``.
    """
    rtt_history = rtt_history or {}
    names = {path: name for path, name, _kind in status_paths(status)}
    kinds = {path: kind for path, _name, kind in status_paths(status)}
    events = attached_events(entries, origin=origin, names=names, detail=detail)
    if selected_event is not None:
        selected_event = min(selected_event, len(events) - 1) if events else None
    common: dict[str, Any] = dict(
        title=title, events=events, detail=detail, help=help, footer=tuple(footer), message=message,
        hints=ATTACHED_HINTS, message_line=True, picker=picker, selected_event=selected_event, event_detail=event_detail,
    )  # fmt: skip
    counters = status.get("counters") if status is not None else None
    c = counters if isinstance(counters, dict) else {}
    counters_view = CountersView(
        tx_bytes=_int(c.get("tx_bytes")),
        tx_packets=_int(c.get("tx_packets")),
        rx_bytes=_int(c.get("rx_bytes")),
        rx_packets=_int(c.get("rx_packets")),
        tx_dropped=_int(c.get("tx_dropped_unbound")),
    )
    tunnel = _str(status.get("tunnel_address")) if status is not None else None
    if status is None or not isinstance(status.get("session"), str):
        held_because = _str(status.get("held_because")) if status is not None else None
        if held_because and not message:  # a held agent says why in the message line, until a key's feedback
            common["message"] = f"{held_because}: c reconnects"
        return ViewModel(
            state=ATTACHING if status is None else str(status.get("state") or CONNECTING),
            session=None, version=None, uptime_s=None, gateway=gateway or NONE_TEXT, policy=None, tunnel=tunnel,
            paths=(), counters=counters_view, switches_last_minute=None, max_switches_per_minute=None,
            recovery_left_s=None, unbound_left_s=None, pinned=None, pending=None, **common,
        )  # fmt: skip
    state = str(status.get("state") or NONE_TEXT)
    elapsed = 0.0 if state == SessionState.TERMINATED.value else max(0.0, now - received_at)
    paths: list[PathView] = []
    active_endpoint: str | None = None
    for row in status.get("paths") or ():
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            continue
        pid = row["path"]
        verdict = _str(row.get("verdict")) or "UNKNOWN"
        active = row.get("active") is True
        endpoint = _str(row.get("endpoint")) or NONE_TEXT
        if active:
            active_endpoint = endpoint
        paths.append(
            PathView(
                path=pid, interface=names.get(pid) or pid, kind=kinds.get(pid, ""), endpoint=endpoint,
                rtt_ms=_num(row.get("srtt_ms")), jitter_ms=_num(row.get("jitter_ms")),
                loss_pct=_num(row.get("loss_pct")) or 0.0, verdict=verdict, reason=_str(row.get("reason")) or "",
                active=active, pinned=row.get("pinned") is True, link_up=row.get("link_up") is not False,
                rtt_history_ms=tuple(rtt_history.get(pid, ())),
            )
        )  # fmt: skip

    def left(key: str) -> float | None:
        value = _num(status.get(key))
        return None if value is None or state == SessionState.TERMINATED.value else max(0.0, value - elapsed)

    age = _num(status.get("session_age_s"))
    pinned = _str(status.get("pinned_path"))
    pending = status.get("pending_reattach")
    pending_path = _str(pending.get("path")) if isinstance(pending, dict) else None
    switches = status.get("switches_last_minute")
    limit = status.get("max_switches_per_minute")
    session = str(status["session"])
    return ViewModel(
        state=state,
        session=session[:8],
        version=_int(status.get("version")) if isinstance(status.get("version"), int) else None,
        uptime_s=None if age is None else age + elapsed,
        gateway=gateway or active_endpoint or NONE_TEXT,
        policy=_str(status.get("policy")),
        tunnel=tunnel,
        paths=tuple(paths),
        counters=counters_view,
        switches_last_minute=switches if isinstance(switches, int) else None,
        max_switches_per_minute=limit if isinstance(limit, int) else None,
        recovery_left_s=left("recovery_deadline_in_s"),
        unbound_left_s=left("unbound_deadline_in_s"),
        pinned=names.get(pinned, pinned) if pinned is not None else None,
        pending=names.get(pending_path, pending_path) if pending_path is not None else None,
        **common,
    )
