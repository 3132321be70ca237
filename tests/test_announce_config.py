"""``[cluster] announce_interface`` checked against the forwarding ``serve`` plans (docs/cluster.md)."""

from __future__ import annotations

import ipaddress

from jvpn_trio.commands.serve import announce_problem
from jvpn_trio.core.mtu import Family
from jvpn_trio.drivers.forwarding import Egress, ForwardingPlan, GatewayTable

SUBNET = ipaddress.IPv4Network("10.66.0.0/24")


def plan(*egress: Egress) -> ForwardingPlan:
    return ForwardingPlan(table=GatewayTable(tun_name="jvgw0", mtu=1420, egress=egress))


def test_no_announce_interface_needs_nothing() -> None:
    assert announce_problem(None, plan()) is None


def test_the_announce_interface_must_be_the_routed_ipv4_egress() -> None:
    routed = Egress(family=Family.IPV4, subnet=SUBNET, ifname="lan0", masquerade=False)
    assert announce_problem("lan0", plan(routed)) is None
    other = announce_problem("lan1", plan(routed))
    assert other is not None and "the IPv4 egress is lan0" in other and "nat_egress = 'lan1'" in other
    none = announce_problem("lan0", plan())
    assert none is not None and "no IPv4 egress" in none
    masqueraded = Egress(family=Family.IPV4, subnet=SUBNET, ifname="lan0", masquerade=True)
    problem = announce_problem("lan0", plan(masqueraded))
    assert problem is not None and "nat = false" in problem
