"""A real multi-node Docker Swarm on one machine, with one agent per node.

Each node is a network namespace (``<prefix>-n1``...) wired by a veth pair
(``<prefix>v1`` on the host side, ``eth0`` inside) to a bridge ``<prefix>br0`` that holds
the first address of the lab's /24 (nodes get ``.11``, ``.12``...). Each node runs its own
dockerd (hostname = node name = Docker node name) and, once the Swarm is formed, its own
agent on the same port as every other node, as in production.

Everything a lab creates carries its prefix: namespaces, links, the iptables rule and the
work directory ``/tmp/pa-lab-<prefix>`` (every process of the lab mentions it on its command
line). :func:`leftovers` finds those pieces and :func:`clean` removes them, so a crashed or
interrupted run can always be cleaned up, and :meth:`Lab.up` refuses to start over pieces it
could not remove.

Blocking API, for test fixtures and the ``portainer-agent-lab`` command::

    lab = Lab(prefix="palt", subnet="10.77.5.0/24", nodes=3, managers=2)
    lab.up()
    try:
        lab.docker("node1", "node", "ls")
        lab.kill_agent("node2")
    finally:
        lab.down()
"""
from __future__ import annotations

import atexit
import fcntl
import http.client
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

import attrs

import portainer_agent
from portainer_agent.lab.dockerd import (
    INSTALL_HINT,
    DockerDaemon,
    _pid_alive,
    _tail,
    kill_leftovers,
    missing_tools,
    mounts_under,
    processes_under,
    run_docker,
    terminate,
)
from portainer_agent.testing import polling
from portainer_agent.testing.tls import unverified_tls
from portainer_agent.testing.signing import (
    PORTAINER_MESSAGE,
    PortainerSigner,
    docker_client,
    write_docker_config,
)

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{1,9}$")
DEFAULT_PREFIX = "palab"
DEFAULT_SUBNET = "10.77.0.0/24"
AGENT_PORT = 9001
CLUSTER_PORT = 9002
_T = TypeVar("_T")


class LabError(Exception):
    """The lab could not be brought up, or a node/agent did not do what it was told."""


def lab_root(prefix: str) -> Path:
    """The work directory of the lab ``prefix``; short, because of unix socket paths."""
    return Path(f"/tmp/pa-lab-{prefix}")


def state_path(prefix: str) -> Path:
    """Where ``up`` records the lab, for ``status``/``down`` from another process."""
    return lab_root(prefix) / "lab.json"


def lock_path(prefix: str) -> Path:
    """A lab holds an exclusive ``flock`` on this file while a process of ours owns it, so
    two test runs with the same prefix wait for each other instead of cleaning each other."""
    return Path(f"/tmp/pa-lab-{prefix}.lock")


def check_prefix(prefix: str) -> str:
    if not PREFIX_PATTERN.match(prefix):
        raise LabError(f"lab prefix {prefix!r} must be 2-10 lowercase letters/digits, starting with a letter")
    return prefix


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"{shlex.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _parallel(function: Callable[..., _T], items: Sequence[Any]) -> list[_T]:
    """Call ``function`` on every item in threads; re-raise the first failure after all ended."""
    if not items:
        return []
    try:
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            futures = [pool.submit(function, item) for item in items]
            errors = [future.exception() for future in futures]
    except RuntimeError:  # at interpreter exit (an atexit teardown) threads are refused
        return [function(item) for item in items]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


def _link_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}(br0|v\d+|p\d+)$")


def _netns_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-n\d+$")


def _iptables_rules(prefix: str) -> list[list[str]]:
    """Our FORWARD rules (as ``iptables -S`` argument lists, without ``-A``)."""
    result = _run("iptables", "-w", "-S", "FORWARD", check=False)
    rules = []
    for line in result.stdout.splitlines():
        words = line.split()
        if words[:2] == ["-A", "FORWARD"] and f"{prefix}br0" in words:
            rules.append(words[2:])
    return rules


@attrs.frozen
class Leftovers:
    """What a lab prefix still has on this machine."""

    netns: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    iptables: tuple[str, ...] = ()
    processes: tuple[int, ...] = ()
    mounts: tuple[str, ...] = ()
    directory: str | None = None

    def __bool__(self) -> bool:
        return bool(self.netns or self.links or self.iptables or self.processes or self.mounts or self.directory)

    def describe(self) -> str:
        parts = []
        for label, values in (("namespaces", self.netns), ("links", self.links), ("iptables rules", self.iptables),
                              ("processes", [str(p) for p in self.processes]), ("mounts", self.mounts)):
            if values:
                parts.append(f"{label}: {', '.join(values)}")
        if self.directory:
            parts.append(f"directory: {self.directory}")
        return "; ".join(parts) or "nothing"


