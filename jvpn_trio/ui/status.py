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

import base64
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import attrs

from jvpn_trio.core.agent import HOLD_PEER_REASONS
from jvpn_trio.core.ids import Binding, PathId
from jvpn_trio.core.session import ClientSnapshot, GatewaySnapshot, PathSnapshot
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.gateway import PeerStatus

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
        "metered": p.metered,
        "probing": p.probe_role,
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
#: The client's ``state`` while its agent holds (no session, and none starts until a reconnect), by why.
HELD_STATES: Mapping[ReasonCode, str] = {
    ReasonCode.OPERATOR_DISCONNECT: "DISCONNECTED",
    ReasonCode.SESSION_REPLACED: "REPLACED",
}
#: What ``held_because`` says for each hold.
HELD_TEXTS: Mapping[ReasonCode, str] = {
    ReasonCode.OPERATOR_DISCONNECT: "disconnected by an operator",
    **HOLD_PEER_REASONS,
}


def client_status(
    snapshot: ClientSnapshot | None,
    *,
    statistics: object | None = None,
    counters: Mapping[str, int] | None = None,
    sessions_started: int | None = None,
    interfaces: Mapping[PathId, tuple[str, str]] | None = None,
    tunnel_address: str | None = None,
    tunnel_address6: str | None = None,
    held: ReasonCode | None = None,
) -> dict[str, Any]:
    """The client's status report (JSON-able).  Raises ValueError if a counter name collides.

    ``interfaces`` names each path's (interface, kind), as the runtime's path
    set has it now; a path missing there reports null for both.
    ``tunnel_address`` / ``tunnel_address6``: the addresses the handshake gave
    the TUN (``RuntimeStatus.tunnel_address``, ``"10.66.0.2/24"``); null if unknown.

    ``snapshot`` is None between sessions: ``session`` is then null and
    ``state`` is ``CONNECTING``, or, while the agent holds (``held``, its
    ``ClientAgent.held_reason``), the state :data:`HELD_STATES` names, with
    ``held`` (the reason) and ``held_because`` (:data:`HELD_TEXTS`) added.
    ``sessions_started`` counts the agent's sessions (1 during the first; None: not reported).
    """
    started = {} if sessions_started is None else {"sessions_started": sessions_started}
    tunnel = {"tunnel_address": tunnel_address, "tunnel_address6": tunnel_address6}
    if snapshot is None:
        holding = (
            {"held": held.value, "held_because": HELD_TEXTS.get(held, held.value)} if held is not None else {}
        )
        return {
            "role": "client",
            "session": None,
            "state": HELD_STATES.get(held, CONNECTING) if held is not None else CONNECTING,
            **holding,
            **started,
            **tunnel,
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
        **tunnel,
        "version": rec.version,
        "gateway_version": snapshot.gateway_version,
        "owner_epoch": snapshot.owner_epoch,  # the fencing epoch of the gateway that owns it (docs/cluster.md)
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


def _gateway_session_status(s: GatewaySnapshot, peer: PeerStatus | None) -> dict[str, Any]:
    rec = s.record
    binding = rec.binding
    return {
        "session": rec.session_id.hex,
        "state": rec.state.value,
        "version": rec.version,
        "binding": _binding_text(binding),
        "path": str(binding.path) if binding is not None else None,
        "endpoint": _endpoint_text(binding.endpoint) if binding is not None else None,
        "policy": s.policy_fingerprint,
        "session_age_s": _round(s.now - rec.created_at, S_DECIMALS),
        "last_nonce": s.last_nonce,
        "last_delivery_ago_s": None if s.last_delivery is None else _round(s.now - s.last_delivery, S_DECIMALS),
        "switches_last_minute": s.switches_last_minute,
        "counters": _merge_counters(s.counters, None),
        # Who the session belongs to and what it carried: null when the runtime did not say.
        "peer": peer.name if peer is not None else None,
        "public_key": base64.b64encode(peer.public_key).decode("ascii") if peer is not None else None,
        "tunnel_ipv4": str(peer.address) if peer is not None else None,
        "tunnel_ipv6": str(peer.address6) if peer is not None and peer.address6 is not None else None,
        "last_handshake_ago_s": (
            None if peer is None or peer.last_handshake is None else _round(s.now - peer.last_handshake, S_DECIMALS)
        ),
        "rx_bytes": peer.rx_bytes if peer is not None else None,
        "tx_bytes": peer.tx_bytes if peer is not None else None,
        "rx_packets": peer.rx_packets if peer is not None else None,
        "tx_packets": peer.tx_packets if peer is not None else None,
    }


def gateway_status(
    sessions: Sequence[GatewaySnapshot | PeerStatus],
    *,
    node_id: str | None = None,
    statistics: object | None = None,
    counters: Mapping[str, int] | None = None,
    tunnel_address: str | None = None,
    tunnel_address6: str | None = None,
) -> dict[str, Any]:
    """The gateway's status report: every session, per-state totals, summed counters.

    ``sessions`` are the runtime's :class:`~jvpn_trio.drivers.gateway.PeerStatus`
    records (``GatewayStatus.peers``), or bare snapshots, whose peer fields
    (``peer``, ``tunnel_ipv4``, ``rx_bytes``, ...) are then null.  ``now_s`` is
    the snapshots' time on the gateway's clock (null without sessions).
    ``statistics`` is the runtime's statistics record, flattened as in
    :func:`statistics_counters`.  Raises ValueError if a counter name collides.
    """
    pairs = [(s.snapshot, s) if isinstance(s, PeerStatus) else (s, None) for s in sessions]
    ordered = sorted(pairs, key=lambda pair: pair[0].record.session_id)
    states = {state.value: 0 for state in SessionState}
    summed: dict[str, int] = {}
    for snap, _ in ordered:
        states[snap.record.state.value] += 1
        for name, value in snap.counters:
            summed[name] = summed.get(name, 0) + value
    return {
        "role": "gateway",
        "node": node_id,
        "now_s": _round(max(snap.now for snap, _ in ordered), S_DECIMALS) if ordered else None,
        "tunnel_address": tunnel_address,
        "tunnel_address6": tunnel_address6,
        "session_count": len(ordered),
        "states": {name: n for name, n in states.items() if n},
        "sessions": [_gateway_session_status(snap, peer) for snap, peer in ordered],
        "counters": _merge_counters(summed.items(), statistics_counters(statistics), counters),
    }


# -- text ------------------------------------------------------------------------
#
# Laid out like ``wg show``: a header block for the node, then one block per path
# (client) or per peer (gateway), each a "name: value" line per field, values
# aligned.  The renderer reads the reply as untrusted JSON from any version: a
# missing key, null or a value of the wrong type prints as "-"; it never raises.

#: Byte units as ``wg show`` prints them (binary prefixes, two decimals from KiB up).
BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_TIME_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
_INDENT = "  "


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a reply cannot break a line or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _text(value: Any) -> str:
    if value is None:
        return _NONE_TEXT
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return _NONE_TEXT
    return _printable(str(value))


def _number(value: Any) -> float | None:
    """A finite number from the reply, or None for anything else (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value) if isinstance(value, float) else value
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _fixed(value: Any, decimals: int, unit: str = "") -> str:
    number = _number(value)
    return _NONE_TEXT if number is None else f"{number:.{decimals}f}{unit}"


def _bytes(value: Any) -> str:
    """``1.21 KiB`` as ``wg show`` writes transfer counts."""
    number = _number(value)
    if number is None or number < 0:
        return _NONE_TEXT
    if number < 1024:
        return f"{int(number)} B"
    scaled = float(number)
    for unit in BYTE_UNITS:
        scaled /= 1024.0
        if scaled < 1024.0 or unit == BYTE_UNITS[-1]:
            break
    return f"{scaled:.2f} {unit}"


def _duration(value: Any) -> str:
    """``250 ms`` below a second, else ``1 minute, 3 seconds`` (whole units, as ``wg show``)."""
    number = _number(value)
    if number is None:
        return _NONE_TEXT
    if number < 1.0:  # a negative age (another host's clock, a hand-edited reply) shows as 0 ms
        return f"{min(round(max(number, 0.0) * 1000.0), 999)} ms"
    remaining = int(number)  # whole units below, as wg rounds down
    parts = []
    for name, size in _TIME_UNITS:
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return ", ".join(parts)


def _ago(value: Any) -> str:
    text = _duration(value)
    return text if text == _NONE_TEXT else f"{text} ago"


def _transfer(received: Any, sent: Any) -> str:
    if _number(received) is None and _number(sent) is None:
        return _NONE_TEXT
    return f"{_bytes(received)} received, {_bytes(sent)} sent"


def _addresses(*values: Any) -> str:
    present = [_text(v) for v in values if v is not None]
    return ", ".join(present) if present else _NONE_TEXT


Block = tuple[str, list[tuple[str, str]]]  # (title line, [(key, value)])


def _blocks(blocks: Sequence[Block]) -> list[str]:
    """Blocks separated by a blank line, every value in the document starting in one column."""
    width = max((len(key) for _, pairs in blocks for key, _ in pairs), default=0) + 1
    lines: list[str] = []
    for title, pairs in blocks:
        if lines:
            lines.append("")
        lines.append(title)
        lines.extend(f"{_INDENT}{(key + ':').ljust(width)} {value}".rstrip() for key, value in pairs)
    return lines


def _counter_lines(counters: Any) -> list[str]:
    if not isinstance(counters, Mapping) or not counters:
        return ["counters:", f"{_INDENT}(none)"]
    names = sorted(_text(k) for k in counters)
    width = max(len(k) for k in names) + 1
    values = {_text(k): v for k, v in counters.items()}
    return ["counters:", *(f"{_INDENT}{(k + ':').ljust(width)} {_text(values[k])}" for k in names)]


def _with_versions(state: Any, version: Any, gateway_version: Any = None) -> str:
    """``ATTACHED (version 3, gateway version 3)``; without versions (between sessions) the state alone."""
    versions = [f"version {_text(version)}"] if version is not None else []
    if gateway_version is not None:
        versions.append(f"gateway version {_text(gateway_version)}")
    return _text(state) + (f" ({', '.join(versions)})" if versions else "")


def _switches(done: Any, allowed: Any = None) -> str:
    if done is None:
        return _NONE_TEXT
    limit = "" if allowed is None else f" of {_text(allowed)} allowed"
    return f"{_text(done)}{limit} in the last minute"


def _client_header(status: Mapping[str, Any]) -> Block:
    pending = status.get("pending_reattach")
    if isinstance(pending, Mapping):
        reattach = (
            f"{_text(pending.get('path'))} nonce {_text(pending.get('nonce'))}"
            f" ({_text(pending.get('cause'))}), sent {_duration(_ms_to_s(pending.get('age_ms')))} ago"
        )
    else:
        reattach = _NONE_TEXT
    recovery = _number(status.get("recovery_deadline_in_s"))
    counters = status.get("counters")
    transfer = (
        _transfer(counters.get("rx_bytes", 0), counters.get("tx_bytes", 0))  # a counter at zero is left out
        if isinstance(counters, Mapping)
        else _NONE_TEXT
    )
    pairs = [
        ("state", _with_versions(status.get("state"), status.get("version"), status.get("gateway_version"))),
        *([("held", f"{_text(status.get('held_because'))} ({_text(status.get('held'))})")] if status.get("held") else []),
        ("tunnel", _addresses(status.get("tunnel_address"), status.get("tunnel_address6"))),
        ("sessions started", _text(status.get("sessions_started"))),
        ("binding", _text(status.get("binding"))),
        ("pinned", _text(status.get("pinned_path"))),
        ("switches", _switches(status.get("switches_last_minute"), status.get("max_switches_per_minute"))),
        ("recovery", _NONE_TEXT if recovery is None else f"deadline in {_duration(recovery)}"),
        ("reattach", reattach),
        ("session age", _duration(status.get("session_age_s"))),
        ("transfer", transfer),
        ("policy", _text(status.get("policy"))),
    ]  # fmt: skip
    return f"client: {_text(status.get('session'))}", pairs


def _ms_to_s(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else number / 1000.0


def _client_path(p: Mapping[str, Any]) -> Block:
    flags = [name for name in ("active", "pinned") if p.get(name) is True]
    title = f"path: {_text(p.get('path'))}" + (f" ({', '.join(flags)})" if flags else "")
    kind = p.get("kind")
    interface = _text(p.get("interface")) + ("" if kind is None else f" ({_text(kind)})")
    link = p.get("link_up")
    verdict = _text(p.get("verdict"))
    if p.get("reason") is not None:
        verdict += f", {_text(p.get('reason'))}"
    measured, threshold = _number(p.get("measured")), _number(p.get("threshold"))
    if measured is not None or threshold is not None:
        verdict += f" (measured {_fixed(measured, MEASURE_DECIMALS)}, threshold {_fixed(threshold, MEASURE_DECIMALS)})"
    jitter = _number(p.get("jitter_ms"))
    missed = _number(p.get("consecutive_missed"))
    loss = _fixed(p.get("loss_pct"), PCT_DECIMALS, "%")
    if missed:
        loss += f" ({_text(p.get('consecutive_missed'))} missed in a row)"
    probing = _text(p.get("probing"))
    if p.get("metered") is True:
        probing += " (metered)"
    pairs = [
        ("interface", interface),
        ("endpoint", _text(p.get("endpoint"))),
        ("priority", _text(p.get("priority"))),
        ("probing", probing),
        ("link", _NONE_TEXT if not isinstance(link, bool) else ("up" if link else "down")),
        ("verdict", verdict),
        ("rtt", _fixed(p.get("srtt_ms"), MS_DECIMALS, " ms")
                + ("" if jitter is None else f" (jitter {_fixed(jitter, MS_DECIMALS, ' ms')})")),
        ("loss", loss),
        ("last answer", _ago(p.get("last_delivery_ago_s"))),
    ]  # fmt: skip
    return title, pairs


def _render_client(status: Mapping[str, Any]) -> list[str]:
    paths = sorted(_mappings(status.get("paths")), key=lambda p: _text(p.get("path")))
    blocks = [_client_header(status), *(_client_path(p) for p in paths)]
    return [*_blocks(blocks), "", *_counter_lines(status.get("counters"))]


def _state_breakdown(states: Any) -> str:
    if not isinstance(states, Mapping) or not states:
        return ""
    order = [s.value for s in SessionState]
    names = sorted((_text(k) for k in states), key=lambda n: (order.index(n) if n in order else len(order), n))
    values = {_text(k): v for k, v in states.items()}
    return " (" + ", ".join(f"{name} {_text(values[name])}" for name in names) + ")"


def _gateway_peer(s: Mapping[str, Any]) -> Block:
    endpoint = _text(s.get("endpoint"))
    if s.get("path") is not None:
        endpoint += f" via {_text(s.get('path'))}"
    pairs = [
        ("session", _text(s.get("session"))),
        ("public key", _text(s.get("public_key"))),
        ("tunnel", _addresses(s.get("tunnel_ipv4"), s.get("tunnel_ipv6"))),
        ("endpoint", endpoint),
        ("state", _with_versions(s.get("state"), s.get("version"))),
        ("latest handshake", _ago(s.get("last_handshake_ago_s"))),
        ("transfer", _transfer(s.get("rx_bytes"), s.get("tx_bytes"))),
        ("last packet", _ago(s.get("last_delivery_ago_s"))),
        ("switches", _switches(s.get("switches_last_minute"))),
        ("session age", _duration(s.get("session_age_s"))),
        ("policy", _text(s.get("policy"))),
    ]
    return f"peer: {_text(s.get('peer'))}", pairs


def _render_gateway(status: Mapping[str, Any]) -> list[str]:
    header = [
        ("tunnel", _addresses(status.get("tunnel_address"), status.get("tunnel_address6"))),
        ("sessions", f"{_text(status.get('session_count'))}{_state_breakdown(status.get('states'))}"),
    ]
    # One block per peer, by name (then session: a replaced session may linger for a moment).
    sessions = sorted(
        _mappings(status.get("sessions")), key=lambda s: (_text(s.get("peer")), _text(s.get("session")))
    )
    blocks = [(f"gateway: {_text(status.get('node'))}", header), *(_gateway_peer(s) for s in sessions)]
    return [*_blocks(blocks), "", *_counter_lines(status.get("counters"))]


def render_status_text(status: Mapping[str, Any]) -> str:
    """A ``wg show``-like plain-text view of a status report (no trailing newline).

    Works on the dict as built or as decoded from ``--json``, from this
    version or another: missing or malformed values show as ``-`` and never
    raise.  An unknown ``role`` is shown as its sorted ``key: value`` lines.
    """
    role = status.get("role")
    if role == "client":
        lines = _render_client(status)
    elif role == "gateway":
        lines = _render_gateway(status)
    else:
        fields = sorted((_text(k), _text(v)) for k, v in status.items())
        lines = _blocks([(f"{_text(role)}:", fields)])
    return "\n".join(lines)


__all__ = [
    "BYTE_UNITS",
    "CONNECTING",
    "HELD_STATES",
    "HELD_TEXTS",
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
