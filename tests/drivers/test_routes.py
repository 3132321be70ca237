"""Tests for drivers/routes.py: values and plan checks (no root), and the real kernel (root).

The root tests use a lab built with the shared ``jvpn_trio.lab.netns`` (namespaces
``jvnl<random>-cli``/``-gw``, deleted on any exit) plus a pytun TUN moved into the client::

    client ns                                       gateway ns
      eth0  10.77.1.2/24  ---- veth ----  gw-eth0  10.77.1.1/24
      wifi0 10.77.2.2/24  ---- veth ----  gw-wifi0 10.77.2.1/24
      lte0  10.77.3.2/24  ---- veth ----  gw-lte0  10.77.3.1/24
      jvnl<hex>t 10.200.0.2/24 (TUN)      lo 10.99.0.1/32 (the VPN gateway's address)
      default via 10.77.i.1 dev <path> metric 10/20/30

Routing decisions are checked with ``ip -j -n <client> route get`` only: no packet is sent,
and 203.0.113.7 (TEST-NET-3) stands for "somewhere on the internet".  Every I/O test runs
under ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import secrets
import socket
from typing import Any, AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from pyroute2 import NetlinkError

from jvpn_trio.drivers import routes
from jvpn_trio.drivers.log import LineLimiter
from jvpn_trio.drivers.routes import (
    PATH_RULE_PRIORITY,
    SUPPRESS_RULE_PRIORITY,
    TUNNEL_RULE_PRIORITY,
    InstalledRoutes,
    PathRoute,
    RouteEntry,
    RouteError,
    RoutingStatistics,
    RuleEntry,
    TunAddress,
    TunnelRoutes,
    _delete_all,
    _rule_args,
    check_routing_plan,
    install_path_route,
    install_tunnel_routes,
    open_routing,
    remove_path_route,
    remove_tunnel_routes,
    set_tun_address,
)
from jvpn_trio.lab.netns import Lab, LabSpec, open_lab
from tests.netns import requires_lab

IO_TIMEOUT_S = 10.0
INTERNET = "203.0.113.7"
TUN_TABLE = 51820

# -- values and plan checks (pure) -------------------------------------------------------------


def test_tunnel_routes_normalises_prefixes() -> None:
    tr = TunnelRoutes("jvpn0", ["0.0.0.0/0", "10.8.0.0/16"], 51820)
    assert tr.prefixes == ("0.0.0.0/0", "10.8.0.0/16")
    assert tr.full_tunnel
    assert not TunnelRoutes("jvpn0", ["10.8.0.0/16"], 51820).full_tunnel


@pytest.mark.parametrize("bad", [["10.8.0.1/16"], ["10.8.0.0/33"], ["fd00::1/8"], ["::/129"], "0.0.0.0/0"])
def test_tunnel_routes_rejects_bad_prefixes(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        TunnelRoutes("jvpn0", bad, 51820)


@pytest.mark.parametrize("table", [0, 253, 254, 255, -1, 2**32])
def test_reserved_tables_are_rejected(table: int) -> None:
    with pytest.raises(ValueError, match="table"):
        PathRoute("eth0", table, 0x101)
    with pytest.raises(ValueError, match="table"):
        TunnelRoutes("jvpn0", ["0.0.0.0/0"], table)


@pytest.mark.parametrize("mark", [0, 2**32])
def test_path_marks_must_be_usable(mark: int) -> None:
    with pytest.raises(ValueError, match="fwmark"):
        PathRoute("eth0", 101, mark)


def test_path_gateway_must_be_an_ip_address() -> None:
    assert PathRoute("eth0", 101, 0x101, gateway="fe80::1").gateway == "fe80::1"  # an IPv6 next hop
    with pytest.raises(ValueError):
        PathRoute("eth0", 101, 0x101, gateway="router.lan")


# -- IPv6: what the tunnel and path routes render to (pure) -------------------------------------

AF4, AF6 = socket.AF_INET, socket.AF_INET6


def rendered(prefixes: list[str]) -> tuple[set[tuple[str, int, int]], set[str], set[tuple[int, int, int]]]:
    """``_tunnel_entries`` as (tunnel-table defaults (dst, type, oif), main prefixes, rules (family, priority, table))."""
    defaults, mains, rules = routes._tunnel_entries(TunnelRoutes("jvpn0", prefixes, 51820), oif=7)
    assert all(r.table == 51820 for r in defaults) and all(r.table == routes.MAIN_TABLE and r.oif == 7 for r in mains)
    return (
        {(r.dst, r.type, r.oif) for r in defaults},
        {r.dst for r in mains},
        {(r.family, r.priority, r.table) for r in rules},
    )


def policy_rules(*families: int) -> set[tuple[int, int, int]]:
    return {(f, p, t) for f in families for p, t in ((SUPPRESS_RULE_PRIORITY, 254), (TUNNEL_RULE_PRIORITY, 51820))}


UNICAST, UNREACHABLE = 1, 7


def test_both_default_routes_go_into_the_tun_in_both_families() -> None:
    defaults, mains, rules = rendered(["0.0.0.0/0", "::/0", "fd00:1::/64"])
    assert defaults == {("0.0.0.0/0", UNICAST, 7), ("::/0", UNICAST, 7)}
    assert mains == {"fd00:1::/64"}
    assert rules == policy_rules(AF4, AF6)


def test_an_ipv4_full_tunnel_blocks_ipv6_in_the_tunnel_table() -> None:
    defaults, mains, rules = rendered(["0.0.0.0/0", "10.8.0.0/16"])
    assert defaults == {("0.0.0.0/0", UNICAST, 7), ("::/0", UNREACHABLE, 0)}
    assert mains == {"10.8.0.0/16"}
    assert rules == policy_rules(AF4, AF6)


def test_an_ipv6_full_tunnel_blocks_ipv4_in_the_tunnel_table() -> None:
    defaults, _, rules = rendered(["::/0"])
    assert defaults == {("::/0", UNICAST, 7), ("0.0.0.0/0", UNREACHABLE, 0)}
    assert rules == policy_rules(AF4, AF6)


def test_a_split_tunnel_of_both_families_has_no_rules_and_blocks_nothing() -> None:
    defaults, mains, rules = rendered(["10.8.0.0/16", "2001:db8:5::/48"])
    assert (defaults, rules) == (set(), set())
    assert mains == {"10.8.0.0/16", "2001:db8:5::/48"}
    assert not TunnelRoutes("jvpn0", ["2001:db8:5::/48"], 51820).full_tunnel


def test_route_and_rule_arguments_carry_their_family() -> None:
    blocked = routes._route_args(RouteEntry(table=51820, dst="::/0", oif=0, type=UNREACHABLE))
    assert (blocked["family"], blocked["dst"], blocked["dst_len"], blocked["type"]) == (AF6, "::", 0, UNREACHABLE)
    assert "oif" not in blocked
    tun = routes._route_args(RouteEntry(table=51820, dst="::/0", oif=7))
    assert (tun["family"], tun["oif"], tun["scope"]) == (AF6, 7, 253)
    rule = _rule_args(RuleEntry(priority=TUNNEL_RULE_PRIORITY, table=9, fwmark=0x100, fwmask=0xF00, invert=True, family=AF6))
    assert rule["family"] == AF6 and rule["flags"] == 0x2
    assert _rule_args(RuleEntry(priority=SUPPRESS_RULE_PRIORITY, table=254, suppress_prefixlen=0))["family"] == AF4


def test_a_path_to_an_ipv6_gateway_routes_its_128_in_ipv6() -> None:
    route, last_resort, rule = routes._path_entries(PathRoute("eth0", 101, 0x101, gateway="fd77:4d:1::1"), 5, "fd99::1")
    assert (route.dst, route.gateway, route.oif, route.family) == ("fd99::1/128", "fd77:4d:1::1", 5, AF6)
    assert (last_resort.dst, last_resort.type) == ("::/0", UNREACHABLE)
    assert (rule.family, rule.fwmark, rule.table) == (AF6, 0x101, 101)
    route4, last4, rule4 = routes._path_entries(PathRoute("eth0", 101, 0x101), 5, "10.99.0.1")
    assert (route4.dst, last4.dst, rule4.family) == ("10.99.0.1/32", "0.0.0.0/0", AF4)


def test_plan_rejects_marks_outside_the_bypass() -> None:
    tunnel = TunnelRoutes("jvpn0", ["0.0.0.0/0"], 51820)
    check_routing_plan(tunnel, [PathRoute("eth0", 101, 0x101), PathRoute("wlan0", 102, 0x1FF)])
    with pytest.raises(ValueError, match="could enter the tunnel"):
        check_routing_plan(tunnel, [PathRoute("eth0", 101, 0x201)])
    # Split tunnel: no catch-all rule, so any mark is fine.
    check_routing_plan(attrs.evolve(tunnel, prefixes=("10.0.0.0/8",)), [PathRoute("eth0", 101, 0x201)])


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ([PathRoute("eth0", 101, 0x101), PathRoute("wlan0", 101, 0x102)], "share a table"),
        ([PathRoute("eth0", 101, 0x101), PathRoute("wlan0", 102, 0x101)], "share a fwmark"),
        ([PathRoute("eth0", 101, 0x101), PathRoute("eth0", 102, 0x102)], "share a ifname"),
        ([PathRoute("eth0", 51820, 0x101)], "tunnel's table"),
        ([PathRoute("jvpn0", 101, 0x101)], "tunnel's own interface"),
    ],
)
def test_plan_rejects_overlaps(paths: list[PathRoute], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_routing_plan(TunnelRoutes("jvpn0", ["0.0.0.0/0"], 51820), paths)


def test_rule_arguments_use_pyroute2_spelling() -> None:
    # pyroute2 drops unknown keywords silently: "suppress_prefixlength" would add a plain
    # "lookup main" rule, which sends everything out of main's default route.
    args = _rule_args(RuleEntry(priority=SUPPRESS_RULE_PRIORITY, table=254, suppress_prefixlen=0))
    assert args["suppress_prefixlen"] == 0 and "suppress_prefixlength" not in args
    inverted = _rule_args(RuleEntry(priority=TUNNEL_RULE_PRIORITY, table=9, fwmark=0x100, fwmask=0xF00, invert=True))
    assert inverted["fwmark"] == 0x100 and inverted["fwmask"] == 0xF00 and inverted["flags"] == 0x2


class FakeIPRoute:
    """Deletes fail with the scripted errno per table (0: success)."""

    def __init__(self, codes: dict[int, int]) -> None:
        self.codes = codes
        self.calls: list[tuple[str, int]] = []

    def _do(self, what: str, table: int) -> None:
        self.calls.append((what, table))
        code = self.codes.get(table, 0)
        if code:
            raise NetlinkError(code)

    def rule(self, command: str, **kw: Any) -> None:
        self._do("rule", kw["table"])

    def route(self, command: str, **kw: Any) -> None:
        self._do("route", kw["table"])


def test_delete_treats_gone_as_done_and_reports_the_rest_after_trying_all() -> None:
    ipr = FakeIPRoute({1: errno.ESRCH, 2: errno.ENOENT, 3: errno.EPERM, 4: 0, 5: errno.EINVAL})
    routes = [RouteEntry(table=t, dst="10.0.0.0/8", oif=7) for t in (1, 3, 4)]
    rules = [RuleEntry(priority=PATH_RULE_PRIORITY, table=t) for t in (2, 5)]
    failures = _delete_all(ipr, routes, rules)
    assert ipr.calls == [("rule", 2), ("rule", 5), ("route", 1), ("route", 3), ("route", 4)]
    assert [f.errno for f in failures] == [errno.EINVAL, errno.EPERM]
    assert all(isinstance(f, RouteError) for f in failures)


# -- open_routing's exit paths, with the kernel faked out -------------------------------------


@pytest.fixture
def fake_install(monkeypatch: pytest.MonkeyPatch) -> None:
    async def install_path(pr: PathRoute, *, gateway_address: str | None, netns: str | None = None) -> PathRoute:
        return pr

    async def install_tunnel(tr: TunnelRoutes, *, netns: str | None = None) -> InstalledRoutes:
        return InstalledRoutes()

    monkeypatch.setattr(routes, "install_path_route", install_path)
    monkeypatch.setattr(routes, "install_tunnel_routes", install_tunnel)


def plan() -> dict[str, Any]:
    return {
        "tunnel": TunnelRoutes("jvpn0", ["0.0.0.0/0"], TUN_TABLE),
        "paths": [PathRoute("eth0", 101, 0x101)],
        "gateway_address": "10.99.0.1",
    }


@pytest.mark.usefixtures("fake_install")
async def test_cleanup_failure_is_raised_on_clean_exit_and_noted_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_run(netns: str | None, fn: Any, *, abandon_on_cancel: bool = False) -> None:
        raise RouteError("refused", errno.EPERM)

    monkeypatch.setattr(routes, "_run", failing_run)
    with pytest.raises(RouteError, match="refused"):
        async with open_routing(**plan()):
            pass
    with pytest.raises(KeyError) as info:
        async with open_routing(**plan()):
            raise KeyError("the block's own error wins")
    assert any("route cleanup failed too: refused" in note for note in info.value.__notes__)


@pytest.mark.usefixtures("fake_install")
async def test_cleanup_is_bounded_and_shielded(monkeypatch: pytest.MonkeyPatch, autojump_clock: Any) -> None:
    async def stuck_run(netns: str | None, fn: Any, *, abandon_on_cancel: bool = False) -> None:
        assert abandon_on_cancel  # a stuck worker thread must not hold the exit hostage
        await trio.sleep_forever()

    monkeypatch.setattr(routes, "_run", stuck_run)
    start = trio.current_time()
    with trio.CancelScope() as scope:
        with pytest.raises(RouteError, match="longer than") as info:
            async with open_routing(**plan()):
                pass
        assert info.value.errno == errno.ETIMEDOUT
        assert trio.current_time() - start == routes.CLEANUP_TIMEOUT_S
        # Cancelled from outside: cleanup still gets its full, shielded time.
        async with open_routing(**plan()):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - start == 2 * routes.CLEANUP_TIMEOUT_S


async def test_invalid_plan_fails_before_touching_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_kernel(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not be reached")  # pragma: no cover

    monkeypatch.setattr(routes, "_run", no_kernel)
    with pytest.raises(ValueError, match="could enter the tunnel"):
        async with open_routing(**{**plan(), "paths": [PathRoute("eth0", 101, 0x201)]}):
            pass  # pragma: no cover


# -- the lifecycle up uses: deferred tunnel routes, best effort, counted and rate-limited lines --


def test_line_limiter_holds_back_repeats_per_key_within_the_interval() -> None:
    limiter = LineLimiter(10.0)
    wifi, lte = ("wlan0", "install"), ("lte0", "install")
    assert limiter.admit(wifi, 0.0) == 0
    assert limiter.admit(lte, 1.0) == 0  # another path: its own interval
    assert limiter.admit(wifi, 5.0) is None
    assert limiter.admit(wifi, 9.999) is None
    assert limiter.admit(("wlan0", "remove"), 9.999) == 0  # another kind: its own interval
    assert limiter.admit(wifi, 10.0) == 2  # the line says how many were held back
    assert limiter.admit(wifi, 19.0) is None
    assert limiter.suppressed == 3


@pytest.fixture
def no_kernel_removal(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Removals succeed without a kernel; returns the functions run for them."""
    calls: list[Any] = []

    async def run(netns: str | None, fn: Any, *, abandon_on_cancel: bool = False) -> None:
        calls.append(fn)

    monkeypatch.setattr(routes, "_run", run)
    return calls


