"""TLS for test clients and tools talking to an agent with a self-signed certificate."""
from __future__ import annotations

import ssl


def unverified_tls() -> ssl.SSLContext:
    """A client context that does not check the agent's certificate (tests, the lab,
    benchmarks: the agents there have self-signed certificates nobody pinned).

    ``ssl.create_default_context()`` would load the system's CA store, which nothing here
    reads (verification is off) and which costs about 50 ms a context: as much as a whole
    exec through two agents, paid by every request of the suite's polls and loops. A bare
    client context has the same protocol defaults without it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
