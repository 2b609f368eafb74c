"""Dependencies are used through their public API only: no private modules, no patching of their attributes.

Every ``.py`` file of Kiln's packages, tests and benchmarks is parsed with :mod:`ast` and checked for

- an import of a private module or name of a dependency (``dagster._core...``, ``bentoml._internal...``,
  ``from prometheus_client import _x``), or of any module path with an ``_internal``/``_core`` segment;
- an assignment to an attribute of an imported dependency module or class (``great_expectations.X = ...``,
  ``SomeLibClass.method = ...``, ``prom.values.ValueClass = ...``, also augmented and annotated assignments and
  ``del``), ``setattr``/``delattr`` on one, and test patches of one (``monkeypatch.setattr(lib, ...)``,
  ``monkeypatch.setattr("lib.name", ...)``, ``mock.patch("lib.name")``, ``mock.patch.object(lib, ...)``).

A dependency is any third-party package: neither Kiln's own packages nor the standard library (setting
``os.environ[...]`` is configuration, not a patch).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

FIRST_PARTY = ("kiln", "serving", "resources", "assets", "sensors", "platform_defs", "tests", "benchmarks")
ALWAYS_PRIVATE = ("_internal", "_core")
PATCH_CALLS = {"setattr", "delattr"}  # builtins, and the methods of pytest's monkeypatch of the same names
MOCK_PATCHES = {"patch", "object", "dict", "multiple"}  # unittest.mock.patch(...) / patch.object(...) / ...


def python_files() -> list[Path]:
    """Every .py file of Kiln's packages, tests and benchmarks."""
    return sorted(p for folder in FIRST_PARTY for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts
                  and not any(part.startswith(".venv") for part in p.relative_to(REPO).parts))  # benchmark-only venvs


def _private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and segment.endswith("__"))


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top not in FIRST_PARTY and top not in sys.stdlib_module_names


def _private_module(module: str) -> bool:
    """A module path that names a private part: any ``_internal``/``_core`` segment, or a dependency's ``_x``."""
    segments = module.split(".")
    return any(s in ALWAYS_PRIVATE for s in segments) or (_third_party(module) and any(_private(s) for s in segments))


def _root(node: ast.expr) -> ast.expr:
    """The name an attribute or subscript chain starts from (``a`` of ``a.b[c].d``)."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node


class _Checker(ast.NodeVisitor):
    def __init__(self, where: str) -> None:
        self.where = where
        self.dependency_names: dict[str, str] = {}  # local name -> the dependency object it was imported as
        self.found: list[str] = []

    def report(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.where}:{getattr(node, 'lineno', 0)}: {what}")

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _private_module(alias.name):
                self.report(node, f"imports private module {alias.name}; use its public API")
            if _third_party(alias.name):  # `import a.b` binds a; `import a.b as c` binds c to a.b
                bound = alias.asname or alias.name.split(".")[0]
                self.dependency_names[bound] = alias.name if alias.asname else bound

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:  # relative: Kiln's own
            return
        if _private_module(module):
            self.report(node, f"imports from private module {module}; use its public API")
        for alias in node.names:
            if _third_party(module) and _private(alias.name):
                self.report(node, f"imports private name {alias.name} from {module}; use its public API")
            if _third_party(module) and alias.name != "*":
                self.dependency_names[alias.asname or alias.name] = f"{module}.{alias.name}"

    # assignments to a dependency's attributes
    def _check_target(self, target: ast.expr, node: ast.AST, verb: str) -> None:
        if isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self._check_target(element, node, verb)
        elif isinstance(target, ast.Starred):
            self._check_target(target.value, node, verb)
        elif isinstance(target, ast.Attribute | ast.Subscript) and self._dependency(target):
            self.report(node, f"{verb} {ast.unparse(target)}, an attribute of dependency {self._dependency(target)}")

    def _dependency(self, node: ast.expr) -> str | None:
        """The dependency an expression's attribute chain starts from (``great_expectations`` for ``gx.X.y``)."""
        root = _root(node)
        if isinstance(node, ast.Subscript) and not isinstance(node.value, ast.Attribute | ast.Subscript):
            return None  # `name[...] = ...` changes a container the name holds, not an attribute
        return self.dependency_names.get(root.id) if isinstance(root, ast.Name) else None

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._check_target(target, node, "assigns")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._check_target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._check_target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self._check_target(target, node, "deletes")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        first = node.args[0] if node.args else None
        if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
            if _private_module(first.value):
                self.report(node, f"imports private module {first.value}; use its public API")
        elif name in PATCH_CALLS and first is not None:
            self._check_patch(node, first, name)
        elif name in MOCK_PATCHES and isinstance(func, ast.Attribute | ast.Name) and first is not None and self._is_mock(func):
            self._check_patch(node, first, f"mock.{name}")
        self.generic_visit(node)

    def _is_mock(self, func: ast.expr) -> bool:
        """``patch``/``mock.patch``/``patch.object``... from unittest.mock (or the mock package)."""
        text = ast.unparse(func)
        origin = self.dependency_names.get(text.split(".")[0], "")
        return "mock" in origin.split(".") or text.split(".")[0] == "mock"

    def _check_patch(self, node: ast.Call, first: ast.expr, how: str) -> None:
        if how == "mock.dict":  # patch.dict changes a mapping's items (e.g. os.environ), not an attribute
            return
        if isinstance(first, ast.Constant) and isinstance(first.value, str):  # monkeypatch.setattr("lib.X.y", ...)
            if "." in first.value and _third_party(first.value):
                self.report(node, f"{how} patches {first.value}, an attribute of a dependency")
            return
        if isinstance(first, ast.Name):
            dependency = self.dependency_names.get(first.id)
        elif isinstance(first, ast.Attribute):
            dependency = self._dependency(first)
        else:
            dependency = None
        if dependency:
            self.report(node, f"{how} on {ast.unparse(first)}, an attribute of dependency {dependency}")


