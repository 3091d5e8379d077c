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
# Probes the API port from AGENT_PORT (default 9001) on loopback, or on AGENT_HOST when the
# agent listens on one specific address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python3 -c "import os,ssl,urllib.request as u; h=os.environ.get('AGENT_HOST') or '127.0.0.1'; h={'0.0.0.0':'127.0.0.1','::':'[::1]'}.get(h,'['+h+']' if ':' in h else h); u.urlopen('https://%s:%s/ping' % (h, os.environ.get('AGENT_PORT') or '9001'), context=ssl._create_unverified_context(), timeout=4)" || exit 1
ENTRYPOINT ["portainer-agent"]
