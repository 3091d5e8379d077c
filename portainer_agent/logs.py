"""Log observers: level filtering and text or JSON-lines output, on ``twisted.logger``.

Events are structured (``log.info("... {node}", node=...)``); the JSON format carries
the rendered message plus the event's own fields, one object a line, for log
aggregators. Request header values and query strings are never put into events.
"""
from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

LEVELS = {"DEBUG": LogLevel.debug, "INFO": LogLevel.info, "WARN": LogLevel.warn, "ERROR": LogLevel.error}


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in event.items()
        if not key.startswith("log_") and not key.startswith("_") and key not in ("format", "message", "isError", "system", "time")
    }


def format_json(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": event.get("log_time", time.time()),
        "level": event["log_level"].name if "log_level" in event else "info",
        "ns": event.get("log_namespace"),
        "msg": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    record.update(_fields(event))
    return json.dumps(record, default=repr) + "\n"


def format_text(event: dict[str, Any]) -> str:
    level = event["log_level"].name.upper() if "log_level" in event else "INFO"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
    text = f"{stamp} [{level}] [{event.get('log_namespace', '-')}] {formatEvent(event)}\n"
    failure = event.get("log_failure")
    if failure is not None:
        text += failure.getTraceback()
    return text


def make_observer(level: str = "INFO", fmt: str = "text", out: IO[str] | None = None) -> ILogObserver:
    """An observer writing ``fmt`` lines to ``out`` (stderr) at ``level`` and above."""
    stream = out if out is not None else sys.stderr
    formatter = format_json if fmt == "json" else format_text
    return FilteringLogObserver(
        FileLogObserver(stream, formatter),
        [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])],
    )


def start_logging(level: str, fmt: str, out: IO[str] | None = None) -> None:
    """Begin global logging (console script). Under twistd, twistd begins logging, with
    the observer :func:`portainer_agent.twistd.twistd_log_observer` gives it."""
    globalLogBeginner.beginLoggingTo([make_observer(level, fmt, out)], redirectStandardIO=False)
