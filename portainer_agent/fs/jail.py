"""A directory jail: client paths resolved beneath one open directory, never outside it.

Why not string checks: a container can write into its volume, so it can plant
``_data/link -> /`` (or swap a directory for a symlink between a check and a use).
Every path is therefore walked one component at a time from an open directory
descriptor with ``openat(..., O_NOFOLLOW)``: a symlink at any component is refused by
the kernel at the moment of use, whatever it points at, and ``..`` is refused before
any I/O. Leaves are handled with ``*at`` calls on the parent descriptor (``lstat``,
``unlink``, ``rename``), which never follow a symlink in the last component either.

Percent-encoding: the query string is decoded once by twisted.web; this module never
decodes again, so ``%2e%2e`` is an ordinary file name here.

Everything here is synchronous and reactor-free; callers own the descriptors they get.
"""
from __future__ import annotations

import ctypes
import errno
import operator
import os
import secrets
import stat
from typing import Iterator, NamedTuple

import attrs

#: Longest file name component (Linux NAME_MAX) and whole path (PATH_MAX), in bytes.
MAX_NAME = 255
MAX_PATH = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK so that opening a FIFO planted in a volume cannot block the agent.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_RENAME_NOREPLACE = 1
#: Entries sorted per run before a whole listing is sorted: see :func:`sorted_by_name`.
SORT_RUN = 8192


