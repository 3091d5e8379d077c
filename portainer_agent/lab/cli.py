"""``portainer-agent-lab``: a real multi-node Swarm with one agent per node, on one machine.

::

    portainer-agent-lab up --nodes 3 --managers 2     # prints nodes, URLs and a docker example
    portainer-agent-lab status
    portainer-agent-lab down

``up`` leaves the lab running after it exits (dockerds and agents are daemon processes) and
records it in ``/tmp/pa-lab-<prefix>/lab.json`` so ``status`` and ``down`` work from any
shell. An interrupted ``up`` (Ctrl-C, SIGTERM, an error) tears down what it had built.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Sequence

from portainer_agent.lab.dockerd import INSTALL_HINT, missing_tools, ping_unix_socket
from portainer_agent.lab.harness import (
    DEFAULT_PREFIX,
    DEFAULT_SUBNET,
    Lab,
    LabError,
    check_prefix,
    leftovers,
    state_path,
)

EXIT_OK, EXIT_FAILED, EXIT_PRECONDITION = 0, 1, 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="portainer-agent-lab",
        description="A real Docker Swarm of N nodes (one dockerd per network namespace) with a "
                    "portainer-agent on every node, on this machine. Needs root.")
    parser.add_argument("--prefix", default=os.environ.get("PA_LAB_PREFIX", DEFAULT_PREFIX),
                        help="names of everything the lab creates start with it (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="bring the lab up and leave it running")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default %(default)s)")
    up.add_argument("--managers", type=int, default=1, help="how many of them are managers (default %(default)s)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="the lab's /24 (default %(default)s)")
    up.add_argument("--no-agents", action="store_true", help="only the Swarm, no agents")
    up.add_argument("--secret", default=None, help="start the agents in secret mode (AGENT_SECRET)")
    up.add_argument("--cluster-addr", default=None, help="--cluster-addr given to the agents "
                    "(default: the first manager's address)")
    up.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every agent (repeatable), e.g. --agent-arg=--log-level=INFO")
    up.add_argument("--install", action="store_true",
                    help=f"install missing programs first ({INSTALL_HINT})")
    up.add_argument("--json", action="store_true", help="print the lab record as JSON")
    status = commands.add_parser("status", help="show the lab's nodes, daemons and agents")
    status.add_argument("--json", action="store_true", help="print the lab record as JSON")
    down = commands.add_parser("down", help="tear the lab down (also cleans a crashed run's leftovers)")
    for sub in (up, status, down):  # --prefix also after the command
        sub.add_argument("--prefix", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _install() -> bool:
    """apt-get install the lab's programs; True when they are all there afterwards."""
    packages = INSTALL_HINT.split("install -y ", 1)[1].split()
    command = ["apt-get", "install", "-y", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        subprocess.run(command, env=env)
    return not missing_tools()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def describe(lab: Lab, out=sys.stdout) -> None:
    """The lab as a user wants to see it: nodes, roles, URLs, sockets, how to talk to it."""
    print(f"lab {lab.prefix}: {len(lab.nodes)} nodes on {lab.bridge} ({lab.subnet}), work directory {lab.root}",
          file=out)
    print(f"{'NODE':7} {'ROLE':8} {'ADDRESS':12} {'AGENT':26} {'DOCKERD':8} {'AGENT?':7} DOCKER SOCKET", file=out)
    for node in lab.nodes:
        daemon = "up" if ping_unix_socket(node.socket_path, timeout=1) else "down"
        if not lab.agents:
            agent = "-"
        elif node.agent is None or not node.agent.running:
            agent = "stopped"
        else:
            agent = {204: "ok", None: "no reply"}.get(lab.agent_status(node), "error")
        print(f"{node.name:7} {node.role:8} {node.ip:12} {lab.agent_url(node):26} {daemon:8} {agent:7} "
              f"{node.socket_path}", file=out)
    first = lab.nodes[0]
    print("\nDocker CLI straight to a node's dockerd:", file=out)
    print(f"  docker -H {first.docker_host} node ls", file=out)
    if lab.agents:
        config = lab.write_docker_config()
        print("Docker CLI through an agent (signed like a Portainer server; TLS without verification):", file=out)
        print(f"  DOCKER_CONFIG={config} docker -H {lab.agent_docker_host(first)} --tls node ls", file=out)
        print(f"  DOCKER_CONFIG={config} docker -H {lab.agent_docker_host(lab.nodes[-1])} --tls ps", file=out)
        print(f"Agent logs: {first.agent_log} (one per node)", file=out)
    print(f"Tear down: portainer-agent-lab{'' if lab.prefix == DEFAULT_PREFIX else ' --prefix ' + lab.prefix} down",
          file=out)


def command_up(args: argparse.Namespace) -> int:
    if missing_tools():
        if not args.install:
            print(f"missing programs: {', '.join(missing_tools())}\ninstall them with: {INSTALL_HINT}\n"
                  f"(or run: portainer-agent-lab up --install)", file=sys.stderr)
            return EXIT_PRECONDITION
        if not _install():
            print(f"still missing after installing: {', '.join(missing_tools())}", file=sys.stderr)
            return EXIT_FAILED
    if state_path(args.prefix).exists():
        try:
            existing = Lab.load(args.prefix)
        except LabError:
            existing = None
        if existing is not None and any(n.daemon is not None and n.daemon.running for n in existing.nodes):
            print(f"lab {args.prefix} is already up; see 'portainer-agent-lab status', or run "
                  f"'portainer-agent-lab{' --prefix ' + args.prefix if args.prefix != DEFAULT_PREFIX else ''} down' "
                  f"first", file=sys.stderr)
            return EXIT_FAILED
    lab = Lab(prefix=args.prefix, subnet=args.subnet, nodes_count=args.nodes, managers=args.managers,
              agents=not args.no_agents, secret=args.secret, cluster_addr=args.cluster_addr,
              agent_args=tuple(args.agent_arg), down_at_exit=True)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    started = time.monotonic()
    try:
        print(f"bringing up lab {lab.prefix}: {args.nodes} nodes, {args.managers} manager(s)...", file=sys.stderr)
        lab.up()
        if lab.agents:
            lab.write_docker_config()
        lab.save()
        lab.release()  # keep it running after we exit
    except KeyboardInterrupt:
        print("interrupted: the lab was torn down", file=sys.stderr)
        return EXIT_FAILED
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"up in {time.monotonic() - started:.1f}s ({', '.join(f'{k} {v}s' for k, v in lab.timings.items())})",
          file=sys.stderr)
    if args.json:
        print(json.dumps(lab.to_json(), indent=2))
    else:
        describe(lab)
    return EXIT_OK


