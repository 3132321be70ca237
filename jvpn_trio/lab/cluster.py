"""A cluster lab: one client, two gateways and a service host with etcd, in network namespaces (root).

Theory of operation
-------------------
A takeover (docs/cluster.md) moves a client's session from a dead gateway to a live one of
the same cluster.  Proving it end to end needs what a real site has: a WAN where the client
meets both gateways, a LAN behind them where the services and the etcd member live, and
return traffic that finds whichever gateway owns the session now.  The lab builds exactly
that, and nothing in the machine's own namespace::

                 hub namespace (bridges only, no addresses)
          wan bridge                              lan bridge
     +-------+--------+                 +--------+--------+-------+
     |       |        |                 |        |        |
   client   gwa      gwb               gwa      gwb      svc
   eth0     wan0     wan0              lan0     lan0     lan0
   .2       .11      .12               .11      .12      .10 (etcd :2379, echo server)
       192.0.2.0/24                        198.51.100.0/24

Every veth pair is created from the hub (``ip -n HUB link add PORT type veth peer name DEV
netns NODE``), so no interface ever exists in the root namespace.  The namespaces are
``<prefix>-hub``, ``-cli``, ``-gwa``, ``-gwb`` and ``-svc``.

*Routing.*  The client has only its WAN subnet: nothing outside the tunnel reaches the LAN.
It runs a full IPv4 tunnel with the kill switch (as the other labs and a laptop do), lists A
then B as ``[[gateway]]`` entries and sets ``[client] cluster = true`` (a takeover, not a
fresh session, when its gateway dies).
Each gateway owns ``10.66.0.1/24`` on its own TUN (the tunnel address is local to each
gateway host) and forwards between the TUN and ``lan0`` without NAT (``nat = false``,
``nat_egress = "lan0"``), so the service sees the client's tunnel address and a TCP
connection can outlive a change of gateway.  The service host has ``10.66.0.0/24`` *on-link*
on ``lan0``: it ARPs for ``10.66.0.2`` and only a gateway that answers by proxy ARP gets the
answer back.  The lab itself never adds a proxy entry: that is the owning gateway's job
(``[cluster] announce_interface``), and a lab that did it would prove nothing.

*etcd.*  One member runs in the service namespace with :mod:`jvpn_trio.lab.etcd`'s types,
listening on ``http://198.51.100.10:2379`` for the gateways and on a unix socket in the run
directory for the test, which reads keys from the root namespace through
:meth:`ClusterLab.etcd_record` (a path crosses namespaces, an address would not).
``lab/etcd.py`` runs a member either on loopback or in a namespace of its own with only a
unix socket; this lab needs one in a namespace it built, on a LAN address as well, so the
member's command line is assembled here.

*Processes* (``serve`` in each gateway namespace, ``up`` in the client's, the traffic tools)
are :class:`~jvpn_trio.lab.netns.LabProcess` handles; their configs, keys, events, traces and
stderr live in the caller's directory (:func:`write_cluster_configs` for the layout).  On any
exit, in a shielded scope bounded by :data:`TEARDOWN_TIMEOUT_S`, every process is terminated,
etcd is stopped and every namespace the lab created is deleted.

*Traffic tools* are subcommands of this module, run inside a namespace::

    python -m jvpn_trio.lab.cluster tcp-echo --listen 198.51.100.10:7007 --ready F --report F
    python -m jvpn_trio.lab.cluster tcp-stream --connect 198.51.100.10:7007 --progress F --stop F

``tcp-stream`` sends an 8-byte counter every ``--interval-ms`` on one connection and checks
that each echo comes back in order; its progress file (rewritten every ``--progress-s``) says
how far it got, whether the connection broke, and the longest gap between echoes, so a test
can see that one TCP connection survived a takeover and how long it stalled.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.config import CLUSTER_STORES
from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.core.ids import SessionId
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.drivers.store_etcd import (
    DEFAULT_PREFIX,
    EtcdClient,
    EtcdRecord,
    decode_range_reply_untrusted,
    range_request,
    session_key,
)
from jvpn_trio.keyfile import (
    generate_private_key_text,
    public_from_private_text,
    write_private_key,
)
from jvpn_trio.lab.etcd import EtcdCluster, EtcdMember, EtcdSpec, etcd_binary
from jvpn_trio.lab.netns import LabError, LabProcess, new_prefix
from jvpn_trio.lab.processes import (
    CLIENT_TUN,
    CLIENT_TUNNEL,
    GATEWAY_TUN,
    GATEWAY_TUNNEL,
    PORT,
    STATUS_POLL_S,
    STATUS_TIMEOUT_S,
    TUNNEL_PREFIX,
    TunnelError,
    _tail,
    _wait_for_file,
)

# --- the address plan ------------------------------------------------------------------------

#: The client's WAN address and interface, and the WAN's prefix length.
CLIENT_WAN_ADDRESS = "192.0.2.2"
CLIENT_DEVICE = "eth0"
WAN_PREFIXLEN = 24
#: The service host's LAN address (etcd, the echo server) and the LAN's prefix length.
SERVICE_ADDRESS = "198.51.100.10"
LAN_PREFIXLEN = 24
LAN_SUBNET = "198.51.100.0/24"
#: Every LAN host's interface is this; the gateways' WAN interface is WAN_DEVICE.
LAN_DEVICE = "lan0"
WAN_DEVICE = "wan0"
#: The two bridges in the hub namespace.
WAN_BRIDGE = "wan"
LAN_BRIDGE = "lan"
#: etcd's ports in the service namespace (its own namespace: fixed ports cannot clash).
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_MEMBER = "svc"
ETCD_ENDPOINT = f"http://{SERVICE_ADDRESS}:{ETCD_CLIENT_PORT}"
#: The echo server's port on the service host.
ECHO_PORT = 7007

#: Bounds on one ``ip`` command, and on the whole teardown.
COMMAND_TIMEOUT_S = 10.0
TEARDOWN_TIMEOUT_S = 20.0
#: How long a process gets between SIGTERM and SIGKILL at teardown.
TERMINATE_GRACE_S = 2.0
#: How long the links may take to carry packets after ``link set up``, and how often that is checked.
LINK_UP_TIMEOUT_S = 5.0
LINK_UP_POLL_S = 0.01


@attrs.frozen
class GatewayHost:
    """One gateway of the lab: its short name (namespace suffix, file names), node id and addresses."""

    name: str
    node_id: str
    wan_address: str
    lan_address: str


GATEWAY_A = GatewayHost(name="gwa", node_id="gw-a", wan_address="192.0.2.11", lan_address="198.51.100.11")
GATEWAY_B = GatewayHost(name="gwb", node_id="gw-b", wan_address="192.0.2.12", lan_address="198.51.100.12")
#: In the client's order of preference (its ``[[gateway]]`` entries).
GATEWAYS = (GATEWAY_A, GATEWAY_B)


@attrs.frozen(kw_only=True)
class ClusterSpec:
    """What to build and how to configure it.

    ``store`` is the gateways' ``[cluster].store`` (``"memory"``: no etcd is started, each
    gateway alone; a benchmark compares the two).  The lease timings are the ``[cluster]``
    keys of the same names, short so that a dead gateway's lease expires in a few seconds.
    ``announce`` writes ``announce_interface = "lan0"``: without it nothing on the LAN can
    answer the service host's ARP for a tunnel address, so no return traffic reaches a client.
    ``policy`` is the ``[policy]`` table of all three configs (laptop defaults if empty).
    ``client_cluster`` is the client's ``[client] cluster``: the gateways share the store, so a
    session whose gateway died is resumed at the next one (a takeover) instead of re-made.
    """

    prefix: str = attrs.field(factory=new_prefix)
    store: str = attrs.field(default="etcd")
    lease_ttl_ms: int = 3000
    keepalive_interval_ms: int = 500
    request_timeout_ms: int = 1000
    lease_margin_ms: int = 500
    announce: bool = True
    client_cluster: bool = True
    policy: Mapping[str, Any] = attrs.field(factory=dict)
    #: The client's routes: a full IPv4 tunnel with the kill switch, as the other labs run it.
    routes: tuple[str, ...] = ("0.0.0.0/0",)
    kill_switch: bool = True
    #: Record traces (``--record``) for ``jvpn-trio replay``.
    record: bool = True
    etcd: EtcdSpec = attrs.field(factory=EtcdSpec)

    @store.validator
    def _check_store(self, _attribute: object, value: str) -> None:
        if value not in CLUSTER_STORES:
            raise ValueError(f"store must be one of {', '.join(CLUSTER_STORES)}, got {value!r}")


# --- configs -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    return json.dumps(value)


def _policy_lines(policy: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in policy.items())


def write_cluster_configs(directory: Path, spec: ClusterSpec) -> None:
    """Fresh keys and ``gwa.toml``, ``gwb.toml``, ``client.toml`` in ``directory``.

    Layout: ``<side>.key``, ``<side>.toml``, ``<side>.sock`` (control), ``<side>-events.jsonl``
    for ``side`` in gwa, gwb, client; the processes add ``<side>.err`` and ``<side>.trace.jsonl``.
    Both gateways give the peer the same configured ``address`` (10.66.0.2) on the same
    tunnel subnet, so a session keeps its tunnel address whichever gateway serves it.
    """
    client_key = generate_private_key_text(os.urandom)
    write_private_key(directory / "client.key", client_key)
    policy = _policy_lines(spec.policy)
    cluster = f'[cluster]\nstore = "{spec.store}"\n'
    if spec.store == "etcd":
        cluster += (
            f'etcd_endpoints = ["{ETCD_ENDPOINT}"]\n'
            f"lease_ttl_ms = {spec.lease_ttl_ms}\nkeepalive_interval_ms = {spec.keepalive_interval_ms}\n"
            f"request_timeout_ms = {spec.request_timeout_ms}\nlease_margin_ms = {spec.lease_margin_ms}\n"
        )
    if spec.announce:
        cluster += f'announce_interface = "{LAN_DEVICE}"\n'
    entries = []
    for gateway in GATEWAYS:
        key = generate_private_key_text(os.urandom)
        write_private_key(directory / f"{gateway.name}.key", key)
        (directory / f"{gateway.name}.toml").write_text(
            f"""[gateway]
