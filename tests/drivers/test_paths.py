"""drivers/paths.py: the path manager task on scripted snapshots under Trio's mock clock.

Determinism rules: every test but the last runs on ``autojump_clock``, so virtual time
only moves when every task is blocked, and the times asserted are exact (a read happens
exactly ``settle_s`` after the first event of a burst, a retry exactly ``retry_s`` after a
failure).  Netlink is replaced by a memory channel of wake-ups and the machine by a
:class:`Script` of snapshots; nothing sleeps in real time and no socket is opened, except
in the last test, which reads this machine's own namespace once (read-only).
"""

from __future__ import annotations

import errno
import socket
import attrs
import pytest
import trio
import trio.testing

from jvpn_trio.core.candidates import (
    Address,
    DownReason,
    GatewayRoute,
    InterfaceState,
    LinkClass,
    MachineSnapshot,
    PathRule,
    PathRules,
)
from jvpn_trio.drivers.netlink import AddressEvent, LinkEvent, Resync, RouteEvent
from jvpn_trio.drivers.paths import (
    DEFAULT_READ_RETRY_S,
    DEFAULT_SETTLE_S,
    LOG_INTERVAL_S,
    PathAddressChanged,
    PathDown,
    PathEvent,
    PathForgotten,
    PathManager,
    PathManagerStatistics,
    PathUp,
    open_path_manager,
    serve_path_manager,
)
from jvpn_trio.drivers.routes import RTPROT_JVPN

GATEWAY = "198.51.100.7"
TIMEOUT_S = 60.0  # virtual seconds under autojump_clock


def nic(name: str, index: int, address: str = "192.168.1.20", next_hop: str | None = "192.168.1.1",
        *, kind: str = "ethernet", up: bool = True, error: str | None = None) -> InterfaceState:
    return InterfaceState(
        name=name, index=index, kind=kind, link_class=LinkClass.ORDINARY, up=up,
        addresses=(Address(family=4, address=address, prefixlen=24),),
        route=GatewayRoute(next_hop=next_hop, source=address), error=error,
    )


LO = InterfaceState(name="lo", index=1, kind="ethernet", link_class=LinkClass.LOOPBACK, up=True)
ETH = nic("eth0", 2)
WLAN = nic("wlan0", 3, "10.0.0.5", "10.0.0.1", kind="wifi")


def machine(*ifaces: InterfaceState) -> MachineSnapshot:
    return MachineSnapshot((LO, *ifaces))


class Script:
    """A fake state reader: returns (or raises) the scripted items in turn, then repeats the last one."""

    def __init__(self, first: MachineSnapshot | BaseException, *items: MachineSnapshot | BaseException) -> None:
        self.items = [first, *items]
        self.last = first
        self.read_times: list[float] = []

    def then(self, *items: MachineSnapshot | BaseException) -> None:
        self.items.extend(items)

    async def __call__(self) -> MachineSnapshot:
        self.read_times.append(trio.current_time())
        if self.items:
            self.last = self.items.pop(0)
        item = self.last
        if isinstance(item, BaseException):
            raise item
        return item


class Harness:
    def __init__(self, manager: PathManager, events: trio.MemoryReceiveChannel[PathEvent],
                 wake: trio.MemorySendChannel[object], script: Script, lines: list[str]) -> None:
        self.manager, self.events, self.wake, self.script, self.lines = manager, events, wake, script, lines

    async def take(self, n: int) -> list[PathEvent]:
        return [await self.events.receive() for _ in range(n)]

    def nothing_pending(self) -> bool:
        try:
            self.events.receive_nowait()
        except trio.WouldBlock:
            return True
        return False


async def run_harness(
    nursery: trio.Nursery, script: Script, *, rules: PathRules = PathRules(), channel_size: int = 16,
) -> Harness:
    wake_send, wake_receive = trio.open_memory_channel[object](64)
    send, receive = trio.open_memory_channel[PathEvent](channel_size)
    lines: list[str] = []
    manager = await nursery.start(
        lambda task_status: serve_path_manager(
            send, rules, GATEWAY, read_state=script, wakeups=wake_receive, log=lines.append, task_status=task_status
        )
    )
    return Harness(manager, receive, wake_send, script, lines)


def up(path_id: int, iface: InterfaceState, priority: int) -> PathUp:
    route = iface.route
    assert route is not None
    return PathUp(path_id=path_id, ifname=iface.name, kind=iface.kind, priority=priority,
                  source_address=iface.addresses[0].address, next_hop=route.next_hop,
                  ifindex=iface.index, label="auto")


