#!/usr/bin/env python
"""Lab bring-up time (issue 3 target: 3 nodes + agents < 30 s on a 2-core machine).

Brings a lab up and down ``--runs`` times and prints, per run, the cumulative time at the
end of each phase (clean, network, dockerd = daemons started + busybox imported, swarm =
all nodes Ready, agents = every agent answers /ping) and the teardown time; then the
median. Needs root. Uses its own prefix and subnet (``pabench``, ``10.77.90.0/24``).

Usage: python bench/lab_bringup.py [--runs 3] [--nodes 3] [--managers 2] [--no-agents]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portainer_agent.lab.harness import Lab  # noqa: E402
from portainer_agent.lab.testing import agent_available, lab_skip_reason  # noqa: E402

PHASES = ("clean", "network", "dockerd", "swarm", "agents")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--managers", type=int, default=2)
    parser.add_argument("--no-agents", action="store_true")
    parser.add_argument("--prefix", default="pabench")
    parser.add_argument("--subnet", default="10.77.90.0/24")
    args = parser.parse_args()
    reason = lab_skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    agents = not args.no_agents and agent_available()
    print(f"{args.nodes} nodes, {args.managers} managers, agents: {'yes' if agents else 'no'}; "
          f"{os.cpu_count()} CPUs; cumulative seconds at the end of each phase")
    print(f"{'run':>3} " + " ".join(f"{p:>8}" for p in PHASES) + f" {'up':>8} {'down':>8}")
    ups, downs = [], []
    for run in range(1, args.runs + 1):
        lab = Lab(prefix=args.prefix, subnet=args.subnet, nodes_count=args.nodes, managers=args.managers,
                  agents=agents)
        started = time.monotonic()
        try:
            lab.up()
            up = time.monotonic() - started
        finally:
            stopping = time.monotonic()
            remaining = lab.down()
            down = time.monotonic() - stopping
        if remaining:
            print(f"leftovers after down: {remaining.describe()}", file=sys.stderr)
            return 1
        ups.append(up)
        downs.append(down)
        print(f"{run:>3} " + " ".join(f"{lab.timings.get(p, float('nan')):>8.2f}" for p in PHASES)
              + f" {up:>8.2f} {down:>8.2f}")
    print(f"median bring-up {statistics.median(ups):.2f} s (target < 30 s), "
          f"median teardown {statistics.median(downs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
