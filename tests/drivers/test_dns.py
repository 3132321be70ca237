"""The tunnel's DNS (drivers/dns.py): the plan, and each method against its double or a real namespace.

Determinism rules: nothing here touches the machine's DNS.  Every test passes a
``DnsSystem`` whose state directory, resolv.conf and ``resolvconf`` command live
in ``tmp_path`` and whose bus is a private ``dbus-daemon`` (the fixture of
tests/drivers/test_logind.py) or a socket path that does not exist, so the system
bus is never asked.  The fake resolved is a jeepney connection owning
``org.freedesktop.resolve1`` that records each call before it answers, so the
calls are all recorded once ``apply_dns`` returns.  The fake ``resolvconf`` is a
shell script recording its argv and stdin.  The one root test builds its own
namespace (``jvt`` + 6 hex digits) with an ``/etc/netns/<ns>/resolv.conf`` and
removes both; it compares the machine's ``/etc/resolv.conf`` before and after.
Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from jeepney import HeaderFields, MessageType, message_bus, new_error, new_method_return
from jeepney.io.trio import open_dbus_connection

from jvpn_trio.drivers import dns
from jvpn_trio.drivers.dns import (
    BACKUP_FILE_NAME,
    HEADER_MARK,
    RESOLVE1_BUS_NAME,
    RESOLVE1_MANAGER,
    RESOLVE1_PATH,
    STATE_FILE_NAME,
    DbusCall,
    DnsError,
    DnsRequest,
    DnsState,
    DnsSystem,
    Method,
    apply_dns,
    resolv_conf_text,
    resolvconf_plan,
    resolved_plan,
    revert_dns,
)
from jvpn_trio.lab.dns_server import dns_server_argv
from tests.drivers.test_logind import Bus, bus  # noqa: F401  (bus is a fixture)
from tests.netns import namespaces, requires_root, unique_prefix

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parents[2]
V4 = ipaddress.ip_address("10.77.0.53")
V6 = ipaddress.ip_address("fd77::53")
ORIGINAL = b"# the LAN's resolver\nnameserver 192.168.1.1\nsearch home.lan\noptions edns0\n"
MANAGER_METHODS = {"SetLinkDNS", "SetLinkDomains", "SetLinkDefaultRoute", "RevertLink"}
#: ``lo`` exists in every namespace and is always index 1: a link resolved can be told about without root.
LINK = "lo"


@pytest.fixture(autouse=True)
def in_the_machines_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever namespace the suite runs in, the in-process tests choose methods as on a laptop."""
    monkeypatch.setattr(dns, "_in_private_netns", lambda: False)


def no_bus(tmp_path: Path) -> str:
    return f"unix:path={tmp_path / 'no-bus'}"


def system_in(tmp_path: Path, *, bus_address: str | None = None, resolvconf: str | None = None) -> DnsSystem:
    return DnsSystem(
        state_dir=tmp_path / "run",
        bus_address=bus_address if bus_address is not None else no_bus(tmp_path),
        resolv_conf=tmp_path / "etc" / "resolv.conf",
        resolvconf=resolvconf if resolvconf is not None else str(tmp_path / "no-resolvconf"),
    )


def etc_resolv_conf(tmp_path: Path, content: bytes = ORIGINAL) -> Path:
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


# -----------------------------------------------------------------------------
# The plan (pure)
# -----------------------------------------------------------------------------


def request(*, full_tunnel: bool, search: tuple[str, ...] = ("corp.example", "lab.example")) -> DnsRequest:
    return DnsRequest(tun_name="jvpn0", servers=(V4, V6), search=search, full_tunnel=full_tunnel)


def test_a_full_tunnel_routes_every_name_to_the_tunnel_link() -> None:
    plan = resolved_plan(request(full_tunnel=True), 7)
    assert plan.calls() == (
        DbusCall("SetLinkDNS", "ia(iay)", (7, [(socket.AF_INET, V4.packed), (socket.AF_INET6, V6.packed)])),
        DbusCall("SetLinkDomains", "ia(sb)", (7, [("corp.example", False), ("lab.example", False), (".", True)])),
        DbusCall("SetLinkDefaultRoute", "ib", (7, True)),
    )
    assert plan.revert_call() == DbusCall("RevertLink", "i", (7,))


