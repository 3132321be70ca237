"""Bounded logging of attacks: which SECURITY_EVENTs are logged in full, which only counted.

Theory of operation
-------------------
A SECURITY_EVENT is the answer to an input anyone can send: a junk REATTACH
that names a live receiver index (it travels in clear) costs the sender a
datagram and, unlimited, costs the gateway a ~300-byte log line.  At 10k/s
that is megabytes a minute and the log itself becomes the attack (issue 15).
So, as wireguard-go's ``ratelimiter`` does for handshakes, the event log gets a
token bucket; the *counters* (``metrics.EventCounts``, the cores' own
counters, a ``--record`` trace) still see every event, only lines are limited.

:meth:`SecurityLogLimiter.admit` takes each event with ``now`` and returns
what to log, in order:

* events of other kinds (:attr:`LogLimits.kinds`: SECURITY_EVENT by default)
  pass unchanged: state changes, switches and health verdicts follow
  authenticated inputs and the policy's own rate limits, not an attacker's;
* a limited event is logged in full while both its key's bucket (one per
  ``(session, reason)``: the first ``burst`` in full, then one more every
  ``refill_ms``) and the global bucket (``lines_per_s``, one second's worth of
  burst) hold a token, and its line fits in ``max_line_bytes``;
* otherwise it is *held back*: counted under its key, with its time and its
  details kept as the sample.  ``summary_interval_ms`` after the first event a
  key held back, one summary line reports them: a SECURITY_EVENT of the same
  session and reason, the details of the last one held back, plus
  ``suppressed`` (how many), ``suppressed_first_t`` and ``suppressed_last_t``.
  Summaries draw on a bucket of their own (``summaries_per_interval`` per
  interval); one that finds it empty waits, still counting, so nothing is
  lost, only reported later.

A summary is due at a time, not at an event: the driver calls :meth:`tick`
at :meth:`next_deadline` (and :meth:`admit` emits the due ones before a
limited event), so the summary of a flood that stopped comes at its deadline.
Everything is a pure function of the ``(event, now)`` sequence.

A summary is an ordinary, well-formed event, so every reader of the log
(``tools/audit.py``, the UI, ``jvpn-trio attach``) takes it as it is:

* its ``t`` is the latest ``t`` the limiter has seen, never the tick's
  ``now``: the log's times stay non-decreasing even when an event stamped
  before the tick is written after it, and a summary can never be the line
  that seems to break a time bound (audit ``recovery``);
* its ``version`` is the session's latest (every event passes through
  :meth:`admit`, so the limiter follows versions), as Property 8 asks of
  every non-transition line;
* it is written between two action lists, never inside one, so a
  REATTACH_CONFIRMED is still followed by its TRANSPORT_SWITCH;
* when a session ends (a STATE_CHANGE to TERMINATED) its pending summaries
  are written right after that line and its keys forgotten: a session's
  record ends with its counts, before a client's next session begins.

The bound (docs/events.md, "Bounded logging"): in any window of ``w``
seconds the limited kinds produce at most ``lines_per_s * (1 + w)`` full
lines and ``summaries_per_interval * (1 + w / interval)`` summaries, each at
most ``max_line_bytes`` long (a summary too long even without its sample
details is not written, and counted), whatever the input rate.  Beyond that
come only the summaries written at once when a session ends (one per
reason held back, once per session) and at :meth:`flush` (once, at exit).
Memory: at most ``max_keys`` keys; an event for a new key beyond that is held
back without a key (counted in ``overflowed``, not summarised); idle keys
(nothing held back, bucket full again) are forgotten once per interval.
"""

from __future__ import annotations

import attrs

from jvpn_trio.core.actions import EmitEvent, EventKind, Scalar
from jvpn_trio.core.bounds import int_range
from jvpn_trio.core.ratelimit import TokenBucket
from jvpn_trio.core.states import SessionState

