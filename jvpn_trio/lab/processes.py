"""Running a real gateway and client in a lab: configs, start-up, status, logs, traffic tools.

Used by ``jvpn-trio lab`` (``runner.py``) and by the namespace tests
(``tests/integration``).  It writes fresh keys and TOML files into a directory, starts
``jvpn-trio serve`` in the gateway namespace and ``jvpn-trio up`` in the client namespace
(both recording their traces with ``--record``), waits for the session through the client's
control socket, and reads back what they logged.  Every process is started through
:meth:`jvpn_trio.lab.netns.Lab.start_process`, so the lab terminates it at teardown at the latest;
every wait here is unbounded by design and bounded by the caller (``trio.fail_after``).

File layout of a run directory::

    gateway.key  client.key  gateway.toml  client.toml
    gateway.sock client.sock                 control sockets (status)
    gateway-events.jsonl client-events.jsonl event logs (docs/events.md)
    gateway.trace.jsonl client.trace.jsonl   recordings for `jvpn-trio replay`
    gateway.err client.err                   the processes' stderr
    gateway-events.<n>.jsonl gateway.<n>.trace.jsonl gateway.<n>.err
                                             the files of the n-th gateway process killed by
                                             Tunnel.kill_gateway, moved aside so that its
                                             successor starts from the same config afresh
    gateway.clock client.clock               clock offsets (``--clock-offsets``), only for a
                                             scenario where the laptop sleeps
    <tool>.ready/.json/.err                  traffic tools (jvpn_trio.lab.traffic)

*A suspend* (:meth:`Tunnel.suspend_laptop` / :meth:`Tunnel.resume_laptop`) stops every
process of the client namespace with SIGSTOP (the laptop's programs sleep; the namespace's
kernel still answers ARP, as a suspended laptop's NIC does not: harmless, since nothing
replies to a request that arrives then).  On resume the laptop has slept ``slept_s`` by its
clock (at least the wall time it was stopped): the client's CLOCK_BOOTTIME moves forward by
the part that did not pass on the wall, its CLOCK_MONOTONIC back by the whole wall time (the
kernel stops it in a suspend), and the gateway, awake all along, sees both its clocks move
forward by that same difference.  Then SIGCONT.  The client's clock therefore jumps against
``time.monotonic()``: each jump is returned as a :class:`ClockJump` so the report can map
times (:class:`ClientClock`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import trio

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.core.policy import DEFAULT_POLICY
from jvpn_trio.drivers.clock import write_clock_offsets
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key
from jvpn_trio.lab.netns import Lab, LabProcess
from jvpn_trio.lab.traffic import traffic_argv

GATEWAY_TUNNEL = "10.66.0.1"
CLIENT_TUNNEL = "10.66.0.2"
#: The tunnel's IPv6 addresses (``TunnelOptions.ipv6_tunnel``): the client's is the twin of its IPv4 one.
GATEWAY_TUNNEL6 = "fd6a:7670::1"
CLIENT_TUNNEL6 = "fd6a:7670::2"
TUNNEL_PREFIXLEN6 = 64
PORT = 51820
#: How often start-up polls a socket file, a ready file or the client's status.
STATUS_POLL_S = 0.05
#: One control-socket query (the processes answer in milliseconds).
STATUS_TIMEOUT_S = 2.0
GATEWAY_TUN = "jvgw0"
CLIENT_TUN = "jvcl0"
#: The tunnel's subnets (both tunnel addresses of each family are in them).
TUNNEL_PREFIX = "10.66.0.0/24"
TUNNEL_PREFIX6 = "fd6a:7670::/64"
#: The gateway namespace's nft table that keeps traffic for the tunnel addresses in the tunnel.
TUNNEL_GUARD_TABLE = "jvlab_tunnel"
NODE_ID = "gw-lab"


class TunnelError(RuntimeError):
    """A lab process died or a tool could not start; the message says which and quotes its stderr."""


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no stderr)"
    return " / ".join(text[-lines:]) or "(no stderr)"


#: The files a gateway process writes that a killed one leaves behind: (name, name of run n).
GATEWAY_FILES = (
    ("gateway-events.jsonl", "gateway-events.{n}.jsonl"),
    ("gateway.trace.jsonl", "gateway.{n}.trace.jsonl"),
    ("gateway.err", "gateway.{n}.err"),
)


@attrs.frozen
class GatewayRun:
    """A gateway process that :meth:`Tunnel.kill_gateway` killed: its exit code and its files, moved aside."""

    number: int
    exit_code: int
    events: Path
    trace: Path
    stderr: Path


@attrs.define
class Tunnel:
    """A started gateway and client, and the directory holding their files.

    ``gateway`` is the latest gateway process (between :meth:`kill_gateway` and
    :meth:`start_gateway`, the killed one); ``killed`` lists every one killed.
    """

    directory: Path
    gateway: LabProcess
    client: LabProcess
    lab: Lab
    gateway_argv: tuple[str, ...]
    killed: list[GatewayRun] = attrs.Factory(list)
    #: Per side, the (boottime, monotonic) offsets its clock-offsets file holds; empty: no such files.
    clock_offsets: dict[str, tuple[float, float]] = attrs.Factory(dict)
    #: While the laptop sleeps: when it was stopped (time.monotonic()) and which pids.
    _asleep: tuple[float, tuple[int, ...]] | None = None
    #: While the gateway is frozen: when it was stopped (time.monotonic()).
    _gateway_frozen_at: float | None = None

    async def suspend_laptop(self) -> int:
        """SIGSTOP every process in the client namespace; returns how many.  RuntimeError if asleep already.

        Needs the clock-offsets files (``start_tunnel(..., clock_offsets=True)``).
        """
        if not self.clock_offsets:
            raise RuntimeError("the tunnel was started without clock offsets: it cannot simulate a suspend")
        if self._asleep is not None:
            raise RuntimeError("the laptop is asleep already")
        pids = await self.lab.namespace_pids(self.lab.client_ns)
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        self._asleep = (time.monotonic(), pids)
        return len(pids)

    async def resume_laptop(self, slept_s: float | None) -> ClockJump:
        """Move the clocks as a suspend of ``slept_s`` would have (see the module notes), then SIGCONT.

        ``slept_s`` None or shorter than the wall time stopped means the wall time.
        """
        if self._asleep is None:
            raise RuntimeError("the laptop is not asleep")
        since, pids = self._asleep
        wall = time.monotonic() - since
        extra = max(0.0, (slept_s if slept_s is not None else wall) - wall)
        boot, mono = self.clock_offsets["client"]
        self.clock_offsets["client"] = (boot + extra, mono - wall)
        boot, mono = self.clock_offsets["gateway"]
        self.clock_offsets["gateway"] = (boot + extra, mono + extra)

        def write() -> None:
            for side, (boottime, monotonic) in self.clock_offsets.items():
                write_clock_offsets(self.clock_file(side), boottime=boottime, monotonic=monotonic)

        await trio.to_thread.run_sync(write)
        at = time.monotonic()
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        self._asleep = None
        return ClockJump(at=at, seconds=extra, wall_s=wall)

    @property
    def asleep(self) -> bool:
        """True between :meth:`suspend_laptop` and :meth:`resume_laptop`."""
        return self._asleep is not None

    def clock_file(self, side: str) -> Path:
        return self.directory / f"{side}.clock"

    def freeze_gateway(self) -> int:
        """SIGSTOP the gateway: a host that stalls (a paused VM, a swap storm) and keeps its state.
        Returns its pid; RuntimeError if none runs or it is frozen already."""
        if self.gateway.returncode is not None or self._gateway_frozen_at is not None:
            raise RuntimeError("no gateway is running, or it is frozen already")
        _signal(self.gateway.pid, signal.SIGSTOP)
        self._gateway_frozen_at = time.monotonic()
        return self.gateway.pid

    def thaw_gateway(self) -> float:
        """SIGCONT the frozen gateway; returns how long it was stopped (s).  RuntimeError if not frozen."""
        if self._gateway_frozen_at is None:
            raise RuntimeError("the gateway is not frozen")
        _signal(self.gateway.pid, signal.SIGCONT)
        stopped, self._gateway_frozen_at = time.monotonic() - self._gateway_frozen_at, None
        return stopped

    async def kill_gateway(self) -> GatewayRun:
        """SIGKILL the gateway (a crash or a power cut of the server) and move its files aside.

        Its control socket file is left behind by the dead process and removed here, so
        :meth:`start_gateway` can tell when the next one listens.  RuntimeError if none runs.
        """
        if self.gateway.returncode is not None:
            raise RuntimeError("no gateway is running")
        code = await self.gateway.kill()
        number = len(self.killed) + 1

        def rotate() -> GatewayRun:
            moved = []
            for current, old in GATEWAY_FILES:
                target = self.directory / old.format(n=number)
                if (self.directory / current).exists():
                    (self.directory / current).rename(target)
                moved.append(target)
            self.gateway_socket.unlink(missing_ok=True)
            return GatewayRun(number=number, exit_code=code, events=moved[0], trace=moved[1], stderr=moved[2])

        run = await trio.to_thread.run_sync(rotate)
        self.killed.append(run)
        return run

    async def start_gateway(self) -> LabProcess:
        """Start the gateway again, same config, keys and command line; return once its control socket exists.

        TunnelError if it dies before that; RuntimeError if one runs.  The caller bounds the wait.
        """
        if self.gateway.returncode is None:
            raise RuntimeError("a gateway is running already")
        err = self.directory / "gateway.err"
        gateway = await self.lab.start_process(self.lab.gateway_ns, self.gateway_argv, stderr_path=err)
        self.gateway = gateway
        await _wait_for_file(self.gateway_socket, gateway, "gateway", err)
        return gateway

    @property
    def client_socket(self) -> Path:
        return self.directory / "client.sock"

    @property
    def gateway_socket(self) -> Path:
        return self.directory / "gateway.sock"

    async def client_status(self) -> dict[str, Any]:
        return await query_control(self.client_socket, {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)

    async def gateway_status(self) -> dict[str, Any]:
        return await query_control(self.gateway_socket, {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)

    def check_alive(self) -> None:
        """TunnelError (with the last lines of its stderr) if either process has exited."""
        for proc, name in ((self.client, "client"), (self.gateway, "gateway")):
            if proc.returncode is not None:
                raise TunnelError(f"{name} exited {proc.returncode}: {_tail(self.directory / f'{name}.err')}")

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the client's control socket until its status satisfies ``predicate``; return that status.

        TunnelError if either process exits meanwhile; the caller bounds the time.
        """
        while True:
            self.check_alive()
            try:
                status = await self.client_status()
                if predicate(status):
                    return status
            except ControlError:
                pass
            await trio.sleep(STATUS_POLL_S)

    async def wait_attached(self) -> dict[str, Any]:
        """Poll the client's control socket until its session is ATTACHED (the caller bounds the time)."""
        return await self.wait_status(lambda status: status.get("state") == "ATTACHED")

    def events_path(self, side: str) -> Path:
        return self.directory / f"{side}-events.jsonl"

    def events(self, side: str) -> list[EmitEvent]:
        """The side's event log, decoded (ValueError on a line that is not an event)."""
        text = self.events_path(side).read_text() if self.events_path(side).exists() else ""
        return [EmitEvent.from_dict(json.loads(line)) for line in text.splitlines() if line]

    def trace(self, side: str) -> Path:
        return self.directory / f"{side}.trace.jsonl"

    async def stop(self) -> tuple[int, int]:
        """Close the session the way a user does (SIGTERM to the client: LOCAL_CLOSE), then stop the gateway.

        Returns both exit codes (the gateway's is -9 if it was killed and not started again).
        The lab would terminate them at teardown anyway; stopping them here first lets their
        event logs and traces end cleanly before anything is read.
        """
        client = await self.client.terminate()
        if self._gateway_frozen_at is not None:  # a run that failed half-way through a freeze
            self.thaw_gateway()
        gateway = await self.gateway.terminate()
        return client, gateway


