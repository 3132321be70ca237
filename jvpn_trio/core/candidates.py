"""Which interfaces are paths, which of them are usable, and what changed: the path manager's rules.

Theory of operation
-------------------
The path manager driver (``drivers/paths.py``) reads the machine into an immutable
:class:`MachineSnapshot` each time netlink says something changed.  Everything it then
decides is here, as pure functions of (rules, snapshot), so a field bug becomes a unit
test with two snapshots and no root:

1. **Candidates** (:func:`select_candidates`).  With no ``[[path]]`` rule every
   :attr:`LinkClass.ORDINARY` interface is a candidate (loopback, bridges, tunnels, our own
   TUN, container ports, dummies and veths are not).  With rules, the first rule that
   accepts an interface makes it a candidate: ``interface`` names one interface of any class
   but loopback (naming it is an explicit choice); ``match`` globs accept ordinary links and
   veths (the lab builds its paths from veths); ``kind`` alone accepts ordinary links of
   that classified kind.  ``exclude`` globs win over every rule.  The rule's ``kind`` labels
   the path, else the classified kind does; its ``priority``, else the kind's default plus
   the rule's position.
2. **Usability** (:func:`unusable_reason`).  A candidate carries the tunnel when its link is
   up, it holds an address of the gateway's family, and the kernel has a route to the gateway
   through it.  The route and its next hop are read from the kernel for every snapshot
   (STYLE.md "The world around the laptop": never cache what the kernel owns).  An OS error
   while reading an interface makes it unusable for this snapshot, nothing more.
3. **Identity** (:class:`PathTable`).  A path id belongs to one interface, keyed by
   ``(ifindex, name)``, from the snapshot where it first became usable for as long as that
   interface exists; a newcomer gets the next id never handed out before in this run.
4. **Changes** (:func:`diff_paths`).  Between two sets of usable paths: ``PathDown`` (gone or
   no longer usable, with the reason), ``PathAddressChanged`` (still usable, but the source
   address or next hop moved: a DHCP renewal, a new subnet, a new router) and ``PathUp``.
   :func:`apply_diff` of the result to the old set gives the new set exactly.

Ordering is deterministic everywhere: priority, then interface name.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
from typing import Any, Iterable, Mapping, Sequence, Union

import attrs

__all__ = [
    "Address",
    "Candidate",
    "DownReason",
    "GatewayRoute",
    "InterfaceState",
    "KIND_PRIORITY",
    "LinkClass",
    "MachineSnapshot",
    "PATH_KINDS",
    "Path",
    "PathAddressChanged",
    "PathDiff",
    "PathDown",
    "PathEvent",
    "PathForgotten",
    "PathRule",
    "PathRules",
    "PathTable",
    "PathUp",
    "apply_diff",
    "diff_paths",
    "gateway_family",
    "select_candidates",
    "unusable_reason",
]

PATH_KINDS = ("ethernet", "wifi", "lte")
#: Default preference when a path's priority is not configured: Ethernet, then Wi-Fi, then LTE.
KIND_PRIORITY = {"ethernet": 10, "wifi": 20, "lte": 30}
#: Whose bytes cost money unless a ``[[path]]`` rule says otherwise (``metered``): a mobile data plan.
KIND_METERED = {"ethernet": False, "wifi": False, "lte": True}
#: IP versions an address or a gateway can have.
_FAMILIES = (4, 6)


class LinkClass(enum.Enum):
    """What sort of link an interface is, as far as choosing paths goes (classified by the driver)."""

    ORDINARY = "ordinary"  # NICs, Wi-Fi, modems, VLANs, bonds, macvlans: real uplinks
    VETH = "veth"  # a virtual pair: a container's or the lab's; a path only when a rule names it
    BRIDGE = "bridge"  # docker0, virbr0: host-only networks
    TUNNEL = "tunnel"  # TUN/TAP (ours too), WireGuard, IP tunnels: a path through them depends on them
    CONTAINER = "container"  # a port enslaved to a bridge or bond: the master holds the address
    VIRTUAL = "virtual"  # dummy, ifb, vrf: never carry traffic out of the host
    LOOPBACK = "loopback"


class DownReason(enum.Enum):
    """Why a path stopped being usable (the ``reason`` of :class:`PathDown`)."""

    INTERFACE_GONE = "interface-gone"
    NOT_A_CANDIDATE = "not-a-candidate"
    RELABELLED = "relabelled"  # still usable, but its kind, priority or label changed: down, then up again
    READ_ERROR = "read-error"
    LINK_DOWN = "link-down"
    NO_ADDRESS = "no-address"
    NO_ROUTE = "no-route"


def _check_family(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value not in _FAMILIES:
        raise ValueError(f"{attribute.name}: IP version must be 4 or 6, got {value!r}")


def _check_optional_ip(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        ipaddress.ip_address(value)  # raises ValueError


def _check_kind(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in PATH_KINDS:
        raise ValueError(f"{attribute.name}: expected one of {', '.join(PATH_KINDS)}, got {value!r}")


def _check_glob(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and (not value or any(c.isspace() or c == "/" for c in value)):
        raise ValueError(f"{attribute.name}: {value!r} is not a usable interface name or glob")


def gateway_family(gateway: str) -> int:
    """The IP version (4 or 6) of the gateway's literal address; raises ``ValueError`` for a non-address."""
    return ipaddress.ip_address(gateway).version


