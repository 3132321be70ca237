"""Bounded logging of attacks in the drivers: the event sink's limiter and a gateway under a junk-REATTACH flood.

Determinism rules: virtual time only (autojump_clock); the log file is a
fake ``EventSink._append`` that records each batch with the virtual time it
was written at; floods are sent at exact simulated rates; every wait is
bounded by fail_after in virtual seconds.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections import defaultdict
from pathlib import Path

import pytest
import trio
import trio.testing

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.loglimit import DEFAULT_LOG_LIMITS, LogLimits
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.event_sink import EventSink, open_event_sink
from jvpn_trio.drivers.gateway import GatewayPeer, GatewayRuntime
from jvpn_trio.drivers.metrics import EventCounts
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.tools.audit import audit_lines
from jvpn_trio.tools.replay import replay_lines
from tests.drivers.test_event_sink import assert_accounted
from tests.drivers.test_gateway_runtime import GATEWAY_CONTROL, Peer, World
from tests.tools.test_replay import MemoryRecorder

R = ReasonCode
SESSION = "000102030405060708090a0b0c0d0e0f"
LOG = Path("/nonexistent/events.jsonl")  # never opened: the fake file stands in


def security(t: float, *, reason: ReasonCode = R.DECRYPT_FAILED) -> EmitEvent:
    return EmitEvent(
        kind=EventKind.SECURITY_EVENT,
        t=t,
        role=Role.GATEWAY,
        session=SESSION,
        version=1,
        reason=reason,
        policy="0123456789abcdef",
        details={"endpoint": "203.0.113.66:6666", "frame": "REATTACH"},
    )


class TimedFile:
    """Stands in for ``EventSink._append``: each batch with the virtual time it was written."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, bytes]] = []

    def per_second(self) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for at, data in self.batches:
            out[math.floor(at)] += len(data)
        return out

    def lines(self) -> list[str]:
        return b"".join(data for _, data in self.batches).decode().splitlines()


@pytest.fixture
def timed_file(monkeypatch: pytest.MonkeyPatch) -> TimedFile:
    fake = TimedFile()

    async def append(_sink: EventSink, _path: Path, data: bytes) -> tuple[int, OSError | None]:
        await trio.sleep(0)
        fake.batches.append((trio.current_time(), data))
        return len(data), None

    monkeypatch.setattr(EventSink, "_append", append)
    return fake


# -- the sink ------------------------------------------------------------------------------------------


async def test_100k_security_events_at_10k_per_s_write_within_the_bound_and_count_every_one(
    timed_file: TimedFile, autojump_clock: trio.testing.MockClock
) -> None:
    counts = EventCounts()
    async with open_event_sink(LOG, capacity=1024, also=counts.count) as sink:
        for i in range(100_000):
            sink.emit(security(trio.current_time()))
            if i % 100 == 99:
                await trio.sleep(0.01)  # 100 events per 10 ms: 10k/s
        flooded_until = trio.current_time()
        await trio.sleep(DEFAULT_LOG_LIMITS.summary_interval_s + 1)  # the flood stopped: its summary comes
        stats = sink.statistics()
        assert stats.limiter is not None and stats.limiter.pending == 0
    assert counts.security_events["decrypt_failed"] == 100_000  # the counters still count everything
    assert flooded_until == pytest.approx(10.0)
    per_second = timed_file.per_second()
    assert max(per_second.values()) <= DEFAULT_LOG_LIMITS.max_bytes(1.0)
    assert sum(per_second.values()) < 20_000  # versus ~30 MB for 100k full lines
    lines = [EmitEvent.from_dict(json.loads(line)) for line in timed_file.lines()]
    summarised = sum(int(e.detail("suppressed") or 0) for e in lines)
    full = sum(1 for e in lines if e.detail("suppressed") is None)
    assert full + summarised == 100_000
    stats = sink.statistics()
    assert (stats.emitted, stats.suppressed, stats.written) == (100_000, 100_000 - full, len(lines))
    assert_accounted(stats)


async def test_a_summary_is_written_at_its_deadline_and_seq_numbers_what_goes_out(
    timed_file: TimedFile, autojump_clock: trio.testing.MockClock
) -> None:
    limits = LogLimits(burst=2, summary_interval_ms=3_000)
    async with open_event_sink(LOG, capacity=64, limits=limits) as sink:
        attached = sink.attach(64)
        for _ in range(5):
            sink.emit(security(trio.current_time()))
        await trio.sleep(2.9)
        assert len(timed_file.lines()) == 2
        await trio.sleep(0.2)
        assert len(timed_file.lines()) == 3
        assert timed_file.batches[-1][0] == pytest.approx(3.0)  # at the deadline, not at the next event
        got = [attached.live.receive_nowait() for _ in range(3)]
    assert [item.seq for item in got] == [1, 2, 3]  # no gap: nothing was dropped
    assert got[2].event.detail("suppressed") == 3


