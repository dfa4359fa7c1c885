"""The package's imports follow the data flow: a module never imports one downstream of it."""

from __future__ import annotations

import ast
from pathlib import Path

import distswitch

# Upstream first; a module may import its own level or any level before it.
LEVELS = [
    {"config", "registry"},
    {"data", "models"},
    {"gates"},
    {"switcher", "schedule"},
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


def _imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        tops |= {n.split(".")[1] for n in names if n.startswith("distswitch.")}
    return tops


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