def leftovers(prefix: str) -> Leftovers:
    """Everything of the lab ``prefix`` that exists right now."""
    check_prefix(prefix)
    netns_names = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if _netns_pattern(prefix).match(name):
            netns_names.append(name)
    links = []
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        fields = line.split(":", 2)
        if len(fields) >= 2:
            name = fields[1].strip().split("@", 1)[0]
            if _link_pattern(prefix).match(name):
                links.append(name)
    root = lab_root(prefix)
    return Leftovers(
        netns=tuple(netns_names),
        links=tuple(links),
        iptables=tuple(" ".join(rule) for rule in _iptables_rules(prefix)),
        processes=tuple(processes_under(root)),
        mounts=tuple(mounts_under(root)),
        directory=str(root) if root.exists() else None,
    )


def clean(prefix: str) -> Leftovers:
    """Remove everything of the lab ``prefix`` (processes first, then namespaces, links,
    iptables rules, mounts and the work directory); returns what could not be removed."""
    check_prefix(prefix)
    root = lab_root(prefix)
    kill_leftovers(root, remove=False)
    found = leftovers(prefix)
    for name in found.netns:
        _run("ip", "netns", "delete", name, check=False)
    for name in found.links:
        _run("ip", "link", "delete", name, check=False)
    for rule in _iptables_rules(prefix):
        _run("iptables", "-w", "-D", "FORWARD", *rule, check=False)
    kill_leftovers(root, remove=True)
    return leftovers(prefix)


@attrs.define(eq=False)
class Agent:
    """One agent process of a node (``process`` is None when started by another process)."""

    pid: int
    log_path: Path
    process: subprocess.Popen | None = attrs.field(default=None, repr=False)

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)


@attrs.define(eq=False)
class Node:
    """One lab node. ``daemon`` and ``agent`` are set while they run."""

    index: int
    name: str
    ip: str
    netns: str
    veth: str
    role: str
    workdir: Path
    daemon: DockerDaemon | None = None
    agent: Agent | None = None
    agent_args: tuple[str, ...] = ()
    agent_env: dict[str, str] = attrs.field(factory=dict)

    @property
    def socket_path(self) -> str:
        return str(self.workdir / "docker.sock")

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        """The node dockerd's ``--data-root`` (volumes live in ``volumes/NAME/_data``)."""
        return self.workdir / "data"

    def volume_path(self, name: str) -> Path:
        """Where the node keeps the data of its local volume ``name``."""
        return self.data_root / "volumes" / name / "_data"

    @property
    def is_manager(self) -> bool:
        return self.role == "manager"

    @property
    def agent_log(self) -> Path:
        return self.workdir / "agent.log"


NodeRef = Union[Node, str, int]


@attrs.frozen
class AgentResponse:
    """What an agent answered to :meth:`Lab.agent_request`."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def https_request(host: str, port: int, method: str = "GET", path: str = "/ping", timeout: float = 2.0,
                  headers: Mapping[str, str] | None = None, body: bytes | None = None) -> AgentResponse | None:
    """One HTTPS request (TLS without verification, no proxies); None when unreachable."""
    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=unverified_tls())
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read()
        return AgentResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def https_status(host: str, port: int, path: str = "/ping", timeout: float = 2.0,
                 headers: Mapping[str, str] | None = None) -> int | None:
    """Status of ``GET https://host:port/path`` (TLS, no verification), None when unreachable."""
    response = https_request(host, port, "GET", path, timeout=timeout, headers=headers)
    return response.status if response is not None else None


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T`` stopped...) from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]


def process_rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LabError(f"process {pid} has no VmRSS (a zombie?)")


def process_fd_count(pid: int) -> int:
    """How many descriptors ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@attrs.frozen
class Metrics:
    """One scrape of an agent's ``/metrics``: every sample as (name, labels) -> value."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return cls(samples)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def get(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, None when absent."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float | None:
        """The sum of every sample of ``name`` whose labels include ``labels``; None when
        there is no such sample."""
        wanted = set(labels.items())
        values = [value for (sample, sample_labels), value in self.samples.items()
                  if sample == name and wanted <= sample_labels]
        return sum(values) if values else None


