"""What one input costs the client's core: microseconds per ``handle`` call, no I/O at all.

Run from the repository root: ``python scripts/core_input_cost.py [--json]``.  An attached
client of the simulated pair (``tests/pair.py``: three paths, the laptop default policy) gets
the inputs a busy tunnel gives it: ``DataSent`` every ``Policy.traffic_report_ms`` and one
``DeliveryObserved`` per four of them.  The figure is the best of several rounds, since the
machine is shared; compare two trees by running it in each (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jvpn_trio.core import events as ev  # noqa: E402
from tests.pair import Pair  # noqa: E402

ROUNDS = 7
INPUTS_PER_ROUND = 2000
DELIVERY_EVERY = 4


def one_round() -> float:
    """Microseconds per DataSent (with its share of DeliveryObserved) on a freshly attached pair."""
    pair = Pair.start()
    pair.run(pair.client.policy.min_dwell_ms / 1000 + 0.5)
    client = pair.client
    binding = client.record.binding
    assert binding is not None, "the pair did not attach"
    step = client.policy.traffic_report_ms / 1000
    now = pair.now
    started = time.perf_counter()
    for i in range(INPUTS_PER_ROUND):
        now += step
        client.handle(ev.DataSent(path=binding.path), now=now)
        if i % DELIVERY_EVERY == 0:
            client.handle(ev.DeliveryObserved(path=binding.path), now=now)
    return (time.perf_counter() - started) / INPUTS_PER_ROUND * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    rounds = [one_round() for _ in range(ROUNDS)]
    result = {"us_per_datasent_best": round(min(rounds), 1), "rounds_us": [round(r, 1) for r in rounds]}
    if args.json:
        print(json.dumps(result))
    else:
        print("| input | µs per call (best of %d) |\n|---|---|" % ROUNDS)
        print(f"| DataSent (+ 1 DeliveryObserved per {DELIVERY_EVERY}) | {result['us_per_datasent_best']} |")


if __name__ == "__main__":
    main()