async def test_closing_the_sink_writes_the_pending_summaries(
    timed_file: TimedFile, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_event_sink(LOG, capacity=64, limits=LogLimits(burst=1, summary_interval_ms=60_000)) as sink:
        for _ in range(4):
            sink.emit(security(0.0))
    lines = timed_file.lines()
    assert len(lines) == 2 and '"suppressed":3' in lines[1]
    assert_accounted(sink.statistics())


async def test_without_limits_every_event_is_written(timed_file: TimedFile, autojump_clock: trio.testing.MockClock) -> None:
    async with open_event_sink(LOG, capacity=64, limits=None) as sink:
        for _ in range(30):
            sink.emit(security(0.0))
    assert len(timed_file.lines()) == 30
    stats = sink.statistics()
    assert stats.limiter is None and stats.suppressed == 0


# -- a gateway under a junk-REATTACH flood -------------------------------------------------------------


def junk_reattach(template: bytes, rng: random.Random) -> bytes:
    """A REATTACH naming the live session's receiver index (it travels in clear) with a random counter and tag."""
    version, _type, reserved, index = struct.unpack_from("!BBHI", template)
    header = struct.pack("!BBHIQ", version, wire.MessageType.REATTACH, reserved, index, rng.getrandbits(64))
    return header + rng.randbytes(wire.TAG_LEN + 64)


async def test_a_gateway_flooded_with_junk_reattaches_logs_within_the_bound_and_keeps_its_session(
    timed_file: TimedFile, autojump_clock: trio.testing.MockClock
) -> None:
    world = World()
    counts = EventCounts()
    rate, seconds = 10_000, 2
    with trio.fail_after(120):
        async with open_event_sink(LOG, capacity=4096, also=counts.count) as sink:
            world.gateway = GatewayRuntime(
                policy=world.policy,
                static=world.gw_static,
                peers=[GatewayPeer(name=f"peer{n}", public=s.public) for n, s in world.statics.items()],
                tunnel=world.gateway.tunnel,
                store=MemoryOwnershipStore(),
                node_id="gw-test",
                emit=sink.emit,
                random_bytes=world.random_bytes,
            )
            async with trio.open_nursery() as nursery:
                await world.start(nursery)
                alice = Peer(world, 1)
                assert await alice.handshake() is not None
                alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=1, sent_us=0)))
                await alice.port.recv_batch(1)
                (served,) = world.gateway.sessions.values()
                before = (served.core.record.state, served.core.record.version, served.core.record.binding)
                template = alice.channel.seal(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=3, sent_us=0)))
                attacker = world.net.port(("203.0.113.66", 6666), capacity=4096)
                rng = random.Random(15)
                start = trio.current_time()
                for tick in range(seconds * 100):  # 100 frames every 10 ms
                    for _ in range(rate // 100):
                        attacker.send_nowait(junk_reattach(template, rng), GATEWAY_CONTROL)
                    await trio.sleep_until(start + (tick + 1) / 100)
                await trio.sleep(DEFAULT_LOG_LIMITS.summary_interval_s + 1)
                # The live session did not move and still answers.
                assert (served.core.record.state, served.core.record.version, served.core.record.binding) == before
                assert served.core.record.state is SessionState.ATTACHED
                alice.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=2, sent_us=0)))
                assert await alice.port.recv_batch(1)
                nursery.cancel_scope.cancel()
            stats = world.gateway.statistics()
    flood = rate * seconds
    assert stats.drop_decrypt_failed == flood
    assert counts.security_events["decrypt_failed"] == flood  # every junk frame counted
    per_second = timed_file.per_second()
    assert max(per_second.values()) <= DEFAULT_LOG_LIMITS.max_bytes(1.0)
    lines = timed_file.lines()
    security_lines = [line for line in lines if '"SECURITY_EVENT"' in line]
    assert len(security_lines) < 40  # the burst, a few refills, the summaries: not 30,000
    report = audit_lines(lines, policy=world.policy, role="gateway")
    assert report.ok, report.violations
    sink_stats = sink.statistics()
    assert sink_stats.suppressed > 0.99 * flood
    assert_accounted(sink_stats)


async def test_under_a_flood_the_trace_replays_and_the_limited_log_passes_the_audit(
    timed_file: TimedFile, autojump_clock: trio.testing.MockClock
) -> None:
    """The limiter thins the event log only: the ``--record`` trace keeps every step, so replay still works."""
    world = World()
    recorder = MemoryRecorder()
    limits = LogLimits(burst=2, refill_ms=1_000, summary_interval_ms=500)
    with trio.fail_after(60):
        async with open_event_sink(LOG, capacity=4096, limits=limits) as sink:
            world.gateway = GatewayRuntime(
                policy=world.policy,
                static=world.gw_static,
                peers=[GatewayPeer(name=f"peer{n}", public=s.public) for n, s in world.statics.items()],
                tunnel=world.gateway.tunnel,
                store=MemoryOwnershipStore(),
                node_id="gw-test",
                emit=sink.emit,
                random_bytes=world.random_bytes,
                recorder=recorder,
            )
            async with trio.open_nursery() as nursery:
                await world.start(nursery)
                alice = Peer(world, 1)
                assert await alice.handshake() is not None
                probe = wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=1, sent_us=0))
                alice.send(wire.MessageType.PROBE, probe)
                await alice.port.recv_batch(1)
                template = alice.channel.seal(wire.MessageType.PROBE, probe)
                attacker = world.net.port(("203.0.113.66", 6666), capacity=4096)
                rng = random.Random(3)
                for _ in range(20):  # 2,000 junk frames over 2 s
                    for _ in range(100):
                        attacker.send_nowait(junk_reattach(template, rng), GATEWAY_CONTROL)
                    await trio.sleep(0.1)
                await trio.sleep(1.0)
                world.gateway.close_all_nowait()
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
    lines = timed_file.lines()
    assert sum('"suppressed":' in line for line in lines) >= 2  # summaries are in the log
    assert lines[-1].count('"to_state":"TERMINATED"') == 1 or '"suppressed":' in lines[-1]
    report = audit_lines(lines, policy=world.policy, role="gateway")
    assert report.ok, report.violations
    assert sum('"kind":"SECURITY_EVENT"' in line for line in recorder.lines) == 2_000  # the trace has them all
    result = replay_lines(recorder.lines)
    assert result.ok, result
