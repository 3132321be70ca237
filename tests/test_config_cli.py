"""Every command that reads a policy or config file, run for real on files that cannot be used.

Each case is a subprocess (``python -m jvpn_trio ...``, the audit tool through its own
``-m``), because a RecursionError or a hang is only honest in a fresh interpreter: whatever the
file holds, the command must print one line on stderr, exit 2, and never a traceback.
``up``, ``serve`` and ``down`` stop at their config, before any network change; as root they
still run inside a network namespace of their own (``unshare --net``), so that no mistake in a
crafted file could ever reach the host's network.  The unreadable-file case runs the command
as another user when we are root (root reads through any mode bits).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

from jvpn_trio.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH

#: A command that reads ``FILE``: (argv with the placeholder, what its error lines start with).
COMMANDS: dict[str, tuple[list[str], str]] = {
    "policy": (["-m", "jvpn_trio", "policy", "FILE"], "jvpn-trio: "),
    "up": (["-m", "jvpn_trio", "up", "--no-tui", "--config", "FILE"], "jvpn-trio: "),
    "down": (["-m", "jvpn_trio", "down", "--config", "FILE"], "jvpn-trio: "),
    "serve": (["-m", "jvpn_trio", "serve", "--config", "FILE"], "jvpn-trio: "),
    "reload": (["-m", "jvpn_trio", "reload", "--config", "FILE"], "jvpn-trio: "),
    "lab": (["-m", "jvpn_trio", "lab", "--scenario", "FILE"], "jvpn-trio lab: "),
    "demo": (["-m", "jvpn_trio", "demo", "--no-tui", "--scenario", "FILE"], "jvpn-trio: "),
    "replay": (["-m", "jvpn_trio", "replay", "/nonexistent-trace", "--policy", "FILE"], "jvpn-trio replay: "),
    "audit": (["-m", "jvpn_trio.tools.audit", "--policy", "FILE", "/nonexistent-log"], "jvpn_trio.tools.audit: "),
}
#: Commands that could touch the network once past their config: run in a namespace of their own.
NETWORK_COMMANDS = {"up", "down", "serve"}
#: Generous: a command that reads a FIFO would block forever, and this turns that into a failure.
COMMAND_TIMEOUT_S = 60.0

ROOT = os.geteuid() == 0
UNSHARE = shutil.which("unshare")


def run_command(name: str, path: pathlib.Path | str, *, user: str | None = None) -> subprocess.CompletedProcess[str]:
    args, _prefix = COMMANDS[name]
    argv = [sys.executable, *(str(path) if a == "FILE" else a for a in args)]
    if name in NETWORK_COMMANDS and ROOT:
        assert UNSHARE is not None  # the fixture below skips without it
        argv = [UNSHARE, "--net", "--", *argv]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL
    )


def assert_one_line_exit_2(name: str, result: subprocess.CompletedProcess[str], *, names: str) -> str:
    _args, prefix = COMMANDS[name]
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert names in lines[0], lines[0]
    assert result.returncode == 2, (result.returncode, result.stderr)
    return lines[0]


@pytest.fixture(autouse=True)
def _namespaces_available() -> None:
    if ROOT and UNSHARE is None:
        pytest.skip("as root, up/serve/down run in their own network namespace: needs unshare (util-linux)")


# -- what a file can be ---------------------------------------------------------------------------------


def _deep_arrays(d: pathlib.Path) -> pathlib.Path:
    # The case: a 6 KB policy file of nested arrays.
    path = d / "deep.toml"
    path.write_text("[policy]\nprobe_interval_ms = " + "[" * 3_000 + "]" * 3_000 + "\n")
    return path


def _deep_tables(d: pathlib.Path) -> pathlib.Path:
    path = d / "deep-tables.toml"
    path.write_text("policy = " + "{a = " * 2_000 + "1" + "}" * 2_000 + "\n")
    return path


def _huge(d: pathlib.Path) -> pathlib.Path:
    path = d / "huge.toml"
    with open(path, "wb") as f:  # sparse: one byte over the limit costs no disk
        f.truncate(MAX_CONFIG_BYTES + 1)
    return path


def _latin1(d: pathlib.Path) -> pathlib.Path:
    path = d / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[policy]\nmin_dwell_ms = 0\n")
    return path


def _directory(d: pathlib.Path) -> pathlib.Path:
    path = d / "a-directory.toml"
    path.mkdir()
    return path


def _fifo(d: pathlib.Path) -> pathlib.Path:
    path = d / "fifo.toml"
    os.mkfifo(path)
    return path


def _huge_integer(d: pathlib.Path) -> pathlib.Path:
    path = d / "bigint.toml"
    path.write_text("[policy]\nloss_threshold_pct = 0x" + "f" * 5_000 + "\n")
    return path


def _long_number(d: pathlib.Path) -> pathlib.Path:
    path = d / "digits.toml"
    path.write_text("[policy]\nmax_switches_per_minute = " + "9" * 5_000 + "\n")
    return path


def _missing(d: pathlib.Path) -> pathlib.Path:
    return d / "absent.toml"


#: name -> (make the file, what the one line must say)
BAD_FILES: dict[str, tuple[Callable[[pathlib.Path], pathlib.Path], str]] = {
    "deep-arrays": (_deep_arrays, f"nested deeper than {MAX_CONFIG_DEPTH} levels"),
    "deep-tables": (_deep_tables, f"nested deeper than {MAX_CONFIG_DEPTH} levels"),
    "huge": (_huge, f"larger than {MAX_CONFIG_BYTES} bytes"),
    "not-utf8": (_latin1, "not UTF-8 text"),
    "directory": (_directory, "is a directory"),
    "fifo": (_fifo, "not a regular file (a FIFO)"),
    "huge-integer": (_huge_integer, "an integer outside"),
    "long-number": (_long_number, "a number too long to read"),
    "missing": (_missing, "no such file"),
}


#: The issue's three commands meet every bad file; the others (which share the reader) the cases
#: that used to crash or hang: recursion, size, a FIFO, a directory.
EVERY_CASE = ("policy", "up", "serve")
SHARED_CASES = ("deep-arrays", "huge", "fifo", "directory")
FILE_MATRIX = [(c, k) for c in sorted(COMMANDS) for k in sorted(BAD_FILES) if c in EVERY_CASE or k in SHARED_CASES]


@pytest.mark.parametrize(("command", "case"), FILE_MATRIX)
def test_an_unusable_file_is_one_line_and_exit_2(tmp_path: pathlib.Path, command: str, case: str) -> None:
    make, says = BAD_FILES[case]
    path = make(tmp_path)
    line = assert_one_line_exit_2(command, run_command(command, path), names=str(path))
    assert says in line


# -- unreadable, for real ------------------------------------------------------------------------------


@pytest.fixture
def unreadable() -> Iterator[tuple[pathlib.Path, str | None]]:
    """A file the command's user cannot read, and that user (None: ourselves, not root)."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="jvpn-unreadable-"))
    try:
        directory.chmod(0o755)
        path = directory / "secret.toml"
        path.write_text("[policy]\nmin_dwell_ms = 0\n")
        path.chmod(0)
        if not ROOT:
            yield path, None
            return
        if shutil.which("setpriv") is None:
            pytest.skip("as root, the unreadable file is tried as nobody: needs setpriv (util-linux)")
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", "import jvpn_trio"],
            capture_output=True, timeout=COMMAND_TIMEOUT_S, cwd=directory,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("nobody (uid 65534) cannot run this checkout's Python, so cannot be denied a read by it")
        yield path, "65534"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("command", ["policy", "up", "serve", "lab"])
