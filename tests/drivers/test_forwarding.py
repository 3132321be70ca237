"""The gateway's nftables table (drivers/forwarding.py): rendering, and installing in a namespace.

The rendering and planning tests are pure; the sysctl tests write a fake ``/proc/sys`` in
``tmp_path``.  The root tests install the table into a lab's gateway
namespace (``jvpn_trio.lab.netns``, a fresh ``jvt`` prefix, deleted afterwards), never
into the machine's own; the clamp's effect on real TCP is tests/integration/test_mtu_netns.py's.

Determinism: no sleeps; every root test runs under ``trio.fail_after``; the fake ``nft``
records calls instead of timing anything.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from jvpn_trio.core.mtu import Family, tcp_mss
from jvpn_trio.drivers import forwarding
from jvpn_trio.drivers.forwarding import (
    CLAMP_COUNTERS,
    CONFINE_CHAIN,
    FORWARD_CHAIN,
    NAT_CHAIN,
    NAT_COUNTERS,
    TABLE,
    Egress,
    ForwardingError,
    ForwardingPlan,
    GatewayTable,
    Opened,
    find_egress,
    forwarding_plan,
    open_forwarding,
    open_gateway_table,
    open_sysctls,
    plan_forwarding,
    read_counters,
    read_nat_counters,
    remove_gateway_table,
    render,
)
from jvpn_trio.lab.netns import Lab, LabPath, LabSpec, open_lab
from tests.netns import requires_lab, unique_prefix

# -- rendering (pure) --------------------------------------------------------------------------


def test_render_clamps_both_directions_of_both_families_to_the_tunnel_mss() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1420))
    rules = [line.strip() for line in script.splitlines() if "maxseg" in line]
    assert len(rules) == 4
    for family, mss, proto in ((Family.IPV4, 1380, "ipv4"), (Family.IPV6, 1360, "ipv6")):
        assert tcp_mss(1420, family) == mss
        for direction, match in (("from_tunnel", "iifname"), ("to_tunnel", "oifname")):
            counter = CLAMP_COUNTERS[(family, direction)]
            assert (
                f'meta nfproto {proto} {match} "jvgw0" tcp flags & (syn | rst) == syn'
                f' tcp option maxseg size > {mss} counter name "{counter}" tcp option maxseg size set {mss}'
            ) in rules
            assert f"counter {counter} {{}}" in script


def test_render_replaces_the_table_in_one_transaction() -> None:
    lines = render(GatewayTable(tun_name="jvgw0", mtu=1420)).splitlines()
    # Declare (so the delete cannot fail on a clean machine), delete, declare with content.
    assert lines[:3] == [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    assert "    type filter hook forward priority mangle; policy accept;" in lines
    assert sum(line.startswith("table ") for line in lines) == 2  # nothing outside our table


def test_render_leaves_ipv6_out_below_1280() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1200))
    assert "ipv6" not in script and "mss6" not in script
    assert "maxseg size set 1160" in script


@pytest.mark.parametrize(
    ("field", "value"),
    [("tun_name", ""), ("tun_name", "a" * 16), ("tun_name", 'x" accept'), ("tun_name", "a b"),
     ("mtu", 67), ("mtu", 65504), ("mtu", True), ("mtu", "1420")],
)  # fmt: skip
def test_gateway_table_refuses_what_nft_would_misparse(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"tun_name": "jvgw0", "mtu": 1420, field: value}
    with pytest.raises(ValueError):
        GatewayTable(**fields)


# -- the context manager with a fake nft --------------------------------------------------------


@pytest.fixture
def fake_nft(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each nft script instead of running it."""
    calls: list[str] = []

    async def nft(netns: str | None, args: Any, *, stdin: bytes = b"") -> bytes:
        await trio.lowlevel.checkpoint()
        calls.append("remove" if b"delete" in stdin and b"chain" not in stdin else "install")
        return b""

    monkeypatch.setattr(forwarding, "_nft", nft)
    return calls


async def test_the_table_is_removed_when_the_block_is_cancelled(fake_nft: list[str]) -> None:
    with trio.CancelScope() as scope:
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert fake_nft == ["install", "remove"]


async def test_the_table_is_removed_when_the_block_fails(fake_nft: list[str]) -> None:
    with pytest.raises(KeyError):
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            raise KeyError("boom")
    assert fake_nft == ["install", "remove"]


