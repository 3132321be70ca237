"""Status reports: frozen session snapshots -> JSON-able dicts -> aligned plain text.

Pure functions, no I/O and no clock: every time comes from the snapshot's
own ``now``.  The running client or gateway answers the control socket's
``status`` request with :func:`client_status` / :func:`gateway_status`;
``jvpn-trio status --json`` prints that dict, and plain ``status`` prints
:func:`render_status_text` of it, so the text is always derived from exactly
what ``--json`` would show (and can be rendered from a saved JSON reply).

JSON safety and rounding
------------------------
Values are only dicts with string keys, lists, str, int, bool, None and
finite floats (None is preserved: "no sample yet" stays ``null``, never 0).
Floats are rounded so that reports are stable and readable:

* milliseconds (``*_ms``: RTT, jitter, ages of pending work): 1 decimal,
  0.1 ms, below what a probe can resolve;
* percentages (``loss_pct``): 1 decimal;
* seconds (``*_s``: the snapshot time, remaining time to a deadline, ages):
  3 decimals, i.e. to the millisecond;
* a verdict's ``measured`` / ``threshold`` (in the unit of the metric named
  by its reason: probes, ms or percent): 1 decimal.

A non-finite float becomes None, and -0.0 becomes 0.0.  Deadlines are shown
as time remaining from the snapshot's ``now`` (``*_in_s``, negative if
already past), since the driver's monotonic clock means nothing outside the
process.  Lists are in a stable order: paths by path id, sessions by
session id; dict keys are sorted when encoded.

Counters: the session machine's own counters appear as ``session.<name>``;
a driver's ``statistics`` record (any attrs instance, such as the client's
``ClientStatistics``) is flattened by :func:`statistics_counters`, and the
``counters`` mapping (such as ``event_sink.dropped_full``) is merged in under
its own keys.  A counter at zero is left out, so a report lists what
happened; a key that collides raises ValueError.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import attrs

from jvpn_trio.core.ids import Binding, PathId
from jvpn_trio.core.session import ClientSnapshot, GatewaySnapshot, PathSnapshot
from jvpn_trio.core.states import SessionState

#: Decimal places per unit (see the module docstring).
MS_DECIMALS = 1
PCT_DECIMALS = 1
S_DECIMALS = 3
MEASURE_DECIMALS = 1

#: Prefix of the session machine's counters in a report.
SESSION_COUNTER_PREFIX = "session."

_NONE_TEXT = "-"


def _round(value: float | None, decimals: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def _endpoint_text(endpoint: Sequence[Any]) -> str:
    host, port = endpoint[0], endpoint[1]
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _binding_text(binding: Binding | None) -> str | None:
    if binding is None:
        return None
    return f"{binding.path}@{_endpoint_text(binding.endpoint)}"


def _key_text(key: object) -> str:
    return key.name.lower() if isinstance(key, enum.Enum) else str(key)


def statistics_counters(statistics: object | None, *, prefix: str = "") -> dict[str, int]:
    """A statistics record (an attrs instance) as ``{counter name: value}``, zeros left out.

    An int field is one counter named after the field; a mapping field (counts
    by reason, say) is one counter per key, ``<field>_<key>``, an enum key
    giving its name in lower case.  Raises TypeError for anything else and
    ValueError if two names collide.
    """
    if statistics is None:
        return {}
    if not attrs.has(type(statistics)):
        raise TypeError(f"statistics must be an attrs record, got {type(statistics).__name__}")
    out: dict[str, int] = {}

    def add(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"statistics field {name!r} is not a count: {value!r}")
        if name in out:
            raise ValueError(f"counter {name!r} is reported twice")
        if value:
            out[name] = value

    for field, value in attrs.asdict(cast(attrs.AttrsInstance, statistics)).items():
        if isinstance(value, Mapping):
            for key, count in value.items():
                add(f"{prefix}{field}_{_key_text(key)}", count)
        else:
            add(f"{prefix}{field}", value)
    return out


def _merge_counters(core: Iterable[tuple[str, int]], *extras: Mapping[str, int] | None) -> dict[str, int]:
    merged = {f"{SESSION_COUNTER_PREFIX}{name}": int(value) for name, value in core}
    for extra in extras:
        for name, value in (extra or {}).items():
            if name in merged:
                raise ValueError(f"counter {name!r} is reported twice")
            merged[name] = int(value)
    return dict(sorted(merged.items()))


def _in_s(deadline: float | None, now: float) -> float | None:
    return None if deadline is None else _round(deadline - now, S_DECIMALS)


def _path_status(p: PathSnapshot, now: float, interfaces: Mapping[PathId, tuple[str, str]]) -> dict[str, Any]:
    stats = p.stats
    interface, kind = interfaces.get(p.path, (None, None))
    return {
        "path": str(p.path),
        "interface": interface,
        "kind": kind,
        "priority": p.priority,
        "endpoint": _endpoint_text(p.endpoint),
        "active": p.active,
        "pinned": p.pinned,
        "link_up": stats.link_up,
        "verdict": p.verdict.verdict.value,
        "reason": p.verdict.reason.value,
        "measured": _round(p.verdict.measured, MEASURE_DECIMALS),
        "threshold": _round(p.verdict.threshold, MEASURE_DECIMALS),
        "srtt_ms": _round(stats.srtt_ms, MS_DECIMALS),
        "jitter_ms": _round(stats.jitter_ms, MS_DECIMALS),
        "loss_pct": _round(stats.loss_pct, PCT_DECIMALS),
        "consecutive_missed": stats.consecutive_missed,
        "last_delivery_ago_s": (
            None if stats.last_delivery is None else _round(now - stats.last_delivery, S_DECIMALS)
        ),
    }


#: The client's ``state`` between two sessions of the agent (no session: a handshake is on its way).
CONNECTING = "CONNECTING"


def client_status(
    snapshot: ClientSnapshot | None,
    *,
    statistics: object | None = None,
    counters: Mapping[str, int] | None = None,
    sessions_started: int | None = None,
    interfaces: Mapping[PathId, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The client's status report (JSON-able).  Raises ValueError if a counter name collides.

    ``interfaces`` names each path's (interface, kind), as the runtime's path
    set has it now; a path missing there reports null for both.

    ``snapshot`` is None between sessions: ``session`` is then null and
    ``state`` is ``CONNECTING``.  ``sessions_started`` counts the agent's
    sessions (1 during the first; None: not reported).
    """
    started = {} if sessions_started is None else {"sessions_started": sessions_started}
    if snapshot is None:
        return {
            "role": "client",
            "session": None,
            "state": CONNECTING,
            **started,
            # The agent's paths exist between sessions too: no health yet, but which interfaces.
            "paths": [
                {"path": str(path), "interface": name, "kind": kind}
                for path, (name, kind) in sorted((interfaces or {}).items(), key=lambda item: item[0].value)
            ],
            "counters": _merge_counters((), statistics_counters(statistics), counters),
        }
    rec = snapshot.record
    now = snapshot.now
    pending = snapshot.pending
    return {
        "role": "client",
        "session": rec.session_id.hex,
        "state": rec.state.value,
        **started,
        "version": rec.version,
        "gateway_version": snapshot.gateway_version,
        "policy": snapshot.policy_fingerprint,
        "now_s": _round(now, S_DECIMALS),
        "session_age_s": _round(now - rec.created_at, S_DECIMALS),
        "binding": _binding_text(rec.binding),
        "active_path": str(rec.binding.path) if rec.binding is not None else None,
        "pinned_path": str(snapshot.pinned) if snapshot.pinned is not None else None,
        "pending_reattach": (
            None
            if pending is None
            else {
                "path": str(pending.path),
                "nonce": pending.nonce,
                "cause": pending.cause.value,
                "age_ms": _round((now - pending.sent_at) * 1000.0, MS_DECIMALS),
            }
        ),
        "switches_last_minute": snapshot.switches_last_minute,
        "max_switches_per_minute": snapshot.max_switches_per_minute,
        "recovery_deadline_in_s": _in_s(snapshot.recovery_deadline, now),
        "unbound_deadline_in_s": _in_s(snapshot.unbound_deadline, now),
        "paths": [_path_status(p, now, interfaces or {}) for p in sorted(snapshot.paths, key=lambda p: p.path)],
        "counters": _merge_counters(snapshot.counters, statistics_counters(statistics), counters),
    }


