"""Facts about the code's structure that keep the run's data flow one-way and its state explicit.

- The trainer (and everything below the launcher) imports nothing from `megatron_dsv3.launch`.
- No code writes a class attribute (`Router.count_load = ...`): step-dependent values travel as
  arguments. Module-level state is written only by `initialize_*` functions (process groups).
  The version/CPU shims in `megatron_dsv3/compat/` patch Megatron-Core and torch on purpose,
  scoped and undone, and are exempt.
- Every run setting's default and check is declared once, as a field of a `run_config` section.
- Every collective goes through `megatron_dsv3.parallel.comm`, which puts its tensor on the device
  its group's backend serves (NCCL would refuse a CPU tensor): on a CPU-only machine every tensor
  is on the CPU, so the structure, not a run, is what can catch a collective that bypasses it.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_dsv3"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "compat" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", [p for p in SOURCES if "launch" not in p.parts and p.name != "launch.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_launcher_imports_it(path):
    for node in ast.walk(_tree(path)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(n == "megatron_dsv3.launch" or n.startswith("megatron_dsv3.launch.") for n in names), (
            f"{path.relative_to(PACKAGE)}:{node.lineno} imports the launcher")


def _class_names(tree: ast.Module) -> set[str]:
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return defined | {name for name in imported if name[:1].isupper()}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_class_attribute_or_module_global_is_written_outside_initialisation(path):
    tree = _tree(path)
    classes = _class_names(tree)
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                assert target.value.id not in classes, (
                    f"{path.relative_to(PACKAGE)}:{node.lineno} writes class attribute {target.value.id}.{target.attr}")
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Global):
                    assert node.name.startswith("initialize"), (
                        f"{path.relative_to(PACKAGE)}:{inner.lineno} writes module globals {inner.names} "
                        f"in {node.name}()")


def test_every_run_setting_is_one_checked_field():
    from megatron_dsv3.run_config import SECTIONS

    for name, section in SECTIONS.items():
        for field in dataclasses.fields(section):
            assert callable(field.metadata.get("check")), f"{name}.{field.name} has no check"
    # No other module keeps defaults for these sections (the old DEFAULTS dictionaries).
    for path in SOURCES:
        if path.name != "run_config.py":
            text = path.read_text()
            for stale in ("LAUNCH_DEFAULTS", "DEFAULT_LOGGING", "DEFAULTS = {", "log_interval"):
                assert stale not in text, f"{path.relative_to(PACKAGE)} defines {stale}"


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
               "broadcast", "broadcast_object_list", "all_gather_object", "barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv"}


def _is_torch_distributed(node: ast.expr, aliases: set[str]) -> bool:
    return (isinstance(node, ast.Name) and node.id in aliases) or (
        isinstance(node, ast.Attribute) and node.attr == "distributed"
        and isinstance(node.value, ast.Name) and node.value.id == "torch")


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "comm.py"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_collective_goes_through_the_device_placing_helper(path):
    tree = _tree(path)
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
               if a.name == "torch.distributed" and a.asname}
    direct = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              and n.module == "torch.distributed" for a in n.names if a.name in COLLECTIVES}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        bypass = ((isinstance(func, ast.Attribute) and func.attr in COLLECTIVES
                   and _is_torch_distributed(func.value, aliases))
                  or (isinstance(func, ast.Name) and func.id in direct))
        assert not bypass, (f"{path.relative_to(PACKAGE)}:{node.lineno} calls a torch.distributed collective "
                            "directly; use megatron_dsv3.parallel.comm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every package module -> the package modules it imports, at the top of the file or inside a
    function alike (a function-local import only hides a circle). `from a.b import c` counts as
    importing `a.b.c` when that is a module, else `a.b`; a parent package's `__init__`, which Python
    runs first, is not counted (the root's imports every module that registers built-ins)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        edges = graph.setdefault(_module_name(path), set())
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return graph


def test_no_import_circle_among_the_package_modules():
    graph = import_graph()
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the module's, classes' and functions' docstring constants."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_a_schedule_name_is_written_only_in_its_descriptors_module():
    """Everything that depends on the pipeline schedule reads its `Schedule` descriptor: a
    registered schedule's name appears as a string literal (docstrings aside) only in the module
    that binds its registry entry, and in tests (the scripts and examples count as code; run
    configs, which choose a schedule by name, are not code)."""
    import importlib

    from megatron_dsv3 import registry

    modules = {path: importlib.import_module(_module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))}
    homes = {name: {path for path, module in modules.items()
                    if any(value is entry for value in vars(module).values())}
             for name, entry in ((n, registry.get("schedule", n)) for n in registry.names("schedule"))}
    homes = {name: paths for name, paths in homes.items() if paths}  # entries a test registered live in tests
    assert homes, "no registered schedule is bound in a package module"
    code = [*modules, *sorted(PACKAGE.parent.glob("scripts/*.py")), *sorted(PACKAGE.parent.glob("examples/*.py"))]
    misplaced = []
    for path in code:
        tree = _tree(path)
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in homes and id(node) not in docstrings
                    and path not in homes[node.value]):
                misplaced.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not misplaced, "schedule names outside their descriptor's module: " + ", ".join(misplaced)
