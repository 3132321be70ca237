"""The policy: every bound, threshold, interval and window the system uses.

Spec section 8 requires MaxRecoveryWindowMs, MaxSwitchesPerMinute,
TransportLossTTL, SessionTTL and loss/latency/jitter thresholds, and requires
the policy to be deterministic and reproducible.  So: one frozen record,
validated field by field at construction and across fields in
``__attrs_post_init__``, with units in every name, and a fingerprint (a hash
of its canonical form) that every event carries, so a recorded run can be
replayed under exactly the policy that produced it.

Nothing else in the code base holds a threshold: if a number decides
behaviour, it is a field here or a named protocol constant in ``wire.py``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from jvpn_trio.core.bounds import IntRange, NumberRange, int_range, number_range

#: Property 6 counts switches "per minute": the rate window is that minute.
SWITCH_RATE_WINDOW_S = 60.0
#: A datapath reports traffic this many times per ``silence_probe_after_ms`` at most, so a
#: silence is seen at most a quarter of the threshold late.
TRAFFIC_REPORTS_PER_SILENCE = 4


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the field and the problem."""


def _int_range(lo: int, hi: int, *, why: str = "") -> IntRange:
    """``lo..hi`` inclusive (core/bounds.py), raising PolicyError; ``why`` says what a value beyond breaks."""
    return int_range(lo, hi, why=why, error=PolicyError)


def _float_range(lo: float, hi: float) -> NumberRange:
    """A number in ``lo..hi`` inclusive (core/bounds.py), raising PolicyError."""
    return number_range(lo, hi, error=PolicyError)


