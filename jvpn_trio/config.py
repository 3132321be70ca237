"""TOML files -> frozen, validated configuration.  The only user of ``tomllib``.

Errors are :class:`ConfigError` with one line that names the file, and the
key or the TOML syntax position, so the CLI can print it and exit 2.  A file
is an untrusted input: whatever it holds (any size, any nesting, any bytes, a
FIFO in its place) ends as a ConfigError, never as a traceback or a hang.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import pathlib
import re
import stat
import tomllib
from typing import Any

import attrs

from jvpn_trio.core.bounds import out_of_range

# KIND_PRIORITY and PATH_KINDS are part of this module's API; they are defined beside the path rules.
from jvpn_trio.core.candidates import KIND_PRIORITY as KIND_PRIORITY  # noqa: PLC0414
from jvpn_trio.core.candidates import PATH_KINDS as PATH_KINDS  # noqa: PLC0414
from jvpn_trio.core.candidates import PathRule, PathRules
from jvpn_trio.core.cookie import HandshakeLimits
from jvpn_trio.core.ids import MAX_PATH_ID
from jvpn_trio.core.loglimit import DEFAULT_LOG_LIMITS, LogLimits
from jvpn_trio.core.ownership import lease_renewable, lease_ttl_s
from jvpn_trio.core.policy import Policy, PolicyError

#: The longest error message: a key or value quoted from a hostile file could fill a terminal.
MAX_ERROR_CHARS = 400


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is a one-line explanation.

    Control characters (a newline in a quoted key, say) are escaped and the message is cut at
    :data:`MAX_ERROR_CHARS`, so whatever a file holds, the CLI prints one line.
    """

    def __init__(self, message: str) -> None:
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        if len(line) > MAX_ERROR_CHARS:
            line = line[: MAX_ERROR_CHARS - 1] + "\u2026"
        super().__init__(line)


#: The largest configuration file read, in bytes; a larger one is refused before it is parsed
#: (reading stops at one byte more).  Room for ~350,000 inline ``[[peer]]`` entries: loadgen
#: writes 100,000 (about 9 MB); a deployment that big belongs in ``peers_dir`` anyway.
MAX_CONFIG_BYTES = 32 << 20
#: The deepest nesting of tables and arrays accepted (the document itself is level 1).  A real
#: file needs 3 (``[[path]]`` is an array of tables); past Python's recursion limit the parser
#: itself fails, and a deep value would make every later ``repr`` fail the same way.
MAX_CONFIG_DEPTH = 16
#: TOML's integers are 64-bit (toml.io); the unsigned top half is accepted too, because
#: ``reject_after_messages`` is a 64-bit counter (docs/policy.md).  Beyond, numbers are refused
#: rather than carried: a 5,000-digit one cannot even be printed in an error message.
MIN_CONFIG_INT = -(1 << 63)
MAX_CONFIG_INT = (1 << 64) - 1
#: How much one read asks the kernel for.
_READ_CHUNK = 1 << 16


def _read_bounded(p: pathlib.Path) -> bytes:
    """The bytes of the regular file ``p``, at most :data:`MAX_CONFIG_BYTES` (ConfigError otherwise).

    Opened non-blocking, so a FIFO with no writer is refused instead of waited on.
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot open: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the name
        raise ConfigError(f"{str(p)!r}: not a usable file name") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{p}: is a directory")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{p}: not a regular file ({_file_kind(mode)})")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, min(_READ_CHUNK, MAX_CONFIG_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes, the most a config file may be")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a plain file"


def _check_document(data: dict[str, Any], *, source: pathlib.Path) -> None:
    """Nesting within :data:`MAX_CONFIG_DEPTH`, integers within TOML's 64 bits; iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: tables and arrays nested deeper than {MAX_CONFIG_DEPTH} levels")
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif isinstance(child, int) and not MIN_CONFIG_INT <= child <= MAX_CONFIG_INT:
                raise ConfigError(f"{source}: an integer outside {MIN_CONFIG_INT}..{MAX_CONFIG_INT} (TOML's 64 bits)")


