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
from typing import Callable, Sequence

from jvpn_trio import __version__
from jvpn_trio.config import ConfigError, load_policy
from jvpn_trio.core.policy import DEFAULT_POLICY, Policy
from jvpn_trio.keyfile import KeyFileError, generate_private_key_text, public_from_private_text

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as ``jvpn-trio: <message>``, exit code 2."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvpn-trio",
        description="A VPN whose session survives Wi-Fi dying, LTE flapping and Ethernet being unplugged.",
    )
    parser.add_argument("--version", action="version", version=f"jvpn-trio {__version__}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except (CliError, ConfigError, KeyFileError) as exc:
        print(f"jvpn-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jvpn-trio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`jvpn-trio policy | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
