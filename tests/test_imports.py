"""The package's modules depend one way: no import cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import flux_lora

PACKAGE_DIR = Path(flux_lora.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["flux_lora", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the flux_lora modules it imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    modules = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import module` imports the module; `from module import name` imports the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)  # a module importing its own package's __init__ is not a cycle of interest
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_lifecycle_layers_depend_one_way() -> None:
    graph = import_graph()
    layers = ["records", "slurm", "lease", "states", "outcome", "job", "decision"]
    for lower, module in enumerate(layers):
        above = {f"flux_lora.lifecycle.{m}" for m in layers[lower + 1 :]}
        assert not graph[f"flux_lora.lifecycle.{module}"] & above, f"lifecycle.{module} imports a layer above it"


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement in the file names (absolute imports; any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_nothing_in_the_package_imports_launch_py(tmp_path: Path) -> None:
    offenders = [str(p) for p in PACKAGE_DIR.rglob("*.py") if {"launch"} & {n.split(".")[0] for n in imports_of(p)}]
    assert not offenders, offenders
    planted = tmp_path / "planted.py"  # the check itself sees such an import, inside a function too
    planted.write_text("def f():\n    from launch import main\n")
    assert "launch" in imports_of(planted)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
