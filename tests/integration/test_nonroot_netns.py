"""``serve``, ``up`` and ``down`` as a user that is not root, holding only CAP_NET_ADMIN (root to set up).

The example units run both as ``User=jvpn-trio`` with ``AmbientCapabilities=``
(docs/service.md, Privileges).  Here a fresh system user (``jvtnr`` + 6 hex
digits, deleted at the end) runs real processes in a three-path lab, started as
systemd starts them: ``setpriv`` sets the uid, gid and groups, and makes the
capabilities inheritable, ambient and the whole bounding set, so the program
runs with them effective and nothing else of root.

1. Without capabilities ``up`` and ``serve`` refuse to start in one line (exit 2).
2. The gateway (CAP_NET_ADMIN) and the client (CAP_NET_ADMIN, CAP_NET_RAW): the
   processes really are that uid with exactly those capabilities, the session
   is ATTACHED (the control socket's ``status``), a UDP ping crosses the tunnel,
   and SIGTERM exits 0 leaving nothing behind (``find_leftovers``).
3. Crash recovery as that user: a SIGKILLed client leaves its kill switch,
   ``up --take-over`` takes over, and after another SIGKILL ``down`` removes
   everything.
4. DNS by the file method (what a lab namespace uses) cannot work without
   root: one line naming why, exit 2, nothing left behind.

Two things of the test machine are not what a unit sees, and are fixed for the
child processes only, inside a private mount namespace of each (the host's
mounts and files are never changed):

* the interpreter may live under a directory the user cannot enter (pyenv in
  root's 0700 home): a tmpfs over that directory exposes only the path to it;
* ``/dev/net/tun`` may be a bare devtmpfs node (0600): a node with udev's
  default mode (0666) replaces it.

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real
condition (a socket file, the control socket's status, an exit); the user, its
run directory and the lab are removed on every way out.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from jvpn_trio.commands.process import NO_CAP_NET_ADMIN
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.drivers.leftovers import find_leftovers
from jvpn_trio.lab.netns import Lab, LabProcess
from jvpn_trio.lab.processes import CLIENT_TUN, GATEWAY_TUNNEL, guard_tunnel, write_configs
from tests.netns import lab, requires_lab, run_tool, start_server  # noqa: F401  (lab is a fixture)

#: Bound on the whole test: the lab, a gateway, four clients, a `down`.
TEST_BOUND_S = 120.0
#: How often a socket file or a status is looked at again.
POLL_S = 0.05
#: One control-socket query.
QUERY_TIMEOUT_S = 2.0
#: The capabilities each unit grants (examples/systemd/*.service, AmbientCapabilities=).
GATEWAY_CAPS = ("net_admin",)
CLIENT_CAPS = ("net_admin", "net_raw")
#: Their bits in /proc/<pid>/status (linux/capability.h).
CAP_BITS = {"net_admin": 12, "net_raw": 13}
#: Where the tunnel is pinged (a udp-echo on the gateway's tunnel address).
ECHO_PORT = 5003
#: The user can write neither bytecode caches nor a coverage run's data files (root's): no tries, no warnings.
CHILD_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "COVERAGE_PROCESS_START": "", "COVERAGE_PROCESS_CONFIG": ""}
#: The tools a run needs besides the lab's.
TOOLS = ("useradd", "userdel", "setpriv", "unshare", "mknod")

needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (passwd, util-linux, coreutils) to run as another user",
)


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture
def service_user() -> Iterator[User]:
    """A fresh system user and group of the same name, deleted afterwards."""
    name = "jvtnr" + secrets.token_hex(3)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)  # if userdel kept it


@pytest.fixture
def run_dir(service_user: User) -> Iterator[Path]:
    """The user's run directory: configs, keys, sockets, logs (``tmp_path`` is in root's 0700 tree)."""
    directory = Path(tempfile.mkdtemp(prefix="jvtnr-run-"))
    os.chown(directory, service_user.uid, service_user.gid)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _can_enter(path: Path, user: User) -> bool:
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def closed_directories(targets: list[Path], user: User) -> dict[Path, set[str]]:
    """Directories on the way to ``targets`` that ``user`` cannot enter, with the entries wanted in each."""
    closed: dict[Path, set[str]] = {}
    for target in targets:
        for parent in reversed(target.parents):
            child = target.relative_to(parent).parts[0]
            if not _can_enter(parent, user):
                closed.setdefault(parent, set()).add(child)
    return closed


def mount_script(user: User, hidden: Path) -> str:
    """Shell run as root in the child's own mount namespace before ``setpriv``: see the module notes."""
    here = Path(__file__).resolve().parents[2]
    targets = [Path(p).resolve() for p in (sys.executable, sys.prefix, sys.base_prefix, here)]
    closed = closed_directories(targets, user)
    if any(other != top and top in other.parents for top in closed for other in closed):
        pytest.skip(f"the interpreter is behind nested directories {sorted(map(str, closed))} closed to other users")
    q = shlex.quote
    lines = []
    for number, (directory, entries) in enumerate(sorted(closed.items())):
        copy = hidden / str(number)
        lines += [f"mkdir -p {q(str(copy))}", f"mount --bind {q(str(directory))} {q(str(copy))}",
                  f"mount -t tmpfs -o mode=0755 tmpfs {q(str(directory))}"]  # fmt: skip
        for entry in sorted(entries):
            inside, exposed = q(str(copy / entry)), q(str(directory / entry))
            lines += [f"mkdir {exposed}", f"mount --bind {inside} {exposed}"]
    tun = os.stat("/dev/net/tun")
    if tun.st_mode & 0o006 != 0o006:
        major, minor = os.major(tun.st_rdev), os.minor(tun.st_rdev)
        lines += ["mount -t tmpfs -o mode=0755 tmpfs /dev/net", f"mknod -m 0666 /dev/net/tun c {major} {minor}"]
    return " && ".join([*lines, 'exec "$@"'])