def _is_bool(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise PolicyError(f"{attribute.name}: expected true or false, got {value!r}")


def _to_float(value: object) -> object:
    # TOML integers are fine where a float is expected; anything else (and an integer too large
    # for a float) is left for the validator to reject with a clear message.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return value
    return value


DAY_S = 86_400
HOUR_MS = 3_600_000
#: The largest probe timeout, and so (latency and jitter must stay under it) the bound of those thresholds.
MAX_PROBE_TIMEOUT_MS = 60_000
#: The least round trip a handshake must be given on a real path (docs/policy.md, "Minimums"):
#: Wi-Fi power save holds a reply for up to a beacon interval (~100 ms) and an LTE radio waking
#: from idle needs ~100 ms before its first packet moves.  A retry sooner than the reply abandons
#: every initiation: the client sprays them and the gateway builds a session for each.
MIN_HANDSHAKE_RETRY_MS = 100
#: The least freshness window (docs/policy.md, "Minimums"): after a resume the two session clocks
#: may differ by the kernel's suspend measurement error, up to about 1 s (docs/spec.md, R4 and
#: "Freshness across a suspend"); a narrower window refuses the REATTACH that follows a suspend.
MIN_FRESHNESS_WINDOW_MS = 1_000


#: The laptop default of ``silence_probe_after_ms`` (typed so that None stays allowed).
_SILENCE_PROBE_AFTER_MS: int | None = 30


#: What a field shorter than the slowest round trip a live path may have (probe_timeout_ms) breaks.
_TOO_SHORT_FOR_A_ROUND_TRIP = {
    "handshake_retry_ms": "a path the policy calls alive could never answer an initiation before the next replaces it",
    "freshness_window_ms": "a REATTACH from a path the policy calls alive could arrive already stale",
}


@attrs.frozen(kw_only=True)
class Policy:
    """All bounds of a session.  Defaults are the documented laptop policy (docs/policy.md)."""

    # -- spec section 8 ------------------------------------------------------
    #: At least 2: reattach_timeout_ms (>= 1) must fit under it.
    max_recovery_window_ms: int = attrs.field(default=3_000, validator=_int_range(2, HOUR_MS))
    max_switches_per_minute: int = attrs.field(default=6, validator=_int_range(1, 600))
    #: At least 2: two probe intervals (each >= 1) must fit in it.
    transport_loss_ttl_ms: int = attrs.field(default=30_000, validator=_int_range(2, HOUR_MS))
    session_ttl_s: int = attrs.field(default=43_200, validator=_int_range(1, 30 * DAY_S))
    loss_threshold_pct: float = attrs.field(
        default=10.0, converter=_to_float, validator=_float_range(0.1, 100.0)
    )
    #: Latency and jitter thresholds stay under probe_timeout_ms, so under its largest value.
    latency_threshold_ms: float = attrs.field(
        default=150.0, converter=_to_float, validator=_float_range(0.1, MAX_PROBE_TIMEOUT_MS - 1.0)
    )
    jitter_threshold_ms: float = attrs.field(
        default=50.0, converter=_to_float, validator=_float_range(0.1, MAX_PROBE_TIMEOUT_MS - 1.0)
    )
    # -- probing and health ----------------------------------------------------
    #: The active path's cadence (and every path's while the session is not ATTACHED).
    probe_interval_ms: int = attrs.field(default=50, validator=_int_range(1, 60_000))
    #: An unmetered standby path's cadence while the session is ATTACHED: a backup costs little until needed.
    standby_probe_interval_ms: int = attrs.field(default=1_000, validator=_int_range(1, 600_000))
    #: A metered standby path's cadence while the session is ATTACHED (slower still: its bytes cost money).
    metered_probe_interval_ms: int = attrs.field(default=10_000, validator=_int_range(1, 600_000))
    #: No data either way this long and the bound path is probed at its standby cadence too; the
    #: next packet makes it due at once (detection is fast again from the first packet on).
    idle_after_ms: int = attrs.field(default=5_000, validator=_int_range(1, HOUR_MS))
    probe_timeout_ms: int = attrs.field(default=200, validator=_int_range(1, MAX_PROBE_TIMEOUT_MS))
    #: Adaptive probe timeout (RFC 6298-style: srtt + 4 x jitter), never below this nor above
    #: probe_timeout_ms.  Absent (the default): a fixed probe_timeout_ms, because Wi-Fi power
    #: save can hold replies ~100 ms, which an eager timeout would count as loss.
    probe_timeout_floor_ms: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_int_range(1, MAX_PROBE_TIMEOUT_MS))
    )
    #: The bound path has carried our data and returned nothing authenticated this long (or its
    #: srtt + 4 x jitter, if longer): it is *silent*, and is probed every silence-probe timeout until
    #: it answers; dead_after_missed_probes of those unanswered make it IMPAIRED (DATA_UNANSWERED).
    #: A path that sends is awake (no Wi-Fi power save to wait out), so data left unanswered is
    #: evidence that a quiet path's probes cannot give.  Absent: only the cadence.
    silence_probe_after_ms: int | None = attrs.field(
        default=_SILENCE_PROBE_AFTER_MS, validator=attrs.validators.optional(_int_range(1, MAX_PROBE_TIMEOUT_MS))
    )
    #: The least time a probe on a silent path has before it counts as unanswered (srtt + 4 x jitter
    #: above it, at most probe_timeout_ms); it still counts as lost only at its ordinary deadline.
    silence_probe_timeout_floor_ms: int = attrs.field(default=20, validator=_int_range(1, MAX_PROBE_TIMEOUT_MS))
    #: Leave a silent path (DATA_UNANSWERED) only for one that answered a probe sent since the
    #: silence alarm, and only once the silent path has had its silence-probe timeout since that
    #: answer to answer too: a gateway that stalls silences every path alike (docs/policy.md,
    #: "Second opinion").  False: leave for any HEALTHY path at once.
    silence_second_opinion: bool = attrs.field(default=True, validator=_is_bool)
    dead_after_missed_probes: int = attrs.field(default=3, validator=_int_range(1, 1_000))
    loss_window_probes: int = attrs.field(default=20, validator=_int_range(2, 10_000))
    # -- hysteresis ------------------------------------------------------------
    healthy_below_fraction: float = attrs.field(
        default=0.8, converter=_to_float, validator=_float_range(0.05, 1.0)
    )
    min_dwell_ms: int = attrs.field(default=2_000, validator=_int_range(0, HOUR_MS))
    return_dwell_ms: int = attrs.field(default=5_000, validator=_int_range(0, HOUR_MS))
    # -- reattach and anti-replay ------------------------------------------------
    reattach_timeout_ms: int = attrs.field(default=250, validator=_int_range(1, 60_000))
    freshness_window_ms: int = attrs.field(
        default=5_000,
        validator=_int_range(
            MIN_FRESHNESS_WINDOW_MS, HOUR_MS, why="a narrower window refuses the REATTACH after a suspend"
        ),
    )
    replay_window_packets: int = attrs.field(default=8_192, validator=_int_range(2_048, 1 << 20))
    #: How long an address that proved it reaches the client (it answered a PATH_CHALLENGE, or
    #: was the binding) may take the binding back without a new challenge; 0: only the bound one.
    path_validation_cache_ms: int = attrs.field(default=30_000, validator=_int_range(0, HOUR_MS))
    # -- handshake and key rotation (WireGuard's timers, made policy) ----------
    handshake_retry_ms: int = attrs.field(
        default=1_000,
        validator=_int_range(
            MIN_HANDSHAKE_RETRY_MS, 60_000, why="a sooner retry abandons initiations a real path would answer"
        ),
    )
    #: Under reject_after_s, so at most a day less a second.
    rekey_after_s: int = attrs.field(default=120, validator=_int_range(1, DAY_S - 1))
    #: Above rekey_after_s, so at least 2.
    reject_after_s: int = attrs.field(default=180, validator=_int_range(2, DAY_S))
    rekey_after_messages: int = attrs.field(default=1 << 60, validator=_int_range(1, 1 << 62))
    reject_after_messages: int = attrs.field(
        default=(1 << 64) - (1 << 13) - 1, validator=_int_range(2, (1 << 64) - 1)
    )
    # -- the agent: a new session after one ends (core/agent.py) ----------------
    #: First wait before a new handshake once a session has ended; doubles per failure.
    reconnect_initial_ms: int = attrs.field(default=250, validator=_int_range(1, 60_000))
    #: The longest wait between handshakes while the gateway cannot be reached.
    reconnect_max_ms: int = attrs.field(default=10_000, validator=_int_range(1, HOUR_MS))

    def __attrs_post_init__(self) -> None:
        problems = list(self._inconsistencies())
        if problems:
            raise PolicyError("; ".join(problems))

    def _inconsistencies(self) -> Iterator[str]:
        if self.transport_loss_ttl_ms < 2 * self.probe_interval_ms:
            yield (
                f"transport_loss_ttl_ms ({self.transport_loss_ttl_ms}) is under two probe intervals "
                f"({2 * self.probe_interval_ms}): a healthy path would be declared dead between probes"
            )
        detect_ms = self.death_detection_bound_ms
        if detect_ms > self.transport_loss_ttl_ms:
            yield (
                f"dead_after_missed_probes x probe_interval_ms + probe_timeout_ms ({detect_ms}) exceeds "
                f"transport_loss_ttl_ms ({self.transport_loss_ttl_ms}): probing could not detect death in time"
            )
        if self.standby_probe_interval_ms > self.metered_probe_interval_ms:
            yield (
                f"standby_probe_interval_ms ({self.standby_probe_interval_ms}) exceeds metered_probe_interval_ms "
                f"({self.metered_probe_interval_ms}): a metered path would be probed more often than a free one"
            )
        if self.probe_timeout_floor_ms is not None and self.probe_timeout_floor_ms > self.probe_timeout_ms:
            yield (
                f"probe_timeout_floor_ms ({self.probe_timeout_floor_ms}) exceeds probe_timeout_ms "
                f"({self.probe_timeout_ms})"
            )
        if self.silence_probe_timeout_floor_ms > self.probe_timeout_ms:
            yield (
                f"silence_probe_timeout_floor_ms ({self.silence_probe_timeout_floor_ms}) exceeds probe_timeout_ms "
                f"({self.probe_timeout_ms})"
            )
        for name in ("latency_threshold_ms", "jitter_threshold_ms"):
            if getattr(self, name) >= self.probe_timeout_ms:
                yield (
                    f"{name} ({getattr(self, name)}) must be under probe_timeout_ms ({self.probe_timeout_ms}): "
                    "a reply that slow is already counted as lost, so the threshold could never fire"
                )
        if self.max_recovery_window_ms > self.transport_loss_ttl_ms:
            yield (
                f"max_recovery_window_ms ({self.max_recovery_window_ms}) exceeds transport_loss_ttl_ms "
                f"({self.transport_loss_ttl_ms}): DEGRADED could never be reached before termination"
            )
        for name in ("handshake_retry_ms", "freshness_window_ms"):
            if getattr(self, name) < self.probe_timeout_ms:
                yield (
                    f"{name} ({getattr(self, name)}) is under probe_timeout_ms ({self.probe_timeout_ms}): "
                    f"{_TOO_SHORT_FOR_A_ROUND_TRIP[name]}"
                )
        if self.reattach_timeout_ms >= self.max_recovery_window_ms:
            yield (
                f"reattach_timeout_ms ({self.reattach_timeout_ms}) must be under max_recovery_window_ms "
                f"({self.max_recovery_window_ms}) so recovery can try at least once"
            )
        if self.session_ttl_s * 1000 <= self.transport_loss_ttl_ms:
            yield "session_ttl_s must be longer than transport_loss_ttl_ms"
        if self.rekey_after_s >= self.reject_after_s:
            yield f"rekey_after_s ({self.rekey_after_s}) must be under reject_after_s ({self.reject_after_s})"
        if self.rekey_after_messages >= self.reject_after_messages:
            yield "rekey_after_messages must be under reject_after_messages"
        if self.loss_window_probes < self.dead_after_missed_probes:
            yield "loss_window_probes must be at least dead_after_missed_probes"
        if self.reconnect_initial_ms > self.reconnect_max_ms:
            yield f"reconnect_initial_ms ({self.reconnect_initial_ms}) exceeds reconnect_max_ms ({self.reconnect_max_ms})"
        if self.replay_window_packets % 64:
            yield f"replay_window_packets ({self.replay_window_packets}) must be a multiple of 64"

    # -- derived values (seconds, for the core's float clock) ------------------
    @property
    def death_detection_bound_ms(self) -> int:
        """Worst case from the last delivered probe until MISSED_PROBES fires."""
        return self.dead_after_missed_probes * self.probe_interval_ms + self.probe_timeout_ms

    @property
    def standby_probe_ms(self) -> int:
        """The unmetered standby cadence in effect: never faster than the active one, never slower than half
        ``transport_loss_ttl_ms`` (so a healthy path is never declared dead between its probes)."""
        return max(self.probe_interval_ms, min(self.standby_probe_interval_ms, self.transport_loss_ttl_ms // 2))

    @property
    def idle_ms(self) -> int:
        """When the tunnel counts as idle in effect: ``idle_after_ms``, but never before the death
        detection bound, so that one packet after a quiet spell keeps the full cadence long enough
        to see a dead path."""
        return max(self.idle_after_ms, self.death_detection_bound_ms)

    @property
    def metered_probe_ms(self) -> int:
        """The metered standby cadence in effect: as :attr:`standby_probe_ms`, and never faster than it."""
        return max(self.standby_probe_ms, min(self.metered_probe_interval_ms, self.transport_loss_ttl_ms // 2))

    @property
    def traffic_report_ms(self) -> float:
        """How often at most a datapath tells the core that data went out or came in on a path: the active
        cadence, or finer when silence probing is on, so that a silence is seen within a fraction of it."""
        if self.silence_probe_after_ms is None:
            return float(self.probe_interval_ms)
        return min(float(self.probe_interval_ms), self.silence_probe_after_ms / TRAFFIC_REPORTS_PER_SILENCE)

    @property
    def probe_spacing_ms(self) -> int:
        """The shortest gap between two probes on one path that the core can ask for."""
        if self.silence_probe_after_ms is None:
            return self.probe_interval_ms
        return min(self.probe_interval_ms, self.silence_probe_timeout_floor_ms)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON form: names the policy in every event.

        Computed once per policy (every event and snapshot asks for it).
        """
        return _fingerprint(self)

    def to_mapping(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """Build from a parsed mapping (a TOML ``[policy]`` table); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy must be a table, got {type(data).__name__}")
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except TypeError as exc:  # attrs raises TypeError for a bad call shape
            raise PolicyError(str(exc)) from exc

    @classmethod
    def from_recording(cls, data: Mapping[str, Any]) -> Policy:
        """Build the policy a recording was made under: a field added since it was written takes the
        value that behaves as the code did then, not today's default."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy must be a table, got {type(data).__name__}")
        return cls.from_mapping({**{k: v for k, v in _AS_BEFORE.items() if k not in data}, **data})


#: Fields added after policies were first recorded, with the value that gives the behaviour from
#: before they existed.  A recording that lacks one is replayed with that value
#: (:meth:`Policy.from_recording`), and the fingerprint leaves the field out while it holds it, so a
#: recorded policy keeps its name.
_AS_BEFORE: dict[str, Any] = {
    "standby_probe_interval_ms": 1_000,
    "metered_probe_interval_ms": 10_000,
    "idle_after_ms": 5_000,
    "path_validation_cache_ms": 30_000,
    "silence_probe_after_ms": None,
    "silence_probe_timeout_floor_ms": 20,
    "silence_second_opinion": False,
}


@functools.lru_cache(maxsize=256)
def _fingerprint(policy: Policy) -> str:
    mapping = {k: v for k, v in policy.to_mapping().items() if k not in _AS_BEFORE or _AS_BEFORE[k] != v}
    blob = json.dumps(mapping, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

#: The documented laptop default (docs/policy.md).
DEFAULT_POLICY = Policy()