# -- start-up --------------------------------------------------------------------------------


async def test_started_after_the_first_read_then_one_path_up_each(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, Script(machine(WLAN, ETH)))
            assert h.script.read_times == [0.0]
            assert [p.ifname for p in h.manager.paths] == ["eth0", "wlan0"]
            assert await h.take(2) == [up(1, ETH, 10), up(2, WLAN, 20)]
            assert h.nothing_pending() and trio.current_time() == 0.0
            nursery.cancel_scope.cancel()


async def test_no_interface_at_start_is_not_fatal_and_a_later_one_comes_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(machine())
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script, rules=PathRules(rules=(PathRule(interface="wlan0"),)))
            assert h.manager.paths == ()
            await trio.sleep(10.0)  # plugged in ten seconds later
            script.then(machine(WLAN))
            h.wake.send_nowait(LinkEvent(ifname="wlan0", index=3, up=True))
            [event] = await h.take(1)
            assert isinstance(event, PathUp) and event.ifname == "wlan0" and event.label == "interface=wlan0"
            assert trio.current_time() == 10.0 + DEFAULT_SETTLE_S
            assert script.read_times == [0.0, 10.0 + DEFAULT_SETTLE_S]
            nursery.cancel_scope.cancel()


# -- events and their timing --------------------------------------------------------------------


async def test_a_burst_of_good_news_is_read_once_after_the_settle_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(machine(ETH))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(1)
            await trio.sleep(5.0)
            script.then(machine(ETH, WLAN))  # wlan0 plugged in
            for _ in range(4):  # one `ip link add` / `ip addr add` is several messages
                h.wake.send_nowait(LinkEvent(ifname="wlan0", index=3, up=True))
                await trio.sleep(DEFAULT_SETTLE_S / 10)
            assert await h.take(1) == [up(2, WLAN, 20)]
            assert script.read_times == [0.0, 5.0 + DEFAULT_SETTLE_S]
            await trio.testing.wait_all_tasks_blocked()
            stats = h.manager.statistics()
            assert (stats.wakeups, stats.snapshots_read, stats.events_published, stats.paths) == (4, 2, 2, 2)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "loss, reason, read_at_once",
    [  # a link's own event is enough (no read); an address or route removal is read at once
        (LinkEvent(ifname="wlan0", index=3, up=False), DownReason.LINK_DOWN, False),
        (LinkEvent(ifname="wlan0", index=3, up=False, removed=True), DownReason.INTERFACE_GONE, False),
        (AddressEvent(ifname="wlan0", index=3, address="192.168.1.20", prefixlen=24, added=False),
         DownReason.INTERFACE_GONE, True),
        (RouteEvent(family=socket.AF_INET, table=254, dst="0.0.0.0/0", oif=3, gateway="192.168.1.1", added=False),
         DownReason.INTERFACE_GONE, True),
    ],
)
async def test_a_loss_is_reported_at_once_and_read_again_once_the_burst_settles(
    autojump_clock: trio.testing.MockClock, loss: object, reason: DownReason, read_at_once: bool
) -> None:
    script = Script(machine(ETH, WLAN))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(2)
            await trio.sleep(5.0)
            script.then(machine(ETH))  # wlan0 unplugged
            h.wake.send_nowait(loss)
            assert await h.take(1) == [PathDown(path_id=2, ifname="wlan0", reason=reason)]
            assert trio.current_time() == 5.0  # not after the settle interval
            for _ in range(3):  # one `ip link del` is several messages
                h.wake.send_nowait(loss)
                await trio.sleep(DEFAULT_SETTLE_S / 10)
            await trio.sleep(DEFAULT_SETTLE_S)
            at_once = [5.0] if read_at_once else []
            assert script.read_times == [0.0, *at_once, 5.0 + DEFAULT_SETTLE_S]  # then the settled read
            forgotten = [PathForgotten(path_id=2, ifname="wlan0")] if reason is DownReason.LINK_DOWN else []
            assert await h.take(len(forgotten)) == forgotten  # "down" first, "gone" at the read: the id is free
            assert h.nothing_pending()
            stats = h.manager.statistics()
            assert (stats.wakeups, stats.snapshots_read, stats.events_published, stats.paths) == (
                4, 2 + len(at_once), 3 + len(forgotten), 1
            )
            nursery.cancel_scope.cancel()


