"""TLS for test clients and tools talking to an agent with a self-signed certificate."""
from __future__ import annotations

import ssl


def unverified_tls() -> ssl.SSLContext:
    """A client context that does not check the agent's certificate (tests, the lab,
    benchmarks: the agents there have self-signed certificates nobody pinned)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
