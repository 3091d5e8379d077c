"""The volume (and host) browser: ``/browse/{ls,get,put,rename,delete}`` (also under
``/v2``) and the legacy ``/v1/browse/{volumeID}/{action}`` (spec §7.4, §7.5, §8).

Local behaviour only: a request whose ``X-PortainerAgent-Target`` names another node
is forwarded by the routing layer before it gets here.

Each request: parse (pure) -> the jail for its root (a volume's ``Mountpoint`` from
Docker, or the host root under host management) -> one :class:`~portainer_agent.fs.jail.Jail`
operation -> a response. Every filesystem call (opening the jail, listing, stat, open,
read, rename, delete, the staged file's writes, fsync and rename) runs in the disk thread
pool (:mod:`portainer_agent.fs.pool`), never on the reactor thread; a listing is also
encoded there. An upload's body is written to its staged file as it arrives
(``streams_body``: the request streams it, :mod:`portainer_agent.toolbox.upload`), with
backpressure and an optional size limit (413). Filesystem errors become Docker-style JSON errors with the
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
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import parse_qs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from portainer_agent.toolbox.twisted_private import client_gone
from portainer_agent.errors import AgentError
from portainer_agent.fs.jail import Jail, OpenedFile, PathRefused, Row, split_path
from portainer_agent.fs.pool import RunInPool
from portainer_agent.fs.upload import UploadForm, UploadedForm, boundary_of
from portainer_agent.fs.volumes import VolumeLocator, check_volume_id
from portainer_agent.toolbox.bodysink import PoolSink, too_large
from portainer_agent.toolbox.filesend import send_bytes, send_file
from portainer_agent.toolbox.responses import finish_with_error, write_empty, write_error
from portainer_agent.toolbox.upload import BufferedBody, UploadInterrupted, body_producer
from portainer_agent.routing import Route

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


class RootUnavailable(AgentError):
    """The volume's directory (or the host root) cannot be opened by the agent."""


def open_root(call: BrowseCall, root: str) -> Jail:
    """The jail for ``root`` (blocking: run in the pool)."""
    try:
        return Jail.open(root)
    except OSError as error:
        raise RootUnavailable(503 if call.volume_id is None else 500, FAILURE_MESSAGES[call.action],
                              f"The {'host root' if call.volume_id is None else 'volume'} is not accessible to the agent"
                              f" ({error.strerror})") from None


def within_jail(call: BrowseCall, root: str, operation: Callable[[Jail], Any]) -> Any:
    """``operation(jail)`` on a jail opened (and closed) here (blocking: run in the pool)."""
    with open_root(call, root) as jail:
        return operation(jail)


#: Entries encoded per msgspec call (see :func:`listing_json`).
ENCODE_SLICE = 2000


def listing_json(entries: list[Row]) -> bytes:
    """The ``ls`` answer (the original's fields; a symlink is shown, never followed).
    Consumes ``entries`` (the list is emptied).

    Made in a pool thread in short steps: one msgspec call, or freeing 100,000 objects at
    once, holds the GIL for tens of milliseconds, during which the reactor thread (every
    other request) waits; slices keep each step around a millisecond."""
    import msgspec  # here: only an agent that lists a volume pays for it (idle RSS)

    encode = msgspec.json.Encoder().encode
    parts = []
    for start in range(0, len(entries), ENCODE_SLICE):
        documents = [{"Name": name, "Size": size, "Dir": is_dir, "ModTime": mtime}
                     for name, size, is_dir, mtime, _ in entries[start:start + ENCODE_SLICE]]
        parts.append(encode(documents)[1:-1])
    while entries:
        del entries[-ENCODE_SLICE:]
    return b"[" + b",".join(parts) + b"]\n"


def open_for_download(jail: Jail, components: tuple[str, ...]) -> tuple[OpenedFile, bytes]:
    """The file opened for reading and its first bytes (to name its content type)."""
    opened = jail.open_file(components)
    try:
        return opened, os.pread(opened.fd, 512, 0)
    except BaseException:
        os.close(opened.fd)
        raise