def _gateway_session_status(s: GatewaySnapshot) -> dict[str, Any]:
    rec = s.record
    return {
        "session": rec.session_id.hex,
        "state": rec.state.value,
        "version": rec.version,
        "binding": _binding_text(rec.binding),
        "policy": s.policy_fingerprint,
        "session_age_s": _round(s.now - rec.created_at, S_DECIMALS),
        "last_nonce": s.last_nonce,
        "last_delivery_ago_s": None if s.last_delivery is None else _round(s.now - s.last_delivery, S_DECIMALS),
        "switches_last_minute": s.switches_last_minute,
        "counters": _merge_counters(s.counters, None),
    }


def gateway_status(
    sessions: Sequence[GatewaySnapshot],
    *,
    node_id: str | None = None,
    statistics: object | None = None,
    counters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The gateway's status report: every session, per-state totals, summed counters.

    ``statistics`` is the runtime's statistics record, flattened as in
    :func:`statistics_counters`.  Raises ValueError if a counter name collides.
    """
    ordered = sorted(sessions, key=lambda s: s.record.session_id)
    states = {state.value: 0 for state in SessionState}
    summed: dict[str, int] = {}
    for s in ordered:
        states[s.record.state.value] += 1
        for name, value in s.counters:
            summed[name] = summed.get(name, 0) + value
    return {
        "role": "gateway",
        "node": node_id,
        "session_count": len(ordered),
        "states": {name: n for name, n in states.items() if n},
        "sessions": [_gateway_session_status(s) for s in ordered],
        "counters": _merge_counters(summed.items(), statistics_counters(statistics), counters),
    }


# -- text ------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return _NONE_TEXT
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fixed(value: Any, decimals: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _NONE_TEXT
    return f"{value:.{decimals}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _fields(pairs: Sequence[tuple[str, str]]) -> list[str]:
    if not pairs:
        return []
    width = max(len(k) for k, _ in pairs)
    return [f"  {k.ljust(width)}  {v}".rstrip() for k, v in pairs]


def _counter_lines(counters: Any) -> list[str]:
    if not isinstance(counters, dict) or not counters:
        return ["counters", "  (none)"]
    return ["counters", *_fields([(str(k), _text(v)) for k, v in sorted(counters.items())])]


def _seconds(value: Any) -> str:
    return _NONE_TEXT if value is None else f"{_fixed(value, S_DECIMALS)} s"


def _render_client(status: Mapping[str, Any]) -> list[str]:
    pending = status.get("pending_reattach")
    if isinstance(pending, dict):
        reattach = (
            f"{_text(pending.get('path'))} nonce {_text(pending.get('nonce'))}"
            f" ({_text(pending.get('cause'))}), sent {_fixed(pending.get('age_ms'), MS_DECIMALS)} ms ago"
        )
    else:
        reattach = _NONE_TEXT
    recovery = status.get("recovery_deadline_in_s")
    started = [("sessions", _text(status["sessions_started"]))] if "sessions_started" in status else []
    header = _fields(
        [
            ("session", _text(status.get("session"))),
            *started,
            (
                "state",
                f"{_text(status.get('state'))} (version {_text(status.get('version'))},"
                f" gateway version {_text(status.get('gateway_version'))})",
            ),
            ("binding", _text(status.get("binding"))),
            ("pinned", _text(status.get("pinned_path"))),
            (
                "switches",
                f"{_text(status.get('switches_last_minute'))} of {_text(status.get('max_switches_per_minute'))}"
                " allowed in the last minute",
            ),
            ("recovery", _NONE_TEXT if recovery is None else f"deadline in {_seconds(recovery)}"),
            ("reattach", reattach),
            ("age", _seconds(status.get("session_age_s"))),
            ("policy", _text(status.get("policy"))),
        ]
    )
    rows = []
    for p in status.get("paths") or []:
        flags = ",".join(name for name in ("active", "pinned") if p.get(name)) or _NONE_TEXT
        rows.append(
            [
                _text(p.get("path")),
                _text(p.get("priority")),
                _text(p.get("endpoint")),
                flags,
                "up" if p.get("link_up") else "down",
                _text(p.get("verdict")),
                _text(p.get("reason")),
                _fixed(p.get("srtt_ms"), MS_DECIMALS),
                _fixed(p.get("jitter_ms"), MS_DECIMALS),
                _fixed(p.get("loss_pct"), PCT_DECIMALS),
            ]
        )
    headers = ["PATH", "PRI", "ENDPOINT", "FLAGS", "LINK", "VERDICT", "REASON", "SRTT ms", "JITTER ms", "LOSS %"]
    table = _table(headers, rows, frozenset({1, 7, 8, 9})) if rows else ["(no paths)"]
    return ["jvpn-trio client", *header, "", *table, "", *_counter_lines(status.get("counters"))]


def _render_gateway(status: Mapping[str, Any]) -> list[str]:
    states = status.get("states")
    breakdown = ""
    if isinstance(states, dict) and states:
        order = [s.value for s in SessionState]
        known = sorted(states, key=lambda name: (order.index(name) if name in order else len(order), name))
        breakdown = " (" + ", ".join(f"{name} {states[name]}" for name in known) + ")"
    header = _fields(
        [
            ("node", _text(status.get("node"))),
            ("sessions", f"{_text(status.get('session_count'))}{breakdown}"),
        ]
    )
    rows = [
        [
            _text(s.get("session")),
            _text(s.get("state")),
            _text(s.get("version")),
            _text(s.get("binding")),
            _text(s.get("last_nonce")),
            _text(s.get("switches_last_minute")),
            _fixed(s.get("last_delivery_ago_s"), S_DECIMALS),
        ]
        for s in status.get("sessions") or []
    ]
    headers = ["SESSION", "STATE", "VER", "BINDING", "NONCE", "SWITCHES/MIN", "LAST DELIVERY s AGO"]
    table = _table(headers, rows, frozenset({2, 4, 5, 6})) if rows else ["(no sessions)"]
    return ["jvpn-trio gateway", *header, "", *table, "", *_counter_lines(status.get("counters"))]


def render_status_text(status: Mapping[str, Any]) -> str:
    """A compact, aligned plain-text view of a status report (no trailing newline).

    Works on the dict as built or as decoded from ``--json``; missing values
    show as ``-``.  An unknown ``role`` is shown as sorted ``key value`` lines.
    """
    role = status.get("role")
    if role == "client":
        lines = _render_client(status)
    elif role == "gateway":
        lines = _render_gateway(status)
    else:
        lines = [f"jvpn-trio {_text(role)}", *_fields([(str(k), _text(v)) for k, v in sorted(status.items())])]
    return "\n".join(lines)


__all__ = [
    "CONNECTING",
    "MEASURE_DECIMALS",
    "MS_DECIMALS",
    "PCT_DECIMALS",
    "SESSION_COUNTER_PREFIX",
    "S_DECIMALS",
    "client_status",
    "gateway_status",
    "render_status_text",
    "statistics_counters",
]