async def test_a_failed_removal_is_raised_on_clean_exit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nft(netns: str | None, args: Any, *, stdin: bytes = b"") -> bytes:
        await trio.lowlevel.checkpoint()
        if b"chain" not in stdin:
            raise ForwardingError("nft -f -: exit 1: refused")
        return b""

    monkeypatch.setattr(forwarding, "_nft", nft)
    with pytest.raises(ForwardingError, match="refused"):
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            pass
    with pytest.raises(KeyError):  # the block's own error is not replaced
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            raise KeyError("boom")


# -- installing, as root, in a lab's gateway namespace -----------------------------------------


@pytest.fixture
async def one_path_lab() -> AsyncIterator[Lab]:
    spec = LabSpec(prefix=unique_prefix(), paths=(LabPath(name="eth0", kind="ethernet", metric=10, index=1),))
    async with open_lab(spec) as built:
        yield built


async def _table(lab: Lab) -> dict[str, Any] | None:
    """Our table in the gateway namespace as nft's JSON, or None if it does not exist."""
    result = await lab.run(lab.gateway_ns, "nft", "-j", "list", "table", "inet", TABLE, check=False)
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _rule_count(listing: dict[str, Any]) -> int:
    return sum(1 for item in listing["nftables"] if "rule" in item)


@requires_lab
async def test_the_table_lives_exactly_as_long_as_its_block(one_path_lab: Lab) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        assert await _table(lab) is None
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420), netns=lab.gateway_ns):
            listing = await _table(lab)
            assert listing is not None and _rule_count(listing) == 4
            counters = await read_counters(netns=lab.gateway_ns)
            assert set(counters.packets) == set(CLAMP_COUNTERS) and counters.total() == 0
        assert await _table(lab) is None
        await remove_gateway_table(netns=lab.gateway_ns)  # idempotent: already gone is fine
        # The table exists only in the namespace it was put in.
        assert (await lab.run(lab.client_ns, "nft", "list", "tables")).stdout.count(TABLE.encode()) == 0


@requires_lab
async def test_a_leftover_table_is_replaced_atomically(one_path_lab: Lab) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        stale = f"table inet {TABLE} {{\n  chain stale {{ }}\n  chain forward {{ type filter hook forward priority 0; }}\n}}\n"
        await lab.run(lab.gateway_ns, "nft", "-f", "-", stdin=stale.encode())
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1300), netns=lab.gateway_ns):
            listing = await _table(lab)
            assert listing is not None
            chains = [item["chain"]["name"] for item in listing["nftables"] if "chain" in item]
            assert chains == ["forward"] and _rule_count(listing) == 4
            text = (await lab.run(lab.gateway_ns, "nft", "list", "table", "inet", TABLE)).stdout.decode()
            assert "maxseg size set 1260" in text and "maxseg size set 1240" in text
        assert await _table(lab) is None


@requires_lab
async def test_a_refused_table_changes_nothing(one_path_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        monkeypatch.setattr(forwarding, "render", lambda table: f"table inet {TABLE} {{ chain forward {{ nonsense; }} }}\n")
        with pytest.raises(ForwardingError, match="nft -f -: exit 1"):
            async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420), netns=lab.gateway_ns):
                pytest.fail("the block must not run")
        assert await _table(lab) is None
        with pytest.raises(ForwardingError):
            await read_counters(netns=lab.gateway_ns)


# -- forwarding and NAT: rendering (pure) -------------------------------------------------------

SUBNET4, SUBNET6 = ipaddress.ip_network("10.66.0.0/24"), ipaddress.ip_network("fd6a:7670::/64")


def _egress(
    family: Family, ifname: str = "eth0", *, masquerade: bool = True, opened: Opened = Opened.NOTHING
) -> Egress:
    subnet = SUBNET4 if family is Family.IPV4 else SUBNET6
    return Egress(family=family, subnet=subnet, ifname=ifname, masquerade=masquerade, opened=opened)


def _chain(script: str, name: str) -> list[str]:
    """The rule lines of chain ``name`` in a rendered script (its type line first)."""
    lines = script.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1 : end]]