def command_status(args: argparse.Namespace) -> int:
    try:
        lab = Lab.load(args.prefix)
    except LabError as error:
        found = leftovers(args.prefix)
        print(f"{error}" + (f"\nleftovers: {found.describe()} (run 'down' to remove them)" if found else ""),
              file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(lab.to_json(), indent=2))
        return EXIT_OK
    describe(lab)
    managers = [n for n in lab.manager_nodes if ping_unix_socket(n.socket_path, timeout=1)]
    if managers:
        print(f"\nSwarm, as {managers[0].name} sees it:")
        print(lab.docker(managers[0], "node", "ls", check=False, timeout=30).stdout.rstrip())
    return EXIT_OK


def command_down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        # Without a record (a crashed up), a fresh Lab object still finds and removes the pieces.
        lab = Lab.load(args.prefix) if state_path(args.prefix).exists() else Lab(prefix=args.prefix, down_at_exit=False)
        remaining = lab.down()
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if remaining:
        print(f"could not remove: {remaining.describe()}", file=sys.stderr)
        return EXIT_FAILED
    print(f"lab {args.prefix} is down ({time.monotonic() - started:.1f}s); nothing of it remains", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_prefix(args.prefix)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_PRECONDITION
    if os.geteuid() != 0:
        print("portainer-agent-lab needs root: it creates network namespaces, a bridge, iptables rules "
              "and runs one dockerd per node (try: sudo portainer-agent-lab ...)", file=sys.stderr)
        return EXIT_PRECONDITION
    return {"up": command_up, "status": command_status, "down": command_down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
