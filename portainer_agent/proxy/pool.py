"""The connection pool of twisted.web.client.Agent for peer agents (HTTPS), kept quiet.

Private Twisted names, here only (and why): ``HTTPConnectionPool`` builds one
``_HTTP11ClientFactory`` per new connection, and that factory logs "Starting factory" /
"Stopping factory" at INFO for each one; the pool takes its factory class from its
``_factory`` attribute, the only way to swap in a quiet one. If a Twisted release renames
either, :func:`make_pool` fails at start (AttributeError/ImportError), not silently.
"""
from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new connection to a peer."""

    noisy = False


def make_pool(reactor: Any, max_per_host: int = 16) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    if not hasattr(pool, "_factory"):
        raise RuntimeError("twisted.web.client.HTTPConnectionPool has no _factory: update portainer_agent.proxy.pool")
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    return pool
