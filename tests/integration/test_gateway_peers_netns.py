"""Five real clients through one gateway; one removed by a reload mid-stream, the others untouched (root).

Seven namespaces built here (the lab's :class:`~jvpn_trio.lab.netns.Lab` has one client): the
gateway ``<prefix>-gw``, five clients ``<prefix>-c1`` .. ``-c5`` and ``<prefix>-by``, "beyond"::

    client i   eth0      10.77.i.2/24   default via 10.77.i.1
    gateway    gw-ci     10.77.i.1/24   lo 10.99.0.1/32 (where it listens)
    gateway    gw-by0    10.88.0.1/24   default via 10.88.0.2 (its uplink: the NAT egress)
    beyond     eth0      10.88.0.2/24   lo FAR (192.0.2.80/32): an echo server, no other route

Beyond has no route to the tunnel's subnet: an echo comes back only if the gateway masqueraded
the client's packets (``nat`` left at its default, on).  Real processes: ``jvpn-trio serve``
with ``peers_dir = "peers.d"`` and one file per peer, five ``jvpn-trio up`` (full tunnel,
``--no-tui --quiet``, an event log each), and in each client namespace a TCP stream to FAR:
a counter sent every :data:`STREAM_PERIOD_S`, echoed by beyond, checked in order.

1. All five attached and streaming; ``status --json`` names the five peers.
2. :data:`REMOVED`'s file deleted, ``jvpn-trio reload --socket``: the reply removes exactly it;
   its client logs TERMINATED PEER_CLOSE with ``peer_reason=PEER_REMOVED``, the gateway
   TERMINATED PEER_REMOVED for its session and no other; its stream stops (no echo after the
   gateway's TERMINATED while the others keep receiving), its new handshakes are refused
   (``handshake_unknown_peer``); ``status --json`` names the other four.
3. The file put back, SIGHUP to the gateway: its log line says ``added``; the client attaches
   with a new session and ``status --json`` names five again.
4. The four other streams, stopped cleanly: every echo came back, in order, with no reset, and
   their sessions are the ones of step 1 (same id in status, no TERMINATED in either log).

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real condition
(status, event logs, progress files); assertions are causal (what arrived, in which order, from
whom), never durations.  Every process and namespace is removed on any exit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key
from jvpn_trio.lab.netns import LabProcess
from jvpn_trio.lab.processes import CLIENT_TUN, GATEWAY_TUN, PORT, STATUS_POLL_S, STATUS_TIMEOUT_S
from tests.netns import requires_lab, unique_prefix

#: Peers (and client namespaces) ``1..CLIENTS``; peer i is named ``laptop<i>``.
CLIENTS = 5
#: The peer removed by the reload (and put back by SIGHUP).
REMOVED = "laptop3"
#: Where the gateway listens (on its lo), its tunnel address and the peers' fixed addresses (``.10 + i``).
GATEWAY_ADDRESS = "10.99.0.1"
GATEWAY_TUNNEL = "10.66.0.1/24"
PEER_HOST_BASE = 10
#: Client i's link: ``10.77.i.0/24``, client .2, gateway .1.
LINK_OCTET = 77
#: The gateway's uplink to beyond, and the "internet" host behind it.
EGRESS = "gw-by0"
EGRESS4, BEYOND4, EGRESS_PREFIXLEN = "10.88.0.1", "10.88.0.2", 24
FAR, FAR_PORT = "192.0.2.80", 5081
#: A counter every 10 ms on each stream; how many echoes each has before the reload, and how
#: many more each of the four gets while the removed one must get none.
STREAM_PERIOD_S = 0.01
WARMUP_ECHOES = 50
AFTER_REMOVAL_ECHOES = 100
#: How long a stopped stream waits for its last echoes and the server's FIN.
DRAIN_S = 5.0
#: Bounds: the whole test, one ``ip`` command, teardown, SIGTERM to SIGKILL.
TEST_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 10.0
TEARDOWN_TIMEOUT_S = 20.0
TERMINATE_GRACE_S = 3.0

#: Beyond's server: echoes every connection's bytes back; logs each peer's address (NAT check).
ECHO_SERVER = r"""
import socket, sys, threading
ready, log, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16)
lock = threading.Lock()
open(ready, "w").close()
def echo(c, peer):
    with lock, open(log, "a") as f:
        f.write(peer[0] + "\n")
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, peer = s.accept()
    threading.Thread(target=echo, args=(c, peer), daemon=True).start()