#: Defaults of :class:`LogLimits`; an operator overrides any of them in the ``[log_limits]``
#: table of gateway.toml or client.toml (``config.py``, docs/events.md "Bounded logging").
#: Lines in full per (session, reason) before limiting starts ("the first N in full").
DEFAULT_BURST = 10
#: After the burst, one more line in full per (session, reason) per this long.
DEFAULT_REFILL_MS = 5_000
#: Lines in full per second of every limited key together (also the global burst).
DEFAULT_LINES_PER_S = 20
#: A key's summary comes this long after the first event it held back.
DEFAULT_SUMMARY_INTERVAL_MS = 5_000
#: Summaries per interval, all keys together; more wait for the next interval (still counting).
DEFAULT_SUMMARIES_PER_INTERVAL = 50
#: The longest limited line written (bytes, newline included): the per-line factor of the bound.
DEFAULT_MAX_LINE_BYTES = 1_024
#: Keys (session, reason) followed at once: the limiter's memory bound.
DEFAULT_MAX_KEYS = 4_096

#: The details a summary adds (they name how many events of its key were held back, and when).
SUMMARY_DETAILS = ("suppressed", "suppressed_first_t", "suppressed_last_t")
_TERMINATED = SessionState.TERMINATED.value


@attrs.frozen(kw_only=True)
class LogLimits:
    """How many lines of attack the log takes (see the module docstring).

    Each integer field is bounded (core/bounds.py): ValueError naming the field and its range.
    """

    burst: int = attrs.field(default=DEFAULT_BURST, validator=int_range(1, 10_000))
    refill_ms: int = attrs.field(default=DEFAULT_REFILL_MS, validator=int_range(1, 3_600_000))
    lines_per_s: int = attrs.field(default=DEFAULT_LINES_PER_S, validator=int_range(1, 10_000))
    summary_interval_ms: int = attrs.field(default=DEFAULT_SUMMARY_INTERVAL_MS, validator=int_range(100, 3_600_000))
    summaries_per_interval: int = attrs.field(default=DEFAULT_SUMMARIES_PER_INTERVAL, validator=int_range(1, 100_000))
    max_line_bytes: int = attrs.field(default=DEFAULT_MAX_LINE_BYTES, validator=int_range(256, 65_536))
    max_keys: int = attrs.field(default=DEFAULT_MAX_KEYS, validator=int_range(1, 1 << 20))
    kinds: frozenset[EventKind] = frozenset({EventKind.SECURITY_EVENT})

    @property
    def summary_interval_s(self) -> float:
        return self.summary_interval_ms / 1000.0

    def max_lines(self, window_s: float) -> float:
        """The most limited lines (full and summaries) any window of ``window_s`` seconds can hold."""
        full = self.lines_per_s * (1.0 + window_s)
        summaries = self.summaries_per_interval * (1.0 + window_s / self.summary_interval_s)
        return full + summaries

    def max_bytes(self, window_s: float) -> float:
        """The bound on limited log bytes in any window of ``window_s`` seconds (docs/events.md)."""
        return self.max_lines(window_s) * self.max_line_bytes


DEFAULT_LOG_LIMITS = LogLimits()


@attrs.frozen(kw_only=True)
class LimiterStatistics:
    """What the limiter did, frozen: every limited event is ``logged``, ``held`` or ``overflowed``."""

    seen: int  # limited events offered
    logged: int  # written in full
    held: int  # held back under a key (reported by a summary, now or later)
    overflowed: int  # held back with no key free (counted only)
    summaries: int  # summary lines made
    unwritable: int  # summaries too long to write even without their sample details
    pending: int  # events held back and not yet in a summary
    keys: int


@attrs.define
class _Key:
    bucket: TokenBucket
    held: int = 0
    first_t: float = 0.0
    last_t: float = 0.0
    sample: EmitEvent | None = None
    due: float = 0.0