@pytest.mark.usefixtures("fake_install")
async def test_deferred_tunnel_routes_live_for_their_block(no_kernel_removal: list[Any]) -> None:
    async with open_routing(**plan(), defer_tunnel=True) as routing:
        assert routing.tunnel is None
        async with routing.open_tunnel_routes() as installed:
            assert routing.tunnel is installed
            with pytest.raises(RuntimeError):
                async with routing.open_tunnel_routes():
                    pass  # pragma: no cover
        assert routing.tunnel is None
        assert len(no_kernel_removal) == 1  # the tunnel's removal, before the TUN goes
    assert len(no_kernel_removal) == 2
    async with open_routing(**{**plan(), "tunnel": None}) as routing:
        with pytest.raises(RuntimeError):
            async with routing.open_tunnel_routes():
                pass  # pragma: no cover


async def test_best_effort_paths_are_counted_logged_rate_limited_and_left_to_probing(
    monkeypatch: pytest.MonkeyPatch, no_kernel_removal: list[Any], autojump_clock: Any
) -> None:
    routable = {"eth0"}

    async def install_path(pr: PathRoute, *, gateway_address: str | None, netns: str | None = None) -> PathRoute:
        if pr.ifname not in routable:
            raise RouteError("netlink: (100, 'Network is down')", errno.ENETDOWN)
        return attrs.evolve(pr, gateway="10.77.2.1") if pr.ifname == "wlan0" else pr

    monkeypatch.setattr(routes, "install_path_route", install_path)
    lines: list[str] = []
    paths = [PathRoute("eth0", 101, 0x101), PathRoute("wlan0", 102, 0x102)]
    async with open_routing(
        tunnel=None, paths=paths, gateway_address="10.99.0.1", best_effort=True, log=lines.append
    ) as routing:
        assert set(routing.paths) == {"eth0", "wlan0"}  # kept: re-installed when its link comes up
        assert lines == ["path wlan0 not routable yet (netlink: (100, 'Network is down')); probing will tell"]
        await trio.sleep(1.0)
        assert await routing.reinstall_path("wlan0") is None
        assert len(lines) == 1  # within ROUTE_LOG_INTERVAL_S: counted, not printed
        await trio.sleep(routes.ROUTE_LOG_INTERVAL_S)
        assert await routing.reinstall_path("wlan0") is None
        assert lines[-1].endswith("probing will tell (1 more like it not shown)")
        assert routing.statistics() == RoutingStatistics(install_failed={"wlan0": 3}, lines_suppressed=1)
        routable.add("wlan0")
        installed = await routing.reinstall_path("wlan0")
        assert installed is not None and installed.gateway == "10.77.2.1"
        assert routing.paths["wlan0"] == installed
        with pytest.raises(KeyError):
            await routing.reinstall_path("lte0")
    assert len(lines) == 2 and len(no_kernel_removal) == 1