"""

#: A client's stream: counter lines every PERIOD, echoes checked in order, the count of echoes
#: appended to PROGRESS as they come; once STOP exists: FIN, drain, and a JSON REPORT.
STREAM_CLIENT = r"""
import json, os, select, socket, sys, time
host, port, period, stop, progress, report, drain_s = sys.argv[1:8]
port, period, drain_s = int(port), float(period), float(drain_s)
st = {"sent": 0, "echoed": 0, "gap": None, "eof": False, "stopped": False, "error": None}
buf = b""
out = open(progress, "w", buffering=1)
def take(c):
    global buf
    d = c.recv(65536)
    if not d:
        st["eof"] = True
        return
    buf += d
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if st["gap"] is None and int(line) != st["echoed"]:
            st["gap"] = [st["echoed"], int(line)]
        st["echoed"] += 1
    out.write("%d\n" % st["echoed"])
try:
    c = socket.create_connection((host, port), timeout=10)
    c.settimeout(None)
    next_send = time.monotonic()
    while not st["eof"]:
        if os.path.exists(stop):
            st["stopped"] = True
            break
        if time.monotonic() >= next_send:
            c.sendall(b"%d\n" % st["sent"])
            st["sent"] += 1
            next_send += period
        r, _, _ = select.select([c], [], [], max(0.0, next_send - time.monotonic()))
        if r:
            take(c)
    if st["stopped"]:
        c.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + drain_s
        while not st["eof"] and time.monotonic() < deadline:
            r, _, _ = select.select([c], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                take(c)
except (OSError, ValueError) as exc:
    st["error"] = "%s: %s" % (type(exc).__name__, exc)
with open(report + ".tmp", "w") as f:
    json.dump(st, f)
os.rename(report + ".tmp", report)
"""


def peer_name(i: int) -> str:
    return f"laptop{i}"


def link(i: int) -> tuple[str, str]:
    """Client i's ``(address, gateway's address)`` on its link."""
    return f"10.{LINK_OCTET}.{i}.2", f"10.{LINK_OCTET}.{i}.1"


async def ip(*argv: str, ns: str | None = None) -> None:
    """One ``ip`` command (in ``ns`` with ``-n``); fails the test with its stderr."""
    full = ["ip", *(("-n", ns) if ns else ()), *argv]
    with trio.fail_after(COMMAND_TIMEOUT_S):
        done = await trio.run_process(full, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, f"{' '.join(full)}: {done.stderr.decode().strip()}"


@attrs.define
class Star:
    """The namespaces of this test and every process started in them (all removed by :func:`star`)."""

    prefix: str
    directory: Path
    namespaces: list[str] = attrs.Factory(list)
    processes: list[LabProcess] = attrs.Factory(list)

    @property
    def gateway_ns(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def beyond_ns(self) -> str:
        return f"{self.prefix}-by"

    def client_ns(self, i: int) -> str:
        return f"{self.prefix}-c{i}"

    async def add_namespace(self, ns: str) -> None:
        await ip("netns", "add", ns)
        self.namespaces.append(ns)
        await ip("link", "set", "lo", "up", ns=ns)

    async def start(self, ns: str, argv: Sequence[str], *, name: str) -> LabProcess:
        """``argv`` in ``ns``, stderr to ``<name>.err``; terminated at teardown at the latest."""
        err = await trio.to_thread.run_sync(open, self.directory / f"{name}.err", "wb")
        try:
            process = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        finally:
            err.close()
        handle = LabProcess(ns, argv, process)
        self.processes.append(handle)
        return handle

    async def run(self, ns: str, *argv: str) -> str:
        """``argv`` in ``ns`` to completion; its stdout (fails the test with its stderr)."""
        done = await trio.run_process(["ip", "netns", "exec", ns, *argv], capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode().strip()}"
        return done.stdout.decode()

    async def aclose(self) -> None:
        """Every process (SIGTERM, then SIGKILL), whatever else runs in the namespaces, the namespaces."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + TEARDOWN_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for process in self.processes:
                    nursery.start_soon(functools.partial(process.terminate, grace_s=TERMINATE_GRACE_S))
            for ns in reversed(self.namespaces):
                pids = await trio.run_process(["ip", "netns", "pids", ns], capture_stdout=True, check=False)
                for word in pids.stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(word), signal.SIGKILL)
                await trio.run_process(["ip", "netns", "del", ns], check=False)