def test_a_split_tunnel_gets_servers_and_search_domains_but_not_every_name() -> None:
    plan = resolved_plan(request(full_tunnel=False), 7)
    assert plan.calls() == (
        DbusCall("SetLinkDNS", "ia(iay)", (7, [(socket.AF_INET, V4.packed), (socket.AF_INET6, V6.packed)])),
        DbusCall("SetLinkDomains", "ia(sb)", (7, [("corp.example", False), ("lab.example", False)])),
    )
    assert resolved_plan(request(full_tunnel=False, search=()), 7).calls()[1].body == (7, [])


def test_the_resolvconf_record_and_the_file_name_the_servers_and_search_domains() -> None:
    full = resolvconf_plan(request(full_tunnel=True))
    assert full.interface == "jvpn0.jvpn-trio"
    assert full.text == "nameserver 10.77.0.53\nnameserver fd77::53\nsearch corp.example lab.example\n"
    assert full.apply_argv("/sbin/resolvconf") == ["/sbin/resolvconf", "-x", "-a", "jvpn0.jvpn-trio"]
    assert full.revert_argv("resolvconf") == ["resolvconf", "-d", "jvpn0.jvpn-trio"]
    split = resolvconf_plan(request(full_tunnel=False))
    assert split.apply_argv("resolvconf") == ["resolvconf", "-a", "jvpn0.jvpn-trio"]

    text = resolv_conf_text(request(full_tunnel=True, search=()), Path("/run/jvpn-trio/dns-resolv.conf.backup"))
    lines = text.splitlines()
    assert lines[0].startswith(HEADER_MARK) and "jvpn0" in lines[0]
    assert "/run/jvpn-trio/dns-resolv.conf.backup" in lines[1] and "`jvpn-trio down`" in lines[1]
    assert lines[2:] == ["nameserver 10.77.0.53", "nameserver fd77::53"]


def test_a_request_needs_a_server() -> None:
    with pytest.raises(ValueError, match="no DNS servers"):
        DnsRequest(tun_name="jvpn0", servers=(), full_tunnel=True)
    assert DnsRequest(tun_name="t", servers=("10.0.0.1",), full_tunnel=False).servers == (V4.__class__("10.0.0.1"),)


def test_the_state_file_round_trips_and_garbage_is_one_line_error() -> None:
    state = DnsState(method=Method.FILE, tun_name="jvpn0", resolv_conf="/etc/resolv.conf", original="regular",
                     backup="/run/x", written_sha256="ab")  # fmt: skip
    text = state.to_json()
    assert json.loads(text) == {"format": 1, "method": "file", "tun_name": "jvpn0", "resolv_conf": "/etc/resolv.conf",
                                "original": "regular", "backup": "/run/x", "written_sha256": "ab"}  # fmt: skip
    assert DnsState.from_json_untrusted(text, where="s") == state
    for garbage in ("{", "[]", '{"format": 2}', '{"format": 1, "method": "carrier-pigeon", "tun_name": "t"}',
                    '{"format": 1, "method": "resolved", "tun_name": "t"}',
                    '{"format": 1, "method": "resolved", "tun_name": "t", "ifindex": "7"}',
                    ('{"format": 1, "method": "file", "tun_name": "t", "resolv_conf": "/x", "original": "regular",'
                     ' "written_sha256": "ab"}')):  # fmt: skip
        with pytest.raises(DnsError) as info:
            DnsState.from_json_untrusted(garbage, where="/run/jvpn-trio/dns.json")
        assert "\n" not in str(info.value) and "/run/jvpn-trio/dns.json" in str(info.value)


# -----------------------------------------------------------------------------
# systemd-resolved, faked on a private bus
# -----------------------------------------------------------------------------


