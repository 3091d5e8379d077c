"""The directory jail: nothing outside the root is read, listed, written, renamed or
removed, whatever the client path and whatever symlinks a container planted."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.fs.jail import MAX_NAME, AtomicFile, Entry, Jail, PathRefused, split_path
from tests.unit.tempdirs import temp_dir


class SplitPathTests(SynchronousTestCase):
    def test_root_forms(self) -> None:
        for path in ("", "/", ".", "//", "/./", "./."):
            self.assertEqual(split_path(path), (), path)

    def test_absolute_and_relative_are_both_below_the_root(self) -> None:
        self.assertEqual(split_path("/a/b"), ("a", "b"))
        self.assertEqual(split_path("a//b/./"), ("a", "b"))

    def test_dotdot_anywhere_is_refused(self) -> None:
        for path in ("..", "/..", "a/../b", "a/..", "../a", "a\\..\\b", "..\\x", "/a/b/.."):
            with self.assertRaises(PathRefused) as caught:
                split_path(path)
            self.assertEqual(caught.exception.reason, "dotdot", path)

    def test_dots_inside_names_are_names(self) -> None:
        self.assertEqual(split_path("a..b/...//..x"), ("a..b", "...", "..x"))

    def test_percent_encoding_is_not_decoded_again(self) -> None:
        # twisted.web decoded the query once; "%2e%2e" is then a plain name.
        self.assertEqual(split_path("%2e%2e/%2F"), ("%2e%2e", "%2F"))

    def test_nul_and_over_long_are_refused(self) -> None:
        with self.assertRaises(PathRefused) as caught:
            split_path("a\x00b")
        self.assertEqual(caught.exception.reason, "nul")
        with self.assertRaises(PathRefused) as caught:
            split_path("x" * (MAX_NAME + 1))
        self.assertEqual(caught.exception.reason, "too-long")
        with self.assertRaises(PathRefused):
            split_path("/".join(["abcdefgh"] * 600))
        self.assertEqual(split_path("é" * 127), ("é" * 127,))


class JailFixture:
    """A root with files inside and a secret outside, and planted symlinks."""

    def __init__(self, case: SynchronousTestCase) -> None:
        base = temp_dir(case)
        self.base = base
        self.outside = base / "outside"
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(b"secret")
        self.root = base / "root"
        self.root.mkdir()
        (self.root / "dir").mkdir()
        (self.root / "dir" / "file.txt").write_bytes(b"hello")
        (self.root / "empty").mkdir()
        os.symlink("/", self.root / "to-slash")
        os.symlink("../outside", self.root / "to-parent")
        os.symlink(str(self.outside / "secret"), self.root / "to-secret")
        os.symlink("../../outside", self.root / "dir" / "deep-link")
        self.jail = Jail.open(str(self.root))
        case.addCleanup(self.jail.close)

    def outside_unchanged(self) -> bool:
        return sorted(os.listdir(self.outside)) == ["secret"] and (self.outside / "secret").read_bytes() == b"secret"


class JailOperationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = JailFixture(self)
        self.jail = self.fx.jail

    def test_list_shows_symlinks_as_entries_not_directories(self) -> None:
        entries = {e.name: e for e in map(Entry._make, self.jail.list_dir(()))}
        self.assertEqual(sorted(entries), ["dir", "empty", "to-parent", "to-secret", "to-slash"])
        self.assertTrue(entries["dir"].is_dir)
        self.assertFalse(entries["to-slash"].is_dir)
        self.assertTrue(entries["to-slash"].is_symlink)

    def test_symlinks_are_never_followed(self) -> None:
        for path in ("to-slash", "to-slash/etc", "to-parent", "to-parent/secret", "dir/deep-link",
                     "dir/deep-link/secret"):
            with self.assertRaises(PathRefused, msg=path) as caught:
                self.jail.list_dir(split_path(path))
            self.assertEqual(caught.exception.reason, "symlink", path)
        for path in ("to-secret", "to-parent/secret", "to-slash/etc/hostname"):
            with self.assertRaises(PathRefused, msg=path):
                self.jail.open_file(split_path(path))

    def test_writes_through_symlinks_are_refused(self) -> None:
        with self.assertRaises(PathRefused):
            self.jail.stage(split_path("to-parent/new"))
        with self.assertRaises(PathRefused):
            self.jail.rename(split_path("dir/file.txt"), split_path("to-parent/stolen"))
        with self.assertRaises(PathRefused):
            self.jail.rename(split_path("to-parent/secret"), split_path("dir/stolen"))
        with self.assertRaises(PathRefused):
            self.jail.remove(split_path("to-parent/secret"))
        self.assertTrue(self.fx.outside_unchanged())

    def test_removing_a_symlink_removes_the_link_only(self) -> None:
        self.jail.remove(split_path("to-secret"))
        self.assertFalse(os.path.lexists(self.fx.root / "to-secret"))
        self.assertTrue(self.fx.outside_unchanged())

    def test_replacing_a_symlink_by_upload_replaces_the_link_only(self) -> None:
        staged = self.jail.stage(())
        staged.write(b"new")
        staged.sync()
        self.jail.store(staged, (), "to-secret")
        self.assertEqual((self.fx.root / "to-secret").read_bytes(), b"new")
        self.assertFalse((self.fx.root / "to-secret").is_symlink())
        self.assertTrue(self.fx.outside_unchanged())

    def test_read_a_file(self) -> None:
        opened = self.jail.open_file(("dir", "file.txt"))
        try:
            self.assertEqual(os.read(opened.fd, 100), b"hello")
            self.assertEqual(opened.size, 5)
        finally:
            os.close(opened.fd)

    def test_fifo_and_directories_are_not_files(self) -> None:
        os.mkfifo(self.fx.root / "fifo")
        for path in ("fifo", "dir"):
            with self.assertRaises(PathRefused):
                self.jail.open_file(split_path(path))

    def test_root_cannot_be_removed_or_renamed(self) -> None:
        with self.assertRaises(PathRefused):
            self.jail.remove(())
        with self.assertRaises(PathRefused):
            self.jail.rename((), ("x",))

    def test_remove_non_empty_directory_fails(self) -> None:
        with self.assertRaises(OSError):
            self.jail.remove(("dir",))
        self.jail.remove(("empty",))
        self.assertFalse((self.fx.root / "empty").exists())

    def test_rename_never_overwrites(self) -> None:
        (self.fx.root / "other").write_bytes(b"other")
        with self.assertRaises(FileExistsError):
            self.jail.rename(("other",), ("dir", "file.txt"))
        self.assertEqual((self.fx.root / "dir" / "file.txt").read_bytes(), b"hello")
        self.jail.rename(("other",), ("dir", "moved"))
        self.assertEqual((self.fx.root / "dir" / "moved").read_bytes(), b"other")

    def test_store_creates_directories_and_keeps_mode(self) -> None:
        (self.fx.root / "dir" / "file.txt").chmod(0o600)
        staged = self.jail.stage(None)
        staged.write(b"v2")
        staged.sync()
        self.jail.store(staged, ("dir",), "file.txt")
        self.assertEqual((self.fx.root / "dir" / "file.txt").read_bytes(), b"v2")
        self.assertEqual((self.fx.root / "dir" / "file.txt").stat().st_mode & 0o777, 0o600)
        staged = self.jail.stage(("a", "b"))
        staged.write(b"x")
        staged.sync()
        self.jail.store(staged, ("a", "b"), "c")
        self.assertEqual((self.fx.root / "a" / "b" / "c").read_bytes(), b"x")
        self.assertEqual([n for n in os.listdir(self.fx.root) if n.endswith(".upload")], [])

    def test_store_onto_a_directory_fails_and_cleans_up(self) -> None:
        staged = self.jail.stage(None)
        staged.write(b"x")
        with self.assertRaises(IsADirectoryError):
            self.jail.store(staged, (), "dir")
        self.assertEqual([n for n in os.listdir(self.fx.root) if n.endswith(".upload")], [])

    def test_aborted_upload_leaves_the_old_file(self) -> None:
        staged = self.jail.stage(("dir",))
        staged.write(b"partial")
        staged.abort()
        self.assertEqual((self.fx.root / "dir" / "file.txt").read_bytes(), b"hello")
        self.assertEqual(sorted(os.listdir(self.fx.root / "dir")), ["deep-link", "file.txt"])


#: Path pieces likely to hit escapes: parents, links, encodings, separators, NUL.
_PIECES = st.sampled_from(["..", ".", "", "to-slash", "to-parent", "to-secret", "dir", "deep-link", "etc",
                           "secret", "outside", "%2e%2e", "..\\", "\\..", "\x00", "root", "file.txt", "new"])
_PATHS = st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=8).map("/".join)


class EscapePropertyTests(SynchronousTestCase):
    """Whatever the input: the answer concerns something inside the root, or is refused."""

    @settings(max_examples=300, deadline=None)
    @given(path=_PATHS, absolute=st.booleans())
    def test_every_operation_stays_inside_or_refuses(self, path: str, absolute: bool) -> None:
        fx = JailFixture(self)
        inside_before = _snapshot(fx.root)
        path = ("/" if absolute else "") + path
        for operation in (
            lambda: fx.jail.list_dir(split_path(path)),
            lambda: _read_inside(fx, split_path(path)),
            lambda: _store(fx.jail, split_path(path)),
            lambda: fx.jail.rename(split_path(path), ("renamed",)),
            lambda: fx.jail.rename(("dir", "file.txt"), split_path(path)),
            lambda: fx.jail.remove(split_path(path)),
        ):
            try:
                operation()
            except (PathRefused, OSError):
                pass
        self.assertTrue(fx.outside_unchanged(), path)
        # Anything created lies under the root (no file appeared elsewhere in the base).
        self.assertEqual(sorted(os.listdir(fx.base)), ["outside", "root"])
        self.assertIsNotNone(inside_before)


def _read_inside(fx: JailFixture, components: tuple[str, ...]) -> None:
    opened = fx.jail.open_file(components)
    try:
        info = os.fstat(opened.fd)
    finally:
        os.close(opened.fd)
    inside = {(p.lstat().st_dev, p.lstat().st_ino) for p in fx.root.rglob("*")}
    assert (info.st_dev, info.st_ino) in inside, components


def _store(jail: Jail, components: tuple[str, ...]) -> None:
    staged = jail.stage(components[:-1] if components else None)
    staged.write(b"payload")
    staged.sync()
    jail.store(staged, components[:-1], components[-1] if components else "")


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class SwapRaceTests(SynchronousTestCase):
    """A directory swapped for a symlink to / while the jail walks: never followed."""

    def test_swapping_directory_and_symlink_never_escapes(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="pa-race-"))
        self.addCleanup(shutil.rmtree, base, True)
        root = base / "root"
        (root / "d").mkdir(parents=True)
        (root / "d" / "hostname").write_bytes(b"inside")
        os.symlink("/etc", root / "link")
        stop = threading.Event()

        def swap() -> None:
            while not stop.is_set():
                try:
                    os.rename(root / "d", root / "tmp")
                    os.rename(root / "link", root / "d")
                    os.rename(root / "d", root / "link")
                    os.rename(root / "tmp", root / "d")
                except OSError:
                    pass

        thread = threading.Thread(target=swap)
        thread.start()
        seen = set()
        try:
            with Jail.open(str(root)) as jail:
                for _ in range(3000):
                    try:
                        opened = jail.open_file(("d", "hostname"))
                    except (PathRefused, OSError):
                        continue
                    try:
                        seen.add(os.read(opened.fd, 100))
                    finally:
                        os.close(opened.fd)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(seen - {b"inside"}, set())


class AtomicFileTests(SynchronousTestCase):
    def test_temporary_name_is_hidden_and_unique(self) -> None:
        root = temp_dir(self)
        first = AtomicFile(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
        second = AtomicFile(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
        self.assertNotEqual(first.temp_name, second.temp_name)
        self.assertTrue(first.temp_name.startswith("."))
        first.abort()
        second.abort()
        self.assertEqual(os.listdir(root), [])
