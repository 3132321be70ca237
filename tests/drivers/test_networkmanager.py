"""NetworkManager's Metered property (drivers/networkmanager.py): the mapping, the precedence, the follower.

Determinism rules: the mapping and the precedence are pure.  Every test that
needs a bus starts its own ``dbus-daemon`` (the ``bus`` fixture of
tests/drivers/test_logind.py) and a fake NetworkManager on it: a second
jeepney connection that owns ``org.freedesktop.NetworkManager``, answers
``GetDeviceByIpIface`` and ``Properties.Get`` from a table and emits
``PropertiesChanged``.  Nothing waits on time: callbacks report through a
channel the test reads, and a message that must *not* arrive is followed by
a good one it would have had to precede (the bus keeps each sender's order).
The timeout tests run on a mock clock that jumps only when nothing has
happened for a while of real time.  Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    MessageFlag,
    MessageType,
    message_bus,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.io.trio import DBusConnection, open_dbus_connection

from jvpn_trio.core import events as ev
from jvpn_trio.core.candidates import KIND_METERED, PathRule, PathRules
from jvpn_trio.core.ids import PathId
from jvpn_trio.drivers.client import ClientPath
from jvpn_trio.drivers.networkmanager import (
    GET_DEVICE_BY_IP_IFACE,
    METERED_PROPERTY,
    NM_BUS_NAME,
    NM_DEVICE_INTERFACE,
    PROPERTIES_CHANGED,
    PROPERTIES_INTERFACE,
    NetworkManagerCosts,
    NetworkManagerStatistics,
    NmMetered,
    cost_change,
    network_manager_opinion,
)
from jvpn_trio.core.candidates import PathCost
from tests.drivers.test_agent import P1, P2, P3, AgentWorld, running, session_of
from tests.drivers.test_logind import Bus, bus  # noqa: F401  (bus is a fixture)

TIMEOUT = 10.0
UNKNOWN_DEVICE = "org.freedesktop.NetworkManager.UnknownDevice"
DEVICES = {"if1": "/org/freedesktop/NetworkManager/Devices/1", "if2": "/org/freedesktop/NetworkManager/Devices/2"}


# -- the mapping and the precedence (pure) ---------------------------------------------------------


def test_nm_metered_values_are_networkmanagers() -> None:
    """NMMetered as nm-dbus-interface.h / nm-dbus-types.html number it."""
    assert [(m.name, m.value) for m in NmMetered] == [
        ("UNKNOWN", 0), ("YES", 1), ("NO", 2), ("GUESS_YES", 3), ("GUESS_NO", 4),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "opinion"),
    [(NmMetered.UNKNOWN, None), (NmMetered.YES, True), (NmMetered.NO, False), (NmMetered.GUESS_YES, True),
     (NmMetered.GUESS_NO, False), (5, None), (2**32 - 1, None)],
)  # fmt: skip
def test_yes_and_guess_yes_are_metered_no_and_guess_no_are_not_anything_else_is_no_opinion(
    value: int, opinion: bool | None
) -> None:
    assert network_manager_opinion(value) is opinion


@pytest.mark.parametrize("configured", [True, False, None])
@pytest.mark.parametrize("network_manager", [True, False, None])
@pytest.mark.parametrize("kind_default", [True, False])
def test_the_rule_wins_over_network_manager_which_wins_over_the_kind(
    configured: bool | None, network_manager: bool | None, kind_default: bool
) -> None:
    cost = PathCost(configured=configured, kind_default=kind_default)
    expected = configured if configured is not None else network_manager if network_manager is not None else kind_default
    assert cost.metered(network_manager) is expected
    assert cost.metered() is (configured if configured is not None else kind_default)
    assert cost.follows_network_manager is (configured is None)


def test_the_cost_inputs_come_from_the_rule_that_chose_the_path() -> None:
    rules = PathRules(
        rules=(
            PathRule(interface="wlan0", metered=True),  # a phone's hotspot seen as Wi-Fi
            PathRule(match="wwan*", kind="lte", metered=False),  # an unlimited plan
            PathRule(match="wl*"),  # no word on cost
            PathRule(match="wl*", metered=True),  # never chooses: the rule above takes every wl*
            PathRule(kind="lte"),
        )
    )
    assert PathCost.of(rules, label="interface=wlan0", kind="wifi") == PathCost(configured=True, kind_default=False)
    assert PathCost.of(rules, label="match=wwan*", kind="lte") == PathCost(configured=False, kind_default=True)
    assert PathCost.of(rules, label="match=wl*", kind="wifi") == PathCost(configured=None, kind_default=False)
    assert PathCost.of(rules, label="kind=lte", kind="lte") == PathCost(configured=None, kind_default=True)
    assert PathCost.of(PathRules(), label="auto", kind="lte") == PathCost(configured=None, kind_default=KIND_METERED["lte"])


def _path(i: int, *, metered: bool) -> ClientPath:
    return ClientPath(path=PathId(i), name=f"if{i}", kind="wifi", priority=10 * i, port=None, gateway=("192.0.2.1", 1),
                      metered=metered)  # fmt: skip


def test_a_cost_change_is_an_input_only_when_the_cost_moves() -> None:
    paths = {PathId(1): _path(1, metered=False), PathId(2): _path(2, metered=False)}
    costs = {PathId(1): PathCost(kind_default=False), PathId(2): PathCost(configured=False)}
    assert cost_change(paths, costs, "if1", True) == ev.PathCostChanged(path=PathId(1), metered=True)
    assert cost_change(paths, costs, "if1", False) is None  # as it is
    assert cost_change(paths, costs, "if1", None) is None  # no opinion: the kind's default, as it is
    assert cost_change(paths, costs, "if2", True) is None  # the rule said unmetered
    assert cost_change(paths, costs, "if9", True) is None  # not a path
    metered = {PathId(1): _path(1, metered=True)}
    assert cost_change(metered, costs, "if1", None) == ev.PathCostChanged(path=PathId(1), metered=False)


def test_the_defaults_are_the_system_bus_and_nothing_counted() -> None:
    costs = NetworkManagerCosts()
    assert costs.bus_address is None
    assert costs.statistics() == NetworkManagerStatistics()
    with pytest.raises(ValueError):
        NetworkManagerCosts(connect_timeout_s=0)
    with pytest.raises(ValueError):
        NetworkManagerCosts(call_timeout_s=-1)


# -- a fake NetworkManager on a private bus --------------------------------------------------------


class FakeNetworkManager:
    """Owns NM's name; answers GetDeviceByIpIface and Get(Device, Metered) from ``metered``; emits changes."""

    def __init__(self, conn: DBusConnection, metered: dict[str, int], *, silent: bool = False) -> None:
        self.conn = conn
        self.metered = metered  # ifname -> NMMetered; an ifname absent here is UnknownDevice
        self.silent = silent  # answer nothing (a wedged NM)
        self.calls: list[tuple[str, str, bool]] = []  # (member, path, no_auto_start)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One task reads the connection: the name's reply, then every call (a router adds nothing here)."""
        serial = next(self.conn.outgoing_serial)
        await self.conn.send(message_bus.RequestName(NM_BUS_NAME), serial=serial)
        while True:
            msg = await self.conn.receive()
            if msg.header.fields.get(HeaderFields.reply_serial) == serial:
                assert msg.body == (1,), msg.body  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
                task_status.started()
            elif msg.header.message_type is MessageType.method_call:
                await self._answer(msg)

    async def _answer(self, msg: Message) -> None:
        fields = msg.header.fields
        member, path = fields[HeaderFields.member], fields[HeaderFields.path]
        self.calls.append((member, path, bool(msg.header.flags & MessageFlag.no_auto_start)))
        if self.silent:
            return
        if member == GET_DEVICE_BY_IP_IFACE:
            (ifname,) = msg.body
            if ifname in self.metered:
                await self.conn.send(new_method_return(msg, "o", (DEVICES[ifname],)))
            else:
                await self.conn.send(new_error(msg, UNKNOWN_DEVICE, "s", ("No device found for the requested iface.",)))
        elif member == "Get":
            ifname = next(name for name, device in DEVICES.items() if device == path)
            await self.conn.send(new_method_return(msg, "v", (("u", self.metered[ifname]),)))

    async def change(self, ifname: str, value: int, *, body: tuple[object, ...] | None = None) -> None:
        self.metered[ifname] = value
        address = DBusAddress(DEVICES[ifname], interface=PROPERTIES_INTERFACE)
        if body is None:
            body = (NM_DEVICE_INTERFACE, {METERED_PROPERTY: ("u", value)}, [])
        await self.conn.send(new_signal(address, PROPERTIES_CHANGED, "sa{sv}as", body))