async def test_our_own_route_changes_never_read_the_machine(autojump_clock: trio.testing.MockClock) -> None:
    """Routes with our protocol (a path installed or removed, the kernel dropping a link's) wake nothing.

    Each would otherwise cost a read of the whole machine in a worker thread; the same change
    by anyone else (here a DHCP client's default route going) is still read at once.
    """
    script = Script(machine(ETH, WLAN))
    ours = [
        RouteEvent(family=socket.AF_INET, table=51821, dst=f"{GATEWAY}/32", oif=2, gateway="192.168.1.1",
                   added=added, protocol=RTPROT_JVPN)
        for added in (True, False)
    ]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(2)
            for event in ours * 3:
                h.wake.send_nowait(event)
            await trio.sleep(10 * DEFAULT_SETTLE_S)
            assert script.read_times == [0.0] and h.nothing_pending()
            assert (h.manager.statistics().own_route_events, h.manager.statistics().wakeups) == (6, 0)
            theirs = attrs.evolve(ours[1], table=254, dst="0.0.0.0/0", protocol=16)  # RTPROT_DHCP
            sent_at = trio.current_time()
            h.wake.send_nowait(theirs)
            await trio.sleep(2 * DEFAULT_SETTLE_S)
            assert script.read_times == [0.0, sent_at, sent_at + DEFAULT_SETTLE_S]  # at once, then settled
            assert h.manager.statistics().wakeups == 1
            nursery.cancel_scope.cancel()


async def test_a_link_that_flaps_back_within_the_burst_is_the_same_path_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(machine(ETH, WLAN))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(2)
            h.wake.send_nowait(LinkEvent(ifname="wlan0", index=3, up=False))  # the settled read finds it up again
            assert await h.take(2) == [
                PathDown(path_id=2, ifname="wlan0", reason=DownReason.LINK_DOWN),
                up(2, WLAN, 20),
            ]
            assert script.read_times == [0.0, DEFAULT_SETTLE_S]
            h.wake.send_nowait(LinkEvent(ifname="lo", index=1, up=False))  # not a path: nothing at once
            await trio.sleep(DEFAULT_SETTLE_S)
            assert h.nothing_pending()
            nursery.cancel_scope.cancel()


async def test_a_resync_rereads_and_a_new_next_hop_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(machine(ETH))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(1)
            script.then(machine(nic("eth0", 2, "172.16.5.9", "172.16.5.1")))
            h.wake.send_nowait(Resync(overruns=1))
            assert await h.take(1) == [
                PathAddressChanged(path_id=1, ifname="eth0", source_address="172.16.5.9", next_hop="172.16.5.1")
            ]
            assert trio.current_time() == DEFAULT_SETTLE_S
            assert h.manager.statistics().resyncs == 1
            # An event that changes nothing publishes nothing.
            h.wake.send_nowait(LinkEvent(ifname="eth0", index=2, up=True))
            await trio.sleep(1.0)
            assert h.nothing_pending() and len(script.read_times) == 3
            nursery.cancel_scope.cancel()


# -- failures are local ---------------------------------------------------------------------------


async def test_an_interface_error_downs_that_path_only_and_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    vanishing = nic("wlan0", 3, "10.0.0.5", "10.0.0.1", kind="wifi", error="ENODEV: No such device")
    script = Script(machine(ETH, WLAN))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(2)
            script.then(machine(ETH, vanishing), machine(ETH, vanishing), machine(ETH, WLAN))
            h.wake.send_nowait(LinkEvent(ifname="wlan0", index=3, up=True))
            assert await h.take(1) == [PathDown(path_id=2, ifname="wlan0", reason=DownReason.READ_ERROR)]
            t0 = DEFAULT_SETTLE_S
            # No netlink event needed: the manager reads again after retry_s, twice.
            assert await h.take(1) == [up(2, WLAN, 20)]
            assert script.read_times == [0.0, t0, t0 + DEFAULT_READ_RETRY_S, t0 + 2 * DEFAULT_READ_RETRY_S]
            stats = h.manager.statistics()
            assert stats.interface_errors == 2 and stats.read_failures == 0
            assert stats.last_error == "wlan0: ENODEV: No such device"
            # Logged once, the repeat within LOG_INTERVAL_S held back and counted.
            assert h.lines == ["path manager: wlan0 is not usable now (ENODEV: No such device)"]
            assert stats.log_lines_suppressed == 1
            await trio.sleep(5.0)  # and no more retries once it reads cleanly
            assert len(script.read_times) == 4
            nursery.cancel_scope.cancel()


