"""Making ``twistd portainer-agent`` behave like the ``portainer-agent`` console script.

twistd owns three things the console script does itself, and does them differently:

* **option errors**: twistd prints its whole help and exits 1; the agent says one
  line and exits 2 (:class:`TwistdAgentOptions`);
* **logging**: twistd logs in its own text format at every level; the agent's
  ``--log-level``/``--log-format`` apply to the stream twistd chose (stdout with
  ``-n``, or ``--logfile``), unless the operator picked ``--logger`` or ``--syslog``
  (:func:`twistd_log_observer`);
* **exit status**: twistd re-raises the signal that stopped it (a SIGTERM'd agent
  "dies of SIGTERM", 143) and never reads an exit code; the agent exits 0 after a
  graceful stop and 1 after a fatal error such as a port it cannot bind
  (:func:`exit_like_the_console_script`).
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Callable, Mapping

from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile

from portainer_agent.config import Config
from portainer_agent.toolbox.twisted_private import forget_exit_signal
from portainer_agent.logs import make_observer
from portainer_agent.options import AgentOptions, report_usage_error


class TwistdAgentOptions(AgentOptions):
    """The agent's options under twistd: a bad one is one line on stderr and exit 2,
    as with the console script (twistd itself would print its help and exit 1)."""

    def parseOptions(self, options: Any = None) -> None:  # noqa: N802
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            raise SystemExit(report_usage_error(error))


def twistd_log_observer(config: Config, twistd_options: Mapping[str, Any]) -> ILogObserver | None:
    """The agent's observer on the stream twistd would log to; None to leave logging
    to twistd (``--logger``, ``--syslog``, or a daemon told to log to stdout, which
    twistd refuses itself)."""
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    nodaemon = bool(twistd_options.get("nodaemon"))
    if logfile == "-" or (nodaemon and not logfile):
        if not nodaemon:
            return None
        return make_observer(config.log_level, config.log_format, sys.stdout)
    # twistd's own rotating log file class, so SIGUSR1-style rotation tools keep working.
    return make_observer(config.log_level, config.log_format, LogFile.fromFullPath(logfile or "twistd.log"))


def exit_like_the_console_script(reactor: Any, exit_code: Callable[[], int]) -> None:
    """Exit 0 after a graceful stop (not by re-raising SIGTERM) and ``exit_code()``
    after a fatal error, once twistd has finished (pid file removed, logs flushed)."""

    # twistd re-raises the signal that stopped the reactor once it is done (see
    # twisted.scripts.twistd.runApp); the stop was graceful, so forget it.
    reactor.addSystemEventTrigger("after", "shutdown", forget_exit_signal, reactor)

    def exit_with_code() -> None:
        code = exit_code()
        if code:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    # twistd returns None to its console script whatever happened: the code can only
    # be set once twistd is done, at interpreter exit.
    atexit.register(exit_with_code)