class Opinions:
    """The callback: each (ifname, opinion) is kept and wakes the test."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool | None]] = []
        self._send, self._receive = trio.open_memory_channel[tuple[str, bool | None]](16)

    def __call__(self, ifname: str, opinion: bool | None) -> None:
        self.seen.append((ifname, opinion))
        self._send.send_nowait((ifname, opinion))

    async def next(self) -> tuple[str, bool | None]:
        return await self._receive.receive()


@asynccontextmanager
async def network_manager(
    address: str, metered: dict[str, int], *, silent: bool = False
) -> AsyncIterator[tuple[trio.Nursery, FakeNetworkManager]]:
    conn = await open_dbus_connection(address)
    async with conn, trio.open_nursery() as nursery:
        fake = FakeNetworkManager(conn, metered, silent=silent)
        await nursery.start(fake.serve)
        yield nursery, fake
        nursery.cancel_scope.cancel()


async def test_a_watched_interface_gets_its_metered_value_and_every_change(bus: Bus) -> None:  # noqa: F811
    logs: list[str] = []
    costs = NetworkManagerCosts(bus_address=bus.address, log=logs.append)
    opinions = Opinions()
    with trio.fail_after(TIMEOUT):
        async with network_manager(bus.address, {"if1": NmMetered.GUESS_NO, "if2": NmMetered.NO}) as (nursery, nm):
            costs.watch_nowait("if1")  # before serve: queued until the bus is there
            await nursery.start(costs.serve, opinions)
            assert await opinions.next() == ("if1", False)
            await nm.change("if1", NmMetered.YES)  # the user marked the network metered
            assert await opinions.next() == ("if1", True)
            await nm.change("if2", NmMetered.YES)  # a device no path of ours is on: not delivered
            await nm.change("if1", NmMetered.UNKNOWN)  # the sentinel
            assert await opinions.next() == ("if1", None)
            costs.watch_nowait("if2")
            assert await opinions.next() == ("if2", True)
            costs.unwatch_nowait("if1")  # its path went down
            await nm.change("if1", NmMetered.GUESS_YES)
            await nm.change("if2", NmMetered.GUESS_NO)  # the sentinel
            assert await opinions.next() == ("if2", False)
            assert costs.statistics().watched == 1
            nursery.cancel_scope.cancel()

    assert opinions.seen == [("if1", False), ("if1", True), ("if1", None), ("if2", True), ("if2", False)]
    assert costs.statistics() == NetworkManagerStatistics(connected=True, watched=1, opinions=5)
    assert {(member, no_auto_start) for member, _path, no_auto_start in nm.calls} == {
        (GET_DEVICE_BY_IP_IFACE, True), ("Get", True)
    }
    assert logs == []


async def test_an_interface_nm_does_not_manage_and_malformed_signals_are_counted_not_delivered(bus: Bus) -> None:  # noqa: F811
    costs = NetworkManagerCosts(bus_address=bus.address, log=lambda _line: None)
    opinions = Opinions()
    with trio.fail_after(TIMEOUT):
        async with network_manager(bus.address, {"if1": NmMetered.NO}) as (nursery, nm):
            await nursery.start(costs.serve, opinions)
            costs.watch_nowait("veth-lab")  # UnknownDevice: the path keeps its configured cost
            costs.watch_nowait("if1")
            assert await opinions.next() == ("if1", False)
            assert costs.statistics().unmanaged == 1
            await nm.change("if1", NmMetered.YES, body=(NM_DEVICE_INTERFACE, {METERED_PROPERTY: ("s", "yes")}, []))
            await nm.change("if1", NmMetered.YES, body=(NM_DEVICE_INTERFACE, {"Mtu": ("u", 1400)}, []))  # not ours
            await nm.change("if1", NmMetered.GUESS_YES)  # the sentinel
            assert await opinions.next() == ("if1", True)
            nursery.cancel_scope.cancel()

    assert opinions.seen == [("if1", False), ("if1", True)]
    stats = costs.statistics()
    assert (stats.unmanaged, stats.malformed, stats.opinions) == (1, 1, 2)


async def test_nm_tells_the_agent_which_remembers_the_cost(bus: Bus) -> None:  # noqa: F811
    """NM -> the follower's glue (``cost_change``, as ``PathFollower.network_manager_said``) -> the agent."""
    world = AgentWorld()
    agent = world.agent
    costs_of = {p: PathCost(kind_default=path.metered) for p, path in agent.paths.items()}
    costs = NetworkManagerCosts(bus_address=bus.address, log=lambda _line: None)
    submitted: list[ev.PathCostChanged] = []
    told = trio.Event()

    def network_manager_said(ifname: str, opinion: bool | None) -> None:
        change = cost_change(agent.paths, costs_of, ifname, opinion)
        if change is not None:
            assert agent.submit_nowait(change)  # no session yet: remembered
            submitted.append(change)
            told.set()

    assert agent.paths[P2].name == "if2" and not agent.paths[P2].metered
    with trio.fail_after(TIMEOUT):
        async with network_manager(bus.address, {"if2": NmMetered.GUESS_YES}) as (nursery, _nm):
            await nursery.start(costs.serve, network_manager_said)
            costs.watch_nowait("if2")
            await told.wait()
            nursery.cancel_scope.cancel()
    assert submitted == [ev.PathCostChanged(path=P2, metered=True)]
    assert agent.paths[P2].metered


