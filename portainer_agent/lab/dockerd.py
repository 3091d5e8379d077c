"""One real ``dockerd``, started in its own network namespace, for tests and the lab.

Each daemon gets its own data-root, exec-root, pidfile and socket under a short work
directory (unix socket paths are limited to 108 bytes, so use ``/tmp/pa-XXXX``-style
folders, see :func:`make_workdir`). Without a named namespace the daemon runs in a fresh
anonymous one (``unshare --net``), so its ``docker0`` bridge and iptables rules never touch
the host or another daemon. With a named namespace (the lab's nodes) it is entered with
``nsenter --net=...`` because ``ip netns exec`` remounts ``/sys`` and hides the cgroup
mounts dockerd needs.

Typical single-daemon use from a trial test::

    class MyTests(TestCase):
        @classmethod
        def setUpClass(cls):
            cls.daemon = DockerDaemon.start(make_workdir(), "node1")
            cls.daemon.import_busybox()

        @classmethod
        def tearDownClass(cls):
            cls.daemon.stop()

Everything here blocks; it is meant for test fixtures and command-line tools, not for code
running under the reactor.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import attrs

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

#: The applets linked into the image made by :meth:`DockerDaemon.import_busybox`.
BUSYBOX_APPLETS = (
    "sh", "sleep", "cat", "echo", "ls", "top", "wc", "head", "tail", "dd", "yes", "env",
    "id", "hostname", "mkdir", "rm", "tr", "seq", "true", "false", "printf", "grep", "tee",
    "ps", "touch", "cp", "mv", "ln", "date", "du", "df", "stat", "find", "sort", "uniq",
    "kill", "wget", "nc", "ip", "ping", "md5sum", "sha256sum", "base64", "xargs", "sed",
    "awk", "test", "[", "expr", "uname", "whoami", "chmod", "chown", "readlink", "basename",
    "dirname", "pwd", "truncate", "od", "hexdump", "vi", "less", "more", "timeout", "usleep",
)

INSTALL_HINT = "apt-get install -y docker.io busybox-static iproute2 iptables"


class DockerDaemonError(Exception):
    """The daemon did not start, or stopped misbehaving."""


class DockerCommandError(subprocess.CalledProcessError):
    """A docker CLI command failed; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.strip() if isinstance(self.stderr, str) else self.stderr
        return f"{shlex.join(str(a) for a in self.cmd)} exited {self.returncode}: {stderr}"


def make_workdir(tag: str = "") -> Path:
    """A fresh short work directory (``/tmp/pa-XXXXXXXX``) for one daemon."""
    return Path(tempfile.mkdtemp(prefix=f"pa-{tag}", dir="/tmp"))


