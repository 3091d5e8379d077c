"""The browse endpoints in memory: the agent root in front, a fake Docker answering
``GET /volumes/{name}`` with a temporary directory as the mount point."""
from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import given, settings, strategies as st
from portainer_agent.docker.testing import MemoryDocker
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from portainer_agent.errors import AgentError
from portainer_agent.fs.pool import run_inline
from portainer_agent.fs.upload import UploadForm
from portainer_agent.fs.volumes import VolumeLocator, VolumeRootMap, check_volume_id
from portainer_agent.http.browse import BrowseService, browse_endpoints
from portainer_agent.toolbox.filesend import ByteRange, RangeNotSatisfiable, content_type, parse_range
from tests.unit.memory import Memory, raw_request
from tests.unit.tempdirs import temp_dir


class FakeVolumes(Resource):
    isLeaf = True

    def __init__(self, volumes: dict[str, str]) -> None:
        super().__init__()
        self.volumes = volumes
        self.asked: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.asked.append(request.uri)
        name = request.path.decode().removeprefix("/volumes/")
        request.setHeader(b"content-type", b"application/json")
        if name not in self.volumes:
            request.setResponseCode(404)
            return json.dumps({"message": f"get {name}: no such volume"}).encode()
        return json.dumps({"Name": name, "Driver": "local", "Mountpoint": self.volumes[name]}).encode()


