"""The ``jvpn-trio`` command.  Maps every expected failure to one line and an exit code.

Exit codes: 0 success, 1 a check failed (e.g. a replay diverged), 2 the
command cannot run as asked (bad arguments, bad config, bad key, missing
privilege).  Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from jvpn_trio import __version__
from jvpn_trio.config import (
    DEFAULT_CLIENT_CONFIG,
    DEFAULT_GATEWAY_CONFIG,
    ConfigError,
    load_client_config,
    load_gateway_config,
    load_policy,
)
from jvpn_trio.core.policy import DEFAULT_POLICY, Policy
from jvpn_trio.errors import find_in_group
from jvpn_trio.keyfile import KeyFileError, generate_private_key_text, public_from_private_text

if TYPE_CHECKING:
    from jvpn_trio.drivers.clock import KernelClocks

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as ``jvpn-trio: <message>``, exit code 2."""


#: Where ``up`` and ``down`` read the client's config, and ``serve`` the gateway's, without ``--config``
#: (docs/service.md).  ``commands/down.py`` names the client's too; ``tests/test_cli.py`` keeps them equal.


def _config_path(given: str | None, default: str, example: str) -> str:
    """``--config`` if given; else the default path, which must exist (one line saying where it looked)."""
    if given is not None:
        return given
    if not os.path.exists(default):
        raise CliError(
            f"no config at {default} (the default): pass --config FILE, or create it from {example} "
            "(docs/service.md)"
        )
    return default


def _cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_private_key_text(os.urandom))
    return EXIT_OK


def _cmd_pubkey(args: argparse.Namespace) -> int:
    text = sys.stdin.read()
    print(public_from_private_text(text))
    return EXIT_OK


def _cmd_policy(args: argparse.Namespace) -> int:
    policy: Policy = load_policy(args.file) if args.file else DEFAULT_POLICY
    if args.json:
        print(json.dumps({"fingerprint": policy.fingerprint, "policy": policy.to_mapping()}, sort_keys=True))
        return EXIT_OK
    source = args.file or "built-in laptop default"
    print(f"policy {policy.fingerprint}  ({source})")
    width = max(len(k) for k in policy.to_mapping())
    for key, value in policy.to_mapping().items():
        print(f"  {key:<{width}}  {value}")
    return EXIT_OK


def _cmd_states(args: argparse.Namespace) -> int:
    from jvpn_trio.core.states import render_markdown

    print(render_markdown(), end="")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import pathlib

    import trio

    from jvpn_trio.commands import serve

    path = _config_path(args.config, DEFAULT_GATEWAY_CONFIG, "examples/gateway.toml")
    config = load_gateway_config(path)
    clocks = _clocks(args)
    # Deadlines on CLOCK_BOOTTIME count a suspend (docs/spec.md, "Freshness across a suspend").
    return trio.run(
        lambda: serve.serve_gateway(config, config_path=pathlib.Path(path), record=args.record, quiet=args.quiet),
        clock=clocks.run_clock(),
    )


def _cmd_up(args: argparse.Namespace) -> int:
    import trio

    from jvpn_trio.commands import up

    config = load_client_config(_config_path(args.config, DEFAULT_CLIENT_CONFIG, "examples/client.toml"))
    clocks = _clocks(args)
    # The session clock must keep counting while the laptop sleeps, as the gateway's does.
    return trio.run(
        lambda: up.run_client(
            config, record=args.record, quiet=args.quiet, no_tui=args.no_tui, suspend_detector=clocks.suspend_detector(),
            ready_when=args.ready_when, take_over=args.take_over,
        ),  # fmt: skip
        clock=clocks.run_clock(),
    )


def _cmd_down(args: argparse.Namespace) -> int:
    import trio

    from jvpn_trio.commands import down

    config = load_client_config(_config_path(args.config, DEFAULT_CLIENT_CONFIG, "examples/client.toml"))
    return trio.run(lambda: down.run_down(config))


