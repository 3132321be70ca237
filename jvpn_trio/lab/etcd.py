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

Partitions (``EtcdSpec(netns=True)``, root and iproute2 and nft).  SIGSTOP hangs a member but
its peers' connections still reach its kernel; a partition is a network that loses packets.  So
each member then runs in a network namespace of its own (``<prefix>-m0``, ...), with one address
on a veth link to a bridge in a hub namespace (``<prefix>-hub``): members talk raft over that
bridge, and :meth:`EtcdCluster.cut_off` drops, at the bridge, every frame to or from one
member's port (a ``bridge`` family nft table in the hub namespace): silently, as a real
partition does, in both directions, while the others still reach one another.  Clients must
still reach every member, partitioned or not, without any interface or route in the machine's
own namespace: each member serves its clients on a unix socket in the data directory (a path,
not a network address, so it is reachable from any namespace), and :meth:`EtcdCluster.transport`
gives an httpx transport that sends ``http://<member name>/...`` to that member's socket.
Everything is built inside the new namespaces (veth ends are created in place), and teardown
deletes them after the members stopped.

In a namespace of the caller's (``EtcdSpec(namespace="ns")``, root and iproute2).  Every member
runs in that existing namespace (one the caller made and removes, e.g. a lab's gateway
namespace) and serves its clients twice: on that namespace's loopback, at fixed ports
(:data:`NAMESPACE_FIRST_PORT` up: the namespace is not ours to probe for free ones), for the
processes that live there (:attr:`EtcdCluster.namespace_endpoints`); and on a unix socket in the
data directory, for us outside it (:attr:`EtcdCluster.endpoints` with :meth:`EtcdCluster.transport`,
as for ``netns``).  Teardown stops the members and leaves the namespace alone.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import sys
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

#: Loopback: the lab's etcd is never reachable from outside the machine.
HOST = "127.0.0.1"
#: A key no one writes; reading it proves a linearizable read works.
PROBE_KEY = b"/jvpn-trio/lab/health-probe"
#: Namespaced clusters (``EtcdSpec.netns``) are named this plus 6 random hex digits.
NETNS_PREFIX_FAMILY = "jvetcd"
#: Member ``i``'s address on the hub's bridge is ``NETNS_SUBNET.(i + 1)``, in its own namespace only.
NETNS_SUBNET = "10.213.0"
NETNS_PREFIXLEN = 24
#: The port members listen on for raft (each namespace has its own, so it can be fixed), and the
#: port etcd's unix socket URL must name (``unix://m0:2379`` is the socket file ``m0:2379``).
NETNS_PEER_PORT = 2380
NETNS_CLIENT_PORT = 2379
#: The bridge in the hub namespace, and the nft table there that cuts members off.
NETNS_BRIDGE = "br0"
NETNS_NFT_TABLE = "jvpn_etcd_partition"
#: With ``EtcdSpec.namespace``: member ``i`` listens on the namespace's loopback at this port plus
#: ``2 * i`` for clients and the next one for raft.
NAMESPACE_FIRST_PORT = 2379
#: Bound on each ``ip`` / ``nft`` command the lab runs; they finish in milliseconds.
COMMAND_TIMEOUT_S = 10.0


class EtcdError(RuntimeError):
    """An etcd process could not be started or did not become healthy."""


async def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (a member that outlived its stop)."""
    result = None
    with trio.move_on_after(COMMAND_TIMEOUT_S):
        result = await trio.run_process(["ip", "netns", "pids", ns], capture_stdout=True, capture_stderr=True, check=False)
    for word in result.stdout.split() if result is not None else []:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


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
    #: Each member in a network namespace of its own, reached through a unix socket, so that
    #: :meth:`EtcdCluster.cut_off` can partition it (needs root, iproute2, nft; see the module
    #: docstring).  Off: every member on 127.0.0.1, no privileges needed.
    netns: bool = False
    #: Every member in this existing network namespace, on its loopback (for the processes there)
    #: and on a unix socket (for the caller); the caller creates and deletes the namespace.
    #: Needs root and iproute2; None: no namespace.
    namespace: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.netns and self.namespace is not None:
            raise ValueError("netns (a namespace per member) and namespace (one given namespace) exclude each other")
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


class MemberSockets(httpx.AsyncBaseTransport):
    """An httpx transport that sends ``http://<member name>/...`` to that member's unix socket."""

    def __init__(self, sockets: Mapping[str, Path]) -> None:
        self._transports = {name: httpx.AsyncHTTPTransport(uds=str(path)) for name, path in sockets.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._transports.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"no etcd member named {request.url.host!r}", request=request)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()


