"""core/candidates.py: candidate rules, usability, path ids and diffs between snapshots.

Determinism: pure functions on hand-built snapshots; no clock, no I/O.  The hypothesis
tests draw sequences of machine snapshots and check the invariants the path manager
relies on: a diff applied to the old set gives the new set, ids are stable while an
interface exists and never reused for another one.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jvpn_trio.core.candidates import (
    KIND_PRIORITY,
    Address,
    DownReason,
    GatewayRoute,
    InterfaceState,
    LinkClass,
    MachineSnapshot,
    Path,
    PathAddressChanged,
    PathDiff,
    PathDown,
    PathForgotten,
    PathRule,
    PathRules,
    PathTable,
    PathUp,
    apply_diff,
    diff_paths,
    gateway_family,
    select_candidates,
    unusable_reason,
)

ROUTER = "192.168.1.1"


def iface(
    name: str,
    index: int,
    *,
    kind: str = "ethernet",
    link_class: LinkClass = LinkClass.ORDINARY,
    up: bool = True,
    v4: tuple[str, ...] = ("192.168.1.20",),
    v6: tuple[str, ...] = (),
    next_hop: str | None = ROUTER,
    routed: bool = True,
    source: str | None = None,
    error: str | None = None,
) -> InterfaceState:
    addresses = tuple(Address(family=4, address=a, prefixlen=24) for a in v4) + tuple(
        Address(family=6, address=a, prefixlen=64) for a in v6
    )
    return InterfaceState(
        name=name,
        index=index,
        kind=kind,
        link_class=link_class,
        up=up,
        addresses=addresses,
        route=GatewayRoute(next_hop=next_hop, source=source) if routed else None,
        error=error,
    )


def names(rules: PathRules, *ifaces: InterfaceState) -> list[str]:
    return [c.name for c in select_candidates(rules, MachineSnapshot(ifaces))]


LAPTOP = (
    iface("lo", 1, link_class=LinkClass.LOOPBACK),
    iface("eth0", 2),
    iface("wlan0", 3, kind="wifi"),
    iface("wwan0", 4, kind="lte"),
    iface("docker0", 5, link_class=LinkClass.BRIDGE),
    iface("veth12ab", 6, link_class=LinkClass.CONTAINER),
    iface("jvpn0", 7, link_class=LinkClass.TUNNEL),
    iface("wg0", 8, link_class=LinkClass.TUNNEL),
    iface("dummy0", 9, link_class=LinkClass.VIRTUAL),
    iface("labveth", 10, link_class=LinkClass.VETH),
    iface("wlan1", 11, kind="wifi"),
)


# -- candidates ---------------------------------------------------------------------------


def test_without_rules_every_ordinary_link_is_a_candidate() -> None:
    assert names(PathRules(), *LAPTOP) == ["eth0", "wlan0", "wlan1", "wwan0"]
    first = select_candidates(PathRules(), MachineSnapshot(LAPTOP))[0]
    assert (first.kind, first.priority, first.label) == ("ethernet", KIND_PRIORITY["ethernet"], "auto")


def test_exclude_wins_over_everything() -> None:
    assert names(PathRules(exclude=("wlan*",)), *LAPTOP) == ["eth0", "wwan0"]
    rules = PathRules(rules=(PathRule(interface="wlan1"), PathRule(match="*")), exclude=("wlan1", "eth*"))
    assert names(rules, *LAPTOP) == ["labveth", "wlan0", "wwan0"]


def test_veths_count_only_when_named_by_a_rule() -> None:
    assert "labveth" not in names(PathRules(), *LAPTOP)
    assert names(PathRules(rules=(PathRule(match="lab*"),)), *LAPTOP) == ["labveth"]
    assert names(PathRules(rules=(PathRule(interface="labveth"),)), *LAPTOP) == ["labveth"]
    # A kind alone names no interface, and a glob never picks bridges, tunnels or container ports.
    assert names(PathRules(rules=(PathRule(kind="ethernet"),)), *LAPTOP) == ["eth0"]
    assert names(PathRules(rules=(PathRule(match="*"),)), *LAPTOP) == ["eth0", "labveth", "wlan0", "wlan1", "wwan0"]


def test_naming_an_interface_is_an_explicit_choice_except_loopback() -> None:
    rules = PathRules(rules=(PathRule(interface="wg0"), PathRule(interface="docker0"), PathRule(interface="lo")))
    assert names(rules, *LAPTOP) == ["wg0", "docker0"]


def test_kind_alone_matches_every_link_classified_so() -> None:
    rules = PathRules(rules=(PathRule(kind="wifi"),))
    found = select_candidates(rules, MachineSnapshot(LAPTOP))
    assert [(c.name, c.kind, c.priority, c.label) for c in found] == [
        ("wlan0", "wifi", 20, "kind=wifi"),
        ("wlan1", "wifi", 20, "kind=wifi"),
    ]


def test_first_rule_wins_and_labels_kind_and_priority() -> None:
    rules = PathRules(
        rules=(
            PathRule(interface="wlan1", priority=5),  # position 0
            PathRule(match="wl*", kind="lte"),  # position 1: the rule's kind labels the path
            PathRule(kind="ethernet"),  # position 2
        )
    )
    found = select_candidates(rules, MachineSnapshot(LAPTOP))
    assert [(c.name, c.kind, c.priority, c.label) for c in found] == [
        ("wlan1", "wifi", 5, "interface=wlan1"),
        ("eth0", "ethernet", KIND_PRIORITY["ethernet"] + 2, "kind=ethernet"),
        ("wlan0", "lte", KIND_PRIORITY["lte"] + 1, "match=wl*"),
    ]


def test_order_is_priority_then_name() -> None:
    rules = PathRules(rules=(PathRule(match="*", priority=7),))
    assert names(rules, iface("b", 3), iface("c", 1), iface("a", 2)) == ["a", "b", "c"]


def test_glob_is_case_sensitive() -> None:
    assert names(PathRules(rules=(PathRule(match="WL*"),)), *LAPTOP) == []


# -- usability -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (iface("eth0", 2), None),
        (iface("eth0", 2, next_hop=None), None),  # on-link gateway
        (iface("eth0", 2, error="ENODEV"), DownReason.READ_ERROR),
        (iface("eth0", 2, up=False), DownReason.LINK_DOWN),
        (iface("eth0", 2, v4=()), DownReason.NO_ADDRESS),
        (iface("eth0", 2, v4=(), v6=("2001:db8::5",)), DownReason.NO_ADDRESS),
        (iface("eth0", 2, routed=False), DownReason.NO_ROUTE),
    ],
)
def test_usability_for_an_ipv4_gateway(state: InterfaceState, reason: DownReason | None) -> None:
    assert unusable_reason(state, 4) is reason


def test_usability_follows_the_gateway_family() -> None:
    dual = iface("eth0", 2, v6=("2001:db8::5",))
    only4 = iface("eth0", 2)
    assert gateway_family("2001:db8::1") == 6 and gateway_family("192.0.2.1") == 4
    assert unusable_reason(dual, 6) is None
    assert unusable_reason(only4, 6) is DownReason.NO_ADDRESS
    with pytest.raises(ValueError):
        gateway_family("gw.example")


# -- values are validated -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interface": "a", "match": "b*"},
        {},
        {"priority": 3},
        {"match": ""},
        {"match": "a b"},
        {"kind": "satellite"},
    ],
)
def test_bad_rules_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PathRule(**kwargs)


def test_bad_snapshots_are_rejected() -> None:
    with pytest.raises(ValueError, match="index"):
        MachineSnapshot((iface("a", 1), iface("b", 1)))
    with pytest.raises(ValueError, match="name"):
        MachineSnapshot((iface("a", 1), iface("a", 2)))
    with pytest.raises(ValueError):
        Address(family=4, address="2001:db8::1", prefixlen=64)
    with pytest.raises(ValueError):
        GatewayRoute(next_hop="router")
    with pytest.raises(TypeError):
        PathRules(exclude="docker*")


# -- the table: ids, events and reasons -----------------------------------------------------

RULES = PathRules()


def step(table: PathTable, *ifaces: InterfaceState, family: int = 4) -> tuple[PathTable, list[object]]:
    new, diff = table.update(MachineSnapshot(ifaces), RULES, family)
    assert apply_diff(table.paths, diff) == new.paths
    return new, list(diff.events())


def test_first_snapshot_brings_every_usable_path_up_in_order() -> None:
    table, events = step(PathTable(), *LAPTOP[:4], iface("eth9", 12, routed=False))
    assert events == [
        PathUp(path_id=1, ifname="eth0", kind="ethernet", priority=10, source_address="192.168.1.20",
               next_hop=ROUTER, ifindex=2, label="auto"),
        PathUp(path_id=2, ifname="wlan0", kind="wifi", priority=20, source_address="192.168.1.20",
               next_hop=ROUTER, ifindex=3, label="auto"),
        PathUp(path_id=3, ifname="wwan0", kind="lte", priority=30, source_address="192.168.1.20",
               next_hop=ROUTER, ifindex=4, label="auto", metered=True),  # a mobile data plan, by default
    ]
    assert table.next_id == 4
    assert [p.ifname for p in table.paths] == ["eth0", "wlan0", "wwan0"]


def test_the_kernels_source_address_is_preferred() -> None:
    _, events = step(PathTable(), iface("eth0", 2, v4=("10.0.0.2", "10.0.0.3"), source="10.0.0.3"))
    assert isinstance(events[0], PathUp) and events[0].source_address == "10.0.0.3"


def test_an_id_stays_with_its_interface_across_flaps_and_is_never_reused() -> None:
    table, _ = step(PathTable(), iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    table, events = step(table, iface("eth0", 2, up=False), iface("wlan0", 3, kind="wifi"))
    assert events == [PathDown(path_id=1, ifname="eth0", reason=DownReason.LINK_DOWN)]
    table, events = step(table, iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    assert [(e.path_id, e.ifname) for e in events if isinstance(e, PathUp)] == [(1, "eth0")]
    # Unplugged: the id goes with it.  The same name again is a new interface (new index): a new id.
    table, events = step(table, iface("wlan0", 3, kind="wifi"))
    assert events == [PathDown(path_id=1, ifname="eth0", reason=DownReason.INTERFACE_GONE)]
    table, events = step(table, iface("eth0", 13), iface("wlan0", 3, kind="wifi"))
    assert [(e.path_id, e.ifname) for e in events if isinstance(e, PathUp)] == [(3, "eth0")]
    assert table.next_id == 4


def test_a_link_lost_hint_downs_only_its_path_and_keeps_the_id_for_the_next_read() -> None:
    table, _ = step(PathTable(), iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    hinted, diff = table.link_lost(2, removed=False)
    assert list(diff.events()) == [PathDown(path_id=1, ifname="eth0", reason=DownReason.LINK_DOWN)]
    assert apply_diff(table.paths, diff) == hinted.paths and hinted.ids == table.ids
    _, events = step(hinted, iface("eth0", 2), iface("wlan0", 3, kind="wifi"))  # it was back by the read
    assert [(e.path_id, e.ifname) for e in events if isinstance(e, PathUp)] == [(1, "eth0")]
    _, events = step(hinted, iface("wlan0", 3, kind="wifi"))  # deleted after going down: its id is free
    assert events == [PathForgotten(path_id=1, ifname="eth0")]
    gone, diff = table.link_lost(3, removed=True)
    assert list(diff.events()) == [PathDown(path_id=2, ifname="wlan0", reason=DownReason.INTERFACE_GONE)]
    assert [pid for _, _, pid in gone.ids] == [1]
    _, events = step(gone, iface("eth0", 2))  # already reported gone: nothing more
    assert events == []
    same, diff = gone.link_lost(99, removed=False)  # not a path: nothing
    assert same is gone and list(diff.events()) == []


def test_a_rename_is_a_different_interface() -> None:
    table, _ = step(PathTable(), iface("eth0", 2))
    table, events = step(table, iface("enp0s1", 2))
    assert [type(e).__name__ for e in events] == ["PathDown", "PathUp"]
    assert events[0] == PathDown(path_id=1, ifname="eth0", reason=DownReason.INTERFACE_GONE)
    assert isinstance(events[1], PathUp) and events[1].path_id == 2


def test_an_interface_that_is_unusable_at_first_gets_its_id_when_it_becomes_usable() -> None:
    table, events = step(PathTable(), iface("eth0", 2, v4=()), iface("wlan0", 3, kind="wifi"))
    assert [(e.path_id, e.ifname) for e in events if isinstance(e, PathUp)] == [(1, "wlan0")]
    table, events = step(table, iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    assert [(e.path_id, e.ifname) for e in events if isinstance(e, PathUp)] == [(2, "eth0")]


def test_renewed_address_and_new_router_are_address_changes() -> None:
    table, _ = step(PathTable(), iface("eth0", 2))
    table, events = step(table, iface("eth0", 2, v4=("192.168.1.77",)))
    assert events == [PathAddressChanged(path_id=1, ifname="eth0", source_address="192.168.1.77", next_hop=ROUTER)]
    table, events = step(table, iface("eth0", 2, v4=("10.9.0.4",), next_hop="10.9.0.1"))
    assert events == [PathAddressChanged(path_id=1, ifname="eth0", source_address="10.9.0.4", next_hop="10.9.0.1")]
    table, events = step(table, iface("eth0", 2, v4=("10.9.0.4",), next_hop="10.9.0.1"))
    assert events == []


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        (iface("eth0", 2, v4=()), DownReason.NO_ADDRESS),
        (iface("eth0", 2, routed=False), DownReason.NO_ROUTE),
        (iface("eth0", 2, error="ENODEV: No such device"), DownReason.READ_ERROR),
        (iface("eth0", 2, link_class=LinkClass.CONTAINER), DownReason.NOT_A_CANDIDATE),
    ],
)
def test_down_reasons(after: InterfaceState, reason: DownReason) -> None:
    table, _ = step(PathTable(), iface("eth0", 2))
    _, events = step(table, after)
    assert events == [PathDown(path_id=1, ifname="eth0", reason=reason)]


def test_a_relabelled_path_goes_down_and_up_under_its_id() -> None:
    table, _ = step(PathTable(), iface("usb0", 2))
    _, events = step(table, iface("usb0", 2, kind="lte"))  # sysfs showed DEVTYPE=wwan late
    assert events[0] == PathDown(path_id=1, ifname="usb0", reason=DownReason.RELABELLED)
    assert isinstance(events[1], PathUp) and (events[1].path_id, events[1].kind) == (1, "lte")


def test_an_unreadable_machine_takes_every_path_down_but_keeps_the_ids() -> None:
    table, _ = step(PathTable(), iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    blind, diff = table.unreadable()
    assert list(diff.events()) == [
        PathDown(path_id=1, ifname="eth0", reason=DownReason.READ_ERROR),
        PathDown(path_id=2, ifname="wlan0", reason=DownReason.READ_ERROR),
    ]
    assert blind.paths == () and blind.ids == table.ids
    _, events = step(blind, iface("eth0", 2), iface("wlan0", 3, kind="wifi"))
    assert [e.path_id for e in events if isinstance(e, PathUp)] == [1, 2]


def test_ipv6_gateway() -> None:
    table, events = step(
        PathTable(),
        iface("eth0", 2, v6=("2001:db8:1::20",), next_hop="fe80::1"),
        iface("wlan0", 3, kind="wifi"),  # IPv4 only
        family=6,
    )
    assert [(e.ifname, e.source_address, e.next_hop) for e in events if isinstance(e, PathUp)] == [
        ("eth0", "2001:db8:1::20", "fe80::1")
    ]


def test_apply_diff_rejects_a_diff_that_does_not_fit() -> None:
    path = Path(path_id=1, ifname="eth0", ifindex=2, kind="ethernet", priority=10, label="auto",
                source_address="10.0.0.2", next_hop=None)
    with pytest.raises(ValueError, match="unknown"):
        apply_diff((), PathDiff(down=(PathDown(path_id=1, ifname="eth0", reason=DownReason.LINK_DOWN),)))
    with pytest.raises(ValueError, match="unknown"):
        apply_diff((), PathDiff(changed=(PathAddressChanged(path_id=1, ifname="eth0",
                                                            source_address="10.0.0.3", next_hop=None),)))
    with pytest.raises(ValueError, match="already up"):
        apply_diff((path,), PathDiff(up=(PathUp.of(path),)))
    assert not PathDiff() and diff_paths((path,), (path,)) == PathDiff()


# -- properties over random sequences of snapshots --------------------------------------------

NAMES = ("eth0", "eth1", "wlan0", "wwan0", "veth0", "br0")
KINDS = ("ethernet", "ethernet", "wifi", "lte", "ethernet", "ethernet")
CLASSES = (LinkClass.ORDINARY,) * 4 + (LinkClass.VETH, LinkClass.BRIDGE)


@st.composite
def interface_states(draw: st.DrawFn, slot: int, index: int) -> InterfaceState:
    subnet = draw(st.integers(0, 2))
    return InterfaceState(
        name=NAMES[slot],
        index=index,
        kind=draw(st.sampled_from((KINDS[slot], "lte"))) if slot == 0 else KINDS[slot],
        link_class=CLASSES[slot],
        up=draw(st.booleans()),
        addresses=tuple(
            Address(family=4, address=f"10.{subnet}.{slot}.{n}", prefixlen=24)
            for n in draw(st.lists(st.integers(2, 4), max_size=2, unique=True))
        ),
        route=draw(st.sampled_from((None, GatewayRoute(next_hop=None), GatewayRoute(next_hop=f"10.{subnet}.{slot}.1")))),
        error=draw(st.sampled_from((None, None, None, "ENODEV"))),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> MachineSnapshot:
    """Up to six interfaces; an interface may be re-created (a new index for the same name)."""
    present = draw(st.lists(st.integers(0, len(NAMES) - 1), unique=True))
    generation = draw(st.integers(0, 1))
    return MachineSnapshot(
        tuple(draw(interface_states(slot, 10 * generation + slot + 1)) for slot in present)
    )


RULE_SETS = st.sampled_from(
    (
        PathRules(),
        PathRules(rules=(PathRule(match="*"),)),
        PathRules(rules=(PathRule(interface="veth0", priority=1), PathRule(kind="ethernet")), exclude=("eth1",)),
    )
)


@settings(max_examples=300, deadline=None)
@given(rules=RULE_SETS, sequence=st.lists(snapshots(), min_size=1, max_size=8))
def test_diffs_replay_to_the_new_set_and_ids_behave(rules: PathRules, sequence: list[MachineSnapshot]) -> None:
    table = PathTable()
    owner: dict[int, tuple[int, str]] = {}  # every id ever handed out -> its interface
    for snapshot in sequence:
        new, diff = table.update(snapshot, rules, 4)
        # A diff applied to the old set yields the new set.
        assert apply_diff(table.paths, diff) == new.paths
        # Deterministic order: priority, then name; one path per interface and per id.
        assert list(new.paths) == sorted(new.paths, key=lambda p: (p.priority, p.ifname))
        assert len({p.path_id for p in new.paths}) == len(new.paths)
        for p in new.paths:
            key = (p.ifindex, p.ifname)
            # Never reused for a different interface within the run.
            assert owner.setdefault(p.path_id, key) == key
        # Stable while the interface exists: an interface keeps the id it had.
        before = {(p.ifindex, p.ifname): p.path_id for p in table.paths}
        for p in new.paths:
            if (p.ifindex, p.ifname) in before:
                assert before[(p.ifindex, p.ifname)] == p.path_id
        assert new.next_id >= table.next_id
        # Every path that went down has a reason, and only usable candidates are up.
        usable = {c.name for c in select_candidates(rules, snapshot)
                  if unusable_reason(snapshot.by_name()[c.name], 4) is None}
        assert {p.ifname for p in new.paths} == usable
        table = new


@settings(max_examples=200, deadline=None)
@given(old=snapshots(), new=snapshots())
def test_events_are_a_pure_function_of_the_inputs(old: MachineSnapshot, new: MachineSnapshot) -> None:
    first, _ = PathTable().update(old, PathRules(), 4)
    a = first.update(new, PathRules(), 4)
    b = attrs.evolve(first).update(new, PathRules(), 4)
    assert a == b


def test_a_path_is_metered_by_its_kind_unless_its_rule_says_otherwise() -> None:
    auto = {c.name: c.metered for c in select_candidates(PathRules(), MachineSnapshot(LAPTOP))}
    assert (auto["eth0"], auto["wlan0"], auto["wwan0"]) == (False, False, True)
    rules = PathRules(rules=(PathRule(interface="wlan0", metered=True), PathRule(kind="lte", metered=False)))
    told = {c.name: c.metered for c in select_candidates(rules, MachineSnapshot(LAPTOP))}
    assert told["wlan0"] is True and told["wwan0"] is False  # a phone's hotspot; an unlimited plan