class SecurityLogLimiter:
    """Per-(session, reason) token buckets and periodic summaries for the event log.  Pure: ``now`` is given."""

    def __init__(self, limits: LogLimits = DEFAULT_LOG_LIMITS) -> None:
        self.limits = limits
        self._global = TokenBucket.full(limits.lines_per_s, limits.lines_per_s, now=0.0)
        per_interval = limits.summaries_per_interval
        self._summary_bucket = TokenBucket.full(per_interval / limits.summary_interval_s, per_interval, now=0.0)
        self._started = False
        self._keys: dict[tuple[str, str], _Key] = {}
        # Keys holding events back, in the order their summaries fall due (insertion order: ``now`` only grows).
        self._pending: dict[tuple[str, str], None] = {}
        self._versions: dict[str, int] = {}  # the latest version of each session that has keys
        self._last_t = float("-inf")
        self._next_prune = 0.0
        self._next_check = float("-inf")
        self._seen = 0
        self._logged = 0
        self._held = 0
        self._overflowed = 0
        self._summaries = 0
        self._unwritable = 0
        self._pending_events = 0

    # -- input -----------------------------------------------------------------------
    def admit(self, event: EmitEvent, *, now: float) -> list[EmitEvent]:
        """What to log for ``event``, in order: ``[event]``, ``[]`` (held back), with due summaries.

        Changes only the limiter's own buckets and counts; never raises for any event.
        """
        if event.kind not in self.limits.kinds:
            return self.observe(event)
        self._start(now)
        self._last_t = max(self._last_t, event.t)
        self._seen += 1
        out = self.tick(now=now) if now >= self._next_check else []
        key_id = (event.session, event.reason.value)
        key = self._keys.get(key_id)
        if key is None:
            key = self._new_key(key_id, now)
            if key is None:
                self._overflowed += 1
                return out
        self._versions[event.session] = event.version
        key.bucket.refill(now)
        self._global.refill(now)
        if key.bucket.has_token() and self._global.has_token() and self._fits(event):
            key.bucket.spend()
            self._global.spend()
            self._logged += 1
            out.append(event)
            return out
        self._hold(key_id, key, event, now)
        return out

    def observe(self, event: EmitEvent) -> list[EmitEvent]:
        """:meth:`admit` for an event of a kind that is not limited (it needs no ``now``): logged as it is.

        The limiter follows its session's version, and a session's end writes its pending summaries.
        """
        self._last_t = max(self._last_t, event.t)
        if event.session in self._versions:
            self._versions[event.session] = event.version
        if event.kind is EventKind.STATE_CHANGE and event.detail("to_state") == _TERMINATED:
            return [event, *self._end_session(event.session)]
        return [event]

    def tick(self, *, now: float) -> list[EmitEvent]:
        """The summaries due at ``now`` (as many as the summary bucket allows, oldest first)."""
        self._start(now)
        out: list[EmitEvent] = []
        if self._pending:
            self._summary_bucket.refill(now)
            while self._pending and self._summary_bucket.has_token():
                key_id = next(iter(self._pending))
                key = self._keys[key_id]
                if key.due > now:
                    break
                self._summary_bucket.spend()
                self._summarise(key_id, key, out)
        if now >= self._next_prune:
            self._prune(now)
        self._update_next_check()
        return out

    def _update_next_check(self) -> None:
        """When :meth:`admit` must tick before deciding: a summary may be due, or idle keys forgotten."""
        deadline = self.next_deadline()
        self._next_check = self._next_prune if deadline is None else min(deadline, self._next_prune)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has a summary to give (None: nothing held back)."""
        for key_id in self._pending:
            due = self._keys[key_id].due
            if self._summary_bucket.has_token():
                return due
            return max(due, self._summary_bucket.token_at())
        return None

    def flush(self) -> list[EmitEvent]:
        """Every pending summary now, whatever the buckets say (at exit: the log ends with its counts)."""
        out: list[EmitEvent] = []
        for key_id in list(self._pending):
            self._summarise(key_id, self._keys[key_id], out)
        return out

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            seen=self._seen,
            logged=self._logged,
            held=self._held,
            overflowed=self._overflowed,
            summaries=self._summaries,
            unwritable=self._unwritable,
            pending=self._pending_events,
            keys=len(self._keys),
        )

    # -- internals ---------------------------------------------------------------------
    def _start(self, now: float) -> None:
        if not self._started:  # buckets start full at the first ``now`` seen
            self._started = True
            self._global.updated = self._summary_bucket.updated = now
            self._next_prune = now + self.limits.summary_interval_s

    def _fits(self, event: EmitEvent) -> bool:
        try:
            return len(event.to_json_line().encode("utf-8")) + 1 <= self.limits.max_line_bytes
        except (TypeError, ValueError):
            return True  # the sink counts an unencodable event itself; it writes nothing for it

    def _new_key(self, key_id: tuple[str, str], now: float) -> _Key | None:
        if len(self._keys) >= self.limits.max_keys:
            if now >= self._next_prune:  # at most once per interval: an overflow costs O(1)
                self._prune(now)
            if len(self._keys) >= self.limits.max_keys:
                return None
        burst = float(self.limits.burst)
        key = _Key(bucket=TokenBucket.full(1000.0 / self.limits.refill_ms, burst, now=now))
        self._keys[key_id] = key
        return key

    def _hold(self, key_id: tuple[str, str], key: _Key, event: EmitEvent, now: float) -> None:
        self._held += 1
        self._pending_events += 1
        if key.held == 0:
            key.first_t = event.t
            key.due = now + self.limits.summary_interval_s
            self._pending[key_id] = None
            self._next_check = min(self._next_check, key.due)
        key.held += 1
        key.last_t = event.t
        key.sample = event

    def _summarise(self, key_id: tuple[str, str], key: _Key, out: list[EmitEvent]) -> None:
        sample = key.sample
        self._pending.pop(key_id, None)
        self._pending_events -= key.held
        if sample is not None:
            summary = self._summary(sample, key, with_sample=True)
            if not self._fits(summary):
                summary = self._summary(sample, key, with_sample=False)
            if self._fits(summary):
                self._summaries += 1
                out.append(summary)
            else:
                self._unwritable += 1
        key.held = 0
        key.sample = None

    def _summary(self, sample: EmitEvent, key: _Key, *, with_sample: bool) -> EmitEvent:
        details: dict[str, Scalar] = dict(sample.details) if with_sample else {}
        details.update(suppressed=key.held, suppressed_first_t=key.first_t, suppressed_last_t=key.last_t)
        return attrs.evolve(
            sample,
            t=max(self._last_t, sample.t),
            version=self._versions.get(sample.session, sample.version),
            details=details,
        )

    def _end_session(self, session: str) -> list[EmitEvent]:
        out: list[EmitEvent] = []
        for key_id in [k for k in self._keys if k[0] == session]:
            if key_id in self._pending:
                self._summary_bucket.spend()  # may go below zero: later summaries wait for it
                self._summarise(key_id, self._keys[key_id], out)
            del self._keys[key_id]
        self._versions.pop(session, None)
        return out

    def _prune(self, now: float) -> None:
        """Forget idle keys: nothing held back and the bucket full again (they would start afresh)."""
        self._next_prune = now + self.limits.summary_interval_s
        for key_id, key in list(self._keys.items()):
            if key.held == 0 and key.bucket.full_at() <= now:
                del self._keys[key_id]
        live = {session for session, _ in self._keys}
        for session in [s for s in self._versions if s not in live]:
            del self._versions[session]


__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_LINES_PER_S",
    "DEFAULT_LOG_LIMITS",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_REFILL_MS",
    "DEFAULT_SUMMARIES_PER_INTERVAL",
    "DEFAULT_SUMMARY_INTERVAL_MS",
    "SUMMARY_DETAILS",
    "LimiterStatistics",
    "LogLimits",
    "SecurityLogLimiter",
]