async def test_strict_reinstall_raises(monkeypatch: pytest.MonkeyPatch, no_kernel_removal: list[Any]) -> None:
    calls = 0

    async def install_path(pr: PathRoute, *, gateway_address: str | None, netns: str | None = None) -> PathRoute:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RouteError("refused", errno.ENETUNREACH)
        return pr

    monkeypatch.setattr(routes, "install_path_route", install_path)
    async with open_routing(**{**plan(), "tunnel": None}) as routing:
        with pytest.raises(RouteError, match="refused"):
            await routing.reinstall_path("eth0")
        assert routing.statistics().install_failed == {"eth0": 1}


@pytest.mark.usefixtures("fake_install")
async def test_best_effort_removal_failures_are_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: Any
) -> None:
    async def stuck_run(netns: str | None, fn: Any, *, abandon_on_cancel: bool = False) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(routes, "_run", stuck_run)
    lines: list[str] = []
    start = trio.current_time()
    async with open_routing(**plan(), defer_tunnel=True, best_effort=True, log=lines.append) as routing:
        async with routing.open_tunnel_routes():
            pass
        assert trio.current_time() - start == routes.CLEANUP_TIMEOUT_S
        assert lines == [f"could not remove the tunnel routes: removing routes took longer than {routes.CLEANUP_TIMEOUT_S} s"]
    assert trio.current_time() - start == 2 * routes.CLEANUP_TIMEOUT_S
    assert lines[1].startswith("could not remove the path and tunnel routes: ")
    assert routing.statistics().remove_failed == 2


