"""The package's shape: imports only go down. Every ``import`` of a megatron_let module counts,
whether at module level or inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_let"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module → the megatron_let modules it imports (names resolved to the defining module)."""
    known = modules()

    def owner(name: str) -> str:
        while name not in known:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("megatron_let")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("megatron_let"):
                    targets |= {owner(f"{base}.{a.name}") for a in node.names}
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    circles = cycles(graph)
    detail = "\n".join(
        " ↔ ".join(c) + "\n    " + "; ".join(f"{m} → {sorted(graph[m] & set(c))}" for m in c) for c in circles
    )
    assert not circles, f"import circles:\n{detail}"


def test_the_cycle_check_finds_a_circle():
    """The check itself: a made-up graph with a circle is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_config_is_a_leaf():
    assert import_graph()["megatron_let.config"] == set()


# The layers, bottom up (docs/ARCHITECTURE.md): a package may import its own layer and those below.
LAYERS = [
    {"config"},
    {"alignment", "distillation", "platform"},
    {"model"},
    {"flops", "data", "checkpoint"},
    {"convert"},
    {"objectives"},
    {"training"},
    {"run_config", "evaluation"},
    {"apps", "train"},
    {"cli", "megatron_let"},
]


def part(module: str) -> str:
    """megatron_let.platform.cpu → platform; megatron_let.config → config; megatron_let → megatron_let."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def test_imports_only_go_down_the_layers():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    graph = import_graph()
    unplaced = sorted({part(m) for m in graph} - level.keys())
    assert not unplaced, f"place these in LAYERS (and docs/ARCHITECTURE.md): {unplaced}"
    upward = sorted(f"{m} → {t}" for m, targets in graph.items() for t in targets if level[part(t)] > level[part(m)])
    assert not upward, "imports going up:\n" + "\n".join(upward)


def test_the_architecture_page_names_every_package():
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and p.name != "__pycache__"}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = sorted(name for name in packages | modules if f"{name}/" not in page and f"{name}.py" not in page)
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