def test_render_masquerades_each_familys_tunnel_subnet_out_of_its_egress() -> None:
    table = GatewayTable(tun_name="jvgw0", mtu=1420, egress=(_egress(Family.IPV4), _egress(Family.IPV6, "eth1")))
    script = render(table)
    assert _chain(script, NAT_CHAIN) == [
        "type nat hook postrouting priority srcnat; policy accept;",
        f'oifname "eth0" ip saddr 10.66.0.0/24 counter name "{NAT_COUNTERS[Family.IPV4]}" masquerade',
        f'oifname "eth1" ip6 saddr fd6a:7670::/64 counter name "{NAT_COUNTERS[Family.IPV6]}" masquerade',
    ]
    assert "counter nat4 {}" in script and "counter nat6 {}" in script
    assert sum(line.startswith("table ") for line in script.splitlines()) == 2  # still only our table


def test_render_confines_forwarding_to_tunnel_and_egress() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1420, egress=(_egress(Family.IPV4),)))
    assert _chain(script, CONFINE_CHAIN) == [
        "type filter hook forward priority filter; policy accept;",
        'meta nfproto ipv4 iifname "jvgw0" oifname != "eth0" counter drop',
        'meta nfproto ipv4 oifname "jvgw0" iifname != "eth0" counter drop',
        'meta nfproto ipv4 iifname "eth0" oifname "jvgw0" ct state != { established, related } counter drop',
    ]
    # The confine chain only drops: an accept there could not override the host's firewall anyway.
    assert not any(rule.endswith("accept") for rule in _chain(script, CONFINE_CHAIN)[1:])


def test_render_shuts_again_what_serve_opened() -> None:
    table = GatewayTable(
        tun_name="jvgw0",
        mtu=1420,
        egress=(_egress(Family.IPV4, opened=Opened.EGRESS), _egress(Family.IPV6, opened=Opened.HOST)),
    )
    rules = _chain(render(table), CONFINE_CHAIN)
    assert 'meta nfproto ipv4 iifname "eth0" oifname != "jvgw0" counter drop' in rules
    assert 'meta nfproto ipv6 iifname != "jvgw0" oifname != "jvgw0" counter drop' in rules
    assert len(rules) == 1 + 2 * 3 + 2


def test_render_without_nat_forwards_but_masquerades_nothing() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1420, egress=(_egress(Family.IPV4, masquerade=False),)))
    assert f"chain {NAT_CHAIN}" not in script and "masquerade" not in script and "nat4" not in script
    assert len(_chain(script, CONFINE_CHAIN)) == 4


def test_render_without_egress_is_the_clamp_alone() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1420))
    assert CONFINE_CHAIN not in script and NAT_CHAIN not in script


