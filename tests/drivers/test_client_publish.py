"""The client runtime's status publication: state changes at once, the rest at most once per interval.

Building a ``RuntimeStatus`` (the core's snapshot, a frozen copy of every counter)
after every input cost 8-12 % of the client's CPU under a TCP test
(docs/benchmarks.md, "Where a packet's time goes").  On Trio's mock clock, with a
gateway and a client over the in-memory network.
"""

from __future__ import annotations

import itertools

import trio
import trio_util

from jvpn_trio.core import events as ev
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import SessionState
from jvpn_trio.drivers.client import RuntimeStatus
from jvpn_trio.drivers.control import STATUS_INTERVAL_S
from tests.drivers.test_runtime_memory import World, start

#: Data-path reports pushed into the supervisor's inbox at one instant (two inputs each).
BURST = 500
#: Long enough for the handshake and the first probes of every path.
SETTLE_S = 1.0


class PublishLog(trio_util.AsyncValue[RuntimeStatus | None]):
    """A status stream that keeps every value published and the (virtual) time it was published at."""

    def __init__(self) -> None:
        super().__init__(None)
        self.published: list[tuple[float, RuntimeStatus]] = []

    @property
    def value(self) -> RuntimeStatus | None:
        return trio_util.AsyncValue.value.fget(self)  # type: ignore[no-any-return]

    @value.setter
    def value(self, status: RuntimeStatus | None) -> None:
        if status is not None:
            self.published.append((trio.current_time(), status))
        trio_util.AsyncValue.value.fset(self, status)

    def since(self, start: float) -> list[tuple[float, RuntimeStatus]]:
        return [(at, status) for at, status in self.published if at >= start]


def logged_world() -> tuple[World, PublishLog]:
    world = World()
    log = PublishLog()
    world.client.status = log
    return world, log


async def test_a_burst_of_data_path_inputs_publishes_at_most_once_per_interval(autojump_clock: trio.abc.Clock) -> None:
    world, log = logged_world()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(SETTLE_S)
            burst_at = trio.current_time()
            shown = log.value
            assert shown is not None
            for _ in range(BURST):
                assert world.client.submit_nowait(ev.DataSent(path=PathId(1)))
                assert world.client.submit_nowait(ev.DeliveryObserved(path=PathId(1)))
            await trio.sleep(STATUS_INTERVAL_S * 1.5)
            assert world.client._inbox.statistics().current_buffer_used == 0  # every input was fed
            within = [at for at, _status in log.since(burst_at) if at < burst_at + STATUS_INTERVAL_S]
            # One publication the interval allows, one for a state change a probe may bring.
            assert len(within) <= 2, f"{len(within)} statuses published for {2 * BURST} data-path inputs"
            # ... and a publication within one interval has taken the whole burst in.
            assert any(
                status.inputs >= shown.inputs + 2 * BURST
                for at, status in log.since(burst_at)
                if at <= burst_at + STATUS_INTERVAL_S
            )
            nursery.cancel_scope.cancel()


async def test_steady_traffic_publishes_about_once_per_interval(autojump_clock: trio.abc.Clock) -> None:
    """Probes, ACKs and data reports every probe interval on three paths: a few publications per interval."""
    world, log = logged_world()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(SETTLE_S)
            start_at = trio.current_time()
            intervals = 20
            await trio.sleep(STATUS_INTERVAL_S * intervals)
            published = log.since(start_at)
            changes = sum(
                1 for (_, before), (_, after) in itertools.pairwise(published)
                if after.snapshot is not None and before.snapshot is not None
                and (after.snapshot.record is not before.snapshot.record or after.snapshot.pending is not before.snapshot.pending)
            )
            assert len(published) <= intervals + 1 + changes
            nursery.cancel_scope.cancel()


async def test_a_path_set_change_is_published_at_once(autojump_clock: trio.abc.Clock) -> None:
    world, log = logged_world()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(SETTLE_S)
            removed_at = trio.current_time()
            assert world.client.remove_path(PathId(3)) is not None
            status = await log.wait_value(
                lambda s: s is not None and s.snapshot is not None and PathId(3) not in {p.path for p in s.snapshot.paths}
            )
            assert status is not None and PathId(3) not in {path for path, _name, _kind in status.paths}
            assert trio.current_time() == removed_at  # not an interval later
            nursery.cancel_scope.cancel()


async def test_the_end_of_the_session_is_published_at_once(autojump_clock: trio.abc.Clock) -> None:
    world, log = logged_world()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(SETTLE_S)
            closed_at = trio.current_time()
            assert world.client.submit_nowait(ev.CloseRequested())
            await log.wait_value(
                lambda s: s is not None and s.snapshot is not None and s.snapshot.record.state is SessionState.TERMINATED
            )
            assert trio.current_time() == closed_at
            nursery.cancel_scope.cancel()


async def test_the_first_status_is_published_with_the_session(autojump_clock: trio.abc.Clock) -> None:
    """Start: the status names the session and its tunnel address as soon as ``run`` has started it."""
    world, log = logged_world()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            status = log.value
            assert status is not None and status.snapshot is not None
            assert world.client.session is not None and status.snapshot.record.session_id == world.client.session.record.session_id
            assert status.tunnel_address == "10.66.0.2/24"
            nursery.cancel_scope.cancel()


async def test_a_reevaluation_republishes_at_once_even_in_the_same_instant(autojump_clock: trio.abc.Clock) -> None:
    """The agent's rescuer waits on a republication after a resume (drivers/agent.py ``_resumed``):
    it must be a new value even when nothing else changed since a publication at that instant."""
    world, log = logged_world()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, world)
            await trio.sleep(SETTLE_S)
            before = log.value
            assert before is not None
            asked_at = trio.current_time()
            assert world.client.submit_nowait(ev.ReevaluateRequested())
            after = await log.wait_value(lambda s: s is not before)
            assert after is not None and after != before
            assert trio.current_time() == asked_at
            nursery.cancel_scope.cancel()
