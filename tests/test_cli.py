"""The jvpn-trio command: exit codes and one-line errors (0 ok, 2 cannot run as asked).

Determinism: commands run in-process through ``cli.main([...])`` with
captured output and a patched stdin; only ``--version`` runs as a real
subprocess, to prove ``python -m jvpn_trio`` is wired up.  ``keygen`` reads
the OS random source, so only its shape is asserted.  ``serve``/``up``/``status``
run with the composition roots and control-socket entry points replaced by fakes (no root,
no TUN, no sockets), except one real ``status`` against a missing socket.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from jvpn_trio import __version__, cli
from jvpn_trio.commands import down, serve, up
from jvpn_trio.commands.process import AppError
from jvpn_trio.config import load_client_config, load_gateway_config
from jvpn_trio.core.policy import DEFAULT_POLICY
from jvpn_trio.core.states import render_markdown
from jvpn_trio.drivers import control
from jvpn_trio.drivers.client import HandshakeFailed
from jvpn_trio.drivers.clock import BoottimeClock, SuspendDetector, read_boottime, write_clock_offsets
from jvpn_trio.drivers.control import ControlError
from jvpn_trio.drivers.routes import RouteError
from jvpn_trio.drivers.tun import TunError
from jvpn_trio.drivers.udp import PathSocketError
from jvpn_trio.ui.status import render_status_text

# A fixed, clamped-or-not private key: X25519 clamps on use, so any 32 bytes will do.
PRIVATE = bytes(range(1, 33))
PRIVATE_TEXT = base64.b64encode(PRIVATE).decode()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def set_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def assert_one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jvpn-trio: ")
    return lines[0]


def test_exit_code_constants() -> None:
    assert (cli.EXIT_OK, cli.EXIT_CHECK_FAILED, cli.EXIT_USAGE) == (0, 1, 2)


# -- keygen / pubkey ------------------------------------------------------------------------------


def test_keygen_prints_one_base64_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keygen"], capsys)
    assert code == 0
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    key = out.strip()
    assert len(key) == 44
    assert len(base64.b64decode(key, validate=True)) == 32


def test_keygen_keys_differ_and_feed_pubkey(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run(["keygen"], capsys)[1]
    second = run(["keygen"], capsys)[1]
    assert first != second
    set_stdin(monkeypatch, first)
    code, out, _err = run(["pubkey"], capsys)
    assert code == 0
    expected = X25519PrivateKey.from_private_bytes(base64.b64decode(first)).public_key().public_bytes_raw()
    assert out == base64.b64encode(expected).decode() + "\n"


def test_pubkey_of_a_known_key_matches_cryptography(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = base64.b64encode(X25519PrivateKey.from_private_bytes(PRIVATE).public_key().public_bytes_raw()).decode()
    set_stdin(monkeypatch, PRIVATE_TEXT + "\n")
    code, out, err = run(["pubkey"], capsys)
    assert (code, out, err) == (0, expected + "\n", "")


def test_pubkey_ignores_surrounding_whitespace(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_stdin(monkeypatch, f"  {PRIVATE_TEXT}\r\n\n")
    code, out, _err = run(["pubkey"], capsys)
    assert code == 0
    assert len(out.strip()) == 44


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("not a key\n", "jvpn-trio: private key is not valid base64 (expected 44 characters)"),
        ("", "jvpn-trio: private key is empty"),
        (base64.b64encode(bytes(16)).decode(), "jvpn-trio: private key decodes to 16 bytes, expected 32"),
        (f"{PRIVATE_TEXT}\n{PRIVATE_TEXT}\n", "jvpn-trio: private key must be a single line of base64"),
    ],
    ids=["garbage", "empty", "short", "two-lines"],
)
def test_pubkey_of_garbage(
    stdin: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_stdin(monkeypatch, stdin)
    code, out, err = run(["pubkey"], capsys)
    assert code == 2
    assert out == ""
    assert assert_one_error_line(err) == message


def test_interrupt_exits_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupted(io.StringIO):
        def read(self, *args: object) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    code, out, err = run(["pubkey"], capsys)
    assert (code, out, err) == (130, "", "jvpn-trio: interrupted\n")


# -- policy -------------------------------------------------------------------------------------------


def test_policy_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["policy"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"policy {DEFAULT_POLICY.fingerprint}  (built-in laptop default)"
    mapping = DEFAULT_POLICY.to_mapping()
    assert len(lines) == 1 + len(mapping)
    width = max(len(k) for k in mapping)
    for line, (key, value) in zip(lines[1:], mapping.items()):
        assert line == f"  {key:<{width}}  {value}"


def test_policy_default_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["policy", "--json"], capsys)
    assert code == 0 and err == ""
    assert out.count("\n") == 1
    assert json.loads(out) == {"fingerprint": DEFAULT_POLICY.fingerprint, "policy": DEFAULT_POLICY.to_mapping()}


def test_policy_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[policy]\nmax_switches_per_minute = 3\n")
    code, out, err = run(["policy", str(path)], capsys)
    assert code == 0 and err == ""
    first, *rest = out.splitlines()
    code, json_out, _ = run(["policy", "--json", str(path)], capsys)
    doc = json.loads(json_out)
    assert doc["policy"]["max_switches_per_minute"] == 3
    assert doc["fingerprint"] != DEFAULT_POLICY.fingerprint
    assert first == f"policy {doc['fingerprint']}  ({path})"
    assert any(line.split() == ["max_switches_per_minute", "3"] for line in rest)


def test_policy_bad_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[policy]\nmax_switches_per_minute = 0\n")
    code, out, err = run(["policy", str(path)], capsys)
    assert code == 2 and out == ""
    assert assert_one_error_line(err) == (
        f"jvpn-trio: {path}: [policy] max_switches_per_minute: 0 is out of range 1..600"
    )


def test_policy_missing_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    code, out, err = run(["policy", "--json", str(path)], capsys)
    assert code == 2 and out == ""
    assert assert_one_error_line(err) == f"jvpn-trio: {path}: no such file"


def test_policy_bad_toml(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[policy\n")
    code, _out, err = run(["policy", str(path)], capsys)
    assert code == 2
    line = assert_one_error_line(err)
    assert line.startswith(f"jvpn-trio: {path}: invalid TOML: ")
    assert "(at line 1, column " in line


# -- states, usage --------------------------------------------------------------------------------------


def test_states_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["states"], capsys)
    assert (code, out, err) == (0, render_markdown(), "")
    assert "| BIRTH | HANDSHAKE_COMPLETE | ATTACHED | BIND | UNBOUND |" in out


def test_no_command_attaches_the_ui_and_without_an_agent_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    code, out, err = run(["--socket", str(tmp_path / "none.sock")], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("jvpn-trio: no jvpn-trio running at") and err.count("\n") == 1
    assert "sudo jvpn-trio up" in err and "jvpn-trio demo" in err
    assert cli.attach_socket(None, config=str(tmp_path / "absent.toml")) == "/run/jvpn-trio/client.sock"
    code, _out, err = run(["ui", "--socket", str(tmp_path / "none.sock")], capsys)
    assert code == 2 and "sudo jvpn-trio up" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"jvpn-trio {__version__}\n"


def test_version_as_a_real_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jvpn_trio", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"jvpn-trio {__version__}\n", "")


def test_broken_pipe_is_not_an_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `jvpn-trio states | head -1`: the reader goes away mid-output.
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT, 0o600)

    class ClosedPipe(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return fd

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert cli.main(["states"]) == 0
    finally:
        os.close(fd)


def test_python_dash_m_entry_point(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["jvpn-trio", "states"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("jvpn_trio", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out == render_markdown()


# -- serve / up / status, with the long-running parts replaced by fakes ----------------------------------
#
# These never touch TUN devices, routes or sockets: serve.serve_gateway, up.run_client and
# control.query_control are replaced, so only the CLI's own wiring and error mapping run.

GATEWAY_TOML = """\
[gateway]
private_key_file = "gateway.key"

