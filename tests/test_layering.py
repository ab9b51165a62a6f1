"""Who imports whom (DESIGN.md, "Who imports whom"), read from the source with `ast`: every import
statement, at module level or inside a function, and importlib.import_module / __import__ of a
literal name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ce_export": ROOT / "ce_export", "ce_calibrate": ROOT / "calibrate" / "ce_calibrate",
            "ce_kernels": ROOT / "plugins" / "ce_kernels"}
# Where imports may cross a package boundary. ce_calibrate may import any of ce_export but its
# command line, and ce_export none of ce_calibrate (its commands come through an entry point); the
# other directions only these:
OP_TO_KERNELS = "ce_export.ops"  # the CUDA implementation of ce_export::moe
KERNELS_TO_MATH = {"ce_export", "ce_export.moe_math"}  # the kernels implement moe_math's routings and checks


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(module: str, path: Path) -> set[str]:
    """Dotted names `module` imports (for `from a import b`: a.b when that is a module, else a)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and ast.unparse(node.func) in ("importlib.import_module",
                                                                                       "__import__")):
            names.add(node.args[0].value)
    return names


def our_module(name: str) -> str | None:
    """The module of ours that importing `name` runs last (a.b.c: a.b.c, or a.b when c is an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports, including the packages above each one that importing
    it runs (their __init__), except the importer's own (already running when it imports)."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for name in imported_names(module, path):
            target = our_module(name)
            while target:
                if target != module and not module.startswith(target + "."):
                    targets.add(target)
                target = target.rpartition(".")[0]
        graph[module] = targets
    return graph


GRAPH = import_graph()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package(module: str) -> str:
    return module.partition(".")[0]


def crossings(source: str, target: str) -> list[tuple[str, str]]:
    return sorted((module, imported) for module, targets in GRAPH.items() for imported in targets
                  if package(module) == source and package(imported) == target)


def test_the_graph_sees_known_imports():
    assert "ce_export.capture" in GRAPH["ce_export.export"]  # module level
    assert "ce_export.pipeline" in GRAPH["ce_export.cli"]  # inside a function
    assert "ce_kernels.fused_moe" in GRAPH["ce_export.ops"]
    assert len([m for m in MODULES if package(m) == "ce_export"]) > 30


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ce_export_never_imports_ce_calibrate():
    assert crossings("ce_export", "ce_calibrate") == []


def test_ce_calibrate_does_not_import_the_command_line():
    assert {imported for _, imported in crossings("ce_calibrate", "ce_export")} & {"ce_export.cli",
                                                                                    "ce_export.__main__"} == set()


def test_the_command_line_finds_calibrate_and_trim_through_the_entry_point():
    from importlib.metadata import entry_points

    from ce_export.cli import COMMANDS_GROUP, parse_args

    assert [entry.value for entry in entry_points(group=COMMANDS_GROUP)] == ["ce_calibrate.commands:add_commands"]
    assert parse_args(["trim", "m", "--stats", "s.json", "--out", "o"]).run.__module__ == "ce_calibrate.commands"


def test_ce_export_reaches_ce_kernels_only_from_the_op():
    assert {importer for importer, _ in crossings("ce_export", "ce_kernels")} == {OP_TO_KERNELS}


def test_ce_kernels_reaches_ce_export_only_for_the_math():
    assert {imported for _, imported in crossings("ce_kernels", "ce_export")} <= KERNELS_TO_MATH
    assert GRAPH["ce_export.moe_math"] == set()


def test_ce_calibrate_and_ce_kernels_do_not_import_each_other():
    assert crossings("ce_kernels", "ce_calibrate") == [] and crossings("ce_calibrate", "ce_kernels") == []
