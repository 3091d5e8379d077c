"""The ``portainer-agent`` console script (also ``python -m portainer_agent``), and its
``healthcheck`` subcommand.

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
    from portainer_agent.options import AgentOptions, report_usage_error

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["healthcheck"]:
        from portainer_agent.healthcheck import main as healthcheck

        return healthcheck(args[1:], os.environ)
    options = AgentOptions(os.environ)
    try:
        options.parseOptions(args)
    except usage.UsageError as error:
        return report_usage_error(error)
    config = options.config
    assert config is not None

    from twisted.internet import reactor
    from portainer_agent.logs import start_logging
    from portainer_agent.memory import release_free_heap
    from portainer_agent.tap import StartupError, build_agent_service

    start_logging(config.log_level, config.log_format)
    try:
        service = build_agent_service(config, reactor)
    except StartupError as error:
        print(f"portainer-agent: {error}", file=sys.stderr)
        return 1
    reactor.callWhenRunning(service.startService)
    reactor.callWhenRunning(release_free_heap)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return service.exit_code


if __name__ == "__main__":
    sys.exit(main())
