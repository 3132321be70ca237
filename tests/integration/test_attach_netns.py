"""Bare ``jvpn-trio`` attached to a real agent, as a non-root member of the control group, in a terminal.

A real ``jvpn-trio serve`` and ``jvpn-trio up`` run headless in a three-path
lab (``tests/netns.py``), the client's ``control_group`` a group this test
creates (``groupadd``) with one user in it (``useradd``, no home, no login
shell); both are removed at the end whatever happens.  The control socket
lives in a directory the agent creates itself (``serve_control`` makes it
``0750``, owned by the group) inside a fresh ``0755`` directory, so the
user reaches it only through the group.

The UI runs in a detached tmux session on a private server
(``tmux -L jvatt<random>``, no user config), as that user
(``runuser -u USER -- python ... --socket PATH``).  The user cannot run the
test's own interpreter when it lives in root's home, so it runs the system
Python of the same version with this environment's site directory added
(the test skips, saying so, when there is no such Python).

1. With ``control_steer_group = true``: the UI attaches (header, the three
   paths by interface); eth0 is blackholed and a TRANSPORT_SWITCH appears
   on screen; ``p`` opens the picker, ``3`` chooses lte0, Enter pins it and
   the OPERATOR_ACTION (by the user's uid) is in the event pane and the
   agent's event log; ``q`` ends the UI with exit 0 while the agent keeps
   running (its status still answers ATTACHED, also to ``jvpn-trio status``
   run as the user).
2. The agent restarted with ``control_steer_group = false``: the same user
   may still look, and ``p`` + Enter give a "permission denied" notice on
   screen, the UI keeps running, nothing is pinned; ``q`` exits 0.

Determinism rules: every wait is bounded (``trio.fail_after``) and waits for
something on screen, in a status reply or in a file, never for a time;
nothing about durations is asserted.  The tmux server is killed, and the
processes left in its panes with it, before the user is removed.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.lab.netns import Lab, LabProcess
from jvpn_trio.lab.processes import guard_tunnel, write_configs
from tests.netns import lab, requires_lab  # noqa: F401  (lab is a fixture)

ROOT = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")
ACCOUNT_TOOLS = ("groupadd", "useradd", "userdel", "groupdel", "runuser")
#: Bound on the whole test: the lab, a gateway, two agents, two UIs.
TEST_BOUND_S = 150.0
#: Bound on each wait for something on screen, in a status or a file.
WAIT_S = 30.0
#: How often the screen, a status or a file is looked at again while waiting.
POLL_S = 0.2
#: Each tmux command and each account command.
COMMAND_TIMEOUT_S = 10.0
#: The terminal the UI draws in (wide enough for the picker and the notice line).
COLUMNS, ROWS = 120, 40

#: The tmux server's environment, which its panes inherit: without the COLUMNS and LINES a test runner may
#: export (rich would believe them over the terminal's real size).
TMUX_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (CI installs it: apt-get install tmux)"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ACCOUNT_TOOLS),
        reason=f"needs {', '.join(ACCOUNT_TOOLS)} to run the UI as a non-root member of a group",
    ),
]


@attrs.frozen(kw_only=True)
class Looker:
    """The test's group and its one non-root member, and a directory that member can traverse."""

    user: str
    group: str
    uid: int
    public_dir: Path

    @property
    def socket(self) -> Path:
        # The agent creates "ctl" itself: 0750, owned by the group.
        return self.public_dir / "ctl" / "client.sock"


