#!/usr/bin/env python
"""How to merge the nodes' lists: the JSON library, measured (no Docker needed).

Three nodes x 50 containers shaped like Docker's ``GET /containers/json?all=1`` items
(~1.2 kB each, labels, mounts, networks). Each candidate decodes the three bodies, tags every
item with ``Portainer.Agent.NodeName`` and encodes one array:

* ``stdlib``: ``json.loads`` / ``json.dumps`` (lossless for integers, keeps key order);
* ``orjson``: full decode/encode (fast, but refuses integers beyond 64 bits);
* ``msgspec-full``: msgspec full decode/encode;
* ``msgspec-shallow``: what the agent does (``portainer_agent.proxy.merge``): only the top-level
  keys of each item are decoded, values stay as the exact bytes Docker sent (``msgspec.Raw``).

Usage: ``python bench/merge.py [--rounds 300]`` (prints microseconds per merge, median of rounds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portainer_agent.proxy.merge import NodeAnswer, merge_answers  # noqa: E402


def container(node: int, index: int) -> dict[str, Any]:
    cid = f"{node:02x}{index:04x}" + "ab" * 29
    return {
        "Id": cid, "Names": [f"/sleeper.{node}.{index}"], "Image": "busybox:local",
        "ImageID": "sha256:" + "cd" * 32, "Command": "sleep 3600", "Created": 1764400000 + index,
        "Ports": [], "Labels": {"com.docker.swarm.node.id": "x" * 25, "com.docker.swarm.service.id": "y" * 25,
                                "com.docker.swarm.service.name": "sleeper", "com.docker.swarm.task": "",
                                "com.docker.swarm.task.id": "z" * 25, "com.docker.swarm.task.name": f"t.{index}"},
        "State": "running", "Status": "Up 5 minutes",
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Networks": {"bridge": {"IPAMConfig": None, "Links": None, "Aliases": None,
                                                    "NetworkID": "n" * 64, "EndpointID": "e" * 64,
                                                    "Gateway": "172.17.0.1", "IPAddress": f"172.17.0.{index + 2}",
                                                    "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
                                                    "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:02",
                                                    "DriverOpts": None}}},
        "Mounts": [{"Type": "volume", "Name": f"v{index}", "Source": f"/var/lib/docker/volumes/v{index}/_data",
                    "Destination": "/data", "Driver": "local", "Mode": "z", "RW": True, "Propagation": ""}],
        "SizeRw": 12345678901, "SizeRootFs": 1234567,
    }


def bodies() -> list[tuple[str, bytes]]:
    return [(f"node{n}", json.dumps([container(n, i) for i in range(50)]).encode()) for n in (1, 2, 3)]


def with_stdlib(answers: list[tuple[str, bytes]]) -> bytes:
    items: list[Any] = []
    for node, body in sorted(answers):
        for item in json.loads(body):
            item.setdefault("Portainer", {}).setdefault("Agent", {})["NodeName"] = node
            items.append(item)
    return json.dumps(items, separators=(",", ":")).encode()


def candidates() -> dict[str, Callable[[list[tuple[str, bytes]]], bytes]]:
    found: dict[str, Callable[[list[tuple[str, bytes]]], bytes]] = {"stdlib": with_stdlib}
    try:
        import orjson

        def with_orjson(answers: list[tuple[str, bytes]]) -> bytes:
            items: list[Any] = []
            for node, body in sorted(answers):
                for item in orjson.loads(body):
                    item.setdefault("Portainer", {}).setdefault("Agent", {})["NodeName"] = node
                    items.append(item)
            return orjson.dumps(items)

        found["orjson"] = with_orjson
    except ImportError:
        pass
    import msgspec

    decode, encode = msgspec.json.decode, msgspec.json.encode

    def with_msgspec_full(answers: list[tuple[str, bytes]]) -> bytes:
        items: list[Any] = []
        for node, body in sorted(answers):
            for item in decode(body):
                item.setdefault("Portainer", {}).setdefault("Agent", {})["NodeName"] = node
                items.append(item)
        return encode(items)

    found["msgspec-full"] = with_msgspec_full
    found["msgspec-shallow (agent)"] = lambda answers: merge_answers(
        b"/containers/json", [NodeAnswer(node, body) for node, body in answers])[0]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    answers = bodies()
    size = sum(len(body) for _, body in answers)
    print(f"3 nodes x 50 containers, {size / 1024:.0f} kB of JSON in\n")
    print("| merge | µs per merge (median) | lossless |\n|---|---:|---|")
    big = [("n", b'[{"Size": 123456789012345678901234567890}]')]
    for name, merge in candidates().items():
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            merge(answers)
            times.append((time.perf_counter() - started) * 1e6)
        try:
            lossless = b"123456789012345678901234567890" in merge(big)
        except Exception:  # noqa: BLE001 - orjson refuses big integers
            lossless = False
        print(f"| {name} | {statistics.median(times):.0f} | {'yes' if lossless else 'no (integers > 64 bits)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
