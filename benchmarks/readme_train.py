"""The README's `make train` output, from a real run: runs `make train` (the default job), then writes
its last two epoch lines, its summary lines and a sentence on the budget into README.md between the
`make-train` markers. The README's figures are then what the shipped config gives today.

    uv run python benchmarks/readme_train.py [--out-dir outputs/readme_train] [--keep-readme]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "outputs/fashion_lenet5"
START, END = "<!-- make-train: written by benchmarks/readme_train.py -->", "<!-- /make-train -->"


def block(lines: list[str], summary: dict, minutes: float, when: str, out_dir: str) -> str:
    """The README's block; paths shown as the default job's (`make train` writes outputs/fashion_lenet5)."""
    epochs = [line for line in lines if re.search(r"\bepoch \d+/\d+ ", line)]
    tail = [line.replace(out_dir, DEFAULT_OUT) for line in lines if line.startswith(("switch ", "results: "))]
    kept = summary["kept_per_layer"]
    widths = ", ".join(f"{row['kept']} of {row['units']} ({layer})" for layer, row in kept.items())
    cfg = summary["config"]
    return "\n".join(
        [
            START,
            f"The end of a real `make train` ({when}, `configs/fashion_lenet5.yaml`: LeNet5, {cfg['train']['epochs']} "
            f"epochs, {summary['workers']} Ray workers, asking for {cfg['budget']['fraction']:.0%} of the dense MACs; "
            f"{minutes:.0f} minutes on this machine, start-up included):",
            "",
            "```",
            *epochs[-2:],
            *tail,
            "```",
            "",
            f"The budget is met on the exported model: {summary['compact']['macs']:,} / {summary['dense']['macs']:,} = "
            f"{summary['compact']['macs'] / summary['dense']['macs']:.5f} of the MACs (weight products of the "
            f"convolutions and linear layers), by keeping {widths}.",
            END,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs/readme_train")
    parser.add_argument("--keep-readme", action="store_true", help="print the block instead of writing README.md")
    args = parser.parse_args(argv)
    out = ROOT / args.out_dir
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    proc = subprocess.run(
        ["make", "-s", "train", f"ARGS=out_dir={args.out_dir}"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    # Ray colours the worker prefix; a README shows the text.
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip() for line in (proc.stdout + proc.stderr).splitlines()]
    text = block(
        lines,
        json.loads((out / "summary.json").read_text()),
        (time.time() - started) / 60,
        time.strftime("%Y-%m-%d"),
        args.out_dir,
    )
    if args.keep_readme:
        print(text)
        return 0
    readme = ROOT / "README.md"
    current = readme.read_text()
    written = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: text, current, flags=re.S)
    if written == current and text not in current:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    readme.write_text(written)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
