"""The connection pool of twisted.web.client.Agent for peer agents (HTTPS), kept quiet
(no "Starting factory" INFO line per connection: see
:mod:`portainer_agent.toolbox.twisted_private`)."""
from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool

from portainer_agent.toolbox.twisted_private import quiet_pool


def make_pool(reactor: Any, max_per_host: int = 16) -> HTTPConnectionPool:
    pool = quiet_pool(HTTPConnectionPool(reactor, persistent=True))
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    return pool
