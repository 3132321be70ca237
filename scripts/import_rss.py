"""What each layer of a gateway's imports adds to a process's memory, before it runs anything.

Run from the repository root: ``python scripts/import_rss.py [--json]``.  Each row starts a
fresh interpreter that imports one more layer than the row before (the interpreter alone,
trio, the AEAD and X25519 of ``cryptography``, ..., ``jvpn_trio.commands.serve``) and reads its
own ``/proc/self/status``.  The resident set that the last row shows is what ``serve`` weighs
before it opens a socket; `jvpn-trio bench` reports the running processes' peak
(docs/benchmarks.md, "Memory per process").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Each layer's import statement, in the order a gateway loads them.
LAYERS = (
    ("the interpreter alone", ""),
    ("trio", "import trio"),
    ("cryptography (AEAD, X25519)",
     "import cryptography.hazmat.primitives.ciphers.aead, cryptography.hazmat.primitives.asymmetric.x25519"),
    ("trio-util", "import trio_util"),
    ("pyroute2 (rtnetlink parts)", "import jvpn_trio.drivers.netlink"),
    ("the session core", "import jvpn_trio.core.session, jvpn_trio.core.channel"),
    ("the gateway runtime", "import jvpn_trio.drivers.gateway"),
    ("the serve command", "import jvpn_trio.commands.serve"),
)

#: The fields of /proc/self/status read, in KiB.
FIELDS = ("VmRSS", "RssAnon", "RssFile")

_PROBE = f"""
import sys
fields = {{}}
for line in open('/proc/self/status'):
    name, _, rest = line.partition(':')
    if name in {FIELDS!r}:
        fields[name] = int(rest.split()[0])
print(len(sys.modules), *(fields[f] for f in {FIELDS!r}))
"""


def measure() -> list[dict[str, int | str]]:
    rows: list[dict[str, int | str]] = []
    code = ""
    for title, statement in LAYERS:
        code += statement + "\n"
        done = subprocess.run([sys.executable, "-c", code + _PROBE], capture_output=True, text=True, check=True,
                              cwd=ROOT)
        modules, *kib = (int(x) for x in done.stdout.split())
        rows.append({"layer": title, "modules": modules, **dict(zip(FIELDS, kib))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    args = parser.parse_args()
    rows = measure()
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=1))
        return
    print(f"| cumulative imports (Python {sys.version.split()[0]}) | modules | RSS (MiB) | anonymous | file-backed |")
    print("|---|---|---|---|---|")
    for row in rows:
        mib = [f"{int(row[f]) / 1024:.1f}" for f in FIELDS]
        print(f"| + {row['layer']} | {row['modules']} | " + " | ".join(mib) + " |")


if __name__ == "__main__":
    main()
