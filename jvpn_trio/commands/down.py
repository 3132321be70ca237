"""``jvpn-trio down``: stop the client agent, then remove whatever is left of it, by name.

1. The agent is found through the control socket named in the config and
   sent the ``down`` command: it closes its session with an authenticated
   CLOSE to the gateway and exits as on SIGTERM, removing its DNS settings,
   routes, TUN and kill switch itself.  ``down`` waits (bounded by
   :data:`STOP_TIMEOUT_S`) until its control socket is gone and its process
   has exited.
2. Then, whether an agent ran or not, everything a killed one can leave
   behind is removed by name (``drivers/leftovers.py``): the DNS settings
   (from the state file ``drivers/dns.py`` keeps beside the control socket),
   our ip rules and routes of both families, the TUN device, a stale control
   socket file, and last the kill switch's nft table, so nothing leaves
   unprotected while the rest goes.

Every removal prints one line; nothing left is not an error (exit 0).  A
failure is one line and exit 2.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

import trio

from jvpn_trio.commands.process import AppError, missing_privilege
from jvpn_trio.commands.up import DOWN_COMMAND, dns_system
from jvpn_trio.config import DEFAULT_CLIENT_CONFIG, ClientConfig
from jvpn_trio.drivers import dns
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.drivers.leftovers import remove_leftovers

#: Where ``down`` looks for the client's config when none is given.
DEFAULT_CONFIG = Path(DEFAULT_CLIENT_CONFIG)
#: How long the agent may take to close its session and remove what it installed.
STOP_TIMEOUT_S = 20.0
#: One control-socket request.
QUERY_TIMEOUT_S = 2.0
#: How often the wait for the agent's exit looks again.
POLL_S = 0.05


async def run_down(config: ClientConfig, *, out: Callable[[str], None] = print) -> int:
    """Stop the agent and remove every leftover; 0, also when there was nothing.  Raises AppError (one line)."""
    problem = missing_privilege()
    if problem:
        raise AppError(problem)
    said = False
    path = config.control_socket
    listening = await _listening(path)
    if listening:
        pid = await _ask_to_stop(path)
        out(f"asked the agent{f' (pid {pid})' if pid else ''} to close its session and exit")
        await _wait_stopped(path, pid)
        out("the agent closed its session and stopped")
        said = True
    elif listening is False:  # a socket file nobody listens on: left by a killed agent
        path.unlink(missing_ok=True)
        out(f"removed stale control socket {path}")
        said = True
    try:
        reverted = await dns.revert_dns(system=dns_system(config), log=lambda line: out(f"DNS: {line}"))
    except dns.DnsError as exc:
        raise AppError(f"{exc} (the rest is left in place; run `jvpn-trio down` again)") from None
    if reverted is not None:
        out(f"restored DNS: {reverted.detail}")
        said = True
    removed = await remove_leftovers(config.tun_name)
    for line in removed.lines():
        out(f"removed {line}")
        said = True
    if not said:
        out("nothing to do: no agent running, nothing left behind")
    return 0


async def _listening(path: Path) -> bool | None:
    """True if something accepts at ``path``; False for a socket file nobody listens on; None if there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise AppError(f"permission denied at {path} (run as root)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AppError(f"{path} is not a socket: is control_socket in the config right?")
    try:
        stream = await trio.open_unix_socket(str(path))
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise AppError(f"permission denied at {path} (run as root)") from None
        raise AppError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    await stream.aclose()
    return True


async def _ask_to_stop(path: Path) -> int | None:
    try:
        reply = await query_control(path, {"cmd": DOWN_COMMAND}, timeout=QUERY_TIMEOUT_S)
    except ControlError as exc:
        raise AppError(f"cannot ask the agent to stop: {exc}") from None
    pid = reply.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return state in (b"Z", b"X")


async def _wait_stopped(path: Path, pid: int | None) -> None:
    """Until the control socket is gone and the process has exited; AppError after :data:`STOP_TIMEOUT_S`."""
    with trio.move_on_after(STOP_TIMEOUT_S):
        while await trio.Path(path).exists() or (pid is not None and _exited(pid) is False):
            await trio.sleep(POLL_S)
        return
    who = f"the agent (pid {pid})" if pid else "the agent"
    raise AppError(f"{who} did not stop within {STOP_TIMEOUT_S:g} s; stop it and run `jvpn-trio down` again")