def _policy_lines(policy: Mapping[str, Any]) -> str:
    """The ``[policy]`` body: only the keys that differ from the laptop default (TOML-safe numbers)."""
    default = DEFAULT_POLICY.to_mapping()
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in policy.items() if default.get(k, object()) != v)


@attrs.frozen(kw_only=True)
class TunnelOptions:
    """How the lab's gateway and client are configured beyond the defaults (IPv4 endpoint, full IPv4 tunnel).

    ``ipv6_tunnel`` gives the gateway ``tunnel_address6`` (the tunnel carries IPv6);
    ``routes`` are the client's; ``gateway_ipv6`` makes the client reach the gateway at
    ``[<lab.gateway_address6>]:PORT`` over the paths' IPv6; ``gateway_host`` names another
    address of the gateway for the client; ``listen`` replaces the gateway's listen list (hosts,
    each at ``PORT``; default: the one address the client uses); ``kill_switch`` None leaves the
    client's default (on for a full tunnel); ``dns`` is the client's ``dns`` list (resolvers
    reached through the tunnel; empty: DNS left alone); ``metered`` names the paths whose
    ``[[path]]`` says ``metered = true`` (the others follow their kind); ``tun_offload``
    False opens both TUNs without offloads (``tun_offload = false``).
    """

    ipv6_tunnel: bool = False
    routes: tuple[str, ...] = ("0.0.0.0/0",)
    gateway_ipv6: bool = False
    gateway_host: str | None = None
    listen: tuple[str, ...] | None = None
    kill_switch: bool | None = None
    dns: tuple[str, ...] = ()
    metered: tuple[str, ...] = ()
    tun_offload: bool = True


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_configs(
    directory: Path, lab: Lab, *, policy: Mapping[str, Any], options: TunnelOptions = TunnelOptions()
) -> None:
    """Fresh keys, ``gateway.toml`` and ``client.toml`` (one ``[[path]]`` per lab path, in order).

    Every lab path gets an ``interface = "<name>"`` entry, including the ones whose interface
    does not exist yet (``LabSpec.absent``) or will be deleted: the client is told about the
    laptop's interfaces by name, as a user would write them, and follows their coming and going.
    The client's paths get ids p1, p2, ... in the lab's path order, which is how a report maps
    ``p2`` back to an interface name.
    """
    unknown = sorted(set(options.metered) - {p.name for p in lab.paths})
    if unknown:
        raise ValueError(f"metered paths must be paths of the lab, got {unknown}")
    gateway_key = generate_private_key_text(os.urandom)
    client_key = generate_private_key_text(os.urandom)
    write_private_key(directory / "gateway.key", gateway_key)
    write_private_key(directory / "client.key", client_key)
    policy_lines = _policy_lines(policy)
    gateway_host = options.gateway_host or (lab.gateway_address6 if options.gateway_ipv6 else lab.gateway_address)
    kill_switch = "" if options.kill_switch is None else f"kill_switch = {json.dumps(options.kill_switch)}\n"
    listen = ", ".join(json.dumps(_endpoint(h, PORT)) for h in (options.listen or (gateway_host,)))
    tunnel6 = f'tunnel_address6 = "{GATEWAY_TUNNEL6}/{TUNNEL_PREFIXLEN6}"\n' if options.ipv6_tunnel else ""
    offload = "" if options.tun_offload else "tun_offload = false\n"
    (directory / "gateway.toml").write_text(
        f"""[gateway]
private_key_file = "gateway.key"
listen = [{listen}]
tun_name = "{GATEWAY_TUN}"
{offload}tunnel_address = "{GATEWAY_TUNNEL}/24"
{tunnel6}events_file = "gateway-events.jsonl"
control_socket = "{directory / 'gateway.sock'}"
node_id = "{NODE_ID}"

[[peer]]
name = "laptop"
public_key = "{public_from_private_text(client_key)}"
address = "{CLIENT_TUNNEL}"

[policy]
{policy_lines}
"""
    )
    paths = "\n".join(
        f'[[path]]\ninterface = "{p.name}"\nkind = "{p.kind}"\npriority = {p.metric}\n'
        + ("metered = true\n" if p.name in options.metered else "")
        for p in lab.paths
    )
    (directory / "client.toml").write_text(
        f"""[client]
private_key_file = "client.key"
gateway_public_key = "{public_from_private_text(gateway_key)}"
gateway = "{_endpoint(gateway_host, PORT)}"
tun_name = "{CLIENT_TUN}"
{offload}routes = {json.dumps(list(options.routes))}
dns = {json.dumps(list(options.dns))}
{kill_switch}
events_file = "client-events.jsonl"
control_socket = "{directory / 'client.sock'}"

{paths}
[policy]
{policy_lines}
"""
    )