[[peer]]
public_key = "PEERKEY1"
"""
CLIENT_TOML = """\
[client]
private_key_file = "client.key"
gateway_public_key = "GATEWAYPUBLICKEY"
gateway = "192.0.2.1:51820"
"""


def config_file(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_serve_runs_the_gateway_with_the_loaded_config(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[object, object, object, bool]] = []

    async def fake_serve(
        config: object, *, config_path: object = None, record: object = None, quiet: bool = False, notifier: object = None
    ) -> int:
        calls.append((config, config_path, record, quiet))
        return 0

    monkeypatch.setattr(serve, "serve_gateway", fake_serve)
    path = config_file(tmp_path, "gateway.toml", GATEWAY_TOML)
    trace = tmp_path / "trace.jsonl"
    code, out, err = run(["serve", "--config", str(path), "--record", str(trace), "--quiet"], capsys)
    assert (code, out, err) == (0, "", "")
    assert calls == [(load_gateway_config(path), path, trace, True)]  # the path: where a reload reads the peers


def test_up_runs_the_client_with_the_loaded_config(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[object, ...]] = []

    async def fake_run(
        config: object, *, record: object = None, quiet: bool = False, no_tui: bool = False, suspend_detector: object = None,
        ready_when: str = "installed", take_over: bool = False,
    ) -> int:  # fmt: skip
        calls.append((config, record, quiet, no_tui, ready_when, take_over))
        assert isinstance(suspend_detector, SuspendDetector)
        return 1

    monkeypatch.setattr(up, "run_client", fake_run)
    path = config_file(tmp_path, "client.toml", CLIENT_TOML)
    code, _out, err = run(["up", "--config", str(path), "--no-tui"], capsys)
    assert (code, err) == (1, "")
    assert calls == [(load_client_config(path), None, False, True, "installed", False)]
    code, _out, err = run(["up", "--config", str(path), "--ready-when", "attached", "--take-over"], capsys)
    assert calls[-1] == (load_client_config(path), None, False, False, "attached", True)


def test_the_ready_when_choices_are_ups() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["up", "--ready-when", "attached"])
    assert args.ready_when == "attached" and parser.parse_args(["up"]).ready_when == up.READY_INSTALLED
    action = next(
        a for sub in parser._subparsers._group_actions  # type: ignore[union-attr]
        for name, p in sub.choices.items() if name == "up" for a in p._actions if a.dest == "ready_when"
    )  # fmt: skip
    assert tuple(action.choices) == up.READY_WHEN


async def test_up_refuses_an_unknown_ready_when(tmp_path: pathlib.Path) -> None:
    config = load_client_config(config_file(tmp_path, "client.toml", CLIENT_TOML))
    with pytest.raises(AppError, match="--ready-when must be one of installed, attached"):
        await up.run_client(config, ready_when="soon")


@pytest.mark.parametrize(("command", "toml"), [("serve", GATEWAY_TOML), ("up", CLIENT_TOML)])
def test_serve_and_up_run_on_the_boottime_clock(
    command: str, toml: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Their deadlines and session clocks must count a suspend (docs/spec.md, "Freshness across a suspend").
    clocks: list[trio.abc.Clock] = []

    async def fake_runner(config: object, **_options: object) -> int:
        clocks.append(trio.lowlevel.current_clock())
        await trio.lowlevel.checkpoint()
        return 0

    monkeypatch.setattr(serve, "serve_gateway", fake_runner)
    monkeypatch.setattr(up, "run_client", fake_runner)
    path = config_file(tmp_path, f"{command}.toml", toml)
    code, _out, err = run([command, "--config", str(path)], capsys)
    assert (code, err) == (0, "")
    assert len(clocks) == 1 and isinstance(clocks[0], BoottimeClock)


@pytest.mark.parametrize(("command", "toml"), [("serve", GATEWAY_TOML), ("up", CLIENT_TOML)])
def test_clock_offsets_move_the_run_clock_and_a_bad_file_is_one_line(
    command: str, toml: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lab's simulated suspend (lab/processes.py): the offsets file moves the clock the loop runs on.
    readings: list[float] = []

    async def fake_runner(config: object, **_options: object) -> int:
        readings.append(trio.current_time() - read_boottime())
        await trio.lowlevel.checkpoint()
        return 0

    monkeypatch.setattr(serve, "serve_gateway", fake_runner)
    monkeypatch.setattr(up, "run_client", fake_runner)
    path = config_file(tmp_path, f"{command}.toml", toml)
    offsets = tmp_path / "side.clock"
    write_clock_offsets(offsets, boottime=1_800.0, monotonic=-5.0)
    code, _out, err = run([command, "--config", str(path), "--clock-offsets", str(offsets)], capsys)
    assert (code, err) == (0, "")
    assert readings == [pytest.approx(1_800.0, abs=1.0)]
    offsets.write_bytes(b"\0")
    code, out, err = run([command, "--config", str(path), "--clock-offsets", str(offsets)], capsys)
    assert (code, out) == (2, "")
    assert assert_one_error_line(err) == f"jvpn-trio: clock offsets {offsets}: expected exactly 16 bytes"


def test_serve_bad_config_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    code, out, err = run(["serve", "--config", str(path)], capsys)
    assert (code, out) == (2, "")
    assert assert_one_error_line(err) == f"jvpn-trio: {path}: no such file"


@pytest.mark.parametrize(
    ("command", "constant", "example"),
    [("up", "DEFAULT_CLIENT_CONFIG", "client"), ("down", "DEFAULT_CLIENT_CONFIG", "client"),
     ("serve", "DEFAULT_GATEWAY_CONFIG", "gateway")],
)  # fmt: skip
def test_without_config_the_default_file_is_read_and_a_missing_one_is_one_line(
    command: str, constant: str, example: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    missing = tmp_path / f"{example}.toml"
    monkeypatch.setattr(cli, constant, str(missing))
    code, out, err = run([command], capsys)
    assert (code, out) == (2, "")
    assert assert_one_error_line(err) == (
        f"jvpn-trio: no config at {missing} (the default): pass --config FILE, or create it from "
        f"examples/{example}.toml (docs/service.md)"
    )
    config_file(tmp_path, f"{example}.toml", GATEWAY_TOML if example == "gateway" else CLIENT_TOML)
    loaded: list[object] = []

    async def fake_runner(config: object, **_options: object) -> int:
        loaded.append(config)
        return 0

    monkeypatch.setattr(serve, "serve_gateway", fake_runner)
    monkeypatch.setattr(up, "run_client", fake_runner)
    monkeypatch.setattr(down, "run_down", fake_runner)
    assert run([command], capsys)[0] == 0
    assert loaded == [(load_gateway_config if example == "gateway" else load_client_config)(missing)]


def test_the_default_paths_are_the_documented_ones() -> None:
    assert cli.DEFAULT_CLIENT_CONFIG == "/etc/jvpn-trio/client.toml" == str(down.DEFAULT_CONFIG)
    assert cli.DEFAULT_GATEWAY_CONFIG == "/etc/jvpn-trio/gateway.toml"


def _raising_runner(exc: BaseException):  # type: ignore[no-untyped-def]
    async def runner(config: object, **_options: object) -> int:
        raise exc

    return runner


@pytest.mark.parametrize(
    "exc",
    [
        AppError("cannot create TUN devices: run as root"),
        TunError("cannot create TUN devices: run as root"),
        ExceptionGroup("nursery", [KeyError("x"), RouteError("cannot create TUN devices: run as root")]),
        BaseExceptionGroup(
            "outer", [ExceptionGroup("inner", [PathSocketError("cannot create TUN devices: run as root")])]
        ),
        ExceptionGroup("nursery", [ControlError("cannot create TUN devices: run as root")]),
    ],
    ids=["AppError", "TunError", "group", "nested-group", "ControlError"],
)
def test_driver_errors_become_one_line_and_exit_2(
    exc: BaseException, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serve, "serve_gateway", _raising_runner(exc))
    path = config_file(tmp_path, "gateway.toml", GATEWAY_TOML)
    code, out, err = run(["serve", "--config", str(path)], capsys)
    assert (code, out) == (2, "")
    assert assert_one_error_line(err) == "jvpn-trio: cannot create TUN devices: run as root"


def test_handshake_failure_exits_2(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(up, "run_client", _raising_runner(HandshakeFailed("no handshake on any path within 5 s")))
    path = config_file(tmp_path, "client.toml", CLIENT_TOML)
    code, _out, err = run(["up", "--config", str(path)], capsys)
    assert code == 2
    assert assert_one_error_line(err) == "jvpn-trio: no handshake on any path within 5 s"


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("a bug"), ExceptionGroup("nursery", [RuntimeError("a bug")])],
    ids=["plain", "group"],
)
def test_unexpected_errors_are_not_swallowed(
    exc: BaseException, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve, "serve_gateway", _raising_runner(exc))
    path = config_file(tmp_path, "gateway.toml", GATEWAY_TOML)
    with pytest.raises((RuntimeError, ExceptionGroup)):
        cli.main(["serve", "--config", str(path)])


def test_status_without_a_running_instance(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_SOCKETS", (str(tmp_path / "client.sock"), str(tmp_path / "gateway.sock")))
    code, out, err = run(["status"], capsys)
    assert (code, out) == (2, "")
    assert assert_one_error_line(err) == (
        "jvpn-trio: no jvpn-trio running here (no control socket in /run/jvpn-trio; use --socket PATH)"
    )


def _fake_query(reply: dict[str, object], calls: list[tuple[object, object, float]]):  # type: ignore[no-untyped-def]
    async def query(path: object, request: object, *, timeout: float) -> dict[str, object]:
        calls.append((path, request, timeout))
        return reply

    return query


REPLY = {"role": "probe", "state": "ATTACHED", "version": 3}


def test_status_text(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[object, object, float]] = []
    monkeypatch.setattr(control, "query_control", _fake_query(REPLY, calls))
    code, out, err = run(["status", "--socket", "/x/c.sock"], capsys)
    assert (code, out, err) == (0, render_status_text(REPLY) + "\n", "")
    assert calls == [(pathlib.Path("/x/c.sock"), {"cmd": "status"}, 2.0)]


def test_status_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[object, object, float]] = []
    monkeypatch.setattr(control, "query_control", _fake_query(REPLY, calls))
    code, out, _err = run(["status", "--json", "--socket", "/x/c.sock", "--timeout", "0.5"], capsys)
    assert code == 0
    assert out == json.dumps(REPLY, sort_keys=True) + "\n"
    assert calls[0][2] == 0.5


def test_status_finds_the_first_existing_default_socket(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway_sock = tmp_path / "gateway.sock"
    gateway_sock.write_text("")
    monkeypatch.setattr(cli, "DEFAULT_SOCKETS", (str(tmp_path / "client.sock"), str(gateway_sock)))
    calls: list[tuple[object, object, float]] = []
    monkeypatch.setattr(control, "query_control", _fake_query(REPLY, calls))
    assert run(["status"], capsys)[0] == 0
    assert calls[0][0] == gateway_sock


def test_status_error_reply(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(control, "query_control", _fake_query({"error": "busy"}, []))
    code, _out, err = run(["status", "--socket", "/x/c.sock"], capsys)
    assert code == 2
    assert assert_one_error_line(err) == "jvpn-trio: the running instance answered: busy"


def test_status_control_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    async def refuse(path: object, request: object, *, timeout: float) -> dict[str, object]:
        raise ControlError("connection refused at /x/c.sock (stale socket?)")

    monkeypatch.setattr(control, "query_control", refuse)
    code, _out, err = run(["status", "--socket", "/x/c.sock"], capsys)
    assert code == 2
    assert assert_one_error_line(err) == "jvpn-trio: connection refused at /x/c.sock (stale socket?)"


def test_status_against_a_missing_socket_for_real(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "none.sock"
    code, out, err = run(["status", "--socket", str(sock), "--timeout", "1"], capsys)
    assert (code, out) == (2, "")
    line = assert_one_error_line(err)
    assert str(sock) in line