def violations(path: Path, root: Path = REPO) -> list[str]:
    """Private imports and patches of dependencies in one file, as ``file:line: what``."""
    where = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    checker = _Checker(where)
    checker.visit(ast.parse(path.read_text(), filename=str(path)))
    return checker.found


def _all_violations() -> Iterator[str]:
    for path in python_files():
        yield from violations(path)


def test_no_private_internals_or_patched_dependencies() -> None:
    found = list(_all_violations())
    assert not found, "dependencies must be used through their public API:\n" + "\n".join(found)


def test_the_check_names_each_planted_violation(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import great_expectations as gx\n"                               # 1
        "import dagster._core.errors\n"                                    # 2
        "from bentoml._internal.bento.build_config import BentoEnvSchema\n"  # 3
        "from prometheus_client import _private\n"                         # 4
        "from dagster import DagsterInstance, asset\n"                     # 5
        "from unittest import mock\n"                                      # 6
        "import importlib\n"                                               # 7
        "gx.expectations.Foo = None\n"                                     # 8
        "DagsterInstance.get = lambda self: 1\n"                           # 9
        "setattr(gx, 'x', 1)\n"                                            # 10
        "def f(monkeypatch):\n"                                            # 11
        "    monkeypatch.setattr(DagsterInstance, 'get', None)\n"          # 12
        "    monkeypatch.setattr('great_expectations.core.x', None)\n"     # 13
        "    with mock.patch('dagster.asset'):\n"                          # 14
        "        pass\n"                                                   # 15
        "    importlib.import_module('mlflow._tracking')\n"                # 16
        "    asset.__doc__ += 'x'\n"                                       # 17
        "    kept = DagsterInstance\n"                                     # 18 fine: binding a name
        "    d = {}\n"                                                     # 19
        "    d['k'] = gx\n"                                                # 20 fine: our own dict
        "    setattr(d, 'k', 1)\n"                                         # 21 fine: our own object
    )
    lines = sorted(int(v.split(":")[1]) for v in violations(planted, tmp_path))
    assert lines == [2, 3, 4, 8, 9, 10, 12, 13, 14, 16, 17], violations(planted, tmp_path)
    assert all(v.startswith("planted.py:") for v in violations(planted, tmp_path))


def test_kiln_code_may_use_its_own_private_names(tmp_path: Path) -> None:
    fine = tmp_path / "fine.py"
    fine.write_text("from __future__ import annotations\nfrom serving.router import _helper\nimport kiln._x\nfrom . import _y\n"
                    "import os\nos.environ['X'] = '1'\nimport yaml\nloaded = yaml.safe_load('a: 1')\nloaded['a'] = 2\n")
    assert violations(fine, tmp_path) == []