@attrs.define(eq=False)
class Lab:
    """N dockerds in network namespaces on a private bridge, joined into a Swarm, with
    busybox:local on every node and (optionally) one agent per node."""

    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    nodes_count: int = 3
    managers: int = 1
    agents: bool = True
    agent_port: int = AGENT_PORT
    cluster_port: int = CLUSTER_PORT
    cluster_addr: str | None = None
    secret: str | None = None
    agent_args: tuple[str, ...] = ()
    #: When set, every agent also serves ``/metrics`` on ``<node ip>:<metrics_port>`` (plain
    #: HTTP, ``--metrics-addr``), read with :meth:`Lab.agent_metrics`.
    metrics_port: int | None = None
    python: str = sys.executable
    dockerd_timeout: float = 60
    agent_timeout: float = 30
    dockerd_stop_grace: float = 3
    down_at_exit: bool = True
    lock_timeout: float = 0
    nodes: list[Node] = attrs.field(factory=list)
    timings: dict[str, float] = attrs.field(factory=dict)
    _signer: PortainerSigner | None = attrs.field(default=None, alias="signer")
    _lock: Any = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        check_prefix(self.prefix)
        network = ipaddress.ip_network(self.subnet)
        if not 1 <= self.managers <= self.nodes_count:
            raise LabError(f"need 1 <= managers ({self.managers}) <= nodes ({self.nodes_count})")
        if network.num_addresses < 16 + self.nodes_count:
            raise LabError(f"subnet {self.subnet} is too small for {self.nodes_count} nodes")
        if not self.nodes:
            self.nodes = [
                Node(index=i, name=f"node{i}", ip=str(network[10 + i]), netns=f"{self.prefix}-n{i}",
                     veth=f"{self.prefix}v{i}", role="manager" if i <= self.managers else "worker",
                     workdir=self.root / f"node{i}")
                for i in range(1, self.nodes_count + 1)
            ]

    # --- names -----------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return lab_root(self.prefix)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.subnet)  # type: ignore[return-value]

    @property
    def gateway(self) -> str:
        return str(self.network[1])

    @property
    def join_address(self) -> str:
        """What the agents get as ``--cluster-addr``: the first manager's address unless set."""
        return self.cluster_addr or self.nodes[0].ip

    @property
    def manager_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.is_manager]

    def node(self, ref: NodeRef) -> Node:
        """A node by object, name (``"node2"``) or index (``2``)."""
        if isinstance(ref, Node):
            return ref
        for node in self.nodes:
            if ref in (node.name, node.index, str(node.index)):
                return node
        raise LabError(f"no node {ref!r} in lab {self.prefix}")

    # --- bring-up -------------------------------------------------------------------

    def up(self) -> "Lab":
        """Bring the whole lab up (blocking). On any failure everything is torn down again."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, bridges, iptables, dockerd)")
        missing = missing_tools()
        if missing:
            raise LabError(f"missing programs: {', '.join(missing)}; install them with: {INSTALL_HINT}")
        started = time.monotonic()
        self._acquire_lock()
        try:
            remaining = clean(self.prefix) if leftovers(self.prefix) else Leftovers()
            if remaining:
                raise LabError(f"lab {self.prefix} has leftovers that could not be removed: {remaining.describe()}")
            self._check_subnet_free()
        except BaseException:
            self._release_lock(remove=True)
            raise
        if self.down_at_exit:
            atexit.register(self.down)
        try:
            self._phase("clean", started)
            self.root.mkdir(parents=True)
            self._save_key()
            self._create_network()
            self._phase("network", started)
            self.save()
            _parallel(self._start_daemon, self.nodes)
            self._phase("dockerd", started)
            self.save()
            self._form_swarm()
            self._phase("swarm", started)
            if self.agents:
                _parallel(lambda node: self.start_agent(node), self.nodes)
                self._phase("agents", started)
            self.save()
        except BaseException:
            self.down()
            raise
        return self

    def _acquire_lock(self) -> None:
        if self._lock is not None:
            return
        path = lock_path(self.prefix)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                if time.monotonic() >= deadline:
                    raise LabError(f"lab {self.prefix} is in use by {owner}; pick another prefix or wait") from None
                time.sleep(0.5)
                continue
            try:
                same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the previous owner removed it while we waited: start again
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
        handle.flush()
        self._lock = handle

    def _release_lock(self, remove: bool = False) -> None:
        if self._lock is not None:
            if remove:
                lock_path(self.prefix).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def release(self) -> None:
        """Forget the lab without tearing it down (the CLI's ``up`` leaves it running):
        drop the lock and the exit hook."""
        try:
            atexit.unregister(self.down)
        except Exception:
            pass
        self._release_lock()

    def _phase(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 2)

    def _check_subnet_free(self) -> None:
        for line in _run("ip", "-o", "-4", "addr", "show", check=False).stdout.splitlines():
            words = line.split()
            if len(words) >= 4 and words[2] == "inet":
                interface = ipaddress.ip_interface(words[3])
                if interface.network.overlaps(self.network):
                    raise LabError(f"subnet {self.subnet} is already used by {words[1]} ({words[3]}); "
                                   f"pick another --subnet")

    def _create_network(self) -> None:
        bridge, prefixlen = self.bridge, self.network.prefixlen
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{prefixlen}", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        _run("iptables", "-w", "-I", "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT")
        for node in self.nodes:
            _run("ip", "netns", "add", node.netns)
            peer = f"{self.prefix}p{node.index}"
            _run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", node.netns)
            batch = (f"link set {peer} name eth0\naddr add {node.ip}/{prefixlen} dev eth0\n"
                     f"link set eth0 up\nlink set lo up\n")
            subprocess.run(["ip", "-n", node.netns, "-batch", "-"], input=batch, text=True,
                           capture_output=True, check=True, timeout=30)
            _run("ip", "link", "set", node.veth, "master", bridge)
            _run("ip", "link", "set", node.veth, "up")

    def _start_daemon(self, node: Node) -> None:
        node.daemon = DockerDaemon.start(node.workdir, node.name, netns=node.netns, timeout=self.dockerd_timeout)
        node.daemon.import_busybox()

    def _form_swarm(self) -> None:
        first = self.nodes[0]
        self.docker(first, "swarm", "init", "--advertise-addr", first.ip, "--listen-addr", f"{first.ip}:2377")
        tokens = {role: self.docker(first, "swarm", "join-token", "-q", role).stdout.strip()
                  for role in ("manager", "worker")}

        def join(node: Node) -> None:
            # A join can fail transiently on a busy machine; retry a few times unless the node
            # made it in after all.
            for attempt in range(3):
                result = self.docker(node, "swarm", "join", "--advertise-addr", node.ip,
                                     "--listen-addr", f"{node.ip}:2377", "--token", tokens[node.role],
                                     f"{first.ip}:2377", timeout=60, check=False)
                if result.returncode == 0 or self.swarm_state(node) == "active":
                    return
                if attempt == 2:
                    raise LabError(f"{node.name} could not join the swarm: {result.stderr.strip()}")
                if self.swarm_state(node) == "pending":
                    self.wait_for(lambda: self.swarm_state(node) != "pending", timeout=30,
                                  what=f"{node.name}'s pending join")
                    if self.swarm_state(node) == "active":
                        return

        # Managers one at a time (each one changes the raft membership), then workers together.
        for node in self.manager_nodes[1:]:
            join(node)
        _parallel(join, [node for node in self.nodes if not node.is_manager])
        self.wait_for(lambda: self.ready_nodes(first) == {n.name for n in self.nodes}, timeout=60,
                      what=f"all {len(self.nodes)} nodes Ready in the swarm")

    def swarm_state(self, ref: NodeRef) -> str:
        """The node's ``LocalNodeState``: inactive, pending, active, error or locked."""
        result = self.docker(ref, "info", "--format", "{{.Swarm.LocalNodeState}}", check=False, timeout=30)
        return result.stdout.strip() or "unknown"

    def ready_nodes(self, manager: NodeRef | None = None) -> set[str]:
        """Hostnames of the nodes a manager sees as Ready."""
        result = self.docker(manager or self.nodes[0], "node", "ls", "--format", "{{.Hostname}} {{.Status}}", check=False)
        return {line.split()[0] for line in result.stdout.splitlines() if line.endswith(" Ready")}

    @staticmethod
    def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        """Poll ``condition`` until it is truthy (returned) or raise :class:`LabError` at the deadline."""
        return polling.wait_for(condition, timeout, what, interval, error=LabError)

    # --- agents ---------------------------------------------------------------------

    def agent_command(self, ref: NodeRef, extra_args: Sequence[str] = ()) -> list[str]:
        """The command that runs ``node``'s agent inside its namespace."""
        node = self.node(ref)
        agent = [
            self.python, "-m", "portainer_agent",
            "--host", "0.0.0.0", "--port", str(self.agent_port),
            "--docker-host", node.docker_host,
            "--data-dir", str(node.workdir / "agent"),
            "--advertise-addr", node.ip,
            "--cluster-addr", self.join_address,
            "--cluster-port", str(self.cluster_port),
            "--log-level", "DEBUG", "--log-format", "json",
            *(["--secret", self.secret] if self.secret else []),
            *(["--metrics-addr", f"{node.ip}:{self.metrics_port}"] if self.metrics_port else []),
            *self.agent_args, *extra_args,
        ]
        script = f"hostname {shlex.quote(node.name)} && exec {shlex.join(agent)}"
        return ["nsenter", f"--net=/var/run/netns/{node.netns}", "unshare", "--uts", "sh", "-c", script]

    def start_agent(self, ref: NodeRef, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                    wait: bool = True) -> Agent:
        """Start the node's agent (a daemon process that outlives us) and, with ``wait``,
        block until ``GET /ping`` answers 204."""
        node = self.node(ref)
        if node.agent is not None and node.agent.running:
            raise LabError(f"the agent of {node.name} is already running (pid {node.agent.pid})")
        node.agent_args, node.agent_env = tuple(extra_args), dict(env or {})
        full_env = dict(os.environ)
        package_parent = str(Path(portainer_agent.__file__).resolve().parent.parent)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, full_env.get("PYTHONPATH")]))
        full_env.update(node.agent_env)
        (node.workdir / "agent").mkdir(parents=True, exist_ok=True)
        with open(node.agent_log, "ab") as log:
            log.write(f"--- lab: starting agent of {node.name} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            process = subprocess.Popen(self.agent_command(node, extra_args), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        node.agent = Agent(pid=process.pid, log_path=node.agent_log, process=process)
        if wait:
            try:
                self.wait_agent_ready(node)
            except BaseException:
                terminate(process.pid, 5, process)
                node.agent = None
                raise
        return node.agent

    def wait_agent_ready(self, ref: NodeRef, timeout: float | None = None) -> None:
        node = self.node(ref)
        deadline = time.monotonic() + (timeout or self.agent_timeout)
        while True:
            if self.agent_status(node) == 204:
                return
            if node.agent is None or not node.agent.running:
                raise LabError(f"the agent of {node.name} exited; log tail:\n{_tail(node.agent_log)}")
            if time.monotonic() >= deadline:
                raise LabError(f"the agent of {node.name} did not answer /ping with 204 in time; "
                               f"log tail:\n{_tail(node.agent_log)}")
            time.sleep(0.1)

    def agent_status(self, ref: NodeRef, timeout: float = 1.0) -> int | None:
        """Status of the node agent's ``GET /ping`` from the root namespace; None if unreachable."""
        node = self.node(ref)
        return https_status(node.ip, self.agent_port, "/ping", timeout=timeout)

    def agent_request(self, ref: NodeRef, path: str, method: str = "GET", signed: bool = True,
                      headers: Mapping[str, str] | None = None, body: bytes | None = None,
                      timeout: float = 5.0) -> AgentResponse | None:
        """One HTTPS request to the node's agent, signed with the lab's key unless ``signed``
        is False; None when the agent does not answer (down, killed, partitioned)."""
        all_headers = {**(self.signed_headers() if signed else {}), **(headers or {})}
        return https_request(self.node(ref).ip, self.agent_port, method, path, timeout=timeout,
                             headers=all_headers, body=body)

    def agent_reachable(self, ref: NodeRef, timeout: float = 1.0) -> bool:
        return self.agent_status(ref, timeout) == 204

    def stop_agent(self, ref: NodeRef, timeout: float = 15) -> bool:
        """SIGTERM the node's agent and wait (SIGKILL after ``timeout``); True if it exited by itself."""
        node = self.node(ref)
        if node.agent is None:
            return True
        self._continue_quietly(node)
        graceful = terminate(node.agent.pid, timeout, node.agent.process)
        node.agent = None
        self._save_quietly()
        return graceful

    def kill_agent(self, ref: NodeRef) -> None:
        """SIGKILL the node's agent and wait until it is gone."""
        node = self.node(ref)
        if node.agent is None:
            return
        self._continue_quietly(node)
        terminate(node.agent.pid, 10, node.agent.process, sig=signal.SIGKILL)
        node.agent = None
        self._save_quietly()

    def restart_agent(self, ref: NodeRef, wait: bool = True) -> Agent:
        """Stop (SIGTERM) and start again the node's agent, with the arguments it had."""
        node = self.node(ref)
        self.stop_agent(node)
        agent = self.start_agent(node, node.agent_args, node.agent_env, wait=wait)
        self._save_quietly()
        return agent

    def agent_url(self, ref: NodeRef) -> str:
        return f"https://{self.node(ref).ip}:{self.agent_port}"

    def agent_docker_host(self, ref: NodeRef) -> str:
        """``-H`` value for the docker CLI through the node's agent."""
        return f"tcp://{self.node(ref).ip}:{self.agent_port}"

    # --- process faults and readings ------------------------------------------------

    def _agent_pid(self, ref: NodeRef) -> int:
        node = self.node(ref)
        if node.agent is None:
            raise LabError(f"{node.name} has no agent running")
        return node.agent.pid

    def freeze_agent(self, ref: NodeRef) -> None:
        """SIGSTOP the node's agent: the kernel still accepts TCP connections on its
        listeners (the backlog), but nothing reads, answers or probes: a hung process."""
        os.kill(self._agent_pid(ref), signal.SIGSTOP)
        # The signal is delivered asynchronously: return once the process is stopped.
        self.wait_for(lambda: self.agent_frozen(ref), 10, f"{self.node(ref).name}'s agent to stop",
                      interval=0.01)

    def thaw_agent(self, ref: NodeRef) -> None:
        """SIGCONT the node's agent (undo :meth:`freeze_agent`); returns once it runs."""
        os.kill(self._agent_pid(ref), signal.SIGCONT)
        self.wait_for(lambda: not self.agent_frozen(ref), 10, f"{self.node(ref).name}'s agent to run again",
                      interval=0.01)

    def agent_frozen(self, ref: NodeRef) -> bool:
        """True while the node's agent is stopped (``T`` in ``/proc/PID/stat``)."""
        return process_state(self._agent_pid(ref)) == "T"

    @staticmethod
    def _continue_quietly(node: Node) -> None:
        # A frozen agent would hold a SIGTERM pending until the grace period ends.
        if node.agent is not None:
            try:
                os.kill(node.agent.pid, signal.SIGCONT)
            except OSError:
                pass

    def agent_rss_bytes(self, ref: NodeRef) -> int:
        """The node agent's resident set size (``VmRSS`` of ``/proc/PID/status``), in bytes."""
        return process_rss_bytes(self._agent_pid(ref))

    def agent_fd_count(self, ref: NodeRef) -> int:
        """How many descriptors the node's agent holds open (``/proc/PID/fd``)."""
        return process_fd_count(self._agent_pid(ref))

    def agent_metrics(self, ref: NodeRef, timeout: float = 5.0) -> "Metrics | None":
        """The node agent's ``/metrics`` (the lab must have a ``metrics_port``); None when
        the agent does not answer."""
        if not self.metrics_port:
            raise LabError("the lab's agents serve no metrics: create the Lab with metrics_port=...")
        connection = http.client.HTTPConnection(self.node(ref).ip, self.metrics_port, timeout=timeout)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            text = response.read().decode()
            if response.status != 200:
                return None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()
        return Metrics.parse(text)

    # --- swarm roles ----------------------------------------------------------------

    def _reachable_manager(self, exclude: Sequence[str] = ()) -> Node:
        for node in self.manager_nodes:
            if node.name in exclude or node.daemon is None:
                continue
            result = self.docker(node, "node", "ls", "-q", check=False, timeout=30)
            if result.returncode == 0:
                return node
        raise LabError(f"no manager of lab {self.prefix} answers (excluding {', '.join(exclude) or 'none'})")

    def leader(self) -> str:
        """The hostname of the Swarm's current leader, as a manager sees it."""
        manager = self._reachable_manager()
        listing = self.docker(manager, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}").stdout
        for line in listing.splitlines():
            words = line.split()
            if len(words) == 2 and words[1] == "Leader":
                return words[0]
        raise LabError(f"no leader in the node list of {manager.name}: {listing!r}")

    def demote(self, ref: NodeRef) -> None:
        """``docker node demote`` the node, through another manager's dockerd when there is one."""
        node = self.node(ref)
        try:
            via = self._reachable_manager(exclude=[node.name])
        except LabError:
            via = node
        self.docker(via, "node", "demote", node.name, timeout=60)

    def promote(self, ref: NodeRef) -> None:
        """``docker node promote`` the node through a manager's dockerd, then wait until it
        is a reachable manager again."""
        node = self.node(ref)
        via = self._reachable_manager(exclude=[node.name])
        self.docker(via, "node", "promote", node.name, timeout=60)

        def reachable() -> bool:
            status = self.docker(via, "node", "inspect", node.name, "--format",
                                 "{{.ManagerStatus.Reachability}}", check=False, timeout=30).stdout.strip()
            return status == "reachable"

        self.wait_for(reachable, 60, f"{node.name} a reachable manager again")

    def demote_leader(self) -> str:
        """Demote the current leader (another manager takes over); returns its name, for
        :meth:`promote` later. Needs at least two managers."""
        if len(self.manager_nodes) < 2:
            raise LabError("demoting the leader needs a lab with at least two managers")
        leader = self.leader()
        self.demote(leader)
        return leader

    # --- network faults -------------------------------------------------------------

    def partition(self, ref: NodeRef) -> None:
        """Cut the node off the bridge (its veth goes down): nobody reaches it, it reaches nobody."""
        _run("ip", "link", "set", self.node(ref).veth, "down")

    def heal(self, ref: NodeRef) -> None:
        """Undo :meth:`partition`."""
        _run("ip", "link", "set", self.node(ref).veth, "up")

    # --- clients --------------------------------------------------------------------

    def docker(self, ref: NodeRef, *args: str, check: bool = True, input: str | bytes | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the docker CLI directly against the node's dockerd."""
        return run_docker(self.node(ref).docker_host, *args, check=check, input=input, env=env, timeout=timeout)

    @property
    def signer(self) -> PortainerSigner:
        """The lab's Portainer key (kept in the work directory so every process of the lab
        signs with the same key, as one Portainer server would)."""
        if self._signer is None:
            key_path = self.root / "portainer-key.pem"
            if key_path.exists():
                self._signer = PortainerSigner.from_pem(key_path.read_bytes())
            else:
                self._signer = PortainerSigner.generate()
        return self._signer

    def _save_key(self) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = self.signer.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        key_path = self.root / "portainer-key.pem"
        key_path.write_bytes(pem)
        key_path.chmod(0o600)

    def signed_headers(self) -> dict[str, str]:
        return self.signer.headers(self.secret or PORTAINER_MESSAGE)

    def signed_client(self, ref: NodeRef, **kwargs: Any):
        """A docker-py client that talks to the node's agent with the lab's signature."""
        kwargs.setdefault("timeout", 60)
        return docker_client(self.agent_docker_host(ref), headers=self.signed_headers(), **kwargs)

    def write_docker_config(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """A DOCKER_CONFIG directory whose config.json sends the lab's signature headers;
        returns the directory (``DOCKER_CONFIG=<it> docker -H tcp://IP:9001 --tls ...``)."""
        path = Path(directory) if directory is not None else self.root / "docker-config"
        write_docker_config(path, self.signed_headers())
        return path

    def agent_docker(self, ref: NodeRef, *args: str, check: bool = True, input: str | bytes | None = None,
                     timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the real docker CLI through the node's agent (TLS, signed headers)."""
        config = self.write_docker_config()
        return run_docker(self.agent_docker_host(ref), *args, check=check, input=input, timeout=timeout,
                          tls=True, env={"DOCKER_CONFIG": str(config)})

    def cli_example(self, ref: NodeRef | None = None) -> str:
        node = self.node(ref or self.nodes[0])
        return (f"DOCKER_CONFIG={self.root / 'docker-config'} docker -H {self.agent_docker_host(node)} "
                f"--tls node ls")

    # --- logs -----------------------------------------------------------------------

    def log_tail(self, ref: NodeRef, which: str = "agent", lines: int = 40) -> str:
        """The last ``lines`` of the node's ``agent`` or ``dockerd`` log (for failure messages)."""
        node = self.node(ref)
        return _tail(node.agent_log if which == "agent" else node.workdir / "dockerd.log", lines)

    def collect_logs(self, directory: str | os.PathLike[str]) -> Path:
        """Copy every node's agent and dockerd logs to ``directory/<prefix>/nodeN-*.log``
        (teardown deletes the work directory; call this first to keep them)."""
        target = Path(directory) / self.prefix
        target.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            for which, source in (("agent", node.agent_log), ("dockerd", node.workdir / "dockerd.log")):
                if source.exists():
                    (target / f"{node.name}-{which}.log").write_bytes(source.read_bytes())
        return target

    # --- teardown -------------------------------------------------------------------

    def down(self) -> Leftovers:
        """Tear everything down (agents, services, containers, dockerds, namespaces, links,
        the iptables rule, the work directory). Safe to call twice; returns what remains."""
        try:
            atexit.unregister(self.down)
        except Exception:
            pass
        self._acquire_lock()
        for node in self.nodes:
            if node.agent is not None:
                self._continue_quietly(node)
                try:
                    terminate(node.agent.pid, 10, node.agent.process)
                except OSError:
                    pass
                node.agent = None
        live = [node for node in self.nodes if node.daemon is not None]
        first = next((node for node in self.manager_nodes if node.daemon is not None and node.daemon.ping()), None)
        if first is not None:
            services = self.docker(first, "service", "ls", "-q", check=False, timeout=30).stdout.split()
            if services:
                self.docker(first, "service", "rm", *services, check=False, timeout=30)

        def stop(node: Node) -> None:
            # A manager that loses raft quorum while stopping lingers for seconds; the lab is
            # thrown away, so after a short grace SIGKILL it and clean up what it left.
            assert node.daemon is not None
            node.daemon.stop(timeout=self.dockerd_stop_grace, remove=False)
            node.daemon = None

        try:
            _parallel(stop, live)
            return clean(self.prefix)
        finally:
            self._release_lock(remove=True)

    def _save_quietly(self) -> None:
        if self.root.exists():
            self.save()

    # --- state (for the CLI) --------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix, "subnet": self.subnet, "managers": self.managers,
            "agents": self.agents, "agent_port": self.agent_port, "cluster_port": self.cluster_port,
            "cluster_addr": self.cluster_addr, "secret": self.secret, "agent_args": list(self.agent_args),
            "metrics_port": self.metrics_port,
            "python": self.python, "timings": self.timings,
            "nodes": [{
                "index": n.index, "name": n.name, "ip": n.ip, "netns": n.netns, "veth": n.veth,
                "role": n.role, "workdir": str(n.workdir), "socket": n.socket_path,
                "dockerd_pid": n.daemon.pid if n.daemon else None,
                "agent_pid": n.agent.pid if n.agent else None,
                "agent_args": list(n.agent_args), "agent_env": n.agent_env,
                "agent_url": self.agent_url(n),
            } for n in self.nodes],
        }

    def save(self) -> Path:
        path = state_path(self.prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=2))
        temporary.chmod(0o600)
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX) -> "Lab":
        """The lab ``up`` recorded for ``prefix`` (its processes may be running elsewhere)."""
        path = state_path(check_prefix(prefix))
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise LabError(f"no lab {prefix} recorded ({path}: {error})") from None
        nodes = []
        for item in state["nodes"]:
            node = Node(index=item["index"], name=item["name"], ip=item["ip"], netns=item["netns"],
                        veth=item["veth"], role=item["role"], workdir=Path(item["workdir"]),
                        agent_args=tuple(item.get("agent_args", ())), agent_env=dict(item.get("agent_env", {})))
            if item.get("dockerd_pid"):
                node.daemon = DockerDaemon.attach(node.workdir, node.name, node.netns, item["dockerd_pid"])
            if item.get("agent_pid"):
                node.agent = Agent(pid=item["agent_pid"], log_path=node.agent_log)
            nodes.append(node)
        return cls(prefix=state["prefix"], subnet=state["subnet"], nodes_count=len(nodes),
                   managers=state["managers"], agents=state["agents"], agent_port=state["agent_port"],
                   cluster_port=state["cluster_port"], cluster_addr=state["cluster_addr"],
                   secret=state["secret"], agent_args=tuple(state["agent_args"]), python=state["python"],
                   metrics_port=state.get("metrics_port"),
                   down_at_exit=False, nodes=nodes, timings=state.get("timings", {}))

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()
