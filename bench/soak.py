#!/usr/bin/env python
"""Soak and chaos: a bounded mixed workload on a 3-node lab for N minutes, while a chaos
thread freezes, kills, partitions and restarts agents and demotes the leader.

Needs root (it brings up its own lab, prefix ``pasoak`` on ``10.77.106.0/24`` unless told
otherwise, and tears it down at the end, on Ctrl-C and on failure too, unless ``--keep-lab``).

Workload, by a few worker threads, every request signed with the lab's key over HTTPS:
aggregated and local lists, target forwards (``X-PortainerAgent-Target``), manager
operations (``GET /nodes``, ``/services`` through the worker's agent), exec on the receiving
node and on another one (exec create, then start upgraded on a raw TLS socket), ``logs -f``
streams opened then closed, ``/browse/put`` + ``/browse/get`` on a volume, and the websocket
console. Every 30-60 s the chaos thread does one of: freeze then thaw an agent, kill then
start an agent, partition then heal a node, restart an agent, demote the leader then promote
it back. Kills and restarts hit one node only (``--restart-node``, node2), so the other
agents keep their process and their memory growth means something; every other freeze hits
the leader's agent and lasts past the request deadline (``--freeze-hold``, 20 s); partitions
cut the worker only (with two managers, cutting one stops the Swarm's raft).

Reported: for each agent, RSS and open descriptors at start, after warm-up and at the end
(after a quiet period), and the growth after warm-up; errors by kind, split into "expected
during chaos" (the request involved a node under chaos, during the fault or shortly after)
and "unexplained", with the first messages; p50/p99 latency by kind; every request that
outlived its deadline (streams count until their head arrives). ``--json`` writes it all.

Target (issue 15), over 30 minutes: RSS growth <= 5 MB per agent after warm-up, descriptors
back to baseline, no unexplained error, every request within its deadline.

Usage: sudo .venv/bin/python bench/soak.py [--minutes 30] [--max-requests N] [--workers 3]
       [--json out.json] [--keep-lab] [--no-chaos] [--seed N]
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import signal
import ssl
import sys
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portainer_agent.lab.client import (  # noqa: E402
    TARGET,
    AgentConnection,
    UpgradeRefused,
    docker_payload,
    hijack,
    unverified_tls,
)
from portainer_agent.lab.harness import Lab, LabError  # noqa: E402
from portainer_agent.lab.testing import agent_available, lab_skip_reason  # noqa: E402

NODES = ("node1", "node2", "node3")
MANAGERS = ("node1", "node2")
WORKER = "node3"
METRICS_PORT = 9003
VOLUME = "soakvol"
UNREACHABLE = "x-portaineragent-unreachable-nodes"
#: Seconds a request of each kind may take (streams: until their head or first answer).
DEADLINES = {"console": 20.0}
DEFAULT_DEADLINE = 15.0
#: Client-side give-up: past every deadline, so a late answer is measured, not cut.
CLIENT_TIMEOUT = 40.0
RSS_TARGET = 5 << 20
FD_SLACK = 4


# --- records (pure) ------------------------------------------------------------------------

@attrs.frozen
class Sample:
    """One request as the client saw it."""

    kind: str
    via: str
    nodes: frozenset[str]  # every node whose agent the request depends on
    started: float  # monotonic
    seconds: float
    error: str | None = None  # a short kind of error (``status 500``, ``TimeoutError``...)
    message: str = ""

    @property
    def ended(self) -> float:
        return self.started + self.seconds


@attrs.frozen
class ChaosWindow:
    """One fault, from its start until the cluster is restored (plus the grace, when judging)."""

    action: str
    node: str
    started: float
    ended: float
    note: str = ""


def explained(sample: Sample, windows: Iterable[ChaosWindow], grace: float) -> ChaosWindow | None:
    """The chaos window that explains a failed request: it overlaps the window (extended by
    ``grace`` for the cluster to notice the node back) and involves the node at fault."""
    for window in windows:
        if window.node in sample.nodes and sample.started <= window.ended + grace and sample.ended >= window.started:
            return window
    return None


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def summarize(samples: Sequence[Sample], windows: Sequence[ChaosWindow], grace: float,
              first_messages: int = 3) -> dict[str, Any]:
    """Latency by kind, errors by kind (expected during chaos vs unexplained) and the requests
    that outlived their deadline."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    errors: dict[tuple[str, str, str], dict[str, Any]] = {}
    late = []
    for sample in samples:
        by_kind[sample.kind].append(sample.seconds)
        window = explained(sample, windows, grace)
        deadline = DEADLINES.get(sample.kind, DEFAULT_DEADLINE)
        if sample.seconds > deadline:
            late.append({"kind": sample.kind, "via": sample.via, "nodes": sorted(sample.nodes),
                         "seconds": round(sample.seconds, 3), "deadline": deadline, "error": sample.error,
                         "during_chaos": f"{window.action} {window.node}" if window else None,
                         # sent to the very agent at fault: nothing could have answered it in time
                         "excused": bool(window and window.node == sample.via and window.action != "demote")})
        if sample.error is None:
            continue
        verdict = "expected during chaos" if window else "unexplained"
        entry = errors.setdefault((sample.kind, sample.error, verdict),
                                  {"kind": sample.kind, "error": sample.error, "verdict": verdict, "count": 0,
                                   "messages": []})
        entry["count"] += 1
        if len(entry["messages"]) < first_messages:
            entry["messages"].append(f"via {sample.via}: {sample.message}"[:300])
    latency = {kind: {"count": len(values), "p50_ms": round(percentile(values, 0.5) * 1000, 1),
                      "p99_ms": round(percentile(values, 0.99) * 1000, 1),
                      "max_ms": round(max(values) * 1000, 1)}
               for kind, values in sorted(by_kind.items())}
    ordered_errors = sorted(errors.values(), key=lambda e: (e["verdict"] != "unexplained", -e["count"]))
    return {"latency": latency, "errors": ordered_errors, "late": late,
            "requests": len(samples), "failed": sum(1 for s in samples if s.error),
            "unexplained": sum(e["count"] for e in ordered_errors if e["verdict"] == "unexplained")}


