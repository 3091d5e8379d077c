"""The ``portainer-agent`` console script (also ``python -m portainer_agent``).

Parses options (bad values: one line on stderr, exit 2), starts logging, builds the
agent (Docker unreachable: one line, exit 1), runs the reactor; SIGTERM/SIGINT stop
it gracefully and the process exits 0.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from twisted.python import usage


def main(argv: Sequence[str] | None = None) -> int:
    from portainer_agent.options import AgentOptions

    options = AgentOptions(os.environ)
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as error:
        print(f"portainer-agent: error: {error}", file=sys.stderr)
        print("portainer-agent: try --help", file=sys.stderr)
        return 2
    config = options.config
    assert config is not None

    from twisted.internet import reactor
    from portainer_agent.logs import start_logging
    from portainer_agent.tap import StartupError, build_agent_service

    start_logging(config.log_level, config.log_format)
    try:
        service = build_agent_service(config, reactor)
    except StartupError as error:
        print(f"portainer-agent: {error}", file=sys.stderr)
        return 1
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return service.exit_code


if __name__ == "__main__":
    sys.exit(main())
