#!/usr/bin/env python
"""Membership figures (issue 5 targets), printed as a table.

Real processes (AMP over TLS on 127.0.0.x, default 1 s / 500 ms probes, a cluster key):
  * detection time of a SIGKILLed agent at 3 nodes (target <= 3 s; serf needs ~5.5-6 s),
  * false-dead count while one agent is SIGSTOPped for 300 ms, 20 times (target 0).
Simulation (portainer_agent.cluster.simulation, the same state machine, no sockets):
  * join visible on every member at 100 members, with and without 5 % loss (target <= 2 s),
  * false dead with a 300 ms reactor stall,
  * messages sent per node per probe interval at 10 / 100 / 500 members (target O(1)).

Usage: python bench/membership.py [--runs 5] [--skip-real] [--skip-sim]
       python bench/membership.py node INDEX   (internal: one agent's membership process)
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

PORT = 39_602
BASE = 40  # 127.0.0.41..43
KEY = b"bench-cluster-key"


def host(index: int) -> str:
    return f"127.0.0.{BASE + index}"


# ---------------------------------------------------------------------- child process

def run_node(index: int) -> None:
    """One membership service; prints its set of live node names whenever it changes."""
    from twisted.internet import reactor

    from portainer_agent.cluster.service import ClusterService
    from portainer_agent.docker.identity import NodeIdentity
    from portainer_agent.tls.certs import generate_self_signed
    from portainer_agent.tls.server import server_options

    address = host(index)
    tls = generate_self_signed([address])
    identity = NodeIdentity(name=f"node{index}", node_id=f"id{index}", role="worker", node_addr=address)
    service = ClusterService(
        reactor, identity=identity, api_port=9001, cluster_port=PORT, fingerprint=tls.fingerprint,
        server_tls=server_options(tls), version="bench", key=KEY, cluster_addr=host(1),
        advertise_addr=address, listen_host=address,
    )
    last: list[Any] = [None]

    def report() -> None:
        alive = sorted(m.node_name for m in service.view.alive_members())
        if alive != last[0]:
            last[0] = alive
            sys.stdout.write(json.dumps({"t": time.time(), "node": index, "alive": alive}) + "\n")
            sys.stdout.flush()

    from twisted.internet.task import LoopingCall

    LoopingCall(report).start(0.01)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


class Node:
    def __init__(self, index: int) -> None:
        self.index = index
        self.alive: list[str] = []
        self.history: list[tuple[float, list[str]]] = []
        self.process = subprocess.Popen(
            [sys.executable, __file__, "node", str(index)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        )
        self._buffer = b""

    def poll(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                record = json.loads(line)
                self.alive = record["alive"]
                self.history.append((record["t"], record["alive"]))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


def wait_until(nodes: list[Node], condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            node.poll()
        if condition():
            return True
        time.sleep(0.01)
    return False


def real_benchmarks(runs: int, stall: float = 0.3) -> dict[str, Any]:
    everyone = ["node1", "node2", "node3"]
    nodes = [Node(i) for i in (1, 2, 3)]
    results: dict[str, Any] = {}
    try:
        if not wait_until(nodes, lambda: all(n.alive == everyone for n in nodes), 30):
            raise SystemExit(f"cluster did not form: {[n.alive for n in nodes]}")
        detections = []
        for run in range(runs):
            time.sleep(1.0 + 0.37 * run)  # vary the phase of the probe round
            victim = nodes[2]
            killed_at = time.time()
            victim.kill()
            survivors = nodes[:2]
            if not wait_until(survivors, lambda: all(n.alive == ["node1", "node2"] for n in survivors), 20):
                raise SystemExit("killed agent never dropped")
            seen = [next(t for t, alive in reversed(n.history) if "node3" not in alive) for n in survivors]
            detections.append(max(seen) - killed_at)
            nodes[2] = Node(3)
            if not wait_until(nodes, lambda: all(n.alive == everyone for n in nodes), 30):
                raise SystemExit("restarted agent never came back")
        results["kill_detection_s"] = detections
        # 300 ms stalls of node2 (SIGSTOP/SIGCONT: the whole process, reactor included).
        stalled = nodes[1]
        stall_start = time.time()
        for run in range(20):
            stalled.process.send_signal(signal.SIGSTOP)
            time.sleep(stall)
            stalled.process.send_signal(signal.SIGCONT)
            wait_until(nodes, lambda: False, 0.7 + 0.05 * run)
        for node in nodes:
            node.poll()
        # Any moment a node's /agents view lacked a member during the stalls is a false positive.
        false_dead = sum(1 for n in nodes for t, alive in n.history if t >= stall_start and alive != everyone)
        results["stall_false_dead_events"] = false_dead
    finally:
        for node in nodes:
            node.kill(signal.SIGTERM)
    return results


# ---------------------------------------------------------------------- simulation

def sim_benchmarks() -> dict[str, Any]:
    from portainer_agent.cluster.simulation import SimNetwork

    results: dict[str, Any] = {}
    for loss in (0.0, 0.05):
        times = []
        for seed in range(5):
            net = SimNetwork(seed=seed, loss=loss)
            swims = net.build(100)
            net.run(2)
            newcomer = net.add(net.make_member(100))
            newcomer.join([swims[seed].local.peer])
            key = newcomer.local.key
            times.append(net.run_until(lambda: all(net.sees_live(n, key) for n in net.running_nodes()), 10))
        results[f"join_visible_100_loss{int(loss * 100)}_s"] = times
    false_dead = 0
    for seed in range(5):
        net = SimNetwork(seed=seed)
        swims = net.build(10)
        net.run(2)
        for run in range(20):
            net.stall(swims[0].local.key, 0.3)
            net.run(1.5 + 0.11 * run)
        false_dead += sum(s.counters.get("declared_dead", 0) for s in swims)
    results["sim_stall_false_dead"] = false_dead
    rates = {}
    for size in (10, 100, 500):
        net = SimNetwork(seed=1)
        net.build(size)
        net.run(2)
        before = sum(n.sent for n in net.nodes.values())
        net.run(10)
        rates[size] = (sum(n.sent for n in net.nodes.values()) - before) / size / 10
    results["messages_per_node_per_interval"] = rates
    detection = {}
    for label, size, refuse, loss in (("3-kill", 3, True, 0.0), ("3-silent", 3, False, 0.0),
                                      ("100-silent", 100, False, 0.05)):
        times = []
        for seed in range(10):
            net = SimNetwork(seed=seed, loss=loss)
            swims = net.build(size)
            net.run(2 + 0.13 * seed)
            victim = swims[-1].local.key
            net.kill(victim, refuse=refuse)
            times.append(net.run_until(lambda: all(not net.sees_live(n, victim) for n in net.running_nodes()), 60))
        detection[label] = times
    results["sim_detection_s"] = detection
    return results


def describe(values: list[float]) -> str:
    clean = [v for v in values if v is not None]
    if not clean:
        return "n/a"
    return f"median {statistics.median(clean):.2f}  max {max(clean):.2f}  (n={len(clean)})"


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "node":
        run_node(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--stall", type=float, default=0.3, help="seconds each SIGSTOP lasts (default 0.3)")
    args = parser.parse_args()
    if not args.skip_real:
        real = real_benchmarks(args.runs, args.stall)
        print(f"real 3 nodes, SIGKILL detection on both survivors : {describe(real['kill_detection_s'])}  (target <= 3 s)")
        print(f"real 3 nodes, 20 x {args.stall * 1000:.0f} ms SIGSTOP, view changes   : "
              f"{real['stall_false_dead_events']}  (target 0 at 300 ms)")
    if not args.skip_sim:
        sim = sim_benchmarks()
        print(f"sim 100 members, join visible everywhere, 0% loss : {describe(sim['join_visible_100_loss0_s'])}  (target <= 2 s)")
        print(f"sim 100 members, join visible everywhere, 5% loss : {describe(sim['join_visible_100_loss5_s'])}")
        print(f"sim 3 nodes, killed agent (refused + reset)       : {describe(sim['sim_detection_s']['3-kill'])}")
        print(f"sim 3 nodes, silent death (host down, no reset)   : {describe(sim['sim_detection_s']['3-silent'])}")
        print(f"sim 100 members, silent death, 5% loss            : {describe(sim['sim_detection_s']['100-silent'])}")
        print(f"sim 10 members, 5 x 20 x 300 ms stalls, false dead: {sim['sim_stall_false_dead']}  (target 0)")
        rates = "  ".join(f"N={n}: {r:.2f}" for n, r in sim["messages_per_node_per_interval"].items())
        print(f"sim messages sent per node per probe interval     : {rates}  (steady state, O(1))")


if __name__ == "__main__":
    main()