# -- the machine, as read by the driver -------------------------------------------------


@attrs.frozen(kw_only=True)
class Address:
    """One address an interface holds (only addresses it can use as a source: global scope, not tentative)."""

    family: int = attrs.field(validator=_check_family)
    address: str
    prefixlen: int

    def __attrs_post_init__(self) -> None:
        if ipaddress.ip_address(self.address).version != self.family:
            raise ValueError(f"{self.address} is not an IPv{self.family} address")


@attrs.frozen(kw_only=True)
class GatewayRoute:
    """The kernel's route to the gateway through one interface: next hop (None: on-link) and source."""

    next_hop: str | None = attrs.field(default=None, validator=_check_optional_ip)
    source: str | None = attrs.field(default=None, validator=_check_optional_ip)


@attrs.frozen(kw_only=True)
class InterfaceState:
    """One interface as the driver read it; ``route`` is None when there is none (or it was not looked up).

    ``error`` is the OS error that kept the driver from reading this interface completely
    (the interface vanished mid-read, permission refused): it is unusable for this snapshot.
    """

    name: str
    index: int
    kind: str = attrs.field(validator=_check_kind)
    link_class: LinkClass
    up: bool
    addresses: tuple[Address, ...] = ()
    route: GatewayRoute | None = None
    error: str | None = None

    def addresses_of(self, family: int) -> tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.family == family)


def _by_index(interfaces: Iterable[InterfaceState]) -> tuple[InterfaceState, ...]:
    return tuple(sorted(interfaces, key=lambda i: i.index))


@attrs.frozen
class MachineSnapshot:
    """Every interface of the machine at one moment, by index; names and indexes are unique."""

    interfaces: tuple[InterfaceState, ...] = attrs.field(default=(), converter=_by_index)

    def __attrs_post_init__(self) -> None:
        for what in ("index", "name"):
            values = [getattr(i, what) for i in self.interfaces]
            if len(set(values)) != len(values):
                raise ValueError(f"two interfaces share a {what}: {values}")

    def by_name(self) -> dict[str, InterfaceState]:
        return {i.name: i for i in self.interfaces}


# -- the rules, from the configuration --------------------------------------------------


@attrs.frozen(kw_only=True)
class PathRule:
    """One ``[[path]]`` entry: ``interface`` or ``match`` (optionally labelled by ``kind``), or ``kind`` alone."""

    interface: str | None = attrs.field(default=None, validator=_check_glob)
    match: str | None = attrs.field(default=None, validator=_check_glob)
    kind: str | None = attrs.field(default=None, validator=_check_kind)
    priority: int | None = None
    #: None: the kind's default (:data:`KIND_METERED`).
    metered: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.interface is not None and self.match is not None:
            raise ValueError("a path rule takes 'interface' or 'match', not both")
        if self.interface is None and self.match is None and self.kind is None:
            raise ValueError("a path rule needs 'interface', 'match' or 'kind'")

    def accepts(self, iface: InterfaceState) -> bool:
        """Whether this rule selects ``iface`` (exclusion is the caller's business)."""
        if iface.link_class is LinkClass.LOOPBACK:
            return False
        if self.interface is not None:
            return iface.name == self.interface
        if self.match is not None:
            return iface.link_class in (LinkClass.ORDINARY, LinkClass.VETH) and fnmatch.fnmatchcase(
                iface.name, self.match
            )
        return iface.link_class is LinkClass.ORDINARY and iface.kind == self.kind

    def describe(self) -> str:
        if self.interface is not None:
            return f"interface={self.interface}"
        if self.match is not None:
            return f"match={self.match}"
        return f"kind={self.kind}"