def _account(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


@pytest.fixture
def looker() -> Iterator[Looker]:
    """A fresh group and user (unique names), removed at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a group and a user")
    suffix = secrets.token_hex(3)
    group, user = f"jvatg{suffix}", f"jvatu{suffix}"
    public_dir = Path(tempfile.mkdtemp(prefix="jvpn-attach-"))
    public_dir.chmod(0o755)
    try:
        made = _account("groupadd", group)
        assert made.returncode == 0, made.stderr
        made = _account("useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                        "--gid", group, user)  # fmt: skip
        assert made.returncode == 0, made.stderr
        yield Looker(user=user, group=group, uid=pwd.getpwnam(user).pw_uid, public_dir=public_dir)
    finally:
        _account("userdel", user)
        _account("groupdel", group)
        shutil.rmtree(public_dir, ignore_errors=True)
        assert not _known(pwd.getpwnam, user), f"could not remove the test's user {user}"
        assert not _known(grp.getgrnam, group), f"could not remove the test's group {group}"


def _known(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


#: What the user's Python runs: the CLI's ``main`` with the arguments (bare ``jvpn-trio``: the attached UI).
RUN_CLI = "from jvpn_trio.cli import main; sys.exit(main(sys.argv[1:]))"


def user_python(user: str) -> list[str] | None:
    """A Python command ``user`` can run that imports jvpn_trio from this tree, or None.

    The test's interpreter if the user can run it; else the system Python of the same
    version with this environment's site directory (its .pth files install the package).
    """
    site_dir = sysconfig.get_paths()["purelib"]
    boot = f"import site, sys; site.addsitedir({site_dir!r}); "
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in dict.fromkeys(e for e in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")) if e):
        if _account("runuser", "-u", user, "--", exe, "-I", "-c", boot + "import jvpn_trio.ui.attached").returncode == 0:
            return [exe, "-I", "-c", boot + RUN_CLI]
    return None


def set_access(config: Path, socket: Path, *, group: str, steer: bool) -> None:
    """Point the client's control socket at ``socket`` and give ``group`` access (and steering, with ``steer``)."""
    text = re.sub(r"^control_(group|steer_group) = .*\n", "", config.read_text(), flags=re.MULTILINE)
    text, n = re.subn(
        r'^control_socket = ".*"$',
        f"control_socket = {json.dumps(str(socket))}\ncontrol_group = {json.dumps(group)}\n"
        f"control_steer_group = {json.dumps(steer)}",
        text,
        flags=re.MULTILINE,
    )
    assert n == 1
    config.write_text(text)


class Tmux:
    """A private tmux server (``-L``) running one command per session; killed with what still runs in it."""

    def __init__(self) -> None:
        self.server = f"jvatt{secrets.token_hex(4)}"
        self.socket_path: Path | None = None

    async def run(self, *args: str) -> str:
        assert TMUX is not None
        with trio.fail_after(COMMAND_TIMEOUT_S):
            done = await trio.run_process([TMUX, "-L", self.server, "-f", "/dev/null", *args], capture_stdout=True,
                                          capture_stderr=True, check=False, env=TMUX_ENV)  # fmt: skip
        assert done.returncode == 0, f"tmux {args[0]}: {done.stderr.decode()}"
        return done.stdout.decode()

    async def start(self, name: str, command: str) -> None:
        await self.run("new-session", "-d", "-s", name, "-x", str(COLUMNS), "-y", str(ROWS), "sh", "-c", command)
        self.socket_path = Path((await self.run("display-message", "-p", "-t", name, "#{socket_path}")).strip())

    async def screen(self, name: str) -> str:
        return await self.run("capture-pane", "-p", "-t", name)

    async def keys(self, name: str, *keys: str) -> None:
        await self.run("send-keys", "-t", name, *keys)

    async def wait_screen(self, name: str, needles: tuple[str, ...], what: str) -> str:
        """The screen once it shows every needle; fails with the last screen after :data:`WAIT_S`."""
        screen = ""
        with trio.move_on_after(WAIT_S):
            while True:
                screen = await self.screen(name)
                if all(n in screen for n in needles):
                    return screen
                await trio.sleep(POLL_S)
        pytest.fail(f"{what}: not on screen after {WAIT_S} s: {needles}\n{screen}")

    def kill(self) -> None:
        """End what the live panes run (by pid, the server's children and theirs), the server, and its socket."""
        assert TMUX is not None
        base = [TMUX, "-L", self.server, "-f", "/dev/null"]
        listed = subprocess.run([*base, "list-panes", "-a", "-F", "#{pane_pid}"], check=False, capture_output=True,
                                text=True, timeout=COMMAND_TIMEOUT_S, env=TMUX_ENV)  # fmt: skip
        panes = [int(line) for line in listed.stdout.split()] if listed.returncode == 0 else []
        for pid in [p for pane in panes for p in (*_descendants(pane), pane)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run([*base, "kill-server"], check=False, capture_output=True, timeout=COMMAND_TIMEOUT_S, env=TMUX_ENV)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)  # a server that exited with its last session leaves it


def _descendants(pid: int) -> list[int]:
    """The pids below ``pid`` (from /proc), to end what a pane started after its server is gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


async def wait_for(check: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not check():
            await trio.sleep(POLL_S)
        return
    pytest.fail(f"{what}: not within {WAIT_S} s")


async def agent_status(socket: Path, agent: LabProcess, err: Path) -> dict[str, object] | None:
    if agent.returncode is not None:
        pytest.fail(f"the agent exited {agent.returncode}: {err.read_text()[-2000:]}")
    try:
        return await query_control(socket, {"cmd": "status"}, timeout=2.0)
    except ControlError:
        return None


async def wait_attached(socket: Path, agent: LabProcess, err: Path) -> dict[str, object]:
    with trio.move_on_after(WAIT_S):
        while True:
            status = await agent_status(socket, agent, err)
            if status is not None and status.get("state") == "ATTACHED":
                return status
            await trio.sleep(POLL_S)
    pytest.fail(f"the agent is not ATTACHED after {WAIT_S} s: {err.read_text()[-2000:]}")


def client_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def serve_argv(command: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "jvpn_trio", command, "--config", str(config), "--quiet"]


@requires_lab
async def test_a_group_member_attaches_sees_a_switch_pins_and_quits(lab: Lab, tmp_path: Path, looker: Looker) -> None:  # noqa: F811
    python = await trio.to_thread.run_sync(user_python, looker.user)
    if python is None:
        pytest.skip(f"user {looker.user} can run no Python that imports jvpn_trio from {ROOT} (the venv's is in root's home)")
    config, socket, events = tmp_path / "client.toml", looker.socket, tmp_path / "client-events.jsonl"
    ui_command = shlex.join(["runuser", "-u", looker.user, "--", *python, "--socket", str(socket)])
    tmux = Tmux()
    try:
        with trio.fail_after(TEST_BOUND_S):
            await trio.to_thread.run_sync(functools.partial(write_configs, tmp_path, lab, policy={}))
            set_access(config, socket, group=looker.group, steer=True)
            await guard_tunnel(lab)
            gateway = await lab.start_process(lab.gateway_ns, serve_argv("serve", tmp_path / "gateway.toml"),
                                              stderr_path=tmp_path / "gateway.err")  # fmt: skip
            await wait_for(lambda: (tmp_path / "gateway.sock").exists(), "the gateway's socket")
            agent = await lab.start_process(lab.client_ns, serve_argv("up", config), stderr_path=tmp_path / "client.err")
            await wait_attached(socket, agent, tmp_path / "client.err")
            st = os.stat(socket.parent)
            assert st.st_gid == grp.getgrnam(looker.group).gr_gid and st.st_mode & 0o777 == 0o750

            # 1. Attach as the user, see a switch, pin with the picker, quit.
            exit_file = tmp_path / "ui1.exit"
            await tmux.start("steer", f"{ui_command}; echo EXIT=$? > {shlex.quote(str(exit_file))}")
            screen = await tmux.wait_screen("steer", ("ATTACHED", "paths", "eth0", "wifi0", "lte0", "events"), "the attached UI")
            assert "jvpn-trio" in screen and "session" in screen
            await lab.blackhole("eth0", True)
            await tmux.wait_screen("steer", ("TRANSPORT_SWITCH",), "the switch after eth0's blackhole")
            await wait_for(lambda: any(e.get("kind") == "TRANSPORT_SWITCH" for e in client_events(events)), "the switch in the log")
            await tmux.keys("steer", "p")
            await tmux.wait_screen("steer", ("pin a path",), "the picker")
            await tmux.keys("steer", "3")
            await tmux.keys("steer", "Enter")
            screen = await tmux.wait_screen("steer", ("OPERATOR_ACTION", "OPERATOR_PIN"), "the pin in the event pane")
            assert f"uid {looker.uid}" in screen, screen
            actions = [e for e in client_events(events) if e.get("kind") == "OPERATOR_ACTION"]
            assert len(actions) == 1 and actions[0]["reason"] == "OPERATOR_PIN"
            assert actions[0]["by"] == f"uid {looker.uid}" and actions[0]["path"] == "p3"
            await tmux.keys("steer", "q")
            await wait_for(exit_file.exists, "the UI's exit after q")
            assert exit_file.read_text().strip() == "EXIT=0"
            status = await wait_attached(socket, agent, tmp_path / "client.err")  # the agent goes on
            assert agent.returncode is None and status.get("pinned_path") == "p3"
            looked = await trio.run_process(["runuser", "-u", looker.user, "--", *python, "status", "--socket", str(socket)],
                                            capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
            assert looked.returncode == 0 and "ATTACHED" in looked.stdout.decode(), looked.stderr.decode()

            # 2. Restarted without steering for the group: the same user looks, and a pin is refused.
            assert await agent.terminate() == 0, (tmp_path / "client.err").read_text()
            set_access(config, socket, group=looker.group, steer=False)
            agent = await lab.start_process(lab.client_ns, serve_argv("up", config), stderr_path=tmp_path / "client2.err")
            await wait_attached(socket, agent, tmp_path / "client2.err")
            exit_file = tmp_path / "ui2.exit"
            await tmux.start("look", f"{ui_command}; echo EXIT=$? > {shlex.quote(str(exit_file))}")
            await tmux.wait_screen("look", ("ATTACHED", "eth0", "wifi0", "lte0"), "the read-only UI")
            await tmux.keys("look", "p")
            await tmux.wait_screen("look", ("pin a path",), "the picker (read-only)")
            await tmux.keys("look", "Enter")
            screen = await tmux.wait_screen("look", ("pin refused", "permission denied"), "the refusal notice")
            assert not exit_file.exists() and "ATTACHED" in screen  # a notice, not a crash
            await tmux.keys("look", "q")
            await wait_for(exit_file.exists, "the read-only UI's exit after q")
            assert exit_file.read_text().strip() == "EXIT=0"
            status = await wait_attached(socket, agent, tmp_path / "client2.err")
            assert status.get("pinned_path") is None
            assert [e for e in client_events(events) if e.get("kind") == "OPERATOR_ACTION"] == actions

            assert await agent.terminate() == 0, (tmp_path / "client2.err").read_text()
            assert await gateway.terminate() == 0
    finally:
        tmux.kill()