async def _wait_for_file(path: Path, process: LabProcess, name: str, err: Path) -> None:
    while not await trio.Path(path).exists():
        if process.returncode is not None:
            raise TunnelError(f"{name} exited {process.returncode} before it was ready: {_tail(err)}")
        await trio.sleep(STATUS_POLL_S)


async def guard_tunnel(lab: Lab) -> None:
    """Drop, in the gateway namespace, what reaches a tunnel address other than through the gateway's TUN.

    The lab's traffic goes to the gateway's tunnel address, which is local to the gateway
    namespace; without this, a client that has lost its routes (or exited) would send that
    traffic straight over a path's link, the gateway would accept it, and the lab would measure
    the bare LAN as if it were the tunnel.
    """
    script = (
        f"table inet {TUNNEL_GUARD_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f'    ip daddr {TUNNEL_PREFIX} iifname != {{ "{GATEWAY_TUN}", "lo" }} counter drop\n'
        f'    ip6 daddr {TUNNEL_PREFIX6} iifname != {{ "{GATEWAY_TUN}", "lo" }} counter drop\n'
        "  }\n"
        "}\n"
    )
    await lab.run(lab.gateway_ns, "nft", "-f", "-", stdin=script.encode())


async def start_tunnel(
    lab: Lab,
    directory: Path,
    *,
    policy: Mapping[str, Any],
    record: bool = True,
    clock_offsets: bool = False,
    options: TunnelOptions = TunnelOptions(),
) -> Tunnel:
    """Start the gateway, then (once its control socket exists) the client; return once both run.

    With ``record`` (the default) each records its trace into the directory; with
    ``clock_offsets`` each runs on clocks the lab can move (a simulated suspend);
    ``options`` configure IPv6 (:class:`TunnelOptions`).  Raises TunnelError if the
    gateway dies before it is ready.
    """
    offsets = {side: (0.0, 0.0) for side in ("gateway", "client")} if clock_offsets else {}

    def prepare() -> None:
        write_configs(directory, lab, policy=policy, options=options)
        for side in offsets:
            write_clock_offsets(directory / f"{side}.clock", boottime=0.0, monotonic=0.0)

    await trio.to_thread.run_sync(prepare)
    await guard_tunnel(lab)
    py = sys.executable

    def argv(command: str, side: str) -> list[str]:
        out = [py, "-m", "jvpn_trio", command, "--config", str(directory / f"{side}.toml"), "--quiet"]
        if offsets:
            out += ["--clock-offsets", str(directory / f"{side}.clock")]
        return out + (["--record", str(directory / f"{side}.trace.jsonl")] if record else [])

    gateway_argv = tuple(argv("serve", "gateway"))
    gateway = await lab.start_process(lab.gateway_ns, gateway_argv, stderr_path=directory / "gateway.err")
    await _wait_for_file(directory / "gateway.sock", gateway, "gateway", directory / "gateway.err")
    client = await lab.start_process(lab.client_ns, argv("up", "client"), stderr_path=directory / "client.err")
    return Tunnel(
        directory=directory, gateway=gateway, client=client, lab=lab, gateway_argv=gateway_argv, clock_offsets=offsets
    )