@pytest.mark.parametrize(
    "make",
    [
        # the family and the subnet disagree
        lambda: Egress(family=Family.IPV4, subnet=SUBNET6, ifname="eth0", masquerade=True),
        lambda: _egress(Family.IPV4, 'eth0" accept'),
        lambda: GatewayTable(tun_name="jvgw0", mtu=1420, egress=(_egress(Family.IPV4), _egress(Family.IPV4, "eth1"))),
        lambda: GatewayTable(tun_name="jvgw0", mtu=1420, egress=(_egress(Family.IPV4, "jvgw0"),)),
    ],
)
def test_egress_refuses_what_would_make_a_wrong_table(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# -- forwarding and NAT: the plan (pure) --------------------------------------------------------

OFF = {
    "net/ipv4/conf/jvgw0/forwarding": "0",
    "net/ipv4/conf/eth0/forwarding": "0",
    "net/ipv6/conf/all/forwarding": "0",
    "net/ipv6/conf/default/forwarding": "0",
    "net/ipv6/conf/eth0/forwarding": "0",
    "net/ipv6/conf/jvgw0/forwarding": "0",
    "net/ipv6/conf/lo/forwarding": "0",
    "net/ipv6/conf/eth0/accept_ra": "1",
}
BOTH = {Family.IPV4: SUBNET4, Family.IPV6: SUBNET6}


def _plan(sysctls: dict[str, str], **kwargs: Any) -> ForwardingPlan:
    arguments: dict[str, Any] = {
        "tun_name": "jvgw0", "mtu": 1420, "subnets": BOTH, "egress": {f: "eth0" for f in Family}, "masquerade": True,
        "sysctls": sysctls, **kwargs,
    }  # fmt: skip
    return forwarding_plan(**arguments)


def test_a_host_that_did_not_forward_gets_forwarding_for_the_tunnel_only() -> None:
    plan = _plan(OFF)
    assert [(e.family, e.ifname, e.opened) for e in plan.table.egress] == [
        (Family.IPV4, "eth0", Opened.EGRESS),
        (Family.IPV6, "eth0", Opened.HOST),
    ]
    written = [(c.key, c.before, c.after) for c in plan.sysctls if c.after is not None]
    assert written == [
        ("net/ipv4/conf/jvgw0/forwarding", "0", "1"),  # IPv4 per interface: the TUN and the egress only
        ("net/ipv4/conf/eth0/forwarding", "0", "1"),
        ("net/ipv6/conf/all/forwarding", "0", "1"),  # IPv6 forwards by "all" alone
        ("net/ipv6/conf/eth0/accept_ra", "1", "2"),  # so that the egress keeps its SLAAC default route
    ]
    # "all" switches every interface's IPv6 forwarding (and "default"): each is put back, after "all".
    restored = [c.key for c in plan.sysctls if c.after is None]
    ipv6 = [k for k in OFF if k.startswith("net/ipv6/conf/") and k.endswith("/forwarding")]
    assert restored == sorted(k for k in ipv6 if "/all/" not in k)
    assert [c.key for c in plan.sysctls].index("net/ipv6/conf/all/forwarding") < len(written)


def test_a_host_that_forwarded_already_is_changed_in_nothing_but_the_tun() -> None:
    on = {k: ("1" if k.endswith("forwarding") else v) for k, v in OFF.items()} | {"net/ipv4/conf/jvgw0/forwarding": "0"}
    plan = _plan(on)
    assert [e.opened for e in plan.table.egress] == [Opened.NOTHING, Opened.NOTHING]
    assert [(c.key, c.after) for c in plan.sysctls] == [("net/ipv4/conf/jvgw0/forwarding", "1")]


def test_only_the_families_with_a_tunnel_subnet_and_an_egress_are_forwarded() -> None:
    plan = _plan(OFF, subnets={Family.IPV4: SUBNET4})
    assert [e.family for e in plan.table.egress] == [Family.IPV4]
    assert not any("ipv6" in c.key for c in plan.sysctls)
    plan = _plan(OFF, egress={Family.IPV6: "eth0"})
    assert [e.family for e in plan.table.egress] == [Family.IPV6]
    assert not any("ipv4" in c.key for c in plan.sysctls)


def test_nat_off_still_forwards() -> None:
    plan = _plan(OFF, masquerade=False)
    assert [e.masquerade for e in plan.table.egress] == [False, False]
    assert any(c.after == "1" for c in plan.sysctls)


def test_an_egress_that_accepts_ras_always_or_never_is_left_as_it_is() -> None:
    for value in ("0", "2"):
        plan = _plan(OFF | {"net/ipv6/conf/eth0/accept_ra": value})
        assert not any(c.key.endswith("accept_ra") for c in plan.sysctls)


# -- forwarding and NAT: the sysctls, on a fake /proc/sys -----------------------------------------


def _fake_proc(root: Path, values: dict[str, str]) -> None:
    for key, value in values.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(value + "\n")


def _read_proc(root: Path, keys: Any) -> dict[str, str]:
    return {k: (root / k).read_text().strip() for k in keys if (root / k).exists()}


async def test_plan_forwarding_reads_the_host_and_the_sysctls_come_back_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_nft: list[str]
) -> None:
    _fake_proc(tmp_path, OFF)

    async def egress(
        named: str | None, families: Any, *, netns: str | None = None
    ) -> tuple[dict[Family, str], list[str]]:
        await trio.lowlevel.checkpoint()
        return {Family.IPV4: "eth0"}, ["no IPv6 default route with one interface: ..."]

    monkeypatch.setattr(forwarding, "find_egress", egress)
    plan = await plan_forwarding(tun_name="jvgw0", mtu=1420, subnets=BOTH, nat=True, nat_egress=None, proc_sys=tmp_path)
    assert [e.family for e in plan.table.egress] == [Family.IPV4] and len(plan.notes) == 1
    async with open_forwarding(plan, proc_sys=tmp_path):
        during = _read_proc(tmp_path, OFF)
        # The TUN goes away before the restore (serve deletes it on the way out): nothing to restore there.
        (tmp_path / "net/ipv4/conf/jvgw0/forwarding").unlink()
    assert fake_nft == ["install", "remove"]
    assert during["net/ipv4/conf/jvgw0/forwarding"] == during["net/ipv4/conf/eth0/forwarding"] == "1"
    assert during["net/ipv6/conf/all/forwarding"] == "0"  # IPv6 not forwarded: untouched
    assert _read_proc(tmp_path, OFF) == {k: v for k, v in OFF.items() if k != "net/ipv4/conf/jvgw0/forwarding"}


