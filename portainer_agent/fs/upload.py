"""``POST /browse/put`` bodies: multipart/form-data parsed as it is read, the file part
written straight to a staged :class:`~portainer_agent.fs.jail.AtomicFile`. Blocking (it
writes): :mod:`portainer_agent.http.browse` feeds it in the disk thread pool, batch by batch
as the body arrives.

Parser: ``multipart`` (defnull's, already a dependency of treq): its
``PushMultipartParser`` is sans-I/O (bytes in, events out), pure Python, bounded
(header size/count limits) and keeps no payload; see the report in the issue for the
comparison with python-multipart and streaming-form-data.

Field order: Portainer's UI sends the file part *before* ``Path``, so the destination
may be unknown while the file streams; it is then staged in the jail's root and moved
into place once the form is complete (a ``Path`` in the query string, which the
original's ``FormValue`` also read first, is used at once).
"""
from __future__ import annotations

from typing import Callable

import attrs
import multipart

from portainer_agent.errors import AgentError
from portainer_agent.fs.jail import AtomicFile

#: Largest text field kept (``Path``): a path is at most 4096 bytes.
MAX_FIELD = 8192


def invalid_payload(details: str) -> AgentError:
    return AgentError(400, "Invalid request payload", details)


def boundary_of(content_type: bytes | None) -> str:
    """Pure: the multipart boundary of a ``Content-Type`` header (400 when absent)."""
    if not content_type:
        raise invalid_payload("Expected a multipart/form-data body")
    kind, options = multipart.parse_options_header(content_type.decode("latin-1"))
    boundary = options.get("boundary")
    if kind.lower() != "multipart/form-data" or not boundary:
        raise invalid_payload("Expected a multipart/form-data body with a boundary")
    return boundary


def upload_basename(filename: str) -> str:
    """Pure: the name an uploaded file is stored under (directories stripped, as
    browsers and Go >= 1.17 do; backslashes count as separators too)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


@attrs.frozen
class UploadedForm:
    """A complete form: where the staged file goes."""

    path: str
    filename: str
    staged: AtomicFile


class UploadForm:
    """Feed it the body's bytes in chunks; it writes the ``file`` part to a staged file
    (``stage(path or None)``) and keeps the ``Path`` field. Other fields are skipped."""

    def __init__(self, boundary: str, stage: Callable[[str | None], AtomicFile], path: str | None = None) -> None:
        self._parser = multipart.PushMultipartParser(boundary, max_header_size=8192, max_header_count=16)
        self._stage = stage
        self._path = path
        self._path_from_form: bytearray | None = None
        self._filename: str | None = None
        self._staged: AtomicFile | None = None
        self._current: str | None = None  # "file", "Path" or None (skipped)

    def feed(self, chunk: bytes) -> None:
        """Parse one chunk (``b""``: end of body)."""
        try:
            for event in self._parser.parse(chunk):
                self._event(event)
        except multipart.MultipartError as error:
            raise invalid_payload(f"Malformed multipart body: {error}") from None

    def _event(self, event: multipart.MultipartSegment | bytes | bytearray | None) -> None:
        if isinstance(event, multipart.MultipartSegment):
            self._start_part(event)
        elif event is None:
            self._current = None
        elif self._current == "file":
            assert self._staged is not None
            self._staged.write(event)
        elif self._current == "Path":
            assert self._path_from_form is not None
            self._path_from_form += event
            if len(self._path_from_form) > MAX_FIELD:
                raise invalid_payload("Invalid file path")

    def _start_part(self, segment: multipart.MultipartSegment) -> None:
        if segment.name == "file" and segment.filename is not None and self._staged is None:
            self._filename = upload_basename(segment.filename)
            self._staged = self._stage(self._path if self._path is not None else self._form_path())
            self._current = "file"
        elif segment.name == "Path" and segment.filename is None and self._path_from_form is None:
            self._path_from_form = bytearray()
            self._current = "Path"
        else:
            self._current = None

    def _form_path(self) -> str | None:
        if self._path_from_form is None:
            return None
        return self._path_from_form.decode("utf-8", "surrogateescape")

    def finish(self) -> UploadedForm:
        """The form once the body ended (400 when ``Path`` or ``file`` is missing); a refused
        form leaves nothing staged behind."""
        try:
            if not self._parser.closed:
                raise invalid_payload("Malformed multipart body: incomplete")
            path = self._path if self._path is not None else self._form_path()
            if not path:
                raise invalid_payload("Invalid file path")
            if self._staged is None or not self._filename:
                raise invalid_payload("Invalid uploaded file")
        except Exception:
            self.abort()
            raise
        return UploadedForm(path, self._filename, self._staged)

    def abort(self) -> None:
        """Drop what was staged (idempotent)."""
        if self._staged is not None:
            self._staged.abort()