def missing_tools(tools: Iterable[str] = ("dockerd", "docker", "containerd", "runc",
                                          "unshare", "nsenter", "ip", "iptables")) -> list[str]:
    """The programs needed by the lab that are not on ``$PATH``."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not any(os.path.exists(path) for path in BUSYBOX_PATHS):
        missing.append("busybox")
    return missing


def ping_unix_socket(path: str, timeout: float = 2.0) -> bool:
    """``GET /_ping`` over the unix socket ``path``; True when the daemon answered OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0] and data.endswith(b"OK")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child; ignore it otherwise."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for_exit(pid: int, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to go away; True when it did."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            if process.poll() is not None:
                return True
        else:
            _reap(pid)
            if not _pid_alive(pid):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def terminate(pid: int, timeout: float, process: subprocess.Popen | None = None,
              sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` (SIGTERM), wait up to ``timeout``, then SIGKILL. True if it exited
    within ``timeout`` (i.e. without the SIGKILL)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        wait_for_exit(pid, 1, process)
        return True
    if wait_for_exit(pid, timeout, process):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_for_exit(pid, 10, process)
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def _protected_pids() -> set[int]:
    """Our own process and its ancestors: never killed by a cleanup."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_under(prefix: str | os.PathLike[str]) -> list[int]:
    """Pids of processes whose command line mentions a path under ``prefix``.

    ``prefix`` is a directory: ``/tmp/pa-lab-x`` matches ``/tmp/pa-lab-x/node1/...`` but not
    ``/tmp/pa-lab-xy/...``. Our own process and its ancestors are never listed.
    """
    directory = str(prefix).rstrip("/")
    needles = (directory + "/",)
    protected = _protected_pids()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in protected:
            continue
        args = _cmdline(int(entry))
        if any(arg == directory or needle in arg for arg in args for needle in needles):
            found.append(int(entry))
    return sorted(found)


def _container_init_pids(prefix: Path) -> list[int]:
    """Init pids of containers whose runc state lives under ``prefix`` (killing a
    container's pid 1 kills its whole pid namespace)."""
    pids = []
    for state in prefix.glob("**/runtime-runc/*/*/state.json"):
        try:
            pid = json.loads(state.read_text()).get("init_process_pid")
        except (OSError, ValueError):
            continue
        if isinstance(pid, int) and pid > 1:
            pids.append(pid)
    return pids


def mounts_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Mount points under the directory ``prefix``, deepest first."""
    directory = str(prefix).rstrip("/")
    points = []
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == directory or point.startswith(directory + "/"):
                    points.append(point)
    except OSError:
        pass
    return sorted(set(points), key=len, reverse=True)


def kill_leftovers(prefix: str | os.PathLike[str], remove: bool = False, timeout: float = 20) -> list[int]:
    """Kill every dockerd, containerd, shim, container and agent that belongs to the work
    directory ``prefix`` (found by command line and runc state), unmount what they left
    mounted there and, with ``remove``, delete the directory. Returns the pids signalled.

    Use it after a crashed run: ``kill_leftovers("/tmp/pa-lab-palt", remove=True)``.
    """
    root = Path(prefix)
    signalled: list[int] = []
    for pid in _container_init_pids(root) if root.exists() else []:
        try:
            os.kill(pid, signal.SIGKILL)
            signalled.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    pids = processes_under(root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    remaining = pids
    while remaining and time.monotonic() < deadline:
        for pid in remaining:
            _reap(pid)
        remaining = [pid for pid in remaining if _pid_alive(pid)]
        if remaining:
            time.sleep(0.1)
    for pid in remaining + processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in signalled:
            _reap(pid)
        if not any(_pid_alive(pid) for pid in signalled):
            break
        time.sleep(0.05)
    unmount_under(root)
    if remove:
        shutil.rmtree(root, ignore_errors=True)
    return sorted(set(signalled))


def unmount_under(prefix: str | os.PathLike[str]) -> None:
    """Lazily unmount everything mounted under ``prefix`` (netns files, shm, ...)."""
    for point in mounts_under(prefix):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)


def _decoded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    result.stdout = result.stdout.decode(errors="replace") if isinstance(result.stdout, bytes) else result.stdout
    result.stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    return result


def busybox_tar(applets: Sequence[str] = BUSYBOX_APPLETS) -> bytes:
    """A root filesystem tarball with ``/bin/busybox`` and symlinks to its ``applets``."""
    source = next((path for path in BUSYBOX_PATHS if os.path.exists(path)), None)
    if source is None:
        raise DockerDaemonError(f"busybox is missing: {INSTALL_HINT}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "etc", "root", "proc", "sys", "dev", "var", "data"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(os.path.realpath(source), arcname="bin/busybox")
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@attrs.define(eq=False)
class DockerDaemon:
    """A running dockerd. Build it with :meth:`start`; end it with :meth:`stop` (or use
    it as a context manager)."""

    workdir: Path
    name: str
    netns: str | None
    process: subprocess.Popen | None = attrs.field(default=None, repr=False)
    pid: int = 0

    @property
    def socket_path(self) -> str:
        return str(self.workdir / "docker.sock")

    @property
    def url(self) -> str:
        """``DOCKER_HOST`` value: ``unix:///.../docker.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return self.workdir / "data"

    @property
    def exec_root(self) -> Path:
        return self.workdir / "exec"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @classmethod
    def command(cls, workdir: Path, name: str, netns: str | None = None,
                extra_args: Sequence[str] = ()) -> list[str]:
        """The command line that starts dockerd named ``name`` in its namespace."""
        dockerd = [
            shutil.which("dockerd") or "dockerd",
            "--data-root", str(workdir / "data"),
            "--exec-root", str(workdir / "exec"),
            "--pidfile", str(workdir / "pid"),
            "-H", f"unix://{workdir / 'docker.sock'}",
            "--storage-driver", "vfs",
            *extra_args,
        ]
        script = f"ip link set lo up && hostname {shlex.quote(name)} && exec {shlex.join(dockerd)}"
        if netns is None:
            return ["unshare", "--net", "--uts", "sh", "-c", script]
        return ["nsenter", f"--net=/var/run/netns/{netns}", "unshare", "--uts", "sh", "-c", script]

    @classmethod
    def start(cls, workdir: Path, name: str, netns: str | None = None, timeout: float = 60,
              extra_args: Sequence[str] = ()) -> "DockerDaemon":
        """Start dockerd and block until ``GET /_ping`` answers (or raise
        :class:`DockerDaemonError` with the tail of its log, after stopping it)."""
        workdir = Path(workdir)
        if len(str(workdir / "exec" / "containerd" / "containerd.sock.ttrpc")) > 100:
            raise DockerDaemonError(f"work directory path too long for unix sockets: {workdir}")
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "dockerd.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                cls.command(workdir, name, netns, extra_args),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = cls(workdir=workdir, name=name, netns=netns, process=process, pid=process.pid)
        try:
            daemon.wait_ready(timeout)
        except BaseException:
            daemon.stop(timeout=10)
            raise
        return daemon

    @classmethod
    def temporary(cls, name: str = "node1", **kwargs) -> "DockerDaemon":
        """:meth:`start` in a fresh ``/tmp/pa-XXXX`` work directory (removed by :meth:`stop`)."""
        return cls.start(make_workdir(), name, **kwargs)

    @classmethod
    def attach(cls, workdir: Path, name: str, netns: str | None, pid: int) -> "DockerDaemon":
        """A handle on a daemon started by another process (the lab CLI's state file)."""
        return cls(workdir=Path(workdir), name=name, netns=netns, process=None, pid=pid)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ping_unix_socket(self.socket_path, timeout=2):
            if not self.running:
                raise DockerDaemonError(
                    f"dockerd {self.name} exited during start-up; log tail:\n{_tail(self.log_path)}")
            if time.monotonic() >= deadline:
                raise DockerDaemonError(
                    f"dockerd {self.name} did not answer /_ping within {timeout}s; log tail:\n"
                    f"{_tail(self.log_path)}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def ping(self) -> bool:
        return ping_unix_socket(self.socket_path)

    def docker(self, *args: str, check: bool = True, input: str | bytes | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon; stdout/stderr come back as ``str``.

        ``check`` raises :class:`DockerCommandError` (with stderr) on a non-zero exit.
        """
        return run_docker(self.url, *args, check=check, input=input, env=env, timeout=timeout)

    def import_busybox(self, tag: str = "busybox:local") -> str:
        """Make the image ``tag`` from the host's static busybox (no registry); returns its id."""
        result = self.docker("import", "-", tag, input=busybox_tar())
        return result.stdout.strip()

    def remove_containers(self, timeout: float = 60) -> None:
        """``docker rm -f`` every container (dockerd exits much faster without them)."""
        try:
            ids = self.docker("ps", "-aq", timeout=timeout).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=timeout)
        except (subprocess.SubprocessError, OSError):
            pass

    def stop(self, timeout: float = 60, remove: bool = True) -> None:
        """Remove containers, SIGTERM dockerd, wait (SIGKILL after ``timeout``), kill
        whatever it left (containerd, shims), unmount, and delete the work directory."""
        if self.running and self.ping():
            self.remove_containers(timeout=min(timeout, 30))
        if self.pid:
            terminate(self.pid, timeout, self.process)
        kill_leftovers(self.workdir, remove=remove)

    def __enter__(self) -> "DockerDaemon":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_docker(host: str, *args: str, check: bool = True, input: str | bytes | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 120,
               tls: bool = False) -> subprocess.CompletedProcess:
    """Run ``docker -H host [--tls] args...``; ``env`` is added to a copy of ``os.environ``
    (``DOCKER_HOST``/``DOCKER_CONTEXT`` are dropped so ``host`` always wins)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY")}
    full_env.update(env or {})
    command = ["docker", "-H", host, *(["--tls"] if tls else []), *args]
    data = input.encode() if isinstance(input, str) else input
    result = _decoded(subprocess.run(command, input=data, capture_output=True, env=full_env,
                                     timeout=timeout, stdin=None if data is not None else subprocess.DEVNULL))
    if check and result.returncode != 0:
        raise DockerCommandError(result.returncode, command, result.stdout, result.stderr)
    return result