class BrowseService:
    """The roots, the disk thread pool and the upload limit shared by the browse endpoints."""

    def __init__(self, locator: VolumeLocator, host_management: bool, host_root: Path,
                 run_in_pool: RunInPool, max_upload: int = 0) -> None:
        self.locator = locator
        self.host_management = host_management
        self.host_root = host_root
        #: Runs a blocking filesystem call off the reactor thread (tests: inline).
        self.run = run_in_pool
        #: Largest ``/browse/put`` body in bytes; 0: no limit.
        self.max_upload = max_upload

    def check_allowed(self, call: BrowseCall) -> None:
        if call.volume_id is None and not call.legacy and not self.host_management:
            raise HOST_MANAGEMENT_DISABLED
        if call.volume_id is not None:
            check_volume_id(call.volume_id)
        elif call.legacy:
            raise AgentError(400, "Invalid volume", "Missing volume identifier")

    def root_of(self, call: BrowseCall) -> "Deferred[str]":
        """The directory the call's paths are relative to (a volume's from Docker)."""
        if call.volume_id is not None:
            return self.locator.locate(call.volume_id)
        return maybeDeferred(str, self.host_root)

    @inlineCallbacks
    def in_jail(self, call: BrowseCall, operation: Callable[[Jail], Any]) -> Generator[Deferred[Any], Any, Any]:
        """``operation(jail)`` in the pool, on the jail of the call's root."""
        root = yield self.root_of(call)
        return (yield self.run(within_jail, call, root, operation))

    def run_anyway(self, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """Cleanup: in the pool, or inline once the pool stopped (a staged file is not
        left behind at shutdown)."""
        done = self.run(function, *args)
        done.addErrback(lambda _: maybeDeferred(function, *args))
        done.addErrback(lambda failure: log.failure("browse cleanup failed", failure))
        return done


class BrowseEndpoint(Resource):
    """One browse action (``ls``, ``get``, ``put``, ``rename`` or ``delete``)."""

    isLeaf = True

    def __init__(self, action: str, service: BrowseService) -> None:
        super().__init__()
        self.action = action
        self.service = service
        #: ``put`` reads its body as it arrives (:func:`portainer_agent.http.router.streaming_paths`).
        self.streams_body = action == "put"

    def render(self, request: Request, route: Route | None = None) -> Any:
        try:
            call = parse_call(self.action, request.method, query_args(request), route.volume_id if route else None)
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
        if failure.check(UploadInterrupted):
            log.info("an upload was cut off by the client: {reason}", reason=failure.getErrorMessage())
        elif failure.check(RootUnavailable):
            log.warn("cannot open the browse root for {action}: {details}", action=self.action,
                     details=failure.value.details)
        elif not failure.check(AgentError, OSError, PathRefused):  # a bug: say where
            log.failure("browse {action} failed", failure, action=self.action)
        finish_with_error(request, error_for(call, failure.value, shown))

    @inlineCallbacks
    def _ls(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        components = split_path(call.path)
        # Listed and encoded in the pool: for 100,000 entries that is most of a second.
        body = yield self.service.in_jail(call, lambda jail: listing_json(jail.list_dir(components)))
        send_bytes(request, body, b"application/json")

    @inlineCallbacks
    def _get(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        components = split_path(call.path)
        opened, head = yield self.service.in_jail(call, lambda jail: open_for_download(jail, components))
        if client_gone(request):
            self.service.run_anyway(os.close, opened.fd)
            return
        send_file(request, opened.fd, opened.size, opened.mtime, opened.name, head, self.service.run)

    @inlineCallbacks
    def _delete(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        components = split_path(call.path)
        yield self.service.in_jail(call, lambda jail: jail.remove(components))
        _finish_empty(request)

    @inlineCallbacks
    def _rename(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        current, new = split_path(call.path), split_path(call.new_path)
        yield self.service.in_jail(call, lambda jail: jail.rename(current, new))
        _finish_empty(request)

    @inlineCallbacks
    def _put(self, call: BrowseCall, request: Request) -> Generator[Deferred[Any], Any, None]:
        boundary = boundary_of(request.getHeader(b"content-type"))
        query_path = _first(query_args(request), b"Path")
        limit = self.service.max_upload
        declared = _content_length(request)
        if limit and declared is not None and declared > limit:
            raise too_large(limit)  # at once, before a byte is read or staged
        root = yield self.service.root_of(call)
        run = self.service.run
        jail = yield run(open_root, call, root)
        form: UploadForm | None = None
        try:
            def stage(directory: str | None) -> Any:
                return jail.stage(split_path(directory) if directory is not None else None)

            form = UploadForm(boundary, stage, query_path)
            sink = PoolSink(form.feed, run, limit)
            producer = body_producer(request)
            if producer is None:  # a small body, read whole (in memory) before render
                content = request.content
                if getattr(content, "too_large", False):
                    raise too_large(limit or getattr(content, "limit"))
                producer = BufferedBody(content.getvalue() if hasattr(content, "getvalue") else
                                        (yield run(_read_all, content)))
            yield sink.drain(producer)
            size = yield run(_store, jail, form)
            log.info("stored an upload of {size} bytes", size=size)
        finally:
            yield self.service.run_anyway(_discard, jail, form)
        _finish_empty(request)


def _content_length(request: Request) -> int | None:
    values = request.requestHeaders.getRawHeaders(b"content-length")
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def _read_all(content: Any) -> bytes:
    content.seek(0)
    data: bytes = content.read()
    return data


def _store(jail: Jail, form: UploadForm) -> int:
    """The end of an upload (blocking): the form complete, the staged file synced and
    renamed into place (copied across filesystems). Returns its size."""
    form.feed(b"")
    uploaded: UploadedForm = form.finish()
    uploaded.staged.sync()
    jail.store(uploaded.staged, split_path(uploaded.path), uploaded.filename)
    return uploaded.staged.written


def _discard(jail: Jail, form: UploadForm | None) -> None:
    """Whatever an upload leaves: its staged file (if not stored) and the jail (blocking)."""
    try:
        if form is not None:
            form.abort()
    finally:
        jail.close()


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


def _finish_empty(request: Request) -> None:
    if client_gone(request) or request.finished:
        return
    write_empty(request, 204)


def browse_endpoints(service: BrowseService) -> dict[bytes, Resource]:
    """The endpoints to register in ``AgentRoot.endpoints``."""
    return {b"/browse/" + action.encode(): BrowseEndpoint(action, service) for action in FAILURE_MESSAGES}