def test_an_unreadable_file_is_one_line_and_exit_2(
    unreadable: tuple[pathlib.Path, str | None], command: str
) -> None:
    path, user = unreadable
    line = assert_one_line_exit_2(command, _run_as(command, path, user), names=str(path))
    assert line.endswith(f"{path}: permission denied")


def _run_as(command: str, path: pathlib.Path, user: str | None) -> subprocess.CompletedProcess[str]:
    if user is None or command not in NETWORK_COMMANDS:
        return run_command(command, path, user=user)
    # unshare --net first (as root), then drop to the user inside the new namespace.
    args, _prefix = COMMANDS[command]
    assert UNSHARE is not None
    argv = [
        UNSHARE, "--net", "--", "setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
        sys.executable, *(str(path) if a == "FILE" else a for a in args),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL
    )


# -- values of the wrong type, at any depth ----------------------------------------------------------------

CLIENT_HEAD = '[client]\nprivate_key_file = "k"\ngateway_public_key = "x"\ngateway = "192.0.2.1:51820"\n'
GATEWAY_HEAD = '[gateway]\nprivate_key_file = "k"\n'
PEER = '[[peer]]\npublic_key = "x"\n'

#: (commands, file text, what the one line must say)
WRONG_TYPES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "policy-string": (
        ("policy", "replay", "audit"), '[policy]\nprobe_interval_ms = "50"\n',
        "probe_interval_ms: expected an integer, got str",
    ),
    "policy-nested-array": (
        ("policy",), "[policy]\nmin_dwell_ms = [[[1]]]\n", "min_dwell_ms: expected an integer, got list",
    ),
    "client-policy-nested-array": (
        ("up",), CLIENT_HEAD + "[policy]\nmin_dwell_ms = [[[1]]]\n", "[policy] min_dwell_ms: expected an integer, got list",
    ),
    "gateway-policy-nested-array": (
        ("serve",), GATEWAY_HEAD + PEER + "[policy]\nmin_dwell_ms = [{a = [1]}]\n",
        "[policy] min_dwell_ms: expected an integer, got list",
    ),
    "policy-not-a-table": (("policy",), "policy = [1, 2]\n", "policy must be a table, got list"),
    "policy-float-too-big": (
        ("policy",), "[policy]\nlatency_threshold_ms = 1e308\n", "latency_threshold_ms: 1e+308 is out of range",
    ),
    "policy-nan": (("policy",), "[policy]\nloss_threshold_pct = nan\n", "loss_threshold_pct: nan is out of range"),
    "policy-below-minimum": (
        ("policy",), "[policy]\nhandshake_retry_ms = 1\n", "handshake_retry_ms: 1 is out of range 100..60000",
    ),
    "scenario-policy-below-minimum": (
        ("lab",), "duration_s = 5\n[policy]\nfreshness_window_ms = 1\n", "freshness_window_ms: 1 is out of range 1000..",
    ),
    "client-routes-nested": (("up",), CLIENT_HEAD + "routes = [[1, 2], {a = 1}]\n", "routes: expected prefixes as strings"),
    "client-path-interface-table": (("up",), CLIENT_HEAD + "[[path]]\ninterface = {a = [1]}\n", "expected str, got dict"),
    "client-path-not-tables": (("up",), "path = [1, [2]]\n" + CLIENT_HEAD, "[[path]] #1: expected a table"),
    "client-policy-deep": (("up", "down"), CLIENT_HEAD + "[policy]\nprobe_timeout_ms = {a = {b = 1}}\n", "expected an integer, got dict"),
    "client-not-a-table": (("down",), "client = 3\n", "[client]: expected a table"),
    "gateway-listen-nested": (("serve",), GATEWAY_HEAD + "listen = [[\"1.2.3.4:5\"]]\n" + PEER, "expected 'address:port'"),
    "gateway-peer-key-list": (("reload",), GATEWAY_HEAD + '[[peer]]\npublic_key = ["x"]\n', "public_key: expected str, got list"),
    "gateway-peer-not-tables": (("serve",), "peer = [[1]]\n" + GATEWAY_HEAD, "[[peer]] #1: expected a table"),
    "gateway-mtu-string": (("serve",), GATEWAY_HEAD + 'mtu = "1420"\n' + PEER, "mtu: expected int, got str"),
    "scenario-steps-nested": (("lab",), "duration_s = 5\nstep = [[1]]\n", "[[step]] #1: expected a table"),
    "scenario-path-kind-list": (
        ("demo",), 'duration_s = 5\n[[path]]\nname = "eth0"\nkind = ["ethernet"]\n', "kind: expected one of",
    ),
    "scenario-duration-table": (("lab",), "duration_s = {a = 1}\n", "duration_s"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "command"), [(case, command) for case, (commands, _t, _s) in sorted(WRONG_TYPES.items()) for command in commands]
)
def test_a_value_of_the_wrong_type_is_one_line_and_exit_2(tmp_path: pathlib.Path, case: str, command: str) -> None:
    _commands, text, says = WRONG_TYPES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    line = assert_one_line_exit_2(command, run_command(command, path), names=str(path))
    assert says in line, line