async def test_a_remembered_cost_reaches_every_later_session_and_a_live_one_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = AgentWorld()
    async with running(world, within=120, gateway=False) as nursery:
        world.agent.submit_nowait(ev.PathCostChanged(path=P2, metered=True))  # while connecting
        await world.start_gateway(nursery)
        status = await world.wait_attached(1)
        first = session_of(status)
        assert status.snapshot is not None
        assert {p.path: p.metered for p in status.snapshot.paths} == {P1: False, P2: True, P3: False}
        world.agent.submit_nowait(ev.PathCostChanged(path=P3, metered=True))  # a live session hears it
        await world.agent.status.wait_value(
            lambda s: s is not None and s.snapshot is not None and {p.path: p.metered for p in s.snapshot.paths}[P3]
        )
        await world.kill_gateway()
        await world.start_gateway(nursery)
        status = await world.wait_attached(2)
        assert session_of(status) != first and status.snapshot is not None
        assert {p.path: p.metered for p in status.snapshot.paths} == {P1: False, P2: True, P3: True}


# -- no NetworkManager: one line, then nothing -------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [("missing", "FileNotFoundError"), ("refused", "ConnectionRefusedError"), ("not-unix", "unusable D-Bus address")],
)
async def test_no_bus_is_one_log_line_and_watching_is_then_a_no_op(tmp_path: Path, case: str, expected: str) -> None:
    logs: list[str] = []
    address = {
        "missing": f"unix:path={tmp_path / 'missing'}",
        "refused": f"unix:path={tmp_path / 'refused'}",
        "not-unix": "tcp:host=localhost,port=1",
    }[case]
    costs = NetworkManagerCosts(bus_address=address, log=logs.append)
    opinions = Opinions()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refusing, trio.fail_after(TIMEOUT):
        refusing.bind(str(tmp_path / "refused"))  # bound, never listening: a connection is refused
        costs.watch_nowait("if1")
        async with trio.open_nursery() as nursery:
            await nursery.start(costs.serve, opinions)
        # The nursery closed by itself: serve returned after started(), raising nothing.
    costs.watch_nowait("if2")

    stats = costs.statistics()
    assert not stats.connected and stats.watched == 0
    assert stats.unavailable_reason is not None and expected in stats.unavailable_reason
    assert len(logs) == 1 and stats.unavailable_reason in logs[0] and "NetworkManager" in logs[0]
    assert opinions.seen == []