@contextlib.asynccontextmanager
async def star(directory: Path) -> AsyncIterator[Star]:
    """The gateway, the five clients each on its own link to it, and beyond behind it (module docstring)."""
    built = Star(prefix=unique_prefix(), directory=directory)
    try:
        gw = built.gateway_ns
        await built.add_namespace(gw)
        await ip("addr", "add", f"{GATEWAY_ADDRESS}/32", "dev", "lo", ns=gw)
        for i in range(1, CLIENTS + 1):
            ns = built.client_ns(i)
            await built.add_namespace(ns)
            client_ip, router_ip = link(i)
            await ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"gw-c{i}", "netns", gw)
            await ip("addr", "add", f"{client_ip}/24", "dev", "eth0", ns=ns)
            await ip("addr", "add", f"{router_ip}/24", "dev", f"gw-c{i}", ns=gw)
            await ip("link", "set", "eth0", "up", ns=ns)
            await ip("link", "set", f"gw-c{i}", "up", ns=gw)
            await ip("route", "add", "default", "via", router_ip, "dev", "eth0", ns=ns)
        by = built.beyond_ns
        await built.add_namespace(by)
        await ip("link", "add", EGRESS, "netns", gw, "type", "veth", "peer", "name", "eth0", "netns", by)
        await ip("addr", "add", f"{EGRESS4}/{EGRESS_PREFIXLEN}", "dev", EGRESS, ns=gw)
        await ip("link", "set", EGRESS, "up", ns=gw)
        await ip("route", "add", "default", "via", BEYOND4, "dev", EGRESS, ns=gw)
        # Beyond: its link and FAR, no route anywhere else (only the masqueraded source is answered).
        await ip("addr", "add", f"{BEYOND4}/{EGRESS_PREFIXLEN}", "dev", "eth0", ns=by)
        await ip("addr", "add", f"{FAR}/32", "dev", "lo", ns=by)
        await ip("link", "set", "eth0", "up", ns=by)
        yield built
    finally:
        await built.aclose()


def gateway_toml(directory: Path, *, extra: str = "") -> str:
    """The star's gateway config: its key in ``gateway.key``, peers in ``peers.d``, then ``extra`` lines."""
    return f"""[gateway]
private_key_file = "gateway.key"
listen = ["{GATEWAY_ADDRESS}:{PORT}"]
tun_name = "{GATEWAY_TUN}"
tunnel_address = "{GATEWAY_TUNNEL}"
events_file = "gateway-events.jsonl"
control_socket = "{directory / 'gateway.sock'}"
peers_dir = "peers.d"
{extra}"""


def write_configs(directory: Path) -> None:
    """Keys, ``gateway.toml`` with ``peers_dir``, ``peers.d/laptop<i>.toml`` and ``c<i>.toml``."""
    gateway_key = generate_private_key_text(os.urandom)
    write_private_key(directory / "gateway.key", gateway_key)
    (directory / "peers.d").mkdir()
    (directory / "gateway.toml").write_text(gateway_toml(directory))
    for i in range(1, CLIENTS + 1):
        key = generate_private_key_text(os.urandom)
        write_private_key(directory / f"c{i}.key", key)
        peer = f'public_key = "{public_from_private_text(key)}"\naddress = "10.66.0.{PEER_HOST_BASE + i}"\n'
        (directory / f"{peer_name(i)}.peer").write_text(peer)  # kept to put the peer back
        (directory / "peers.d" / f"{peer_name(i)}.toml").write_text(peer)
        (directory / f"c{i}.toml").write_text(
            f"""[client]
private_key_file = "c{i}.key"
gateway_public_key = "{public_from_private_text(gateway_key)}"
gateway = "{GATEWAY_ADDRESS}:{PORT}"
tun_name = "{CLIENT_TUN}"
routes = ["0.0.0.0/0"]
events_file = "c{i}-events.jsonl"
control_socket = "{directory / f'c{i}.sock'}"

[[path]]
interface = "eth0"
kind = "ethernet"
priority = 10
"""
        )


