# Portainer agent (Python/Twisted). Build:  docker build -t portainer-agent:py .
# Offline (no registry): see scripts/build-image-offline, which makes a Debian base
# with debootstrap and passes BASE and PIP_ARGS.
#
# Two stages. `builder` builds the agent's wheel (the runtime only: no lab, no test helpers,
# see pyproject.toml), installs it with the exact versions of constraints.txt into the venv
# /opt/agent, and assembles /rootfs: the base system plus that venv, minus what the agent never
# reads. The runtime stage is that one tree (FROM scratch), so nothing removed in the builder
# still weighs in a lower layer. Sizes before/after: deploy/README.md.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS builder
ARG PIP_ARGS=""
COPY . /src
# The venv: the wheel with the versions of constraints.txt; then out go pip/setuptools/wheel,
# package test suites, type stubs and C sources, Twisted's SSH, mail and IRC subprojects (with
# their twistd dropins), stale bytecode; twistd's plugin cache is written now (the agent's
# user cannot write it at run time); then the install is checked.
RUN python3 -m venv /opt/agent \
 && /opt/agent/bin/pip wheel --no-cache-dir --no-deps ${PIP_ARGS} -w /tmp/dist /src \
 && /opt/agent/bin/pip install --no-cache-dir ${PIP_ARGS} -c /src/constraints.txt /tmp/dist/portainer_agent-*.whl \
 && /opt/agent/bin/python -m pip uninstall -y -q pip setuptools wheel \
 && site=$(/opt/agent/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && find "$site" -depth -type d \( -name test -o -name tests \) -exec rm -rf {} + \
 && find "$site" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.c' -o -name '*.h' -o -name py.typed \) -delete \
 && rm -rf "$site"/twisted/conch "$site"/twisted/mail "$site"/twisted/words \
        "$site"/twisted/plugins/twisted_conch.py "$site"/twisted/plugins/twisted_mail.py \
        "$site"/twisted/plugins/twisted_words.py "$site"/twisted/plugins/cred_sshkeys.py \
        /opt/agent/bin/cftp /opt/agent/bin/ckeygen /opt/agent/bin/conch /opt/agent/bin/tkconch \
        /opt/agent/bin/mailmail /opt/agent/bin/Activate.ps1 \
 && find /opt/agent -name __pycache__ -type d -exec rm -rf {} + \
 && /opt/agent/bin/python -m compileall -q -j 0 /opt/agent \
 && /opt/agent/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/agent/bin/portainer-agent --help >/dev/null \
 && /opt/agent/bin/python -c "import portainer_agent.tap, portainer_agent.healthcheck" \
 && ! /opt/agent/bin/python -c "import portainer_agent.lab" 2>/dev/null \
 && ! /opt/agent/bin/python -c "import portainer_agent.testing" 2>/dev/null \
 && [ ! -e /opt/agent/bin/portainer-agent-lab ] && [ ! -e /opt/agent/bin/pip ]
# The runtime tree: the base system and the venv, without docs (copyright notices stay), man
# and info pages, translations, ensurepip's wheels, Python's test/IDE/2to3 modules, apt's
# and debconf's caches. The agent runs as `agent` (UID/GID 10001), owning /data; see
# deploy/README.md for what needs root or the Docker socket's group.
RUN groupadd --gid 10001 agent \
 && useradd --uid 10001 --gid agent --home-dir /data --no-create-home --shell /usr/sbin/nologin agent \
 && mkdir -p /rootfs /data && chown agent:agent /data \
 && tar -C / --one-file-system --numeric-owner \
        --exclude=./rootfs --exclude=./src --exclude=./proc --exclude=./sys --exclude=./dev \
        --exclude=./tmp/dist --exclude=./etc/hosts --exclude=./etc/hostname --exclude=./etc/resolv.conf \
        -cf - . | tar -C /rootfs -xpf - \
 && cd /rootfs \
 && mkdir -p proc sys dev tmp && chmod 1777 tmp \
 && find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete \
 && find usr/share/doc -mindepth 1 -type d -empty -delete \
 && rm -rf usr/share/man usr/share/info usr/share/locale usr/share/lintian usr/share/bash-completion \
        usr/share/python-wheels usr/share/gcc usr/lib/*-linux-gnu/gconv \
        usr/lib/python3.11/test usr/lib/python3.11/idlelib usr/lib/python3.11/lib2to3 \
        usr/lib/python3.11/ensurepip usr/lib/python3.11/pydoc_data usr/lib/python3.11/turtledemo \
        usr/lib/python3.11/tkinter \
        usr/local/lib/python3.11/test usr/local/lib/python3.11/idlelib usr/local/lib/python3.11/lib2to3 \
        usr/local/lib/python3.11/ensurepip usr/local/lib/python3.11/turtledemo \
        usr/local/lib/python3.11/tkinter usr/local/lib/python3.11/site-packages/pip* \
        usr/local/lib/python3.11/site-packages/setuptools* usr/local/lib/python3.11/site-packages/wheel* \
        usr/local/lib/python3.11/site-packages/_distutils_hack usr/local/lib/python3.11/site-packages/pkg_resources \
        usr/local/lib/python3.11/site-packages/distutils-precedence.pth usr/local/bin/pip* usr/local/bin/wheel \
        var/cache/debconf/* var/cache/apt/* var/lib/apt/lists/* var/log/* root/.cache \
 && chroot /rootfs /opt/agent/bin/portainer-agent --help >/dev/null

FROM scratch
COPY --from=builder /rootfs/ /
# The host's volumes directory is bind-mounted at /var/lib/docker/volumes (whatever the
# engine's DockerRootDir): volume mount points from Docker are mapped there.
ENV PATH=/opt/agent/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
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