def _to_rules(values: Iterable[PathRule]) -> tuple[PathRule, ...]:
    return tuple(values)


def _to_tuple(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError("exclude must be a sequence of globs, not one string")
    return tuple(values)


def _check_excludes(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for glob in value:
        _check_glob(_inst, attribute, glob)


@attrs.frozen(kw_only=True)
class PathRules:
    """All ``[[path]]`` rules in file order and the ``exclude`` globs; empty rules mean "every ordinary link"."""

    rules: tuple[PathRule, ...] = attrs.field(default=(), converter=_to_rules)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, validator=_check_excludes)

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.exclude)


@attrs.frozen(kw_only=True)
class Candidate:
    """An interface the rules make a path candidate, with the kind, priority and label it gets."""

    name: str
    index: int
    kind: str
    priority: int
    label: str
    metered: bool = False


@attrs.frozen(kw_only=True)
class PathCost:
    """What decides whether a path is metered, in this order: its ``[[path]]`` rule, NetworkManager's
    ``Metered`` property (drivers/networkmanager.py), the kind's default."""

    #: The ``[[path]]`` rule's ``metered``; None when the rule does not say (or no rule chose it).
    configured: bool | None = None
    #: The kind's default (:data:`KIND_METERED`).
    kind_default: bool = False

    @classmethod
    def of(cls, rules: PathRules, *, label: str, kind: str) -> PathCost:
        """The cost inputs of a path that the rule labelled ``label`` chose (``PathUp.label``).

        A label is the rule's selector (``PathRule.describe``), which alone
        decides what the rule accepts, and the first rule that accepts an
        interface chooses it: so the first rule with that label is the one.
        "auto" (no rules) matches none.
        """
        configured = next((r.metered for r in rules.rules if r.describe() == label), None)
        return cls(configured=configured, kind_default=KIND_METERED.get(kind, False))

    @property
    def follows_network_manager(self) -> bool:
        """Whether NM's opinion can matter: only when the rule does not say."""
        return self.configured is None

    def metered(self, network_manager: bool | None = None) -> bool:
        """The rule's word, else NM's opinion, else the kind's default."""
        if self.configured is not None:
            return self.configured
        if network_manager is not None:
            return network_manager
        return self.kind_default


def _order(priority: int, name: str) -> tuple[int, str]:
    return (priority, name)


def select_candidates(rules: PathRules, snapshot: MachineSnapshot) -> tuple[Candidate, ...]:
    """The candidates among ``snapshot``'s interfaces by the rules in the module docstring; priority, then name."""
    chosen = []
    for iface in snapshot.interfaces:
        if iface.link_class is LinkClass.LOOPBACK or rules.excluded(iface.name):
            continue
        if not rules.rules:
            if iface.link_class is LinkClass.ORDINARY:
                chosen.append(
                    Candidate(name=iface.name, index=iface.index, kind=iface.kind,
                              priority=KIND_PRIORITY[iface.kind], label="auto",
                              metered=PathCost(kind_default=KIND_METERED[iface.kind]).metered())
                )
            continue
        for position, rule in enumerate(rules.rules):
            if rule.accepts(iface):
                kind = rule.kind if rule.kind is not None else iface.kind
                priority = rule.priority if rule.priority is not None else KIND_PRIORITY[kind] + position
                metered = PathCost(configured=rule.metered, kind_default=KIND_METERED[kind]).metered()
                chosen.append(
                    Candidate(name=iface.name, index=iface.index, kind=kind, priority=priority, label=rule.describe(),
                              metered=metered)
                )
                break
    return tuple(sorted(chosen, key=lambda c: _order(c.priority, c.name)))


def unusable_reason(iface: InterfaceState, family: int) -> DownReason | None:
    """None when ``iface`` can carry the tunnel to a gateway of IP version ``family``, else why not."""
    if iface.error is not None:
        return DownReason.READ_ERROR
    if not iface.up:
        return DownReason.LINK_DOWN
    if not iface.addresses_of(family):
        return DownReason.NO_ADDRESS
    if iface.route is None:
        return DownReason.NO_ROUTE
    return None


# -- paths and the events that report them ----------------------------------------------


@attrs.frozen(kw_only=True)
class Path:
    """A usable path: a candidate whose link is up, addressed and routed towards the gateway."""

    path_id: int
    ifname: str
    ifindex: int
    kind: str
    priority: int
    label: str
    source_address: str
    next_hop: str | None  # None: the gateway is on-link
    metered: bool = False

    @property
    def identity(self) -> tuple[object, ...]:
        """What may not change while the path stays up (an address or next hop may)."""
        return (self.path_id, self.ifname, self.ifindex, self.kind, self.priority, self.label, self.metered)


