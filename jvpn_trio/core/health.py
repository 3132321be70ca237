"""Per-path health: probe outcomes and deliveries -> HEALTHY / IMPAIRED / DEAD, with the reason.

Theory of operation
-------------------
One :class:`PathHealth` per candidate path, owned by the session machine and
fed only through its hooks, each with an explicit ``now`` (monotonic seconds):
``on_probe_sent``, ``on_probe_acked``, ``on_delivery``, ``on_link`` and
``expire``.  The prober numbers probes upwards per path; an authenticated
PROBE_ACK echoes the number.  Nothing here reads a clock, so a recorded
``(now, event)`` trace replays to the same verdicts.

Measurements
    * A probe is *outstanding* from ``on_probe_sent`` until it is *resolved*:
      acked in time, or lost.  It is lost at exactly its deadline, ``sent +
      probe timeout`` (``now >= deadline``), where the timeout is
      ``probe_timeout_ms``, or, when ``probe_timeout_floor_ms`` is set,
      ``srtt + 4 x jitter`` clamped to [floor, probe_timeout_ms] (never earlier
      than the previous probe's deadline): the timer armed from :meth:`next_deadline` fires at
      that instant and must make progress, so an ack has to arrive strictly
      before it.  At most ``loss_window_probes + dead_after_missed_probes``
      probes are outstanding; sending one more resolves the oldest as lost.
    * ``loss_pct`` = lost / resolved over the last ``loss_window_probes``
      resolved probes (outstanding ones do not count either way).
    * ``consecutive_missed`` = probes lost, in resolution order, since the last
      in-time ack; an in-time ack resets it to 0.  An ack for probe N first
      resolves every older outstanding probe as lost (one path delivers in
      order, so they were lost before N), so probes sent while a link was
      down cannot time out after it is back and count as fresh misses.
    * RTT of an in-time ack = ``now - sent``.  ``srtt_ms`` is RFC 6298's EWMA
      with gain :data:`SRTT_GAIN` (1/8), seeded with the first sample.
      ``jitter_ms`` is RFC 3550 section 6.4.1's interarrival jitter applied to
      consecutive RTT samples: ``J += (|R_i - R_(i-1)| - J) * JITTER_GAIN``
      (1/16), starting from 0, so it is None until the second sample.  We chose
      it over RFC 6298's RTTVAR because RTTVAR starts at R/2, which would call
      a stable but long path jittery on its first sample.
    * ``last_delivery`` = the last in-time ack, late ack or ``on_delivery``
      (authenticated data seen on the path).
    * *Silence* (``silence_probe_after_ms``): data sent (``on_data_sent``) and
      nothing delivered since, for the threshold or the path's srtt + 4 x
      jitter if longer (:meth:`PathHealth.silent_from`).  A probe sent on a
      silent path gets a second, early deadline, its *silence deadline*:
      srtt + 4 x jitter clamped to [``silence_probe_timeout_floor_ms``,
      ``probe_timeout_ms``]; so does every probe still outstanding.  Passing
      it makes a probe *unanswered*, never lost: the probe stays outstanding
      until its ordinary deadline, so an answer that is merely slow still
      counts, gives its RTT sample, and a path whose RTT jumped is never
      DEAD for it.  ``unanswered`` = outstanding probes past their silence
      deadline.  Silence only makes probes come sooner (the session's SILENT
      cadence) and be judged sooner; the loss, latency and DEAD rules are
      unchanged.
    * ``silence_alarm_at`` = the earliest silence deadline among outstanding
      probes; ``recent_answers`` = when the probes answered in time lately left
      and when their answers came.  Before it leaves a silent path the session
      asks another path's answers about the silent one's alarm
      (``switching.answered_during_silence``).

Verdicts, first match wins (``measured``/``threshold`` are in the unit of the
policy field named: probes, ms or percent):

    ====================  ========================  ===========================================
    verdict               reason                    rule
    ====================  ========================  ===========================================
    DEAD                  LINK_DOWN                 the interface is down
    DEAD                  MISSED_PROBES             consecutive_missed >= dead_after_missed_probes
    DEAD                  DELIVERY_TIMEOUT          delivered before, and now - last_delivery
                                                    > transport_loss_ttl_ms (spec 6, bullet 1)
    UNKNOWN               NO_SAMPLES                no in-time ack yet (no RTT sample)
    IMPAIRED              DATA_UNANSWERED           unanswered >= dead_after_missed_probes
    IMPAIRED              LOSS_ABOVE_THRESHOLD      loss_pct >= loss_threshold_pct
    IMPAIRED              LATENCY_ABOVE_THRESHOLD   srtt_ms >= latency_threshold_ms
    IMPAIRED              JITTER_ABOVE_THRESHOLD    jitter_ms >= jitter_threshold_ms
    IMPAIRED (recovery)   the same three, in order  previous verdict IMPAIRED or DEAD and a
                                                    metric >= healthy_below_fraction * its
                                                    threshold (reported as the threshold)
    HEALTHY               WITHIN_THRESHOLDS         otherwise
    ====================  ========================  ===========================================

The DELIVERY_TIMEOUT boundary is strict: silence of exactly
``transport_loss_ttl_ms`` is still "delivered within the TTL" (spec 6).  It is
evaluated as ``now > last_delivery + ttl`` so that :meth:`next_deadline` can
name the first instant it holds exactly.  Hysteresis:
from IMPAIRED or DEAD a path returns to HEALTHY only once every metric is
below ``healthy_below_fraction`` of its threshold; from UNKNOWN or HEALTHY
the plain thresholds apply.  So a path coming back from DEAD (link up again,
fresh acks) lands on IMPAIRED or HEALTHY by its metrics under the stricter
bound.  ``healthy_since`` is when the verdict last became HEALTHY, None
while it is anything else (the switch logic's return dwell).

Keeping a history-dependent verdict deterministic
    The tracker stores a *current verdict* and recomputes it only inside the
    mutating hooks.  Each hook first *advances* to ``now``: it resolves every
    outstanding probe whose deadline is ``<= now`` as lost and re-evaluates
    (which also commits a DELIVERY_TIMEOUT that has come due), and only then
    applies its own input and re-evaluates once more.  So a hook's outcome
    does not depend on whether the driver happened to call :meth:`expire`
    first: Trio's scheduling order cannot change a verdict.
    :meth:`verdict` and :meth:`stats` are pure queries that return exactly
    what ``expire(now)`` would commit, without committing it.  Time never runs
    backwards here: a ``now`` earlier than one already seen is taken as the
    latest seen.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math
from collections.abc import Iterable

import attrs

from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode

#: RFC 6298 section 2.3's K: the timeout allows this many mean deviations above the smoothed RTT.
RTO_JITTER_FACTOR = 4.0
#: RFC 6298 section 2: SRTT <- (1 - alpha) * SRTT + alpha * R', alpha = 1/8.
SRTT_GAIN = 1 / 8
#: RFC 3550 section 6.4.1: J <- J + (|D| - J) / 16.
JITTER_GAIN = 1 / 16
#: RTT samples kept for the UI's sparkline.
RTT_HISTORY_LEN = 32

_MS_PER_S = 1000.0


class Verdict(enum.Enum):
    """How usable a path is.  The string values are what events and the UI carry."""

    UNKNOWN = "UNKNOWN"
    HEALTHY = "HEALTHY"
    IMPAIRED = "IMPAIRED"
    DEAD = "DEAD"


@attrs.frozen
class PathVerdict:
    """A verdict and what decided it: the metric's value and the bound it crossed.

    ``measured``/``threshold`` are None where no single number decided
    (LINK_DOWN, NO_SAMPLES, WITHIN_THRESHOLDS).
    """

    path: PathId
    verdict: Verdict
    reason: ReasonCode
    measured: float | None = None
    threshold: float | None = None


@attrs.frozen
class PathStats:
    """What the tracker knows about one path, for snapshots and the UI."""

    path: PathId
    srtt_ms: float | None
    jitter_ms: float | None
    loss_pct: float
    last_delivery: float | None
    consecutive_missed: int
    probes_sent: int
    probes_acked: int
    probes_lost: int
    link_up: bool
    rtt_history_ms: tuple[float, ...]
    healthy_since: float | None
    late_acks: int = 0
    ignored_acks: int = 0


@attrs.frozen
class _Metrics:
    """The inputs of :func:`_decide`, as of some ``now``."""

    link_up: bool
    missed: int
    last_delivery: float | None
    srtt_ms: float | None
    jitter_ms: float | None
    loss_pct: float
    #: Probes past their silence deadline and not yet lost (``PathHealth._unanswered``).
    unanswered: int = 0


#: A projection of the state to some ``now``: verdict, healthy_since, metrics, probes lost by then.
_Projection = tuple[PathVerdict, "float | None", _Metrics, int]


def _loss_pct(outcomes: Iterable[bool]) -> float:
    resolved = 0
    lost = 0
    for was_lost in outcomes:
        resolved += 1
        lost += was_lost
    return 100.0 * lost / resolved if resolved else 0.0


def _decide(path: PathId, policy: Policy, m: _Metrics, *, now: float, previous: Verdict) -> PathVerdict:
    """The verdict table of the module docstring.  Pure."""
    if not m.link_up:
        return PathVerdict(path, Verdict.DEAD, ReasonCode.LINK_DOWN)
    if m.missed >= policy.dead_after_missed_probes:
        return PathVerdict(
            path,
            Verdict.DEAD,
            ReasonCode.MISSED_PROBES,
            float(m.missed),
            float(policy.dead_after_missed_probes),
        )
    if m.last_delivery is not None and now > m.last_delivery + policy.transport_loss_ttl_ms / _MS_PER_S:
        return PathVerdict(
            path,
            Verdict.DEAD,
            ReasonCode.DELIVERY_TIMEOUT,
            (now - m.last_delivery) * _MS_PER_S,
            float(policy.transport_loss_ttl_ms),
        )
    if m.srtt_ms is None:
        return PathVerdict(path, Verdict.UNKNOWN, ReasonCode.NO_SAMPLES)
    if m.unanswered >= policy.dead_after_missed_probes:
        return PathVerdict(
            path, Verdict.IMPAIRED, ReasonCode.DATA_UNANSWERED, float(m.unanswered), float(policy.dead_after_missed_probes)
        )
    checks = (
        (ReasonCode.LOSS_ABOVE_THRESHOLD, m.loss_pct, policy.loss_threshold_pct),
        (ReasonCode.LATENCY_ABOVE_THRESHOLD, m.srtt_ms, policy.latency_threshold_ms),
        (ReasonCode.JITTER_ABOVE_THRESHOLD, m.jitter_ms, policy.jitter_threshold_ms),
    )
    for reason, value, limit in checks:
        if value is not None and value >= limit:
            return PathVerdict(path, Verdict.IMPAIRED, reason, value, limit)
    if previous in (Verdict.IMPAIRED, Verdict.DEAD):
        # Hysteresis: earn HEALTHY back with margin, so a path hovering at a
        # threshold does not flap between verdicts on every probe.
        for reason, value, limit in checks:
            bound = policy.healthy_below_fraction * limit
            if value is not None and value >= bound:
                return PathVerdict(path, Verdict.IMPAIRED, reason, value, bound)
    return PathVerdict(path, Verdict.HEALTHY, ReasonCode.WITHIN_THRESHOLDS)


class PathHealth:
    """Deterministic health tracker for one path; see the module docstring for the rules.

    Not thread- or task-safe by design: it has one owner (the session machine).
    """

    def __init__(self, path: PathId, policy: Policy, *, now: float, link_up: bool = True) -> None:
        self._path = path
        self._policy = policy
        self._timeout_s = policy.probe_timeout_ms / _MS_PER_S
        self._ttl_s = policy.transport_loss_ttl_ms / _MS_PER_S
        self._max_outstanding = policy.loss_window_probes + policy.dead_after_missed_probes
        self._now = now
        self._link_up = link_up
        # seq -> (sent, deadline, silence deadline or inf), in send order; deadlines never
        # decrease because ``now`` never does, so the due probes are always a prefix.  The silence
        # deadline is the early clock of a silent path: passing it counts a probe as unanswered
        # (IMPAIRED by DATA_UNANSWERED), never as lost; the probe stays out until its deadline.
        self._outstanding: dict[int, tuple[float, float, float]] = {}
        # Probes resolved as lost, remembered (bounded) to recognise late acks.
        self._lost_seqs: dict[int, None] = {}
        self._last_seq = -1
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=policy.loss_window_probes)
        self._rtts: collections.deque[float] = collections.deque(maxlen=RTT_HISTORY_LEN)
        self._srtt_ms: float | None = None
        self._jitter_ms: float | None = None
        self._last_delivery: float | None = None
        #: The first data sent since the last delivery (``on_data_sent``); None: all answered.
        self._unanswered_since: float | None = None
        #: (sent, answered) of the probes answered in time lately (:meth:`recent_answers`).
        self._answers: collections.deque[tuple[float, float]] = collections.deque(maxlen=policy.loss_window_probes)
        self._missed = 0
        self._probes_sent = 0
        self._probes_acked = 0
        self._probes_lost = 0
        self._late_acks = 0
        self._ignored_acks = 0
        self._current = PathVerdict(path, Verdict.UNKNOWN, ReasonCode.NO_SAMPLES)
        #: ``_project``'s last result and its ``now``; replaced or dropped by every commit.
        self._memo: tuple[float, _Projection] | None = None
        self._healthy_since: float | None = None
        self._commit(now)

    @property
    def path(self) -> PathId:
        return self._path

    @property
    def committed(self) -> PathVerdict:
        """The verdict as of the last hook (what :meth:`verdict` says without advancing time)."""
        return self._current

    # -- hooks (mutating) -------------------------------------------------------

    def on_probe_sent(self, seq: int, *, now: float) -> None:
        """A probe left on this path.  ``seq`` must exceed every earlier one (ValueError).

        Reusing a number would let a stale ack resolve a new probe.  Resolves
        the oldest outstanding probe as lost if the outstanding set is full.
        """
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= self._last_seq:
            raise ValueError(f"{self._path}: probe seq {seq!r} is not above the last one ({self._last_seq})")
        now = self._advance(now)
        self._last_seq = seq
        self._probes_sent += 1
        if len(self._outstanding) >= self._max_outstanding:
            self._mark_lost(next(iter(self._outstanding)))
        # Deadlines never decrease (the due probes stay a prefix), even when the timeout shrinks.
        last_deadline = next(reversed(self._outstanding.values()))[1] if self._outstanding else now
        deadline = max(now + self.probe_timeout_s(), last_deadline)
        silence_deadline = math.inf
        if self.is_silent(now):
            # A silent path: this probe is also on the short clock, and so is every one still
            # out (a probe sent before the silence has had at least as long to be answered).
            silence_deadline = now + self.silence_probe_timeout_s()
            for older, (sent, older_deadline, older_silence) in self._outstanding.items():
                if older_silence > silence_deadline:
                    self._outstanding[older] = (sent, older_deadline, silence_deadline)
        self._outstanding[seq] = (now, deadline, silence_deadline)
        self._commit(now)

    def probe_timeout_s(self) -> float:
        """How long the next probe may go unanswered: srtt + 4 x jitter within the policy's bounds.

        Without ``probe_timeout_floor_ms`` (the default) it is the fixed ``probe_timeout_ms``.
        """
        return self._adaptive_timeout_s(self._policy.probe_timeout_floor_ms)

    def silence_probe_timeout_s(self) -> float:
        """How long a probe sent on a silent path may go unanswered: srtt + 4 x jitter, at least
        ``silence_probe_timeout_floor_ms``, at most ``probe_timeout_ms``; the full timeout before any
        RTT sample (nothing yet says how fast this path answers)."""
        return self._adaptive_timeout_s(self._policy.silence_probe_timeout_floor_ms)

    def _adaptive_timeout_s(self, floor_ms: int | None) -> float:
        """RFC 6298's shape, srtt + 4 x jitter, within [``floor_ms``, ``probe_timeout_ms``]; the fixed
        ``probe_timeout_ms`` without a floor or before the first RTT sample."""
        if floor_ms is None or self._srtt_ms is None:
            return self._timeout_s
        adaptive_ms = self._srtt_ms + RTO_JITTER_FACTOR * (self._jitter_ms or 0.0)
        return min(max(adaptive_ms, floor_ms), self._policy.probe_timeout_ms) / _MS_PER_S

    def silent_from(self) -> float | None:
        """When this path counts as silent: data sent and unanswered for ``silence_probe_after_ms``,
        or for :meth:`silence_probe_timeout_s` if that is longer (a slow path is not silent for
        answering at its usual pace).  None: nothing unanswered, or silence probing is off."""
        after_ms = self._policy.silence_probe_after_ms
        if after_ms is None or self._unanswered_since is None:
            return None
        return self._unanswered_since + max(after_ms / _MS_PER_S, self.silence_probe_timeout_s())

    def is_silent(self, now: float) -> bool:
        """Whether the path is silent at ``now`` (:meth:`silent_from`)."""
        silent_from = self.silent_from()
        return silent_from is not None and now >= silent_from

    def silence_alarm_at(self) -> float | None:
        """When the first probe still out passes (or passed) its silence deadline and counts as
        unanswered; None while no outstanding probe is on the silence clock.  From this instant the
        path's silence is suspect, and the other paths are asked whether they still get answers."""
        alarm = min((silence for _s, _d, silence in self._outstanding.values()), default=math.inf)
        return None if alarm == math.inf else alarm

    def recent_answers(self) -> tuple[tuple[float, float], ...]:
        """``(sent, answered)`` of the last ``loss_window_probes`` probes answered in time, oldest first:
        the instants the far end is known to have been answering through this path."""
        return tuple(self._answers)

    def on_probe_acked(self, seq: int, *, now: float) -> float | None:
        """An authenticated ack for probe ``seq``; returns its RTT in ms.

        None when the ack gives no RTT sample: unknown or duplicate ``seq``
        (ignored), or a late ack for a probe already counted lost (refreshes
        ``last_delivery`` only).  Probes due by ``now`` are expired first.
        """
        now = self._advance(now)
        entry = self._outstanding.pop(seq, None)
        if entry is not None:
            # Probes older than this one still unanswered were lost before it: resolve them
            # now, in send order, so they cannot time out *after* this ack and count as fresh
            # consecutive misses on a path that has just proved it delivers (a link that came
            # back would otherwise be declared dead again by the probes sent while it was down).
            for older in [s for s in self._outstanding if s < seq]:
                self._mark_lost(older)
        if entry is None:
            if seq in self._lost_seqs:
                del self._lost_seqs[seq]
                self._late_acks += 1
                self._delivered(now)
                self._commit(now)
            else:
                self._ignored_acks += 1
            return None
        sent, _deadline, _silence_deadline = entry
        rtt_ms = (now - sent) * _MS_PER_S
        self._answers.append((sent, now))
        self._sample_rtt(rtt_ms)
        self._missed = 0
        self._outcomes.append(False)
        self._probes_acked += 1
        self._delivered(now)
        self._commit(now)
        return rtt_ms

    def on_delivery(self, *, now: float) -> None:
        """Authenticated data arrived on this path: refreshes ``last_delivery`` and ends a silence."""
        now = self._advance(now)
        self._delivered(now)
        self._commit(now)

    def on_data_sent(self, *, now: float) -> None:
        """Data left on this path: if nothing comes back, the path turns silent (:meth:`silent_from`).

        No verdict depends on it: silence only makes probes come sooner and time out sooner."""
        now = self._advance(now)
        if self._unanswered_since is None:
            self._unanswered_since = now  # read by no projection: the memo stands

    def on_link(self, up: bool, *, now: float) -> None:
        """The interface went up or down.  Down is DEAD at once; up re-evaluates the metrics."""
        now = self._advance(now)
        self._link_up = up
        self._commit(now)

    def expire(self, *, now: float) -> None:
        """Resolve probes due by ``now`` as lost and commit any verdict change (call at next_deadline)."""
        self._advance(now)

    # -- queries (pure) -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time at which the state changes with no input: a probe's timeout or the TTL.

        The TTL instant is the first float strictly after ``last_delivery +
        ttl`` (the rule is strict), so a timer fired there always makes
        progress.  None when nothing is pending.
        """
        candidates: list[float] = []
        if self._outstanding:
            _sent, deadline, _silence_deadline = next(iter(self._outstanding.values()))
            candidates.append(deadline)
            silence = self._next_silence_deadline()
            if silence < math.inf:
                candidates.append(silence)
        if self._last_delivery is not None:
            dead_at = math.nextafter(self._last_delivery + self._ttl_s, math.inf)
            if dead_at > self._now:  # otherwise it is already in effect
                candidates.append(dead_at)
        return min(candidates, default=None)

    def verdict(self, *, now: float) -> PathVerdict:
        """The verdict ``expire(now)`` would commit, without committing it."""
        verdict, _healthy_since, _metrics, _lost = self._project(now)
        return verdict

    def healthy_since(self, *, now: float) -> float | None:
        """``stats(now=now).healthy_since``, without building the stats."""
        _verdict, healthy_since, _metrics, _lost = self._project(now)
        return healthy_since

    def stats(self, *, now: float) -> PathStats:
        """A frozen view consistent with :meth:`verdict` at the same ``now``."""
        _verdict, healthy_since, m, lost = self._project(now)
        return PathStats(
            path=self._path,
            srtt_ms=m.srtt_ms,
            jitter_ms=m.jitter_ms,
            loss_pct=m.loss_pct,
            last_delivery=m.last_delivery,
            consecutive_missed=m.missed,
            probes_sent=self._probes_sent,
            probes_acked=self._probes_acked,
            probes_lost=self._probes_lost + lost,
            link_up=m.link_up,
            rtt_history_ms=tuple(self._rtts),
            healthy_since=healthy_since,
            late_acks=self._late_acks,
            ignored_acks=self._ignored_acks,
        )

    # -- internals ------------------------------------------------------------------

    def _due(self, now: float) -> int:
        """How many outstanding probes are lost by ``now`` (a prefix, in send order)."""
        due = 0
        for _sent, deadline, _silence_deadline in self._outstanding.values():
            if deadline > now:
                break
            due += 1
        return due

    def _metrics(self, now: float) -> tuple[_Metrics, int]:
        """The metrics as of ``now``, counting due probes as lost; and how many that is."""
        due = self._due(now)
        if due:
            projected = collections.deque(self._outcomes, maxlen=self._outcomes.maxlen)
            projected.extend([True] * min(due, self._policy.loss_window_probes))
            loss_pct = _loss_pct(projected)
        else:
            loss_pct = _loss_pct(self._outcomes)
        metrics = _Metrics(
            link_up=self._link_up,
            missed=self._missed + due,
            last_delivery=self._last_delivery,
            srtt_ms=self._srtt_ms,
            jitter_ms=self._jitter_ms,
            loss_pct=loss_pct,
            unanswered=self._unanswered(now, due),
        )
        return metrics, due

    def _project(self, now: float) -> _Projection:
        """What the queries see at ``now``: computed once per ``now`` between two commits.

        The session asks for every path's verdict and state several times per input at one
        ``now``; every change to what a projection reads is followed by :meth:`_commit`, which
        replaces or drops the memo, so a memo is always what a fresh projection would give.
        """
        now = max(now, self._now)
        memo = self._memo
        if memo is not None and memo[0] == now:
            return memo[1]
        projection = self._fresh_projection(now)
        self._memo = (now, projection)
        return projection

    def _fresh_projection(self, now: float) -> _Projection:
        metrics, due = self._metrics(now)
        verdict = _decide(self._path, self._policy, metrics, now=now, previous=self._current.verdict)
        if verdict.verdict is not Verdict.HEALTHY:
            healthy_since = None
        elif self._current.verdict is Verdict.HEALTHY:
            healthy_since = self._healthy_since
        else:
            healthy_since = now
        return verdict, healthy_since, metrics, due

    def _commit(self, now: float) -> None:
        """Store the verdict as of ``now`` (the only place that assigns it)."""
        projection = self._fresh_projection(now)
        verdict, healthy_since, _metrics, _due = projection
        # A projection reads the committed verdict (hysteresis, healthy_since): while it stays
        # the same, this one is what a query at ``now`` would compute again.
        unchanged = verdict.verdict is self._current.verdict
        self._current = verdict
        self._healthy_since = healthy_since
        self._memo = (now, projection) if unchanged else None

    def _advance(self, now: float) -> float:
        """Move to ``now`` (never backwards): lose due probes, then commit the verdict."""
        now = max(now, self._now)
        self._now = now
        for _ in range(self._due(now)):
            oldest = next(iter(self._outstanding))
            self._mark_lost(oldest)
        self._commit(now)
        return now

    def _delivered(self, now: float) -> None:
        self._last_delivery = now
        self._unanswered_since = None

    def _unanswered(self, now: float, due: int) -> int:
        """Probes still out (not yet lost by ``now``) whose silence deadline has passed."""
        return sum(1 for _s, _d, silence in itertools.islice(self._outstanding.values(), due, None) if silence <= now)

    def _next_silence_deadline(self) -> float:
        """The next instant the silence-clock count can grow with no new input (inf: none pending)."""
        return min((silence for _s, _d, silence in self._outstanding.values() if silence > self._now), default=math.inf)

    def _mark_lost(self, seq: int) -> None:
        """Resolve outstanding probe ``seq`` as lost."""
        del self._outstanding[seq]
        self._missed += 1
        self._outcomes.append(True)
        self._probes_lost += 1
        self._lost_seqs[seq] = None
        if len(self._lost_seqs) > self._max_outstanding:
            del self._lost_seqs[next(iter(self._lost_seqs))]

    def _sample_rtt(self, rtt_ms: float) -> None:
        if self._srtt_ms is None:
            self._srtt_ms = rtt_ms
        else:
            self._srtt_ms += (rtt_ms - self._srtt_ms) * SRTT_GAIN
            previous = self._rtts[-1]
            jitter = 0.0 if self._jitter_ms is None else self._jitter_ms
            self._jitter_ms = jitter + (abs(rtt_ms - previous) - jitter) * JITTER_GAIN
        self._rtts.append(rtt_ms)

    def __repr__(self) -> str:
        return f"<PathHealth {self._path} {self._current.verdict.value}/{self._current.reason.value}>"