async def _command(argv: Sequence[str], *, stdin: bytes = b"", check: bool = True) -> int:
    """Run one ``ip`` / ``nft`` command; EtcdError (with its stderr) if it fails or hangs."""
    result = None
    with trio.move_on_after(COMMAND_TIMEOUT_S):
        result = await trio.run_process(list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if result is None:
        raise EtcdError(f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT_S} s")
    if check and result.returncode != 0:
        raise EtcdError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    return result.returncode


@attrs.define
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: trio.Process | None = None
    paused: bool = False
    #: With ``EtcdSpec.netns``: the member's namespace, its port on the hub's bridge, its client socket.
    namespace: str | None = None
    hub_port: str | None = None
    socket_path: Path | None = None
    #: With ``EtcdSpec.namespace``: the client URL inside that namespace (its loopback).
    namespace_url: str | None = None

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
    #: With ``EtcdSpec.netns``: the namespaces' prefix, and the members cut off now.
    netns_prefix: str | None = None
    cut: set[str] = attrs.Factory(set)

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs; with ``EtcdSpec.netns`` or ``namespace`` they need :meth:`transport`."""
        return [m.client_url for m in self.members]

    @property
    def namespace_endpoints(self) -> list[str]:
        """With ``EtcdSpec.namespace``: the client URLs for processes inside that namespace (else none)."""
        return [m.namespace_url for m in self.members if m.namespace_url is not None]

    @property
    def hub(self) -> str | None:
        return f"{self.netns_prefix}-hub" if self.netns_prefix is not None else None

    def namespaces(self) -> list[str]:
        """Every namespace of a namespaced cluster, the hub first (none for a loopback one)."""
        if self.hub is None:
            return []
        return [self.hub, *(m.namespace for m in self.members if m.namespace is not None)]

    def transport(self) -> httpx.AsyncBaseTransport | None:
        """A fresh transport that reaches the members (None: the network does, on loopback).

        Pass it to ``EtcdClient(transport=...)`` or ``httpx.AsyncClient``; whoever gets it closes it.
        """
        sockets = {m.name: m.socket_path for m in self.members if m.socket_path is not None}
        return MemberSockets(sockets) if sockets else None

    async def cut_off(self, member: EtcdMember) -> None:
        """Partition ``member`` from every other member (both ways, silently); its clients still reach it."""
        self.cut.add(member.name)
        await self._apply_cuts()

    async def heal(self, member: EtcdMember | None = None) -> None:
        """Reconnect ``member`` (None: every member cut off)."""
        if member is None:
            self.cut.clear()
        else:
            self.cut.discard(member.name)
        await self._apply_cuts()

    async def _apply_cuts(self) -> None:
        """Make the hub's nft table drop exactly the cut members' frames: one nft transaction."""
        if self.hub is None:
            raise EtcdError("partitions need EtcdSpec(netns=True)")
        table = f"bridge {NETNS_NFT_TABLE}"
        lines = [
            f"table {table} {{",
            "  chain forward {",
            "    type filter hook forward priority 0; policy accept;",
            "  }",
            "}",
            f"flush chain {table} forward",
        ]
        for member in self.members:
            if member.name in self.cut:
                lines += [f'add rule {table} forward iifname "{member.hub_port}" drop',
                          f'add rule {table} forward oifname "{member.hub_port}" drop']  # fmt: skip
        await _command(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], stdin="\n".join(lines).encode() + b"\n")

    def member_argv(self, member: EtcdMember, binary: str) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        # A unix socket URL is ``unix://<file name>:<port>``; etcd creates that file in its cwd (base_dir).
        client_url = f"unix://{member.socket_path.name}" if member.socket_path is not None else member.client_url
        if member.namespace_url is not None:  # the namespace's processes reach it there, we through the socket
            client_url = f"{member.namespace_url},{client_url}"
        wrapper = ["ip", "netns", "exec", member.namespace] if member.namespace is not None else []
        return [
            *wrapper,
            binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
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
        async with httpx.AsyncClient(timeout=self.spec.probe_timeout_s, transport=self.transport()) as http:
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
        async with httpx.AsyncClient(timeout=self.spec.probe_timeout_s, transport=self.transport()) as http:
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
            cluster.member_argv(member, binary),
            stdin=None,
            stdout=log,
            stderr=log,
            cwd=cluster.base_dir if member.socket_path is not None else None,  # where etcd creates its socket
        )


@contextlib.asynccontextmanager
async def open_etcd_cluster(spec: EtcdSpec | None = None) -> AsyncIterator[EtcdCluster]:
    """Start ``spec.members`` etcd members, wait until all are healthy, and clean up on exit."""
    spec = spec or EtcdSpec()
    binary = etcd_binary(spec)
    if binary is None:
        raise EtcdError(f"{spec.binary} is not installed (apt-get install etcd-server)")
    if spec.netns and (os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None):
        raise EtcdError("etcd members in network namespaces need root, iproute2 and nft")
    if spec.namespace is not None and (os.geteuid() != 0 or shutil.which("ip") is None):
        raise EtcdError(f"etcd members in namespace {spec.namespace} need root and iproute2")
    for attempt in range(1, spec.start_attempts + 1):
        cluster = await _new_cluster(spec)
        try:
            await _build_network(cluster)
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
    """Members on fresh loopback ports (or in namespaces of their own), with a fresh data directory."""
    base_dir = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="jvpn-etcd-")))
    if spec.netns:
        prefix = NETNS_PREFIX_FAMILY + secrets.token_hex(3)
        members = [
            EtcdMember(
                name=f"m{i}",
                client_url=f"http://m{i}",  # a name for MemberSockets, not an address
                peer_url=f"http://{NETNS_SUBNET}.{i + 1}:{NETNS_PEER_PORT}",
                data_dir=base_dir / f"m{i}",
                log_path=base_dir / f"m{i}.log",
                namespace=f"{prefix}-m{i}",
                hub_port=f"m{i}",
                socket_path=base_dir / f"m{i}:{NETNS_CLIENT_PORT}",
            )
            for i in range(spec.members)
        ]
        return EtcdCluster(spec=spec, base_dir=base_dir, members=members, netns_prefix=prefix)
    if spec.namespace is not None:
        members = [
            EtcdMember(
                name=f"m{i}",
                client_url=f"http://m{i}",  # a name for MemberSockets, not an address
                peer_url=f"http://{HOST}:{NAMESPACE_FIRST_PORT + 2 * i + 1}",
                data_dir=base_dir / f"m{i}",
                log_path=base_dir / f"m{i}.log",
                namespace=spec.namespace,
                socket_path=base_dir / f"m{i}:{NETNS_CLIENT_PORT}",
                namespace_url=f"http://{HOST}:{NAMESPACE_FIRST_PORT + 2 * i}",
            )
            for i in range(spec.members)
        ]
        return EtcdCluster(spec=spec, base_dir=base_dir, members=members)
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


async def _build_network(cluster: EtcdCluster) -> None:
    """A namespaced cluster's hub with its bridge, and each member's namespace linked to it."""
    hub = cluster.hub
    if hub is None:
        return
    await _command(["ip", "netns", "add", hub])
    await _command(["ip", "-n", hub, "link", "add", NETNS_BRIDGE, "type", "bridge"])
    await _command(["ip", "-n", hub, "link", "set", NETNS_BRIDGE, "up"])
    for i, member in enumerate(cluster.members):
        ns, port = member.namespace, member.hub_port
        assert ns is not None and port is not None  # set together with the hub (_new_cluster)
        await _command(["ip", "netns", "add", ns])
        await _command(["ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        await _command(["ip", "-n", hub, "link", "set", port, "master", NETNS_BRIDGE, "up"])
        await _command(["ip", "-n", ns, "addr", "add", f"{NETNS_SUBNET}.{i + 1}/{NETNS_PREFIXLEN}", "dev", "eth0"])
        await _command(["ip", "-n", ns, "link", "set", "eth0", "up"])
        await _command(["ip", "-n", ns, "link", "set", "lo", "up"])
    await cluster._apply_cuts()  # the (empty) partition table, so that a cut is one flush-and-add


async def _remove(cluster: EtcdCluster) -> None:
    """Stop every member, delete its namespaces and the data, whatever is cancelled around us."""
    with trio.CancelScope(shield=True):
        for member in cluster.members:
            await member.stop(cluster.spec.stop_timeout_s)
        for ns in cluster.namespaces():  # the nft table goes with the hub; a missing namespace is fine
            await _kill_namespace_pids(ns)
            await _command(["ip", "netns", "del", ns], check=False)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(cluster.base_dir, ignore_errors=True))
