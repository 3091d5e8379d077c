# Portainer agent (Python/Twisted). Build:  docker build -t portainer-agent:py .
# Offline (no registry): see scripts/build-image-offline, which makes a Debian base
# with debootstrap and passes BASE and PIP_ARGS.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG PIP_ARGS=""
COPY . /src
RUN python3 -m venv /opt/agent \
 && /opt/agent/bin/pip install --no-cache-dir ${PIP_ARGS} /src \
 && /opt/agent/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && rm -rf /src
# The host's volumes directory is bind-mounted at /var/lib/docker/volumes (whatever the
# engine's DockerRootDir): volume mount points from Docker are mapped there.
ENV PATH=/opt/agent/bin:$PATH \
    AGENT_DATA_DIR=/data \
    AGENT_VOLUMES_ROOT=/var/lib/docker/volumes \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 9001 9002
STOPSIGNAL SIGTERM
# `portainer-agent healthcheck` reads the agent's own options and environment (AGENT_HOST,
# AGENT_PORT, DOCKER_HOST): /ping over TLS on the API port, /_ping on the Docker socket.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
  CMD ["portainer-agent", "healthcheck"]
# The console script, not twistd: a foreground process logging to stderr, no pid file.
ENTRYPOINT ["portainer-agent"]