# -- the lab (root) ---------------------------------------------------------------------------


@attrs.frozen
class TunLab:
    lab: Lab
    tun: str

    @property
    def ns(self) -> str:
        return self.lab.client_ns

    @property
    def gateway(self) -> str:
        return self.lab.gateway_address


def _open_tun(name: str) -> Any:
    import pytun  # only the root tests need it

    return pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)


@pytest.fixture
async def tun_lab() -> AsyncIterator[TunLab]:
    prefix = f"jvnl{secrets.token_hex(3)}"
    async with open_lab(LabSpec(prefix=prefix)) as lab:
        name = f"{prefix}t"
        # pytun creates the TUN in our own namespace; move it (the fd keeps working).
        # Closing the fd deletes the (non-persistent) device wherever it is.
        tun = await trio.to_thread.run_sync(_open_tun, name)
        try:
            await trio.run_process(["ip", "link", "set", name, "netns", lab.client_ns], capture_stderr=True)
            yield TunLab(lab, name)
        finally:
            tun.close()


async def ip_json(ns: str, *args: str) -> Any:
    done = await trio.run_process(["ip", "-j", "-n", ns, *args], capture_stdout=True, capture_stderr=True)
    return json.loads(done.stdout or b"[]")


async def route_get(ns: str, dst: str, *extra: str) -> dict[str, Any]:
    (route,) = await ip_json(ns, "route", "get", dst, *extra)
    return dict(route)


