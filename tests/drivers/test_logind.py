"""logind's PrepareForSleep hint (drivers/logind.py), against a private dbus-daemon.

Determinism rules: every test that needs a bus starts its own ``dbus-daemon``
(a session-type bus on a socket in ``tmp_path``, allow-all policy) and kills it
in the fixture's cleanup.  A fake logind is a second jeepney connection that
owns ``org.freedesktop.login1`` and emits the signal.  Nothing waits on time:
callbacks report through a channel the test reads, and a message that must
*not* arrive is followed by a good signal it would have had to precede (the bus
keeps each sender's order; a second sender first completes a method call, after
which the bus has dispatched its earlier signal).  The one timeout test runs on
the autojump clock.  Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from jeepney import DBusAddress, HeaderFields, message_bus, new_signal
from jeepney.io.trio import DBusRouter, Proxy, open_dbus_router

from jvpn_trio.drivers.clock import Resumed, SuspendDetector
from jvpn_trio.drivers.logind import (
    LOGIND_BUS_NAME,
    LOGIND_INTERFACE,
    LOGIND_PATH,
    PREPARE_FOR_SLEEP,
    SleepSignals,
    SleepSignalsStatistics,
)

TIMEOUT = 5.0
DBUS_DAEMON = "dbus-daemon"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

LOGIND = DBusAddress(LOGIND_PATH, bus_name=LOGIND_BUS_NAME, interface=LOGIND_INTERFACE)


@attrs.define
class Bus:
    address: str
    process: trio.Process


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    """A private dbus-daemon, killed (and reaped) when the test ends."""
    daemon = shutil.which(DBUS_DAEMON)
    if daemon is None:
        pytest.skip(f"{DBUS_DAEMON} is not installed (apt-get install dbus-daemon; CI installs it)")
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=tmp_path / "bus"))
    process = await trio.lowlevel.open_process(
        [daemon, f"--config-file={config}", "--print-address", "--nofork"], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        printed = b""
        with trio.fail_after(TIMEOUT):
            while not printed.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"{DBUS_DAEMON} exited before printing its address: {printed!r}")
                printed += chunk
        yield Bus(address=printed.decode().strip(), process=process)
    finally:
        process.kill()
        with trio.move_on_after(TIMEOUT) as scope:
            scope.shield = True
            await process.wait()


class Recorder:
    """The callbacks: each appends to ``seen`` and wakes the test."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._send, self._receive = trio.open_memory_channel[str](16)

    def on_sleep(self) -> None:
        self.seen.append("sleep")
        self._send.send_nowait("sleep")

    def on_resume(self) -> None:
        self.seen.append("resume")
        self._send.send_nowait("resume")

    async def next(self) -> str:
        return await self._receive.receive()


async def own_logind_name(router: DBusRouter) -> None:
    (result,) = await Proxy(message_bus, router).RequestName(LOGIND_BUS_NAME)
    assert result == 1, result  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER


async def emit(router: DBusRouter, signature: str, body: tuple[object, ...], *, address: DBusAddress = LOGIND,
               destination: str | None = None) -> None:
    msg = new_signal(address, PREPARE_FOR_SLEEP, signature, body)
    if destination is not None:
        msg.header.fields[HeaderFields.destination] = destination
    await router.send(msg)


async def round_trip(router: DBusRouter) -> None:
    """Once this returns, the bus has dispatched every message ``router`` sent before it."""
    await Proxy(message_bus, router).GetId()


def test_the_default_is_the_system_bus_and_nothing_is_counted_before_serve() -> None:
    signals = SleepSignals()
    assert signals.bus_address is None
    assert signals.statistics() == SleepSignalsStatistics()
    with pytest.raises(ValueError):
        SleepSignals(connect_timeout_s=0)


async def test_sleep_then_resume_call_the_callbacks_in_order_and_are_counted(bus: Bus) -> None:
    logs: list[str] = []
    signals = SleepSignals(bus_address=bus.address, log=logs.append)
    recorder = Recorder()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery, open_dbus_router(bus=bus.address) as logind:
            await own_logind_name(logind)
            await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)
            assert signals.statistics().connected

            await emit(logind, "b", (True,))
            assert await recorder.next() == "sleep"
            assert signals.statistics().sleeps == 1
            await emit(logind, "b", (False,))
            assert await recorder.next() == "resume"
            nursery.cancel_scope.cancel()

    assert recorder.seen == ["sleep", "resume"]
    assert signals.statistics() == SleepSignalsStatistics(connected=True, sleeps=1, resumes=1)
    assert logs == []