def events(path: Path) -> list[EmitEvent]:
    """The event log's complete lines, decoded (the process may be writing the next one)."""
    text = path.read_text() if path.exists() else ""
    return [EmitEvent.from_dict(json.loads(line)) for line in text.split("\n")[:-1] if line]


def terminated(log: Sequence[EmitEvent]) -> list[EmitEvent]:
    return [e for e in log if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == "TERMINATED"]


def progress(path: Path) -> int:
    """Echoes a stream has received so far (the last complete line of its progress file)."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # a line being written has no newline yet
    return int(lines[-1]) if lines else 0


async def until(condition: Callable[[], object], *checks: LabProcess) -> None:
    """Poll ``condition()`` until true; fails at once if one of ``checks`` has exited (the caller bounds it)."""
    while not condition():
        for process in checks:
            assert process.returncode is None, f"{process!r} exited"
        await trio.sleep(STATUS_POLL_S)


async def client_status(directory: Path, i: int) -> dict[str, Any]:
    try:
        return await query_control(directory / f"c{i}.sock", {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)
    except ControlError:
        return {}


async def wait_attached(directory: Path, i: int, process: LabProcess, *, not_session: str | None = None) -> str:
    """Until client i's session is ATTACHED (and not ``not_session``); its session id."""
    while True:
        assert process.returncode is None, (directory / f"c{i}.err").read_text()
        status = await client_status(directory, i)
        if status.get("state") == "ATTACHED" and status.get("session") not in (None, not_session):
            return str(status["session"])
        await trio.sleep(STATUS_POLL_S)


async def jvpn(s: Star, *args: str) -> dict[str, Any]:
    """``jvpn-trio <args> --socket gateway.sock --json`` in the gateway namespace: its JSON reply."""
    out = await s.run(s.gateway_ns, sys.executable, "-m", "jvpn_trio", *args, "--socket", str(s.directory / "gateway.sock"), "--json")
    data: dict[str, Any] = json.loads(out)
    return data


def peers(status: dict[str, Any]) -> dict[str, str]:
    """``status --json``'s sessions: ``{peer name: session id}``."""
    return {str(s["peer"]): str(s["session"]) for s in status["sessions"]}