def as_user(user: User, caps: tuple[str, ...], argv: list[str], hidden: Path) -> list[str]:
    """``argv`` run as the unit runs it: ``user``, ``caps`` inheritable, ambient and the whole bounding set."""
    wanted = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    setpriv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
               f"--inh-caps={wanted}", f"--bounding-set={wanted}"]  # fmt: skip
    if caps:
        setpriv.append(f"--ambient-caps={wanted}")
    return ["unshare", "--mount", "--", "sh", "-c", mount_script(user, hidden), "sh", *setpriv, "--", *argv]


def jvpn(command: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jvpn_trio", command, "--config", str(config), *extra]


@attrs.frozen
class Run:
    lab: Lab
    user: User
    directory: Path
    hidden: Path

    async def start(self, ns: str, caps: tuple[str, ...], argv: list[str], name: str) -> LabProcess:
        return await self.lab.start_process(
            ns, as_user(self.user, caps, argv, self.hidden),
            stdout_path=self.directory / f"{name}.out", stderr_path=self.directory / f"{name}.err",
            env=CHILD_ENV,
        )  # fmt: skip

    async def client(self, name: str, *extra: str, config: str = "client.toml") -> LabProcess:
        return await self.start(self.lab.client_ns, CLIENT_CAPS, jvpn("up", self.directory / config, *extra), name)

    def stderr(self, name: str) -> str:
        path = self.directory / f"{name}.err"
        return path.read_text() if path.exists() else ""

    async def wait_attached(self, process: LabProcess, name: str) -> None:
        while True:
            assert process.returncode is None, f"{name} exited {process.returncode}: {self.stderr(name)}"
            try:
                status = await query_control(self.directory / "client.sock", {"cmd": "status"}, timeout=QUERY_TIMEOUT_S)
            except ControlError:
                status = {}
            if status.get("state") == "ATTACHED":
                return
            await trio.sleep(POLL_S)


def capability_mask(caps: tuple[str, ...]) -> int:
    return sum(1 << CAP_BITS[cap] for cap in caps)


def process_identity(pid: int) -> dict[str, int]:
    """Effective uid and the effective, ambient and bounding capability sets of ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "euid": int(fields["Uid"].split()[1]),
        **{key: int(fields[key].strip(), 16) for key in ("CapEff", "CapAmb", "CapBnd")},
    }


def share_with(user: User, directory: Path) -> None:
    for path in (directory, *directory.iterdir()):
        os.chown(path, user.uid, user.gid)


@needs_tools
@requires_lab
async def test_gateway_and_client_run_as_a_user_with_only_their_capabilities(
    lab: Lab, service_user: User, run_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    hidden = tmp_path / "hidden"  # root's 0700 tree: the closed directories' copies stay closed
    run = Run(lab, service_user, run_dir, hidden)
    with trio.fail_after(TEST_BOUND_S):
        await trio.to_thread.run_sync(lambda: write_configs(run_dir, lab, policy={}))
        dns_config = (run_dir / "client.toml").read_text().replace("dns = []", f'dns = ["{GATEWAY_TUNNEL}"]')
        (run_dir / "client-dns.toml").write_text(dns_config)
        share_with(service_user, run_dir)
        await guard_tunnel(lab)

        # 1. Without CAP_NET_ADMIN: one line, exit 2, for both.
        for command, ns, config in (("up", lab.client_ns, "client.toml"), ("serve", lab.gateway_ns, "gateway.toml")):
            refused = await run.start(ns, (), jvpn(command, run_dir / config), f"{command}-no-caps")
            assert await refused.wait() == 2
            assert run.stderr(f"{command}-no-caps").splitlines() == [f"jvpn-trio: {NO_CAP_NET_ADMIN}"]

        # 2. The gateway and a client, as the units run them.
        gateway = await run.start(lab.gateway_ns, GATEWAY_CAPS, jvpn("serve", run_dir / "gateway.toml"), "gateway")
        while not (run_dir / "gateway.sock").exists():
            assert gateway.returncode is None, f"gateway exited {gateway.returncode}: {run.stderr('gateway')}"
            await trio.sleep(POLL_S)
        await start_server(lab, lab.gateway_ns, "udp-echo", f"{GATEWAY_TUNNEL}:{ECHO_PORT}", tmp_path=tmp_path, name="echo")
        client = await run.client("client")
        await run.wait_attached(client, "client")
        for process, caps in ((gateway, GATEWAY_CAPS), (client, CLIENT_CAPS)):
            mask = capability_mask(caps)
            assert process_identity(process.pid) == {
                "euid": service_user.uid, "CapEff": mask, "CapAmb": mask, "CapBnd": mask
            }, process.argv  # fmt: skip
        code, echo = await run_tool(
            lab, lab.client_ns, "udp-ping", "--connect", f"{GATEWAY_TUNNEL}:{ECHO_PORT}", "--count", "3",
            tmp_path=tmp_path, name="ping",
        )  # fmt: skip
        assert code == 0 and echo["replies"] >= 1, echo
        assert await client.terminate() == 0, run.stderr("client")
        assert (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty

        # 3. A crash, a take-over, another crash, then `down`: all as the user.
        crashed = await run.client("crashed")
        await run.wait_attached(crashed, "crashed")
        await crashed.kill()
        assert not (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty
        successor = await run.client("successor", "--take-over")
        await run.wait_attached(successor, "successor")
        assert "took over after an earlier agent: removed " in run.stderr("successor")
        await successor.kill()
        down = await run.start(lab.client_ns, CLIENT_CAPS, jvpn("down", run_dir / "client.toml"), "down")
        assert await down.wait() == 0, run.stderr("down")
        assert "removed nft table" in (run_dir / "down.out").read_text()
        assert (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty

        # 4. DNS by the file method: root's file, so one line saying so, and nothing left.
        dns = await run.client("dns", config="client-dns.toml")
        assert await dns.wait() == 2
        (line,) = run.stderr("dns").splitlines()[-1:]
        assert line.startswith("jvpn-trio: cannot write /etc/resolv.conf: EACCES"), run.stderr("dns")
        assert f"(uid {service_user.uid} is not root: the file DNS method needs root" in line
        assert "Traceback" not in run.stderr("dns")
        assert (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty

        assert await gateway.terminate() == 0, run.stderr("gateway")


def test_closed_directories_are_found_by_mode(tmp_path: Path) -> None:
    """The helper that decides what to expose: a 0700 directory of another owner is closed, 0755 is not."""
    (tmp_path / "open" / "x").mkdir(parents=True)
    (tmp_path / "shut" / "y").mkdir(parents=True)
    (tmp_path / "open").chmod(0o755)
    (tmp_path / "shut").chmod(0o700)
    owner = tmp_path.stat().st_uid
    stranger = User("nobody-here", owner + 1, os.getgid() + 1)
    found = closed_directories([tmp_path / "open" / "x", tmp_path / "shut" / "y"], stranger)
    assert tmp_path / "shut" in found and found[tmp_path / "shut"] == {"y"}
    assert tmp_path / "open" not in found