async def test_a_bus_without_network_manager_is_one_log_line(bus: Bus) -> None:  # noqa: F811
    logs: list[str] = []
    costs = NetworkManagerCosts(bus_address=bus.address, log=logs.append)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(costs.serve, Opinions())
    assert costs.statistics().unavailable_reason == f"NetworkManager is not running on {bus.address}"
    assert len(logs) == 1


async def test_a_bus_that_never_answers_is_given_up_after_the_connect_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "silent"
    logs: list[str] = []
    costs = NetworkManagerCosts(bus_address=f"unix:path={path}", connect_timeout_s=2.0, log=logs.append)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen()  # the kernel accepts the connection; nobody ever reads or answers
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                await nursery.start(costs.serve, Opinions())
                assert trio.current_time() - start == pytest.approx(2.0)
    assert costs.statistics().unavailable_reason == f"unix:path={path} did not answer within 2 s"
    assert len(logs) == 1


async def test_a_network_manager_that_never_answers_costs_one_call_timeout_per_lookup(
    bus: Bus, mock_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    """The looker-up gives up after call_timeout_s (virtual); the agent never waited on it."""
    # Virtual time jumps only once the bus has been quiet for a while of real time; the bounds
    # other than the call's are far off, so a slow machine cannot jump past them first.
    mock_clock.autojump_threshold = 0.5
    costs = NetworkManagerCosts(
        bus_address=bus.address, connect_timeout_s=1000.0, call_timeout_s=30.0, log=lambda _line: None
    )
    opinions = Opinions()
    with trio.fail_after(2000.0):
        async with network_manager(bus.address, {"if1": NmMetered.YES}, silent=True) as (nursery, nm):
            await nursery.start(costs.serve, opinions)
            costs.watch_nowait("if1")
            costs.watch_nowait("if2")
            await trio.sleep(59.0)  # virtual: the second lookup is still waiting
            assert costs.statistics().failed_calls == 1
            await trio.sleep(2.0)
            assert costs.statistics().failed_calls == 2
            nursery.cancel_scope.cancel()
    assert [member for member, _path, _flag in nm.calls] == [GET_DEVICE_BY_IP_IFACE, GET_DEVICE_BY_IP_IFACE]
    assert opinions.seen == [] and costs.statistics().connected


async def test_the_bus_going_away_ends_serve_with_one_log_line(bus: Bus) -> None:  # noqa: F811
    logs: list[str] = []
    costs = NetworkManagerCosts(bus_address=bus.address, log=logs.append)
    opinions = Opinions()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with network_manager(bus.address, {"if1": NmMetered.NO}):
                await nursery.start(costs.serve, opinions)
                costs.watch_nowait("if1")
                assert await opinions.next() == ("if1", False)
            bus.process.kill()  # NM's connection closed first, so only ours sees the bus go
        # The nursery closed by itself: serve returned, raising nothing.
    stats = costs.statistics()
    assert stats.unavailable_reason == f"{bus.address} closed the connection" and stats.watched == 0
    assert len(logs) == 1