@requires_lab
async def test_five_peers_one_removed_by_reload(tmp_path: Path) -> None:
    directory = tmp_path
    clients = range(1, CLIENTS + 1)
    removed = int(REMOVED.removeprefix("laptop"))
    kept = [i for i in clients if i != removed]
    with trio.fail_after(TEST_TIMEOUT_S):
        async with star(directory) as s:
            await trio.to_thread.run_sync(write_configs, directory)
            py = sys.executable
            ready, served = directory / "echo.ready", directory / "echo.peers"
            server = await s.start(s.beyond_ns, [py, "-c", ECHO_SERVER, str(ready), str(served), FAR, str(FAR_PORT)], name="echo")
            gateway = await s.start(
                s.gateway_ns, [py, "-m", "jvpn_trio", "serve", "--config", str(directory / "gateway.toml"), "--quiet"], name="gateway"
            )
            await until(lambda: ready.exists() and (directory / "gateway.sock").exists(), server, gateway)
            agents = {
                i: await s.start(
                    s.client_ns(i), [py, "-m", "jvpn_trio", "up", "--config", str(directory / f"c{i}.toml"), "--no-tui", "--quiet"],
                    name=f"c{i}",
                )
                for i in clients
            }  # fmt: skip
            sessions = {i: await wait_attached(directory, i, agents[i]) for i in clients}

            # 1. Five streams through the tunnel and the NAT; status names the five.
            stop = {i: directory / f"stream{i}.stop" for i in clients}
            progress_file = {i: directory / f"stream{i}.progress" for i in clients}
            report = {i: directory / f"stream{i}.json" for i in clients}
            streams = {
                i: await s.start(
                    s.client_ns(i),
                    [py, "-c", STREAM_CLIENT, FAR, str(FAR_PORT), str(STREAM_PERIOD_S), str(stop[i]),
                     str(progress_file[i]), str(report[i]), str(DRAIN_S)],
                    name=f"stream{i}",
                )
                for i in clients
            }  # fmt: skip
            await until(lambda: all(progress(progress_file[i]) >= WARMUP_ECHOES for i in clients), *streams.values())
            before = await jvpn(s, "status")
            gateway_session = peers(before)[REMOVED]

            # 2. Its file deleted, reload: its session ends with its reason, its stream stops.
            (directory / "peers.d" / f"{REMOVED}.toml").unlink()
            reloaded = await jvpn(s, "reload")
            await until(lambda: terminated(events(directory / f"c{removed}-events.jsonl")), agents[removed])
            await until(lambda: terminated(events(directory / "gateway-events.jsonl")), gateway)
            stalled_at = progress(progress_file[removed])
            marks = {i: progress(progress_file[i]) for i in kept}
            await until(lambda: all(progress(progress_file[i]) >= marks[i] + AFTER_REMOVAL_ECHOES for i in kept), *(streams[i] for i in kept))
            stalled_after = progress(progress_file[removed])
            while "handshake_unknown_peer" not in (refused := await jvpn(s, "status"))["counters"]:
                await trio.sleep(STATUS_POLL_S)
            await streams[removed].kill()

            # 3. Put back, SIGHUP: added, and its client attaches again with a new session.
            (directory / "peers.d" / f"{REMOVED}.toml").write_text((directory / f"{REMOVED}.peer").read_text())
            os.kill(gateway.pid, signal.SIGHUP)
            await until(lambda: "peers reloaded: added" in (directory / "gateway.err").read_text(), gateway)
            readded = await wait_attached(directory, removed, agents[removed], not_session=sessions[removed])
            while len((again := await jvpn(s, "status"))["sessions"]) < CLIENTS:
                await trio.sleep(STATUS_POLL_S)

            # 4. The four streams, stopped: their reports; their sessions as they are now.
            for i in kept:
                stop[i].touch()
            await until(lambda: all(report[i].exists() for i in kept))
            reports = {i: json.loads(report[i].read_text()) for i in kept}
            sessions_after = {i: (await client_status(directory, i)).get("session") for i in kept}
            client_logs = {i: events(directory / f"c{i}-events.jsonl") for i in clients}
            gateway_log = events(directory / "gateway-events.jsonl")
            nat_sources = served.read_text().split()
            gateway_err = (directory / "gateway.err").read_text()

    # Five by name before, four after the reload (the removed one's handshakes refused), five again.
    assert sorted(peers(before)) == [peer_name(i) for i in clients], before
    assert sorted(peers(refused)) == [peer_name(i) for i in kept], refused
    assert sorted(peers(again)) == [peer_name(i) for i in clients], again
    assert {s["state"] for s in before["sessions"]} == {"ATTACHED"}, before
    # The gateway kept the four's sessions through both reloads.
    assert {n: sid for n, sid in peers(again).items() if n != REMOVED} == {
        n: sid for n, sid in peers(before).items() if n != REMOVED
    }, (before, again)
    # The reload removed exactly that peer and closed its one session; SIGHUP's line says added.
    assert (reloaded["removed"], reloaded["sessions_closed"]) == ([REMOVED], 1), reloaded
    assert f"peers reloaded: added {REMOVED}; {CLIENTS - 1} unchanged" in gateway_err, gateway_err
    assert "Traceback" not in gateway_err, gateway_err
    # Its session ended with its reason on both sides, and no other session ended.
    (client_end,) = terminated(client_logs[removed])
    assert (client_end.reason, client_end.detail("peer_reason")) == (ReasonCode.PEER_CLOSE, "PEER_REMOVED")
    assert client_end.session == sessions[removed] == gateway_session
    assert [(e.session, e.reason) for e in terminated(gateway_log)] == [(gateway_session, ReasonCode.PEER_REMOVED)]
    assert readded != sessions[removed]
    # Its stream stopped: no echo reached it after its session ended, while each other got AFTER_REMOVAL_ECHOES.
    assert stalled_after == stalled_at, (stalled_at, stalled_after)
    # The four others: the same sessions throughout, every echo back in order, no reset, a clean end.
    for i in kept:
        assert terminated(client_logs[i]) == [], client_logs[i]
        assert sessions_after[i] == sessions[i], (i, sessions[i], sessions_after[i])
        r = reports[i]
        assert r["error"] is None and r["gap"] is None and r["stopped"] and r["eof"], (i, r)
        assert r["echoed"] == r["sent"] >= WARMUP_ECHOES + AFTER_REMOVAL_ECHOES, (i, r)
    # Through NAT: beyond saw only the gateway's egress address (one connection per client).
    assert nat_sources == [EGRESS4] * CLIENTS, nat_sources
