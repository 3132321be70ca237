"""systemd's service protocol (``drivers/systemd.py``) and the example units (``examples/systemd/``).

Determinism rules: notifications go to real ``AF_UNIX`` datagram sockets in
``tmp_path`` (or the abstract namespace, under a random name) and are read
back without waiting (the datagram is queued before ``sendto`` returns); the
watchdog and the STATUS= rate limit run on ``autojump_clock`` and assert exact
virtual times.  The unit files are checked by a structural validator that
always runs and, where the machine has ``systemd-analyze``, by ``systemd-analyze
verify`` in the same test (not a skip where it is missing: CI makes skips failures).
"""

from __future__ import annotations

import configparser
import io
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_util

from jvpn_trio.commands import serve as serve_command
from jvpn_trio.commands import up as up_command
from jvpn_trio.core.ids import Binding, PathId, SessionId
from jvpn_trio.core.session import ClientSnapshot, SessionRecord
from jvpn_trio.core.states import SessionState as S
from jvpn_trio.drivers import systemd
from jvpn_trio.drivers.client import ClientStatistics, RuntimeStatus
from jvpn_trio.drivers.systemd import Notifier, notify_address, status_assignment, under_systemd, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "examples" / "systemd"
SERVICE_DOC = ROOT / "docs" / "service.md"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


# -- the messages ----------------------------------------------------------------------------------


def test_ready_status_stopping_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    log = Log()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path}, log=log)
    assert notifier.enabled
    assert notifier.ready("ATTACHED on p1 (eth0)")
    assert notifier.status("CONNECTING")
    assert notifier.stopping()
    assert notifier.watchdog()
    notifier.close()
    assert received(sock) == ["READY=1\nSTATUS=ATTACHED on p1 (eth0)", "STATUS=CONNECTING", "STOPPING=1", "WATCHDOG=1"]
    assert notifier.statistics() == systemd.NotifierStatistics(enabled=True, sent=4, failed=0, last_error=None)
    assert log.lines == []


def test_an_abstract_socket_is_named_with_an_at_sign() -> None:
    name = f"jvpn-trio-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        assert notify_address("@" + name) == "\0" + name
        assert systemd.notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == ["READY=1\nSTATUS=up"]
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    log = Log()
    notifier = Notifier.from_environ({}, log=log)
    assert not notifier.enabled
    assert (notifier.ready("x"), notifier.status("y"), notifier.stopping(), notifier.watchdog()) == (False,) * 4
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": ""})
    assert notifier.statistics() == systemd.NotifierStatistics(enabled=False, sent=0, failed=0, last_error=None)
    assert log.lines == []


def test_a_missing_socket_is_logged_once_and_never_raised(tmp_path: Path) -> None:
    log = Log()
    notifier = Notifier(str(tmp_path / "gone.sock"), log=log)
    assert notifier.enabled
    for _ in range(3):
        assert not notifier.ready("x")
    stats = notifier.statistics()
    assert (stats.sent, stats.failed) == (0, 3)
    assert "ENOENT" in (stats.last_error or "")
    assert len(log.lines) == 1
    assert log.lines[0].startswith(f"cannot notify systemd: {tmp_path / 'gone.sock'}: ")
    assert log.lines[0].endswith("later failures are counted, not logged")


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234", "@"])
def test_an_address_we_cannot_use_is_logged_once(value: str) -> None:
    log = Log()
    notifier = Notifier(value, log=log)
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.statistics().failed == 1
    assert len(log.lines) == 1 and value in log.lines[0]


def test_a_full_queue_is_counted_not_blocking(receiver: tuple[socket.socket, str]) -> None:
    # systemd reads its notify socket from its own loop; if it falls behind, sendto says EAGAIN, never blocks.
    sock, path = receiver
    log = Log()
    notifier = Notifier(path, log=log)
    sent = [notifier.status(f"n{i}") for i in range(20_000)]
    assert False in sent, "the kernel never refused: the queue cannot have been full"
    stats = notifier.statistics()
    assert stats.failed == sent.count(False) and stats.sent == sent.count(True)
    assert "EAGAIN" in (stats.last_error or "")
    assert len(log.lines) == 1
    assert len(received(sock)) == stats.sent


def test_a_status_is_one_line_and_bounded() -> None:
    assert status_assignment("a\nb  c") == "STATUS=a b c"
    long = status_assignment("x" * 1000)
    assert len(long) == len("STATUS=") + systemd.STATUS_MAX_CHARS and long.endswith("…")