class Recorder:
    """Thread-safe sink for samples and chaos windows, and the shared request budget."""

    def __init__(self, max_requests: int) -> None:
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self.windows: list[ChaosWindow] = []
        self.max_requests = max_requests
        self._issued = 0

    def take(self) -> bool:
        """One request from the budget; False once it is spent."""
        with self._lock:
            if self._issued >= self.max_requests:
                return False
            self._issued += 1
            return True

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def window(self, window: ChaosWindow) -> None:
        with self._lock:
            self.windows.append(window)


# --- the workload -----------------------------------------------------------------------------

class Failure(Exception):
    """A request that got an answer, but the wrong one."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def expect(response: Any, *statuses: int) -> Any:
    if response.status not in statuses:
        raise Failure(f"status {response.status}", response.body[:200].decode(errors="replace").strip())
    return response


class Workload:
    """What one worker thread does: pick an operation, run it, record it, pause, repeat,
    until ``stop`` is set, the time is up or the request budget is spent."""

    def __init__(self, lab: Lab, recorder: Recorder, stop: threading.Event, number: int, rng: random.Random,
                 containers: dict[str, dict[str, str]], think: float) -> None:
        self.lab, self.recorder, self.stop, self.number, self.rng = lab, recorder, stop, number, rng
        self.containers, self.think = containers, think
        self.connections = {node: AgentConnection(lab.node(node).ip, lab.agent_port, lab.signed_headers(),
                                                  timeout=CLIENT_TIMEOUT) for node in NODES}
        self.operations: list[tuple[Callable[[], None], int]] = [
            (self.list_local, 3), (self.list_aggregate, 3), (self.forward, 2), (self.manager, 2),
            (self.exec_local, 2), (self.exec_remote, 2), (self.logs_follow, 1), (self.browse, 1),
            (self.console, 1),
        ]

    def run(self, until: float) -> None:
        functions = [f for f, _ in self.operations]
        weights = [w for _, w in self.operations]
        try:
            while not self.stop.is_set() and time.monotonic() < until:
                if not self.recorder.take():
                    return
                operation = self.rng.choices(functions, weights)[0]
                try:
                    operation()
                except Exception as error:  # a bug of the bench, not of the agent: record it, go on
                    self.recorder.add(Sample(f"bench:{operation.__name__}", "-", frozenset(), time.monotonic(), 0.0,
                                             type(error).__name__, traceback.format_exc(limit=3)))
                self.stop.wait(self.rng.uniform(0, 2 * self.think))
        finally:
            for connection in self.connections.values():
                connection.close()

    # -- recording -----------------------------------------------------------------------------

    def measure(self, kind: str, via: str, nodes: Iterable[str], call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        error, message, result = None, "", None
        try:
            result = call()
        except Failure as failure:
            error, message = failure.kind, str(failure)
        except UpgradeRefused as refused:
            error, message = f"upgrade refused: {refused.status_line[:40]}", str(refused)
        except Exception as exception:  # the client's view: any other exception is a failed request
            error, message = type(exception).__name__, str(exception) or repr(exception)
        self.recorder.add(Sample(kind, via, frozenset(nodes) | {via}, started, time.monotonic() - started,
                                 error, message))
        return None if error else result

    def via_and_other(self) -> tuple[str, str]:
        via = self.rng.choice(NODES)
        return via, self.rng.choice([n for n in NODES if n != via])

    # -- operations ----------------------------------------------------------------------------

    def list_local(self) -> None:
        via = self.rng.choice(NODES)
        path = self.rng.choice(["/containers/json?all=1", "/images/json", "/volumes"])
        self.measure("list_local", via, [via], lambda: expect(
            self.connections[via].request("GET", path, headers={TARGET: via}), 200))

    def list_aggregate(self) -> None:
        via = self.rng.choice(NODES)

        def call() -> None:
            response = expect(self.connections[via].request("GET", "/containers/json?all=1"), 200)
            seen = {item.get("Portainer", {}).get("Agent", {}).get("NodeName") for item in response.json()}
            named = {n.strip() for n in response.headers.get(UNREACHABLE, "").split(",") if n.strip()}
            silent = sorted(set(NODES) - seen - named)
            if silent:
                raise Failure("missing in silence", f"no containers of {', '.join(silent)} and no "
                                                    f"{UNREACHABLE} header (named: {sorted(named)})")

        self.measure("list_aggregate", via, NODES, call)

    def forward(self) -> None:
        via, target = self.via_and_other()
        path = self.rng.choice(["/containers/json?all=1", "/info", "/version"])
        self.measure("forward", via, [target], lambda: expect(
            self.connections[via].request("GET", path, headers={TARGET: target}), 200))

    def manager(self) -> None:
        path = self.rng.choice(["/nodes", "/services"])
        self.measure("manager", WORKER, MANAGERS, lambda: expect(
            self.connections[WORKER].request("GET", path), 200))

    def exec_local(self) -> None:
        via = self.rng.choice(NODES)
        self.measure("exec_local", via, [via], lambda: self.exec_on(via, via))

    def exec_remote(self) -> None:
        via, target = self.via_and_other()
        self.measure("exec_remote", via, [target], lambda: self.exec_on(via, target))

    def exec_on(self, via: str, target: str) -> None:
        word = f"soak-{self.number}-{self.rng.randrange(1 << 30)}"
        created = expect(self.connections[via].request(
            "POST", f"/containers/{self.containers[target]['idle']}/exec",
            {"AttachStdout": True, "AttachStderr": True, "Tty": False, "Cmd": ["echo", word]},
            headers={TARGET: target}), 201)
        stream = hijack(self.lab.node(via).ip, self.lab.agent_port, f"/exec/{created.json()['Id']}/start",
                        {**self.lab.signed_headers(), TARGET: target}, {"Detach": False, "Tty": False},
                        timeout=CLIENT_TIMEOUT)
        try:
            output = docker_payload(stream.read_to_end(timeout=CLIENT_TIMEOUT))
        finally:
            stream.close()
        if output != f"{word}\n".encode():
            raise Failure("wrong output", f"exec printed {output[:100]!r}")

    def logs_follow(self) -> None:
        """Open ``logs -f``, read for a moment, then hang up (the latency is the head's)."""
        via, target = self.via_and_other() if self.rng.random() < 0.5 else (self.rng.choice(NODES), None)
        target = target or via
        node = self.lab.node(via)
        connection = http.client.HTTPSConnection(node.ip, self.lab.agent_port, timeout=CLIENT_TIMEOUT,
                                                 context=unverified_tls())
        holder: dict[str, Any] = {}

        def head() -> None:
            connection.request("GET", f"/containers/{self.containers[target]['ticker']}/logs?follow=1&stdout=1&tail=1",
                               headers={**self.lab.signed_headers(), TARGET: target})
            response = connection.getresponse()
            if response.status != 200:
                raise Failure(f"status {response.status}", response.read(200).decode(errors="replace"))
            holder["response"] = response

        try:
            self.measure("logs_follow", via, [target], head)
            response = holder.get("response")
            if response is None:
                return
            hold_until = time.monotonic() + self.rng.uniform(0.5, 3.0)
            received = b""
            assert connection.sock is not None
            connection.sock.settimeout(0.5)
            while time.monotonic() < hold_until and not self.stop.is_set():
                try:
                    chunk = response.read1(4096)
                except TimeoutError:
                    continue
                except (OSError, ValueError, http.client.HTTPException):
                    break  # cut mid-chunk (chaos): what was read counts
                if not chunk:
                    break
                received += chunk
            if not received:
                self.recorder.add(Sample("logs_follow", via, frozenset({via, target}), hold_until,
                                         0.0, "no data", "the stream carried nothing while held open"))
        finally:
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(2)
                except OSError:
                    pass
            connection.close()

    def browse(self) -> None:
        via, target = self.via_and_other() if self.rng.random() < 0.5 else (self.rng.choice(NODES), None)
        target = target or via
        name = f"w{self.number}-{via}.txt"
        content = os.urandom(self.rng.randrange(1, 64 * 1024))
        boundary = f"soak{self.rng.randrange(1 << 40)}"
        form = (f'--{boundary}\r\nContent-Disposition: form-data; name="Path"\r\n\r\n/soak\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
            f"\r\n--{boundary}--\r\n".encode()
        connection = self.connections[via]
        put = self.measure("browse_put", via, [target], lambda: expect(connection.request(
            "POST", f"/browse/put?volumeID={VOLUME}", form,
            headers={TARGET: target, "Content-Type": f"multipart/form-data; boundary={boundary}"}), 204))
        if put is None:
            return

        def get() -> None:
            response = expect(connection.request("GET", f"/browse/get?volumeID={VOLUME}&path=/soak/{name}",
                                                 headers={TARGET: target}), 200)
            if response.body != content:
                raise Failure("wrong content", f"got {len(response.body)} bytes, put {len(content)}")

        self.measure("browse_get", via, [target], get)

    def console(self) -> None:
        import websocket

        via, target = self.via_and_other() if self.rng.random() < 0.5 else (self.rng.choice(NODES), None)
        target = target or via
        word = f"console{self.rng.randrange(1 << 30)}"

        def call() -> None:
            created = expect(self.connections[via].request(
                "POST", f"/containers/{self.containers[target]['idle']}/exec",
                {"AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True, "Cmd": ["sh"]},
                headers={TARGET: target}), 201)
            headers = [f"{k}: {v}" for k, v in {**self.lab.signed_headers(), TARGET: target}.items()]
            ws = websocket.create_connection(
                f"wss://{self.lab.node(via).ip}:{self.lab.agent_port}/websocket/exec?id={created.json()['Id']}"
                f"&nodeName={target}", header=headers, timeout=CLIENT_TIMEOUT,
                sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})
            try:
                ws.send(f"echo {word[:7]}''{word[7:]}\n")  # the echoed input must not match
                deadline, text = time.monotonic() + CLIENT_TIMEOUT, ""
                while word not in text:
                    if time.monotonic() > deadline:
                        raise Failure("console silent", f"no {word} in {text[-200:]!r}")
                    ws.settimeout(max(0.1, deadline - time.monotonic()))
                    opcode, data = ws.recv_data(True)
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        raise Failure("console closed", f"closed before the answer; got {text[-200:]!r}")
                    text += data.decode(errors="replace")
                ws.send("exit\n")
            finally:
                ws.close()

        self.measure("console", via, [target], call)


# --- chaos --------------------------------------------------------------------------------------

class Chaos:
    """Every ``interval`` seconds one fault, held for a few seconds, then undone; each one
    recorded as a window. Always restores what it broke, even when stopped mid-fault."""

    ACTIONS = ("freeze", "kill", "partition", "restart", "demote")

    def __init__(self, lab: Lab, recorder: Recorder, stop: threading.Event, rng: random.Random,
                 interval: tuple[float, float], hold: float, freeze_hold: float, restart_node: str,
                 log: Callable[[str], None]) -> None:
        self.lab, self.recorder, self.stop, self.rng = lab, recorder, stop, rng
        self.interval, self.hold, self.freeze_hold = interval, hold, freeze_hold
        self.restart_node, self.log = restart_node, log
        self.errors: list[str] = []
        self.freezes = 0

    def run(self, until: float) -> None:
        actions = itertools.cycle(self.rng.sample(self.ACTIONS, len(self.ACTIONS)))
        while not self.stop.wait(self.rng.uniform(*self.interval)) and time.monotonic() < until:
            action = next(actions)
            started = time.monotonic()
            node, note = "?", ""
            try:
                node, note = getattr(self, action)()
            except Exception as error:  # a fault that could not be done or undone: say so, keep going
                self.errors.append(f"{action} {node}: {error!r}")
                self.log(f"chaos {action} {node} failed: {error!r}")
                self.restore_all()
            window = ChaosWindow(action, node, started, time.monotonic(), note)
            self.recorder.window(window)
            self.log(f"chaos: {action} {node} for {window.ended - window.started:.1f}s {note}")

    def held(self) -> None:
        self.stop.wait(self.hold)

    def freeze(self) -> tuple[str, str]:
        # Every other freeze hits the leader's agent: manager operations go there first.
        self.freezes += 1
        node = self.lab.leader() if self.freezes % 2 else self.rng.choice(NODES)
        self.lab.freeze_agent(node)
        try:
            self.stop.wait(self.freeze_hold)
        finally:
            self.lab.thaw_agent(node)
        return node, "(the leader)" if self.freezes % 2 else ""

    def kill(self) -> tuple[str, str]:
        node = self.restart_node
        self.lab.kill_agent(node)
        try:
            self.held()
        finally:
            self.lab.start_agent(node, self.lab.node(node).agent_args)
        return node, ""

    def partition(self) -> tuple[str, str]:
        # Only the worker: with two managers, cutting one off stops the Swarm's raft (no
        # quorum), and every manager operation then waits on dockerd, not on the agents.
        node = WORKER
        self.lab.partition(node)
        try:
            self.held()
        finally:
            self.lab.heal(node)
            self.lab.wait_agent_ready(node)
        return node, ""

    def restart(self) -> tuple[str, str]:
        node = self.restart_node
        self.lab.restart_agent(node)
        return node, ""

    def demote(self) -> tuple[str, str]:
        leader = self.lab.leader()
        self.lab.demote(leader)
        try:
            self.held()
        finally:
            self.lab.promote(leader)
        return leader, f"(leader now {self.lab.leader()})"

    def restore_all(self) -> None:
        """Whatever state a failed action left: every agent thawed, running, every node linked."""
        for node in NODES:
            try:
                self.lab.heal(node)
                agent = self.lab.node(node).agent
                if agent is not None and agent.running:
                    self.lab.thaw_agent(node)
                else:
                    if agent is not None:
                        self.lab.kill_agent(node)
                    self.lab.start_agent(node, self.lab.node(node).agent_args)
            except Exception as error:
                self.errors.append(f"restore {node}: {error!r}")
        for node in MANAGERS:
            try:
                role = self.lab.docker(self.lab.leader(), "node", "inspect", node, "--format",
                                       "{{.Spec.Role}}", timeout=30).stdout.strip()
                if role != "manager":
                    self.lab.promote(node)
            except Exception as error:
                self.errors.append(f"restore {node}'s role: {error!r}")


# --- the run --------------------------------------------------------------------------------------

def agent_readings(lab: Lab) -> dict[str, dict[str, Any]]:
    readings = {}
    for node in NODES:
        agent = lab.node(node).agent
        reading: dict[str, Any] = {"pid": agent.pid if agent else None}
        try:
            reading["rss_bytes"] = lab.agent_rss_bytes(node)
            reading["fds"] = lab.agent_fd_count(node)
        except (LabError, OSError) as error:
            reading["error"] = str(error)
        metrics = lab.agent_metrics(node) if agent else None
        if metrics is not None:
            inflight = metrics.total("portainer_agent_inflight_requests")
            reading["inflight"] = inflight
            reading["open_connections"] = metrics.get("portainer_agent_open_connections")
            reading["open_hijacked_streams"] = metrics.get("portainer_agent_open_hijacked_streams")
        readings[node] = reading
    return readings


def converged(lab: Lab) -> bool:
    for node in NODES:
        response = lab.agent_request(node, "/agents")
        if response is None or response.status != 200 or len(json.loads(response.body)) != len(NODES):
            return False
    return True


def prepare(lab: Lab) -> dict[str, dict[str, str]]:
    """Per node: an idle container (exec, console), a ticking one (logs -f) and the volume."""
    containers = {}
    for node in NODES:
        idle = lab.docker(node, "run", "-d", "--name", "soak-idle", "busybox:local", "sleep", "1000000000")
        ticker = lab.docker(node, "run", "-d", "--name", "soak-ticker", "busybox:local", "sh", "-c",
                            "while true; do echo tick; sleep 1; done")
        lab.docker(node, "volume", "create", VOLUME)
        containers[node] = {"idle": idle.stdout.strip(), "ticker": ticker.stdout.strip()}
    return containers


def growth_table(readings: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], dict[str, Any]]:
    lines = [f"{'agent':<6} {'RSS start':>10} {'warm':>8} {'end':>8} {'growth':>8}   "
             f"{'fds start':>9} {'warm':>5} {'end':>5}   note"]
    growth: dict[str, Any] = {}
    for node in NODES:
        start, warm, end = (readings[phase].get(node, {}) for phase in ("start", "warm", "end"))

        def mb(reading: dict[str, Any]) -> str:
            return f"{reading['rss_bytes'] / 2**20:.1f}" if "rss_bytes" in reading else "-"

        restarted = warm.get("pid") != end.get("pid")
        rss_growth = None if restarted or "rss_bytes" not in end or "rss_bytes" not in warm \
            else end["rss_bytes"] - warm["rss_bytes"]
        fd_growth = None if restarted or "fds" not in end or "fds" not in warm else end["fds"] - warm["fds"]
        growth[node] = {"rss_bytes": rss_growth, "fds": fd_growth, "restarted_after_warmup": restarted,
                        "inflight_end": end.get("inflight")}
        note = "restarted after warm-up (growth n/a)" if restarted else ""
        if end.get("inflight") is not None:
            note += f" in flight at end: {end['inflight']:g}"
        if end.get("open_hijacked_streams"):
            note += f" hijacked streams open at end: {end['open_hijacked_streams']:g}"
        lines.append(f"{node:<6} {mb(start):>10} {mb(warm):>8} {mb(end):>8} "
                     f"{'-' if rss_growth is None else f'{rss_growth / 2**20:+.2f}':>8}   "
                     f"{start.get('fds', '-'):>9} {warm.get('fds', '-'):>5} {end.get('fds', '-'):>5}   {note}")
    return lines, growth


def render(report: dict[str, Any], growth_lines: list[str]) -> str:
    summary = report["summary"]
    out = [f"\nsoak: {report['minutes_run']:.1f} min, {summary['requests']} requests, {summary['failed']} failed "
           f"({summary['unexplained']} unexplained), {len(report['chaos'])} chaos actions", "",
           "agents (MB; growth = end - after warm-up):", *growth_lines, "",
           f"{'kind':<15} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>9}"]
    for kind, row in summary["latency"].items():
        out.append(f"{kind:<15} {row['count']:>6} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['max_ms']:>9}")
    out += ["", "errors:" if summary["errors"] else "errors: none"]
    for entry in summary["errors"]:
        out.append(f"  {entry['count']:>5} x {entry['kind']}: {entry['error']} [{entry['verdict']}]")
        out += [f"          {message}" for message in entry["messages"]]
    late = summary["late"]
    out += ["", f"past their deadline: {len(late)}"]
    for item in late[:20]:
        out.append(f"  {item['kind']} via {item['via']} {item['seconds']}s (deadline {item['deadline']}s)"
                   f"{' error ' + item['error'] if item['error'] else ''}"
                   f"{' during ' + item['during_chaos'] if item['during_chaos'] else ''}"
                   f"{' (sent to the agent at fault: excused)' if item['excused'] else ''}")
    out += ["", "chaos:"] + [f"  +{c['at_s']:>6.1f}s {c['action']} {c['node']} ({c['seconds']}s) {c['note']}"
                             for c in report["chaos"]]
    out += ["", "targets:"] + [f"  {'PASS' if ok else 'FAIL'} {what}" for what, ok in report["targets"].items()]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--think", type=float, default=0.1, help="mean pause between a worker's requests (s)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the baseline (default: "
                        "10%% of the run, 30-120 s); no chaos meanwhile")
    parser.add_argument("--quiet", type=float, default=20, help="seconds of rest before the end readings")
    parser.add_argument("--chaos-interval", default="30:60", help="seconds between faults, MIN:MAX")
    parser.add_argument("--chaos-hold", type=float, default=10, help="how long a fault lasts (s)")
    parser.add_argument("--freeze-hold", type=float, default=DEFAULT_DEADLINE + 5,
                        help="how long a frozen agent stays frozen (s): past the deadline, so a request "
                        "waiting on it shows up late")
    parser.add_argument("--chaos-grace", type=float, default=15,
                        help="after a fault, how long errors involving its node count as expected (s)")
    parser.add_argument("--restart-node", default="node2", choices=NODES, help="the node whose agent is killed/restarted")
    parser.add_argument("--no-chaos", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument("--prefix", default="pasoak")
    parser.add_argument("--subnet", default="10.77.106.0/24")
    args = parser.parse_args(argv)
    reason = lab_skip_reason() or (None if agent_available() else "the agent program is missing")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    low, high = (float(x) for x in args.chaos_interval.split(":"))
    warmup = args.warmup if args.warmup is not None else min(120.0, max(30.0, args.minutes * 6))
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {message}", flush=True)

    # Ctrl-C and SIGTERM both end the run through the same path: stop, restore, report, tear down.
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupt)
    lab = Lab(prefix=args.prefix, subnet=args.subnet, nodes_count=len(NODES), managers=len(MANAGERS),
              metrics_port=METRICS_PORT, down_at_exit=not args.keep_lab, lock_timeout=120)
    lab_is_up = False
    recorder = Recorder(args.max_requests)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    readings: dict[str, dict[str, dict[str, Any]]] = {}
    chaos: Chaos | None = None
    interrupted = False
    run_started = time.monotonic()
    try:
        log(f"bringing up lab {args.prefix} ({args.subnet}), seed {seed}")
        lab.up()  # tears down what it started if it fails
        lab_is_up = True
        Lab.wait_for(lambda: converged(lab), 90, "every agent to list 3 members")
        containers = prepare(lab)
        readings["start"] = agent_readings(lab)
        run_started = time.monotonic()
        until = run_started + args.minutes * 60
        rng = random.Random(seed)
        workers = [Workload(lab, recorder, stop, i, random.Random(rng.random()), containers, args.think)
                   for i in range(args.workers)]
        threads = [threading.Thread(target=w.run, args=(until,), name=f"soak-worker-{i}", daemon=True)
                   for i, w in enumerate(workers)]
        for thread in threads:
            thread.start()
        log(f"workload: {args.workers} workers for {args.minutes} min (warm-up {warmup:.0f}s)")
        stop.wait(min(warmup, max(0.0, until - time.monotonic())))
        readings["warm"] = agent_readings(lab)
        log("warm-up done: " + ", ".join(f"{n} {r.get('rss_bytes', 0) / 2**20:.1f} MB/{r.get('fds')} fds"
                                         for n, r in readings["warm"].items()))
        if not args.no_chaos and not stop.is_set():
            chaos = Chaos(lab, recorder, stop, random.Random(rng.random()), (low, high), args.chaos_hold,
                          args.freeze_hold, args.restart_node, log)
            threads.append(threading.Thread(target=chaos.run, args=(until,), name="soak-chaos", daemon=True))
            threads[-1].start()
        while any(t.is_alive() for t in threads[:args.workers]) and time.monotonic() < until:
            stop.wait(5)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping the workload and restoring the lab")
    except Exception:
        traceback.print_exc()
        interrupted = True
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT + 30)
        if chaos is not None:
            chaos.restore_all()
    if not lab_is_up:
        return 2
    try:
        if "warm" in readings and not interrupted:
            log(f"quiet for {args.quiet:.0f}s before the end readings")
            time.sleep(args.quiet)
            # descriptors may take a moment to come back: poll up to 30 s more
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                readings["end"] = agent_readings(lab)
                if all(readings["end"][n].get("fds", 0) <= readings["warm"][n].get("fds", 0) + FD_SLACK
                       for n in NODES):
                    break
                time.sleep(1)
        if "end" not in readings and "warm" in readings:
            try:
                readings["end"] = agent_readings(lab)
            except Exception:
                pass
        report = build_report(args, seed, recorder, readings, chaos, run_started, interrupted)
        text = render(report, report.pop("_growth_lines"))
        print(text)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
            log(f"wrote {args.json}")
        return 0 if all(report["targets"].values()) and not interrupted else 1
    finally:
        if args.keep_lab:
            lab.release()
            log(f"lab {args.prefix} kept: python -m portainer_agent.lab down --prefix {args.prefix}")
        else:
            log("tearing the lab down")
            remaining = lab.down()
            if remaining:
                print(f"leftovers after down: {remaining.describe()}", file=sys.stderr)