class FakeResolved:
    """Owns org.freedesktop.resolve1 and answers the manager's methods we call, recording each call first."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.fail = fail or {}

    async def serve(self, address: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        conn = await open_dbus_connection(address)
        async with conn:
            serial = next(conn.outgoing_serial)
            await conn.send(message_bus.RequestName(RESOLVE1_BUS_NAME), serial=serial)
            while (await conn.receive()).header.fields.get(HeaderFields.reply_serial) != serial:
                pass
            task_status.started()
            while True:
                msg = await conn.receive()
                fields = msg.header.fields
                if msg.header.message_type is not MessageType.method_call:
                    continue
                member = fields[HeaderFields.member]
                self.calls.append((member, fields.get(HeaderFields.signature, ""), msg.body))
                if (
                    fields.get(HeaderFields.path) != RESOLVE1_PATH
                    or fields.get(HeaderFields.interface) != RESOLVE1_MANAGER
                    or member not in MANAGER_METHODS
                ):
                    await conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (member,)))
                elif member in self.fail:
                    await conn.send(new_error(msg, self.fail[member], "s", ("refused by the test",)))
                else:
                    await conn.send(new_method_return(msg))


def fake_resolvconf(tmp_path: Path, *, refuse_x: bool = False, fail: bool = False) -> tuple[str, Path]:
    """A ``resolvconf`` that records each run as ``<n>.args`` and ``<n>.stdin`` in the returned directory."""
    record = tmp_path / "resolvconf-calls"
    record.mkdir()
    script = tmp_path / "bin" / "resolvconf"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f"dir='{record}'\n"
        'n=$(( $(ls "$dir" | wc -l) / 2 ))\n'
        'printf "%s\\n" "$@" > "$dir/$n.args"\n'
        'cat > "$dir/$n.stdin"\n'
        + ('[ "$1" = -x ] && { echo "resolvconf: invalid option -x" >&2; exit 1; }\n' if refuse_x else "")
        + ('echo "resolvconf: /etc/resolvconf/run is read-only" >&2; exit 3\n' if fail else "")
        + "exit 0\n"
    )
    script.chmod(0o755)
    return str(script), record


def resolvconf_runs(record: Path) -> list[tuple[list[str], str]]:
    n = len(list(record.iterdir())) // 2
    return [((record / f"{i}.args").read_text().splitlines(), (record / f"{i}.stdin").read_text()) for i in range(n)]


async def test_resolved_gets_the_servers_and_every_name_with_a_full_tunnel_and_revert_link_undoes_it(
    bus: Bus, tmp_path: Path  # noqa: F811
) -> None:
    resolvconf, record = fake_resolvconf(tmp_path)
    system = system_in(tmp_path, bus_address=bus.address, resolvconf=resolvconf)
    resolved = FakeResolved()
    logs: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(resolved.serve, bus.address)
            applied = await apply_dns(LINK, [V4, V6], ["corp.example"], full_tunnel=True, system=system,
                                      log=logs.append)  # fmt: skip
            assert applied.method is Method.RESOLVED and applied.notes == () and applied.skipped == ()
            assert resolved.calls == [
                ("SetLinkDNS", "ia(iay)", (1, [(socket.AF_INET, V4.packed), (socket.AF_INET6, V6.packed)])),
                ("SetLinkDomains", "ia(sb)", (1, [("corp.example", False), (".", True)])),
                ("SetLinkDefaultRoute", "ib", (1, True)),
            ]
            state = json.loads((tmp_path / "run" / STATE_FILE_NAME).read_text())
            assert state == {"format": 1, "method": "resolved", "tun_name": LINK, "ifindex": 1}

            reverted = await revert_dns(system=system, log=logs.append)
            assert reverted is not None and reverted.method is Method.RESOLVED
            assert resolved.calls[3:] == [("RevertLink", "i", (1,))]
            nursery.cancel_scope.cancel()
    assert not (tmp_path / "run" / STATE_FILE_NAME).exists()
    assert resolvconf_runs(record) == []  # resolved came first; resolvconf was never run
    assert logs == []


async def test_a_split_tunnel_gives_resolved_no_routing_domain_and_no_default_route(
    bus: Bus, tmp_path: Path  # noqa: F811
) -> None:
    resolved = FakeResolved()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(resolved.serve, bus.address)
            await apply_dns(LINK, [V4], ["corp.example"], full_tunnel=False, system=system_in(tmp_path,
                            bus_address=bus.address), log=lambda _: None)  # fmt: skip
            nursery.cancel_scope.cancel()
    assert resolved.calls == [
        ("SetLinkDNS", "ia(iay)", (1, [(socket.AF_INET, V4.packed)])),
        ("SetLinkDomains", "ia(sb)", (1, [("corp.example", False)])),
    ]


async def test_a_refusal_by_resolved_is_one_line_and_leaves_neither_settings_nor_state(
    bus: Bus, tmp_path: Path  # noqa: F811
) -> None:
    resolved = FakeResolved(fail={"SetLinkDomains": "org.freedesktop.DBus.Error.AccessDenied"})
    system = system_in(tmp_path, bus_address=bus.address)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(resolved.serve, bus.address)
            with pytest.raises(DnsError) as info:
                await apply_dns(LINK, [V4], full_tunnel=True, system=system, log=lambda _: None)
            nursery.cancel_scope.cancel()
    assert str(info.value) == (
        "systemd-resolved refused SetLinkDomains for lo: org.freedesktop.DBus.Error.AccessDenied: refused by the test"
    )
    assert [c[0] for c in resolved.calls] == ["SetLinkDNS", "SetLinkDomains", "RevertLink"]
    assert not system.state_file.exists()


async def test_revert_after_the_link_is_gone_calls_nothing_and_drops_the_state(
    bus: Bus, tmp_path: Path  # noqa: F811
) -> None:
    system = system_in(tmp_path, bus_address=bus.address)
    system.state_dir.mkdir()
    system.state_file.write_text(DnsState(method=Method.RESOLVED, tun_name="jvt-gone0", ifindex=4242).to_json())
    resolved = FakeResolved()
    logs: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(resolved.serve, bus.address)
            reverted = await revert_dns(system=system, log=logs.append)
            nursery.cancel_scope.cancel()
    assert reverted is not None and resolved.calls == []
    assert logs == ["DNS: jvt-gone0 (link 4242) is gone: resolved forgot its DNS with it"]
    assert not system.state_file.exists()


async def test_in_a_namespace_of_its_own_resolved_is_not_asked_and_the_file_is_written(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The machine's resolved would take the namespace's link index for one of its own links."""
    monkeypatch.setattr(dns, "_in_private_netns", lambda: True)
    etc_resolv_conf(tmp_path)
    resolved = FakeResolved()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(resolved.serve, bus.address)
            applied = await apply_dns(LINK, [V4], full_tunnel=True, system=system_in(tmp_path, bus_address=bus.address))
            nursery.cancel_scope.cancel()
    assert applied.method is Method.FILE and applied.skipped == (dns.PRIVATE_NETNS_REASON,)
    assert resolved.calls == []


