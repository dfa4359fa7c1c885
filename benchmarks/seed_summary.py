"""Mean and spread over seeds of tables written by fashion_table.py.

uv run python benchmarks/seed_summary.py outputs/table_mlp outputs/table_mlp_seed1 outputs/table_mlp_seed2
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    labels = sorted({p.parent.name for d in dirs for p in Path(d).glob("*/summary.json")})
    print("| run | seeds | test acc mean ± std | kept units mean (min–max) |\n|---|---|---|---|")
    for label in labels:
        runs = [json.loads(p.read_text()) for d in dirs if (p := Path(d) / label / "summary.json").exists()]
        acc = [r["test_acc"] for r in runs]
        kept = [r["kept_fraction"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(
            f"| {label} | {len(runs)} | {statistics.mean(acc):.4f} ± {spread:.4f} | "
            f"{statistics.mean(kept):.1%} ({min(kept):.1%}–{max(kept):.1%}) |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
