"""What a jvpn-trio client left in the kernel, found and removed by name (``jvpn-trio down``, ``up``'s check).

Theory of operation
-------------------
A client that exits cleanly removes everything it installed through its
context managers.  One killed with SIGKILL (or a machine that lost power
mid-way, for what is not reset by a reboot) leaves behind whatever the kernel
does not tie to the process:

* the kill switch's nft table ``inet jvpn_trio`` (``drivers/killswitch.py``),
  on purpose: the block stays until ``down``;
* the policy-routing rules, IPv4 and IPv6, at the priorities of
  ``drivers/routes.py`` (20100, 20200, 20300) *and* carrying our protocol
  (``protocol 74``): a rule of someone else's at the same priority is not ours;
* every route of our protocol (``proto 74``) in any table, both families:
  path tables, the tunnel table, split-tunnel routes in main;
* the TUN device, which the kernel removes with the process that opened it
  (the driver never makes it persistent), unless something else holds it
  open; it is removed only if it is a TUN device of the configured name.

Everything is matched by those names, so nothing of anyone else's is touched
and every removal is idempotent: what is already gone (``ESRCH``, ``ENOENT``,
``ENODEV``) counts as done.  All pyroute2 calls run in a worker thread with an
``IPRoute`` of their own (docs/platform-notes.md 1, 6).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import attrs
import trio

from jvpn_trio.drivers import killswitch
from jvpn_trio.drivers.netlink import NetlinkError, open_iproute
from jvpn_trio.drivers.routes import (
    PATH_RULE_PRIORITY,
    RTPROT_JVPN,
    SUPPRESS_RULE_PRIORITY,
    TUNNEL_RULE_PRIORITY,
    RouteError,
)

__all__ = ["Leftovers", "OUR_RULE_PRIORITIES", "find_leftovers", "remove_leftovers"]

#: The priorities of our rules (drivers/routes.py); only rules of our protocol there are ours.
OUR_RULE_PRIORITIES = frozenset({PATH_RULE_PRIORITY, SUPPRESS_RULE_PRIORITY, TUNNEL_RULE_PRIORITY})
_FAMILIES = ((socket.AF_INET, "-4"), (socket.AF_INET6, "-6"))
_GONE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})
_RTN_UNICAST = 1
_TUN_KIND = "tun"


@attrs.frozen(kw_only=True)
class Leftovers:
    """What is there now, each as one line an operator can read (``ip``/``nft`` spelling)."""

    nft_table: bool = False
    rules: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    tun: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.nft_table or self.rules or self.routes or self.tun)

    def lines(self) -> list[str]:
        out = [f"nft table {killswitch.FAMILY} {killswitch.TABLE}"] if self.nft_table else []
        out += [*self.rules, *self.routes]
        if self.tun is not None:
            out.append(f"TUN device {self.tun}")
        return out


def _rule_text(flag: str, r: Any) -> str:
    parts = [f"ip {flag} rule {r.get('priority')}:"]
    if r["flags"] & 0x2:
        parts.append("not")
    if r.get("fwmark") is not None:
        parts.append(f"fwmark {r.get('fwmark'):#x}/{(r.get('fwmask') or 0xFFFFFFFF):#x}")
    parts.append(f"lookup {r.get('table')}")
    return " ".join(parts)


def _route_text(flag: str, r: Any) -> str:
    dst = f"{r.get('dst') or 'default'}" + (f"/{r['dst_len']}" if r.get("dst") else "")
    kind = "" if r["type"] == _RTN_UNICAST else "unreachable "
    return f"ip {flag} route {kind}{dst} table {r.get('table')} proto {RTPROT_JVPN}"


def _our_rules(ipr: Any) -> list[tuple[str, Any]]:
    out = []
    for family, flag in _FAMILIES:
        for r in ipr.get_rules(family=family):
            if r.get("priority") in OUR_RULE_PRIORITIES and r.get("protocol") == RTPROT_JVPN:
                out.append((flag, r))
    return out


def _our_routes(ipr: Any) -> list[tuple[str, Any]]:
    out = []
    for family, flag in _FAMILIES:
        for r in ipr.get_routes(family=family):
            if r["proto"] == RTPROT_JVPN:
                out.append((flag, r))
    return out


def _tun(ipr: Any, name: str) -> int | None:
    for link in ipr.get_links():
        if link.get("ifname") != name:
            continue
        info = link.get("IFLA_LINKINFO")
        if info is not None and info.get("IFLA_INFO_KIND") == _TUN_KIND:
            return int(link["index"])
    return None


def _find_sync(ipr: Any, tun_name: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], int | None]:
    return _our_rules(ipr), _our_routes(ipr), _tun(ipr, tun_name)


def _rule_args(r: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": r["family"],
        "priority": r.get("priority"),
        "table": r.get("table"),
        "protocol": RTPROT_JVPN,
        "flags": r["flags"],
        "action": r["action"],
    }
    if r.get("fwmark") is not None:
        args["fwmark"] = r.get("fwmark")
        args["fwmask"] = r.get("fwmask") if r.get("fwmask") is not None else 0xFFFFFFFF
    if r.get("suppress_prefixlen") is not None:
        args["suppress_prefixlen"] = r.get("suppress_prefixlen")
    return args


def _route_args(r: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": r["family"],
        "dst_len": r["dst_len"],
        "table": r.get("table"),
        "proto": RTPROT_JVPN,
        "type": r["type"],
        "scope": r["scope"],  # the kernel matches the scope too: a link-scope route needs it said
    }
    if r.get("dst"):
        args["dst"] = r.get("dst")
    if r.get("priority") is not None:
        args["priority"] = r.get("priority")
    if r["type"] == _RTN_UNICAST:
        if r.get("oif") is not None:
            args["oif"] = r.get("oif")
        if r.get("gateway") is not None:
            args["gateway"] = r.get("gateway")
    return args


def _remove_sync(ipr: Any, tun_name: str) -> tuple[list[str], list[str], str | None]:
    """Delete our rules (first: traffic stops being steered), then our routes, then the TUN."""
    failures: list[str] = []
    rules, routes = [], []
    for flag, r in _our_rules(ipr):
        try:
            ipr.rule("del", **_rule_args(r))
            rules.append(_rule_text(flag, r))
        except NetlinkError as exc:
            if exc.code not in _GONE:
                failures.append(f"removing {_rule_text(flag, r)}: {exc}")
    for flag, r in _our_routes(ipr):
        try:
            ipr.route("del", **_route_args(r))
            routes.append(_route_text(flag, r))
        except NetlinkError as exc:
            if exc.code not in _GONE:
                failures.append(f"removing {_route_text(flag, r)}: {exc}")
    tun: str | None = None
    index = _tun(ipr, tun_name)
    if index is not None:
        try:
            ipr.link("del", index=index)
            tun = tun_name
        except NetlinkError as exc:
            if exc.code not in _GONE:
                failures.append(f"removing TUN device {tun_name}: {exc}")
    if failures:
        error = RouteError(failures[0])
        if len(failures) > 1:
            error.add_note(f"and {len(failures) - 1} more: " + "; ".join(failures[1:]))
        raise error
    return rules, routes, tun


async def _run(netns: str | None, fn: Any) -> Any:
    def work() -> Any:
        try:
            with open_iproute(netns) as ipr:
                return fn(ipr)
        except NetlinkError as exc:
            raise RouteError(f"netlink: {exc}", exc.code) from exc

    return await trio.to_thread.run_sync(work)


async def find_leftovers(tun_name: str, *, netns: str | None = None) -> Leftovers:
    """What of ours is in the kernel now (nft table, rules, routes, TUN).  Raises RouteError on refusal."""
    rules, routes, index = await _run(netns, lambda ipr: _find_sync(ipr, tun_name))
    return Leftovers(
        nft_table=await killswitch.is_installed(netns=netns),
        rules=tuple(_rule_text(flag, r) for flag, r in rules),
        routes=tuple(_route_text(flag, r) for flag, r in routes),
        tun=tun_name if index is not None else None,
    )


async def remove_leftovers(tun_name: str, *, netns: str | None = None) -> Leftovers:
    """Remove every leftover by name, idempotently; returns what was removed.

    Rules, routes and the TUN go first, the nft table last, so nothing leaves
    unprotected while the routing is half gone.  Raises RouteError or
    :class:`~jvpn_trio.drivers.killswitch.KillSwitchError` for a refusal
    (after trying every entry).
    """
    rules, routes, tun = await _run(netns, lambda ipr: _remove_sync(ipr, tun_name))
    # "Already gone" is also what the kernel says when a delete does not match exactly: look again.
    still = await _run(netns, lambda ipr: _find_sync(ipr, tun_name))
    remaining = [_rule_text(f, r) for f, r in still[0]] + [_route_text(f, r) for f, r in still[1]]
    if remaining:
        raise RouteError(f"could not remove {', '.join(remaining)} (the kernel did not match it)")
    table = await killswitch.remove(netns=netns)
    return Leftovers(nft_table=table, rules=tuple(rules), routes=tuple(routes), tun=tun)