def _clocks(args: argparse.Namespace) -> KernelClocks:
    """The kernel's clocks, or (lab) the kernel's plus the offsets in ``--clock-offsets``."""
    from jvpn_trio.drivers.clock import ClockOffsetsError, KernelClocks, offset_clocks

    if args.clock_offsets is None:
        return KernelClocks()
    try:
        return offset_clocks(args.clock_offsets)
    except ClockOffsetsError as exc:
        raise CliError(str(exc)) from None


def _cmd_replay(args: argparse.Namespace) -> int:
    from jvpn_trio.tools import replay

    return replay.main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from jvpn_trio.lab import demo

    return demo.run(args)


DEFAULT_SOCKETS = ("/run/jvpn-trio/client.sock", "/run/jvpn-trio/gateway.sock")
#: How to start an agent, said when bare ``jvpn-trio`` finds none.
START_HINT = "start one with `sudo jvpn-trio up` (or `sudo systemctl start jvpn-trio`), or try `jvpn-trio demo`"


def attach_socket(given: str | None, *, config: str = DEFAULT_CLIENT_CONFIG) -> str:
    """The socket bare ``jvpn-trio`` attaches to: ``--socket``, else the client config's ``control_socket``
    (when that file can be read), else the default ``/run/jvpn-trio/client.sock``."""
    if given:
        return given
    try:
        if os.path.exists(config):
            return str(load_client_config(config).control_socket)
    except (ConfigError, OSError):
        pass  # the config may be root's alone; the UI never needs root
    return DEFAULT_SOCKETS[0]


def _cmd_ui(args: argparse.Namespace) -> int:
    """Bare ``jvpn-trio`` (and ``jvpn-trio ui``): the live UI of the running agent, over its control socket."""
    import pathlib

    import trio

    from jvpn_trio.drivers.control import ControlError
    from jvpn_trio.ui.app import use_tui
    from jvpn_trio.ui.attached import AgentGone, run_attached

    path = pathlib.Path(attach_socket(getattr(args, "attach_socket", None)))
    try:
        trio.run(lambda: run_attached(path, tui=use_tui(bool(getattr(args, "attach_no_tui", False)))))
    except AgentGone as exc:
        raise CliError(str(exc)) from None
    except ControlError as exc:
        raise CliError(f"{exc}: {START_HINT}") from None
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    import pathlib

    import trio

    from jvpn_trio.drivers.control import ControlError, query_control
    from jvpn_trio.ui.status import render_status_text

    candidates = [args.socket] if args.socket else [s for s in DEFAULT_SOCKETS if os.path.exists(s)]
    if not candidates:
        raise CliError("no jvpn-trio running here (no control socket in /run/jvpn-trio; use --socket PATH)")
    try:
        reply = trio.run(
            lambda: query_control(pathlib.Path(candidates[0]), {"cmd": "status"}, timeout=args.timeout)
        )
    except ControlError as exc:
        raise CliError(str(exc)) from None
    if "error" in reply:
        raise CliError(f"the running instance answered: {reply['error']}")
    print(json.dumps(reply, sort_keys=True) if args.json else render_status_text(reply))
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    import pathlib

    import trio

    from jvpn_trio.commands.serve import RELOAD_COMMAND, describe_reload
    from jvpn_trio.drivers.control import ControlError, query_control

    if args.socket:
        socket = pathlib.Path(args.socket)
    elif args.config or os.path.exists(DEFAULT_GATEWAY_CONFIG):
        socket = load_gateway_config(_config_path(args.config, DEFAULT_GATEWAY_CONFIG, "examples/gateway.toml")).control_socket
    else:
        socket = pathlib.Path(DEFAULT_SOCKETS[1])
    try:
        reply = trio.run(lambda: query_control(socket, {"cmd": RELOAD_COMMAND}, timeout=args.timeout))
    except ControlError as exc:  # no gateway, no access, or its refusal (the config does not load)
        raise CliError(str(exc)) from None
    print(json.dumps(reply, sort_keys=True) if args.json else describe_reload(reply))
    return EXIT_OK


#: The lab's commands: their arguments are defined in ``jvpn_trio.lab``, imported only to run one of them.
LAB_COMMANDS = ("bench", "loadgen", "lab")


