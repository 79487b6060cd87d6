"""The code's layout: the lesson at the top, the machinery in one package, and the rules that
keep the whole tree readable. The project's modules import one another one way only (no
cycle), never inside a function (where an import usually hides a cycle), and the package never
imports the lesson; no function and no module grows past the sizes below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

# The lesson: the only modules at the top of the repository.
LESSON = {"train", "evaluate", "data", "lora_model", "predict"}
PACKAGE = "machinery"
# Every project module by its import name: the lesson, the package and the benchmarks
# (tests/ sits on top of them all and is not part of the layering).
MODULES = {
    **{path.stem: path for path in sorted(REPO.glob("*.py"))},
    **{f"{PACKAGE}.{path.stem}": path for path in sorted((REPO / PACKAGE).glob("*.py"))
       if path.stem != "__init__"},
    **{f"benchmarks.{path.stem}": path for path in sorted((REPO / "benchmarks").glob("*.py"))
       if path.stem != "__init__"},
}
# The sizes past which a function no longer reads in one screen, or a module holds several roles.
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
# train.py is read top to bottom: the recipe, the run and the loop.
MAX_TRAIN_LINES = 575


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement names ("from machinery import cli, runtime"
    names machinery.cli and machinery.runtime)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        names = []
    return [name for name in names if name in MODULES]


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, whether the import sits inside a function) per import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, child.lineno, in_function)
                             for name in imported_modules(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_the_top_level_is_the_lesson():
    assert {path.stem for path in REPO.glob("*.py")} == LESSON
    assert {name.split(".")[0] for name in MODULES} == LESSON | {PACKAGE, "benchmarks"}
    assert {"machinery.cli", "machinery.runtime", "benchmarks.benchmark"} <= set(MODULES)


def test_no_project_import_inside_a_function():
    inside = [f"{path.relative_to(REPO)}:{line} imports {module}"
              for path in MODULES.values()
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
    # The machinery sits below the lesson: it never imports a lesson module. At its bottom,
    # the command-line plumbing imports no other project module.
    package = {name: imports for name, imports in graph.items() if name.startswith(PACKAGE)}
    assert {name: imports & LESSON for name, imports in package.items()
            if imports & LESSON} == {}
    assert graph["machinery.cli"] == set()


def function_lengths(path: Path) -> dict[str, int]:
    """Each function's (and method's) length in lines, from its def to its last line."""
    return {node.name: node.end_lineno - node.lineno + 1
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_no_function_or_module_grows_past_a_screenful_of_roles():
    """Every function reads in one screen (at most 60 lines), every module holds one role
    (at most 600 lines), and train.py stays a lesson read top to bottom."""
    long_functions = {f"{name}.{function}": n for name, path in MODULES.items()
                      for function, n in function_lengths(path).items()
                      if n > MAX_FUNCTION_LINES}
    assert long_functions == {}
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}
    assert lines["train"] <= MAX_TRAIN_LINES


def test_the_training_step_is_within_train_pys_first_screens():
    """A learner meets the recipe, the run and the training step early in train.py: the loop
    (Trainer.train_epoch and optimizer_step) starts within its first 400 lines, after run()."""
    body = ast.parse((REPO / "train.py").read_text()).body
    where = {node.name: node.lineno for node in body if isinstance(node, (ast.FunctionDef,
                                                                          ast.ClassDef))}
    assert where["Recipe"] < where["run"] < where["Trainer"] < 400


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


# The command that builds the test environment from nothing and runs the whole suite.
TEST_COMMAND = "bash tests/run.sh"


def test_the_readme_opens_with_the_two_commands_and_a_reading_order():
    """The README's first screen gives the command that trains and the one that builds the
    test environment and runs the suite (the command .ci/run runs too)."""
    text = (REPO / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:30])
    assert "python train.py" in first_screen
    assert TEST_COMMAND in first_screen
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()
    assert len(text.splitlines()) <= 300
    assert "## Reading order" in text
