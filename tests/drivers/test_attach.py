"""The attach protocol (v1) on a real unix socket: hello, every command and error, the stream, isolation, access.

Determinism rules: every test runs under ``fail_after``.  The event source
is an :class:`EventSink` without a file (``emit`` is synchronous), driven by
the test; the agent is a fake that records the inputs it is given.  Tests
about stalls use ``autojump_clock``: a local unix socket has its bytes in
the kernel before the sender returns, so virtual time only jumps when every
task is really waiting (here: on a client that never reads).  Tests with a
non-root peer run a stdlib-only Python under ``setpriv`` (util-linux) as
``nobody``, on the real clock; they need root to switch users and are
skipped, with that reason, without it.  No test sleeps.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import shutil
import socket as stdlib_socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from jvpn_trio.core import events as ev
from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.ids import PathId
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import control
from jvpn_trio.drivers.attach import AttachedEvent, ControlClient, Gap, open_control_client
from jvpn_trio.drivers.control import (
    GROUP_SOCKET_MODE,
    SOCKET_MODE,
    STATUS_REQUEST,
    Access,
    ControlAccess,
    ControlError,
    ControlServer,
    ErrorCode,
    PeerCredentials,
    access_of,
    command_handler,
    query_control,
    serve_control,
    steering_commands,
)
from jvpn_trio.drivers.event_sink import EventSink

IO_TIMEOUT_S = 10.0
STATUS_REPLY = {"role": "client", "state": "ATTACHED", "version": 3}
NOBODY_GROUP = "users"  # an existing group the nobody peer is given with setpriv --groups


def make_event(i: int) -> EmitEvent:
    return EmitEvent(
        kind=EventKind.PATH_HEALTH,
        t=i * 0.25,
        role=Role.CLIENT,
        session="000102030405060708090a0b0c0d0e0f",
        version=i,
        reason=ReasonCode.WITHIN_THRESHOLDS,
        policy="0123456789abcdef",
        details={"path": "p1", "n": i},
    )


@attrs.frozen
class FakePath:
    name: str


@attrs.define
class FakeAgent:
    """A Steerable that records what reached it; ``accept=False`` is a full inbox (or no session)."""

    paths: dict[PathId, FakePath] = attrs.field(factory=lambda: {PathId(1): FakePath("eth0"), PathId(2): FakePath("wlan0")})
    inputs: list[object] = attrs.field(factory=list)
    accept: bool = True
    held: bool = False
    live_session: bool = True

    def submit_nowait(self, event: Any) -> bool:
        if self.accept:
            self.inputs.append(event)
        return self.accept

    callers: list[str] = attrs.field(factory=list)

    def disconnect_nowait(self, by: str = "operator") -> bool:
        self.callers.append(by)
        self.held = True
        closed, self.live_session = self.live_session, False
        return closed

    def reconnect_nowait(self, by: str = "operator") -> bool:
        self.callers.append(by)
        self.held = False
        return self.live_session


@attrs.define
class Rig:
    path: Path
    sink: EventSink
    agent: FakeAgent
    server: ControlServer
    logs: list[str]


def handler_for(agent: FakeAgent) -> control.Handler:
    return command_handler({"status": lambda _r: dict(STATUS_REPLY), "down": lambda _r: {"closing": True},
                            **steering_commands(agent)})  # fmt: skip


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    path = tmp_path / "run" / "ctl.sock"
    sink = EventSink(None, capacity=1, history=50)
    agent = FakeAgent()
    logs: list[str] = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(serve_control, path, handler_for(agent), events=sink, access=ControlAccess(group=None), log=logs.append)
        )
        yield Rig(path, sink, agent, server, logs)
        nursery.cancel_scope.cancel()


class Raw:
    """A hand-written client: lines out, lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, obj: object) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\n")

    async def line(self) -> Any:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def ask(self, obj: object) -> Any:
        await self.send(obj)
        return await self.line()


async def open_raw(path: Path) -> Raw:
    return Raw(await trio.open_unix_socket(str(path)))


# -- hello and versions -------------------------------------------------------------