# -----------------------------------------------------------------------------
# Choosing a method; resolvconf
# -----------------------------------------------------------------------------


async def test_without_resolved_on_the_bus_resolvconf_gets_an_exclusive_record_and_down_deletes_it(
    bus: Bus, tmp_path: Path  # noqa: F811
) -> None:
    resolvconf, record = fake_resolvconf(tmp_path)
    system = system_in(tmp_path, bus_address=bus.address, resolvconf=resolvconf)
    resolv_conf = etc_resolv_conf(tmp_path)
    with trio.fail_after(TIMEOUT):
        applied = await apply_dns("jvpn0", [V4], ["corp.example"], full_tunnel=True, system=system)
        assert applied.method is Method.RESOLVCONF
        no_owner = f"systemd-resolved: not running ({RESOLVE1_BUS_NAME} has no owner on {bus.address})"
        assert applied.skipped == (no_owner,)
        assert json.loads(system.state_file.read_text()) == {
            "format": 1, "method": "resolvconf", "tun_name": "jvpn0", "command": resolvconf,
            "interface": "jvpn0.jvpn-trio",
        }  # fmt: skip
        assert await revert_dns(system=system) is not None
    assert resolvconf_runs(record) == [
        (["-x", "-a", "jvpn0.jvpn-trio"], "nameserver 10.77.0.53\nsearch corp.example\n"),
        (["-d", "jvpn0.jvpn-trio"], ""),
    ]
    assert resolv_conf.read_bytes() == ORIGINAL and not system.state_file.exists()


