"""The house plan holds: no import cycle, nothing below the stages imports a stage, and each
dvc.yaml stage depends on exactly the source files its stage really imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlpipe.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "dlpipe"
STAGES = ("collect", "preprocess", "tune", "train", "evaluate", "register")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path:
    path = SRC.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def import_graph() -> dict[str, set[str]]:
    """module -> the dlpipe modules it imports, function-local imports included. `from
    dlpipe.x import y` counts as importing dlpipe.x.y when that is a module, else dlpipe.x."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("dlpipe")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dlpipe"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_import_graph_has_no_cycle():
    graph = import_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_only_stages_import_stages():
    stage_modules = {f"dlpipe.{s}" for s in STAGES}
    offenders = {
        name: sorted(edges & stage_modules)
        for name, edges in import_graph().items()
        if name not in stage_modules and edges & stage_modules
    }
    assert not offenders, f"modules below the stages import a stage: {offenders}"


# Packages whose modules a stage picks by config at run time (format_module, get_task, and the
# task's `module()` for training), so all of them count as imported by that stage.
DISPATCH = {
    "collect": (),
    "preprocess": ("dlpipe.formats",),
    "tune": ("dlpipe.tasks", "dlpipe.modules", "dlpipe.formats"),
    "train": ("dlpipe.tasks", "dlpipe.modules", "dlpipe.formats"),
    "evaluate": ("dlpipe.tasks", "dlpipe.formats"),
    "register": ("dlpipe.tasks", "dlpipe.formats"),
}


def imported_files(stage: str) -> set[str]:
    """The dlpipe source files that the stage's script `pipelines/<stage>.py` loads, with every
    module of the packages it dispatches on (DISPATCH)."""
    code = f"""
import importlib, importlib.util, json, pkgutil, sys
script = importlib.util.spec_from_file_location("stage_script", "pipelines/{stage}.py")
script.loader.exec_module(importlib.util.module_from_spec(script))  # its imports, not main()
for package in {DISPATCH[stage]!r}:
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{{package}}.{{info.name}}")
print(json.dumps(sorted(m for m in sys.modules if m == "dlpipe" or m.startswith("dlpipe."))))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    names = json.loads(out.stdout.strip().splitlines()[-1])
    return {module_path(n).relative_to(ROOT).as_posix() for n in names}


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_what_the_stage_imports(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    source_deps = [d for d in deps if d.startswith("src/")]
    files = imported_files(stage)
    missing = sorted(f for f in files if not covered(f, source_deps))
    assert not missing, f"dvc.yaml stage {stage} misses deps on {missing}"
    unused = sorted(d for d in source_deps if not any(covered(f, [d]) for f in files))
    assert not unused, f"dvc.yaml stage {stage} depends on {unused}, which it never imports"
    # A folder dependency must be wholly used, or editing an unused file would re-run the stage.
    for d in source_deps:
        if (ROOT / d).is_dir():
            in_folder = {p.relative_to(ROOT).as_posix() for p in (ROOT / d).rglob("*.py")}
            assert in_folder <= files, f"{stage}: {d} holds {sorted(in_folder - files)} unused"
    assert f"pipelines/{stage}.py" in deps


# What each stage's process must not load (issue 13): every import costs seconds in every fresh
# stage interpreter. collect and preprocess (with every format module they may dispatch to) need
# no Lightning, MLflow or Optuna; evaluate and register neither Lightning nor Optuna (with the
# task module that get_task picks at run time: the test after this one).
NOT_LOADED = {
    "collect": ("lightning", "mlflow", "optuna"),
    "preprocess": ("lightning", "mlflow", "optuna"),
    "evaluate": ("lightning", "optuna"),
    "register": ("lightning", "optuna"),
}


@pytest.mark.parametrize("stage", sorted(NOT_LOADED))
def test_stage_imports_no_heavy_package_it_does_not_use(stage):
    dispatch = tuple(p for p in DISPATCH[stage] if p != "dlpipe.tasks")
    code = f"""
import importlib, importlib.util, json, pkgutil, sys
script = importlib.util.spec_from_file_location("stage_script", "pipelines/{stage}.py")
script.loader.exec_module(importlib.util.module_from_spec(script))  # its imports, not main()
for package in {dispatch!r}:
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{{package}}.{{info.name}}")
print(json.dumps([p for p in {NOT_LOADED[stage]!r} if p in sys.modules]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not loaded, f"pipelines/{stage}.py loads {loaded}, which it does not use"


# Every task keeps its Lightning side in dlpipe.modules (issue 13): evaluate and register load
# no Lightning at all, the task module `get_task` picks at run time included.
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("stage", ["evaluate", "register"])
def test_evaluate_and_register_of_a_split_task_load_no_lightning(stage, task):
    code = f"""
import importlib.util, sys
script = importlib.util.spec_from_file_location("stage_script", "pipelines/{stage}.py")
script.loader.exec_module(importlib.util.module_from_spec(script))  # its imports, not main()
from dlpipe.tasks import get_task
get_task({task!r})
print("lightning" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip().splitlines()[-1] == "False", f"{stage} of {task} loads Lightning"


def test_every_torch_load_says_weights_only():
    """torch.load unpickles arbitrary code unless weights_only=True; relying on torch's current
    default is relying on something that has changed before."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
