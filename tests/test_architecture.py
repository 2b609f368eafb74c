"""The layers of ARCHITECTURE.md hold: imports run one way, no cycles, a Dagster-free core, a serving runtime on the core.

The import graph is read from the source (every ``import``, also those inside functions), so an import placed inside
a function to dodge a cycle still counts. Imports under ``if TYPE_CHECKING:`` never run: they count for the one-way
rule (a layer names no type of a layer above it) but not as edges of a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lower rank = lower layer. A module may import its own package and packages of a lower rank only.
RANK = {"kiln": 0, "serving": 1, "resources": 2, "assets": 3, "sensors": 3, "platform_defs": 4}
KILN_PACKAGES = tuple(RANK)
DAGSTER = ("dagster", "dagster_aws", "dagster_k8s", "dagster_postgres", "dagster_webserver", "dagster_dg_cli", "dagster_shared")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in KILN_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of ``if TYPE_CHECKING:`` blocks: imports there are annotations only, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imported(path: Path, name: str, runtime_only: bool = False) -> list[tuple[str, int]]:
    """Every module an import statement of the file names (``from a import b`` names ``a`` and ``a.b``), with its line.

    ``runtime_only`` leaves out imports under ``if TYPE_CHECKING:`` (they name types for annotations, run never)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_lines(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    """Edges between Kiln's own modules: every import that runs (at module level or inside a function)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in imported(path, name, runtime_only=True):
            if target in mods and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_three_modules() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_an_import_inside_a_function_counts_and_one_for_annotations_does_not(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kiln.spec\n\n\ndef f():\n    import kiln.paths\n")
    assert [t for t, _ in imported(source, "kiln.m", runtime_only=True)] == ["typing", "typing.TYPE_CHECKING", "kiln.paths"]
    assert "kiln.spec" in [t for t, _ in imported(source, "kiln.m")]


@pytest.mark.parametrize("package", KILN_PACKAGES)
def test_imports_run_one_way(package: str) -> None:
    wrong = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for target, line in imported(path, name):
            top = target.split(".")[0]
            if top in RANK and top != package and RANK[top] >= RANK[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    assert wrong == []


@pytest.mark.parametrize("package", ["kiln", "serving"])
def test_the_core_and_the_serving_runtime_import_no_dagster(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}: {target}"
             for name, path in modules().items() if name.split(".")[0] == package
             for target, line in imported(path, name) if target.split(".")[0] in DAGSTER]
    assert wrong == []


def test_the_core_imports_no_other_kiln_package() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}: {target}"
             for name, path in modules().items() if name.split(".")[0] == "kiln"
             for target, line in imported(path, name) if target.split(".")[0] in KILN_PACKAGES and target.split(".")[0] != "kiln"]
    assert wrong == []


def test_the_core_unit_tests_run_without_dagster() -> None:
    """tests/kiln/ tests the core alone (the simulators only write example data, they are no layer)."""
    folder = ROOT / "tests" / "kiln"
    layers = (*DAGSTER, "assets", "sensors", "resources", "platform_defs", "serving")
    wrong = [f"{path.relative_to(ROOT)}:{line}: {target}" for path in sorted(folder.rglob("*.py"))
             for target, line in imported(path, module_name(path))
             if target.split(".")[0] in layers and not target.startswith("platform_defs.simulators")]
    assert wrong == []


def test_a_bento_carries_the_core_and_the_serving_runtime_only() -> None:
    from assets.bento import INCLUDE

    assert sorted({pattern.split("/")[0] for pattern in INCLUDE}) == ["kiln", "serving"]


def test_every_stage_of_the_asset_key_contract_has_its_module() -> None:
    from kiln.keys import STAGES

    assert all((ROOT / "assets" / f"{stage}.py").is_file() for stage in STAGES)


def test_trainer_kinds_are_named_only_inside_kiln_trainers() -> None:
    """A kind is a row of the registry table: no module outside kiln/trainers/ names one (e.g. ``kind == "torch"``)."""
    from kiln.trainers import kinds

    names = set(kinds())
    wrong = []
    for name, path in modules().items():
        if name.startswith("kiln.trainers"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert wrong == []
