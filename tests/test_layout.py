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
    {"config", "registry", "io"},
    {"data", "models", "optim"},
    {"gates"},
    {"switcher", "schedule", "cost"},
    {"methods", "parallel"},
    {"engine", "export", "tracking"},
    {"run"},
    {"launch"},
    {"tune"},
    {"cli"},
]
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
