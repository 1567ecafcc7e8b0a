"""Which layer may import which, read from the source with ``ast`` (every import, also those inside
functions and under ``TYPE_CHECKING``): the folder tree is the architecture only while this holds.

- model/ is the method: it imports nothing of service/, bench/ or cli/;
- cli/ is the top: only tests import it (the tools spawn ``python -m cli`` instead);
- bench/ measures from outside: nothing of model/ or service/ imports it;
- service/runtime/ runs the model and imports nothing of service/frontend/;
- service/frontend/ answers clients: it imports nothing of model/, and of service/runtime/ only the
  crossings listed in ``FRONTEND_TO_RUNTIME`` (the app's wiring and the routes' typed handles on the
  engine and worker), which the typed seam (``service/protocol.py``) is to remove: none may be added;
- service/transport/ carries the seam's types between processes: it imports neither side of it;
- gRPC imports nothing of the REST routes: both transports call the front end's state
  (``service/frontend/state.py``) and its request pipeline (``pipeline.py``, ``infer.py``);
- no two modules import each other, directly or round a longer circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("model", "service", "bench", "cli", "scripts")

# (importer prefix, forbidden prefix, why); a module "is in" a prefix when it equals it or lies below it
RULES: list[tuple[str, str, str]] = [
    ("model", "service", "the method does not depend on the service"),
    ("model", "bench", "the method does not depend on the tools that measure it"),
    ("model", "cli", "the method does not depend on the command line"),
    ("service", "bench", "the service does not depend on the tools that measure it"),
    ("service", "cli", "only tests import the command line"),
    ("bench", "cli", "only tests import the command line (tools spawn `python -m cli`)"),
    ("scripts", "cli", "only tests import the command line"),
    ("service.runtime", "service.frontend", "the runtime does not depend on the front end"),
    ("service.frontend", "model", "the front end never imports the model"),
    ("service.frontend", "service.runtime", "the front end reads service/protocol.py, not the runtime"),
    ("service.transport", "service.frontend", "the transport carries the seam's types, it imports no front end"),
    ("service.transport", "service.runtime", "the transport carries the seam's types, it imports no runtime"),
    ("service.frontend.grpc", "service.frontend.routes", "gRPC shares the request pipeline, not the REST routes"),
]
# The front end's remaining imports of the runtime, (importer, imported module): a ratchet, only to shrink.
FRONTEND_TO_RUNTIME: set[tuple[str, str]] = set()  # emptied by the typed seam; keep it empty


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; ``from pkg import name`` yields
    ``pkg.name`` too, since the name may be a submodule."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def allowed(importer: str, target: str) -> bool:
    """``target`` is, or is a name in, a module of the ratchet (``FRONTEND_TO_RUNTIME``) for this importer."""
    return any(importer == i and within(target, t) for i, t in FRONTEND_TO_RUNTIME)


def violations(paths: list[Path], root: Path = REPO) -> list[str]:
    found: dict[tuple[str, int, str], str] = {}  # one line per import statement and rule broken
    for path in paths:
        importer = module_name(path, root)
        for line, target in imported(path, root):
            for src, dst, why in RULES:
                if within(importer, src) and within(target, dst) and not allowed(importer, target):
                    where = str(path.relative_to(root))
                    found.setdefault((where, line, why), f"{where}:{line} imports {target}: {why}")
    return sorted(found.values())


def sources() -> list[Path]:
    return [p for top in SOURCES for p in sorted((REPO / top).rglob("*.py"))]


def test_the_layers_import_only_what_they_may() -> None:
    assert len(sources()) > 60  # the packages are where this test looks
    assert violations(sources()) == []


def circles(paths: list[Path], root: Path = REPO) -> list[list[str]]:
    """Modules that import each other, directly or round a circle: each circle's modules, sorted (the
    modules that reach themselves, grouped with those they reach and are reached from)."""
    names = {module_name(p, root): p for p in paths}
    graph = {m: {t for _, t in imported(p, root) if t in names and t != m} for m, p in names.items()}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    reached = {m: reach(m) for m in graph}
    found = {tuple(sorted({m} | {n for n in reached[m] if m in reached[n]})) for m in graph if m in reached[m]}
    return sorted(list(c) for c in found)


def test_no_modules_import_each_other() -> None:
    assert circles(sources()) == []


def test_a_circle_of_imports_is_caught(tmp_path: Path) -> None:
    """Relative imports, imports inside functions and under TYPE_CHECKING all close a circle."""
    files = {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "def f():\n    from .c import x\n",
             "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n",
             "pkg/d.py": "from pkg import a\n", "pkg/e.py": "import pkg.f\n", "pkg/f.py": "import pkg.e\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert circles(sorted(tmp_path.rglob("*.py")), tmp_path) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.e", "pkg.f"]]


@pytest.mark.parametrize(("where", "line", "rule"), [
    ("model/injected.py", "from service.runtime.engine import Engine", "the method does not depend on the service"),
    ("model/training/injected.py", "from ...bench import photos", "the method does not depend on the tools"),
    ("service/runtime/injected.py", "from ..frontend.errors import ApiError", "the runtime does not depend"),
    ("service/frontend/injected.py", "import cli.main", "only tests import the command line"),
    ("bench/injected.py", "def f():\n    from cli import options", "only tests import the command line"),
    ("service/frontend/injected.py", "from model.schedule import KeepSchedule", "never imports the model"),
    ("service/frontend/routes/health.py", "from ...runtime.graphs import batch_classes", "not the runtime"),
    ("service/transport/injected.py", "from ..frontend.upload import RawImage", "it imports no front end"),
    ("service/transport/wire.py", "from service.runtime.worker import Worker", "it imports no runtime"),
    ("service/frontend/grpc/convert.py", "from ..routes.v2 import infer", "not the REST routes"),
    ("service/frontend/grpc/server.py", "from ..routes.params import FrontendDep", "not the REST routes"),
    ("service/frontend/grpc/server.py", "from service.frontend.routes import v2", "not the REST routes"),
])
def test_a_forbidden_import_is_caught(tmp_path: Path, where: str, line: str, rule: str) -> None:
    """The check reads relative imports and imports inside functions: each line here breaks one rule."""
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(line + "\n")
    found = violations([path], tmp_path)
    assert len(found) >= 1 and all(rule in v for v in found), found


# Names every command module defines by convention (cli/main.py calls them by these names), and the
# option builders named after their command.
ENTRY_POINTS = frozenset({"run", "main", "add_arguments", "table", "measure", "train", "bench"})


def test_no_public_name_is_defined_in_two_modules() -> None:
    """One home for each name: a second top-level ``def``/``class`` of the same public name elsewhere is
    either a copy or a name that means two things."""
    homes: dict[str, list[str]] = {}
    for root in ("model", "service", "bench", "cli"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and \
                        not node.name.startswith("_"):
                    homes.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    twice = {name: paths for name, paths in homes.items() if len(paths) > 1 and name not in ENTRY_POINTS}
    assert not twice, f"public names defined in more than one module: {twice}"
