"""Runs inside a container on the agents' overlay network (stdlib only: python3 of the agent image).

    docker run --rm -i --network agent_network --entrypoint python3 \
        -e PROBE_HEADERS='{"X-PortainerAgent-PublicKey": ..., "X-PortainerAgent-Signature": ...}' \
        portainer-agent:py - < tests/deploy/probe_agents.py

Resolves tasks.agent (env PROBE_NAME), then for every address: GET /ping (unsigned) and a
signed GET /agents. Prints one JSON document on stdout.
"""
import http.client
import json
import os
import socket
import ssl
import time

name = os.environ.get("PROBE_NAME", "tasks.agent")
port = int(os.environ.get("PROBE_PORT", "9001"))
headers = json.loads(os.environ.get("PROBE_HEADERS", "{}"))
context = ssl._create_unverified_context()


def request(host, path, signed):
    started = time.monotonic()
    connection = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        connection.request("GET", path, headers=headers if signed else {})
        response = connection.getresponse()
        body = response.read()
        try:
            body = json.loads(body) if body else None
        except ValueError:
            body = body.decode("utf-8", "replace")[:500]
        return {"status": response.status, "body": body, "seconds": round(time.monotonic() - started, 3),
                "agent_headers": {k: v for k, v in response.getheaders() if k.lower().startswith("portainer")}}
    except (OSError, http.client.HTTPException) as error:
        return {"error": repr(error), "seconds": round(time.monotonic() - started, 3)}
    finally:
        connection.close()


result = {"name": name, "hostname": socket.gethostname()}
started = time.monotonic()
try:
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)})
except OSError as error:
    addresses = []
    result["resolve_error"] = repr(error)
result["resolve_seconds"] = round(time.monotonic() - started, 3)
result["addresses"] = addresses
result["agents"] = {}
for address in addresses:
    checks = {"ping": request(address, "/ping", False), "agents": request(address, "/agents", True)}
    # /info is a Swarm-manager operation (routed to a manager): it proves routing works.
    info = request(address, "/v1.41/info", True)
    checks["docker_info"] = {key: info.get(key) for key in ("status", "error")}
    if isinstance(info.get("body"), dict):
        checks["docker_info"].update({key: info["body"].get(key) for key in ("Name", "DockerRootDir", "ServerVersion")})
        checks["docker_info"]["ControlAvailable"] = (info["body"].get("Swarm") or {}).get("ControlAvailable")
    # The node's own engine (a node operation, target = the agent's own node): its running
    # containers carry its Swarm node ID, which proves the right socket is mounted.
    members = checks["agents"].get("body") if isinstance(checks["agents"].get("body"), list) else []
    own = next((m for m in members if isinstance(m, dict) and m.get("Self")), None)
    if own is not None:
        saved = dict(headers)
        headers["X-PortainerAgent-Target"] = own["NodeName"]
        local = request(address, "/v1.41/containers/json", True)
        headers.clear()
        headers.update(saved)
        listed = local.get("body") if isinstance(local.get("body"), list) else []
        checks["own_node"] = {"NodeName": own["NodeName"], "NodeID": own.get("NodeID"),
                              "status": local.get("status"),
                              "container_node_ids": sorted({(c.get("Labels") or {}).get("com.docker.swarm.node.id")
                                                            for c in listed if isinstance(c, dict)} - {None})}
    unsigned = request(address, "/v1.41/info", False)
    checks["unsigned_info_status"] = unsigned.get("status", unsigned.get("error"))
    metrics_port = os.environ.get("PROBE_METRICS_PORT")
    if metrics_port:  # the plain-HTTP metrics listener (AGENT_METRICS_ADDR)
        connection = http.client.HTTPConnection(address, int(metrics_port), timeout=10)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
            checks["metrics"] = {"status": response.status,
                                 "lines": [line for line in text.splitlines()
                                           if line.startswith(("portainer_agent_requests_total",
                                                               "portainer_agent_cluster_members"))]}
        except (OSError, http.client.HTTPException) as error:
            checks["metrics"] = {"error": repr(error)}
        finally:
            connection.close()
    result["agents"][address] = checks
print(json.dumps(result, indent=1))
