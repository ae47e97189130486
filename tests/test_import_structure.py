"""The house's import structure, read from the source (every import, module-level or inside a function; those only
for type checkers left out): no import circle, and imports only go down the floors

    train/__main__.py -> train/commands/ -> train/stages/ -> train/infra/ -> train/configs/ -> modeling_emovlm_kd/

never up (the model package, the Hub payload, imports nothing from `train/`)."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_emovlm_kd", "train")
# The floor of each part of the house, lowest first; a module may import its own floor or a lower one.
FLOORS = {
    "modeling_emovlm_kd": 0,
    "train.configs": 1,
    "train.infra": 2, "train.metrics": 2, "train": 2,  # `train/__init__.py` re-exports the stage table's order
    "train.stages": 3,
    "train.commands": 4,
    "train.__main__": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def floor(module: str) -> int:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(f"{prefix}."):
            return FLOORS[prefix]
    raise AssertionError(f"{module} is on no floor: add its folder to FLOORS")


def _type_checking_only(node, parents) -> bool:
    for parent in parents:
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test) and node in ast.walk(parent):
            return True
    return False


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports (a `from package import name` naming a module counts as that module)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    targets = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, guards):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        targets |= {name for name in names if name in known}
    return targets - {module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imports(module, path, set(found)) for module, path in found.items()}


def test_imports_only_go_down_the_floors(graph):
    upward = sorted(f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
                    for module, targets in graph.items() for target in targets if floor(target) > floor(module))
    assert not upward, "\n".join(upward)


def test_the_model_package_imports_nothing_from_train(graph):
    assert not {(m, t) for m, targets in graph.items() if m.startswith("modeling_emovlm_kd")
                for t in targets if t.split(".")[0] == "train"}


def test_no_import_circle(graph):
    # Package `__init__` files are left out: importing a submodule runs its package's `__init__` anyway, and a
    # package that re-exports its modules would otherwise close a circle with each of them.
    edges = {m: {t for t in targets if not (ROOT / t.replace(".", "/") / "__init__.py").exists()}
             for m, targets in graph.items() if not (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    state, circles = defaultdict(int), []

    def visit(module, trail):
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state[target] == 1:
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif state[target] == 0:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_checks_can_fail(tmp_path):
    """The graph sees a lazy import inside a function, a relative import and the old configuration <-> fusion pair."""
    known = {"modeling_emovlm_kd.fusion", "modeling_emovlm_kd.configuration_emovlm_kd", "train.stages.gate"}
    scratch = tmp_path / "configuration_emovlm_kd.py"
    scratch.write_text("def gate_types():\n    from .fusion import GATES\n    import train.stages.gate\n")
    found = imports("modeling_emovlm_kd.configuration_emovlm_kd", scratch, known)
    assert found == {"modeling_emovlm_kd.fusion", "train.stages.gate"}
    assert floor("train.stages.gate") > floor("modeling_emovlm_kd.configuration_emovlm_kd")