@attrs.frozen(kw_only=True)
class PathUp:
    """A path became usable; its socket binds to ``ifname`` and its route goes via ``next_hop``."""

    path_id: int
    ifname: str
    kind: str
    priority: int
    source_address: str
    next_hop: str | None
    ifindex: int = 0
    label: str = ""
    metered: bool = False

    @classmethod
    def of(cls, path: Path) -> PathUp:
        return cls(path_id=path.path_id, ifname=path.ifname, kind=path.kind, priority=path.priority,
                   source_address=path.source_address, next_hop=path.next_hop, ifindex=path.ifindex, label=path.label,
                   metered=path.metered)

    def to_path(self) -> Path:
        return Path(path_id=self.path_id, ifname=self.ifname, ifindex=self.ifindex, kind=self.kind,
                    priority=self.priority, label=self.label, source_address=self.source_address,
                    next_hop=self.next_hop, metered=self.metered)


@attrs.frozen(kw_only=True)
class PathDown:
    """A path is gone or no longer usable; ``reason`` says which check failed."""

    path_id: int
    ifname: str
    reason: DownReason


@attrs.frozen(kw_only=True)
class PathForgotten:
    """A path that was already down is gone for good (its interface no longer exists): its id is free.

    A path goes down first and its interface disappears later when a link drops and is then
    deleted (``ip link del`` says "down" before "gone", a USB modem powers off after losing
    carrier): a consumer that keeps an id for a path that may come back learns here that it won't.
    """

    path_id: int
    ifname: str


@attrs.frozen(kw_only=True)
class PathAddressChanged:
    """A path stays usable but its source address or next hop changed (DHCP renewal, new subnet or router)."""

    path_id: int
    ifname: str
    source_address: str
    next_hop: str | None


PathEvent = Union[PathUp, PathDown, PathAddressChanged, PathForgotten]


@attrs.frozen(kw_only=True)
class PathDiff:
    """What changed between two sets of paths, each part in priority-then-name order."""

    down: tuple[PathDown, ...] = ()
    changed: tuple[PathAddressChanged, ...] = ()
    up: tuple[PathUp, ...] = ()
    #: Paths already down before this diff whose interfaces are now gone (they change no path set).
    forgotten: tuple[PathForgotten, ...] = ()

    def events(self) -> tuple[PathEvent, ...]:
        """Downs and forgotten ids, then address changes, then ups: the order a consumer should apply them in."""
        return (*self.down, *self.forgotten, *self.changed, *self.up)

    def __bool__(self) -> bool:
        return bool(self.down or self.changed or self.up or self.forgotten)


