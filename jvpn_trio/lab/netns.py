"""A network-namespace lab: one client and one gateway joined by several paths, with faults.

Theory of operation
-------------------
A lab is two namespaces, ``<prefix>-cli`` (the client) and ``<prefix>-gw`` (the gateway), joined
by one veth pair per :class:`LabPath`.  The client end of each pair carries exactly the path's
name (``eth0``, ``wifi0``, ``lte0``) so the runtime under test sees the interface names it would
see on a laptop; the gateway end is ``gw-<name>``.  Both ends are created directly inside their
namespaces (``ip link add NAME netns A type veth peer name gw-NAME netns B``), so no temporary
interface ever exists in the root namespace and a crash can leave nothing behind there.

Address plan (``o`` = ``LabSpec.link_octet``, default 77; ``i`` = ``LabPath.index``)::

    client  <name>      10.o.i.2/24    default via 10.o.i.1 dev <name> metric <metric>
    gateway gw-<name>   10.o.i.1/24
    gateway lo          <gateway_address>/32 (default 10.99.0.1), net.ipv4.ip_forward=1

and, with ``LabSpec.ipv6`` (the default), the same plan in IPv6 unique-local addresses (``o``
and ``i`` in hex), so a client can reach the gateway over IPv6 on every path::

    client  <name>      fd77:o:i::2/64   default via fd77:o:i::1 dev <name> metric <metric>
    gateway gw-<name>   fd77:o:i::1/64
    gateway lo          <gateway_address6>/128 (default fd99::1), net.ipv6.conf.all.forwarding=1

IPv6 addresses are added with ``nodad`` (usable at once, as the IPv4 ones are) and kept while a
link is down (``keep_addr_on_down``), as IPv4 addresses are; ``link_up`` adds both default routes back.

Every lab has its own pair of namespaces, so two labs with the same plan never clash; the plan
is fixed by default so configuration files and tests can name 10.99.0.1 (the address
``docs/platform-notes.md`` and ``../shared/peers.md`` measured with).

The gateway namespace is a strict LAN router (``LabSpec.arp_strict``, the default): it answers
ARP only for an address configured on the interface the request came in on
(``arp_ignore = 1`` for ``all``, ``default`` and every lab device), as a real router does.
Linux's own default answers for *any* of its addresses on any interface, so a client with a
missing or stale route (``10.99.0.1 dev eth0`` on-link, a next hop from an old subnet) would
still reach the gateway; under the strict default that path is dead, as on a real LAN.

A laptop's network changes under it, and so can the lab's (:meth:`Lab.add_path`,
:meth:`Lab.delete_path`, :meth:`Lab.flush_address`, :meth:`Lab.add_address`): a path named in
``LabSpec.absent`` is not built at start and appears later as a new veth pair with its address,
default route and fault chains; a path can be deleted (``ip link del``), lose its address (the
kernel then deletes its routes) or get a new one, possibly in another subnet of the same link
with another next hop on the router side.  Subnet ``k`` of path ``i`` is
``10.o.(i + SUBNET_STRIDE * k).0/24``; the client is host ``h`` in it (2 by default), the router
host 1.

Faults are installed on both ends of a path, always on the *receiving* side, because an nft
drop in an output hook makes ``sendto()`` fail with EPERM instead of losing the packet silently
(platform notes, section 2).  Each namespace gets one ``netdev`` table (:data:`NFT_TABLE`) with,
per lab device, a base chain hooked on that device's ingress that jumps to two regular chains,
``blackhole_<name>`` and ``loss_<name>``.  A fault owns its chain: setting it is "flush the
chain, add the rule" in one nft transaction and clearing it is "flush the chain", so every
fault call is idempotent and clears exactly what it installed.  Rate limits are a ``tbf`` root
qdisc on both veth ends (netem does not exist on this kernel).  ``link_down`` sets the client
end down; the kernel then deletes that path's default route, so ``link_up`` adds it back.

Every process the lab starts is terminated at teardown, and teardown runs on any exit
(error, cancellation, KeyboardInterrupt) in a shielded scope bounded by
:data:`TEARDOWN_TIMEOUT_S`.  Only namespaces this lab created are deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from typing import IO, Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import attrs
import trio

from jvpn_trio.config import PATH_KINDS

#: New lab prefixes are this plus 4 random hex digits (``jvlab3fa2``).
PREFIX_FAMILY = "jvlab"
#: The nft table created in each lab namespace (the namespaces are the lab's own).
NFT_TABLE = "jvlab"
#: The gateway end of path ``eth0`` is ``gw-eth0``.
GATEWAY_DEVICE_PREFIX = "gw-"
#: Prefix length of each path's link subnet.
LINK_PREFIXLEN = 24
#: One ``ip``/``nft``/``tc`` invocation made by the lab itself; they finish in milliseconds.
COMMAND_TIMEOUT_S = 10.0
#: How long a link may take to become operational (carrier, qdisc) after ``link set up``, and
#: how often that is checked: the kernel finishes this asynchronously (linkwatch), and until it
#: has, the device's qdisc silently drops what is sent.
LINK_UP_TIMEOUT_S = 5.0
LINK_UP_POLL_S = 0.01
#: Upper bound on the whole teardown (processes, then namespaces).
TEARDOWN_TIMEOUT_S = 15.0
#: How long a process gets between SIGTERM and SIGKILL.
TERMINATE_GRACE_S = 2.0
#: Third-octet distance between the subnets a path's link may be moved to (``Lab.add_address``).
SUBNET_STRIDE = 64
#: The client's and the router's host numbers in a link subnet (until a step picks another).
CLIENT_HOST = 2
ROUTER_HOST = 1
#: The highest client host number in a link subnet (a /24).
MAX_HOST = 254
#: ``arp_ignore`` in the gateway namespace under ``arp_strict``: answer only for the incoming interface's addresses.
ARP_IGNORE_STRICT = 1
#: ``numgen random mod LOSS_MODULUS``: loss is set in steps of 0.01 %.
LOSS_MODULUS = 10_000
#: tbf queueing bound, and its bucket: at least this many bytes, or this much time at the rate.
TBF_LATENCY_MS = 50
TBF_MIN_BURST_BYTES = 32 * 1024
TBF_BURST_S = 0.004

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
# Path names end up in interface names (IFNAMSIZ: 15 characters with "gw-") and nft chain names.
_PATH_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class LabError(Exception):
    """A lab command failed or the lab cannot be built; the message is one line."""


def new_prefix() -> str:
    """A fresh lab prefix, ``jvlab`` + 4 random hex digits."""
    return PREFIX_FAMILY + secrets.token_hex(2)


def _check_prefix(value: str) -> None:
    if not isinstance(value, str) or not _PREFIX_RE.match(value):
        raise ValueError(f"lab prefix must match {_PREFIX_RE.pattern}, got {value!r}")


# -----------------------------------------------------------------------------
# Specification
# -----------------------------------------------------------------------------


@attrs.frozen
class LabPath:
    """One client path: its interface name, kind (as in config files), route metric and subnet index."""

    name: str = attrs.field()
    kind: str = attrs.field()
    metric: int = attrs.field()
    index: int = attrs.field()

    @name.validator
    def _check_name(self, _attribute: object, value: str) -> None:
        if not isinstance(value, str) or not _PATH_NAME_RE.match(value):
            raise ValueError(f"path name must match {_PATH_NAME_RE.pattern}, got {value!r}")

    @kind.validator
    def _check_kind(self, _attribute: object, value: str) -> None:
        if value not in PATH_KINDS:
            raise ValueError(f"path {self.name}: kind must be one of {', '.join(PATH_KINDS)}, got {value!r}")

    @metric.validator
    def _check_metric(self, _attribute: object, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"path {self.name}: metric must be an integer 1..2^32-1, got {value!r}")

    @index.validator
    def _check_index(self, _attribute: object, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 254:
            raise ValueError(f"path {self.name}: index must be an integer 1..254, got {value!r}")


#: The three paths of ``peers.md``: Ethernet, Wi-Fi, LTE with route metrics 10/20/30.
DEFAULT_PATHS = (
    LabPath(name="eth0", kind="ethernet", metric=10, index=1),
    LabPath(name="wifi0", kind="wifi", metric=20, index=2),
    LabPath(name="lte0", kind="lte", metric=30, index=3),
)


def _ipv6_text(value: object) -> str:
    try:
        return str(ipaddress.IPv6Address(str(value)))
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"gateway_address6: {exc}") from None


#: The IPv6 link prefix length (a /64 per path, as a LAN has).
LINK_PREFIXLEN6 = 64


def _ipv4_text(value: object) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"gateway_address: {exc}") from None


def _paths_tuple(value: Iterable[LabPath]) -> tuple[LabPath, ...]:
    """``LabSpec.paths`` from any iterable (a typed converter: mypy cannot see through ``tuple``)."""
    return tuple(value)


@attrs.frozen
class LabSpec:
    """What to build.  Validated at construction; see the module docstring for the address plan.

    ``absent`` names paths whose interface is not built at start (a later :meth:`Lab.add_path`
    creates it); ``arp_strict`` makes the gateway side answer ARP only for its own addresses.
    """

    prefix: str = attrs.field(factory=new_prefix)
    paths: tuple[LabPath, ...] = attrs.field(default=DEFAULT_PATHS, converter=_paths_tuple)
    gateway_address: str = attrs.field(default="10.99.0.1", converter=_ipv4_text)
    link_octet: int = attrs.field(default=77)
    absent: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    arp_strict: bool = attrs.field(default=True)
    #: Give every path an IPv6 address and default route too, and the gateway ``gateway_address6``.
    ipv6: bool = attrs.field(default=True)
    gateway_address6: str = attrs.field(default="fd99::1", converter=_ipv6_text)

    @absent.validator
    def _check_absent(self, _attribute: object, value: frozenset[str]) -> None:
        unknown = sorted(value - {p.name for p in self.paths})
        if unknown:
            raise ValueError(f"absent paths must be paths of the lab, got {unknown}")

    @prefix.validator
    def _check_prefix(self, _attribute: object, value: str) -> None:
        _check_prefix(value)

    @paths.validator
    def _check_paths(self, _attribute: object, value: tuple[LabPath, ...]) -> None:
        if not value:
            raise ValueError("a lab needs at least one path")
        if not all(isinstance(p, LabPath) for p in value):
            raise ValueError("paths must be LabPath values")
        for field in ("name", "index", "metric"):
            seen = [getattr(p, field) for p in value]
            if len(set(seen)) != len(seen):
                # Unique metrics: `ip route replace default ... metric M` must only ever match its own path.
                raise ValueError(f"paths must have distinct {field}s, got {seen}")

    @link_octet.validator
    def _check_link_octet(self, _attribute: object, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
            raise ValueError(f"link_octet must be an integer 0..255, got {value!r}")

    def __attrs_post_init__(self) -> None:
        links = ipaddress.IPv4Network(f"10.{self.link_octet}.0.0/16")
        if ipaddress.IPv4Address(self.gateway_address) in links:
            raise ValueError(f"gateway_address {self.gateway_address} lies inside the link range {links}")

    def link_addresses(self, path: LabPath, *, subnet: int = 0, host: int = CLIENT_HOST) -> tuple[str, str]:
        """``(client_ip, gateway_ip)`` of ``path``'s link in its ``subnet`` (0: its own), without prefix length.

        ValueError if the subnet or host does not exist in the address plan.
        """
        third = path.index + SUBNET_STRIDE * subnet
        if subnet < 0 or third > 254:
            raise ValueError(f"path {path.name}: no subnet {subnet} in the address plan (index {path.index})")
        if not ROUTER_HOST < host <= MAX_HOST:
            raise ValueError(f"path {path.name}: host {host} is not a client host number ({ROUTER_HOST + 1}..{MAX_HOST})")
        base = f"10.{self.link_octet}.{third}"
        return f"{base}.{host}", f"{base}.{ROUTER_HOST}"

    def link_addresses6(self, path: LabPath, *, subnet: int = 0, host: int = CLIENT_HOST) -> tuple[str, str]:
        """``(client_ip6, gateway_ip6)`` of ``path``'s link: the IPv6 twin of :meth:`link_addresses`."""
        self.link_addresses(path, subnet=subnet, host=host)  # the same checks
        third = path.index + SUBNET_STRIDE * subnet
        base = f"fd77:{self.link_octet:x}:{third:x}"
        return f"{base}::{host:x}", f"{base}::{ROUTER_HOST:x}"


