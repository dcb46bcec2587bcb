"""The package's layout: data flows one way. Read with `ast` (nothing is imported, no side effects).

Every `import` and `from … import` in the package, at module level or inside a function, and every "module:name"
string a registry imports later (the task table, the tiny builders), is an edge from one module to another. The
graph must have no cycle, and no module may import from a layer above its own: recipe → data → model → training →
tasks → outputs → stages → plan → cli. A stage does not import another stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "qlora_pipeline"
# Lowest first; a module may import its own layer and those before it. The top-level helpers (errors, cache,
# secrets, sizes) are the floor every layer stands on. The planner reads recipe, data, model and tasks, and the
# train stage asks it for the `auto` settings.
LAYERS = [
    *("errors", "cache", "secrets", "sizes", "gguf_types"),
    *("recipe", "data", "model", "training", "tasks", "local_runtimes", "plan", "outputs", "stages"),
]
TOP = ("cli", "__main__")
REGISTRY_STRING = re.compile(r"^(qlora_pipeline(?:\.\w+)+):\w+$")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports: `from a.b import c` is a.b (whose __init__ runs) and a.b.c where
    that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` runs the package's __init__ too: an edge to both.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = REGISTRY_STRING.match(node.value)
            targets = [match.group(1)] if match else []
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def layer_of(name: str) -> int:
    if name == "qlora_pipeline":  # the package's __init__: its version only
        return 0
    part = name.split(".")[1]
    if part in TOP:
        return len(LAYERS)
    assert part in LAYERS, f"{name}: in no layer; add its folder to LAYERS in {Path(__file__).name}"
    return LAYERS.index(part)


def test_the_graph_sees_the_imports_it_must():
    """The walk itself: known edges of each kind are found (a module import, a function-level one, a registry)."""
    edges = graph()
    assert "qlora_pipeline.recipe.load" in edges["qlora_pipeline.recipe"]
    assert "qlora_pipeline.tasks.causal_lm" in edges["qlora_pipeline.tasks"]  # the registry's string
    assert "qlora_pipeline.outputs.card" in edges["qlora_pipeline.stages.train"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_nothing_imports_upward():
    upward = [
        f"{name} → {other}"
        for name, targets in graph().items()
        if name != "qlora_pipeline"
        for other in targets
        if layer_of(other) > layer_of(name)
    ]
    assert upward == []


def test_no_stage_imports_another_stage():
    edges = graph()
    crossing = [
        f"{name} → {other}"
        for name, targets in edges.items()
        if name.startswith("qlora_pipeline.stages.")
        for other in targets
        if other.startswith("qlora_pipeline.stages.")
    ]
    assert crossing == []


def test_every_module_states_its_job():
    missing = [name for name, path in modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []


def readme_tree() -> set[str]:
    """The paths under qlora_pipeline/ that the README's Layout block names, from its indentation (two spaces a
    level); a folder ends in '/'."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip() or not line.lstrip().split()[0].endswith(("/", ".py", ".md")):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:depth] + [name]
        if stack[0] == "qlora_pipeline/" and depth > 0:
            paths.add("".join(stack[1:]))
    return paths


def test_the_readme_layout_names_every_module_and_nothing_else():
    named = readme_tree()
    # A folder named without its files (samples/, configs/) holds data, named as a whole.
    data_folders = [f for f in named if f.endswith("/") and not any(n.startswith(f) and n != f for n in named)]
    shipped = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*")
        if path.suffix in (".py", ".md") and path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    unnamed = {name for name in shipped - named if not name.startswith(tuple(data_folders))}
    assert unnamed == set(), "modules the README's Layout does not name"
    assert [name for name in named if not (PACKAGE / name).exists()] == [], "named in the Layout, not there"