async def route_get_error(ns: str, dst: str, *extra: str) -> str:
    """``ip route get`` that must fail: its error message."""
    done = await trio.run_process(
        ["ip", "-n", ns, "route", "get", dst, *extra], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode != 0, done.stdout
    return done.stderr.decode()


async def snapshot(ns: str) -> tuple[str, str]:
    """``ip rule`` and ``ip route show table all``, to compare before and after.

    Without the kernel's routes for IPv6 link-local addresses: it adds one when an interface's
    address finishes duplicate address detection, which on a loaded machine can land between
    the two snapshots (seen in CI, 2026-12-03); nothing of ours makes or removes them.
    """
    rules = await trio.run_process(["ip", "-n", ns, "rule"], capture_stdout=True)
    routes = await trio.run_process(["ip", "-n", ns, "route", "show", "table", "all"], capture_stdout=True)
    lines = routes.stdout.decode().splitlines(keepends=True)
    return rules.stdout.decode(), "".join(line for line in lines if not line.startswith("local fe80::"))


PATHS = [PathRoute("eth0", 101, 0x101), PathRoute("wifi0", 102, 0x102), PathRoute("lte0", 103, 0x103)]
HOPS = {"eth0": "10.77.1.1", "wifi0": "10.77.2.1", "lte0": "10.77.3.1"}


async def setup_tun(t: TunLab) -> None:
    await set_tun_address(t.tun, "10.200.0.2", 24, 1400, netns=t.ns)


def full_tunnel(t: TunLab) -> TunnelRoutes:
    return TunnelRoutes(t.tun, ["0.0.0.0/0"], TUN_TABLE)


@requires_lab
async def test_set_tun_address_is_idempotent(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        await setup_tun(t)
        (link,) = await ip_json(t.ns, "address", "show", "dev", t.tun)
        assert link["mtu"] == 1400
        assert "UP" in link["flags"]
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
            ("10.200.0.2", 24)
        ]
        with pytest.raises(RouteError) as info:
            await set_tun_address(f"{t.tun}x", "10.200.0.2", 24, 1400, netns=t.ns)
        assert info.value.errno == errno.ENODEV


@requires_lab
async def test_tun_address_replaces_the_previous_address_and_logs_refusals(tun_lab: TunLab) -> None:
    t = tun_lab
    lines: list[str] = []
    with trio.fail_after(IO_TIMEOUT_S):
        set_address = TunAddress(t.tun, mtu=1400, netns=t.ns, log=lines.append)
        for address in ("10.200.0.2/24", "10.200.0.2/24", "10.201.0.9/16"):
            await set_address(ipaddress.IPv4Interface(address))
        (link,) = await ip_json(t.ns, "address", "show", "dev", t.tun)
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
            ("10.201.0.9", 16)
        ]
        assert set_address.current == ipaddress.IPv4Interface("10.201.0.9/16") and lines == []
        missing = TunAddress(f"{t.tun}x", mtu=1400, netns=t.ns, log=lines.append)
        await missing(ipaddress.IPv4Interface("10.200.0.2/24"))  # logged and counted, never raised
        assert missing.failures == 1 and missing.current is None and len(lines) == 1