async def test_a_resolvconf_without_exclusive_records_is_used_without_it_and_says_so(tmp_path: Path) -> None:
    resolvconf, record = fake_resolvconf(tmp_path, refuse_x=True)
    logs: list[str] = []
    with trio.fail_after(TIMEOUT):
        applied = await apply_dns("jvpn0", [V4], full_tunnel=True, system=system_in(tmp_path, resolvconf=resolvconf),
                                  log=logs.append)  # fmt: skip
    assert [argv for argv, _ in resolvconf_runs(record)] == [["-x", "-a", "jvpn0.jvpn-trio"], ["-a", "jvpn0.jvpn-trio"]]
    assert applied.method is Method.RESOLVCONF and len(applied.notes) == 1
    assert logs == [f"DNS: {applied.notes[0]}"] and "invalid option -x" in logs[0] and "without -x" in logs[0]


async def test_a_failing_resolvconf_is_one_line_and_leaves_no_state(tmp_path: Path) -> None:
    resolvconf, record = fake_resolvconf(tmp_path, fail=True)
    system = system_in(tmp_path, resolvconf=resolvconf)
    with trio.fail_after(TIMEOUT), pytest.raises(DnsError) as info:
        await apply_dns("jvpn0", [V4], full_tunnel=False, system=system)
    assert str(info.value) == (
        f"resolvconf refused the tunnel's DNS: `{resolvconf} -a jvpn0.jvpn-trio` exited 3: "
        "resolvconf: /etc/resolvconf/run is read-only"
    )
    assert [argv for argv, _ in resolvconf_runs(record)] == [["-a", "jvpn0.jvpn-trio"], ["-d", "jvpn0.jvpn-trio"]]
    assert not system.state_file.exists()


async def test_a_forced_method_that_is_unavailable_is_one_line(tmp_path: Path) -> None:
    system = system_in(tmp_path)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(DnsError, match="^systemd-resolved is not available: systemd-resolved: cannot use unix:"):
            await apply_dns("jvpn0", [V4], full_tunnel=True, system=system, method=Method.RESOLVED)
        with pytest.raises(DnsError, match="^resolvconf is not available: no /"):
            await apply_dns("jvpn0", [V4], full_tunnel=True, system=system, method=Method.RESOLVCONF)
    assert not system.state_file.exists()


# -----------------------------------------------------------------------------
# The file method
# -----------------------------------------------------------------------------