private_key_file = "{gateway.name}.key"
listen = ["{gateway.wan_address}:{PORT}"]
tun_name = "{GATEWAY_TUN}"
tunnel_address = "{GATEWAY_TUNNEL}/24"
events_file = "{gateway.name}-events.jsonl"
control_socket = "{directory / f'{gateway.name}.sock'}"
node_id = "{gateway.node_id}"
nat = false
nat_egress = "{LAN_DEVICE}"

[[peer]]
name = "laptop"
public_key = "{public_from_private_text(client_key)}"
address = "{CLIENT_TUNNEL}"

{cluster}
[policy]
{policy}"""
        )
        entries.append(
            f'[[gateway]]\nendpoint = "{gateway.wan_address}:{PORT}"\npublic_key = "{public_from_private_text(key)}"\n'
        )
    (directory / "client.toml").write_text(
        f"""[client]
private_key_file = "client.key"
tun_name = "{CLIENT_TUN}"
routes = {_toml_value(list(spec.routes))}
kill_switch = {_toml_value(spec.kill_switch)}
cluster = {_toml_value(spec.client_cluster)}
events_file = "client-events.jsonl"
control_socket = "{directory / 'client.sock'}"

{chr(10).join(entries)}
[[path]]
interface = "{CLIENT_DEVICE}"
kind = "ethernet"
priority = 10