def read_toml(path: str | pathlib.Path) -> dict[str, Any]:
    """Parse one TOML file; every way it can be unusable is a one-line ConfigError naming it."""
    p = pathlib.Path(path)
    raw = _read_bounded(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: tables and arrays nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except ValueError:  # a number longer than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{p}: a number too long to read (TOML's integers are 64-bit)") from None
    _check_document(data, source=p)
    return data


def policy_from_table(table: Any, *, source: str) -> Policy:
    try:
        return Policy.from_mapping(table)
    except PolicyError as exc:
        raise ConfigError(f"{source}: [policy] {exc}") from None


def load_policy(path: str | pathlib.Path) -> Policy:
    """A policy file holds a ``[policy]`` table (or only policy keys at top level)."""
    data = read_toml(path)
    if "policy" not in data:
        return policy_from_table(data, source=str(path))
    extra = sorted(k for k in data if k != "policy")
    if extra:
        raise ConfigError(f"{path}: unexpected key(s) beside [policy]: {', '.join(extra)}")
    return policy_from_table(data["policy"], source=str(path))


# -----------------------------------------------------------------------------
# Client and gateway configuration files
# -----------------------------------------------------------------------------

DEFAULT_PORT = 51820
DEFAULT_MTU = 1420
#: Where `up`, `down` and `serve` look without ``--config`` (docs/service.md).
DEFAULT_CLIENT_CONFIG = "/etc/jvpn-trio/client.toml"
DEFAULT_GATEWAY_CONFIG = "/etc/jvpn-trio/gateway.toml"
#: The group whose members may use the control socket to look (docs/control.md).
DEFAULT_CONTROL_GROUP = "jvpn-trio"
#: The smallest datagram every IPv4 host accepts (RFC 791); IPv6 needs 1280 on every link
#: (RFC 8200), so a tunnel that carries IPv6 needs that much; 65535 is the largest IPv4 packet.
MIN_MTU = 576
MIN_MTU6 = 1280
MAX_MTU = 65535
#: A full tunnel of both families (IPv6 goes into the tunnel; with an IPv4-only gateway it is blocked there).
DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")
#: Handshakes, probes, REATTACH and CLOSE go to the gateway's data port plus this: a socket of
#: their own, so a data flood that fills the data socket's queue cannot drown liveness probes.
DEFAULT_CONTROL_PORT_OFFSET = 1


def control_endpoint(data: tuple[str, int], offset: int) -> tuple[str, int]:
    """The control endpoint that pairs with the data endpoint ``data``."""
    return (data[0], data[1] + offset)


def _control_offset(t: _Table, data_ports: list[int]) -> int:
    offset: int = t.get("control_port_offset", int, DEFAULT_CONTROL_PORT_OFFSET)
    for port in data_ports:
        if offset == 0 or not 0 < port + offset <= 65535:
            raise ConfigError(
                f"{t.where}.control_port_offset: {offset} with data port {port} gives no usable control port"
            )
    return offset


def parse_endpoint(text: Any, *, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); the host must be a literal address."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{where}: expected 'address:port', got {text!r}")
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address (names are not resolved)") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: bad port {port_text!r}")
    return (str(address), int(port_text))


def _interface(value: Any, *, where: str) -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: expected an IPv4 address with prefix like '10.66.0.1/24', got {value!r}") from None


def _interface6(value: Any, *, where: str) -> ipaddress.IPv6Interface:
    try:
        return ipaddress.IPv6Interface(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: expected an IPv6 address with prefix like 'fd6a:7670::1/64', got {value!r}") from None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(values: Any, *, where: str) -> tuple[Network, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of prefixes")
    out: list[Network] = []
    for v in values:
        if not isinstance(v, str):  # ipaddress would take an integer (or true) as an address
            raise ConfigError(f"{where}: expected prefixes as strings like '10.0.0.0/8', got {type(v).__name__} {v!r}")
        try:
            out.append(ipaddress.ip_network(v))
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: {v!r} is not an IPv4 or IPv6 prefix (host bits must be zero)") from None
    return tuple(out)


def _addresses(values: Any, *, where: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    if not isinstance(values, list):
        raise ConfigError(f"{where}: expected a list of IP addresses")
    out = []
    for v in values:
        if not isinstance(v, str):  # ipaddress would take an integer (or true) as an address
            raise ConfigError(f"{where}: expected addresses as strings like '10.66.0.1', got {type(v).__name__} {v!r}")
        try:
            out.append(ipaddress.ip_address(v))
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: {v!r} is not an IP address") from None
    return tuple(out)


#: A DNS name: dot-separated labels of letters, digits and hyphens (RFC 1123), at most 253 characters.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _domains(values: Any, *, where: str) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise ConfigError(f"{where}: expected a list of domain names")
    out = []
    for v in values:
        name = v.rstrip(".") if isinstance(v, str) else v
        if not isinstance(name, str) or not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in name.split(".")):
            raise ConfigError(f"{where}: {v!r} is not a domain name")
        out.append(name.lower())
    return tuple(out)


def _mtu(value: Any, *, where: str) -> int:
    if not MIN_MTU <= value <= MAX_MTU:
        raise ConfigError(f"{where}: {out_of_range(value, MIN_MTU, MAX_MTU)}")
    return int(value)


def is_default_route(network: Network) -> bool:
    return network.prefixlen == 0