def build_parser(*, lab_arguments: bool = True) -> argparse.ArgumentParser:
    """The whole command line; without ``lab_arguments`` the lab commands are names and help alone.

    That lighter parser is what every other command runs with, so that a gateway or a client never
    imports the lab (issue 16, tests/test_import_weight.py): see :func:`parser_for`.
    """
    parser = argparse.ArgumentParser(
        prog="jvpn-trio",
        description="A VPN whose session survives Wi-Fi dying, LTE flapping and Ethernet being unplugged.",
    )
    parser.add_argument("--version", action="version", version=f"jvpn-trio {__version__}")
    parser.add_argument(
        "--socket", dest="attach_socket", metavar="PATH",
        help="without a command: the running agent's control socket to attach the live UI to "
        "(default: the control_socket of /etc/jvpn-trio/client.toml, else /run/jvpn-trio/client.sock)",
    )  # fmt: skip
    parser.add_argument(
        "--no-tui", dest="attach_no_tui", action="store_true", help="without a command: plain event lines"
    )
    parser.set_defaults(func=_cmd_ui)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("keygen", help="print a new private key (base64), like `wg genkey`")
    p.set_defaults(func=_cmd_keygen)
    p = sub.add_parser("pubkey", help="read a private key on stdin, print its public key, like `wg pubkey`")
    p.set_defaults(func=_cmd_pubkey)
    p = sub.add_parser("policy", help="validate a policy file and print it with its fingerprint")
    p.add_argument("file", nargs="?", help="TOML file with a [policy] table (default: the laptop policy)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_cmd_policy)
    p = sub.add_parser("states", help="print the session state machine (Markdown + Mermaid)")
    p.set_defaults(func=_cmd_states)

    p = sub.add_parser("serve", help="run the gateway (root): UDP listener, TUN, sessions")
    p.add_argument("--config", help=f"gateway TOML file (default: {DEFAULT_GATEWAY_CONFIG}; see examples/gateway.toml)")
    p.add_argument("--record", type=pathlib_path, help="record every core input to this trace file")
    p.add_argument("--quiet", action="store_true", help="do not print events to stdout")
    p.add_argument(
        "--clock-offsets", type=pathlib_path, metavar="FILE",
        help="lab only: add the offsets in FILE to the clocks, to live through a simulated suspend",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("up", help="bring the tunnel up (root): probe every path, keep the session alive")
    p.add_argument("--config", help=f"client TOML file (default: {DEFAULT_CLIENT_CONFIG}; see examples/client.toml)")
    p.add_argument("--record", type=pathlib_path, help="record every core input to this trace file")
    p.add_argument("--quiet", action="store_true", help="do not print events to stdout")
    p.add_argument(
        "--clock-offsets", type=pathlib_path, metavar="FILE",
        help="lab only: add the offsets in FILE to the clocks, to live through a simulated suspend",
    )  # fmt: skip
    p.add_argument(
        "--no-tui", action="store_true",
        help="plain event lines instead of the live UI (automatic without a terminal and under systemd)",
    )  # fmt: skip
    p.add_argument(
        "--ready-when", choices=("installed", "attached"), default="installed",
        help="under systemd (Type=notify), report ready once the kill switch, TUN and routes are in place "
        "(installed, the default) or once the first session is ATTACHED (docs/service.md)",
    )  # fmt: skip
    p.add_argument(
        "--take-over", action="store_true",
        help="remove what a killed agent left (routes, rules, DNS) instead of refusing to start; the systemd "
        "unit's restart after a crash (docs/service.md)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="stop the client agent and remove all it installed, or what a crash left (root)")
    p.add_argument("--config", help=f"client TOML file (default: {DEFAULT_CLIENT_CONFIG})")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("demo", help="the no-root demo: client, gateway and three emulated paths on loopback")
    p.add_argument("--scenario", type=pathlib_path, metavar="FILE", help="scenario TOML (default: the demo scenario)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="end after this long (default: the scenario's)")
    p.add_argument("--no-tui", action="store_true", help="plain event lines instead of the live UI")
    p.add_argument("--events", type=pathlib_path, metavar="FILE", help="also write every event to FILE (JSON lines)")
    p.add_argument("--short", action="store_true", help="the scenario's short form (for CI)")
    p.set_defaults(func=_cmd_demo)

    # Without lab_arguments, a lab command's own options (and -h) are left for the full parser.
    p = sub.add_parser(
        "bench", help="benchmark against a bare veth, OpenVPN, wireguard-go and kernel MPTCP in fresh namespace labs (root)", add_help=lab_arguments
    )
    if lab_arguments:
        from jvpn_trio.lab import bench

        bench.add_arguments(p)
        p.set_defaults(func=bench.main)

    p = sub.add_parser(
        "loadgen", help="many simulated clients against one real gateway: handshakes/s, memory per session (root)",
        add_help=lab_arguments,
    )  # fmt: skip
    if lab_arguments:
        from jvpn_trio.lab import loadgen

        loadgen.add_arguments(p)
        p.set_defaults(func=loadgen.main)

    p = sub.add_parser(
        "lab", help="reproduce a field scenario in network namespaces and report (root)", add_help=lab_arguments
    )
    if lab_arguments:
        from jvpn_trio.lab import runner

        runner.add_arguments(p)
        p.set_defaults(func=runner.main)

    p = sub.add_parser("replay", help="replay a recorded trace through the core; --policy FILE for a what-if")
    p.add_argument("trace", metavar="TRACE", help="trace file written by `serve/up --record`")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--policy", metavar="FILE", help="what-if: replay under this policy file (or a config's [policy])")
    p.add_argument("--max-differences", type=int, default=5, metavar="N", help="what-if: at most N differing decisions per machine")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("ui", help="the live UI of the running agent (what `jvpn-trio` alone does); no root needed")
    p.add_argument("--socket", dest="attach_socket", metavar="PATH", help="the agent's control socket")
    p.add_argument("--no-tui", dest="attach_no_tui", action="store_true", help="plain event lines")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("reload", help="make the running gateway re-read its peers ([[peer]] and peers_dir), like SIGHUP")
    p.add_argument("--config", help=f"gateway TOML file, for its control socket (default: {DEFAULT_GATEWAY_CONFIG})")
    p.add_argument("--socket", help="the gateway's control socket (default: the config's)")
    p.add_argument("--json", action="store_true", help="the changes as one JSON document")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.set_defaults(func=_cmd_reload)

    p = sub.add_parser("status", help="ask the running client or gateway for its state")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--socket", help="control socket path (default: the client's, else the gateway's)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    p.set_defaults(func=_cmd_status)
    return parser


def pathlib_path(text: str) -> "os.PathLike[str]":
    import pathlib

    return pathlib.Path(text)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "cannot run as asked" (one line, exit 2), imported lazily."""
    from jvpn_trio.commands.process import AppError
    from jvpn_trio.drivers.client import HandshakeFailed
    from jvpn_trio.drivers.control import ControlError
    from jvpn_trio.drivers.dns import DnsError
    from jvpn_trio.drivers.forwarding import ForwardingError
    from jvpn_trio.drivers.killswitch import KillSwitchError
    from jvpn_trio.drivers.routes import RouteError
    from jvpn_trio.drivers.tun import TunError
    from jvpn_trio.drivers.udp import PathSocketError

    return (
        AppError, HandshakeFailed, ControlError, RouteError, TunError, PathSocketError, KillSwitchError, DnsError,
        ForwardingError,
    )  # fmt: skip


def parser_for(argv: Sequence[str] | None) -> argparse.ArgumentParser:
    """The parser for this command line: with the lab's arguments (and so the lab) only for a lab command."""
    light = build_parser(lab_arguments=False)
    command = light.parse_known_args(argv)[0].command  # exits here, as the full parser would, on --help or a bad command
    return build_parser() if command in LAB_COMMANDS else light


def main(argv: Sequence[str] | None = None) -> int:
    parser = parser_for(argv)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:  # pragma: no cover - bare jvpn-trio attaches the UI
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except (CliError, ConfigError, KeyFileError) as exc:
        print(f"jvpn-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`jvpn-trio policy | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # narrowed just below: only the drivers' documented errors
        expected = find_in_group(exc, _expected_errors())
        if expected is None:
            raise
        print(f"jvpn-trio: {expected}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jvpn-trio: interrupted", file=sys.stderr)
        return 130