[policy]
{policy}"""
    )


# --- commands ----------------------------------------------------------------------------------


async def _command(argv: Sequence[str], *, stdin: bytes = b"", check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run one command to completion, bounded by COMMAND_TIMEOUT_S; LabError on failure."""
    result: subprocess.CompletedProcess[bytes] | None = None
    with trio.move_on_after(COMMAND_TIMEOUT_S):
        result = await trio.run_process(list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if result is None:
        raise LabError(f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT_S} s")
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    return result


@attrs.frozen
class StreamProgress:
    """What ``tcp-stream`` last wrote: counters sent and echoed, the longest gap, how it ended."""

    connected: bool
    local: str | None
    sent: int
    echoed: int
    longest_gap_s: float
    #: ``time.monotonic()`` of the last echo (None: none yet); shared by every process on the machine.
    last_echo_at: float | None
    error: str | None
    reset: bool
    done: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StreamProgress:
        values: dict[str, Any] = {field.name: data.get(field.name) for field in attrs.fields(cls)}
        return cls(**values)


@attrs.frozen
class Stream:
    """A running ``tcp-stream``: read its progress, stop it."""

    process: LabProcess
    progress_path: Path
    stop_path: Path
    stderr: Path

    async def progress(self) -> StreamProgress | None:
        """The latest progress record, or None before the first one."""
        path = trio.Path(self.progress_path)
        if not await path.exists():
            return None
        return StreamProgress.from_json(json.loads(await path.read_text()))

    async def stop(self) -> StreamProgress | None:
        """Ask the stream to stop (it writes its last record) and wait for it; the caller bounds the wait."""
        await trio.Path(self.stop_path).write_text("stop\n")
        await self.process.wait()
        return await self.progress()


@attrs.frozen
class EchoServer:
    process: LabProcess
    report: Path

    async def connections(self) -> int:
        """How many connections the server has accepted so far (its report, rewritten at each)."""
        path = trio.Path(self.report)
        if not await path.exists():
            return 0
        return int(json.loads(await path.read_text()).get("connections", 0))


class ClusterLab:
    """A built cluster lab (see the module docstring).  Get one from :func:`open_cluster_lab`."""

    def __init__(self, spec: ClusterSpec, directory: Path) -> None:
        self.spec = spec
        self.directory = directory
        prefix = spec.prefix
        self.hub_ns = f"{prefix}-hub"
        self.client_ns = f"{prefix}-cli"
        self.service_ns = f"{prefix}-svc"
        self.gateway_ns = {g.name: f"{prefix}-{g.name}" for g in GATEWAYS}
        self._created: list[str] = []
        self._processes: list[LabProcess] = []
        self.gateways: dict[str, LabProcess] = {}
        self.client: LabProcess | None = None
        self.etcd: EtcdCluster | None = None

    def namespaces(self) -> tuple[str, ...]:
        return (self.hub_ns, self.client_ns, *self.gateway_ns.values(), self.service_ns)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for a report or a kept lab)."""
        return {
            "prefix": self.spec.prefix,
            "namespaces": list(self.namespaces()),
            "store": self.spec.store,
            "etcd_endpoint": ETCD_ENDPOINT if self.spec.store == "etcd" else None,
            "gateways": {g.name: {"node_id": g.node_id, "wan": g.wan_address, "lan": g.lan_address} for g in GATEWAYS},
            "directory": str(self.directory),
        }

    # --- commands and processes ---------------------------------------------------------------

    def _check_ns(self, ns: str) -> None:
        if ns not in self.namespaces():
            raise ValueError(f"{ns!r} is not a namespace of this lab")

    async def run(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside ``ns`` to completion (bounded); LabError if it fails and ``check``."""
        self._check_ns(ns)
        return await _command(["ip", "netns", "exec", ns, *argv], check=check)

    async def start_process(
        self, ns: str, argv: Sequence[str], *, stderr_path: Path | None = None, stdout_path: Path | None = None
    ) -> LabProcess:
        """Start ``argv`` in ``ns`` in a session of its own; the lab terminates it at teardown at the latest."""
        self._check_ns(ns)

        def open_outputs() -> tuple[Any, Any]:
            return (
                open(stdout_path, "wb") if stdout_path is not None else subprocess.DEVNULL,
                open(stderr_path, "wb") if stderr_path is not None else None,
            )

        stdout, stderr = await trio.to_thread.run_sync(open_outputs)
        try:
            process = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            for file in (stdout, stderr):
                if hasattr(file, "close"):
                    file.close()
        handle = LabProcess(ns, argv, process)
        self._processes.append(handle)
        return handle

    def _jvpn_argv(self, command: str, side: str) -> list[str]:
        argv = [sys.executable, "-m", "jvpn_trio", command, "--config", str(self.directory / f"{side}.toml"), "--quiet"]
        return argv + (["--record", str(self.directory / f"{side}.trace.jsonl")] if self.spec.record else [])

    def socket_path(self, side: str) -> Path:
        return self.directory / f"{side}.sock"

    def events_path(self, side: str) -> Path:
        return self.directory / f"{side}-events.jsonl"

    def stderr_path(self, side: str) -> Path:
        return self.directory / f"{side}.err"

    async def start_gateway(self, name: str) -> LabProcess:
        """Start ``serve`` in gateway ``name``'s namespace; return once its control socket exists.

        TunnelError (with its stderr) if it dies first; the caller bounds the wait.
        """
        await trio.Path(self.socket_path(name)).unlink(missing_ok=True)
        process = await self.start_process(
            self.gateway_ns[name], self._jvpn_argv("serve", name), stderr_path=self.stderr_path(name)
        )
        self.gateways[name] = process
        await _wait_for_file(self.socket_path(name), process, name, self.stderr_path(name))
        return process

    async def start_client(self) -> LabProcess:
        """Start ``up`` in the client namespace and return at once."""
        self.client = await self.start_process(
            self.client_ns, self._jvpn_argv("up", "client"), stderr_path=self.stderr_path("client")
        )
        return self.client

    async def start_all(self) -> None:
        """Both gateways (A, then B, each once its control socket exists), then the client."""
        for gateway in GATEWAYS:
            await self.start_gateway(gateway.name)
        await self.start_client()

    async def wait_attached(self, gateway: GatewayHost) -> dict[str, Any]:
        """The client's status once it is ATTACHED through ``gateway`` (any session); the caller bounds it.

        TunnelError (with its stderr) if the client or that gateway exits meanwhile.
        """
        endpoint = f"{gateway.wan_address}:{PORT}"
        return await self.wait_client(
            lambda s: s.get("state") == "ATTACHED" and s.get("gateway") == endpoint, watch=(gateway.name,)
        )

    async def kill_gateway(self, name: str) -> int:
        """SIGKILL gateway ``name`` (a crash: no CLOSE, no lease revoke) and return its exit code."""
        return await self.gateways[name].kill()

    async def stop_gateway(self, name: str) -> int:
        """SIGTERM gateway ``name`` (a clean stop) and return its exit code."""
        return await self.gateways[name].terminate(grace_s=TERMINATE_GRACE_S)

    async def stop_client(self) -> int | None:
        """SIGTERM the client (LOCAL_CLOSE) and return its exit code; None if none was started."""
        return None if self.client is None else await self.client.terminate(grace_s=TERMINATE_GRACE_S)

    async def status(self, side: str) -> dict[str, Any]:
        """``status`` from ``side``'s control socket (ControlError if it does not answer)."""
        return await query_control(self.socket_path(side), {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)

    def check_alive(self, *gateways: str) -> None:
        """TunnelError (with the last lines of its stderr) if the client or one of ``gateways`` has exited."""
        running = {name: self.gateways.get(name) for name in gateways}
        if self.client is not None:
            running["client"] = self.client
        for name, process in running.items():
            if process is None or process.returncode is not None:
                code = "never started" if process is None else f"exited {process.returncode}"
                raise TunnelError(f"{name} {code}: {_tail(self.stderr_path(name))}")

    async def wait_client(
        self, predicate: Callable[[dict[str, Any]], bool], *, watch: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Poll the client's status until ``predicate`` holds; TunnelError if the client or a ``watch``ed gateway exits.

        The caller bounds the time.
        """
        while True:
            self.check_alive(*watch)
            with contextlib.suppress(ControlError):
                status = await self.status("client")
                if predicate(status):
                    return status
            await trio.sleep(STATUS_POLL_S)

    def events(self, side: str) -> list[EmitEvent]:
        """``side``'s event log, decoded (empty if it has none yet)."""
        path = self.events_path(side)
        text = path.read_text() if path.exists() else ""
        return [EmitEvent.from_dict(json.loads(line)) for line in text.splitlines() if line]

    # --- etcd ---------------------------------------------------------------------------------

    async def etcd_record(self, session: str, *, prefix: str = DEFAULT_PREFIX) -> EtcdRecord | None:
        """The session's key in etcd (owner, revision, lease), read through the member's unix socket."""
        if self.etcd is None:
            raise LabError("this lab runs no etcd (store = memory)")
        session_id = SessionId.from_hex(session)
        key = session_key(prefix, session_id)
        client = EtcdClient(
            [f"http://{ETCD_MEMBER}"],
            request_timeout_s=self.spec.etcd.probe_timeout_s,
            transport=self.etcd.transport(),
        )
        try:
            return decode_range_reply_untrusted(await client.post("/v3/kv/range", range_request(key)), key, session_id)
        finally:
            await client.aclose()

    async def _start_etcd(self) -> None:
        spec = self.spec.etcd
        binary = etcd_binary(spec)
        if binary is None:
            raise LabError(f"{spec.binary} is not installed (apt-get install etcd-server)")
        data = self.directory / "etcd"
        member = EtcdMember(
            name=ETCD_MEMBER,
            client_url=f"http://{ETCD_MEMBER}",  # a name for the unix-socket transport
            peer_url=f"http://127.0.0.1:{ETCD_PEER_PORT}",  # the service namespace's own loopback
            data_dir=data / ETCD_MEMBER,
            log_path=self.directory / "etcd.log",
            namespace=self.service_ns,
            socket_path=data / f"{ETCD_MEMBER}:{ETCD_CLIENT_PORT}",
        )
        await trio.Path(member.data_dir).mkdir(parents=True)
        # The unix socket (``unix://<file>:<port>``, created in the cwd) for us, the LAN address for the gateways.
        client_urls = f"unix://{ETCD_MEMBER}:{ETCD_CLIENT_PORT},{ETCD_ENDPOINT}"
        argv = [
            "ip", "netns", "exec", self.service_ns, binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", client_urls,
            "--advertise-client-urls", client_urls,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", f"{member.name}={member.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.spec.prefix,
            "--heartbeat-interval", str(spec.heartbeat_ms),
            "--election-timeout", str(spec.election_ms),
        ]  # fmt: skip
        self.etcd = EtcdCluster(spec=spec, base_dir=data, members=[member])
        log = await trio.to_thread.run_sync(member.log_path.open, "wb")
        try:
            member.process = await trio.lowlevel.open_process(argv, stdin=None, stdout=log, stderr=log, cwd=data)
        finally:
            log.close()
        await self.etcd.wait_healthy()

    # --- traffic ------------------------------------------------------------------------------

    async def start_echo_server(self, *, port: int = ECHO_PORT) -> EchoServer:
        """A TCP echo server on the service host; returns once it listens.  The caller bounds the wait."""
        ready, report, err = (self.directory / f"echo.{ext}" for ext in ("ready", "json", "err"))
        argv = tool_argv("tcp-echo", "--listen", f"{SERVICE_ADDRESS}:{port}", "--ready", str(ready), "--report", str(report))
        process = await self.start_process(self.service_ns, argv, stderr_path=err)
        await _wait_for_file(ready, process, "tcp-echo", err)
        return EchoServer(process, report)

    async def start_stream(
        self, *, name: str = "stream", port: int = ECHO_PORT, interval_ms: float = 10.0, duration_s: float = 300.0
    ) -> Stream:
        """Start ``tcp-stream`` from the client namespace to the echo server (through the tunnel)."""
        progress, stop, err = (self.directory / f"{name}.{ext}" for ext in ("json", "stop", "err"))
        argv = tool_argv(
            "tcp-stream", "--connect", f"{SERVICE_ADDRESS}:{port}", "--progress", str(progress), "--stop", str(stop),
            "--interval-ms", str(interval_ms), "--duration", str(duration_s),
        )  # fmt: skip
        process = await self.start_process(self.client_ns, argv, stderr_path=err)
        return Stream(process, progress, stop, err)

    # --- build and teardown -------------------------------------------------------------------

    async def _ip(self, *argv: str) -> None:
        await _command(["ip", *argv])

    async def _link(self, node_ns: str, device: str, bridge: str, port: str, address: str, prefixlen: int) -> None:
        """A veth pair from ``bridge`` (end ``port``, in the hub) to ``node_ns`` (end ``device``, addressed)."""
        hub = self.hub_ns
        await self._ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", device, "netns", node_ns)
        await self._ip("-n", hub, "link", "set", port, "master", bridge, "up")
        await self._ip("-n", node_ns, "addr", "add", f"{address}/{prefixlen}", "dev", device)
        await self._ip("-n", node_ns, "link", "set", device, "up")

    async def _build(self) -> None:
        for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: the cluster lab needs it (apt-get install {package})")
        for ns in self.namespaces():
            result = await _command(["ip", "netns", "add", ns], check=False)
            if result.returncode != 0:
                raise LabError(f"cannot create namespace {ns}: {result.stderr.decode(errors='replace').strip()}")
            self._created.append(ns)
            await self._ip("-n", ns, "link", "set", "lo", "up")
        for bridge in (WAN_BRIDGE, LAN_BRIDGE):
            await self._ip("-n", self.hub_ns, "link", "add", bridge, "type", "bridge")
            await self._ip("-n", self.hub_ns, "link", "set", bridge, "up")
        await self._link(self.client_ns, CLIENT_DEVICE, WAN_BRIDGE, "c-wan", CLIENT_WAN_ADDRESS, WAN_PREFIXLEN)
        for gateway in GATEWAYS:
            ns = self.gateway_ns[gateway.name]
            await self._link(ns, WAN_DEVICE, WAN_BRIDGE, f"{gateway.name}-wan", gateway.wan_address, WAN_PREFIXLEN)
            await self._link(ns, LAN_DEVICE, LAN_BRIDGE, f"{gateway.name}-lan", gateway.lan_address, LAN_PREFIXLEN)
        await self._link(self.service_ns, LAN_DEVICE, LAN_BRIDGE, "s-lan", SERVICE_ADDRESS, LAN_PREFIXLEN)
        # On-link: the service ARPs for each tunnel address, and only its owner's proxy ARP answers.
        await self._ip("-n", self.service_ns, "route", "add", TUNNEL_PREFIX, "dev", LAN_DEVICE, "scope", "link")
        await self._wait_operational()
        if self.spec.store == "etcd":
            await self._start_etcd()

    async def _wait_operational(self) -> None:
        """Return once every lab device has carrier and is up; LabError after LINK_UP_TIMEOUT_S."""
        devices = [(self.client_ns, CLIENT_DEVICE), (self.service_ns, LAN_DEVICE)]
        devices += [(ns, dev) for ns in self.gateway_ns.values() for dev in (WAN_DEVICE, LAN_DEVICE)]
        pending = devices
        with trio.move_on_after(LINK_UP_TIMEOUT_S):
            while pending:
                still = []
                for ns, dev in pending:
                    shown = json.loads((await _command(["ip", "-j", "-n", ns, "link", "show", "dev", dev])).stdout)
                    if not shown or shown[0].get("operstate") != "UP":
                        still.append((ns, dev))
                pending = still
                if pending:
                    await trio.sleep(LINK_UP_POLL_S)
            return
        raise LabError(f"links not up after {LINK_UP_TIMEOUT_S} s: {pending}")

    async def _aclose(self, *, raise_errors: bool) -> None:
        """Terminate every process (the client first: its CLOSE reaches a live gateway), stop etcd, delete namespaces."""
        errors: list[str] = []
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT_S) as scope:
            ordered = sorted(self._processes, key=lambda p: p is not self.client)
            for process in ordered:
                await process.terminate(grace_s=TERMINATE_GRACE_S)
            if self.etcd is not None:
                for member in self.etcd.members:
                    await member.stop(self.etcd.spec.stop_timeout_s)
            for ns in reversed(self._created):
                pids = await _command(["ip", "netns", "pids", ns], check=False)
                for word in pids.stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(word), signal.SIGKILL)
                result = await _command(["ip", "netns", "del", ns], check=False)
                if result.returncode != 0:
                    errors.append(f"{ns}: {result.stderr.decode(errors='replace').strip()}")
        if scope.cancelled_caught:
            errors.append(f"teardown took longer than {TEARDOWN_TIMEOUT_S} s")
        if errors and raise_errors:
            raise LabError("cluster lab teardown: " + "; ".join(errors))


@contextlib.asynccontextmanager
async def open_cluster_lab(spec: ClusterSpec, directory: Path) -> AsyncIterator[ClusterLab]:
    """Build the lab (and, with ``store = "etcd"``, start the member), write the configs, yield it.

    Nothing runs yet but etcd: start the gateways and the client with the lab's methods.  On
    any exit every process is stopped and every namespace deleted; LabError if the lab cannot
    be built, or on an otherwise clean exit if teardown fails.
    """
    if os.geteuid() != 0:
        raise LabError("the cluster lab needs root (network namespaces)")
    lab = ClusterLab(spec, directory)
    clean = False
    try:
        await trio.to_thread.run_sync(write_cluster_configs, directory, spec)
        await lab._build()
        yield lab
        clean = True
    finally:
        await lab._aclose(raise_errors=clean)


# --- traffic tools (run as ``python -m jvpn_trio.lab.cluster``) ---------------------------------

#: The stream's unit: one counter, big-endian.
COUNTER = struct.Struct("!Q")
#: How much an echo read takes at once.
ECHO_RECV_BYTES = 64 * 1024
#: How long ``tcp-stream`` waits for its connection (the tunnel is up when it starts).
CONNECT_TIMEOUT_S = 10.0


def tool_argv(subcommand: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "jvpn_trio.lab.cluster", subcommand, *args]


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically, so a reader never sees half a record."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(data, file)
    os.replace(temporary, path)


async def run_tcp_echo(listen: tuple[str, int], ready: str, report: str) -> None:
    """Echo every connection's bytes back; record how many connections were accepted."""
    accepted = 0

    async def echo(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await trio.to_thread.run_sync(_write_json, report, {"connections": accepted})
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while data := await stream.receive_some(ECHO_RECV_BYTES):
                    await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, echo, listen[1], host=listen[0]))
        await trio.to_thread.run_sync(_write_json, report, {"connections": 0})
        await trio.to_thread.run_sync(_write_json, ready, {"listening": f"{listen[0]}:{listen[1]}"})


