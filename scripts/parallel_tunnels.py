"""Would data-plane workers pay on this machine?  One tunnel against two independent ones at once.

Run as root from the repository root: ``sudo python scripts/parallel_tunnels.py [--rounds N]
[--seconds S] [--json FILE]``.  Two labs of ``jvpn-trio bench`` (each its own client and
gateway namespaces, the real ``serve`` and ``up``) carry iperf3 alone (lab 1) and both at
once, alternated ``--rounds`` times.  Two tunnels with nothing shared are the best case that
several workers per side could reach: each process has a core's worth of Python to itself and
no state to hand over.  If their sum is no more than one tunnel's, workers over a multi-queue
TUN cannot pay here either (docs/benchmarks.md, "Multi-queue workers").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jvpn_trio.lab import bench  # noqa: E402
from jvpn_trio.lab.netns import open_lab  # noqa: E402

TESTS = ("tcp", "udp64")


async def _one(running: bench.Running, test: str, seconds: float, workdir: Path, tag: str) -> float:
    doc, _wall = await bench.run_iperf(
        running.lab, running.target, udp=test == "udp64", seconds=seconds, workdir=workdir, tag=tag
    )
    return bench.parse_iperf_udp(doc).received_pps if test == "udp64" else bench.parse_iperf_tcp(doc)


async def _measure(rounds: int, seconds: float, workdir: Path) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {t: {"one": [], "two_sum": [], "two_each": []} for t in TESTS}
    async with contextlib.AsyncExitStack() as stack:
        tunnels = []
        for n in (1, 2):
            lab = await stack.enter_async_context(open_lab(bench.lab_spec()))
            where = workdir / f"lab{n}"
            where.mkdir()
            tunnels.append(await bench.start_jvpn(lab, where, policy=dict(bench.JVPN_POLICY)))
        for r in range(rounds):
            for test in TESTS:
                alone = await _one(tunnels[0], test, seconds, workdir / "lab1", f"{test}-alone-{r}")
                results[test]["one"].append(alone)
                both: list[float] = [0.0, 0.0]

                async def run(i: int, test: str = test, r: int = r, both: list[float] = both) -> None:
                    both[i] = await _one(tunnels[i], test, seconds, workdir / f"lab{i + 1}", f"{test}-both-{r}")

                async with trio.open_nursery() as nursery:
                    for i in (0, 1):
                        nursery.start_soon(run, i)
                results[test]["two_sum"].append(sum(both))
                results[test]["two_each"].extend(both)
                print(f"round {r + 1}/{rounds} {test}: one {alone:,.0f}, two {both[0]:,.0f} + {both[1]:,.0f}",
                      file=sys.stderr)
    summary = {
        test: {
            "one_median": statistics.median(v["one"]),
            "two_sum_median": statistics.median(v["two_sum"]),
            "ratio": statistics.median(v["two_sum"]) / statistics.median(v["one"]),
            "runs": v,
        }
        for test, v in results.items()
    }
    return {"started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count(),
            "rounds": rounds, "seconds": seconds, "tests": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the JSON document here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("parallel_tunnels: needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="jvpn-parallel-") as tmp:
        report = trio.run(_measure, args.rounds, args.seconds, Path(tmp))
    units = {"tcp": "Mbit/s", "udp64": "packets/s received"}
    print(f"| {report['started_utc']} UTC, {report['cpus']} CPUs | one tunnel | two tunnels at once (sum) | two / one |")
    print("|---|---|---|---|")
    for test, row in report["tests"].items():
        print(f"| {test} ({units[test]}, median of {args.rounds}) | {row['one_median']:,.0f} "
              f"| {row['two_sum_median']:,.0f} | {row['ratio']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