async def test_the_file_method_writes_in_place_and_revert_restores_byte_for_byte(tmp_path: Path) -> None:
    """In place: the inode stays, as it must when resolv.conf is a bind mount (``ip netns exec``, containers)."""
    resolv_conf = etc_resolv_conf(tmp_path)
    resolv_conf.chmod(0o640)
    before = os.stat(resolv_conf)
    system = system_in(tmp_path)
    with trio.fail_after(TIMEOUT):
        applied = await apply_dns("jvpn0", [V4, V6], ["corp.example"], full_tunnel=True, system=system)
    assert applied.method is Method.FILE
    assert applied.skipped == (
        f"systemd-resolved: cannot use {no_bus(tmp_path)}: FileNotFoundError: [Errno 2] No such file or directory",
        f"no {tmp_path / 'no-resolvconf'} command",
    )
    backup = tmp_path / "run" / BACKUP_FILE_NAME
    text = resolv_conf.read_text()
    assert text == resolv_conf_text(request(full_tunnel=True, search=("corp.example",)), backup)
    assert "nameserver 192.168.1.1" not in text and "search corp.example\n" in text
    assert backup.read_bytes() == ORIGINAL
    during = os.stat(resolv_conf)
    assert (during.st_ino, during.st_mode) == (before.st_ino, before.st_mode)
    assert json.loads(system.state_file.read_text()) == {
        "format": 1, "method": "file", "tun_name": "jvpn0", "resolv_conf": str(resolv_conf), "original": "regular",
        "backup": str(backup), "written_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }  # fmt: skip

    with trio.fail_after(TIMEOUT):
        reverted = await revert_dns(system=system)
        assert reverted is not None and reverted.notes == ()
        assert await revert_dns(system=system) is None  # nothing left to undo
    assert resolv_conf.read_bytes() == ORIGINAL
    after = os.stat(resolv_conf)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["resolv.conf"]  # no temporary files left


async def test_applying_twice_then_reverting_once_restores_the_original(tmp_path: Path) -> None:
    resolv_conf = etc_resolv_conf(tmp_path)
    system = system_in(tmp_path)
    logs: list[str] = []
    with trio.fail_after(TIMEOUT):
        await apply_dns("jvpn0", [V4], full_tunnel=True, system=system, log=logs.append)
        first = resolv_conf.read_bytes()
        await apply_dns("jvpn0", [V4], full_tunnel=True, system=system, log=logs.append)
        assert resolv_conf.read_bytes() == first
        assert (tmp_path / "run" / BACKUP_FILE_NAME).read_bytes() == ORIGINAL  # not our own file
        await revert_dns(system=system)
    assert resolv_conf.read_bytes() == ORIGINAL
    assert logs == ["reverting the DNS settings an earlier run left (file on jvpn0)"]


async def test_down_after_a_crash_reverts_from_the_state_file_alone(tmp_path: Path) -> None:
    """Another process applies and dies without reverting; this one only has the state directory."""
    resolv_conf = etc_resolv_conf(tmp_path)
    system = system_in(tmp_path)
    script = (
        "import os, sys, functools, trio\n"
        "from pathlib import Path\n"
        "from jvpn_trio.drivers.dns import DnsSystem, apply_dns\n"
        "t = Path(sys.argv[1])\n"
        "system = DnsSystem(state_dir=t / 'run', bus_address='unix:path=' + str(t / 'no-bus'),\n"
        "                   resolv_conf=t / 'etc' / 'resolv.conf', resolvconf=str(t / 'no-resolvconf'))\n"
        "trio.run(functools.partial(apply_dns, 'jvpn0', ['10.77.0.53'], full_tunnel=True, system=system))\n"
        "os._exit(9)  # crashed: nothing reverted\n"
    )
    with trio.fail_after(TIMEOUT):
        crashed = await trio.run_process([sys.executable, "-c", script, str(tmp_path)], check=False, cwd=ROOT)
        assert crashed.returncode == 9
        assert b"nameserver 10.77.0.53" in resolv_conf.read_bytes()
        reverted = await revert_dns(system=system)
    assert reverted is not None and reverted.method is Method.FILE
    assert resolv_conf.read_bytes() == ORIGINAL


async def test_a_symlink_is_replaced_not_written_through_and_comes_back(tmp_path: Path) -> None:
    stub = tmp_path / "systemd" / "stub-resolv.conf"
    stub.parent.mkdir()
    stub.write_bytes(b"nameserver 127.0.0.53\n")
    resolv_conf = tmp_path / "etc" / "resolv.conf"
    resolv_conf.parent.mkdir()
    resolv_conf.symlink_to("../systemd/stub-resolv.conf")
    system = system_in(tmp_path)
    with trio.fail_after(TIMEOUT):
        applied = await apply_dns("jvpn0", [V4], full_tunnel=True, system=system)
        assert "symlink to ../systemd/stub-resolv.conf" in applied.detail
        assert not resolv_conf.is_symlink() and b"nameserver 10.77.0.53" in resolv_conf.read_bytes()
        assert stub.read_bytes() == b"nameserver 127.0.0.53\n"  # resolved's file untouched
        assert not (tmp_path / "run" / BACKUP_FILE_NAME).exists()
        await revert_dns(system=system)
    assert os.readlink(resolv_conf) == "../systemd/stub-resolv.conf"
    assert resolv_conf.read_bytes() == b"nameserver 127.0.0.53\n"


async def test_a_missing_resolv_conf_is_created_and_removed_again(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    system = system_in(tmp_path)
    with trio.fail_after(TIMEOUT):
        await apply_dns("jvpn0", [V4], full_tunnel=True, system=system)
        assert system.resolv_conf.stat().st_mode & 0o777 == 0o644
        await revert_dns(system=system)
    assert not system.resolv_conf.exists()


async def test_a_resolv_conf_rewritten_by_someone_else_is_left_alone_with_a_note(tmp_path: Path) -> None:
    resolv_conf = etc_resolv_conf(tmp_path)
    system = system_in(tmp_path)
    logs: list[str] = []
    with trio.fail_after(TIMEOUT):
        await apply_dns("jvpn0", [V4], full_tunnel=True, system=system)
        resolv_conf.write_bytes(b"nameserver 192.168.7.1\n")  # a DHCP client, meanwhile
        reverted = await revert_dns(system=system, log=logs.append)
    assert resolv_conf.read_bytes() == b"nameserver 192.168.7.1\n"
    assert reverted is not None and len(reverted.notes) == 1 and logs == [f"DNS: {reverted.notes[0]}"]
    assert "changed since jvpn-trio wrote it; left as it is" in logs[0] and BACKUP_FILE_NAME in logs[0]
    assert not system.state_file.exists()


async def test_a_failed_write_puts_the_original_back_and_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolv_conf = etc_resolv_conf(tmp_path)
    system = system_in(tmp_path)
    real_write = dns._write_in_place
    calls = 0

    def half_then_full_disk(path: Path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            real_write(path, data[:10])
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(dns, "_write_in_place", half_then_full_disk)
    with trio.fail_after(TIMEOUT), pytest.raises(DnsError) as info:
        await apply_dns("jvpn0", [V4], full_tunnel=True, system=system)
    assert str(info.value) == f"cannot write {resolv_conf}: ENOSPC: No space left on device ({resolv_conf})"
    assert resolv_conf.read_bytes() == ORIGINAL and not system.state_file.exists()


async def test_a_damaged_state_file_is_one_line_error_for_down_and_up(tmp_path: Path) -> None:
    etc_resolv_conf(tmp_path)
    system = system_in(tmp_path)
    system.state_dir.mkdir()
    system.state_file.write_text("{not json")
    with trio.fail_after(TIMEOUT):
        for attempt in (revert_dns(system=system), apply_dns("jvpn0", [V4], full_tunnel=True, system=system)):
            with pytest.raises(DnsError, match=f"^{system.state_file} is not JSON"):
                await attempt
    assert system.resolv_conf.read_bytes() == ORIGINAL


# -----------------------------------------------------------------------------
# Root: a real namespace, where /etc/resolv.conf is a bind mount
# -----------------------------------------------------------------------------

NETNS_SCRIPT = """
import functools, sys, trio
from pathlib import Path
from jvpn_trio.drivers.dns import DnsSystem, Method, apply_dns, revert_dns
system = DnsSystem(state_dir=Path(sys.argv[2]), bus_address="unix:path=" + sys.argv[3])
if sys.argv[1] == "apply":
    applied = trio.run(functools.partial(apply_dns, "jvpn0", ["10.77.0.53"], ["corp.example"], full_tunnel=True,
                                         system=system, method=Method.FILE))
    print(applied.method.value)
else:
    reverted = trio.run(functools.partial(revert_dns, system=system))
    print(reverted.method.value if reverted else None)
"""


def _host_resolv_conf() -> tuple[str | None, bytes | None]:
    """The machine's /etc/resolv.conf as (symlink target, bytes), for before/after comparison."""
    path = Path("/etc/resolv.conf")
    target = os.readlink(path) if path.is_symlink() else None
    try:
        return target, path.read_bytes()
    except FileNotFoundError:
        return target, None


NS_ORIGINAL = b"# the LAN's resolver\nnameserver 192.0.2.53\n"
TUNNEL_RESOLVER, LAN_RESOLVER = "10.77.0.53", "192.0.2.53"


@pytest.mark.root
@requires_root
async def test_in_a_namespace_the_file_method_changes_only_what_the_namespace_sees(tmp_path: Path) -> None:
    """glibc in the namespace asks the tunnel's resolver while applied, the LAN's after revert; never both.

    Both resolvers are the lab's DNS server inside the namespace (on ``lo``); each
    phase asks a name of its own, so each report says which phase reached it.
    """
    ns = unique_prefix()
    netns_etc = Path("/etc/netns")
    created_netns_etc = not netns_etc.exists()
    ns_etc = netns_etc / ns
    ns_resolv_conf = ns_etc / "resolv.conf"
    host_before = _host_resolv_conf()
    state_dir = tmp_path / "run"

    async def in_ns(*argv: str) -> str:
        result = await trio.run_process(["ip", "netns", "exec", ns, *argv], capture_stdout=True,
                                        capture_stderr=True, check=False, cwd=ROOT)  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    async def script(action: str) -> str:
        argv = (sys.executable, "-c", NETNS_SCRIPT, action, str(state_dir), str(tmp_path / "no-bus"))
        return (await in_ns(*argv)).strip()

    async def start_resolver(name: str, address: str, answer: str) -> trio.Process:
        ready = tmp_path / f"{name}.ready"
        argv = dns_server_argv("serve", "--listen", f"{address}:53", "--answer", answer, "--timeout", str(TIMEOUT),
                               "--ready", str(ready), "--report", str(tmp_path / f"{name}.json"))  # fmt: skip
        process = await trio.lowlevel.open_process(["ip", "netns", "exec", ns, *argv], cwd=ROOT)
        while not ready.exists():
            assert process.poll() is None, f"the {name} resolver exited before it was ready"
            await trio.sleep(0.01)
        return process

    async def stop_resolver(process: trio.Process, name: str) -> dict[str, Any]:
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        report: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
        return report

    ns_etc.mkdir(parents=True)
    resolvers: list[trio.Process] = []
    try:
        ns_resolv_conf.write_bytes(NS_ORIGINAL)
        inode = ns_resolv_conf.stat().st_ino
        with trio.fail_after(TIMEOUT):
            await trio.run_process(["ip", "netns", "add", ns])
            try:
                await in_ns("ip", "link", "set", "lo", "up")
                for address in (TUNNEL_RESOLVER, LAN_RESOLVER):
                    await in_ns("ip", "address", "add", f"{address}/32", "dev", "lo")
                tunnel = await start_resolver("tunnel", TUNNEL_RESOLVER, "vpn.test=10.77.0.7")
                lan = await start_resolver("lan", LAN_RESOLVER, "lan.test=192.0.2.99")
                resolvers += [tunnel, lan]
                assert (await in_ns("cat", "/etc/resolv.conf")).encode() == NS_ORIGINAL  # the bind mount

                assert await script("apply") == "file"
                seen = await in_ns("cat", "/etc/resolv.conf")
                assert seen.startswith(HEADER_MARK) and "nameserver 10.77.0.53\nsearch corp.example\n" in seen
                assert LAN_RESOLVER not in seen
                assert ns_resolv_conf.read_text() == seen and ns_resolv_conf.stat().st_ino == inode
                assert _host_resolv_conf() == host_before
                assert (await in_ns("getent", "ahostsv4", "vpn.test")).split()[0] == "10.77.0.7"

                assert await script("revert") == "file"
                assert (await in_ns("cat", "/etc/resolv.conf")).encode() == NS_ORIGINAL
                assert ns_resolv_conf.read_bytes() == NS_ORIGINAL and ns_resolv_conf.stat().st_ino == inode
                assert _host_resolv_conf() == host_before
                assert (await in_ns("getent", "ahostsv4", "lan.test")).split()[0] == "192.0.2.99"

                tunnel_report = await stop_resolver(tunnel, "tunnel")
                lan_report = await stop_resolver(lan, "lan")
            finally:
                with trio.CancelScope(shield=True):
                    for process in resolvers:
                        process.kill()
                        await process.wait()
                    await trio.run_process(["ip", "netns", "del", ns], check=False)
    finally:
        shutil.rmtree(ns_etc, ignore_errors=True)
        if created_netns_etc:
            try:
                netns_etc.rmdir()
            except OSError:
                pass  # someone else's namespace files appeared meanwhile
    assert set(tunnel_report["names"]) == {"vpn.test"} and tunnel_report["answered"] >= 1
    assert set(lan_report["names"]) == {"lan.test"}  # nothing asked while the tunnel's DNS was applied
    assert tunnel_report["malformed"] == lan_report["malformed"] == 0
    assert _host_resolv_conf() == host_before
    assert ns not in await namespaces()
