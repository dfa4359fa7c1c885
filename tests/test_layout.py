"""The package's imports follow the data flow: a module never imports one downstream of it."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import distswitch

# Upstream first; a module may import its own level or any level before it.
LEVELS = [
    {"config", "registry", "io", "signals", "process"},
    {"manifest", "outbox"},
    {"data", "models", "optim", "fold", "coupling", "unit_weights"},
    {"gates", "stop"},  # stop: why a run ends for good (the errors of config, data, checkpoints)
    {"describe", "switcher", "schedule", "cost", "counting"},
    {"methods", "parallel"},
    {"engine", "export", "model_registry"},
    {
        "build",
        "checkpoint",
        "summary",
        "run_results",
        "delivery",
        "tracking",
    },  # what the worker and the driver both need
    {"artifacts", "compare"},
    {"worker", "driver"},  # siblings: neither imports the other (below)
    {"cli"},  # wires the worker's entry into the driver
]
SIBLINGS = ("worker", "driver")
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}
ROOT = Path(distswitch.__file__).parent


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


_IMPORTS = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    out[path] = names
print(json.dumps(out))
"""


@functools.cache
def _imports() -> dict[str, list[str]]:
    """Every package module's imported names. Parsed in a fresh interpreter: in a long test session
    CPython 3.11's ast.parse can fail with "AST constructor recursion depth mismatch" once other
    libraries have run (seen in CI after the Ray tests)."""
    paths = [str(p) for p in ROOT.rglob("*.py")]
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *paths], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _imported_tops(path: Path) -> set[str]:
    return {n.split(".")[1] for n in _imports()[str(path)] if n.startswith("distswitch.")}


def test_every_package_module_has_a_place_in_the_flow():
    tops = {_top(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}
    assert tops <= set(LEVEL), f"add {sorted(tops - set(LEVEL))} to LEVELS"


def test_no_module_imports_a_downstream_module():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.parent == ROOT and path.name == "__init__.py":
            continue
        here = LEVEL[_top(path)]
        for imported in _imported_tops(path):
            if LEVEL[imported] > here:
                offenders.append(f"{path.relative_to(ROOT)} imports distswitch.{imported}")
    assert offenders == []


def test_the_engine_imports_no_ray_mlflow_or_ffcv():
    text = (ROOT / "engine.py").read_text()
    for name in ("ray", "mlflow", "ffcv"):
        assert f"import {name}" not in text and f"from {name}" not in text


def test_the_worker_and_the_driver_never_import_each_other():
    offenders = []
    for here, other in (SIBLINGS, SIBLINGS[::-1]):
        for path in (ROOT / here).rglob("*.py"):
            if other in _imported_tops(path):
                offenders.append(f"{path.relative_to(ROOT)} imports distswitch.{other}")
    assert offenders == []


def test_only_the_worker_session_and_entry_touch_ray_on_the_worker_side():
    """Inside worker/, Ray is the session's business (and the entry function's), not the loop's."""
    for path in (ROOT / "worker").rglob("*.py"):
        names = [n for n in _imports()[str(path)] if n == "ray" or n.startswith("ray.")]
        if path.name not in ("session.py", "train.py"):
            assert names == [], f"{path.relative_to(ROOT)} imports {names}"


_SIZES = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    text = open(path).read()
    out[path] = [text.count("\\n"), [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
                                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]
print(json.dumps(out))
"""


def test_no_package_module_is_over_400_lines_or_has_a_function_over_60():
    paths = [str(p) for p in ROOT.rglob("*.py")]
    proc = subprocess.run([sys.executable, "-c", _SIZES, *paths], capture_output=True, text=True, check=True)
    long_modules, long_functions = [], []
    for path, (lines, functions) in json.loads(proc.stdout).items():
        where = str(Path(path).relative_to(ROOT))
        if lines > 400:
            long_modules.append(f"{where} ({lines} lines)")
        long_functions += [f"{where}:{name} ({n} lines)" for name, n in functions if n > 60]
    assert long_modules == [] and long_functions == []