def _signal(pid: int, signum: int) -> None:
    """Signal ``pid``; one that has exited meanwhile is not an error."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -----------------------------------------------------------------------------
# Traffic tools (jvpn_trio.lab.traffic), started in the background
# -----------------------------------------------------------------------------


@attrs.frozen
class Tool:
    """A traffic tool running in a lab namespace; its report is read once it has exited."""

    name: str
    process: LabProcess
    report: Path
    stderr: Path

    async def finish(self) -> dict[str, Any]:
        """Wait for the tool to stop by itself; its report, or TunnelError if it wrote none."""
        await self.process.wait()
        return await self.read_report()

    async def read_report(self) -> dict[str, Any]:
        path = trio.Path(self.report)
        if not await path.exists():
            raise TunnelError(f"{self.name} exited {self.process.returncode} without a report: {_tail(self.stderr)}")
        data: dict[str, Any] = json.loads(await path.read_text())
        return data


async def start_tool(
    lab: Lab, ns: str, subcommand: str, *args: str, directory: Path, name: str, listen: str | None = None
) -> Tool:
    """Start ``python -m jvpn_trio.lab.traffic <subcommand> ...`` in ``ns``.

    A server (``listen`` given) is started with ``--ready`` and this returns only once it is
    listening; TunnelError if it exits first.  The caller bounds the wait.
    """
    report, stderr = directory / f"{name}.json", directory / f"{name}.err"
    extra: list[str] = []
    ready = directory / f"{name}.ready"
    if listen is not None:
        extra = ["--listen", listen, "--ready", str(ready)]
    argv = traffic_argv(subcommand, *extra, "--report", str(report), *args)
    process = await lab.start_process(ns, argv, stderr_path=stderr)
    if listen is not None:
        await _wait_for_file(ready, process, subcommand, stderr)
    return Tool(name, process, report, stderr)


@attrs.frozen
class ClockSample:
    """One reading of the client's core clock: its snapshot ``now`` and our monotonic clock after the reply."""

    core_now: float
    monotonic_after: float
    monotonic_before: float