async def test_restoring_writes_all_first_then_what_it_reset(tmp_path: Path) -> None:
    """As the kernel does: writing ipv6 "all" resets every interface, so the interfaces come after it."""
    lo_on = OFF | {"net/ipv6/conf/lo/forwarding": "1"}  # one interface forwarded on its own
    _fake_proc(tmp_path, lo_on)
    plan = _plan(lo_on, subnets={Family.IPV6: SUBNET6}, egress={Family.IPV6: "eth0"})
    writes: list[tuple[str, str]] = []
    real = forwarding._write_sysctl

    def spy(root: Path, key: str, value: str) -> None:
        writes.append((key, value))
        real(root, key, value)
        if key == "net/ipv6/conf/all/forwarding":  # the kernel's side effect
            for path in (root / "net/ipv6/conf").glob("*/forwarding"):
                path.write_text(value + "\n")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(forwarding, "_write_sysctl", spy)
        async with open_sysctls(plan.sysctls, proc_sys=tmp_path):
            assert (tmp_path / "net/ipv6/conf/eth0/forwarding").read_text().strip() == "1"
    assert writes[0] == ("net/ipv6/conf/all/forwarding", "1")
    assert ("net/ipv6/conf/all/forwarding", "0") in writes and writes[-1] == ("net/ipv6/conf/lo/forwarding", "1")
    assert _read_proc(tmp_path, OFF) == lo_on


async def test_a_refused_sysctl_is_one_line_and_the_rest_is_restored(tmp_path: Path) -> None:
    _fake_proc(tmp_path, OFF)
    plan = _plan(OFF, subnets={Family.IPV4: SUBNET4})
    (tmp_path / "net/ipv4/conf/eth0/forwarding").unlink()
    (tmp_path / "net/ipv4/conf/eth0/forwarding").mkdir()  # cannot be written
    with pytest.raises(ForwardingError, match="cannot write .*eth0/forwarding") as info:
        async with open_sysctls(plan.sysctls, proc_sys=tmp_path):
            pytest.fail("the block must not run")
    assert "\n" not in str(info.value)
    assert (tmp_path / "net/ipv4/conf/jvgw0/forwarding").read_text().strip() == "0"


# -- forwarding and NAT: as root, in a lab's gateway namespace -----------------------------------


@requires_lab
async def test_the_full_table_installs_and_goes(one_path_lab: Lab) -> None:
    lab = one_path_lab
    table = GatewayTable(
        tun_name="jvgw0",
        mtu=1420,
        egress=(
            _egress(Family.IPV4, "gw-eth0", opened=Opened.EGRESS),
            _egress(Family.IPV6, "gw-eth0", opened=Opened.HOST),
        ),
    )
    with trio.fail_after(30):
        async with open_gateway_table(table, netns=lab.gateway_ns):
            listing = await _table(lab)
            assert listing is not None
            chains = {item["chain"]["name"] for item in listing["nftables"] if "chain" in item}
            assert chains == {FORWARD_CHAIN, CONFINE_CHAIN, NAT_CHAIN}
            assert await read_nat_counters(netns=lab.gateway_ns) == {Family.IPV4: 0, Family.IPV6: 0}
        assert await _table(lab) is None


@requires_lab
async def test_the_egress_is_named_or_found_from_the_default_route(one_path_lab: Lab) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        with pytest.raises(ForwardingError, match="egress interface 'nosuch0' does not exist"):
            await find_egress("nosuch0", list(Family), netns=lab.gateway_ns)
        assert await find_egress("gw-eth0", list(Family), netns=lab.gateway_ns) == ({f: "gw-eth0" for f in Family}, [])
        found, notes = await find_egress(None, list(Family), netns=lab.gateway_ns)  # the lab's gateway has none
        assert found == {} and len(notes) == 2 and "set [gateway].nat_egress" in notes[0]
        await lab.run(lab.gateway_ns, "ip", "route", "add", "default", "via", "10.77.1.2", "dev", "gw-eth0")
        found, notes = await find_egress(None, list(Family), netns=lab.gateway_ns)
        assert found == {Family.IPV4: "gw-eth0"} and len(notes) == 1 and "IPv6" in notes[0]
