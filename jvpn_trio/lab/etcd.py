"""Real etcd processes for tests and the lab: one member or an N-member cluster on 127.0.0.1.

Every member listens on two free loopback ports (clients, peers) and keeps its data in a fresh
temporary directory; its stderr goes to ``<name>.log`` there.  :func:`open_etcd_cluster` starts
the members, waits until every one answers a linearizable read (so the cluster has a leader and
each member reaches it), yields an :class:`EtcdCluster`, and on any exit continues paused
members, terminates every process (killing one that does not stop in time) and removes the
directory.  Faults: :meth:`EtcdMember.pause` (SIGSTOP: a member that hangs, its TCP port still
accepting), :meth:`EtcdMember.resume` (SIGCONT), :meth:`EtcdMember.kill` (SIGKILL) and
:meth:`EtcdMember.stop` (SIGTERM: a clean shutdown).

Free ports are found by binding port 0 and closing the socket; another process could take one
in between, in which case that member fails to start and :class:`EtcdError` says so.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import sys
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

#: Loopback: the lab's etcd is never reachable from outside the machine.
HOST = "127.0.0.1"
#: A key no one writes; reading it proves a linearizable read works.
PROBE_KEY = b"/jvpn-trio/lab/health-probe"


class EtcdError(RuntimeError):
    """An etcd process could not be started or did not become healthy."""


@attrs.frozen(kw_only=True)
class EtcdSpec:
    """How to run the members; the timing fields are etcd's own flags (milliseconds)."""

    members: int = 1
    binary: str = "etcd"
    #: Raft heartbeat and election timeout: shorter than etcd's defaults (100/1000) so that
    #: failover and lease expiry take a test a second, not several.
    heartbeat_ms: int = 50
    election_ms: int = 500
    #: Bounds on start-up and shutdown, and how often start-up polls.
    ready_timeout_s: float = 45.0
    #: A start whose members are not all healthy in time is thrown away and tried afresh (new ports,
    #: new data), saying so on stderr: in the full CI run a lone member once stayed unhealthy
    #: (cause not found yet; ``free_port``'s port can be taken before etcd binds it, for one).
    start_attempts: int = 2
    stop_timeout_s: float = 5.0
    poll_s: float = 0.05
    #: Per-request bound of the health probes.
    probe_timeout_s: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got {self.members}")
        if not 0 < self.heartbeat_ms < self.election_ms:
            raise ValueError("etcd needs 0 < heartbeat_ms < election_ms")


