"""The distribution, built for real: what the runtime wheel carries, and what an editable
install finds.

The wheel is the runtime: the agent package and the twistd dropin, nothing of the lab
(``portainer_agent/lab``), the test helpers (``portainer_agent/testing``) or the developer
client tools (``portainer_agent/tools``), and no ``portainer-agent-lab`` script. Those stay in
the checkout, where an editable install (``scripts/setup``) imports them.

Both builds run on a copy of the source (setuptools builds in the tree it is given: ``build/``
and ``*.egg-info`` must not land in the checkout). pip may need the package index for the build
backend (setuptools); when it cannot reach one the tests skip and say so.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import attrs
import twisted
from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "portainer_agent"
# Checkout-only subpackages: in the source tree, never in the wheel.
CHECKOUT_ONLY = ("lab", "testing", "tools")
DROPIN = "twisted/plugins/portainer_agent_plugin.py"
# What pip prints when it cannot get the build backend: the index is out of reach.
OFFLINE_SIGNS = ("No matching distribution found", "Could not find a version that satisfies",
                 "NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")


def source_copy(destination: Path) -> Path:
    """The files a build reads: the top-level files, the package and the dropin directory."""
    destination.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, destination / entry.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
    for directory in (PACKAGE, "twisted"):
        shutil.copytree(ROOT / directory, destination / directory, ignore=ignore)
    return destination


def run_pip(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pip ARGS``; a failure that looks like no index skips, any other fails."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            raise SkipTest(f"pip cannot reach a package index for the build backend:\n{output[-1500:]}")
        raise AssertionError(f"pip {' '.join(args)} exited {result.returncode}:\n{output[-4000:]}")
    return result


def setuptools_in_this_env() -> bool:
    """Whether this interpreter can build without isolation (no index needed)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


def imported_names(source: str) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(level, module, names) of every import that runs: module level, in functions (lazy
    imports), not under ``if TYPE_CHECKING:``."""
    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (grandchild for statement in child.orelse for grandchild in walk_one(statement))
                continue
            yield child
            yield from walk(child)

    def walk_one(node: ast.AST) -> Iterator[ast.AST]:
        yield node
        yield from walk(node)

    for node in walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", tuple(alias.name for alias in node.names)


@attrs.frozen
class BuiltWheel:
    """The file names of the wheel, its entry points and the text of its modules."""

    names: frozenset[str]
    entry_points: str
    modules: dict[str, str]


def build_wheel() -> BuiltWheel:
    """``pip wheel --no-deps`` of a copy of the source, once per process (a skip is remembered
    too)."""
    if not _built:
        with tempfile.TemporaryDirectory(prefix="pa-wheel-") as name:
            tmp = Path(name)
            source = source_copy(tmp / "src")
            isolation = ("--no-build-isolation",) if setuptools_in_this_env() else ()
            try:
                run_pip(sys.executable, "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(source),
                        cwd=tmp)
            except SkipTest as skip:
                _built.append(skip)
                raise
            (wheel,) = (tmp / "dist").glob("portainer_agent-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                names = frozenset(archive.namelist())
                (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
                _built.append(BuiltWheel(
                    names=names,
                    entry_points=archive.read(entry_points).decode(),
                    modules={name: archive.read(name).decode() for name in names if name.endswith(".py")},
                ))
    built = _built[0]
    if isinstance(built, SkipTest):
        raise built
    return built


_built: list[BuiltWheel | SkipTest] = []


class WheelTests(SynchronousTestCase):
    """``pip wheel --no-deps`` of the source: the runtime, nothing else."""

    def setUp(self) -> None:
        wheel = build_wheel()
        self.names, self.entry_points, self.modules = wheel.names, wheel.entry_points, wheel.modules

    def test_no_lab_no_test_helpers(self) -> None:
        """Nothing of the checkout-only subpackages is in the wheel."""
        leaked = sorted(name for name in self.names
                        if any(name.startswith(f"{PACKAGE}/{sub}/") for sub in CHECKOUT_ONLY))
        self.assertEqual(leaked, [])

    def test_only_the_agent_script(self) -> None:
        """One console script, the agent's: no ``portainer-agent-lab``."""
        scripts = [line.split("=")[0].strip() for line in self.entry_points.split("[console_scripts]")[1]
                   .split("[")[0].splitlines() if "=" in line]
        self.assertEqual(scripts, ["portainer-agent"])
        self.assertNotIn("lab", self.entry_points)

    def test_package_and_dropin(self) -> None:
        """The twistd dropin and every runtime module of the source tree are in the wheel."""
        self.assertIn(DROPIN, self.names)
        expected = {
            path.relative_to(ROOT).as_posix() for path in (ROOT / PACKAGE).rglob("*.py")
            if "__pycache__" not in path.parts and path.relative_to(ROOT / PACKAGE).parts[0] not in CHECKOUT_ONLY
        }
        self.assertIn(f"{PACKAGE}/cli.py", expected)
        self.assertEqual(sorted(expected - self.names), [])

    def test_the_wheel_imports_only_itself(self) -> None:
        """Every ``portainer_agent`` import in the wheel (lazy ones too) names a module the wheel
        carries: a runtime module that reaches into the lab or the test helpers would break
        only when installed from the wheel."""
        def exists(module: str) -> bool:
            path = module.replace(".", "/")
            return f"{path}.py" in self.names or f"{path}/__init__.py" in self.names

        missing = []
        for name, source in sorted(self.modules.items()):
            parts = PurePosixPath(name).with_suffix("").parts
            package = parts[:-1]
            for level, module, imported in imported_names(source):
                if level:
                    base = package[:len(package) - (level - 1)]
                    module = ".".join((*base, module) if module else base)
                if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
                    continue
                if not exists(module):
                    missing.append(f"{name}: {module}")
                    continue
                for item in imported:  # `from portainer_agent import lab`: a submodule or a name
                    sub = f"{module}.{item}"
                    on_disk = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or \
                        (ROOT / sub.replace(".", "/")).is_dir()
                    if on_disk and not exists(sub):
                        missing.append(f"{name}: {sub}")
        self.assertEqual(missing, [])


class EditableInstallTests(SynchronousTestCase):
    """A plain ``pip install -e .`` (setuptools' default editable mode) in a fresh venv: twistd
    finds the dropin and the checkout-only subpackages import."""

    def test_twistd_finds_the_plugin(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="pa-editable-"))  # not mktemp(): relative to the cwd under pytest
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        source = source_copy(tmp / "src")
        environment = tmp / "venv"
        venv.EnvBuilder(with_pip=True).create(environment)
        python = str(environment / "bin" / "python")
        # The dependencies come from this environment (no index needed for them): a path line
        # in a .pth (the .pth files of that directory are not processed, so this checkout's
        # own editable install does not leak in).
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        Path(purelib, "zz-test-dependencies.pth").write_text(f"{Path(twisted.__file__).parents[1]}\n")
        run_pip(python, "install", "--no-deps", "-e", str(source), cwd=tmp)
        probe = (
            "import json, portainer_agent, portainer_agent.lab.cli, portainer_agent.testing.signing\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "print(json.dumps({'taps': sorted(p.tapname for p in getPlugins(IServiceMaker)),\n"
            "                  'package': portainer_agent.__file__}))\n"
        )
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        result = subprocess.run([python, "-c", probe], cwd=tmp, env=env, capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        found = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertIn("portainer-agent", found["taps"])
        self.assertTrue(Path(found["package"]).is_relative_to(source), found["package"])
