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
ENV PATH=/opt/agent/bin:$PATH \
    AGENT_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 9001 9002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python3 -c "import ssl,urllib.request as u; c=ssl._create_unverified_context(); u.urlopen('https://127.0.0.1:9001/ping', context=c, timeout=4)" || exit 1
ENTRYPOINT ["portainer-agent"]