class _Table:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(self, data: Any, *, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table")
        self.data, self.where = data, where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                raise ConfigError(f"{self.where}: missing required key {key!r}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where}.{key}: expected {names}, got {type(value).__name__}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s): {', '.join(unknown)}")


#: A firewall mark is 32 bits; each path's is ``fwmark_base`` plus its path id (``commands/up.py``).
MAX_FWMARK = 0xFFFF_FFFF
#: ``[client].fwmark_base`` when the file sets none.
DEFAULT_FWMARK_BASE = 0x5100
#: Characters that make a string a glob rather than one interface name (fnmatch's syntax).
_GLOB_CHARS = frozenset("*?[")
#: IFNAMSIZ - 1: the kernel's longest interface name.
MAX_IFNAME_LEN = 15
#: The interface names the gateway's nft rules take (drivers/forwarding.py checks the same).
_PLAIN_IFNAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name_or_glob(value: str, *, where: str, glob: bool) -> str:
    """An interface name (or, with ``glob``, an fnmatch pattern of names); ConfigError naming ``where``."""
    if not value:
        raise ConfigError(f"{where}: an empty {'glob' if glob else 'name'} matches no interface")
    if any(c.isspace() or c in "/:" for c in value):
        raise ConfigError(f"{where}: {value!r} is not an interface {'glob' if glob else 'name'} (no spaces, '/' or ':')")
    if not glob:
        if _GLOB_CHARS & set(value):
            raise ConfigError(f"{where}: {value!r} looks like a glob: use 'match' for globs")
        if len(value) > MAX_IFNAME_LEN:
            raise ConfigError(f"{where}: {value!r} is longer than {MAX_IFNAME_LEN} characters")
    return value


def _globs(values: list[Any], *, where: str) -> tuple[str, ...]:
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a list of strings, got {type(v).__name__} {v!r}")
        out.append(_check_name_or_glob(v, where=where, glob=True))
    return tuple(out)


def _path_rule(pt: _Table) -> PathRule:
    interface = pt.get("interface", str, None)
    match = pt.get("match", str, None)
    kind = pt.get("kind", str, None)
    priority = pt.get("priority", int, None)
    metered = pt.get("metered", bool, None)
    pt.finish()
    if kind is not None and kind not in PATH_KINDS:
        raise ConfigError(f"{pt.where}.kind: expected one of {', '.join(PATH_KINDS)}, got {kind!r}")
    if interface is not None and match is not None:
        raise ConfigError(f"{pt.where}: give 'interface' or 'match', not both")
    if interface is None and match is None and kind is None:
        raise ConfigError(f"{pt.where}: needs 'interface' (one name), 'match' (a glob) or 'kind' (every link of a kind)")
    if interface is not None:
        _check_name_or_glob(interface, where=f"{pt.where}.interface", glob=False)
    if match is not None:
        _check_name_or_glob(match, where=f"{pt.where}.match", glob=True)
    return PathRule(interface=interface, match=match, kind=kind, priority=priority, metered=metered)


def _path_rules(raw_paths: Any, *, source: str, exclude: tuple[str, ...], tun_name: str) -> tuple[PathRule, ...]:
    """The ``[[path]]`` array -> rules in file order; a rule can never be shadowed by an identical one."""
    if not isinstance(raw_paths, list):
        raise ConfigError(f"{source}: [[path]] must be an array of tables")
    rules = []
    for i, raw in enumerate(raw_paths):
        where = f"{source}: [[path]] #{i + 1}"
        rule = _path_rule(_Table(raw, where=where))
        if rule.interface is not None:
            if rule.interface == tun_name:
                raise ConfigError(f"{where}.interface: {tun_name!r} is the tunnel's own interface ([client].tun_name)")
            hits = [g for g in exclude if fnmatch.fnmatchcase(rule.interface, g)]
            if hits:
                raise ConfigError(f"{where}.interface: {rule.interface!r} is excluded by [client].exclude {hits[0]!r}")
        rules.append(rule)
    for what, key in (("an interface", "interface"), ("a match glob", "match")):
        values = [getattr(r, key) for r in rules if getattr(r, key) is not None]
        if len(set(values)) != len(values):
            raise ConfigError(f"{source}: {what} is listed twice in [[path]]")
    alone = [r.kind for r in rules if r.interface is None and r.match is None]
    if len(set(alone)) != len(alone):
        raise ConfigError(f"{source}: a kind is listed alone twice in [[path]]")
    return tuple(rules)


def _relative(base: pathlib.Path, value: str) -> pathlib.Path:
    p = pathlib.Path(value)
    return p if p.is_absolute() else base / p


@attrs.frozen(kw_only=True)
class PathConfig:
    """A ``[[path]]`` entry that names one interface (the other forms live in :attr:`ClientConfig.path_rules`)."""

    interface: str
    kind: str | None
    priority: int | None


@attrs.frozen(kw_only=True)
class GatewayEntry:
    """One gateway the client may use: its data endpoint and its static public key (base64)."""

    endpoint: tuple[str, int]
    public_key: str


@attrs.frozen(kw_only=True)
class ClientConfig:
    private_key_file: pathlib.Path
    gateway_public_key: str
    gateway: tuple[str, int]
    control_port_offset: int
    tun_name: str
    #: What goes into the tunnel; a default route of one family makes a full tunnel of that family.
    routes: tuple[Network, ...]
    paths: tuple[PathConfig, ...]
    events_file: pathlib.Path | None
    control_socket: pathlib.Path
    fwmark_base: int
    policy: Policy
    #: Every ``[[path]]`` rule in file order (``interface``, ``match`` or ``kind``) and
    #: ``[client].exclude``: what the path manager selects paths by.  ``paths`` above keeps
    #: only the entries that name one interface.
    path_rules: PathRules = PathRules()  # noqa: RUF009 (frozen: one shared instance is safe)
    #: While the agent runs nothing leaves a physical interface but the tunnel's own UDP (and the
    #: local network's housekeeping); default: on for a full tunnel.  Only a full tunnel may have it.
    kill_switch: bool = False
    #: With the kill switch: also let the laptop reach its local networks (private and link-local ranges).
    allow_lan: bool = False
    #: Resolvers reached through the tunnel, and the search domains; empty: DNS is left alone.
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    dns_search: tuple[str, ...] = ()
    #: The TUN's MTU; None: derived from the paths' MTU minus the tunnel's overhead.
    mtu: int | None = None
    #: Members of this group may look through the control socket (None: root only); they may
    #: also steer when ``control_steer_group``.
    control_group: str | None = DEFAULT_CONTROL_GROUP
    control_steer_group: bool = False
    #: Every gateway in order of preference (``[[gateway]]``); ``gateway`` and
    #: ``gateway_public_key`` above are the first.  Empty: the one gateway above.
    gateways: tuple[GatewayEntry, ...] = ()
    #: How many SECURITY_EVENT lines the event log takes (``[log_limits]``, docs/events.md "Bounded logging").
    log_limits: LogLimits = DEFAULT_LOG_LIMITS
    #: The gateways share an ownership store (docs/cluster.md): when the one in use falls silent,
    #: the session is resumed at the next (same SessionID and address) rather than started anew.
    cluster: bool = False
    #: Open the TUN with checksum and TSO offloads (docs/offload.md); false: one packet per read and write.
    tun_offload: bool = True

    @property
    def gateway_entries(self) -> tuple[GatewayEntry, ...]:
        """The gateways in order of preference (at least one)."""
        return self.gateways or (GatewayEntry(endpoint=self.gateway, public_key=self.gateway_public_key),)

    @property
    def gateway_endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every gateway's data and control endpoint: all the path sockets may talk to."""
        return tuple(
            e for g in self.gateway_entries for e in (g.endpoint, control_endpoint(g.endpoint, self.control_port_offset))
        )

    @property
    def full_tunnel(self) -> bool:
        """Some family's default route goes into the tunnel (then the other family's is blocked, never leaked)."""
        return any(is_default_route(r) for r in self.routes)

    @property
    def gateway_control(self) -> tuple[str, int]:
        return control_endpoint(self.gateway, self.control_port_offset)


@attrs.frozen(kw_only=True)
class PeerConfig:
    name: str
    public_key: str
    address: ipaddress.IPv4Address | None
    #: The peer's IPv6 tunnel address (``tunnel_address6`` only); None: the host number of ``address`` in it.
    address6: ipaddress.IPv6Address | None = None


#: ``[cluster].store``: where session ownership lives (docs/cluster.md).
CLUSTER_STORES = ("memory", "etcd")
#: Upper bound of ``[cluster].store_calls_in_flight``: each call holds a task and an HTTP connection.
MAX_STORE_CALLS_IN_FLIGHT = 1024
#: etcd's lease TTLs are whole seconds; ``lease_ttl_ms`` is rounded up to them.
_MS_PER_S = 1000


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """The gateway's ``[cluster]`` table: the ownership store and its lease (docs/cluster.md).

    Without the table, ``store = "memory"``: one gateway, nothing shared.
    """

    store: str = "memory"
    #: The etcd members' client URLs (``http://host:port``), tried in order.
    etcd_endpoints: tuple[str, ...] = ()
    #: The gateway's lease TTL asked of etcd (rounded up to whole seconds).
    lease_ttl_ms: int = 10_000
    #: Every etcd call is bounded by this; past it the call fails closed.
    request_timeout_ms: int = 2_000
    #: How often the lease is renewed.
    keepalive_interval_ms: int = 2_000
    #: Taken off every lease proof: covers the drift between our clock and etcd's.
    lease_margin_ms: int = 1_000
    #: Where the session keys live in etcd; gateways of one cluster share it.
    key_prefix: str = "/jvpn-trio/sessions/"
    #: The LAN interface on which the owner of a session answers ARP for the client's tunnel address
    #: (proxy ARP and gratuitous ARP on takeover, drivers/announce.py); None: no announcements.
    announce_interface: str | None = None
    #: Store calls (claims, takeovers, reads before a REATTACH) in flight at once: each waits for
    #: etcd in a task of its own, so a slow store never holds up the probes on the control port.
    store_calls_in_flight: int = 32


@attrs.frozen(kw_only=True)
class GatewayConfig:
    private_key_file: pathlib.Path
    listen: tuple[tuple[str, int], ...]
    control_port_offset: int
    tun_name: str
    tunnel_address: ipaddress.IPv4Interface
    mtu: int
    peers: tuple[PeerConfig, ...]
    events_file: pathlib.Path | None
    control_socket: pathlib.Path
    node_id: str
    policy: Policy
    #: The tunnel's IPv6 address and prefix; None: the tunnel carries IPv4 only.
    tunnel_address6: ipaddress.IPv6Interface | None = None
    #: Masquerade the tunnel's subnets out of the egress (docs/gateway.md); forwarding is on either way.
    nat: bool = True
    #: The interface forwarded traffic leaves by; None: each family's default route's (docs/gateway.md).
    nat_egress: str | None = None
    #: Where Prometheus scrapes ``/metrics`` (docs/metrics.md); None: no metrics endpoint.
    metrics_listen: tuple[str, int] | None = None
    #: One peer per ``*.toml`` file, besides the ``[[peer]]`` entries (what configuration tools write).
    peers_dir: pathlib.Path | None = None
    #: The ownership store (``[cluster]``); the in-memory one without the table.
    cluster: ClusterConfig = ClusterConfig()
    #: Bounds on handshake work under a flood (``[handshake]``, docs/threat-model.md "Handshake floods").
    handshake: HandshakeLimits = HandshakeLimits()  # noqa: RUF009 (frozen)
    #: How many SECURITY_EVENT lines the event log takes (``[log_limits]``, docs/events.md "Bounded logging").
    log_limits: LogLimits = DEFAULT_LOG_LIMITS
    #: Open the TUN with checksum and TSO offloads (docs/offload.md); false: one packet per read and write.
    tun_offload: bool = True

    @property
    def control_listen(self) -> tuple[tuple[str, int], ...]:
        """One control endpoint per data endpoint in ``listen``, in the same order."""
        return tuple(control_endpoint(addr, self.control_port_offset) for addr in self.listen)


def _policy_of(data: dict[str, Any], *, source: str) -> Policy:
    return policy_from_table(data.get("policy", {}), source=source)


def _top_level(data: dict[str, Any], allowed: set[str], *, source: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(f"{source}: unknown table(s): {', '.join(extra)}")


def load_client_config(path: str | pathlib.Path) -> ClientConfig:
    """Read ``client.toml``: ``[client]``, optional ``[[path]]`` entries and ``[policy]``."""
    source = str(path)
    base = pathlib.Path(path).resolve().parent
    data = read_toml(path)
    _top_level(data, {"client", "path", "policy", "gateway", "log_limits"}, source=source)
    t = _Table(data.get("client"), where=f"{source}: [client]")
    key_file = _relative(base, t.get("private_key_file", str, required=True))
    gateways = _client_gateways(t, data.get("gateway"), source=source)
    control_offset = _control_offset(t, [g.endpoint[1] for g in gateways])
    _distinct_gateway_endpoints(gateways, control_offset, source=source)
    tun_name = t.get("tun_name", str, "jvpn0")
    routes = _networks(t.get("routes", list, list(DEFAULT_ROUTES)), where=f"{t.where}.routes")
    full = any(is_default_route(r) for r in routes)
    kill_switch = t.get("kill_switch", bool, full)
    if kill_switch and not full:
        raise ConfigError(f"{t.where}.kill_switch: only a full tunnel (0.0.0.0/0 or ::/0 in routes) can block the rest")
    allow_lan = t.get("allow_lan", bool, False)
    dns = _addresses(t.get("dns", list, []), where=f"{t.where}.dns")
    dns_search = _domains(t.get("dns_search", list, []), where=f"{t.where}.dns_search")
    if dns_search and not dns:
        raise ConfigError(f"{t.where}.dns_search: search domains need servers in dns")
    mtu = t.get("mtu", int, None)
    if mtu is not None:
        mtu = _mtu(mtu, where=f"{t.where}.mtu")
        if mtu < MIN_MTU6 and any(r.version == 6 for r in routes):
            raise ConfigError(f"{t.where}.mtu: {mtu} is below {MIN_MTU6}, the least IPv6 in the tunnel needs")
    events = t.get("events_file", str, None)
    control = t.get("control_socket", str, "/run/jvpn-trio/client.sock")
    fwmark_base = t.get("fwmark_base", int, DEFAULT_FWMARK_BASE)
    if not 0 <= fwmark_base <= MAX_FWMARK - MAX_PATH_ID:
        raise ConfigError(f"{t.where}.fwmark_base: {out_of_range(fwmark_base, 0, MAX_FWMARK - MAX_PATH_ID)}")
    exclude = _globs(t.get("exclude", list, []), where=f"{t.where}.exclude")
    control_group = t.get("control_group", str, DEFAULT_CONTROL_GROUP) or None
    control_steer_group = t.get("control_steer_group", bool, False)
    cluster = t.get("cluster", bool, False)
    tun_offload = t.get("tun_offload", bool, True)
    t.finish()
    if cluster and len(gateways) < 2:
        raise ConfigError(f"{t.where}.cluster: a session can move only between two or more [[gateway]] entries")
    if len(tun_name) > 15:
        raise ConfigError(f"{source}: [client].tun_name {tun_name!r} is longer than 15 characters")
    rules = _path_rules(data.get("path", []), source=source, exclude=exclude, tun_name=tun_name)
    paths = [
        PathConfig(interface=r.interface, kind=r.kind, priority=r.priority) for r in rules if r.interface is not None
    ]
    return ClientConfig(
        private_key_file=key_file,
        gateway_public_key=gateways[0].public_key,
        gateway=gateways[0].endpoint,
        control_port_offset=control_offset,
        tun_name=tun_name,
        routes=routes,
        paths=tuple(paths),
        events_file=_relative(base, events) if events else None,
        control_socket=pathlib.Path(control),
        fwmark_base=fwmark_base,
        policy=_policy_of(data, source=source),
        path_rules=PathRules(rules=rules, exclude=exclude),
        kill_switch=kill_switch,
        allow_lan=allow_lan,
        dns=dns,
        dns_search=dns_search,
        mtu=mtu,
        control_group=control_group,
        control_steer_group=control_steer_group,
        gateways=gateways if "gateway" in data else (),  # the single form: gateway_entries gives it
        log_limits=log_limits_from_table(data.get("log_limits"), source=source),
        cluster=cluster,
        tun_offload=tun_offload,
    )


def _client_gateways(t: _Table, raw: Any, *, source: str) -> tuple[GatewayEntry, ...]:
    """``[[gateway]]`` entries, or the single ``[client].gateway`` / ``gateway_public_key``: never both."""
    if raw is None:
        public = t.get("gateway_public_key", str, required=True)
        endpoint = parse_endpoint(t.get("gateway", str, required=True), where=f"{t.where}.gateway")
        return (GatewayEntry(endpoint=endpoint, public_key=public),)
    single = sorted({"gateway", "gateway_public_key"} & set(t.data))
    if single:
        raise ConfigError(f"{t.where}: {' and '.join(single)} beside [[gateway]] entries: use one form")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: [[gateway]] must be a non-empty array of tables")
    entries: list[GatewayEntry] = []
    for i, item in enumerate(raw):
        g = _Table(item, where=f"{source}: [[gateway]] #{i + 1}")
        endpoint = parse_endpoint(g.get("endpoint", str, required=True), where=f"{g.where}.endpoint")
        public = g.get("public_key", str, required=True)
        g.finish()
        if not public:
            raise ConfigError(f"{g.where}.public_key: empty")
        if any(e.endpoint == endpoint for e in entries):
            raise ConfigError(f"{g.where}.endpoint: {_endpoint_text(endpoint)} is listed twice")
        entries.append(GatewayEntry(endpoint=endpoint, public_key=public))
    families = {ipaddress.ip_address(e.endpoint[0]).version for e in entries}
    if len(families) > 1:
        raise ConfigError(f"{source}: [[gateway]] endpoints mix IPv4 and IPv6: the path sockets are of one family")
    hosts = {e.endpoint[0] for e in entries}
    if len(hosts) > 1 and families == {6}:
        # Path tables route the one gateway host's /128 (drivers/routes.py); several need a default route there.
        raise ConfigError(f"{source}: [[gateway]] endpoints on several IPv6 hosts are not supported yet")
    return tuple(entries)


def _endpoint_text(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _distinct_gateway_endpoints(gateways: tuple[GatewayEntry, ...], offset: int, *, source: str) -> None:
    """No gateway's data or control endpoint may be another's: each answers for its own key only."""
    seen: dict[tuple[str, int], int] = {}
    for i, g in enumerate(gateways):
        for endpoint in (g.endpoint, control_endpoint(g.endpoint, offset)):
            other = seen.setdefault(endpoint, i)
            if other != i:
                raise ConfigError(
                    f"{source}: [[gateway]] #{i + 1} and #{other + 1} share the endpoint {_endpoint_text(endpoint)}"
                    " (data or control, control_port_offset apart)"
                )


def load_gateway_config(path: str | pathlib.Path) -> GatewayConfig:
    """Read ``gateway.toml``: ``[gateway]``, ``[[peer]]`` entries and ``[policy]``."""
    source = str(path)
    base = pathlib.Path(path).resolve().parent
    data = read_toml(path)
    _top_level(data, {"gateway", "peer", "policy", "cluster", "handshake", "log_limits"}, source=source)
    t = _Table(data.get("gateway"), where=f"{source}: [gateway]")
    key_file = _relative(base, t.get("private_key_file", str, required=True))
    listen = tuple(
        parse_endpoint(e, where=f"{t.where}.listen") for e in t.get("listen", list, [f"0.0.0.0:{DEFAULT_PORT}"])
    )
    control_offset = _control_offset(t, [port for _, port in listen])
    tun_name = t.get("tun_name", str, "jvpn-gw0")
    tunnel_address = _interface(t.get("tunnel_address", str, "10.66.0.1/24"), where=f"{t.where}.tunnel_address")
    raw6 = t.get("tunnel_address6", str, None)
    tunnel6 = _interface6(raw6, where=f"{t.where}.tunnel_address6") if raw6 is not None else None
    mtu = t.get("mtu", int, DEFAULT_MTU)
    events = t.get("events_file", str, None)
    control = t.get("control_socket", str, "/run/jvpn-trio/gateway.sock")
    node_id = t.get("node_id", str, "gw-1")
    nat = t.get("nat", bool, True)
    nat_egress = t.get("nat_egress", str, None)
    if nat_egress is not None:
        _check_name_or_glob(nat_egress, where=f"{t.where}.nat_egress", glob=False)
        if not _PLAIN_IFNAME.fullmatch(nat_egress):  # it goes into nft rules: nothing nft could misparse
            raise ConfigError(f"{t.where}.nat_egress: {nat_egress!r} is not an interface name (A-Za-z0-9_.-)")
        if nat_egress == tun_name:
            raise ConfigError(f"{t.where}.nat_egress: {nat_egress!r} is the tunnel's own interface (tun_name)")
    metrics_listen = _metrics_listen(t.get("metrics_listen", str, None), where=f"{t.where}.metrics_listen")
    raw_dir = t.get("peers_dir", str, None)
    peers_dir = _relative(base, raw_dir) if raw_dir is not None else None
    tun_offload = t.get("tun_offload", bool, True)
    t.finish()
    if not listen:
        raise ConfigError(f"{t.where}.listen: at least one address:port is required")
    mtu = _mtu(mtu, where=f"{t.where}.mtu")
    if tunnel6 is not None and mtu < MIN_MTU6:
        raise ConfigError(f"{t.where}.mtu: {mtu} is below {MIN_MTU6}, the least a tunnel carrying IPv6 needs")
    peers = _gateway_peers(data.get("peer", []), peers_dir, tunnel_address, tunnel6, source=source)
    return GatewayConfig(
        private_key_file=key_file,
        listen=listen,
        control_port_offset=control_offset,
        tun_name=tun_name,
        tunnel_address=tunnel_address,
        mtu=mtu,
        peers=tuple(peers),
        events_file=_relative(base, events) if events else None,
        control_socket=pathlib.Path(control),
        node_id=node_id,
        policy=_policy_of(data, source=source),
        tunnel_address6=tunnel6,
        nat=nat,
        nat_egress=nat_egress,
        metrics_listen=metrics_listen,
        peers_dir=peers_dir,
        cluster=_cluster(data.get("cluster"), source=source),
        handshake=_handshake_limits(data.get("handshake"), source=source),
        log_limits=log_limits_from_table(data.get("log_limits"), source=source),
        tun_offload=tun_offload,
    )


def _handshake_limits(raw: Any, *, source: str) -> HandshakeLimits:
    """The ``[handshake]`` table: every field of ``HandshakeLimits``, each optional; ranges checked there."""
    if raw is None:
        return HandshakeLimits()
    t = _Table(raw, where=f"{source}: [handshake]")
    values: dict[str, Any] = {}
    for field in attrs.fields(HandshakeLimits):
        kind: type | tuple[type, ...] = int if field.type in (int, "int") else (int, float)
        value = t.get(field.name, kind, None)
        if value is not None:
            values[field.name] = value
    t.finish()
    try:
        return HandshakeLimits(**values)
    except ValueError as exc:
        raise ConfigError(f"{t.where}.{exc}") from None


#: The keys of ``[log_limits]``: the integer fields of ``LogLimits`` (which event kinds are limited is not a setting).
LOG_LIMITS_KEYS = tuple(f.name for f in attrs.fields(LogLimits) if f.type in (int, "int"))


def log_limits_from_table(raw: Any, *, source: str) -> LogLimits:
    """The ``[log_limits]`` table of gateway.toml or client.toml: each key optional, checked by ``LogLimits``.

    Types and ranges are ``LogLimits``' own validators (core/bounds.py), so a bad value reads as
    ``file: [log_limits].burst: 0 is out of range 1..10000``; an unknown key is refused.
    """
    if raw is None:
        return DEFAULT_LOG_LIMITS
    t = _Table(raw, where=f"{source}: [log_limits]")
    values = {name: t.data[name] for name in LOG_LIMITS_KEYS if name in t.data}
    t.used.update(values)
    t.finish()
    try:
        return LogLimits(**values)
    except ValueError as exc:
        raise ConfigError(f"{t.where}.{exc}") from None


def _cluster(raw: Any, *, source: str) -> ClusterConfig:
    """The ``[cluster]`` table; ConfigError for anything the etcd store would refuse at start."""
    if raw is None:
        return ClusterConfig()
    t = _Table(raw, where=f"{source}: [cluster]")
    default = ClusterConfig()
    store = t.get("store", str, default.store)
    if store not in CLUSTER_STORES:
        raise ConfigError(f"{t.where}.store: {store!r} is not one of {', '.join(CLUSTER_STORES)}")
    raw_endpoints = t.get("etcd_endpoints", list, [])
    endpoints = tuple(_etcd_endpoint(e, where=f"{t.where}.etcd_endpoints") for e in raw_endpoints)
    timings = {
        name: t.get(name, int, getattr(default, name))
        for name in ("lease_ttl_ms", "request_timeout_ms", "keepalive_interval_ms", "lease_margin_ms")
    }
    prefix = t.get("key_prefix", str, default.key_prefix)
    announce_interface = t.get("announce_interface", str, default.announce_interface)
    if announce_interface is not None:
        _check_name_or_glob(announce_interface, where=f"{t.where}.announce_interface", glob=False)
    in_flight = t.get("store_calls_in_flight", int, default.store_calls_in_flight)
    if not 1 <= in_flight <= MAX_STORE_CALLS_IN_FLIGHT:
        raise ConfigError(f"{t.where}.store_calls_in_flight: {out_of_range(in_flight, 1, MAX_STORE_CALLS_IN_FLIGHT)}")
    t.finish()
    if store == "etcd" and not endpoints:
        raise ConfigError(f"{t.where}.etcd_endpoints: store = \"etcd\" needs at least one endpoint")
    for name, value in timings.items():
        if value < 0 or (value == 0 and name != "lease_margin_ms"):
            raise ConfigError(f"{t.where}.{name}: {value} must be {'positive' if name != 'lease_margin_ms' else 'at least 0'}")
    if not prefix.startswith("/") or not prefix.isprintable():
        raise ConfigError(f"{t.where}.key_prefix: {prefix!r} must start with / and be printable")
    ttl_ms = lease_ttl_s(timings["lease_ttl_ms"]) * _MS_PER_S
    budget = timings["keepalive_interval_ms"] + timings["request_timeout_ms"]
    if not lease_renewable(
        ttl_s=ttl_ms / _MS_PER_S,
        keepalive_interval_s=timings["keepalive_interval_ms"] / _MS_PER_S,
        request_timeout_s=timings["request_timeout_ms"] / _MS_PER_S,
        margin_s=timings["lease_margin_ms"] / _MS_PER_S,
    ):
        raise ConfigError(
            f"{t.where}: keepalive_interval_ms + request_timeout_ms ({budget}) must be below "
            f"lease_ttl_ms rounded up to seconds ({ttl_ms}) minus lease_margin_ms ({timings['lease_margin_ms']})"
        )
    return ClusterConfig(
        store=store,
        etcd_endpoints=endpoints,
        key_prefix=prefix,
        announce_interface=announce_interface,
        store_calls_in_flight=in_flight,
        **timings,
    )


def _etcd_endpoint(value: Any, *, where: str) -> str:
    """An etcd client URL: ``http://`` or ``https://``, a host, a port, nothing after it."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected strings like \"http://10.0.0.5:2379\", got {type(value).__name__}")
    match = _ETCD_URL.fullmatch(value)
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not an etcd URL like http://10.0.0.5:2379")
    if not 0 < int(match.group("port")) <= 65535:
        raise ConfigError(f"{where}: {value!r} has a port out of range")
    return value


#: ``scheme://host:port`` with a DNS name, an IPv4 address or a bracketed IPv6 address.
_ETCD_URL = re.compile(r"https?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})/?")


#: Files in ``peers_dir`` that hold a peer; anything else there (editor backups, READMEs) is left alone.
PEER_FILE_SUFFIX = ".toml"


def _gateway_peers(
    raw_peers: Any,
    peers_dir: pathlib.Path | None,
    tunnel_address: ipaddress.IPv4Interface,
    tunnel6: ipaddress.IPv6Interface | None,
    *,
    source: str,
) -> tuple[PeerConfig, ...]:
    """The ``[[peer]]`` entries, then one peer per ``*.toml`` file of ``peers_dir`` (named after the file)."""
    if not isinstance(raw_peers, list):
        raise ConfigError(f"{source}: [[peer]] must be an array of tables")
    entries: list[tuple[Any, str, str]] = [(raw, f"{source}: [[peer]] #{i + 1}", f"peer{i + 1}") for i, raw in enumerate(raw_peers)]
    if peers_dir is not None:
        try:
            files = sorted(f for f in peers_dir.iterdir() if f.suffix == PEER_FILE_SUFFIX and not f.name.startswith("."))
        except FileNotFoundError:
            raise ConfigError(f"{source}: [gateway].peers_dir: {peers_dir}: no such directory") from None
        except NotADirectoryError:
            raise ConfigError(f"{source}: [gateway].peers_dir: {peers_dir}: not a directory") from None
        except PermissionError:
            raise ConfigError(f"{source}: [gateway].peers_dir: {peers_dir}: permission denied") from None
        for file in files:
            data = read_toml(file)
            entries.append((data, str(file), file.stem))
    if not entries:
        where = f" or a file in {peers_dir}" if peers_dir is not None else ""
        raise ConfigError(f"{source}: at least one [[peer]]{where} with a public_key is required")
    peers: list[PeerConfig] = []
    for raw, where, default_name in entries:
        peers.append(_peer(raw, peers, tunnel_address, tunnel6, where=where, default_name=default_name))
    keys: dict[str, str] = {}
    for peer in peers:
        if peer.public_key in keys:
            raise ConfigError(f"{source}: the public key of peer {peer.name!r} is also peer {keys[peer.public_key]!r}'s")
        keys[peer.public_key] = peer.name
    return tuple(peers)


def _peer(
    raw: Any,
    earlier: list[PeerConfig],
    tunnel_address: ipaddress.IPv4Interface,
    tunnel6: ipaddress.IPv6Interface | None,
    *,
    where: str,
    default_name: str,
) -> PeerConfig:
    pt = _Table(raw, where=where)
    address = pt.get("address", str, None)
    parsed = None
    if address is not None:
        try:
            parsed = ipaddress.IPv4Address(address)
        except ValueError:
            raise ConfigError(f"{pt.where}.address: {address!r} is not an IPv4 address") from None
        usable = parsed in tunnel_address.network and parsed not in (
            tunnel_address.ip,
            tunnel_address.network.network_address,
            tunnel_address.network.broadcast_address,
        )
        if not usable:
            raise ConfigError(f"{pt.where}.address: {parsed} is not a free host address of {tunnel_address.network}")
        if any(p.address == parsed for p in earlier):
            raise ConfigError(f"{pt.where}.address: {parsed} is already given to another peer")
    address6 = _peer_address6(pt.get("address6", str, None), parsed, tunnel_address, tunnel6, where=f"{pt.where}.address6")
    if address6 is not None and any(p.address6 == address6 for p in earlier):
        raise ConfigError(f"{pt.where}.address6: {address6} is already given to another peer")
    peer = PeerConfig(
        name=pt.get("name", str, default_name), public_key=pt.get("public_key", str, required=True),
        address=parsed, address6=address6,
    )  # fmt: skip
    pt.finish()
    return peer


def _metrics_listen(value: str | None, *, where: str) -> tuple[str, int] | None:
    """``metrics_listen``: a literal address and a fixed port (a random one could not be scraped)."""
    if value is None:
        return None
    endpoint = parse_endpoint(value, where=where)
    if endpoint[1] == 0:
        raise ConfigError(f"{where}: port 0 would pick a random port no scraper knows; give a port")
    return endpoint


def host_number(address: ipaddress.IPv4Address, tunnel4: ipaddress.IPv4Interface) -> int:
    """The host part of a tunnel IPv4 address: the same host number names the peer's IPv6 address."""
    return int(address) - int(tunnel4.network.network_address)


def _peer_address6(
    text: str | None,
    address: ipaddress.IPv4Address | None,
    tunnel4: ipaddress.IPv4Interface,
    tunnel6: ipaddress.IPv6Interface | None,
    *,
    where: str,
) -> ipaddress.IPv6Address | None:
    """A peer's IPv6 tunnel address: as given, else the host number of its IPv4 address in ``tunnel6``."""
    if tunnel6 is None:
        if text is not None:
            raise ConfigError(f"{where}: needs [gateway].tunnel_address6")
        return None
    network = tunnel6.network
    if text is None:
        if address is None:
            return None  # handed out with the IPv4 address when the peer connects
        parsed = network[host_number(address, tunnel4)]
    else:
        try:
            parsed = ipaddress.IPv6Address(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an IPv6 address") from None
    if parsed not in network or parsed in (tunnel6.ip, network.network_address):
        raise ConfigError(f"{where}: {parsed} is not a free host address of {network}")
    return parsed

