# Portainer agent (Python/Twisted). Build:  docker build -t portainer-agent:py .
# Offline (no registry): see scripts/build-image-offline, which makes a Debian base
# with debootstrap and passes BASE and PIP_ARGS.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG PIP_ARGS=""
COPY . /src
# The runtime does not carry the multi-node lab (a developer tool, the `lab` extra): its package
# and its console script leave the source before the install, and the install is checked.
# The agent runs as `agent` (UID/GID 10001), owning /data; see deploy/README.md for what needs
# root or the Docker socket's group.
RUN sed -i '/^portainer-agent-lab = /d' /src/pyproject.toml \
 && rm -rf /src/portainer_agent/lab \
 && python3 -m venv /opt/agent \
 && /opt/agent/bin/pip install --no-cache-dir ${PIP_ARGS} /src \
 && /opt/agent/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && ! /opt/agent/bin/python -c "import portainer_agent.lab" 2>/dev/null \
 && [ ! -e /opt/agent/bin/portainer-agent-lab ] \
 && rm -rf /src \
 && groupadd --gid 10001 agent \
 && useradd --uid 10001 --gid agent --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin agent \
 && mkdir -p /data \
 && chown agent:agent /data
# The host's volumes directory is bind-mounted at /var/lib/docker/volumes (whatever the
# engine's DockerRootDir): volume mount points from Docker are mapped there.
ENV PATH=/opt/agent/bin:$PATH \
    AGENT_DATA_DIR=/data \
    AGENT_VOLUMES_ROOT=/var/lib/docker/volumes \
    PYTHONUNBUFFERED=1
VOLUME /data
# Numeric, so runtimes that check for a non-root user (Kubernetes runAsNonRoot) can tell.
# The Docker socket needs its group (--group-add <gid>) or root (--user root), which is what the
# stack file does; /host (host management) and volume browsing need root.
USER 10001:10001
EXPOSE 9001 9002
STOPSIGNAL SIGTERM
# `portainer-agent healthcheck` reads the agent's own options and environment (AGENT_HOST,
# AGENT_PORT, DOCKER_HOST): /ping over TLS on the API port, /_ping on the Docker socket.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
  CMD ["portainer-agent", "healthcheck"]
# The console script, not twistd: a foreground process logging to stderr, no pid file.
ENTRYPOINT ["portainer-agent"]
