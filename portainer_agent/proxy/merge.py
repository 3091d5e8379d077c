"""Merging per-node Docker lists into one answer (pure: bytes in, bytes out).

Each node's JSON is decoded *shallowly* with msgspec: a list of objects whose values stay
:class:`msgspec.Raw` (the exact bytes Docker sent). Only the top-level keys are parsed, so
the merge is lossless by construction (integers of any size, floats, escapes and key order
pass through untouched) and cheap: nothing below the first level is decoded or re-encoded.
(Measured in ``bench/merge.py``: msgspec-shallow vs the standard library's full
decode/encode; the original agent went through float64 and re-sorted or shuffled keys.)

Every item gets ``"Portainer": {"Agent": {"NodeName": <node>}}``, merged into an existing
``Portainer`` object rather than replacing it (Portainer's server adds its own keys there).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import attrs
import msgspec

from portainer_agent.listcache.store import BoundedStore

_Object = dict[str, msgspec.Raw]
_decode_list = msgspec.json.Decoder(list[_Object]).decode
_decode_object = msgspec.json.Decoder(_Object).decode
_decode_any = msgspec.json.Decoder().decode
_decode_warnings = msgspec.json.Decoder(list[str] | None).decode
_encode = msgspec.json.Encoder().encode

#: The path whose answer is ``{"Volumes": [...], "Warnings": [...]}`` rather than an array.
VOLUMES_PATH = b"/volumes"


class InvalidNodeAnswer(ValueError):
    """A node answered something that is not the Docker list it was asked for."""


@attrs.frozen
class NodeAnswer:
    """A node's successful (2xx) answer body."""

    node: str
    body: bytes
    #: Its entity tag (a hash of ``body``, from the list cache), if it has one.
    tag: bytes | None = None


@attrs.frozen
class NodeFailure:
    """A node that could not answer, and why (for the header, the log and ``Warnings``)."""

    node: str
    reason: str


def docker_error_message(body: bytes) -> str | None:
    """The ``message`` of a Docker-style JSON error body, if it is one."""
    try:
        value = _decode_any(body)
    except msgspec.DecodeError:
        return None
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return value["message"]
    return None


def _tag(item: _Object, node_tag: msgspec.Raw, node: str) -> _Object:
    existing = item.get("Portainer")
    if existing is None:
        item["Portainer"] = node_tag
        return item
    try:
        portainer = _decode_any(existing)
    except msgspec.DecodeError:  # cannot happen for Raw cut by the decoder; be safe
        portainer = None
    if not isinstance(portainer, dict):
        item["Portainer"] = node_tag
        return item
    agent = portainer.get("Agent")
    agent = dict(agent) if isinstance(agent, dict) else {}
    agent["NodeName"] = node
    portainer["Agent"] = agent
    item["Portainer"] = msgspec.Raw(_encode(portainer))
    return item


def _node_tag(node: str) -> msgspec.Raw:
    return msgspec.Raw(b'{"Agent":{"NodeName":' + _encode(node) + b"}}")


def tagged_items(body: bytes, node: str) -> list[_Object]:
    """The items of one node's JSON array, each tagged with ``node``."""
    try:
        items = _decode_list(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise InvalidNodeAnswer(f"invalid response from Docker: {error}") from None
    tag = _node_tag(node)
    return [_tag(item, tag, node) for item in items]


def tagged_volumes(body: bytes, node: str) -> tuple[list[_Object], list[str]]:
    """The volumes and warnings of one node's ``/volumes`` answer, volumes tagged."""
    try:
        top = _decode_object(body)
        volumes_raw = top.get("Volumes")
        volumes = _decode_list(volumes_raw) if volumes_raw is not None and _present(volumes_raw) else []
        warnings_raw = top.get("Warnings")
        warnings = (_decode_warnings(warnings_raw) or []) if warnings_raw is not None and _present(warnings_raw) \
            else []
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise InvalidNodeAnswer(f"invalid response from Docker: {error}") from None
    tag = _node_tag(node)
    return [_tag(item, tag, node) for item in volumes], warnings


def _present(raw: msgspec.Raw) -> bool:
    return bytes(raw) != b"null"


def failure_warning(failure: NodeFailure) -> str:
    return f"node {failure.node} is unreachable, its volumes are missing: {failure.reason}"


def merge_answers(path: bytes, answers: Sequence[NodeAnswer], failures: Sequence[NodeFailure] = (),
                  notes: Sequence[str] = ()) -> tuple[bytes, list[NodeFailure]]:
    """One Docker-format body from the nodes' answers, in node-name order.

    Returns the body and the failures, which grow by the nodes whose answer could not be
    read (they are reported like unreachable nodes rather than failing the whole list).
    ``notes`` are extra ``/volumes`` warnings (the node list being unknown, say).
    """
    failures = list(failures)
    ordered = sorted(answers, key=lambda a: a.node)
    if path == VOLUMES_PATH:
        volumes: list[_Object] = []
        warnings: list[str] = []
        for answer in ordered:
            try:
                node_volumes, node_warnings = tagged_volumes(answer.body, answer.node)
            except InvalidNodeAnswer as error:
                failures.append(NodeFailure(answer.node, str(error)))
                continue
            volumes.extend(node_volumes)
            warnings.extend(node_warnings)
        warnings.extend(failure_warning(f) for f in sorted(failures, key=lambda f: f.node))
        warnings.extend(notes)
        body = _encode({"Volumes": volumes, "Warnings": warnings or None})
        return body + b"\n", failures
    items: list[_Object] = []
    for answer in ordered:
        try:
            items.extend(tagged_items(answer.body, answer.node))
        except InvalidNodeAnswer as error:
            failures.append(NodeFailure(answer.node, str(error)))
    return _encode(items) + b"\n", failures


@attrs.frozen
class _Merged:
    tags: tuple[tuple[str, bytes | None], ...]
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


class MergeMemo:
    """The last merged answer of each request URI, and what it was merged from.

    When every node's answer carries an entity tag (a hash of its bytes: the list cache's),
    the same tags mean the same bytes in, so the same merged bytes out: the merge is skipped.
    Only the latest answer of a URI is kept (an older one will not be asked for again: its
    tags are gone). Answers with failures, notes or an untagged node are merged every time."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._kept: BoundedStore[tuple[bytes, bytes], _Merged] = BoundedStore(max_entries, max_bytes)

    def merge(self, path: bytes, uri: bytes, answers: Sequence[NodeAnswer], failures: Sequence[NodeFailure] = (),
              notes: Sequence[str] = ()) -> tuple[bytes, list[NodeFailure]]:
        if failures or notes or any(answer.tag is None for answer in answers):
            return merge_answers(path, answers, failures, notes)
        tags = tuple(sorted((answer.node, answer.tag) for answer in answers))
        kept = self._kept.get((path, uri))
        if kept is not None and kept.tags == tags:
            return kept.body, []
        body, failed = merge_answers(path, answers)
        if not failed:
            self._kept.put((path, uri), _Merged(tags, body))
        return body, failed


def unreachable_header(failures: Iterable[NodeFailure]) -> bytes:
    """``node2, node3``: the value of ``X-PortainerAgent-Unreachable-Nodes``."""
    return ", ".join(sorted({f.node for f in failures})).encode()


__all__: list[Any] = ["NodeAnswer", "NodeFailure", "MergeMemo", "InvalidNodeAnswer", "merge_answers", "unreachable_header",
                      "docker_error_message", "tagged_items", "tagged_volumes"]