def etcd_binary(spec: EtcdSpec | None = None) -> str | None:
    """The etcd executable's path, or None when it is not installed."""
    return shutil.which((spec or EtcdSpec()).binary)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: trio.Process | None = None
    paused: bool = False

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP: the member hangs; the kernel still accepts connections to its ports."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: the member dies without a word; its data dir stays."""
        self.resume()
        self._signal(signal.SIGKILL)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM and wait; SIGKILL if it is still running after ``timeout_s``."""
        if self.process is None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        with trio.move_on_after(timeout_s):
            await self.process.wait()
        if self.process.returncode is None:
            self._signal(signal.SIGKILL)
            await self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@attrs.define
class EtcdCluster:
    spec: EtcdSpec
    base_dir: Path
    members: list[EtcdMember]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member_argv(self, member: EtcdMember, binary: str) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.base_dir.name,
            "--heartbeat-interval", str(self.spec.heartbeat_ms),
            "--election-timeout", str(self.spec.election_ms),
        ]  # fmt: skip

    async def probe(self, member: EtcdMember) -> bool:
        """Whether ``member`` answers a linearizable read now (needs a leader it can reach)."""
        async with httpx.AsyncClient(timeout=self.spec.probe_timeout_s) as http:
            with trio.move_on_after(self.spec.probe_timeout_s):
                try:
                    reply = await http.post(
                        member.client_url + "/v3/kv/range", json={"key": base64.b64encode(PROBE_KEY).decode()}
                    )
                    return reply.status_code == httpx.codes.OK and "header" in reply.json()
                except (httpx.HTTPError, ValueError):
                    return False
        return False

    async def wait_healthy(self, members: list[EtcdMember] | None = None) -> None:
        """Wait (bounded by ``ready_timeout_s``) until every member, or the given ones, answers."""
        pending = list(self.members if members is None else members)
        with trio.move_on_after(self.spec.ready_timeout_s):
            while pending:
                for member in list(pending):
                    if not member.running:
                        raise EtcdError(f"etcd member {member.name} exited: {member.log_tail()}")
                    if await self.probe(member):
                        pending.remove(member)
                if pending:
                    await trio.sleep(self.spec.poll_s)
            return
        names = ", ".join(f"{m.name} ({m.log_tail()})" for m in pending)
        raise EtcdError(f"etcd members not healthy after {self.spec.ready_timeout_s}s: {names}")

    async def status(self, member: EtcdMember) -> dict[str, Any]:
        """The member's ``/v3/maintenance/status`` reply (its id in ``header.member_id``, ``leader``)."""
        async with httpx.AsyncClient(timeout=self.spec.probe_timeout_s) as http:
            reply = await http.post(member.client_url + "/v3/maintenance/status", json={})
            reply.raise_for_status()
            result: dict[str, Any] = reply.json()
            return result

    async def leader(self) -> EtcdMember:
        """The member that leads now, as the running members report it."""
        by_id: dict[str, EtcdMember] = {}
        leaders: set[str] = set()
        for member in self.members:
            if member.running and not member.paused:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    status = await self.status(member)
                    by_id[status["header"]["member_id"]] = member
                    leaders.add(status.get("leader", ""))
        for leader_id in leaders:
            if leader_id in by_id:
                return by_id[leader_id]
        raise EtcdError("no running member reports a leader")


async def _start_member(cluster: EtcdCluster, member: EtcdMember, binary: str) -> None:
    member.data_dir.mkdir(parents=True)
    with member.log_path.open("wb") as log:
        member.process = await trio.lowlevel.open_process(
            cluster.member_argv(member, binary), stdin=None, stdout=log, stderr=log
        )


@contextlib.asynccontextmanager
async def open_etcd_cluster(spec: EtcdSpec | None = None) -> AsyncIterator[EtcdCluster]:
    """Start ``spec.members`` etcd members, wait until all are healthy, and clean up on exit."""
    spec = spec or EtcdSpec()
    binary = etcd_binary(spec)
    if binary is None:
        raise EtcdError(f"{spec.binary} is not installed (apt-get install etcd-server)")
    for attempt in range(1, spec.start_attempts + 1):
        cluster = await _new_cluster(spec)
        try:
            for member in cluster.members:
                await _start_member(cluster, member, binary)
            await cluster.wait_healthy()
        except EtcdError as exc:
            await _remove(cluster)
            if attempt == spec.start_attempts:
                raise
            print(f"etcd: start {attempt} failed, starting afresh: {exc}", file=sys.stderr)
            continue
        break
    try:
        yield cluster
    finally:
        await _remove(cluster)


async def _new_cluster(spec: EtcdSpec) -> EtcdCluster:
    """Members on fresh loopback ports, with a fresh data directory."""
    base_dir = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="jvpn-etcd-")))
    members = [
        EtcdMember(
            name=f"m{i}",
            client_url=f"http://{HOST}:{free_port()}",
            peer_url=f"http://{HOST}:{free_port()}",
            data_dir=base_dir / f"m{i}",
            log_path=base_dir / f"m{i}.log",
        )
        for i in range(spec.members)
    ]
    return EtcdCluster(spec=spec, base_dir=base_dir, members=members)


async def _remove(cluster: EtcdCluster) -> None:
    """Stop every member and delete the data, whatever is cancelled around us."""
    with trio.CancelScope(shield=True):
        for member in cluster.members:
            await member.stop(cluster.spec.stop_timeout_s)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(cluster.base_dir, ignore_errors=True))
