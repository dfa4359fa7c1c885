"""Every command the READMEs show is accepted as written: `distswitch` commands parse and their
configs validate (names, values, overrides), `make` targets exist and their ARGS validate, and the
Python snippets' imports resolve. Nothing trains here: what a command needs at run time (data, a
cluster, a checkpoint an earlier command writes) is what the other tests run."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from distswitch.build import validate_names
from distswitch.cli import _parser
from distswitch.config import load_config
from distswitch.driver.sweep import check as check_sweep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/usage.md", "docs/architecture.md", "cluster/README.md"]
STARTS = ("distswitch ", "uv run distswitch ", "make ", "ray job submit ")


def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def _shell_commands(body: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(STARTS)]


def _inline_commands(text: str) -> list[str]:
    """Code spans in prose that are whole commands (placeholders such as DIR or `...` are not)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    names = {"distswitch train", "distswitch tune", "distswitch sweep"}  # the commands named, not run
    return [
        s
        for s in spans
        if s.startswith(STARTS) and s not in names and "..." not in s and not re.search(r"\b[A-Z]{3,}\b(?!=)", s)
    ]


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for lang, body in _fenced(text):
            if lang in ("bash", "sh", ""):
                found += [(doc, c) for c in _shell_commands(body)]
        found += [(doc, c) for c in _inline_commands(text)]
    return found


def _python_blocks() -> list[tuple[str, str]]:
    return [(doc, body) for doc in DOCS for lang, body in _fenced((ROOT / doc).read_text()) if lang == "python"]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def _check_distswitch(argv: list[str]) -> None:
    args = _parser().parse_args(argv)  # SystemExit(2) on a flag or argument the CLI does not take
    if args.command in ("train", "tune", "sweep"):
        if args.config.startswith("outputs/"):
            return  # written by the command before it (tune's best_config.yaml)
        cfg = load_config(ROOT / args.config, args.overrides)
        validate_names(cfg)
        if args.command == "sweep":
            check_sweep(cfg)  # every trial's config


def _check(command: str) -> None:
    argv = shlex.split(command, comments=True)
    if argv[-1] == "&":  # started in the background
        argv = argv[:-1]
    if argv[:2] == ["uv", "run"]:
        argv = argv[2:]
    if argv[0] == "distswitch":
        _check_distswitch(argv[1:])
    elif argv[0] == "ray":
        assert "--" in argv, "a submitted job's entrypoint follows `--`"
        _check_distswitch(argv[argv.index("--") + 2 :])
    elif argv[0] == "make":
        targets = [a for a in argv[1:] if "=" not in a and not a.startswith("[")]
        variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("["))
        assert set(targets) <= _make_targets(), f"no such make target: {sorted(set(targets) - _make_targets())}"
        if "train" in targets:
            cfg = load_config(
                ROOT / variables.get("CONFIG", "configs/fashion_lenet5.yaml"), shlex.split(variables.get("ARGS", ""))
            )
            validate_names(cfg)
    else:
        raise AssertionError(f"no check for {command!r}")


def test_the_readmes_show_commands_to_check():
    # The parsers above must keep finding what the READMEs show, or the test below checks nothing.
    commands = [c for _, c in _commands()]
    assert any("distswitch train configs/fashion_lenet5.yaml train.epochs=3" in c for c in commands)
    assert any(c.startswith("make train ARGS=") for c in commands)
    assert any("distswitch tune" in c and "train.epochs=2" in c for c in commands)
    assert any(c.startswith("ray job submit") for c in commands)
    assert _python_blocks()


@pytest.mark.parametrize(("doc", "command"), _commands(), ids=lambda v: v if len(v) < 60 else v[:57] + "...")
def test_every_readme_command_is_accepted_as_written(doc, command):
    _check(command)


@pytest.mark.parametrize(("doc", "snippet"), _python_blocks())
def test_every_readme_python_snippet_imports_what_exists(doc, snippet):
    for module, names in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", snippet, flags=re.M):
        imported = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(imported, name.strip()), f"{doc}: {module} has no {name.strip()}"
