"""The demo in a real terminal: tmux runs it, we read the screen and press ``q``.

The demo (``--short``) runs in a detached tmux session on a private server
socket (``tmux -L jvtest<random>``, no user config), in a 100x32 terminal.
The test polls ``capture-pane`` until a TRANSPORT_SWITCH is on screen, sends
``q``, and waits for the process to exit; the shell around it writes the
exit code to a file.  Every wait has a deadline in real seconds (this is the
one UI test that needs a real terminal, so it polls real time), and the tmux
server is killed at the end whatever happened.
"""

from __future__ import annotations

import pathlib
import secrets
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")
#: The first switch comes about 3.5 s into the short scenario; generous for slow machines.
SWITCH_DEADLINE_S = 25.0
EXIT_DEADLINE_S = 15.0
POLL_S = 0.2

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (CI installs it: apt-get install tmux)")


def tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert TMUX is not None
    return subprocess.run([TMUX, "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=10)


def test_demo_shows_a_switch_and_quits_cleanly_on_q(tmp_path: pathlib.Path) -> None:
    socket = f"jvtest{secrets.token_hex(4)}"
    exit_file = tmp_path / "exit"
    events = tmp_path / "events.jsonl"
    command = (
        f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} -m jvpn_trio.lab.demo --short "
        f"--events {shlex.quote(str(events))}; echo EXIT=$? > {shlex.quote(str(exit_file))}"
    )
    started = tmux(socket, "new-session", "-d", "-x", "100", "-y", "32", "sh", "-c", command)
    assert started.returncode == 0, started.stderr
    try:
        screen = ""
        deadline = time.monotonic() + SWITCH_DEADLINE_S
        while time.monotonic() < deadline and "TRANSPORT_SWITCH" not in screen:
            time.sleep(POLL_S)
            screen = tmux(socket, "capture-pane", "-p").stdout
        assert "TRANSPORT_SWITCH" in screen, f"no switch on screen after {SWITCH_DEADLINE_S} s:\n{screen}"
        assert "jvpn-trio demo" in screen and "paths" in screen and "counters" in screen
        tmux(socket, "send-keys", "q")
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while time.monotonic() < deadline and not exit_file.exists():
            time.sleep(POLL_S)
        assert exit_file.exists(), "the demo did not exit after q"
        assert exit_file.read_text().strip() == "EXIT=0"
        # q was an explicit close: the client's session ended LOCAL_CLOSE.
        assert '"reason":"LOCAL_CLOSE"' in events.read_text()
    finally:
        tmux(socket, "kill-server")