@requires_lab
async def test_a_path_added_later_uses_the_given_next_hop_or_none_and_is_removed(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_routing(tunnel=None, paths=(), gateway_address=t.gateway, netns=t.ns) as routing:
            eth = PathRoute.given("eth0", table=101, fwmark=0x101, next_hop=HOPS["eth0"])
            await routing.add_path(eth)
            route = await route_get(t.ns, t.gateway, "mark", hex(eth.fwmark))
            assert (route["dev"], route.get("gateway")) == ("eth0", HOPS["eth0"])
            on_link = PathRoute.given("eth0", table=101, fwmark=0x101, next_hop=None)
            assert await routing.add_path(on_link) == on_link  # not looked up: on-link as given
            route = await route_get(t.ns, t.gateway, "mark", hex(eth.fwmark))
            assert (route["dev"], route.get("gateway")) == ("eth0", None)
            assert await routing.remove_path("eth0") and not await routing.remove_path("eth0")
            assert routing.paths == {}
            assert "101" not in (await snapshot(t.ns))[0]


@requires_lab
async def test_full_tunnel_marked_udp_bypasses_and_everything_is_removed(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        assert (await route_get(t.ns, INTERNET))["dev"] == "eth0"
        async with open_routing(tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns) as routing:
            for pr in PATHS:
                mark = hex(pr.fwmark)
                # Marked (the tunnel's own UDP): out of its own path, via the next hop found in main.
                route = await route_get(t.ns, t.gateway, "mark", mark)
                assert (route["dev"], route.get("gateway")) == (pr.ifname, HOPS[pr.ifname])
                # With SO_BINDTODEVICE as well (how the udp driver sends).
                route = await route_get(t.ns, t.gateway, "mark", mark, "oif", pr.ifname)
                assert (route["dev"], route.get("gateway")) == (pr.ifname, HOPS[pr.ifname])
                assert routing.paths[pr.ifname].gateway == HOPS[pr.ifname]
            # Unmarked: into the TUN, for the gateway and for the internet alike.
            assert (await route_get(t.ns, INTERNET))["dev"] == t.tun
            assert (await route_get(t.ns, t.gateway))["dev"] == t.tun
            # The link subnets stay reachable (suppress_prefixlength 0 keeps main's specific routes).
            assert (await route_get(t.ns, "10.77.2.1"))["dev"] == "wifi0"
            rules, routes = await snapshot(t.ns)
            assert f"{PATH_RULE_PRIORITY}:\tfrom all fwmark 0x101 lookup 101 proto 74" in rules
            assert f"{SUPPRESS_RULE_PRIORITY}:\tfrom all lookup main suppress_prefixlength 0 proto 74" in rules
            assert f"{TUNNEL_RULE_PRIORITY}:\tnot from all fwmark 0x100/0xf00 lookup {TUN_TABLE} proto 74" in rules
            assert f"default dev {t.tun} table {TUN_TABLE} proto 74 scope link" in routes
            assert "unreachable default table 101 proto 74 metric 4294967295" in routes
        assert await snapshot(t.ns) == before
        assert (await route_get(t.ns, INTERNET))["dev"] == "eth0"


@requires_lab
async def test_open_routing_removes_everything_on_error(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        with pytest.raises(KeyError, match="boom"):
            async with open_routing(tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns):
                assert (await route_get(t.ns, INTERNET))["dev"] == t.tun
                raise KeyError("boom")
        assert await snapshot(t.ns) == before


@requires_lab
async def test_open_routing_removes_everything_on_cancellation(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        with trio.CancelScope() as scope:
            async with open_routing(tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns):
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert await snapshot(t.ns) == before


@requires_lab
async def test_open_routing_failing_install_leaves_nothing(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        missing = PathRoute("jvnlnone0", 104, 0x104)
        with pytest.raises(RouteError) as info:
            async with open_routing(
                tunnel=full_tunnel(t), paths=[*PATHS, missing], gateway_address=t.gateway, netns=t.ns
            ):
                raise AssertionError("not reached")  # pragma: no cover
        assert info.value.errno == errno.ENODEV
        assert await snapshot(t.ns) == before


@requires_lab
async def test_split_tunnel_routes_and_idempotent_removal(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        tr = TunnelRoutes(t.tun, ["198.51.100.0/24", "10.98.0.0/16"], TUN_TABLE)
        installed = await install_tunnel_routes(tr, netns=t.ns)
        assert installed.rules == ()
        assert {r.dst for r in installed.routes} == {"198.51.100.0/24", "10.98.0.0/16"}
        assert (await route_get(t.ns, "198.51.100.9"))["dev"] == t.tun
        assert (await route_get(t.ns, "10.98.7.7"))["dev"] == t.tun
        assert (await route_get(t.ns, INTERNET))["dev"] == "eth0"
        # Installing again finds its own routes (our protocol, our TUN) and accepts them.
        assert await install_tunnel_routes(tr, netns=t.ns) == installed
        await remove_tunnel_routes(installed, netns=t.ns)
        assert await snapshot(t.ns) == before
        await remove_tunnel_routes(installed, netns=t.ns)  # already gone: no error


@requires_lab
async def test_conflicting_main_route_raises_and_rolls_back(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        await t.lab.run(t.ns, "ip", "route", "add", "10.98.0.0/16", "via", "10.77.2.1")
        before = await snapshot(t.ns)
        tr = TunnelRoutes(t.tun, ["198.51.100.0/24", "10.98.0.0/16"], TUN_TABLE)
        with pytest.raises(RouteError, match="not installed by us"):
            await install_tunnel_routes(tr, netns=t.ns)
        assert await snapshot(t.ns) == before
        assert (await route_get(t.ns, "10.98.7.7"))["dev"] == "wifi0"


@requires_lab
async def test_tunnel_routes_for_a_missing_tun_raise(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(RouteError) as info:
            await install_tunnel_routes(TunnelRoutes(f"{t.tun}x", ["0.0.0.0/0"], TUN_TABLE), netns=t.ns)
        assert info.value.errno == errno.ENODEV


@requires_lab
async def test_link_flap_deletes_the_path_route_and_reinstall_restores_it(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        before = await snapshot(t.ns)
        pr = await install_path_route(PathRoute("eth0", 101, 0x101), gateway_address=t.gateway, netns=t.ns)
        assert pr.gateway == "10.77.1.1"
        assert (await route_get(t.ns, t.gateway, "mark", "0x101"))["dev"] == "eth0"
        assert await install_path_route(pr, gateway_address=t.gateway, netns=t.ns) == pr  # idempotent

        await t.lab.link_down("eth0")
        # The kernel deleted our route (and main's default via eth0).  The path fails closed:
        # without the unreachable route, marked packets would leak out of wifi0 via main.
        assert [r["type"] for r in await ip_json(t.ns, "route", "show", "table", "101")] == ["unreachable"]
        assert "No route to host" in await route_get_error(t.ns, t.gateway, "mark", "0x101")
        with pytest.raises(RouteError) as info:
            await install_path_route(pr, gateway_address=t.gateway, netns=t.ns)
        assert info.value.errno in (errno.ENETDOWN, errno.ENETUNREACH)

        # Up again, but nobody restores main's default route (the lab's link_up would, like a
        # DHCP client): the remembered next hop is what makes the re-install right.
        await t.lab.run(t.ns, "ip", "link", "set", "eth0", "up")
        assert await install_path_route(pr, gateway_address=t.gateway, netns=t.ns) == pr
        route = await route_get(t.ns, t.gateway, "mark", "0x101")
        assert (route["dev"], route.get("gateway")) == ("eth0", "10.77.1.1")
        fresh = await install_path_route(PathRoute("eth0", 101, 0x101), gateway_address=t.gateway, netns=t.ns)
        assert fresh.gateway is None  # main no longer knows the next hop: on-link is all that is left

        await remove_path_route(pr, netns=t.ns)
        await remove_path_route(pr, netns=t.ns)  # already gone: no error
        rules, routes = await snapshot(t.ns)
        assert rules == before[0]
        assert "table 101" not in routes


def test_the_lookup_mark_bypasses_the_tunnel_and_is_no_paths_mark() -> None:
    tunnel = routes.TunnelRoutes(tun_name="jv0", prefixes=("0.0.0.0/0",), table=TUN_TABLE)
    mark = tunnel.lookup_mark(0x5100)
    assert mark == 0x5100 and mark & routes.DEFAULT_BYPASS_MASK == routes.DEFAULT_BYPASS_MARK
    assert all(0x5100 + n != mark for n in range(1, 256))  # path marks are fwmark_base + id, ids from 1
    assert tunnel.lookup_mark(0x50FF) is None  # would fall into the tunnel: unmarked instead


@requires_lab
async def test_routing_reinstall_path_after_flap(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        async with open_routing(
            tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns
        ) as routing:
            await t.lab.link_down("eth0")
            # The path fails closed: neither into the TUN nor out of another path.
            assert "No route to host" in await route_get_error(t.ns, t.gateway, "mark", "0x101")
            assert (await route_get(t.ns, t.gateway, "mark", "0x102"))["dev"] == "wifi0"
            await t.lab.link_up("eth0")
            pr = await routing.reinstall_path("eth0")
            assert pr.gateway == "10.77.1.1"
            route = await route_get(t.ns, t.gateway, "mark", "0x101")
            assert (route["dev"], route.get("gateway")) == ("eth0", "10.77.1.1")


@requires_lab
async def test_an_interface_back_under_another_table_leaves_nothing_of_the_old_one(tun_lab: TunLab) -> None:
    """A path whose link went down keeps its entries (commands/up.py); if it returns with another
    id, its old table and rule go before the new ones come, and exit removes everything."""
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        before = await snapshot(t.ns)
        async with open_routing(tunnel=None, paths=(), gateway_address=t.gateway, netns=t.ns) as routing:
            await routing.add_path(PathRoute("eth0", 103, 0x103, gateway="10.77.1.1"))
            await routing.add_path(PathRoute("eth0", 105, 0x105, gateway="10.77.1.1"))
            rules, tables = await snapshot(t.ns)
            assert "0x105 lookup 105" in rules and "0x103" not in rules and "lookup 103" not in rules, rules
            assert "table 103" not in tables and "table 105" in tables, tables
        assert await snapshot(t.ns) == before


@requires_lab
async def test_remove_of_never_installed_entries_is_quiet(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        ghost = InstalledRoutes(
            routes=(RouteEntry(table=TUN_TABLE, dst="0.0.0.0/0", oif=999),),
            rules=(
                RuleEntry(priority=TUNNEL_RULE_PRIORITY, table=TUN_TABLE, fwmark=0x100, fwmask=0xF00, invert=True),
            ),
        )
        await remove_tunnel_routes(ghost, netns=t.ns)
        await remove_path_route(PathRoute("eth0", 109, 0x109), netns=t.ns)


@requires_lab
async def test_best_effort_routing_as_up_uses_it(tun_lab: TunLab) -> None:
    """A path down at start is logged and left; it is routed once its link is back; all goes on exit."""
    t = tun_lab
    lines: list[str] = []
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot(t.ns)
        await t.lab.link_down("wifi0")
        async with open_routing(
            tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns,
            defer_tunnel=True, best_effort=True, log=lines.append,
        ) as routing:  # fmt: skip
            assert len(lines) == 1 and lines[0].startswith("path wifi0 not routable yet")
            assert routing.statistics().install_failed == {"wifi0": 1}
            assert (await route_get(t.ns, INTERNET))["dev"] == "eth0"  # no tunnel routes yet
            async with routing.open_tunnel_routes():
                assert (await route_get(t.ns, INTERNET))["dev"] == t.tun
                await route_get_error(t.ns, t.gateway, "mark", "0x102", "oif", "wifi0")  # as the socket sends
                await t.lab.link_up("wifi0")
                pr = await routing.reinstall_path("wifi0")
                assert pr is not None and pr.gateway == "10.77.2.1"
                route = await route_get(t.ns, t.gateway, "mark", "0x102")
                assert (route["dev"], route.get("gateway")) == ("wifi0", "10.77.2.1")
            assert (await route_get(t.ns, INTERNET))["dev"] == "eth0"
        rules, routes_after = await snapshot(t.ns)
        assert rules == before[0]
        assert "proto 74" not in routes_after  # the flap re-added main's default route: compare ours only
        assert len(lines) == 1


# -- IPv6 (root) ---------------------------------------------------------------------------------

INTERNET6 = "2001:db8::1"


async def snapshot6(ns: str) -> tuple[str, str]:
    rules = await trio.run_process(["ip", "-6", "-n", ns, "rule"], capture_stdout=True)
    table = await trio.run_process(["ip", "-6", "-n", ns, "route", "show", "table", "all"], capture_stdout=True)
    # The kernel's own per-interface routes (local, multicast, link-local) are not ours to compare.
    ours = [line for line in table.stdout.decode().splitlines() if "proto 74" in line or line.startswith("default")]
    return rules.stdout.decode(), "\n".join(ours)


@requires_lab
async def test_ipv4_full_tunnel_blocks_ipv6_and_removal_restores_it(tun_lab: TunLab) -> None:
    t = tun_lab
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before4, before6 = await snapshot(t.ns), await snapshot6(t.ns)
        assert (await route_get(t.ns, INTERNET6))["dev"] == "eth0"  # the lab's IPv6 default route: a leak
        async with open_routing(tunnel=full_tunnel(t), paths=PATHS, gateway_address=t.gateway, netns=t.ns):
            message = await route_get_error(t.ns, INTERNET6)
            assert "unreachable" in message.lower() or "no route" in message.lower(), message
            # Main's specific routes still apply (the LAN of a path), as for IPv4.
            assert (await route_get(t.ns, t.lab.path_addresses6("wifi0")[1]))["dev"] == "wifi0"
            assert (await route_get(t.ns, INTERNET))["dev"] == t.tun
        assert (await snapshot(t.ns), await snapshot6(t.ns)) == (before4, before6)
        assert (await route_get(t.ns, INTERNET6))["dev"] == "eth0"


@requires_lab
async def test_both_families_into_the_tun_and_an_ipv6_tun_address(tun_lab: TunLab) -> None:
    t = tun_lab
    lines: list[str] = []
    with trio.fail_after(IO_TIMEOUT_S):
        set_address = TunAddress(t.tun, mtu=1400, netns=t.ns, log=lines.append)
        await set_address(ipaddress.IPv4Interface("10.200.0.2/24"), ipaddress.IPv6Interface("fd6a:7670::2/64"))
        await set_address(ipaddress.IPv4Interface("10.200.0.2/24"), ipaddress.IPv6Interface("fd6a:7670::9/64"))
        (link,) = await ip_json(t.ns, "address", "show", "dev", t.tun)
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"] == [
            ("fd6a:7670::9", 64)
        ]
        assert set_address.current6 == ipaddress.IPv6Interface("fd6a:7670::9/64") and lines == []
        before6 = await snapshot6(t.ns)
        tunnel = TunnelRoutes(t.tun, ["0.0.0.0/0", "::/0"], TUN_TABLE)
        async with open_routing(tunnel=tunnel, paths=PATHS, gateway_address=t.gateway, netns=t.ns):
            assert (await route_get(t.ns, INTERNET6))["dev"] == t.tun
            assert (await route_get(t.ns, INTERNET))["dev"] == t.tun
            # A path socket's mark bypasses the tunnel in IPv6 too (it then finds main's routes).
            assert (await route_get(t.ns, INTERNET6, "mark", "0x101"))["dev"] != t.tun
        assert await snapshot6(t.ns) == before6
        await set_address(ipaddress.IPv4Interface("10.200.0.2/24"), None)  # the next session has no IPv6
        (link,) = await ip_json(t.ns, "address", "show", "dev", t.tun)
        assert not [a for a in link["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"]
        assert set_address.current6 is None


@requires_lab
async def test_a_path_to_an_ipv6_gateway_is_routed_by_its_mark(tun_lab: TunLab) -> None:
    t = tun_lab
    gateway6 = t.lab.gateway_address6
    with trio.fail_after(IO_TIMEOUT_S):
        await setup_tun(t)
        before = await snapshot6(t.ns)
        async with open_routing(tunnel=full_tunnel(t), paths=PATHS, gateway_address=gateway6, netns=t.ns) as routing:
            for pr in PATHS:
                hop = t.lab.path_addresses6(pr.ifname)[1]
                assert routing.paths[pr.ifname].gateway == hop  # found in main's IPv6 default route
                route = await route_get(t.ns, gateway6, "mark", hex(pr.fwmark))
                assert (route["dev"], route["gateway"]) == (pr.ifname, hop)
            # Unmarked IPv6 is blocked (an IPv4 full tunnel), even to the gateway's address.
            await route_get_error(t.ns, gateway6)
        assert await snapshot6(t.ns) == before


async def test_a_new_sessions_address_never_puts_back_an_mtu_set_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TUN's MTU follows the paths while a session's address is being set: the last MTU set wins."""
    applied: list[tuple[str, int]] = []
    inside = trio.Event()
    release = trio.Event()

    async def fake_set_tun_address(ifname: str, address: str, prefixlen: int, mtu: int, *, netns: str | None = None) -> None:
        inside.set()
        await release.wait()  # the kernel is slow to answer this one
        applied.append(("address", mtu))

    async def fake_run(netns: str | None, call: Any) -> Any:
        class FakeIpr:
            def link(self, command: str, *, index: int, mtu: int) -> None:
                applied.append(("link", mtu))

            def link_lookup(self, *, ifname: str) -> list[int]:
                return [7]

        return call(FakeIpr())

    monkeypatch.setattr(routes, "set_tun_address", fake_set_tun_address)
    monkeypatch.setattr(routes, "_run", fake_run)
    tun_address = TunAddress("jvtest0", mtu=1440, log=lambda _line: None)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tun_address, ipaddress.IPv4Interface("10.66.0.2/24"))
            await inside.wait()  # the address (with MTU 1440) is on its way to the kernel
            nursery.start_soon(tun_address.set_mtu, 1220)  # a smaller path appeared meanwhile
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert applied == [("address", 1440), ("link", 1220)]
    assert tun_address.mtu == 1220