async def sample_client_clock(tunnel: Tunnel) -> ClockSample | None:
    """Ask the client for its status and note ``time.monotonic()`` around it; None if it did not answer."""
    before = time.monotonic()
    try:
        status = await tunnel.client_status()
    except ControlError:
        return None
    after = time.monotonic()
    now = status.get("now_s")
    if not isinstance(now, (int, float)) or isinstance(now, bool):
        return None
    return ClockSample(core_now=float(now), monotonic_after=after, monotonic_before=before)


@attrs.frozen
class ClockJump:
    """The client's clock moved ``seconds`` forward against ``time.monotonic()`` at ``at`` (a resume)."""

    at: float
    seconds: float
    #: How long the laptop was really stopped before it.
    wall_s: float = 0.0


@attrs.frozen
class ClientClock:
    """The client's core clock as a function of ``time.monotonic()``: an offset, plus every jump since."""

    offset: float
    jumps: tuple[ClockJump, ...] = ()

    def jumped(self, monotonic: float) -> float:
        return sum(j.seconds for j in self.jumps if j.at <= monotonic)

    def at(self, monotonic: float) -> float:
        return monotonic + self.offset + self.jumped(monotonic)


def estimate_client_clock(
    samples: Sequence[ClockSample], jumps: Sequence[ClockJump] = (), *, rounding_s: float = 0.0005
) -> ClientClock | None:
    """Best lower bound of ``core clock - time.monotonic()`` over the samples (see runner.py's clock notes).

    A snapshot's ``now`` is the time of the client's last core call, which happened before its
    reply left, so ``core_now - rounding <= monotonic_after + offset`` for every sample: each
    gives ``offset >= core_now - rounding - monotonic_after`` and the largest is the tightest.
    With core calls every few milliseconds (probes on every path) it is within a few ms.
    The jumps the lab made are known exactly and taken out of each sample first.
    """
    if not samples:
        return None
    clock = ClientClock(offset=0.0, jumps=tuple(jumps))
    offset = max(s.core_now - rounding_s - s.monotonic_after - clock.jumped(s.monotonic_after) for s in samples)
    return attrs.evolve(clock, offset=offset)
