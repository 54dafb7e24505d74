"""The package's modules depend one way: no import cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
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
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                # `from pkg import module` imports the module; `from module import name` imports the module.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
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
                return stack[stack.index(nxt) :] + [nxt]
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


# The package's layers, bottom first: a module may import its own layer and those below it, never one above.
# The order is the pipeline's (compose, check, freeze, launch, report) over the files and records they share.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "file formats and text",
        [
            "flux_lora",
            "flux_lora.checkpoint_files",
            "flux_lora.redaction",
            "flux_lora.buckets",
            "flux_lora.noise_levels",
            "flux_lora.gpu_probe",
            "flux_lora.models.header",
            "flux_lora.models.layout",
            "flux_lora.models.sources",
        ],
    ),
    (
        "run records and ownership",
        [
            "flux_lora.records",
            "flux_lora.provenance",
            "flux_lora.share",
            "flux_lora.lifecycle.slurm",
            "flux_lora.lifecycle.job_guard",
            "flux_lora.lifecycle.lease",
            "flux_lora.lifecycle.states",
            "flux_lora.lifecycle.outcome",
            "flux_lora.engines.sd_scripts_resume",
        ],
    ),
    ("dataset", ["flux_lora.dataset"]),
    (
        "config",
        [
            "flux_lora.schema",
            "flux_lora.compose",
            "flux_lora.identity",
            "flux_lora.rules",
            "flux_lora.diff",
            "flux_lora.models",
            "flux_lora.check_report",
        ],
    ),
    ("engines", ["flux_lora.engines"]),
    ("check", ["flux_lora.check"]),
    ("freeze", ["flux_lora.snapshot"]),
    ("launch", ["flux_lora.lifecycle", "flux_lora.cluster", "flux_lora.cost"]),
    ("after the run", ["flux_lora.eval", "flux_lora.report", "flux_lora.watch", "flux_lora.replay"]),
]


def layer_of(module: str, layers: list[tuple[str, list[str]]] = LAYERS) -> int:
    """The layer whose longest listed name is the module or a package above it; -1 if none."""
    best, best_len = -1, -1
    for index, (_, names) in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                found.append(
                    f"{module} ({layers[layer_of(module, layers)][0]}) imports {target} "
                    f"({layers[layer_of(target, layers)][0]})"
                )
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in import_graph() if layer_of(m) < 0)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_the_package_layers_depend_one_way() -> None:
    found = upward_imports(import_graph())
    assert not found, "imports that run up the layers:\n" + "\n".join(found)


def test_an_import_up_the_layers_is_found(tmp_path: Path) -> None:
    layers = [("low", ["pkg.low"]), ("high", ["pkg.high"])]
    assert upward_imports({"pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}}, layers) == [
        "pkg.low (low) imports pkg.high (high)"
    ]
    assert upward_imports({"pkg.high": {"pkg.low"}}, layers) == []


def test_the_lifecycle_layers_depend_one_way() -> None:
    graph = import_graph()
    layers = ["slurm", "job_guard", "lease", "states", "outcome", "job", "decision"]
    for lower, module in enumerate(layers):
        above = {f"flux_lora.lifecycle.{m}" for m in layers[lower + 1 :]}
        assert not graph[f"flux_lora.lifecycle.{module}"] & above, f"lifecycle.{module} imports a layer above it"


def test_the_lifecycle_and_the_snapshot_load_neither_hydra_nor_the_check() -> None:
    # They run inside the job and on SLURM nodes; Hydra belongs to composing, the check to launching.
    code = (
        "import sys, flux_lora.lifecycle.decision, flux_lora.lifecycle.job, flux_lora.snapshot; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hydra' or m == 'flux_lora.check'))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


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