def build_report(args: argparse.Namespace, seed: int, recorder: Recorder, readings: dict[str, Any],
                 chaos: Chaos | None, run_started: float, interrupted: bool) -> dict[str, Any]:
    summary = summarize(recorder.samples, recorder.windows, args.chaos_grace)
    for phase in ("start", "warm", "end"):
        readings.setdefault(phase, {})
    growth_lines, growth = growth_table(readings)
    measured = [g for g in growth.values() if g["rss_bytes"] is not None]
    targets = {
        f"RSS growth after warm-up <= {RSS_TARGET >> 20} MB per agent (not restarted: {len(measured)})":
            bool(measured) and all(g["rss_bytes"] <= RSS_TARGET for g in measured),
        f"descriptors back to baseline (+{FD_SLACK})":
            bool(measured) and all(g["fds"] <= FD_SLACK for g in growth.values() if g["fds"] is not None),
        "no unexplained error": summary["unexplained"] == 0,
        "every request within its deadline (but those sent to the agent at fault)":
            not [item for item in summary["late"] if not item["excused"]],
    }
    inflight = [g["inflight_end"] for g in growth.values() if g["inflight_end"] is not None]
    if inflight:
        targets["nothing in flight at the end"] = all(value == 0 for value in inflight)
    ended = max([s.ended for s in recorder.samples] + [run_started])
    return {
        "seed": seed, "minutes_requested": args.minutes, "minutes_run": (ended - run_started) / 60,
        "workers": args.workers, "interrupted": interrupted,
        "deadlines": {"default": DEFAULT_DEADLINE, **DEADLINES}, "chaos_grace_s": args.chaos_grace,
        "agents": readings, "growth": growth, "summary": summary,
        "chaos": [{"action": w.action, "node": w.node, "at_s": round(w.started - run_started, 1),
                   "seconds": round(w.ended - w.started, 1), "note": w.note} for w in recorder.windows],
        "chaos_errors": chaos.errors if chaos else [],
        "targets": targets, "_growth_lines": growth_lines,
    }


if __name__ == "__main__":
    sys.exit(main())