async def test_an_unreadable_machine_downs_every_path_then_recovers_with_the_same_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = PermissionError(errno.EPERM, "Operation not permitted")
    script = Script(machine(ETH, WLAN))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            await h.take(2)
            script.then(refused, refused, machine(ETH, WLAN))
            h.wake.send_nowait(Resync(overruns=1))
            assert await h.take(2) == [
                PathDown(path_id=1, ifname="eth0", reason=DownReason.READ_ERROR),
                PathDown(path_id=2, ifname="wlan0", reason=DownReason.READ_ERROR),
            ]
            assert await h.take(2) == [up(1, ETH, 10), up(2, WLAN, 20)]
            t0 = DEFAULT_SETTLE_S
            assert script.read_times == [0.0, t0, t0 + DEFAULT_READ_RETRY_S, t0 + 2 * DEFAULT_READ_RETRY_S]
            stats = h.manager.statistics()
            assert stats.read_failures == 2 and stats.snapshots_read == 2
            assert len(h.lines) == 1 and "EPERM" in h.lines[0] and "Traceback" not in h.lines[0]
            nursery.cancel_scope.cancel()


async def test_a_failed_first_read_still_starts(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(OSError(errno.ENOBUFS, "No buffer space available"), machine(ETH))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script)
            assert h.manager.paths == () and h.manager.statistics().read_failures == 1
            assert await h.take(1) == [up(1, ETH, 10)]
            assert trio.current_time() == DEFAULT_READ_RETRY_S
            nursery.cancel_scope.cancel()


# -- the channel ------------------------------------------------------------------------------------


async def test_a_slow_consumer_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    ifaces = [nic(f"eth{i}", 10 + i, f"10.{i}.0.2", f"10.{i}.0.1") for i in range(5)]
    script = Script(machine(*ifaces))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, script, channel_size=1)
            script.then(machine())
            h.wake.send_nowait(LinkEvent(ifname="eth0", index=10, up=False))
            seen: list[PathEvent] = []
            for _ in range(10):
                await trio.sleep(1.0)
                seen.append(await h.events.receive())
            assert [type(e).__name__ for e in seen] == ["PathUp"] * 5 + ["PathDown"] * 5
            assert [e.path_id for e in seen] == [1, 2, 3, 4, 5] * 2
            nursery.cancel_scope.cancel()


async def test_the_channel_closes_when_the_wakeups_end(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            h = await run_harness(nursery, Script(machine(ETH)))
            await h.take(1)
            await h.wake.aclose()
            with pytest.raises(trio.EndOfChannel):
                await h.events.receive()


async def test_open_path_manager_yields_after_the_first_read(autojump_clock: trio.testing.MockClock) -> None:
    wake_send, wake_receive = trio.open_memory_channel[object](4)
    with trio.fail_after(TIMEOUT_S):
        async with open_path_manager(PathRules(), GATEWAY, read_state=Script(machine(ETH)),
                                     wakeups=wake_receive, log=print) as (manager, events):
            assert await events.receive() == up(1, ETH, 10)
            stats = manager.statistics()
            assert isinstance(stats, PathManagerStatistics) and stats.paths == 1
            with pytest.raises(AttributeError):
                stats.paths = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"settle_s": -1.0}, "settle_s"),
        ({"retry_s": 0.0}, "retry_s"),
        ({"channel_size": 0}, "channel_size"),
    ],
)
async def test_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async with open_path_manager(PathRules(), GATEWAY, read_state=Script(machine()), **kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_the_gateway_must_be_an_address() -> None:
    with pytest.raises(ValueError):
        async with open_path_manager(PathRules(), "gw.example", read_state=Script(machine())):
            pass  # pragma: no cover


async def test_this_machine_can_be_read_and_followed() -> None:
    """The real reader and netlink monitor on this namespace (read-only: nothing is changed)."""
    with trio.fail_after(10.0):
        async with open_path_manager(PathRules(), GATEWAY, log=print) as (manager, _events):
            stats = manager.statistics()
            assert stats.snapshots_read + stats.read_failures == 1
            assert all(p.ifname != "lo" for p in manager.paths)
