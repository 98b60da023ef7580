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
- The model's forwards (DeepSeekMoE, DecoderLayer, DSV3Model, MTP's loss) are a few statements
  that call their steps by name: no nested function, no dictionary of named values.
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


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module a `from ... import` names, relative imports (`from .quantize import`) resolved."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


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
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, path)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in modules or source in modules:
                        edges.add(target if target in modules else source)
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

    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        try:
            modules[path] = importlib.import_module(_module_name(path))
        except ModuleNotFoundError as missing:  # megatron_lm needs megatron.training (megatron-core >= 0.17)
            assert missing.name.startswith("megatron.training"), missing
    sources = sorted(PACKAGE.rglob("*.py"))
    homes = {name: {path for path, module in modules.items()
                    if any(value is entry for value in vars(module).values())}
             for name, entry in ((n, registry.get("schedule", n)) for n in registry.names("schedule"))}
    homes = {name: paths for name, paths in homes.items() if paths}  # entries a test registered live in tests
    assert homes, "no registered schedule is bound in a package module"
    code = [*sources, *sorted(PACKAGE.parent.glob("scripts/*.py")), *sorted(PACKAGE.parent.glob("examples/**/*.py"))]
    misplaced = []
    for path in code:
        tree = _tree(path)
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in homes and id(node) not in docstrings
                    and path not in homes[node.value]):
                misplaced.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not misplaced, "schedule names outside their descriptor's module: " + ", ".join(misplaced)


# The forwards read as the report's equations: each calls its steps directly, in a few statements.
# DualPipe's overlapped step cuts the same steps into pieces outside the model (pipeline/pieces.py).
PLAIN_FORWARDS = {  # (file, class, function; class None for a module function): the steps it calls
    ("model/moe/layer.py", "DeepSeekMoE", "forward"): {"route", "dispatch", "shared", "routed", "combine", "merge"},
    ("model/spec.py", "DecoderLayer", "forward"): {"attention", "post_attention_layernorm", "mlp"},
    ("model/gpt.py", "DSV3Model", "forward"): {"stage_input", "run_layer", "head_loss", "mtp_losses", "total_loss"},
    ("model/mtp.py", None, "mtp_loss"): {"depth_input", "depth_loss"},
}
MAX_FORWARD_STATEMENTS = 15


def _function(tree: ast.Module, owner, name: str) -> ast.FunctionDef:
    scope = tree.body if owner is None else next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner).body
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


def _called_name(func: ast.expr):
    """`step` for a call of `step`, `self.step` or `a.b.step`; None for a call of anything else
    (an item of a container, the result of another call)."""
    if isinstance(func, ast.Name):
        return func.id
    root = func
    while isinstance(root, ast.Attribute):
        root = root.value
    return func.attr if isinstance(func, ast.Attribute) and isinstance(root, ast.Name) else None


def plain_forward_problems(function: ast.FunctionDef, steps: set[str]) -> list[str]:
    """What keeps `function` from reading as plain code that calls `steps` directly."""
    body = function.body[1:] if ast.get_docstring(function) is not None else function.body
    nodes = [n for statement in body for n in ast.walk(statement)]
    problems = []
    statements = sum(isinstance(n, ast.stmt) for n in nodes)
    if statements > MAX_FORWARD_STATEMENTS:
        problems.append(f"{statements} statements (at most {MAX_FORWARD_STATEMENTS})")
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            problems.append(f"line {node.lineno}: a nested function or lambda")
        if isinstance(node, (ast.Dict, ast.DictComp)):
            problems.append(f"line {node.lineno}: a dictionary")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            problems.append(f"line {node.lineno}: a value looked up by the name {node.slice.value!r}")
        if isinstance(node, ast.Call) and _called_name(node.func) is None:
            problems.append(f"line {node.lineno}: a call of a computed value, not of a named step")
    called = {_called_name(n.func) for n in nodes if isinstance(n, ast.Call)}
    if steps - called:
        problems.append(f"does not call its steps {sorted(steps - called)}")
    return problems


@pytest.mark.parametrize("where", PLAIN_FORWARDS, ids=lambda w: f"{w[1] or w[0]}.{w[2]}")
def test_the_model_forwards_are_plain_code_calling_their_steps(where):
    path, owner, name = where
    problems = plain_forward_problems(_function(_tree(PACKAGE / path), owner, name), PLAIN_FORWARDS[where])
    assert not problems, f"{path} {owner or ''}.{name}: " + "; ".join(problems)