def multipart_body(fields: list[tuple[str, str | None, bytes]], boundary: str = "XyZbound") -> tuple[bytes, str]:
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class BrowseHarness:
    def __init__(self, case: SynchronousTestCase, host_management: bool = False) -> None:
        base = temp_dir(case)
        self.docker_root = base / "docker"
        self.data = self.docker_root / "volumes" / "vol1" / "_data"
        self.data.mkdir(parents=True)
        (self.data / "hello.txt").write_bytes(b"hello world")
        (self.data / "sub").mkdir()
        self.host = base / "host"
        (self.host / "etc").mkdir(parents=True)
        (self.host / "etc" / "hostname").write_bytes(b"node\n")
        self.outside = base / "outside"
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(b"secret")
        self.volumes = FakeVolumes({"vol1": str(self.data)})
        self.docker = MemoryDocker(self.volumes)
        self.memory = Memory()
        case.addCleanup(self.memory.stop)
        locator = VolumeLocator(self.docker, VolumeRootMap.for_docker_root(str(self.docker_root), None))
        self.service = BrowseService(locator, host_management, self.host, run_inline)
        self.memory.root.endpoints.update(browse_endpoints(self.service))
        self.case = case

    def request(self, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        client = self.memory.client
        response = self.settle(client.request(method, "http://agent" + url, **kwargs))
        return response, self.settle(response.content())

    def settle(self, d: Any) -> Any:
        """Pump both in-memory connections until ``d`` has a result."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(500):
            if results:
                break
            self.docker.flush()
            self.memory.pump(1)
        self.case.assertTrue(results, "no answer")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def error(self, method: str, url: str, status: int, **kwargs: Any) -> dict[str, str]:
        response, body = self.request(method, url, **kwargs)
        self.case.assertEqual(response.code, status, body)
        document: dict[str, str] = json.loads(body)
        return document


class ListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = BrowseHarness(self)

    def test_list_a_volume(self) -> None:
        os.symlink("/", self.h.data / "link")
        response, body = self.h.request("GET", "/browse/ls?volumeID=vol1&path=/")
        self.assertEqual(response.code, 200)
        items = json.loads(body)
        self.assertEqual([i["Name"] for i in items], ["hello.txt", "link", "sub"])
        self.assertEqual(items[0]["Size"], 11)
        self.assertEqual([i["Dir"] for i in items], [False, False, True])
        self.assertIsInstance(items[0]["ModTime"], int)

    def test_v2_and_legacy_v1_forms(self) -> None:
        for url in ("/v2/browse/ls?volumeID=vol1&path=/", "/v1/browse/vol1/ls?path=/", "/v1/browse/vol1/ls"):
            response, body = self.h.request("GET", url)
            self.assertEqual(response.code, 200, url)
            self.assertEqual(len(json.loads(body)), 2, url)

    def test_missing_path_is_400(self) -> None:
        document = self.h.error("GET", "/browse/ls?volumeID=vol1", 400)
        self.assertEqual(document, {"message": "Invalid query parameter: path", "details": "Missing query parameter"})

    def test_dotdot_is_refused_with_the_original_messages(self) -> None:
        document = self.h.error("GET", "/browse/ls?volumeID=vol1&path=/../..", 400)
        self.assertEqual(document["message"], "Invalid volume")
        self.assertIn("'..'", document["details"])
        self.assertEqual(self.h.error("GET", "/v1/browse/vol1/ls?path=..", 400)["message"],
                         "Invalid query parameter: path")

    def test_symlink_to_root_is_not_followed(self) -> None:
        os.symlink("/", self.h.data / "link")
        os.symlink(str(self.h.outside), self.h.data / "out")
        for path in ("link", "link/etc", "out", "out/secret"):
            document = self.h.error("GET", f"/browse/ls?volumeID=vol1&path={path}", 400)
            self.assertIn("symbolic link", document["details"], path)
            self.h.error("GET", f"/browse/get?volumeID=vol1&path={path}", 400)

    def test_bad_volume_ids(self) -> None:
        for volume in ("..", "a%2Fb", "%2E%2E", "nope", "a%00b"):
            response, body = self.h.request("GET", f"/browse/ls?volumeID={volume}&path=/")
            self.assertIn(response.code, (400, 404), volume)
            self.assertEqual(json.loads(body)["message"], "Invalid volume", volume)
        # Only the existing one and the unknown one reached Docker (no traversal attempt did).
        self.assertEqual(self.h.volumes.asked, [b"/volumes/nope"])

    def test_invalid_utf8_volume_id_is_400(self) -> None:
        wire = self.h.memory.raw(raw_request(b"GET", b"/browse/ls?volumeID=a%FFb&path=/"))
        self.assertTrue(wire.status().startswith(b"HTTP/1.1 400"), wire.data)
        self.assertEqual(json.loads(wire.body())["message"], "Invalid volume")

    def test_legacy_bad_volume_in_path(self) -> None:
        response, _ = self.h.request("GET", "/v1/browse/%2E%2E/ls")
        self.assertEqual(response.code, 400)

    def test_not_found_is_404(self) -> None:
        document = self.h.error("GET", "/browse/ls?volumeID=vol1&path=/nope", 404)
        self.assertEqual(document["message"], "Unable to list files inside specified directory")
        self.assertNotIn(str(self.h.data), document["details"])

    def test_wrong_method_is_405(self) -> None:
        response, _ = self.h.request("POST", "/browse/ls?volumeID=vol1&path=/")
        self.assertEqual(response.code, 405)


class HostManagementTests(SynchronousTestCase):
    def test_disabled_is_503(self) -> None:
        h = BrowseHarness(self)
        self.assertEqual(h.error("GET", "/browse/ls?path=/", 503),
                         {"message": "Host management capability disabled", "details": "This agent feature is not enabled"})

    def test_enabled_is_jailed_under_the_host_root(self) -> None:
        h = BrowseHarness(self, host_management=True)
        response, body = h.request("GET", "/browse/ls?path=/")
        self.assertEqual([i["Name"] for i in json.loads(body)], ["etc"])
        response, body = h.request("GET", "/browse/get?path=/etc/hostname")
        self.assertEqual(body, b"node\n")
        self.assertEqual(h.error("GET", "/browse/get?path=/../outside/secret", 400)["message"], "Invalid path")


class GetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = BrowseHarness(self)

    def test_whole_file_with_headers(self) -> None:
        response, body = self.h.request("GET", "/browse/get?volumeID=vol1&path=hello.txt")
        self.assertEqual((response.code, body), (200, b"hello world"))
        headers = response.headers
        self.assertEqual(response.length, 11)  # the client keeps Content-Length there
        self.assertEqual(headers.getRawHeaders(b"accept-ranges"), [b"bytes"])
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIsNotNone(headers.getRawHeaders(b"last-modified"))

    def test_range(self) -> None:
        response, body = self.h.request("GET", "/browse/get?volumeID=vol1&path=hello.txt",
                                        headers={b"range": [b"bytes=6-"]})
        self.assertEqual((response.code, body), (206, b"world"))
        self.assertEqual(response.headers.getRawHeaders(b"content-range"), [b"bytes 6-10/11"])
        response, body = self.h.request("GET", "/browse/get?volumeID=vol1&path=hello.txt",
                                        headers={b"range": [b"bytes=20-"]})
        self.assertEqual(response.code, 416)
        self.assertEqual(response.headers.getRawHeaders(b"content-range"), [b"bytes */11"])

    def test_directory_is_not_a_file(self) -> None:
        self.h.error("GET", "/browse/get?volumeID=vol1&path=sub", 400)


class DeleteRenameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = BrowseHarness(self)

    def test_delete_file_and_empty_dir(self) -> None:
        response, _ = self.h.request("DELETE", "/browse/delete?volumeID=vol1&path=hello.txt")
        self.assertEqual(response.code, 204)
        self.assertFalse((self.h.data / "hello.txt").exists())
        response, _ = self.h.request("DELETE", "/v1/browse/vol1/delete?path=sub")
        self.assertEqual(response.code, 204)

    def test_delete_non_empty_dir_is_409(self) -> None:
        (self.h.data / "sub" / "x").write_bytes(b"x")
        document = self.h.error("DELETE", "/browse/delete?volumeID=vol1&path=sub", 409)
        self.assertEqual(document["message"], "Unable to remove file")
        self.assertIn("not empty", document["details"])

    def test_delete_the_root_is_refused(self) -> None:
        self.h.error("DELETE", "/v1/browse/vol1/delete", 400)
        self.assertTrue(self.h.data.is_dir())

    def test_rename(self) -> None:
        body = json.dumps({"CurrentFilePath": "/hello.txt", "NewFilePath": "/sub/renamed.txt"}).encode()
        response, _ = self.h.request("PUT", "/browse/rename?volumeID=vol1", data=body)
        self.assertEqual(response.code, 204)
        self.assertEqual((self.h.data / "sub" / "renamed.txt").read_bytes(), b"hello world")

    def test_rename_keys_are_case_insensitive(self) -> None:
        body = json.dumps({"currentfilepath": "hello.txt", "NEWFILEPATH": "x.txt"}).encode()
        response, _ = self.h.request("PUT", "/v1/browse/vol1/rename", data=body)
        self.assertEqual(response.code, 204)

    def test_rename_over_existing_is_409(self) -> None:
        (self.h.data / "other").write_bytes(b"other")
        body = json.dumps({"CurrentFilePath": "other", "NewFilePath": "hello.txt"}).encode()
        self.h.error("PUT", "/browse/rename?volumeID=vol1", 409, data=body)
        self.assertEqual((self.h.data / "hello.txt").read_bytes(), b"hello world")

    def test_rename_payload_errors(self) -> None:
        for body, details in ((b"{", None), (b'{"CurrentFilePath": "a"}', "New file path is invalid"),
                              (b'{"NewFilePath": "a"}', "Current file path is invalid")):
            document = self.h.error("PUT", "/browse/rename?volumeID=vol1", 400, data=body)
            self.assertEqual(document["message"], "Invalid request payload")
            if details:
                self.assertEqual(document["details"], details)

    def test_rename_out_of_the_volume_is_refused(self) -> None:
        body = json.dumps({"CurrentFilePath": "hello.txt", "NewFilePath": "../../x"}).encode()
        self.assertEqual(self.h.error("PUT", "/browse/rename?volumeID=vol1", 400, data=body)["message"], "Invalid volume")


class PutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = BrowseHarness(self)

    def put(self, fields: list[tuple[str, str | None, bytes]], url: str = "/browse/put?volumeID=vol1") -> tuple[Any, bytes]:
        body, ctype = multipart_body(fields)
        return self.h.request("POST", url, data=body, headers={b"content-type": [ctype.encode()]})

    def test_file_before_path_as_portainer_sends_it(self) -> None:
        response, body = self.put([("file", "C:\\Users\\me\\report.bin", b"\x00\x01data"), ("Path", None, b"/new/dir")])
        self.assertEqual(response.code, 204, body)
        self.assertEqual((self.h.data / "new" / "dir" / "report.bin").read_bytes(), b"\x00\x01data")
        self.assertEqual([n for n in os.listdir(self.h.data) if n.endswith(".upload")], [])

    def test_path_before_file_and_overwrite(self) -> None:
        response, body = self.put([("Path", None, b"/"), ("file", "hello.txt", b"v2")])
        self.assertEqual(response.code, 204, body)
        self.assertEqual((self.h.data / "hello.txt").read_bytes(), b"v2")

    def test_legacy_put(self) -> None:
        response, _ = self.put([("Path", None, b"sub"), ("file", "a", b"A")], url="/v1/browse/vol1/put")
        self.assertEqual(response.code, 204)
        self.assertEqual((self.h.data / "sub" / "a").read_bytes(), b"A")

    def test_missing_parts(self) -> None:
        response, body = self.put([("file", "a", b"A")])
        self.assertEqual((response.code, json.loads(body)["details"]), (400, "Invalid file path"))
        response, body = self.put([("Path", None, b"/")])
        self.assertEqual((response.code, json.loads(body)["details"]), (400, "Invalid uploaded file"))
        self.assertEqual([n for n in os.listdir(self.h.data) if n.endswith(".upload")], [])

    def test_truncated_body_leaves_the_old_file(self) -> None:
        body, ctype = multipart_body([("Path", None, b"/"), ("file", "hello.txt", b"new content" * 1000)])
        response, raw = self.h.request("POST", "/browse/put?volumeID=vol1", data=body[: len(body) // 2],
                                       headers={b"content-type": [ctype.encode()]})
        self.assertEqual(response.code, 400, raw)
        self.assertEqual((self.h.data / "hello.txt").read_bytes(), b"hello world")
        self.assertEqual(sorted(os.listdir(self.h.data)), ["hello.txt", "sub"])

    def test_escapes_are_refused(self) -> None:
        os.symlink(str(self.h.outside), self.h.data / "out")
        for fields in ([("Path", None, b"/out"), ("file", "secret", b"pwned")],
                       [("file", "secret", b"pwned"), ("Path", None, b"../../../outside")],
                       [("Path", None, b"/"), ("file", "..", b"pwned")],
                       [("Path", None, b"/"), ("file", "../../outside/secret", b"pwned")]):
            self.put(fields)
        self.assertEqual((self.h.outside / "secret").read_bytes(), b"secret")
        self.assertEqual(os.listdir(self.h.outside), ["secret"])
        # The basename of "../../outside/secret" is a plain name inside the volume.
        self.assertEqual((self.h.data / "secret").read_bytes(), b"pwned")

    def test_not_multipart_is_400(self) -> None:
        response, body = self.h.request("POST", "/browse/put?volumeID=vol1", data=b"x")
        self.assertEqual(response.code, 400)


class UploadFormTests(SynchronousTestCase):
    def test_chunk_boundaries_do_not_matter(self) -> None:
        root = temp_dir(self)
        payload = bytes(range(256)) * 300
        body, ctype = multipart_body([("file", "f", payload), ("Path", None, b"/d")], boundary="b0undary")
        from portainer_agent.fs.jail import Jail
        for size in (1, 7, 4096):
            with Jail.open(str(root)) as jail:
                form = UploadForm("b0undary", lambda d: jail.stage(None), None)
                for i in range(0, len(body), size):
                    form.feed(body[i:i + size])
                form.feed(b"")
                uploaded = form.finish()
                self.assertEqual(uploaded.path, "/d")
                jail.store(uploaded.staged, ("d",), uploaded.filename)
            self.assertEqual((root / "d" / "f").read_bytes(), payload)


class UploadFormPropertyTests(SynchronousTestCase):
    @settings(max_examples=int(os.environ.get('PA_HYPOTHESIS_EXAMPLES', '60')), deadline=None)
    @given(payload=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 400), max_size=30),
           path_first=st.booleans(),
           filename=st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters='"\\'),
                            min_size=1, max_size=20))
    def test_any_split_stores_exactly_the_payload_under_a_plain_name(
            self, payload: bytes, cuts: list[int], path_first: bool, filename: str) -> None:
        from portainer_agent.fs.jail import Jail, PathRefused
        from portainer_agent.fs.upload import upload_basename

        root = temp_dir(self)
        fields: list[tuple[str, str | None, bytes]] = [("file", filename, payload), ("Path", None, b"/d")]
        body, _ = multipart_body(fields[::-1] if path_first else fields, boundary="pr0perty")
        with Jail.open(str(root)) as jail:
            form = UploadForm("pr0perty", lambda d: jail.stage(None), None)
            try:
                position = 0
                for cut in cuts:
                    form.feed(body[position:position + cut])
                    position += cut
                form.feed(body[position:])
                form.feed(b"")
                uploaded = form.finish()
                jail.store(uploaded.staged, ("d",), uploaded.filename)
            except (AgentError, PathRefused):
                # Refused only when the name is no plain name; nothing left behind.
                self.assertIn(upload_basename(filename), ("", ".", ".."))
                self.assertEqual([n for n in os.listdir(root) if n != "d"], [])
                return
            finally:
                form.abort()
        stored = os.listdir(root / "d")
        self.assertEqual(stored, [upload_basename(filename)])
        self.assertEqual((root / "d" / stored[0]).read_bytes(), payload)
        self.assertEqual(os.listdir(root), ["d"])


class PureHelperTests(SynchronousTestCase):
    def test_parse_range(self) -> None:
        self.assertIsNone(parse_range(None, 10))
        self.assertEqual(parse_range(b"bytes=0-3", 10), ByteRange(0, 3))
        self.assertEqual(parse_range(b"bytes=5-", 10), ByteRange(5, 9))
        self.assertEqual(parse_range(b"bytes=-4", 10), ByteRange(6, 9))
        self.assertEqual(parse_range(b"bytes=-40", 10), ByteRange(0, 9))
        self.assertEqual(parse_range(b"bytes=8-100", 10), ByteRange(8, 9))
        self.assertIsNone(parse_range(b"bytes=0-1,3-4", 10))
        self.assertIsNone(parse_range(b"items=0-1", 10))
        self.assertRaises(RangeNotSatisfiable, parse_range, b"bytes=10-", 10)

    def test_content_type(self) -> None:
        self.assertEqual(content_type("a.json", b"{}"), b"application/json")
        self.assertEqual(content_type("noext", b"plain words"), b"text/plain; charset=utf-8")
        self.assertEqual(content_type("noext", b"\x00\x01\x02"), b"application/octet-stream")

    def test_volume_ids(self) -> None:
        self.assertEqual(check_volume_id("my_vol-1.0"), "my_vol-1.0")
        for bad in ("", ".", "..", "a/b", "a\\b", "a\x00b", "x" * 300, "a\udcffb"):
            self.assertRaises(Exception, check_volume_id, bad)

    def test_volume_root_mapping(self) -> None:
        mapping = VolumeRootMap.for_docker_root("/var/lib/docker", "/mnt/volumes/")
        self.assertEqual(mapping.local_path("/var/lib/docker/volumes/v/_data"), "/mnt/volumes/v/_data")
        self.assertEqual(mapping.local_path("/elsewhere/_data"), "/elsewhere/_data")
        self.assertEqual(mapping.local_path("/var/lib/docker/volumesX/v"), "/var/lib/docker/volumesX/v")
        same = VolumeRootMap.for_docker_root("/srv/docker", None)
        self.assertEqual(same.local_path("/srv/docker/volumes/v/_data"), "/srv/docker/volumes/v/_data")


class OrderTests(SynchronousTestCase):
    def test_host_management_is_checked_before_parameters(self) -> None:
        h = BrowseHarness(self)
        self.assertEqual(h.error("GET", "/browse/ls", 503)["message"], "Host management capability disabled")
        self.assertEqual(h.error("PUT", "/browse/rename", 503, data=b"{")["message"], "Host management capability disabled")


class ConditionalAndHeadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = BrowseHarness(self)

    def test_if_modified_since_is_304(self) -> None:
        response, _ = self.h.request("GET", "/browse/get?volumeID=vol1&path=hello.txt")
        modified = response.headers.getRawHeaders(b"last-modified")[0]
        response, body = self.h.request("GET", "/browse/get?volumeID=vol1&path=hello.txt",
                                        headers={b"if-modified-since": [modified]})
        self.assertEqual((response.code, body), (304, b""))

    def test_head_has_the_length_and_no_body(self) -> None:
        response, body = self.h.request("HEAD", "/browse/get?volumeID=vol1&path=hello.txt")
        self.assertEqual((response.code, body), (200, b""))


class ProducerTests(SynchronousTestCase):
    def test_a_file_that_shrank_cuts_the_connection(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from portainer_agent.toolbox.filesend import RangeProducer, file_reader

        root = temp_dir(self)
        (root / "f").write_bytes(b"x" * 10)
        read, close = file_reader(os.open(root / "f", os.O_RDONLY), run_inline)
        request = DummyRequest([b""])
        aborted: list[bool] = []
        import portainer_agent.toolbox.filesend as filesend
        self.patch(filesend, "abort_client", lambda r: aborted.append(True))
        RangeProducer(request, read, 0, 20, close, chunk=4).start()
        self.assertEqual(b"".join(request.written), b"x" * 10)
        self.assertEqual(aborted, [True])
        self.assertEqual(request.finished, 0)

    def test_a_file_that_grew_is_sent_up_to_the_promised_length(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from portainer_agent.toolbox.filesend import RangeProducer, file_reader

        root = temp_dir(self)
        (root / "f").write_bytes(b"0123456789")
        read, close = file_reader(os.open(root / "f", os.O_RDONLY), run_inline)
        request = DummyRequest([b""])
        request._disconnected = False
        RangeProducer(request, read, 2, 5, close, chunk=2).start()
        self.assertEqual(b"".join(request.written), b"23456")
        self.assertEqual(request.finished, 1)