def _sorted_paths(paths: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(sorted(paths, key=lambda p: _order(p.priority, p.ifname)))


def diff_paths(
    old: Sequence[Path], new: Sequence[Path], reasons: Mapping[int, DownReason] | None = None
) -> PathDiff:
    """The events that turn ``old`` into ``new`` (paths matched by id).

    ``reasons`` gives the :class:`DownReason` of each id that left; ids without one are
    reported as :attr:`DownReason.NOT_A_CANDIDATE`.  A path whose identity (name, index, kind,
    priority, label) changed under the same id goes down (``RELABELLED``) and up again.
    """
    reasons = reasons or {}
    old_by_id = {p.path_id: p for p in old}
    new_by_id = {p.path_id: p for p in new}
    down, changed, up = [], [], []
    for p in _sorted_paths(old):
        n = new_by_id.get(p.path_id)
        if n is None:
            down.append(PathDown(path_id=p.path_id, ifname=p.ifname,
                                 reason=reasons.get(p.path_id, DownReason.NOT_A_CANDIDATE)))
        elif n.identity != p.identity:
            down.append(PathDown(path_id=p.path_id, ifname=p.ifname, reason=DownReason.RELABELLED))
    for n in _sorted_paths(new):
        o = old_by_id.get(n.path_id)
        if o is None or o.identity != n.identity:
            up.append(PathUp.of(n))
        elif (o.source_address, o.next_hop) != (n.source_address, n.next_hop):
            changed.append(PathAddressChanged(path_id=n.path_id, ifname=n.ifname,
                                              source_address=n.source_address, next_hop=n.next_hop))
    return PathDiff(down=tuple(down), changed=tuple(changed), up=tuple(up))


def apply_diff(paths: Sequence[Path], diff: PathDiff) -> tuple[Path, ...]:
    """``paths`` after ``diff``, in priority-then-name order; ``ValueError`` if the diff does not fit them."""
    by_id = {p.path_id: p for p in paths}
    for d in diff.down:
        if by_id.pop(d.path_id, None) is None:
            raise ValueError(f"PathDown for unknown path {d.path_id}")
    for c in diff.changed:
        current = by_id.get(c.path_id)
        if current is None:
            raise ValueError(f"PathAddressChanged for unknown path {c.path_id}")
        by_id[c.path_id] = attrs.evolve(current, source_address=c.source_address, next_hop=c.next_hop)
    for u in diff.up:
        if u.path_id in by_id:
            raise ValueError(f"PathUp for path {u.path_id}, which is already up")
        by_id[u.path_id] = u.to_path()
    return _sorted_paths(by_id.values())


# -- the table of paths between snapshots -----------------------------------------------

_Key = tuple[int, str]  # (ifindex, name): one interface for as long as it exists


@attrs.frozen(kw_only=True)
class PathTable:
    """The usable paths and the id book-keeping, carried from one snapshot to the next.

    ``ids`` maps each interface that ever became usable and still exists, as
    ``(ifindex, name, path_id)``; ``next_id`` is one above every id handed out so far.
    """

    paths: tuple[Path, ...] = ()
    ids: tuple[tuple[int, str, int], ...] = ()
    next_id: int = 1

    def update(self, snapshot: MachineSnapshot, rules: PathRules, family: int) -> tuple[PathTable, PathDiff]:
        """The table for ``snapshot`` and the events from this one; ``family`` is the gateway's IP version."""
        present: set[_Key] = {(i.index, i.name) for i in snapshot.interfaces}
        known: dict[_Key, int] = {(index, name): pid for index, name, pid in self.ids if (index, name) in present}
        next_id = self.next_id
        by_name = snapshot.by_name()
        reasons: dict[int, DownReason] = {}
        paths = []
        for c in select_candidates(rules, snapshot):
            iface = by_name[c.name]
            key = (c.index, c.name)
            reason, route = unusable_reason(iface, family), iface.route
            if reason is not None or route is None:
                if key in known and reason is not None:
                    reasons[known[key]] = reason
                continue
            if key not in known:
                known[key], next_id = next_id, next_id + 1
            source = route.source or iface.addresses_of(family)[0].address
            paths.append(
                Path(path_id=known[key], ifname=c.name, ifindex=c.index, kind=c.kind, priority=c.priority,
                     label=c.label, source_address=source, next_hop=route.next_hop, metered=c.metered)
            )
        still = set(known.values())
        for p in self.paths:
            if p.path_id not in still:
                reasons[p.path_id] = DownReason.INTERFACE_GONE
        was_up = {p.path_id for p in self.paths}
        forgotten = tuple(
            PathForgotten(path_id=pid, ifname=name)
            for _index, name, pid in self.ids
            if pid not in still and pid not in was_up
        )
        new_paths = _sorted_paths(paths)
        table = PathTable(
            paths=new_paths,
            ids=tuple(sorted((index, name, pid) for (index, name), pid in known.items())),
            next_id=next_id,
        )
        return table, attrs.evolve(diff_paths(self.paths, new_paths, reasons), forgotten=forgotten)

    def link_lost(self, ifindex: int, *, removed: bool) -> tuple[PathTable, PathDiff]:
        """The kernel says interface ``ifindex`` went down (or away): its path is down now, before any read.

        A hint, not a snapshot: nothing else changes and a path whose link is only down keeps
        its id, so the next :meth:`update` brings it back as the same path if the link came back
        meanwhile (or reports it :class:`PathForgotten` if the interface went away after all).
        """
        reason = DownReason.INTERFACE_GONE if removed else DownReason.LINK_DOWN
        lost = {p.path_id: reason for p in self.paths if p.ifindex == ifindex}
        if not lost:
            return self, PathDiff(down=(), changed=(), up=())
        kept = tuple(p for p in self.paths if p.path_id not in lost)
        ids = tuple(entry for entry in self.ids if not (removed and entry[2] in lost))  # gone: its id too
        return attrs.evolve(self, paths=kept, ids=ids), diff_paths(self.paths, kept, lost)

    def unreadable(self) -> tuple[PathTable, PathDiff]:
        """The machine could not be read at all: every path is down for now, ids are kept for later."""
        reasons = {p.path_id: DownReason.READ_ERROR for p in self.paths}
        return attrs.evolve(self, paths=()), diff_paths(self.paths, (), reasons)