class PathRefused(ValueError):
    """The client path is refused before (or instead of) any access.

    ``reason`` is one of ``dotdot``, ``nul``, ``too-long``, ``symlink``, ``root``,
    ``name``, ``not-dir``, ``not-file``; the message is safe to show to the client
    (no absolute paths)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_path(path: str) -> tuple[str, ...]:
    """Pure: a client path -> its components, relative to the jail's root.

    ``""``, ``"/"`` and ``"."`` are the root; a leading ``/`` means the root too (as
    the original joined every path under the volume's ``_data``). ``..`` anywhere is
    refused (also between backslashes, as the original did), as are NUL bytes and
    over-long names or paths."""
    if "\x00" in path:
        raise PathRefused("nul", "Invalid path: it contains a NUL byte")
    if len(os.fsencode(path)) > MAX_PATH:
        raise PathRefused("too-long", f"Invalid path: longer than {MAX_PATH} bytes")
    components = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if ".." in part.split("\\"):
            raise PathRefused("dotdot", "Invalid path. Ensure that the path do not contain '..' elements")
        check_name(part)
        components.append(part)
    return tuple(components)


def check_name(name: str) -> str:
    """Pure: ``name`` is usable as one directory entry (no ``/``, NUL, ``.``/``..``, not too long)."""
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise PathRefused("name", f"Invalid file name {name!r}")
    if len(os.fsencode(name)) > MAX_NAME:
        raise PathRefused("too-long", f"Invalid path: a name is longer than {MAX_NAME} bytes")
    return name


def display(components: tuple[str, ...]) -> str:
    """The client-visible form of a path (relative to the jail's root)."""
    return "/" + "/".join(components)


class Entry(NamedTuple):
    """One directory entry as seen by ``lstat`` (a symlink is shown, never followed).

    :meth:`Jail.list_dir` returns *plain* tuples in this order (``Entry._make(row)``
    names the fields): the garbage collector stops tracking a plain tuple of strings and
    numbers, so the 100,000 rows of a big listing do not trigger full collections, each of
    which holds the GIL (and the reactor thread) for tens of milliseconds; records
    (attrs, named tuples) stay tracked and did."""

    name: str
    size: int
    is_dir: bool
    mtime: int
    is_symlink: bool = False


#: A row of :meth:`Jail.list_dir`: the fields of :class:`Entry`, as a plain tuple.
Row = tuple[str, int, bool, int, bool]


@attrs.frozen
class OpenedFile:
    """A regular file opened for reading; the caller closes ``fd``."""

    fd: int
    size: int
    mtime: float
    name: str


class Jail:
    """An open directory and the operations confined beneath it."""

    def __init__(self, root_fd: int) -> None:
        self._root_fd = root_fd

    @classmethod
    def open(cls, root: str) -> "Jail":
        """Open the root (configured or from Docker, so trusted); its last component
        must not be a symlink."""
        return cls(os.open(root, _DIR_FLAGS))

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> "Jail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking --------------------------------------------------------------------

    def open_dir(self, components: tuple[str, ...], create: bool = False) -> int:
        """Descriptor of the directory at ``components`` (created, mode 0755, when
        ``create``); a symlink or non-directory on the way is refused."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root_fd)
        try:
            for index, name in enumerate(components):
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    child = self._open_child_dir(fd, name, components[: index + 1])
                except (NotADirectoryError, OSError) as error:
                    if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    _refuse_non_directory(fd, name, components[: index + 1])
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_child_dir(fd: int, name: str, where: tuple[str, ...]) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            _refuse_non_directory(fd, name, where)
            raise  # unreachable: _refuse_non_directory raises

    def parent_of(self, components: tuple[str, ...], create: bool = False) -> tuple[int, str]:
        """(descriptor of the parent directory, leaf name); the root has no parent."""
        if not components:
            raise PathRefused("root", "Invalid path: this operation needs a path below the root")
        return self.open_dir(components[:-1], create=create), components[-1]

    # -- operations -----------------------------------------------------------------

    def list_dir(self, components: tuple[str, ...]) -> list[Row]:
        """Entries of a directory sorted by name, from ``lstat``, as plain tuples (see
        :class:`Entry`)."""
        fd = self.open_dir(components)
        try:
            return sorted_by_name(list(_scan(fd)))
        finally:
            os.close(fd)

    def open_file(self, components: tuple[str, ...]) -> OpenedFile:
        """A regular file opened for reading (a symlink, FIFO, device or directory is refused)."""
        parent, name = self.parent_of(components)
        try:
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=parent)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise PathRefused("symlink", f"{display(components)} is a symbolic link; links are not followed")
                raise
        finally:
            os.close(parent)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = "not-dir" if stat.S_ISDIR(info.st_mode) else "not-file"
                raise PathRefused(kind, f"{display(components)} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OpenedFile(fd=fd, size=info.st_size, mtime=info.st_mtime, name=name)

    def remove(self, components: tuple[str, ...]) -> None:
        """Remove a file, a symlink (itself) or an empty directory."""
        parent, name = self.parent_of(components)
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                os.rmdir(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    def rename(self, current: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Rename ``current`` to ``new``; never replaces an existing entry
        (``FileExistsError``). Parents must exist."""
        source_parent, source_name = self.parent_of(current)
        try:
            target_parent, target_name = self.parent_of(new)
            try:
                rename_noreplace(source_parent, source_name, target_parent, target_name)
            finally:
                os.close(target_parent)
        finally:
            os.close(source_parent)

    def stage(self, directory: tuple[str, ...] | None) -> AtomicFile:
        """A temporary file in ``directory`` (created if missing), or in the root when
        the destination is not known yet."""
        fd = self.open_dir(directory or (), create=directory is not None)
        try:
            return AtomicFile(fd)
        except BaseException:
            os.close(fd)
            raise

    def store(self, staged: AtomicFile, directory: tuple[str, ...], name: str) -> None:
        """Move a synced staged file to ``directory/name`` (directory created if
        missing), copying when they are on different filesystems. The staged file is
        consumed (committed or dropped) whatever happens, a refused name included."""
        try:
            check_name(name)
            target = self.open_dir(directory, create=True)
        except BaseException:
            staged.abort()
            raise
        try:
            try:
                staged.commit(target, name)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                copy = AtomicFile(os.dup(target))
                try:
                    staged.copy_to(copy)
                    copy.sync()
                    copy.commit(target, name)
                finally:
                    copy.abort()
        finally:
            staged.abort()
            os.close(target)


def sorted_by_name(entries: list[Row]) -> list[Row]:
    """``entries`` sorted by name, in place.

    Why in runs: a listing is made in a worker thread while the reactor thread serves
    other requests, and one ``list.sort`` is a single C call that holds the GIL
    throughout (about 25-45 ms for 100,000 names here). Sorting runs of
    :data:`SORT_RUN` first (short calls, with thread switches between them) leaves the
    final sort only the merge of those runs (about 8 ms for 100,000)."""
    key = operator.itemgetter(0)
    for start in range(0, len(entries), SORT_RUN):
        entries[start:start + SORT_RUN] = sorted(entries[start:start + SORT_RUN], key=key)
    entries.sort(key=key)
    return entries


def _scan(fd: int) -> Iterator[Row]:
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
            mode = info.st_mode
            yield entry.name, info.st_size, stat.S_ISDIR(mode), int(info.st_mtime), stat.S_ISLNK(mode)


def _refuse_non_directory(parent: int, name: str, where: tuple[str, ...]) -> None:
    """Explain why ``name`` could not be opened as a directory (after the fact: the
    refusal itself came from the kernel, this only words it)."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), display(where)) from None
    if stat.S_ISLNK(info.st_mode):
        raise PathRefused("symlink", f"{display(where)} is a symbolic link; links are not followed")
    raise PathRefused("not-dir", f"{display(where)} is not a directory")


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(source_dir: int, source: str, target_dir: int, target: str) -> None:
    """``renameat2(..., RENAME_NOREPLACE)``: atomic "rename unless the target exists".

    Falls back to check-then-rename where the C library or the filesystem lacks it."""
    if _renameat2 is not None:
        result = _renameat2(source_dir, os.fsencode(source), target_dir, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), target)
        # EINVAL: the filesystem lacks the flag, or a directory into itself (which
        # the plain rename below reports again).
    try:
        os.stat(target, dir_fd=target_dir, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(source, target, src_dir_fd=source_dir, dst_dir_fd=target_dir)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)


class AtomicFile:
    """A file written under a temporary name, then fsynced and renamed into place:
    readers see the old file or the whole new one, and a failed or interrupted upload
    leaves the old file as it was and no temporary file behind.

    The temporary file lives in ``dir_fd`` (owned): the destination directory when it is
    known, else the jail's root, from where :meth:`commit` renames it across. Replacing
    an existing file keeps its mode and owner (volumes are often used by non-root
    containers)."""

    def __init__(self, dir_fd: int, hint: str = "upload") -> None:
        self._dir_fd = dir_fd
        raw = os.fsencode(hint)[:200]
        self.temp_name = f".{os.fsdecode(raw)}.{secrets.token_hex(6)}.upload"
        self._fd = os.open(self.temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o644, dir_fd=dir_fd)
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            count = os.write(self._fd, view)
            self.written += count
            view = view[count:]

    def sync(self) -> None:
        """fsync the data (slow: callers may run it in a thread)."""
        os.fsync(self._fd)

    def commit(self, target_dir: int, name: str) -> None:
        """Replace ``name`` in ``target_dir`` (not owned) with what was written; call
        :meth:`sync` first. A directory in the way is ``IsADirectoryError``.
        On failure the temporary file stays until :meth:`abort`."""
        check_name(name)
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=target_dir, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
        if existing is not None and stat.S_ISREG(existing.st_mode) and self._fd >= 0:
            os.fchmod(self._fd, stat.S_IMODE(existing.st_mode))
            try:
                os.fchown(self._fd, existing.st_uid, existing.st_gid)
            except PermissionError:
                pass
        os.rename(self.temp_name, name, src_dir_fd=self._dir_fd, dst_dir_fd=target_dir)
        os.fsync(target_dir)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._close_dir()

    def copy_to(self, other: "AtomicFile") -> None:
        """Copy the data into ``other`` (a rename across filesystems is impossible)."""
        source = os.open(self.temp_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            while chunk := os.read(source, 1 << 20):
                other.write(chunk)
        finally:
            os.close(source)

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            try:
                os.unlink(self.temp_name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
