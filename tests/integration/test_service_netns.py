"""``serve`` and ``up`` as systemd would run them: ``$NOTIFY_SOCKET``, no terminal, SIGTERM, a crash.

Real ``jvpn-trio serve`` and ``jvpn-trio up`` processes in a three-path lab,
started as the example units start them (default options but the lab's
``--config``, no ``--quiet``, stdout to a file, ``$INVOCATION_ID`` and
``$NOTIFY_SOCKET`` set), with the notify socket a datagram socket of this test
(a path in ``tmp_path``: a path socket is reachable from any network namespace).

1. The gateway sends ``READY=1`` with a ``STATUS=`` naming where it listens, and
   ``WATCHDOG=1`` pings (``$WATCHDOG_USEC`` set, as ``WatchdogSec=`` does).
2. A client (``--ready-when installed``, the default) sends ``READY=1`` and then
   a ``STATUS=`` naming ATTACHED and its path; it prints plain event lines,
   no escape codes; then it is killed with SIGKILL (a crash: its kill switch,
   rules and routes stay).
3. A client with ``--take-over --ready-when attached`` (the unit's restart)
   takes over what the dead one left and sends ``READY=1`` only once ATTACHED;
   SIGTERM makes it send ``STOPPING=1`` and exit 0, leaving nothing behind.

Determinism rules: every wait is bounded (``trio.fail_after``) and waits for a
message or a status, never for time; nothing about durations is asserted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio
import trio_util

from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.drivers.leftovers import find_leftovers
from jvpn_trio.drivers.systemd import notify
from jvpn_trio.lab.netns import Lab, LabProcess
from jvpn_trio.lab.processes import CLIENT_TUN, guard_tunnel, write_configs
from tests.netns import lab, requires_lab  # noqa: F401  (lab is a fixture)

#: Bound on the whole test: the lab, a gateway, two clients and their sessions.
TEST_BOUND_S = 90.0
#: How often the control socket is asked again while waiting for a status.
STATUS_POLL_S = 0.05
#: The watchdog interval the processes are given (``WatchdogSec=``): they ping at once, then at half of it.
WATCHDOG_USEC = 2_000_000


class NotifySocket:
    """Systemd's end of ``$NOTIFY_SOCKET``: every datagram received, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        self.messages = trio_util.AsyncValue[tuple[str, ...]](())

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(str(self.path))
        task_status.started()
        with self.sock:
            while True:
                data = await self.sock.recv(65536)
                self.messages.value = (*self.messages.value, data.decode())

    async def wait_for(self, needle: str) -> str:
        """The first message containing ``needle`` (the caller bounds the wait)."""
        await self.messages.wait_value(lambda messages: any(needle in m for m in messages))
        return next(m for m in self.messages.value if needle in m)


def argv(command: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jvpn_trio", command, "--config", str(config), *extra]


def service_env(notify: NotifySocket) -> dict[str, str]:
    return {
        "NOTIFY_SOCKET": str(notify.path),
        "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }


async def start(lab: Lab, ns: str, args: list[str], notify: NotifySocket, out: Path) -> LabProcess:
    return await lab.start_process(ns, args, stdout_path=out, stderr_path=out.with_suffix(".err"), env=service_env(notify))


async def client_state(sock: Path) -> str | None:
    try:
        state = (await query_control(sock, {"cmd": "status"}, timeout=2.0)).get("state")
    except ControlError:
        return None
    return str(state) if state is not None else None


def assert_headless(out: Path) -> None:
    text = out.read_text()
    assert "\x1b[" not in text and "\x1b" not in text, f"escape codes on a non-terminal stdout: {text[:200]!r}"
    assert text.strip(), "no event lines on stdout"


@requires_lab
async def test_both_units_notify_systemd_in_a_lab(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    with trio.fail_after(TEST_BOUND_S):
        await trio.to_thread.run_sync(lambda: write_configs(tmp_path, lab, policy={}))
        await guard_tunnel(lab)
        gateway_notify, client_notify, second_notify = (
            NotifySocket(tmp_path / f"{name}.notify") for name in ("gateway", "client", "second")
        )
        async with trio.open_nursery() as nursery:
            for notify in (gateway_notify, client_notify, second_notify):
                await nursery.start(notify.serve)

            # 1. The gateway: ready once it listens.
            gateway = await start(lab, lab.gateway_ns, argv("serve", tmp_path / "gateway.toml"), gateway_notify,
                                  tmp_path / "gateway.out")  # fmt: skip
            ready = await gateway_notify.wait_for("READY=1")
            assert "STATUS=0 session(s); listening on " in ready
            await gateway_notify.wait_for("WATCHDOG=1")

            # 2. A client as the unit starts it: ready at once, ATTACHED in its STATUS=, plain lines.
            client = await start(lab, lab.client_ns, argv("up", tmp_path / "client.toml"), client_notify,
                                 tmp_path / "client.out")  # fmt: skip
            ready = await client_notify.wait_for("READY=1")
            assert "STATUS=CONNECTING" in ready or "STATUS=ATTACHED" in ready, ready
            await client_notify.wait_for("WATCHDOG=1")
            attached = await client_notify.wait_for("STATUS=ATTACHED on p")
            assert attached.startswith("STATUS=ATTACHED on p1 (") and client.returncode is None
            assert "STOPPING=1" not in "".join(client_notify.messages.value)
            await client.kill()  # a crash: the kill switch, rules and routes stay behind
            assert not (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty
            assert_headless(tmp_path / "client.out")

            # 3. The unit's restart: it takes over, and (--ready-when attached) is ready once ATTACHED.
            second = await start(
                lab, lab.client_ns,
                argv("up", tmp_path / "client.toml", "--take-over", "--ready-when", "attached"),
                second_notify, tmp_path / "second.out",
            )  # fmt: skip
            ready = await second_notify.wait_for("READY=1")
            assert "STATUS=ATTACHED on p" in ready, ready
            assert await client_state(tmp_path / "client.sock") == "ATTACHED"
            assert "took over after an earlier agent: removed " in (tmp_path / "second.err").read_text()
            code = await second.terminate()
            stopping = await second_notify.wait_for("STOPPING=1")
            assert stopping.startswith("STOPPING=1")
            assert code == 0, (tmp_path / "second.err").read_text()
            assert_headless(tmp_path / "second.out")
            assert (await find_leftovers(CLIENT_TUN, netns=lab.client_ns)).empty

            assert await gateway.terminate() == 0
            assert "STOPPING=1" in "".join(gateway_notify.messages.value)
            nursery.cancel_scope.cancel()
    assert not os.path.exists(tmp_path / "client.sock")


async def test_the_notify_helper_reads_what_it_is_sent(tmp_path: Path) -> None:
    """The test's own helper, without root: a datagram sent is a message waited for."""
    receiver = NotifySocket(tmp_path / "n.sock")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve)
            assert notify("READY=1", "STATUS=x", environ={"NOTIFY_SOCKET": str(receiver.path)})
            assert await receiver.wait_for("STATUS=") == "READY=1\nSTATUS=x"
            nursery.cancel_scope.cancel()
