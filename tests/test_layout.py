"""The code's layout: the project's modules import one another one way only (no cycle), and
never inside a function, where an import usually hides a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

# The project's modules: the scripts and the modules they are built from (benchmarks/ and
# tests/ sit on top of them and are not part of the lesson's layering).
MODULES = {path.stem: path for path in sorted(REPO.glob("*.py"))}


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, whether the import sits inside a function) per import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name.split(".")[0] for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((name, child.lineno, in_function) for name in names if name in MODULES)
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_the_project_modules_are_found():
    assert {"train", "evaluate", "data", "lora_model", "cli", "runtime"} <= set(MODULES)


def test_no_project_import_inside_a_function():
    inside = [f"{name}.py:{line} imports {module}" for name, path in MODULES.items()
              for module, line, in_function in project_imports(path) if in_function]
    assert inside == []


def test_project_imports_run_one_way():
    graph = {name: {module for module, _, _ in project_imports(path)}
             for name, path in MODULES.items()}
    done: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join([*trail, name])
        if name not in done:
            for module in sorted(graph[name]):
                walk(module, [*trail, name])
            done.add(name)

    for name in graph:
        walk(name, [])
    # The plumbing is at the bottom: it imports no other project module but each other.
    assert graph["cli"] == set() and graph["runtime"] <= {"cli"}


def test_the_readme_links_to_files_that_exist_and_to_no_line_numbers():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://", "#"))]
    assert local, "the README links to the code"
    missing = [t for t in local if not (REPO / t.split("#")[0]).exists()]
    assert missing == []
    assert not [t for t in local if re.search(r"#L\d", t)]  # every move would break them


def test_train_py_stays_a_lesson_and_no_module_grows_past_a_screenful_of_roles():
    """train.py is read top to bottom (at most 450 lines); machinery lives in modules of its
    own, none over 600 lines (issue 15's limits: past them, a module holds several roles)."""
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert lines["train"] <= 450
    assert {name: n for name, n in lines.items() if n > 600} == {}
