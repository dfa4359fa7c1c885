"""Every command the docs show (the READMEs, docs/ and its results and notes) is accepted as written:
`distswitch` commands parse and their configs validate (names, values, overrides), `make` targets
exist and their ARGS validate; and every Python snippet runs, on what the command before it leaves
(a run's compact model). Nothing trains here: what a command needs at run time (data, a cluster, a
checkpoint an earlier command writes) is what the other tests run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from distswitch.build import validate_names
from distswitch.cli import _parser
from distswitch.config import load_config
from distswitch.driver.sweep import check as check_sweep

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "cluster/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")),
]
STARTS = ("distswitch ", "uv run distswitch ", "make ", "ray job submit ")


def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, indented ones (in a list item) too."""
    return re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, flags=re.S | re.M)


def _shell_commands(body: str) -> list[str]:
    """The block's commands as the shell runs them: continuations joined, `NAME="..."` variables and
    a `for NAME in a b; do ... done` loop's values and the environment substituted (`$NAME`, `${NAME}`)."""
    lines = [line.strip() for line in re.sub(r"\\\n\s*", " ", body).splitlines()]
    variables: dict[str, str] = {}
    loop: tuple[str, list[str]] | None = None
    found = []
    for line in lines:
        if m := re.fullmatch(r"([A-Za-z_]\w*)=(.+)", line):
            variables[m[1]] = shlex.split(m[2])[0]
        elif m := re.fullmatch(r"for (\w+) in (.+); do", line):
            loop = (m[1], m[2].split())
        elif line == "done":
            loop = None
        elif line.startswith(STARTS):
            for value in loop[1] if loop else [None]:
                bound = {**os.environ, **variables, **({loop[0]: value} if loop else {})}
                found.append(re.sub(r"\$\{?(\w+)\}?", lambda m, b=bound: b.get(m[1], m[0]), line))
    return found


def _inline_commands(text: str) -> list[str]:
    """Code spans in prose that are whole commands (placeholders such as DIR or `...` are not)."""
    prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    names = {f"distswitch {c}" for c in ("train", "tune", "sweep", "export", "data prepare")}  # named, not run
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
    assert any("sweep configs/fashion_mlp.yaml" in c for c in commands)  # a for loop's value
    assert not any("$" in c for c in commands)  # every variable substituted


@pytest.mark.parametrize(("doc", "command"), _commands(), ids=lambda v: v if len(v) < 60 else v[:57] + "...")
def test_every_readme_command_is_accepted_as_written(doc, command):
    _check(command)


def _compact_lenet5(path: Path) -> None:
    """What `make train` leaves at out_dir/model.pt: a compact LeNet5 for 1x28x28 Fashion-MNIST."""
    import torch

    from distswitch.export import architecture, compact_model, save_compact
    from distswitch.gates import find_gates
    from distswitch.models import create_tnn

    torch.manual_seed(0)
    model = create_tnn("lenet5", 1, 10, 28).eval()
    example = torch.zeros(1, 1, 28, 28)
    specs = find_gates(model, "all", "neuron", example)
    factors = [(torch.rand(s.factor_shape) > 0.5).float() for s in specs]
    plan = compact_model(model, specs, factors, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_compact(path, architecture("lenet5", 1, 10, 28, plan, model), model)


@pytest.mark.parametrize(("doc", "snippet"), _python_blocks())
def test_every_docs_python_snippet_runs_and_gives_what_its_comments_say(doc, snippet, tmp_path, monkeypatch):
    import torch
    from torch import nn

    monkeypatch.chdir(tmp_path)
    for name in re.findall(r"[\"'](outputs/[^\"']+\.pt)[\"']", snippet):  # a run's model, as the run leaves it
        _compact_lenet5(tmp_path / name)
    namespace: dict = {}
    exec(compile(snippet, f"{doc} (python block)", "exec"), namespace)
    models = [v for v in namespace.values() if isinstance(v, nn.Module)]
    for model in models:  # "plain nn.Module, eval mode"
        assert type(model).__module__.startswith("torch.nn") and not model.training
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