async def test_signals_that_are_not_loginds_broadcast_are_filtered_counted_and_ignored(bus: Bus) -> None:
    logs: list[str] = []
    signals = SleepSignals(bus_address=bus.address, log=logs.append)
    recorder = Recorder()
    with trio.fail_after(TIMEOUT):
        async with (
            trio.open_nursery() as nursery,
            open_dbus_router(bus=bus.address) as logind,
            open_dbus_router(bus=bus.address) as impostor,
        ):
            await own_logind_name(logind)
            await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)
            (names,) = await Proxy(message_bus, impostor).ListNames()
            (listener,) = {n for n in names if n.startswith(":")} - {logind.unique_name, impostor.unique_name}

            # Not the owner of org.freedesktop.login1: the bus's sender match keeps it from us.
            await emit(impostor, "b", (False,))
            # Sent to our connection alone: the bus delivers it whatever the rules; we ignore it.
            await emit(impostor, "b", (False,), destination=listener)
            await round_trip(impostor)
            # The owner, but another object path: the bus's path match keeps it from us.
            await emit(logind, "b", (True,), address=DBusAddress("/elsewhere", interface=LOGIND_INTERFACE))
            # The owner, the right signal, the wrong body: delivered, counted as malformed.
            await emit(logind, "s", ("false",))
            await emit(logind, "bb", (False, False))
            # The sentinel: everything above reached the listener (or never will) before it.
            await emit(logind, "b", (True,))
            assert await recorder.next() == "sleep"
            nursery.cancel_scope.cancel()

    assert recorder.seen == ["sleep"]
    assert signals.statistics() == SleepSignalsStatistics(connected=True, sleeps=1, malformed=2, ignored=1)
    assert logs == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "FileNotFoundError"),
        ("refused", "ConnectionRefusedError"),
        ("not-unix", "unusable D-Bus address"),
    ],
)
async def test_no_bus_is_one_log_line_and_a_return_after_started(tmp_path: Path, case: str, expected: str) -> None:
    logs: list[str] = []
    address = {
        "missing": f"unix:path={tmp_path / 'missing'}",
        "refused": f"unix:path={tmp_path / 'refused'}",
        "not-unix": "tcp:host=localhost,port=1",
    }[case]
    recorder = Recorder()
    signals = SleepSignals(bus_address=address, log=logs.append)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refusing, trio.fail_after(TIMEOUT):
        refusing.bind(str(tmp_path / "refused"))  # bound, never listening: a connection is refused
        async with trio.open_nursery() as nursery:
            await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)
        # The nursery closed by itself: serve returned after started(), raising nothing.

    stats = signals.statistics()
    assert not stats.connected
    assert stats.unavailable_reason is not None and expected in stats.unavailable_reason
    assert len(logs) == 1 and stats.unavailable_reason in logs[0] and "logind" in logs[0]
    assert recorder.seen == []


async def test_a_bus_that_never_answers_is_given_up_after_the_connect_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "silent"
    logs: list[str] = []
    signals = SleepSignals(bus_address=f"unix:path={path}", connect_timeout_s=2.0, log=logs.append)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen()  # the kernel accepts the connection; nobody ever reads or answers
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                recorder = Recorder()
                await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)
                assert trio.current_time() - start == pytest.approx(2.0)

    assert signals.statistics().unavailable_reason == f"unix:path={path} did not answer within 2 s"
    assert len(logs) == 1


async def test_a_bus_that_hangs_up_during_set_up_is_one_log_line(tmp_path: Path) -> None:
    """Authentication passes, then the bus closes: jeepney's Hello fails inside its own nursery."""
    path = tmp_path / "hangs-up"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()

    async def hang_up_after_auth() -> None:
        conn, _ = await listener.accept()
        with conn:
            received = b""
            while b"\r\n" not in received:
                received += await conn.recv(4096)
            await conn.send(b"OK 0123456789abcdef0123456789abcdef\r\n")
            while b"BEGIN\r\n" not in received:
                received += await conn.recv(4096)

    logs: list[str] = []
    signals = SleepSignals(bus_address=f"unix:path={path}", log=logs.append)
    recorder = Recorder()
    with listener, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang_up_after_auth)
            await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)

    assert signals.statistics().unavailable_reason == (
        f"cannot use unix:path={path}: EndOfChannel: Socket closed at the other end"
    )
    assert len(logs) == 1


async def test_the_bus_going_away_ends_serve_with_one_log_line(bus: Bus) -> None:
    logs: list[str] = []
    signals = SleepSignals(bus_address=bus.address, log=logs.append)
    recorder = Recorder()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(signals.serve, recorder.on_sleep, recorder.on_resume)
            assert signals.statistics().connected
            bus.process.kill()
        # The nursery closed by itself: serve returned, raising nothing.

    stats = signals.statistics()
    assert not stats.connected
    assert stats.unavailable_reason == f"{bus.address} closed the connection"
    assert logs == [
        f"logind sleep/resume hint unavailable ({stats.unavailable_reason}); suspends are still noticed by the clock"
    ]
    assert recorder.seen == []


async def test_the_resume_hint_makes_the_suspend_detector_measure_at_once(bus: Bus) -> None:
    """The agent's wiring: logind's resume calls ``SuspendDetector.check_now``, which reports without waiting.

    The detector samples once an hour here, so only the hint can make it report within the bound.
    """
    kernel = {"boottime": 1_000.0, "monotonic": 1_000.0}
    detector = SuspendDetector(
        interval_s=3600.0, read_boottime=lambda: kernel["boottime"], read_monotonic=lambda: kernel["monotonic"]
    )
    signals = SleepSignals(bus_address=bus.address, log=lambda _line: None)
    reports: list[Resumed] = []
    reported = trio.Event()

    def report(resumed: Resumed) -> None:
        reports.append(resumed)
        reported.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery, open_dbus_router(bus=bus.address) as logind:
            await own_logind_name(logind)
            await nursery.start(detector.serve, report)
            await nursery.start(signals.serve, lambda: None, detector.check_now)
            kernel["boottime"] += 6.0  # the machine slept 6 s: CLOCK_BOOTTIME moved, CLOCK_MONOTONIC did not
            await emit(logind, "b", (False,))
            await reported.wait()
            nursery.cancel_scope.cancel()
    assert [r.suspended_for_s for r in reports] == [6.0]
    assert detector.statistics().samples == 1
