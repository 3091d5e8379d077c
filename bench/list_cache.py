#!/usr/bin/env python
"""Cluster lists with and without the list cache (issue 16), on a real N-node lab Swarm.

One run measures, on its own lab (``--nodes`` nodes, the first two managers, the last node a
worker whose agent receives every agent request), ``--containers`` containers per node, with
bench/proxy.py's keep-alive HTTP/1.1 client (TLS without verification, signed like Portainer):

  * aggregated ``GET /v1.41/containers/json?all=1`` through the worker's agent: p50/p99 at
    concurrency 1, next to node1's direct-socket p50 for the same request in the same run
    (request by request, in turns) and the ratio; then req/s (and p50/p99) at concurrency 16;
  * the worker's own list through its agent (``X-PortainerAgent-Target: <itself>``) against
    its own socket, in turns, and the ratio;
  * churn: every ``--churn-interval`` (100 ms) each node's socket gets a container created and
    the one created ``--churn-lifetime`` seconds before removed, for ``--churn-seconds``;
    meanwhile aggregated lists (and node1's socket, in turns) are timed, and every list's ids
    are kept. Staleness: for each create (remove) acknowledged by a socket, every aggregated
    list that *starts* more than ``--stale-after`` (1 s) later (and, for a create, ends before
    its remove was sent) must contain (must not contain) it. A stale read is one such list that
    does not; the "next list" count looks only at the first list after the second;
  * memory: each agent's VmRSS once the Swarm converged, after the sequential lists (what a
    cache holds, before concurrency 16 grows the aggregator's heap with 16 aggregates' buffers),
    after concurrency 16, after the churn (and, with ``--metrics``, every ``/metrics`` sample
    whose name mentions a cache).

``--agent-arg`` (repeatable, written with ``=`` because its value starts with dashes) goes to
every agent, e.g. ``--agent-arg=--list-cache=off``; the agents also inherit this process's
environment (``AGENT_LIST_CACHE=off ...``). Every phase is bounded by a request count or a
time; the lab is torn down at the end, on failure and on Ctrl-C/SIGTERM.

Usage (root, from the repository root):

    sudo .venv/bin/python bench/list_cache.py [--nodes 3] [--containers 50] [--requests 200]
        [--seconds 5] [--churn-seconds 10] [--agent-arg=--list-cache=on] [--json out.json]
        [--prefix pabc --subnet 10.77.115.0/24]
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import IMAGE, Connection, HTTPError, Target, call, create_containers, percentile  # noqa: E402
from routing import NodeTarget, sequential  # noqa: E402

from portainer_agent.lab.harness import Lab  # noqa: E402

LIST = "/v1.41/containers/json?all=1"
TARGET = "X-PortainerAgent-Target"
UNREACHABLE = "x-portaineragent-unreachable-nodes"
MB = 1024 * 1024


# ------------------------------------------------------------------ set-up

def make_containers(target: Target, node: str, count: int, running: int, workers: int = 4) -> None:
    """``count`` busybox containers on one node, the first ``running`` started (``sleep``):
    created-only ones list like the others but cost no shim process, so 500 a node fit."""
    create_containers(target, count, workers, running=running, name=f"bench-list-{node}")


def rss_mb(lab: Lab) -> dict[str, float]:
    return {node.name: round(lab.agent_rss_bytes(node) / MB, 2) for node in lab.nodes}


def cache_metrics(lab: Lab) -> dict[str, dict[str, float]]:
    """Every metrics sample of the list cache, and the aggregate legs it spared (304s, legs
    not sent), by node (empty without ``--metrics``)."""
    if not lab.metrics_port:
        return {}
    found: dict[str, dict[str, float]] = {}
    for node in lab.nodes:
        metrics = lab.agent_metrics(node)
        if metrics is None:
            continue
        found[node.name] = {
            name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels)) + "}" if labels else ""): value
            for (name, labels), value in metrics.samples.items()
            if ("cache" in name or "not_modified" in name or "from_memory" in name) and not name.endswith("_created")}
    return found


# ------------------------------------------------------------------ load

def concurrent(target: Target, path: str, concurrency: int, seconds: float) -> tuple[int, int, list[float]]:
    """``concurrency`` keep-alive connections sending ``path`` back to back for ``seconds``:
    (answered, errors, latencies in ms)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        try:
            with Connection(target) as conn:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    conn.request("GET", path).expect(200)
                    with lock:
                        latencies.append((time.perf_counter() - started) * 1000)
        except (OSError, EOFError, HTTPError):
            with lock:
                errors[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    return len(latencies), errors[0], latencies


# ------------------------------------------------------------------ churn and staleness

@attrs.frozen
class Write:
    """A create or a remove sent straight to a node's socket, with when it was sent and when
    the socket acknowledged it (``time.monotonic()`` of this process)."""

    node: str
    cid: str
    kind: str  # "create" or "remove"
    sent: float
    acked: float


@attrs.frozen
class Read:
    """One aggregated list: when it started and ended, the ids it held, the nodes it named
    unreachable (``X-PortainerAgent-Unreachable-Nodes``)."""

    started: float
    ended: float
    ids: frozenset[str]
    unreachable: str


def paced(interval: float, deadline: float, step: Any) -> None:
    """Call ``step`` every ``interval`` until ``deadline``; a late tick is not made up for."""
    tick = time.monotonic()
    while (now := time.monotonic()) < deadline:
        step()
        tick = max(tick + interval, now)
        pause = tick - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def churn(target: Target, node: str, seconds: float, interval: float, lifetime: float,
          writes: list[Write], lock: threading.Lock, failures: list[str], start: bool = False) -> None:
    """Every ``interval``, for ``seconds``: create a container on the node's socket, and
    (on a second connection, so that a slow create does not halve the rate) remove the
    oldest one once it is ``lifetime`` seconds old; then remove what is left (recorded too,
    so that no list after it expects those). With ``start``, each container is also started
    (``true``: start and die events too) before its create counts as acknowledged."""
    alive: deque[tuple[str, float]] = deque()
    deadline = time.monotonic() + seconds
    body = json.dumps({"Image": IMAGE, "Cmd": ["true"], "Labels": {"pa-bench": "churn"},
                       "HostConfig": {"NetworkMode": "none"}}).encode()
    names = iter(range(1 << 30))

    def create(conn: Connection) -> None:
        sent = time.monotonic()
        raw = conn.request("POST", f"/v1.41/containers/create?name=bench-churn-{node}-{next(names)}", body,
                           {"Content-Type": "application/json"}).expect(201)
        cid = json.loads(raw)["Id"]
        if start:
            conn.request("POST", f"/v1.41/containers/{cid}/start").expect(204)
        acked = time.monotonic()
        with lock:
            alive.append((cid, acked))
            writes.append(Write(node, cid, "create", sent, acked))

    def remove(conn: Connection) -> None:
        with lock:
            if not alive or alive[0][1] > time.monotonic() - lifetime:
                return
            old, _ = alive.popleft()
        sent = time.monotonic()
        conn.request("DELETE", f"/v1.41/containers/{old}?force=1").expect(204)
        with lock:
            writes.append(Write(node, old, "remove", sent, time.monotonic()))

    def loop(step: Any) -> None:
        try:
            with Connection(target) as conn:
                paced(interval, deadline, lambda: step(conn))
        except (OSError, EOFError, HTTPError, ValueError) as error:
            failures.append(f"{node} {step.__name__}: {error!r}")

    loops = [threading.Thread(target=loop, args=(step,), daemon=True) for step in (create, remove)]
    for thread in loops:
        thread.start()
    for thread in loops:
        thread.join(seconds + 120)
    for cid, _ in list(alive):
        try:
            sent = time.monotonic()
            call(target, "DELETE", f"/v1.41/containers/{cid}?force=1", codes=(204, 404))
            with lock:
                writes.append(Write(node, cid, "remove", sent, time.monotonic()))
        except (OSError, EOFError, HTTPError) as error:
            failures.append(f"{node} cleanup: {error!r}")


def read_lists(agent: Target, direct: Target, stop: threading.Event, reads: list[Read],
               direct_ms: list[float], failures: list[str]) -> None:
    """Aggregated lists through the agent and node1's socket, in turns, until ``stop``."""
    with Connection(agent) as conn, Connection(direct) as dconn:
        try:
            while not stop.is_set():
                started = time.monotonic()
                response = conn.request("GET", LIST)
                body = response.expect(200)
                ended = time.monotonic()
                ids = frozenset(item["Id"] for item in json.loads(body))
                reads.append(Read(started, ended, ids, response.headers.get(UNREACHABLE, "")))
                started = time.monotonic()
                dconn.request("GET", LIST).expect(200)
                direct_ms.append((time.monotonic() - started) * 1000)
        except (OSError, EOFError, HTTPError, ValueError) as error:
            failures.append(f"lists: {error!r}")


def staleness(writes: list[Write], reads: list[Read], after: float) -> dict[str, Any]:
    """Stale reads: for every write, the complete aggregated lists that started more than
    ``after`` seconds after the socket acknowledged it (for a create: and ended before its
    remove was sent) that do not show it. Also how many lists started *within* ``after`` of a write
    and did not show it yet (allowed: how fresh the answers are in practice)."""
    complete = sorted((read for read in reads if not read.unreachable), key=lambda read: read.started)
    starts = [read.started for read in complete]
    ends = [read.ended for read in complete]  # in the same order: one reader, one list at a time
    removes = {write.cid: write for write in writes if write.kind == "remove"}
    checked = stale_any = stale_next = unchecked = early_misses = early_reads = 0
    examples: list[dict[str, Any]] = []
    for write in writes:
        until = removes[write.cid].sent if write.kind == "create" and write.cid in removes else float("inf")
        first = bisect.bisect_right(starts, write.acked)
        checkable = bisect.bisect_right(starts, write.acked + after)
        end = bisect.bisect_left(ends, until)
        for read in complete[first:min(checkable, end)]:
            early_reads += 1
            early_misses += (write.cid in read.ids) != (write.kind == "create")
        window = complete[checkable:end]
        if not window:
            unchecked += 1
            continue
        checked += 1
        wrong = [read for read in window if (write.cid in read.ids) != (write.kind == "create")]
        stale_any += len(wrong)
        if wrong and wrong[0] is window[0]:
            stale_next += 1
        if wrong and len(examples) < 10:
            examples.append({"node": write.node, "kind": write.kind, "cid": write.cid[:12],
                             "list_started_after_ack_s": round(wrong[0].started - write.acked, 3)})
    return {"writes": len(writes), "checked": checked, "unchecked": unchecked,
            "stale_next_list": stale_next, "stale_reads": stale_any, "examples": examples,
            "lists_within_window": early_reads, "lists_within_window_not_yet_showing": early_misses}


# ------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="lab nodes (the first two managers)")
    parser.add_argument("--containers", type=int, default=50, help="containers per node")
    parser.add_argument("--running", type=int, default=50,
                        help="of them, how many are started (the rest only created: no shim process)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per path (c=1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the concurrency-16 phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds of rest after the containers are made (dockerd and the shims calm down)")
    parser.add_argument("--churn-seconds", type=float, default=10.0, help="length of the churn phase (0: skip)")
    parser.add_argument("--churn-interval", type=float, default=0.1, help="one create + one remove per node this often")
    parser.add_argument("--churn-lifetime", type=float, default=3.0, help="how long a churn container lives")
    parser.add_argument("--churn-start", action="store_true",
                        help="also start each churn container (it runs `true`: start and die events)")
    parser.add_argument("--stale-after", type=float, default=1.0,
                        help="a list starting this long after a write must reflect it")
    parser.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                        help="passed to every agent (repeatable; write --agent-arg=--list-cache=off)")
    parser.add_argument("--metrics", action="store_true", help="agents serve /metrics; report cache samples")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--prefix", default="pabc", help="lab name prefix (namespaces, bridge)")
    parser.add_argument("--subnet", default="10.77.115.0/24", help="lab subnet")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (an aggregate needs peers)")
    if args.churn_lifetime <= args.stale_after:
        parser.error("--churn-lifetime must exceed --stale-after, or no create can be checked")

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    lab = Lab(prefix=args.prefix, subnet=args.subnet, nodes_count=args.nodes, managers=min(2, args.nodes),
              secret="bench-secret", agent_args=tuple(args.agent_arg), metrics_port=9003 if args.metrics else None,
              dockerd_timeout=60 + 12 * args.nodes, agent_timeout=30 + 6 * args.nodes,
              **({"python": os.environ["PA_BENCH_PYTHON"]} if os.environ.get("PA_BENCH_PYTHON") else {}))
    try:
        print(f"bringing up {args.nodes} nodes ...", file=sys.stderr, flush=True)
        lab.up()
        figures = run(lab, args, started)
    except KeyboardInterrupt:
        print("interrupted; tearing the lab down ...", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        down_started = time.monotonic()
        left = lab.down()
        print(f"lab down in {time.monotonic() - down_started:.0f} s"
              + (f"; LEFT OVER: {left.describe()}" if left else ""), file=sys.stderr, flush=True)
    figures["seconds_total"] = round(time.monotonic() - started, 1)
    print(f"\n{args.nodes} nodes: {figures['seconds_total']:.0f} s in all (lab up {lab.timings.get('agents')} s, "
          f"containers {figures['seconds_containers']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 1 if figures.get("failures") else 0


def run(lab: Lab, args: argparse.Namespace, started: float) -> dict[str, Any]:
    headers = lab.signed_headers()
    worker = lab.nodes[-1]
    agent = NodeTarget(worker.name, worker.ip, lab.agent_port, headers)
    sockets = {n.name: Target(f"{n.name}-socket", unix=n.socket_path) for n in lab.nodes}
    direct = sockets["node1"]
    count = args.nodes

    def converged() -> bool:
        response = lab.agent_request(worker, "/agents")
        return response is not None and response.status == 200 and len(json.loads(response.body)) == count

    lab.wait_for(converged, 30 + 6 * count, f"{count} members")
    figures: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lab_timings_s": dict(lab.timings), "failures": []}
    figures["rss_mb_converged"] = rss_mb(lab)

    made = time.monotonic()
    print(f"creating {args.containers} containers on each node ...", file=sys.stderr, flush=True)
    threads = [threading.Thread(target=make_containers, daemon=True,
                                args=(sockets[n.name], n.name, args.containers, min(args.running, args.containers)))
               for n in lab.nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    figures["seconds_containers"] = time.monotonic() - made
    time.sleep(args.settle)
    with Connection(agent) as conn:
        total = len(json.loads(conn.request("GET", LIST).expect(200)))
    figures["aggregate_count"] = total
    if total < count * args.containers:
        raise RuntimeError(f"the aggregate lists {total} containers, expected >= {count * args.containers}")
    print(f"{total} containers in the aggregate; measuring ...", file=sys.stderr, flush=True)
    figures["load_before"] = os.getloadavg()

    # Aggregated vs one node's socket, then the worker's own list through its agent vs its socket.
    one = sequential({"aggregated": (agent, None, LIST), "direct": (direct, None, LIST)}, args.requests)
    own = sequential({"own_agent": (agent, {TARGET: worker.name}, LIST),
                      "own_socket": (sockets[worker.name], None, LIST)}, args.requests)
    for name, values in {**one, **own}.items():
        figures[f"{name}_p50_ms"] = percentile(values, 50)
        figures[f"{name}_p99_ms"] = percentile(values, 99)
    figures["aggregated_over_direct_p50"] = figures["aggregated_p50_ms"] / figures["direct_p50_ms"]
    figures["own_over_socket_p50"] = figures["own_agent_p50_ms"] / figures["own_socket_p50_ms"]
    figures["rss_mb_after_sequential"] = rss_mb(lab)

    answered, errors, latencies = concurrent(agent, LIST, args.concurrency, args.seconds)
    figures["aggregated_rps_cN"] = answered / args.seconds
    figures["aggregated_cN_p50_ms"] = percentile(latencies, 50)
    figures["aggregated_cN_p99_ms"] = percentile(latencies, 99)
    figures["aggregated_cN_errors"] = errors
    figures["rss_mb_after_lists"] = rss_mb(lab)
    figures["cache_metrics_after_lists"] = cache_metrics(lab)

    if args.churn_seconds > 0:
        print(f"churn for {args.churn_seconds:g} s ...", file=sys.stderr, flush=True)
        writes: list[Write] = []
        reads: list[Read] = []
        churn_direct: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        churners = [threading.Thread(target=churn, daemon=True,
                                     args=(sockets[n.name], n.name, args.churn_seconds, args.churn_interval,
                                           args.churn_lifetime, writes, lock, failures, args.churn_start))
                    for n in lab.nodes]
        reader = threading.Thread(target=read_lists, args=(agent, direct, stop, reads, churn_direct, failures),
                                  daemon=True)
        reader.start()
        churn_ends = time.monotonic() + args.churn_seconds
        for thread in churners:
            thread.start()
        for thread in churners:
            thread.join(args.churn_seconds + 300)
        # Lists go on a little after the last write, so that it is checked too; the latency
        # figures only count the lists that started while the churn ran.
        time.sleep(args.stale_after + 0.5)
        stop.set()
        reader.join(120)
        during = [index for index, read in enumerate(reads) if read.started < churn_ends]
        durations = [(reads[index].ended - reads[index].started) * 1000 for index in during]
        churn_direct = [churn_direct[index] for index in during if index < len(churn_direct)]
        figures["churn"] = {
            "creates_per_s_per_node": sum(w.kind == "create" for w in writes) / args.churn_seconds / count,
            "removes_per_s_per_node": sum(w.kind == "remove" and w.sent < churn_ends for w in writes)
            / args.churn_seconds / count,
            "write_ack_p50_ms": percentile([(w.acked - w.sent) * 1000 for w in writes], 50),
            "lists": len(during),
            "lists_naming_unreachable_nodes": sum(bool(read.unreachable) for read in reads),
            "aggregated_p50_ms": percentile(durations, 50),
            "aggregated_p99_ms": percentile(durations, 99),
            "direct_p50_ms": percentile(churn_direct, 50),
            "direct_p99_ms": percentile(churn_direct, 99),
            **staleness(writes, reads, args.stale_after),
        }
        figures["failures"] += failures
        figures["rss_mb_after_churn"] = rss_mb(lab)
        figures["cache_metrics_after_churn"] = cache_metrics(lab)
    figures["load_after"] = os.getloadavg()
    report(figures, args, worker.name)
    return figures


def report(figures: dict[str, Any], args: argparse.Namespace, worker: str) -> None:
    def rss(key: str) -> str:
        values = figures.get(key) or {}
        return ", ".join(f"{name} {value:.1f}" for name, value in values.items()) + " MB"

    rows = [
        (f"aggregated GET /containers/json?all=1 via {worker}, p50 / p99 (c=1)",
         f"{figures['aggregated_p50_ms']:.2f} / {figures['aggregated_p99_ms']:.2f} ms"),
        ("node1's socket, same request, p50 / p99",
         f"{figures['direct_p50_ms']:.2f} / {figures['direct_p99_ms']:.2f} ms"),
        ("aggregated p50 / socket p50", f"{figures['aggregated_over_direct_p50']:.2f}x"),
        (f"aggregated c={args.concurrency}: req/s, p50 / p99",
         f"{figures['aggregated_rps_cN']:.0f}/s, {figures['aggregated_cN_p50_ms']:.1f} / "
         f"{figures['aggregated_cN_p99_ms']:.1f} ms" + (f", {figures['aggregated_cN_errors']} errors"
                                                       if figures['aggregated_cN_errors'] else "")),
        (f"{worker}'s own list through its agent, p50 / p99",
         f"{figures['own_agent_p50_ms']:.2f} / {figures['own_agent_p99_ms']:.2f} ms"),
        (f"{worker}'s socket, p50 / p99", f"{figures['own_socket_p50_ms']:.2f} / {figures['own_socket_p99_ms']:.2f} ms"),
        ("own list through the agent / socket, p50", f"{figures['own_over_socket_p50']:.2f}x"),
    ]
    churn = figures.get("churn")
    if churn:
        rows += [
            ("churn: creates" + (" (and starts)" if args.churn_start else "") + " / removes per s per node (achieved)",
             f"{churn['creates_per_s_per_node']:.1f} / {churn['removes_per_s_per_node']:.1f} "
             f"(socket ack p50 {churn['write_ack_p50_ms']:.1f} ms)"),
            ("churn: aggregated p50 / p99", f"{churn['aggregated_p50_ms']:.2f} / {churn['aggregated_p99_ms']:.2f} ms"
             f" ({churn['lists']} lists)"),
            ("churn: node1's socket p50 / p99", f"{churn['direct_p50_ms']:.2f} / {churn['direct_p99_ms']:.2f} ms"),
            (f"churn: stale reads (lists starting > {args.stale_after:g} s after a write)",
             f"{churn['stale_reads']} (next list: {churn['stale_next_list']}; {churn['checked']} writes checked, "
             f"{churn['unchecked']} not)"),
            (f"churn: lists within {args.stale_after:g} s of a write not showing it yet",
             f"{churn['lists_within_window_not_yet_showing']} of {churn['lists_within_window']}"),
        ]
        if churn["lists_naming_unreachable_nodes"]:
            rows.append(("churn: lists naming unreachable nodes (left out of the check)",
                         str(churn["lists_naming_unreachable_nodes"])))
    rows += [
        ("agent RSS once converged", rss("rss_mb_converged")),
        ("agent RSS after the sequential lists (c=1)", rss("rss_mb_after_sequential")),
        (f"agent RSS after c={args.concurrency} too", rss("rss_mb_after_lists")),
    ]
    if churn:
        rows.append(("agent RSS after the churn", rss("rss_mb_after_churn")))
    agent_args = " ".join(args.agent_arg) or "none"
    print(f"\n{args.nodes} nodes, {args.containers} containers a node ({min(args.running, args.containers)} running),"
          f" agent args: {agent_args}\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for key in ("cache_metrics_after_lists", "cache_metrics_after_churn"):
        if figures.get(key):
            print(f"\n{key}: {json.dumps(figures[key])}")
    for failure in figures["failures"][:10]:
        print(f"FAILURE: {failure}")
    print(f"\nload average before {figures['load_before']}, after {figures['load_after']}")


if __name__ == "__main__":
    sys.exit(main())