@attrs.frozen
class PathFaults:
    """The faults currently installed on one path (what :meth:`Lab.faults` reports)."""

    link_up: bool = True
    blackhole: bool = False
    loss_percent: float | None = None
    rate_mbit: float | None = None

    @property
    def clear(self) -> bool:
        return self == PathFaults()


# -----------------------------------------------------------------------------
# Commands and processes
# -----------------------------------------------------------------------------


def _one_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-2:]) if lines else "(no output)"


async def _command(
    argv: Sequence[str], *, stdin: bytes = b"", check: bool = True, timeout_s: float | None = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion without blocking the loop; LabError on failure or timeout."""
    scope = trio.move_on_after(timeout_s) if timeout_s is not None else contextlib.nullcontext()
    result: subprocess.CompletedProcess[bytes] | None = None
    with scope:
        try:
            result = await trio.run_process(
                list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
            )
        except FileNotFoundError:
            raise LabError(f"{argv[0]}: command not found (install iproute2)") from None
    if result is None:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout_s} s")
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {_one_line(result.stderr)}")
    return result


async def _open_output(path: str | os.PathLike[str] | None) -> IO[bytes] | None:
    if path is None:
        return None
    file: IO[bytes] = await trio.to_thread.run_sync(open, path, "wb")
    return file


class LabProcess:
    """A long-running process inside a lab namespace (see :meth:`Lab.start_process`)."""

    def __init__(self, ns: str, argv: Sequence[str], process: trio.Process) -> None:
        self.ns = ns
        self.argv = tuple(argv)
        self._process = process

    def __repr__(self) -> str:
        return f"<LabProcess pid={self.pid} ns={self.ns} rc={self.returncode} {' '.join(self.argv)!r}>"

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code (negative: killed by that signal) afterwards."""
        code: int | None = self._process.returncode
        return code

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit code."""
        return int(await self._process.wait())

    async def kill(self) -> int:
        """SIGKILL at once (a crash: nothing is flushed or closed) and return the exit code."""
        if self._process.returncode is None:
            self._process.kill()
        return int(await self._process.wait())

    async def terminate(self, *, grace_s: float = TERMINATE_GRACE_S) -> int:
        """SIGTERM, then SIGKILL if it is still running after ``grace_s``; returns the exit code."""
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                return int(await self._process.wait())
            self._process.kill()
        return int(await self._process.wait())


async def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (grandchildren of lab processes, strays of a crashed run)."""
    result = await _command(["ip", "netns", "pids", ns], check=False)
    for word in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


async def _delete_namespace(ns: str) -> None:
    await _kill_namespace_pids(ns)
    await _command(["ip", "netns", "del", ns])


async def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    result = await _command(["ip", "netns", "list"])
    return [line.split()[0] for line in result.stdout.decode().splitlines() if line.strip()]


async def destroy_stale(prefix: str) -> list[str]:
    """Delete every ``<prefix>*-cli`` / ``<prefix>*-gw`` namespace, killing what runs in it.

    For the leftovers of a crashed run (or a ``keep=True`` lab).  Passing the bare family prefix
    ``jvlab`` removes every lab on the machine, including ones still in use.  Returns the names
    deleted; raises LabError if one cannot be deleted.
    """
    _check_prefix(prefix)
    stale = [ns for ns in await list_namespaces() if ns.startswith(prefix) and ns.endswith(("-cli", "-gw"))]
    for ns in stale:
        await _delete_namespace(ns)
    return stale


# -----------------------------------------------------------------------------
# The lab
# -----------------------------------------------------------------------------

PathRef = str | LabPath


class Lab:
    """A built lab.  Obtain one from :func:`open_lab`; it is torn down when that block exits."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.client_ns = f"{spec.prefix}-cli"
        self.gateway_ns = f"{spec.prefix}-gw"
        self._paths = {path.name: path for path in spec.paths}
        self._created: list[str] = []
        self._processes: list[LabProcess] = []
        self._faults = {name: PathFaults() for name in self._paths}
        self._fault_lock = trio.Lock()
        self._present = {path.name for path in spec.paths if path.name not in spec.absent}
        #: The client's current (address, next hop) per path; None while it has no address.
        self._addresses: dict[str, tuple[str, str] | None] = {
            path.name: spec.link_addresses(path) if path.name in self._present else None for path in spec.paths
        }
        #: The subnet and host of each path's current address (its IPv6 twin follows them).
        self._subnets: dict[str, int] = {path.name: 0 for path in spec.paths}
        self._hosts: dict[str, int] = {path.name: CLIENT_HOST for path in spec.paths}

    def __repr__(self) -> str:
        return f"<Lab {self.spec.prefix} paths={','.join(self._paths)}>"

    # --- self-description -----------------------------------------------------

    @property
    def gateway_address(self) -> str:
        """The gateway's /32 on its loopback: the address a client reaches over any path."""
        return self.spec.gateway_address

    @property
    def paths(self) -> tuple[LabPath, ...]:
        return self.spec.paths

    def path(self, ref: PathRef) -> LabPath:
        """The lab's LabPath for a name (or the path itself); KeyError names the known paths."""
        name = ref.name if isinstance(ref, LabPath) else ref
        try:
            return self._paths[name]
        except KeyError:
            raise KeyError(f"no path {name!r} in this lab (paths: {', '.join(self._paths)})") from None

    def path_addresses(self, ref: PathRef) -> tuple[str, str]:
        """``(client_ip, gateway_ip)`` on the path's link as built (its own subnet, host 2)."""
        return self.spec.link_addresses(self.path(ref))

    def path_addresses6(self, ref: PathRef) -> tuple[str, str]:
        """``(client_ip6, gateway_ip6)`` on the path's link as built (``LabSpec.ipv6``)."""
        return self.spec.link_addresses6(self.path(ref))

    @property
    def gateway_address6(self) -> str:
        """The gateway's IPv6 /128 on its loopback (``LabSpec.ipv6``): reached over any path's IPv6."""
        return self.spec.gateway_address6

    def current_address(self, ref: PathRef) -> tuple[str, str] | None:
        """The client's ``(address, next hop)`` on the path now; None while it has no address or no interface."""
        return self._addresses[self.path(ref).name]

    def present(self, ref: PathRef) -> bool:
        """Whether the path's interface exists now."""
        return self.path(ref).name in self._present

    @property
    def present_paths(self) -> tuple[LabPath, ...]:
        return tuple(p for p in self.spec.paths if p.name in self._present)

    def gateway_device(self, ref: PathRef) -> str:
        """The gateway end of the path's veth pair (``gw-eth0``)."""
        return GATEWAY_DEVICE_PREFIX + self.path(ref).name

    def faults(self, ref: PathRef) -> PathFaults:
        """The faults this lab has installed on the path."""
        return self._faults[self.path(ref).name]

    def removal_command(self) -> str:
        """A shell line that removes this lab's namespaces (printed when a lab is kept)."""
        return "; ".join(f"ip netns del {ns}" for ns in (self.client_ns, self.gateway_ns))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the lab, for ``jvpn-trio lab`` and test reports."""
        paths = []
        for path in self.spec.paths:
            current = self.current_address(path)
            paths.append(
                {
                    "name": path.name,
                    "kind": path.kind,
                    "metric": path.metric,
                    "present": self.present(path),
                    "client_address": f"{current[0]}/{LINK_PREFIXLEN}" if current else None,
                    "gateway_link_address": f"{current[1]}/{LINK_PREFIXLEN}" if current else None,
                    "gateway_device": self.gateway_device(path),
                    "faults": attrs.asdict(self.faults(path)),
                }
            )
        return {
            "prefix": self.spec.prefix,
            "client_ns": self.client_ns,
            "gateway_ns": self.gateway_ns,
            "gateway_address": self.gateway_address,
            "arp_strict": self.spec.arp_strict,
            "paths": paths,
        }

    # --- commands and processes -----------------------------------------------

    def _check_ns(self, ns: str) -> None:
        if ns not in (self.client_ns, self.gateway_ns):
            raise ValueError(f"{ns!r} is not a namespace of this lab ({self.client_ns}, {self.gateway_ns})")

    async def run(
        self, ns: str, *argv: str, check: bool = True, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` to completion inside ``ns`` and return it with stdout and stderr captured.

        The caller bounds the time (a cancel scope kills the command).  With ``check`` a non-zero
        exit raises LabError carrying the last lines of stderr.
        """
        self._check_ns(ns)
        return await _command(["ip", "netns", "exec", ns, *argv], stdin=stdin, check=check, timeout_s=None)

    async def namespace_pids(self, ns: str) -> tuple[int, ...]:
        """The pids of every process in ``ns`` (``ip netns pids``), in ascending order."""
        self._check_ns(ns)
        result = await _command(["ip", "netns", "pids", ns])
        return tuple(sorted(int(word) for word in result.stdout.split()))

    async def start_process(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        stdout_path: str | os.PathLike[str] | None = None,
        stderr_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> LabProcess:
        """Start ``argv`` inside ``ns`` and return at once; the lab terminates it at teardown at the latest.

        stdout goes to ``stdout_path`` (or /dev/null), stderr to ``stderr_path`` (or ours).  ``env``
        is added to (and overrides) the current environment.  The process gets its own session,
        so a Ctrl-C at the terminal reaches the lab's teardown, not the process directly.
        """
        self._check_ns(ns)
        full_argv = ["ip", "netns", "exec", ns, *argv]
        full_env = {**os.environ, **env} if env is not None else None
        self._processes = [p for p in self._processes if p.returncode is None]
        stdout = await _open_output(stdout_path)
        try:
            stderr = await _open_output(stderr_path)
            try:
                process = await trio.lowlevel.open_process(
                    full_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout if stdout is not None else subprocess.DEVNULL,
                    stderr=stderr,
                    env=full_env,
                    start_new_session=True,
                )
            finally:
                if stderr is not None:
                    stderr.close()
        finally:
            if stdout is not None:
                stdout.close()
        handle = LabProcess(ns, argv, process)
        self._processes.append(handle)
        return handle

    async def _ip(self, *argv: str) -> None:
        await _command(["ip", *argv])

    async def _nft(self, ns: str, script: str) -> None:
        await _command(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script.encode())

    # --- build and teardown -------------------------------------------------

    async def _build(self) -> None:
        for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: a lab needs it (apt-get install {package})")
        for ns in (self.client_ns, self.gateway_ns):
            result = await _command(["ip", "netns", "add", ns], check=False)
            if result.returncode != 0:
                raise LabError(
                    f"cannot create namespace {ns}: {_one_line(result.stderr)}"
                    f" (leftover of a crashed run? destroy_stale({self.spec.prefix!r}) or `ip netns del {ns}`)"
                )
            self._created.append(ns)
        cli, gw = self.client_ns, self.gateway_ns
        for ns in (cli, gw):
            await self._ip("-n", ns, "link", "set", "lo", "up")
        await self._ip("-n", gw, "addr", "add", f"{self.gateway_address}/32", "dev", "lo")
        settings = [("net/ipv4/ip_forward", 1)]
        if self.spec.ipv6:
            await self._ip("-n", gw, "addr", "add", f"{self.gateway_address6}/128", "dev", "lo")
            settings.append(("net/ipv6/conf/all/forwarding", 1))
            # IPv6 drops a link's addresses when it goes down unless told to keep them, as IPv4 does.
            keep = [(f"net/ipv6/conf/{c}/keep_addr_on_down", 1) for c in ("default", "all")]
            await self._sysctl(cli, *keep)
            settings += keep
        if self.spec.arp_strict:  # "default" first: devices created from now on inherit it
            settings += [(f"net/ipv4/conf/{c}/arp_ignore", ARP_IGNORE_STRICT) for c in ("default", "all")]
        await self._sysctl(gw, *settings)
        present = self.present_paths
        for path in present:
            await self._create_link(path)
        await self._wait_operational(present)
        await self._add_fault_chains(present)

    async def _create_link(self, path: LabPath) -> None:
        """The path's veth pair, both addresses, both ends up, arp_ignore on the router end, the default route."""
        cli, gw = self.client_ns, self.gateway_ns
        gw_dev = self.gateway_device(path)
        client_ip, gateway_ip = self.path_addresses(path)
        await self._ip("link", "add", path.name, "netns", cli, "type", "veth", "peer", "name", gw_dev, "netns", gw)
        if self.spec.arp_strict:
            await self._sysctl(gw, (f"net/ipv4/conf/{gw_dev}/arp_ignore", ARP_IGNORE_STRICT))
        await self._ip("-n", cli, "addr", "add", f"{client_ip}/{LINK_PREFIXLEN}", "dev", path.name)
        await self._ip("-n", gw, "addr", "add", f"{gateway_ip}/{LINK_PREFIXLEN}", "dev", gw_dev)
        if self.spec.ipv6:
            client_ip6, gateway_ip6 = self.path_addresses6(path)
            await self._ip("-n", cli, "addr", "add", f"{client_ip6}/{LINK_PREFIXLEN6}", "dev", path.name, "nodad")
            await self._ip("-n", gw, "addr", "add", f"{gateway_ip6}/{LINK_PREFIXLEN6}", "dev", gw_dev, "nodad")
        await self._ip("-n", cli, "link", "set", path.name, "up")
        await self._ip("-n", gw, "link", "set", gw_dev, "up")
        self._addresses[path.name] = (client_ip, gateway_ip)
        self._subnets[path.name], self._hosts[path.name] = 0, CLIENT_HOST
        await self._add_default_route(path)

    async def _sysctl(self, ns: str, *settings: tuple[str, int]) -> None:
        """Set ``(key, value)`` pairs (``net/ipv4/ip_forward``) in ``ns``, in order, in one shell.

        sh rather than sysctl(8): procps is not always installed; /proc/sys/net is per namespace.
        """
        script = " && ".join(f"echo {value} > /proc/sys/{key}" for key, value in settings)
        await _command(["ip", "netns", "exec", ns, "sh", "-c", script])

    async def arp_ignore(self, device: str) -> int:
        """The gateway namespace's effective ``arp_ignore`` for ``device`` (the kernel uses max(all, device))."""
        values = []
        for conf in ("all", device):
            result = await _command(["ip", "netns", "exec", self.gateway_ns, "cat", f"/proc/sys/net/ipv4/conf/{conf}/arp_ignore"])
            values.append(int(result.stdout.decode().strip()))
        return max(values)

    async def _add_fault_chains(self, paths: Sequence[LabPath]) -> None:
        """Both ends' fault chains for ``paths`` (the table is created with the first ones)."""
        await self._nft(self.client_ns, self._nft_table_script(paths, lambda p: p.name))
        await self._nft(self.gateway_ns, self._nft_table_script(paths, self.gateway_device))

    def _nft_table_script(self, paths: Sequence[LabPath], device_of: Callable[[LabPath], str]) -> str:
        lines = [f"table netdev {NFT_TABLE} {{"]
        for path in paths:
            lines += [
                f"  chain blackhole_{path.name} {{ }}",
                f"  chain loss_{path.name} {{ }}",
                f"  chain ingress_{path.name} {{",
                f'    type filter hook ingress device "{device_of(path)}" priority 0; policy accept;',
                f"    jump blackhole_{path.name}",
                f"    jump loss_{path.name}",
                "  }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    async def _wait_operational(self, paths: Sequence[LabPath]) -> None:
        """Return once every path in ``paths`` can carry packets both ways; LabError after a bound.

        The kernel activates a device's qdisc (until then it drops everything sent) either when
        the device is opened with carrier, or, for a device opened without carrier, when the
        linkwatch worker handles its carrier-on event; that event is urgent and handled at once,
        and that is also when its operstate becomes UP.  The end opened *with* carrier is active
        immediately but its operstate is only refreshed by the rate-limited linkwatch run, up to
        a second later.  So a pair is ready when both ends have carrier (LOWER_UP) and at least
        one end reports operstate UP; waiting for both to say UP would add up to a second.
        """
        pending = ["(not checked yet)"]
        with trio.move_on_after(LINK_UP_TIMEOUT_S):
            while True:
                links: dict[tuple[str, str], dict[str, Any]] = {}
                for ns in (self.client_ns, self.gateway_ns):
                    result = await _command(["ip", "-j", "-n", ns, "link", "show"])
                    links.update({(ns, link.get("ifname", "")): link for link in json.loads(result.stdout)})
                pending = []
                for path in paths:
                    ends = [
                        links.get((self.client_ns, path.name), {}),
                        links.get((self.gateway_ns, self.gateway_device(path)), {}),
                    ]
                    carrier = all("LOWER_UP" in end.get("flags", ()) for end in ends)
                    if not (carrier and any(end.get("operstate") == "UP" for end in ends)):
                        pending.append(f"{path.name} ({', '.join(str(end.get('operstate')) for end in ends)})")
                if not pending:
                    return
                await trio.sleep(LINK_UP_POLL_S)
        raise LabError(f"paths not operational after {LINK_UP_TIMEOUT_S} s: {', '.join(pending)}")

    async def _add_default_route(self, path: LabPath) -> None:
        """The path's default route via its current next hop (none while the path has no address)."""
        current = self._addresses[path.name]
        if current is None:
            return
        _client_ip, gateway_ip = current
        await self._ip(
            "-n", self.client_ns, "route", "replace", "default",
            "via", gateway_ip, "dev", path.name, "metric", str(path.metric),
        )  # fmt: skip
        if self.spec.ipv6:
            _, gateway_ip6 = self.spec.link_addresses6(path, subnet=self._subnets[path.name], host=self._hosts[path.name])
            await self._ip(
                "-n", self.client_ns, "-6", "route", "replace", "default",
                "via", gateway_ip6, "dev", path.name, "metric", str(path.metric),
            )  # fmt: skip

    async def _aclose(self, *, keep: bool, raise_errors: bool) -> None:
        """Terminate every lab process, then (unless ``keep``) delete the namespaces this lab created."""
        errors: list[str] = []
        with trio.CancelScope(shield=True, deadline=trio.current_time() + TEARDOWN_TIMEOUT_S) as scope:
            async with trio.open_nursery() as nursery:
                for process in self._processes:
                    nursery.start_soon(process.terminate)
            self._processes = []
            if not keep:
                for ns in reversed(self._created):
                    try:
                        await _delete_namespace(ns)
                    except LabError as exc:
                        errors.append(str(exc))
                self._created = []
        if scope.cancelled_caught:
            errors.append(f"teardown did not finish within {TEARDOWN_TIMEOUT_S} s")
        if keep and self._created:
            print(
                f"jvpn_trio.lab.netns: kept lab {self.spec.prefix}; remove it with: {self.removal_command()}",
                file=sys.stderr,
            )
        elif errors:
            message = f"lab {self.spec.prefix} teardown: {'; '.join(errors)}; to finish: {self.removal_command()}"
            if raise_errors:
                raise LabError(message)
            print(f"jvpn_trio.lab.netns: {message}", file=sys.stderr)

    # --- faults ----------------------------------------------------------------

    async def _set_chain(self, kind: str, path: LabPath, rule: str | None) -> None:
        script = f"flush chain netdev {NFT_TABLE} {kind}_{path.name}\n"
        if rule is not None:
            script += f"add rule netdev {NFT_TABLE} {kind}_{path.name} {rule}\n"
        await self._nft(self.client_ns, script)
        await self._nft(self.gateway_ns, script)

    async def link_down(self, ref: PathRef) -> None:
        """Set the client end of the path down (the kernel drops its routes; the gateway sees no carrier)."""
        path = self.path(ref)
        async with self._fault_lock:
            await self._ip("-n", self.client_ns, "link", "set", path.name, "down")
            self._faults[path.name] = attrs.evolve(self._faults[path.name], link_up=False)

    async def link_up(self, ref: PathRef) -> None:
        """Set the client end up and re-add its default route, which ``link_down`` made the kernel delete."""
        path = self.path(ref)
        async with self._fault_lock:
            await self._link_up(path)

    async def _link_up(self, path: LabPath) -> None:
        await self._ip("-n", self.client_ns, "link", "set", path.name, "up")
        await self._add_default_route(path)
        await self._wait_operational([path])
        self._faults[path.name] = attrs.evolve(self._faults[path.name], link_up=True)

    async def blackhole(self, ref: PathRef, on: bool) -> None:
        """Drop everything arriving at either end of the path (both directions) while the link stays up."""
        path = self.path(ref)
        async with self._fault_lock:
            await self._set_chain("blackhole", path, "counter drop" if on else None)
            self._faults[path.name] = attrs.evolve(self._faults[path.name], blackhole=bool(on))

    async def loss(self, ref: PathRef, percent: float | None) -> None:
        """Drop ``percent`` % of packets at random on arrival at each end; None (or 0) clears.

        Each direction loses ``percent`` independently, so a round trip loses more.
        """
        path = self.path(ref)
        if percent is not None and not 0.0 <= percent <= 100.0:
            raise ValueError(f"loss percent must be within 0..100, got {percent}")
        threshold = round(percent * LOSS_MODULUS / 100) if percent is not None else 0
        async with self._fault_lock:
            rule = f"numgen random mod {LOSS_MODULUS} < {threshold} counter drop" if threshold else None
            await self._set_chain("loss", path, rule)
            self._faults[path.name] = attrs.evolve(self._faults[path.name], loss_percent=percent if threshold else None)

    async def rate(self, ref: PathRef, mbit: float | None) -> None:
        """Limit each direction of the path to ``mbit`` Mbit/s with a tbf qdisc on both ends; None clears."""
        path = self.path(ref)
        if mbit is not None and not mbit > 0:
            raise ValueError(f"rate must be positive, got {mbit} Mbit/s")
        ends = ((self.client_ns, path.name), (self.gateway_ns, self.gateway_device(path)))
        async with self._fault_lock:
            await self._set_rate(path, ends, mbit)

    async def _set_rate(self, path: LabPath, ends: tuple[tuple[str, str], ...], mbit: float | None) -> None:
        if mbit is None:
            if self._faults[path.name].rate_mbit is not None:
                for ns, dev in ends:
                    await _command(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])
        else:
            kbit = max(1, round(mbit * 1000))
            burst = max(TBF_MIN_BURST_BYTES, int(kbit * 1000 / 8 * TBF_BURST_S))
            for ns, dev in ends:
                await _command(
                    ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                     "rate", f"{kbit}kbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]
                )  # fmt: skip
        self._faults[path.name] = attrs.evolve(self._faults[path.name], rate_mbit=mbit)

    async def restore(self, ref: PathRef) -> None:
        """Clear every fault on the path and bring its link (and default route) back up."""
        path = self.path(ref)
        ends = ((self.client_ns, path.name), (self.gateway_ns, self.gateway_device(path)))
        async with self._fault_lock:
            await self._set_chain("blackhole", path, None)
            await self._set_chain("loss", path, None)
            await self._set_rate(path, ends, None)
            await self._link_up(path)
            self._faults[path.name] = PathFaults()

    async def restore_all(self) -> None:
        """:meth:`restore` every path whose interface exists."""
        for path in self.present_paths:
            await self.restore(path)

    # --- a changing network ------------------------------------------------------

    async def add_path(self, ref: PathRef) -> None:
        """Create an absent path's interface as at build time: veth pair, addresses, route, fault chains.

        What a laptop sees when a USB adapter is plugged in and DHCP answers at once.  LabError if
        the interface exists.
        """
        path = self.path(ref)
        if path.name in self._present:
            raise LabError(f"path {path.name} exists already")
        async with self._fault_lock:
            await self._create_link(path)
            self._present.add(path.name)
            self._faults[path.name] = PathFaults()
            await self._wait_operational([path])
            await self._add_fault_chains([path])

    async def delete_path(self, ref: PathRef) -> None:
        """``ip link del`` the path's client end (the router end goes with it), then drop its fault chains.

        The kernel deletes every route through it.  LabError if the interface does not exist.
        """
        path = self.path(ref)
        if path.name not in self._present:
            raise LabError(f"path {path.name} has no interface to delete")
        async with self._fault_lock:
            await self._ip("-n", self.client_ns, "link", "del", path.name)
            self._present.discard(path.name)
            self._addresses[path.name] = None
            self._faults[path.name] = PathFaults()
            for ns in (self.client_ns, self.gateway_ns):
                # One command each: a kernel that removed the device's base chain with the device makes
                # the first fail, and the regular chains must go anyway (add_path creates them again).
                for chain in (f"ingress_{path.name}", f"blackhole_{path.name}", f"loss_{path.name}"):
                    await _command(["ip", "netns", "exec", ns, "nft", "delete", "chain", "netdev", NFT_TABLE, chain], check=False)

    async def flush_address(self, ref: PathRef) -> None:
        """Remove the client's address from the path (a DHCP lease lost); its routes go with it.

        The link stays up.  LabError if the path has no interface or no address.
        """
        path = self.path(ref)
        if self._addresses[path.name] is None:  # also None while the path has no interface
            raise LabError(f"path {path.name} has no address to flush")
        async with self._fault_lock:
            await self._flush_address(path)

    async def _flush_address(self, path: LabPath) -> None:
        cli = self.client_ns
        await _command(["ip", "-n", cli, "route", "del", "default", "dev", path.name, "metric", str(path.metric)], check=False)
        if self.spec.ipv6:
            await _command(
                ["ip", "-n", cli, "-6", "route", "del", "default", "dev", path.name, "metric", str(path.metric)], check=False
            )
            await self._ip("-n", cli, "-6", "addr", "flush", "dev", path.name, "scope", "global")
        await self._ip("-n", cli, "addr", "flush", "dev", path.name)
        self._addresses[path.name] = None

    async def add_address(self, ref: PathRef, *, subnet: int = 0, host: int = CLIENT_HOST) -> tuple[str, str]:
        """Give the client host ``host`` of the path's ``subnet`` and a default route via that subnet's router.

        An address the path still has is flushed first (a lease moved to another subnet); the
        router end gets the subnet's next hop if it lacks it.  Returns ``(address, next hop)``.
        LabError if the path has no interface or the plan has no such subnet or host.
        """
        path = self.path(ref)
        if path.name not in self._present:
            raise LabError(f"path {path.name} has no interface to add an address to")
        try:
            client_ip, gateway_ip = self.spec.link_addresses(path, subnet=subnet, host=host)
        except ValueError as exc:
            raise LabError(str(exc)) from None
        gw_dev = self.gateway_device(path)
        async with self._fault_lock:
            if self._addresses[path.name] is not None:
                await self._flush_address(path)
            shown = json.loads((await _command(["ip", "-j", "-n", self.gateway_ns, "addr", "show", "dev", gw_dev])).stdout)
            router = {a.get("local") for link in shown for a in link.get("addr_info", ())}
            if gateway_ip not in router:
                await self._ip("-n", self.gateway_ns, "addr", "add", f"{gateway_ip}/{LINK_PREFIXLEN}", "dev", gw_dev)
            await self._ip("-n", self.client_ns, "addr", "add", f"{client_ip}/{LINK_PREFIXLEN}", "dev", path.name)
            if self.spec.ipv6:
                client_ip6, gateway_ip6 = self.spec.link_addresses6(path, subnet=subnet, host=host)
                if gateway_ip6 not in router:
                    await self._ip(
                        "-n", self.gateway_ns, "addr", "add", f"{gateway_ip6}/{LINK_PREFIXLEN6}", "dev", gw_dev, "nodad"
                    )
                await self._ip("-n", self.client_ns, "addr", "add", f"{client_ip6}/{LINK_PREFIXLEN6}", "dev", path.name, "nodad")
            self._addresses[path.name] = (client_ip, gateway_ip)
            self._subnets[path.name], self._hosts[path.name] = subnet, host
            if self._faults[path.name].link_up:
                await self._add_default_route(path)
        return client_ip, gateway_ip


@contextlib.asynccontextmanager
async def open_lab(spec: LabSpec | None = None, *, keep: bool = False) -> AsyncIterator[Lab]:
    """Build a lab from ``spec`` (default: a fresh prefix, the three paths of peers.md) and yield it.

    On exit, however it happens, every process the lab started is terminated and both namespaces
    are deleted; with ``keep=True`` they are left in place and the command that removes them is
    printed to stderr.  Raises LabError if the lab cannot be built (after cleaning up what was
    built) or, on an otherwise clean exit, if teardown fails.
    """
    lab = Lab(spec if spec is not None else LabSpec())
    clean_exit = False
    try:
        await lab._build()
        yield lab
        clean_exit = True
    finally:
        await lab._aclose(keep=keep, raise_errors=clean_exit)
