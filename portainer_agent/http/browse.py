"""The volume (and host) browser: ``/browse/{ls,get,put,rename,delete}`` (also under
``/v2``) and the legacy ``/v1/browse/{volumeID}/{action}`` (spec §7.4, §7.5, §8).

Local behaviour only: a request whose ``X-PortainerAgent-Target`` names another node
is forwarded by the routing layer before it gets here.

Each request: parse (pure) -> the jail for its root (a volume's ``Mountpoint`` from
Docker, or the host root under host management) -> one :class:`~portainer_agent.fs.jail.Jail`
operation -> a response. Filesystem errors become Docker-style JSON errors with the
original's messages and a more precise status (404, 409, 403 instead of 500) and
details that name the client's path, never the agent's absolute path.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Generator
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import parse_qs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.http.twisted_private import client_gone
from portainer_agent.errors import AgentError
from portainer_agent.fs.jail import Jail, PathRefused, split_path
from portainer_agent.fs.upload import UploadForm, boundary_of, feed_from_file
from portainer_agent.fs.volumes import VolumeLocator, check_volume_id
from portainer_agent.http.filesend import send_file
from portainer_agent.http.responses import finish_with_error, write_empty, write_error, write_json

log = Logger()

#: The original's 500 messages, one per action (spec §7.4).
FAILURE_MESSAGES = {
    "ls": "Unable to list files inside specified directory",
    "get": "Unable to open file",
    "delete": "Unable to remove file",
    "rename": "Unable to rename file",
    "put": "Error saving file to disk",
}
METHODS = {"ls": (b"GET", b"HEAD"), "get": (b"GET", b"HEAD"), "delete": (b"DELETE",), "rename": (b"PUT",),
           "put": (b"POST",)}
HOST_MANAGEMENT_DISABLED = AgentError(503, "Host management capability disabled",
                                      "This agent feature is not enabled")
MAX_JSON_BODY = 64 * 1024


@attrs.frozen
class BrowseCall:
    """A parsed browse request (pure data)."""

    action: str
    volume_id: str | None
    legacy: bool
    path: str = ""
    new_path: str = ""


def query_args(request: Request) -> dict[bytes, list[bytes]]:
    """The query string, decoded once (``request.args`` may also hold body fields)."""
    _, _, query = request.uri.partition(b"?")
    return parse_qs(query, keep_blank_values=True)  # bytes in, bytes out (urllib mangles invalid UTF-8)


def _first(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    return os.fsdecode(values[0]) if values else None


def parse_call(action: str, method: bytes, uri_args: dict[bytes, list[bytes]], legacy_volume: bytes | None) -> BrowseCall:
    """Pure: method, query and legacy path segment -> a :class:`BrowseCall` (or AgentError)."""
    if method not in METHODS[action]:
        raise AgentError(405, "Method not allowed", f"/browse/{action} accepts {', '.join(m.decode() for m in METHODS[action])}")
    legacy = legacy_volume is not None
    volume_id = os.fsdecode(unquote_to_bytes(legacy_volume)) if legacy_volume is not None else _first(uri_args, b"volumeID")
    return BrowseCall(action, volume_id or None, legacy, _first(uri_args, b"path") or "")


def require_path(call: BrowseCall) -> None:
    """ls, get and delete need ``path`` (the legacy form defaults to the volume's root)."""
    if call.action in ("ls", "get", "delete") and not call.path and not call.legacy:
        raise AgentError(400, "Invalid query parameter: path", "Missing query parameter")


def refusal_message(call: BrowseCall, refused: PathRefused) -> str:
    """The original's message for a ``..`` path; the action's message otherwise."""
    if refused.reason == "dotdot":
        if call.legacy and call.action in ("ls", "get", "delete"):
            return "Invalid query parameter: path"
        return "Invalid volume" if call.volume_id else "Invalid path"
    return FAILURE_MESSAGES[call.action]


_STATUS_BY_ERRNO = {
    errno.ENOENT: 404,
    errno.EEXIST: 409,
    errno.ENOTEMPTY: 409,
    errno.EISDIR: 409,
    errno.ENOTDIR: 400,
    errno.EACCES: 403,
    errno.EPERM: 403,
    errno.EROFS: 403,
    errno.EXDEV: 400,
    errno.EINVAL: 400,
    errno.ENAMETOOLONG: 400,
    errno.EBUSY: 409,
}


def error_for(call: BrowseCall, error: BaseException, shown: str) -> AgentError:
    """Pure: an exception from the filesystem -> the Docker-style error to answer."""
    if isinstance(error, AgentError):
        return error
    if isinstance(error, PathRefused):
        return AgentError(400, refusal_message(call, error), str(error))
    if isinstance(error, OSError):
        status = _STATUS_BY_ERRNO.get(error.errno or 0, 500)
        reason = error.strerror or str(error)
        if error.errno == errno.ENOTEMPTY:
            reason = "Directory not empty (only files and empty directories can be removed)"
        elif error.errno == errno.EEXIST:
            reason = "The destination already exists (rename never replaces an existing file)"
        return AgentError(status, FAILURE_MESSAGES[call.action], f"{reason}: {shown}")
    return AgentError(500, FAILURE_MESSAGES[call.action], "internal error")


class BrowseService:
    """The roots and the I/O helpers shared by the browse endpoints."""

    def __init__(self, locator: VolumeLocator, host_management: bool, host_root: Path,
                 cooperator: Cooperator | None = None,
                 blocking: Callable[..., "Deferred[Any]"] | None = None) -> None:
        self.locator = locator
        self.host_management = host_management
        self.host_root = host_root
        self._cooperator = cooperator
        #: Runs a slow call (fsync) off the reactor thread; tests run it inline.
        self._blocking = blocking if blocking is not None else _in_thread

    def check_allowed(self, call: BrowseCall) -> None:
        if call.volume_id is None and not call.legacy and not self.host_management:
            raise HOST_MANAGEMENT_DISABLED
        if call.volume_id is not None:
            check_volume_id(call.volume_id)
        elif call.legacy:
            raise AgentError(400, "Invalid volume", "Missing volume identifier")

    @inlineCallbacks
    def open_jail(self, call: BrowseCall) -> Generator[Deferred[Any], Any, Jail]:
        if call.volume_id is not None:
            root = yield self.locator.locate(call.volume_id)
        else:
            root = str(self.host_root)
        try:
            return Jail.open(root)
        except OSError as error:
            log.warn("cannot open browse root {root}: {error}", root=root, error=error.strerror)
            raise AgentError(503 if call.volume_id is None else 500, FAILURE_MESSAGES[call.action],
                             f"The {'host root' if call.volume_id is None else 'volume'} is not accessible to the agent"
                             f" ({error.strerror})") from None

    def cooperate(self, work: Any) -> "Deferred[Any]":
        if self._cooperator is None:
            from twisted.internet.task import cooperate

            return cooperate(work).whenDone()
        return self._cooperator.cooperate(work).whenDone()

    def blocking(self, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        return self._blocking(function, *args)


def _in_thread(function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args)


class BrowseEndpoint(Resource):
    """One browse action (``ls``, ``get``, ``put``, ``rename`` or ``delete``)."""

    isLeaf = True

    def __init__(self, action: str, service: BrowseService) -> None:
        super().__init__()
        self.action = action
        self.service = service

    def render(self, request: Request) -> Any:
        route = getattr(request, "agentRoute", None)
        try:
            call = parse_call(self.action, request.method, query_args(request), getattr(route, "volume_id", None))
            self.service.check_allowed(call)  # the original's order: 503 first, then parameters
            require_path(call)
            if self.action == "rename":
                call = _with_rename_body(call, request)
        except AgentError as error:
            if error.status == 405:
                request.setHeader(b"allow", b", ".join(METHODS[self.action]))
            return write_error(request, error)
        handler = getattr(self, "_" + self.action)
        shown = call.path or "/"
        done = maybeDeferred(handler, call, request)
        done.addErrback(self._failed, call, request, shown)
        done.addErrback(lambda failure: log.failure("browse {action} failed", failure, action=self.action))
        return NOT_DONE_YET

    def _failed(self, failure: Failure, call: BrowseCall, request: Request, shown: str) -> None:
        if not failure.check(AgentError, OSError, PathRefused):  # a bug: say where
            log.failure("browse {action} failed", failure, action=self.action)
        finish_with_error(request, error_for(call, failure.value, shown))

    @inlineCallbacks
    def _ls(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        with (yield self.service.open_jail(call)) as jail:
            entries = jail.list_dir(split_path(call.path))
        document = [{"Name": e.name, "Size": e.size, "Dir": e.is_dir, "ModTime": e.mtime} for e in entries]
        _finish_bytes(request, write_json(request, document))

    @inlineCallbacks
    def _get(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        with (yield self.service.open_jail(call)) as jail:
            opened = jail.open_file(split_path(call.path))
        if client_gone(request):
            os.close(opened.fd)
            return
        send_file(request, opened.fd, opened.size, opened.mtime, opened.name)

    @inlineCallbacks
    def _delete(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        with (yield self.service.open_jail(call)) as jail:
            jail.remove(split_path(call.path))
        _finish_empty(request)

    @inlineCallbacks
    def _rename(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        current, new = split_path(call.path), split_path(call.new_path)
        with (yield self.service.open_jail(call)) as jail:
            jail.rename(current, new)
        _finish_empty(request)

    @inlineCallbacks
    def _put(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        boundary = boundary_of(request.getHeader(b"content-type"))
        query_path = _first(query_args(request), b"Path")
        with (yield self.service.open_jail(call)) as jail:
            def stage(directory: str | None) -> Any:
                return jail.stage(split_path(directory) if directory is not None else None)

            form = UploadForm(boundary, stage, query_path)
            try:
                assert request.content is not None
                yield self.service.cooperate(feed_from_file(request.content, form))
                uploaded = form.finish()
                target = split_path(uploaded.path)
                yield self.service.blocking(uploaded.staged.sync)
                jail.store(uploaded.staged, target, uploaded.filename)
                log.info("stored an upload of {size} bytes", size=uploaded.staged.written)
            finally:
                form.abort()
        _finish_empty(request)


def _with_rename_body(call: BrowseCall, request: Request) -> BrowseCall:
    """Read ``{"CurrentFilePath", "NewFilePath"}`` (keys matched case-insensitively, as Go)."""
    content = request.content
    raw = content.read(MAX_JSON_BODY + 1) if content is not None else b""
    if len(raw) > MAX_JSON_BODY:
        raise AgentError(400, "Invalid request payload", "Request body too large")
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise AgentError(400, "Invalid request payload", str(error)) from None
    if not isinstance(document, dict):
        raise AgentError(400, "Invalid request payload", "Expected a JSON object")
    fields = {str(key).lower(): value for key, value in document.items()}
    current, new = fields.get("currentfilepath"), fields.get("newfilepath")
    if not isinstance(current, str) or not current:
        raise AgentError(400, "Invalid request payload", "Current file path is invalid")
    if not isinstance(new, str) or not new:
        raise AgentError(400, "Invalid request payload", "New file path is invalid")
    return attrs.evolve(call, path=current, new_path=new)


def _finish_bytes(request: Request, body: bytes) -> None:
    if client_gone(request) or request.finished:
        return
    request.write(body)
    request.finish()


def _finish_empty(request: Request) -> None:
    if client_gone(request) or request.finished:
        return
    write_empty(request, 204)


def browse_endpoints(service: BrowseService) -> dict[bytes, Resource]:
    """The endpoints to register in ``AgentRoot.endpoints``."""
    return {b"/browse/" + action.encode(): BrowseEndpoint(action, service) for action in FAILURE_MESSAGES}
