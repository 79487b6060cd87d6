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


# The project's documents, and a Markdown link: [text](target).
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")


def heading_anchors(document: Path) -> set[str]:
    """The #anchors GitHub makes of a Markdown file's headings (code blocks left out)."""
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def defined_names(path: Path) -> set[str]:
    """A module's top-level functions, classes and constants, and its methods as Class.method."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_link_in_the_documents_resolves_to_a_file_heading_or_name():
    """README.md and docs/*.md link to files that exist, to headings that exist, never to line
    numbers (every move would break them), and a `name` in a link to a module is defined there
    (the Reading order links to names: a rename that forgets the documents fails here)."""
    problems, linked_names = [], 0
    for document in DOCUMENTS:
        for text, target in LINK.findall(document.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            where = f"{document.relative_to(REPO)}: [{text}]({target})"
            path, _, anchor = target.partition("#")
            destination = (document.parent / path).resolve() if path else document
            if re.search(r"#L\d", target):
                problems.append(f"{where}: a line-number link")
            elif not destination.exists():
                problems.append(f"{where}: no such file")
            elif anchor and destination.suffix == ".md" and \
                    anchor not in heading_anchors(destination):
                problems.append(f"{where}: no such heading")
            elif destination.suffix == ".py":
                names = [name for name in re.findall(r"`([^`]+)`", text) if "/" not in name
                         and not name.endswith(".py")]
                linked_names += len(names)
                missing = set(names) - defined_names(destination)
                problems += [f"{where}: {name} is not defined there" for name in missing]
    assert problems == []
    assert linked_names >= 50  # the Reading order names the lesson's functions


def test_the_readme_is_a_front_door_with_a_reading_order():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "## Reading order" in text


def test_train_py_stays_a_lesson_and_no_module_grows_past_a_screenful_of_roles():
    """train.py is read top to bottom (at most 450 lines); machinery lives in modules of its
    own, none over 600 lines (issue 15's limits: past them, a module holds several roles)."""
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert lines["train"] <= 450
    assert {name: n for name, n in lines.items() if n > 600} == {}