def test_under_systemd() -> None:
    assert under_systemd({"INVOCATION_ID": "0123"})
    assert under_systemd({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert not under_systemd({})
    assert not under_systemd({"INVOCATION_ID": ""})


# -- the watchdog ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process is watched
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


class RecordingNotifier(Notifier):
    """Enabled, and keeps (virtual time, message) instead of sending."""

    def __init__(self) -> None:
        super().__init__("@recording", log=Log())
        self.messages: list[tuple[float, tuple[str, ...]]] = []

    def notify(self, *assignments: str) -> bool:
        self.messages.append((trio.current_time(), assignments))
        return True


async def test_the_watchdog_pings_at_half_the_interval(autojump_clock: trio.abc.Clock) -> None:
    notifier = RecordingNotifier()
    start = trio.current_time()
    with trio.move_on_after(25.0):
        async with trio.open_nursery() as nursery:
            await nursery.start(systemd.serve_watchdog, notifier, 10.0)
    assert [(t - start, m) for t, m in notifier.messages] == [(float(t), ("WATCHDOG=1",)) for t in range(0, 25, 5)]


# -- STATUS= follows a value, rate-limited ------------------------------------------------------------


async def test_status_lines_are_sent_on_change_at_most_once_a_second(autojump_clock: trio.abc.Clock) -> None:
    notifier = RecordingNotifier()
    value = trio_util.AsyncValue("A")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(systemd.publish_status, notifier, value, str.lower)
        await trio.sleep(0.2)
        value.value = "B"  # within the first second: held back ...
        await trio.sleep(0.2)
        value.value = "C"  # ... and overtaken: only the latest is sent, at 1.0
        await trio.sleep(2.6)
        value.value = "D"  # after a quiet spell: at once
        await trio.sleep(0.1)
        value.value = "E"
        await trio.sleep(0.1)
        value.value = "D"  # changed and changed back within the interval: nothing to say
        await trio.sleep(0.1)
        value.value = "d".upper()
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    sent = [(round(t - start, 6), m) for t, m in notifier.messages]
    assert sent == [(0.0, ("STATUS=a",)), (1.0, ("STATUS=c",)), (3.0, ("STATUS=d",))]


async def test_status_publisher_returns_at_once_without_systemd() -> None:
    with trio.fail_after(1):
        await systemd.publish_status(Notifier(None), trio_util.AsyncValue(1), str)


# -- what up and serve say -----------------------------------------------------------------------------

SID = SessionId(bytes(range(16)))
P1, P2 = PathId(1), PathId(2)


def status_with(state: S, binding: Binding | None) -> RuntimeStatus:
    record = SessionRecord(
        session_id=SID, state=state, version=3, binding=binding, created_at=0.0, unbound_since=None,
        recovering_since=None, bound_since=None, last_path=None, switch_times=(),
    )  # fmt: skip
    snapshot = ClientSnapshot(
        now=1.0, record=record, policy_fingerprint="f", max_switches_per_minute=6, switches_last_minute=0,
        gateway_version=3, paths=(), pinned=None, pending=None, recovery_deadline=None, unbound_deadline=None,
        counters=(),
    )  # fmt: skip
    return RuntimeStatus(
        snapshot=snapshot, paths=((P1, "eth0", "ethernet"), (P2, "wlan0", "wifi")), tunnel_address=None,
        statistics=ClientStatistics(), sessions_started=1,
    )  # fmt: skip


def test_the_clients_status_line() -> None:
    line = up_command.service_status_line
    assert line(None) == "CONNECTING"
    between = RuntimeStatus(snapshot=None, paths=(), tunnel_address=None, statistics=ClientStatistics(), sessions_started=2)
    assert line(between) == "CONNECTING (after 2 session(s))"
    assert line(status_with(S.ATTACHED, Binding(P2, ("192.0.2.1", 51820)))) == "ATTACHED on p2 (wlan0)"
    assert line(status_with(S.RECOVERING, None)) == "RECOVERING, no path"
    assert up_command.is_attached(status_with(S.ATTACHED, Binding(P1, ("192.0.2.1", 51820))))
    assert not up_command.is_attached(status_with(S.VOLATILE, Binding(P1, ("192.0.2.1", 51820))))
    assert not up_command.is_attached(None) and not up_command.is_attached(between)


class Terminal:
    def isatty(self) -> bool:
        return True


def test_up_is_headless_under_systemd_and_off_a_terminal() -> None:
    assert up_command.wants_tui(False, environ={}, stream=Terminal())  # type: ignore[arg-type]
    assert not up_command.wants_tui(True, environ={}, stream=Terminal())  # type: ignore[arg-type]
    assert not up_command.wants_tui(False, environ={"INVOCATION_ID": "0123"}, stream=Terminal())  # type: ignore[arg-type]
    assert not up_command.wants_tui(False, environ={"NOTIFY_SOCKET": "/run/x"}, stream=Terminal())  # type: ignore[arg-type]
    assert not up_command.wants_tui(False, environ={}, stream=io.StringIO())


def test_the_gateways_status_line() -> None:
    assert serve_command.service_status_line(None, listening="0.0.0.0:51820 (control 51821)") == (
        "0 session(s); listening on 0.0.0.0:51820 (control 51821)"
    )


# -- the example units ------------------------------------------------------------------------------------

#: Every unit must have these, with these values (docs/service.md says why).
REQUIRED = {
    "Service": {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "ProtectSystem": "strict",
                "NoNewPrivileges": "yes", "RuntimeDirectory": "jvpn-trio", "RuntimeDirectoryPreserve": "yes",
                "DevicePolicy": "closed", "DeviceAllow": "/dev/net/tun rw", "User": "jvpn-trio"},
    "Install": {"WantedBy": "multi-user.target"},
}  # fmt: skip
#: Options whose every value must be justified in docs/service.md (each capability, path, family, syscall set).
JUSTIFIED_VALUES = ("CapabilityBoundingSet", "AmbientCapabilities", "ReadWritePaths", "RestrictAddressFamilies", "SystemCallFilter")
UNIT_FILES = {"jvpn-trio.service": "up", "jvpn-trio-gateway.service": "serve"}


def parse_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, delimiters=("=",), comment_prefixes=("#", ";"), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in units
    parser.read_string(path.read_text(), source=str(path))
    return parser


def structural_problems(path: Path, command: str, doc: str) -> list[str]:
    """What is wrong with a unit file, by the rules of docs/service.md (empty: nothing)."""
    unit = parse_unit(path)
    problems = []
    for section, wanted in REQUIRED.items():
        for key, value in wanted.items():
            if not unit.has_option(section, key) or unit.get(section, key) != value:
                problems.append(f"[{section}] {key} should be {value!r}")
    exec_start = unit.get("Service", "ExecStart", fallback="").split()
    if exec_start[:2] != ["/usr/local/bin/jvpn-trio", command]:
        problems.append(f"ExecStart should run `/usr/local/bin/jvpn-trio {command}`, not {exec_start}")
    if "--config" in exec_start:
        problems.append("ExecStart should use the default config path, not --config")
    options = {key for section in unit.sections() for key in unit.options(section)}
    for key in sorted(options):
        if f"`{key}=" not in doc and f"`{key}`" not in doc:
            problems.append(f"{key}= is not explained in docs/service.md")
    for key in JUSTIFIED_VALUES:
        for value in unit.get("Service", key, fallback="").split():
            if f"`{value.lstrip('-')}`" not in doc:
                problems.append(f"{key}={value}: `{value.lstrip('-')}` is not justified in docs/service.md")
    return problems


def systemd_analyze_verify(path: Path, tmp_path: Path) -> str | None:
    """``systemd-analyze verify``'s complaints about the unit, or None where the tool is missing.

    ExecStart must name an executable that exists, so the copy verified runs this
    environment's ``jvpn-trio`` console script instead of /usr/local/bin's.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    script = Path(sys.executable).with_name("jvpn-trio")
    assert script.exists(), f"the console script {script} is not installed (pip install -e .)"
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/usr/local/bin/jvpn-trio", str(script)))
    done = subprocess.run(
        [tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    noise = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return "\n".join(noise) if done.returncode or noise else ""


@pytest.mark.parametrize(("name", "command"), sorted(UNIT_FILES.items()))
def test_the_example_unit_is_valid(name: str, command: str, tmp_path: Path) -> None:
    path = UNITS / name
    assert structural_problems(path, command, SERVICE_DOC.read_text()) == []
    complaints = systemd_analyze_verify(path, tmp_path)
    if complaints is not None:  # a second opinion where systemd is installed; the checks above always run
        assert complaints == "", f"systemd-analyze verify {name}:\n{complaints}"


def test_the_validator_finds_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.service"
    bad.write_text(
        "[Unit]\nDescription=x\n[Service]\nType=simple\nExecStart=/usr/bin/jvpn-trio up --config /x\n"
        "CapabilityBoundingSet=CAP_SYS_ADMIN\nFrobnicate=yes\n[Install]\nWantedBy=multi-user.target\n"
    )
    problems = structural_problems(bad, "up", SERVICE_DOC.read_text())
    text = "\n".join(problems)
    assert "[Service] Type should be 'notify'" in text
    assert "ExecStart should run" in text and "should use the default config path" in text
    assert "Frobnicate= is not explained" in text
    assert "`CAP_SYS_ADMIN` is not justified" in text
    if shutil.which("systemd-analyze"):  # and the second opinion, where there is one, objects too
        (tmp_path / "verify").mkdir()
        bad.write_text(bad.read_text().replace("Frobnicate=yes", "SystemCallFilter=@no-such-group"))
        assert "no-such-group" in (systemd_analyze_verify(bad, tmp_path / "verify") or "")


def test_the_docs_name_both_units_and_the_default_configs() -> None:
    doc = SERVICE_DOC.read_text()
    for name in UNIT_FILES:
        assert f"examples/systemd/{name}" in doc
    for default in ("/etc/jvpn-trio/client.toml", "/etc/jvpn-trio/gateway.toml"):
        assert default in doc
    assert re.search(r"sudo systemctl enable --now jvpn-trio\b", (ROOT / "README.md").read_text())