async def run_tcp_stream(
    connect: tuple[str, int], *, progress: str, stop: str, interval_s: float, progress_s: float, duration_s: float
) -> bool:
    """Send a counter every ``interval_s`` on one connection and check the echoes; True if all came back in order.

    Stops at the stop file or after ``duration_s``; a reset or an echo out of order ends it at once.
    """
    state: dict[str, Any] = {
        "connected": False, "local": None, "sent": 0, "echoed": 0, "longest_gap_s": 0.0,
        "last_echo_at": None, "error": None, "reset": False, "done": False,
    }  # fmt: skip

    def save() -> None:
        _write_json(progress, state)

    stream: trio.SocketStream | None = None
    with trio.move_on_after(CONNECT_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream(*connect)
        except OSError as exc:
            state["error"] = f"connect: {exc}"
    if stream is None:
        state["error"] = state["error"] or f"connect: no answer within {CONNECT_TIMEOUT_S} s"
        state["done"] = True
        save()
        return False
    connection = stream
    host, port = connection.socket.getsockname()[:2]
    state.update(connected=True, local=f"{host}:{port}", last_echo_at=time.monotonic())
    save()

    def broken(exc: BaseException) -> None:
        """Record why the connection broke (a reset is the failure a takeover must not cause)."""
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        state["error"] = f"{type(cause).__name__}: {cause}"
        state["reset"] = isinstance(cause, ConnectionResetError)

    async def send(cancel: trio.CancelScope) -> None:
        deadline = trio.current_time()
        try:
            while True:
                await connection.send_all(COUNTER.pack(state["sent"]))
                state["sent"] += 1
                deadline += interval_s
                await trio.sleep_until(deadline)
        except (trio.BrokenResourceError, OSError) as exc:
            broken(exc)
            cancel.cancel()

    async def receive(cancel: trio.CancelScope) -> None:
        buffer = b""
        try:
            while data := await connection.receive_some(ECHO_RECV_BYTES):
                now = time.monotonic()
                state["longest_gap_s"] = max(state["longest_gap_s"], now - state["last_echo_at"])
                state["last_echo_at"] = now
                buffer += data
                whole = len(buffer) - len(buffer) % COUNTER.size
                for offset in range(0, whole, COUNTER.size):
                    (value,) = COUNTER.unpack_from(buffer, offset)
                    if value != state["echoed"]:
                        state["error"] = f"echo {value} where {state['echoed']} was due"
                        cancel.cancel()
                        return
                    state["echoed"] += 1
                buffer = buffer[whole:]
            state["error"] = "the server closed the connection"
        except (trio.BrokenResourceError, OSError) as exc:
            broken(exc)
        cancel.cancel()

    async def report(cancel: trio.CancelScope) -> None:
        stop_file = trio.Path(stop)
        while not await stop_file.exists():
            await trio.to_thread.run_sync(save)
            await trio.sleep(progress_s)
        cancel.cancel()

    async with connection:
        with trio.move_on_after(duration_s) as scope:
            async with trio.open_nursery() as nursery:
                for task in (send, receive, report):
                    nursery.start_soon(task, scope)
    state["done"] = True
    save()
    return state["error"] is None


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """The traffic tools' command line; exit 0 on success, 1 when the stream broke or went out of order."""
    parser = argparse.ArgumentParser(prog="python -m jvpn_trio.lab.cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("tcp-echo", help="echo TCP connections back")
    echo.add_argument("--listen", type=_endpoint, required=True)
    echo.add_argument("--ready", required=True)
    echo.add_argument("--report", required=True)
    stream = sub.add_parser("tcp-stream", help="a counter every interval on one connection, echoes checked")
    stream.add_argument("--connect", type=_endpoint, required=True)
    stream.add_argument("--progress", required=True)
    stream.add_argument("--stop", required=True)
    stream.add_argument("--interval-ms", type=float, default=10.0)
    stream.add_argument("--progress-s", type=float, default=1.0)
    stream.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.command == "tcp-echo":
        trio.run(run_tcp_echo, args.listen, args.ready, args.report)
        return 0
    ok = trio.run(
        lambda: run_tcp_stream(
            args.connect,
            progress=args.progress,
            stop=args.stop,
            interval_s=args.interval_ms / 1000.0,
            progress_s=args.progress_s,
            duration_s=args.duration,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