async def test_hello_tells_version_access_and_the_commands_this_peer_may_use(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            hello = client.hello
    assert hello is not None
    assert hello.versions == (1,) and hello.access == "steer" and hello.can_steer
    assert hello.uid == os.geteuid() and hello.run == rig.sink.run_id
    assert hello.commands == ("disconnect", "down", "events", "pin", "reconnect", "reevaluate", "status", "unpin")


async def test_an_unsupported_version_is_refused_with_the_supported_ones(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        raw = await open_raw(rig.path)
        async with raw.stream:
            hello = await raw.ask({"hello": 2, "id": "h"})
            request = await raw.ask({"v": 7, "id": 3, "cmd": "status"})
            legacy = await raw.ask({"cmd": "status"})  # still v0: the failed hello changed nothing
    error = {"code": "unsupported_version", "message": "protocol version 2 is not supported (supported: 1)", "versions": [1]}
    assert hello == {"v": 1, "id": "h", "ok": False, "error": error}
    assert request["error"]["code"] == "unsupported_version" and request["id"] == 3
    assert legacy == STATUS_REPLY


async def test_v1_framing_by_hello_or_by_v_with_ids_echoed(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        raw = await open_raw(rig.path)
        async with raw.stream:
            by_v = await raw.ask({"v": 1, "id": "a", "cmd": "status"})
            v0 = await raw.ask({"cmd": "status"})
            hello = await raw.ask({"hello": 1})
            after_hello = await raw.ask({"id": 9, "cmd": "status"})
            no_id = await raw.ask({"cmd": "status"})
    assert by_v == {"v": 1, "id": "a", "ok": True, "result": STATUS_REPLY}
    assert v0 == STATUS_REPLY
    assert hello["ok"] is True and hello["id"] is None
    assert after_hello == {"v": 1, "id": 9, "ok": True, "result": STATUS_REPLY}
    assert no_id == {"v": 1, "id": None, "ok": True, "result": STATUS_REPLY}


async def test_single_shot_v0_clients_work_unchanged(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        assert await query_control(rig.path, STATUS_REQUEST, timeout=5.0) == STATUS_REPLY
        assert await query_control(rig.path, {"cmd": "down"}, timeout=5.0) == {"closing": True}
        with pytest.raises(ControlError) as unknown:
            await query_control(rig.path, {"cmd": "reboot"}, timeout=5.0)
    assert str(unknown.value).startswith(f"{rig.path}: unknown command 'reboot' (known: disconnect, down, pin,")


# -- errors -----------------------------------------------------------------------------


async def test_every_bad_request_gets_a_clear_coded_reply_and_the_connection_goes_on(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        raw = await open_raw(rig.path)
        async with raw.stream:
            await raw.ask({"hello": 1})
            await raw.stream.send_all(b"{not json\n")
            malformed = await raw.line()
            not_object = await raw.ask([1, 2])
            unknown = await raw.ask({"id": 1, "cmd": "reboot"})
            missing = await raw.ask({"id": 2})
            bad_id = await raw.ask({"id": [1], "cmd": "status"})
            bool_id = await raw.ask({"id": True, "cmd": "status"})
            no_path = await raw.ask({"id": 3, "cmd": "pin"})
            wrong_path = await raw.ask({"id": 4, "cmd": "pin", "path": "p9"})
            bad_replay = await raw.ask({"id": 5, "cmd": "events", "replay": -1})
            ahead = await raw.ask({"id": 6, "cmd": "events", "since": 10})
            still_fine = await raw.ask({"id": 7, "cmd": "status"})
    codes = [r["error"]["code"] for r in (malformed, not_object, unknown, missing, bad_id, bool_id, no_path, wrong_path, bad_replay, ahead)]
    assert codes == ["malformed", "malformed", "unknown_command", "bad_request", "bad_request", "bad_request",
                     "bad_request", "unknown_path", "bad_request", "bad_request"]  # fmt: skip
    assert malformed["id"] is None and malformed["error"]["message"].startswith("malformed request: ")
    assert not_object["error"]["message"] == "malformed request: expected a JSON object, got list"
    assert unknown["id"] == 1 and unknown["error"]["message"].startswith("unknown command 'reboot' (known: ")
    assert missing["error"]["message"] == 'request needs "cmd" (a string)'
    assert wrong_path["error"]["message"] == "no path 'p9' (paths: p1 (eth0), p2 (wlan0))"
    assert ahead["error"]["message"].startswith("since=10 is ahead of this sink")
    assert still_fine == {"v": 1, "id": 7, "ok": True, "result": STATUS_REPLY}
    errors = dict(rig.server.statistics().errors)
    assert errors == {"malformed": 2, "unknown_command": 1, "bad_request": 6, "unknown_path": 1}
    assert rig.agent.inputs == []


async def test_an_oversized_line_gets_too_long_and_the_connection_closes(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        raw = await open_raw(rig.path)
        async with raw.stream:
            await raw.ask({"hello": 1})
            try:
                await raw.stream.send_all(b'{"cmd":"status","pad":"' + b"x" * control.MAX_REQUEST_BYTES + b'"}\n')
            except trio.BrokenResourceError:
                pass  # the server may close before reading it all: that is the point
            reply = await raw.line()
            with pytest.raises(EOFError):
                await raw.line()
    assert reply["error"] == {"code": "too_long", "message": f"request exceeds {control.MAX_REQUEST_BYTES} bytes"}
    assert dict(rig.server.statistics().errors) == {"too_long": 1}


async def test_events_needs_v1_and_one_subscription_per_connection(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError, match='events needs protocol v1: send {"hello": 1} first'):
            await query_control(rig.path, {"cmd": "events"}, timeout=5.0)
        async with open_control_client(rig.path) as client:
            await client.subscribe()
            with pytest.raises(ControlError, match="already subscribed"):
                await client.subscribe()
            with pytest.raises(ControlError, match="already subscribed") as info:
                await client._call({"cmd": "events"})  # the server says so too
    assert info.value.code is ErrorCode.BAD_REQUEST


async def test_a_server_without_an_event_source_does_not_know_events(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_control, path, handler_for(FakeAgent()), access=ControlAccess(group=None)))
            async with open_control_client(path) as client:
                assert client.hello is not None and "events" not in client.hello.commands
                with pytest.raises(ControlError) as info:
                    await client.subscribe()
            nursery.cancel_scope.cancel()
    assert info.value.code is ErrorCode.UNKNOWN_COMMAND


# -- steering ---------------------------------------------------------------------------


async def test_each_steering_command_is_one_core_input_or_agent_call(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            by_id = await client.pin("p2")
            by_name = await client.pin("eth0")
            unpin = await client.unpin()
            again = await client.reevaluate()
            disconnect = await client.disconnect()
            held = rig.agent.held
            reconnect = await client.reconnect()
    assert by_id == {"input": "PinRequested", "path": "p2", "interface": "wlan0", "reason": "OPERATOR_PIN"}
    assert by_name["path"] == "p1"
    assert unpin == {"input": "PinRequested", "path": None, "reason": "OPERATOR_UNPIN"}
    assert again == {"input": "ReevaluateRequested", "reason": "OPERATOR_REEVALUATE"}
    assert disconnect == {"input": "CloseRequested", "reason": "OPERATOR_DISCONNECT", "session_closed": True, "held": True}
    assert held and not rig.agent.held
    assert reconnect == {"input": None, "reason": "OPERATOR_RECONNECT", "session_closed": False, "held": False}
    # Each input names its caller as the kernel saw it (SO_PEERCRED), for the event log.
    me = f"uid {os.geteuid()}"
    assert rig.agent.inputs == [
        ev.PinRequested(path=PathId(2), by=me),
        ev.PinRequested(path=PathId(1), by=me),
        ev.PinRequested(path=None, by=me),
        ev.ReevaluateRequested(by=me),
    ]
    assert rig.agent.callers == [me, me]


async def test_a_caller_field_sent_by_the_client_cannot_name_someone_else(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            await client.request("pin", path="p1", caller="uid 0")
    assert rig.agent.inputs == [ev.PinRequested(path=PathId(1), by=f"uid {os.geteuid()}")]


async def test_an_input_the_agent_cannot_take_is_refused_not_queued(rig: Rig) -> None:
    rig.agent.accept = False
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            with pytest.raises(ControlError) as info:
                await client.pin("p1")
    assert info.value.code is ErrorCode.REFUSED
    assert "no live session, or its inbox is full" in str(info.value)


# -- the event stream -------------------------------------------------------------------


async def collect(items: AsyncIterator[Any], n: int) -> list[Any]:
    out = []
    async for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_replay_then_live_has_no_gap_and_no_duplicate(rig: Rig) -> None:
    for i in range(1, 11):
        rig.sink.emit(make_event(i))
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            sub = await client.subscribe(replay=4)
            for i in range(11, 21):  # live, while the replay may still be on its way
                rig.sink.emit(make_event(i))
            items = await collect(sub, 14)
            # The connection still answers requests between events.
            assert await client.status() == STATUS_REPLY
            rig.sink.emit(make_event(21))
            last = await collect(sub, 1)
    assert (sub.replay, sub.missed, sub.next_seq, sub.run) == (4, 0, 11, rig.sink.run_id)
    assert all(isinstance(item, AttachedEvent) for item in items + last)
    assert [item.seq for item in items + last] == list(range(7, 22))
    assert [item.event for item in items + last] == [make_event(i) for i in range(7, 22)]
    assert rig.server.statistics().events_sent == 15


async def test_since_resumes_after_the_last_seen_event_and_counts_what_left_the_history(rig: Rig) -> None:
    for i in range(1, 61):  # the history keeps 50: seq 11..60
        rig.sink.emit(make_event(i))
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            resumed = await client.subscribe(since=55)
            got = await collect(resumed, 5)
        async with open_control_client(rig.path) as client:
            old = await client.subscribe(since=5)
            first = await collect(old, 1)
        async with open_control_client(rig.path) as client:
            everything = await client.subscribe()
    assert [item.seq for item in got] == [56, 57, 58, 59, 60]
    assert (old.replay, old.missed, first[0].seq) == (50, 5, 11)
    assert (everything.replay, everything.next_seq) == (50, 61)
    assert rig.server.statistics().events_missed == 5


async def test_several_uis_attach_at_once_and_each_gets_every_event(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as a, open_control_client(rig.path) as b:
            sub_a, sub_b = await a.subscribe(), await b.subscribe()
            for i in range(1, 101):
                rig.sink.emit(make_event(i))
            got_a, got_b = await collect(sub_a, 100), await collect(sub_b, 100)
            assert rig.server.statistics().subscribers == 2
    assert [x.seq for x in got_a] == [x.seq for x in got_b] == list(range(1, 101))


async def test_the_stream_ends_when_the_sink_closes(rig: Rig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_control_client(rig.path) as client:
            sub = await client.subscribe()
            rig.sink._close()
            assert [item async for item in sub] == []
            with pytest.raises(ControlError, match="closed the connection"):
                await client.status()


# -- isolation: a stalled reader changes nothing for the agent --------------------------


def stalled_reader(path: Path) -> stdlib_socket.socket:
    """A client that subscribes and then never reads, with a tiny receive buffer."""
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 1024)
    sock.connect(str(path))
    sock.sendall(b'{"hello":1}\n{"v":1,"id":1,"cmd":"events","replay":0}\n')
    return sock


async def test_a_stalled_reader_is_dropped_and_counted_and_changes_nothing_for_the_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "ctl.sock"
    sink = EventSink(None, capacity=1, history=10)
    rounds, per_round = 50, 100
    with trio.fail_after(IO_TIMEOUT_S * 10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_control, path, handler_for(FakeAgent()), events=sink, access=ControlAccess(group=None),
                                  send_timeout_s=5.0, subscriber_capacity=512)  # fmt: skip
            )
            stalled = stalled_reader(path)
            async with open_control_client(path) as good:
                sub = await good.subscribe(replay=0)
                while server.statistics().subscribers < 2:  # the stalled one's subscription is in place
                    await trio.testing.wait_all_tasks_blocked()
                received: list[Any] = []
                for r in range(rounds):
                    before = trio.current_time()
                    for i in range(per_round):  # the agent's side: synchronous, never awaits
                        sink.emit(make_event(r * per_round + i))
                    assert trio.current_time() == before  # no checkpoint, no time spent waiting on anyone
                    received += await collect(sub, per_round)
                # The stalled reader is disconnected after the send timeout, counted.
                with trio.fail_after(60):
                    while server.statistics().stalled_disconnects < 1:
                        await trio.sleep(1)
            nursery.cancel_scope.cancel()
    total = rounds * per_round
    assert [item.seq for item in received] == list(range(1, total + 1))
    assert not any(isinstance(item, Gap) for item in received)
    stats = server.statistics()
    assert stats.stalled_disconnects == 1 and stats.subscribers == 0
    sink_stats = sink.statistics()
    assert sink_stats.emitted == total
    by_name = {s.name: s for s in sink_stats.subscribers}
    assert len(by_name) == 2
    stalled_sub = next(s for s in sink_stats.subscribers if s.dropped_full)
    good_sub = next(s for s in sink_stats.subscribers if s is not stalled_sub)
    assert good_sub.delivered == total and good_sub.dropped_full == 0
    assert stalled_sub.dropped_full > 0 and stalled_sub.delivered + stalled_sub.dropped_full <= total
    # The stalled client finds its connection closed once it reads what was buffered.
    stalled.setblocking(False)
    tail = b""
    with stalled:
        while True:
            try:
                chunk = stalled.recv(1 << 20)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(stalled)
                continue
            if not chunk:
                break
            tail += chunk
    assert tail.startswith(b'{"id":null,"ok":true,"result":{')


async def test_a_slow_reader_is_told_of_the_gap_and_goes_on(tmp_path: Path) -> None:
    # Real clock: nothing here waits on time (the emits are synchronous).
    path = tmp_path / "ctl.sock"
    sink = EventSink(None, capacity=1, history=10)
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_control, path, handler_for(FakeAgent()), events=sink, access=ControlAccess(group=None),
                                  subscriber_capacity=8)  # fmt: skip
            )
            async with open_control_client(path) as client:
                sub = await client.subscribe(replay=0)
                await trio.testing.wait_all_tasks_blocked()  # the server's pump waits for the first event
                for i in range(1, 21):  # a burst larger than its queue
                    sink.emit(make_event(i))
                first = await collect(sub, 9)  # 1 handed to the waiting pump, 8 queued, 11 dropped
                sink.emit(make_event(21))
                rest = await collect(sub, 2)  # the gap is announced with the next event
            nursery.cancel_scope.cancel()
    assert [x.seq for x in first] == list(range(1, 10))
    assert rest[0] == Gap(missed=11, next_seq=21) and rest[1].seq == 21
    assert (server.statistics().gaps, server.statistics().events_missed) == (1, 11)


# -- access -------------------------------------------------------------------------------


def test_access_of_root_owner_group_and_others() -> None:
    def peer(uid: int, gid: int = 100, groups: tuple[int, ...] = ()) -> PeerCredentials:
        return PeerCredentials(pid=1, uid=uid, gid=gid, groups=groups)

    common: dict[str, Any] = {"owner_uid": 0, "group_gid": 500}
    assert access_of(peer(0), steer_group=False, **common) is Access.STEER
    assert access_of(peer(1000, gid=500), steer_group=False, **common) is Access.READ
    assert access_of(peer(1000, groups=(20, 500)), steer_group=False, **common) is Access.READ
    assert access_of(peer(1000, groups=(500,)), steer_group=True, **common) is Access.STEER
    assert access_of(peer(1000, groups=(20,)), steer_group=True, **common) is Access.NONE
    assert access_of(peer(1000, gid=500), owner_uid=0, group_gid=None, steer_group=True) is Access.NONE
    assert access_of(peer(1000), owner_uid=1000, group_gid=None, steer_group=False) is Access.STEER
    assert access_of(None, steer_group=True, **common) is Access.NONE


async def test_a_missing_group_keeps_the_socket_owner_only_and_says_so_once(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    logs: list[str] = []
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve_control, path, handler_for(FakeAgent()), access=ControlAccess(group="no-such-group-jvpn"), log=logs.append)
            )
            assert stat.S_IMODE(path.lstat().st_mode) == SOCKET_MODE
            nursery.cancel_scope.cancel()
    assert logs == [f"group 'no-such-group-jvpn' does not exist: the control socket {path} is for its owner only"]


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="switching to another uid needs root and setpriv"
)

#: What the non-root peer runs: stdlib only (it cannot import the package from root's tree).
PEER_SCRIPT = r"""
import json, socket, sys
path, lines = sys.argv[1], json.loads(sys.argv[2])
out = []
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno}))
    sys.exit(0)
f = s.makefile("rwb")
for line in lines:
    f.write(json.dumps(line).encode() + b"\n")
    f.flush()
    out.append(json.loads(f.readline()))
print(json.dumps(out))
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory ``nobody`` can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="jvpn-control-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def as_nobody(path: Path, lines: list[object], *, groups: str | None) -> Any:
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup"]
    argv += [f"--groups={groups}"] if groups else ["--clear-groups"]
    argv += [shutil.which("python3") or sys.executable, "-I", "-c", PEER_SCRIPT, str(path), json.dumps(lines)]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def serve_in(nursery: trio.Nursery, path: Path, agent: FakeAgent, access: ControlAccess) -> ControlServer:
    sink = EventSink(None, capacity=1)
    server: ControlServer = await nursery.start(
        functools.partial(serve_control, path, handler_for(agent), events=sink, access=access)
    )
    return server


PEER_REQUESTS: list[object] = [
    {"hello": 1, "id": 0},
    {"id": 1, "cmd": "status"},
    {"id": 2, "cmd": "pin", "path": "p1"},
    {"id": 3, "cmd": "down"},
    {"id": 4, "cmd": "events", "replay": 0},
]


@needs_root
async def test_a_group_member_may_look_but_not_steer(public_dir: Path) -> None:
    path = public_dir / "run" / "ctl.sock"
    agent = FakeAgent()
    with trio.fail_after(IO_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            server = await serve_in(nursery, path, agent, ControlAccess(group=NOBODY_GROUP))
            st = path.lstat()
            assert stat.S_IMODE(st.st_mode) == GROUP_SOCKET_MODE and st.st_gid == grp.getgrnam(NOBODY_GROUP).gr_gid
            assert stat.S_IMODE(path.parent.stat().st_mode) == control.GROUP_DIR_MODE
            hello, status, pin, down, events = await as_nobody(path, PEER_REQUESTS, groups=NOBODY_GROUP)
            v0 = await as_nobody(path, [STATUS_REQUEST, {"cmd": "down"}], groups=NOBODY_GROUP)
            nursery.cancel_scope.cancel()
    assert hello["result"]["access"] == "read" and hello["result"]["commands"] == ["events", "status"]
    assert hello["result"]["uid"] == 65534
    assert status["result"] == STATUS_REPLY and events["ok"] is True
    for refused, cmd in ((pin, "pin"), (down, "down")):
        assert refused["error"] == {
            "code": "permission_denied",
            "message": f"permission denied: {cmd!r} steers the agent; uid 65534 may only use events, status",
        }
    assert v0 == [STATUS_REPLY, {"error": "permission denied: 'down' steers the agent; uid 65534 may only use events, status"}]
    assert agent.inputs == [] and dict(server.statistics().errors) == {"permission_denied": 3}


@needs_root
async def test_a_group_member_may_steer_when_configured(public_dir: Path) -> None:
    path = public_dir / "ctl.sock"
    agent = FakeAgent()
    with trio.fail_after(IO_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            await serve_in(nursery, path, agent, ControlAccess(group=NOBODY_GROUP, steer_group=True))
            hello, _status, pin, _down, _events = await as_nobody(path, PEER_REQUESTS, groups=NOBODY_GROUP)
            nursery.cancel_scope.cancel()
    assert hello["result"]["access"] == "steer"
    # The log names the member who pinned, as the kernel saw it, not whoever runs the agent.
    assert pin["result"]["path"] == "p1" and agent.inputs == [ev.PinRequested(path=PathId(1), by="uid 65534")]


@needs_root
async def test_others_are_stopped_by_the_file_mode_and_by_their_credentials(public_dir: Path) -> None:
    path = public_dir / "ctl.sock"
    agent = FakeAgent()
    with trio.fail_after(IO_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            server = await serve_in(nursery, path, agent, ControlAccess(group=NOBODY_GROUP, steer_group=True))
            by_mode = await as_nobody(path, [STATUS_REQUEST], groups=None)
            path.chmod(0o666)  # as if the mode were loosened: the credentials still decide
            hello, status, pin, down, events = await as_nobody(path, PEER_REQUESTS, groups=None)
            nursery.cancel_scope.cancel()
    assert by_mode == {"connect_error": 13}  # EACCES
    assert hello["result"]["access"] == "none" and hello["result"]["commands"] == []
    message = f"permission denied: uid 65534 is not root nor in group {NOBODY_GROUP!r}"
    for reply in (status, pin, down, events):
        assert reply["ok"] is False and reply["error"] == {"code": "permission_denied", "message": message}
    assert agent.inputs == [] and server.statistics().subscribers == 0


async def test_busy_refusal_reaches_the_attach_client_as_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve_control, path, handler_for(FakeAgent()), access=ControlAccess(group=None), max_connections=1)
            )
            async with open_control_client(path):
                with pytest.raises(ControlError) as info:
                    async with open_control_client(path):
                        pass
            nursery.cancel_scope.cancel()
    assert "busy: too many control connections" in str(info.value)


async def test_the_client_reports_a_missing_socket(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError, match="socket missing"):
            async with open_control_client(tmp_path / "nothing.sock"):
                pass


def test_controlclient_is_exported() -> None:
    assert ControlClient.__name__ == "ControlClient"
