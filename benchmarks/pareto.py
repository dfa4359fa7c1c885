"""Accuracy against MACs at equal budgets: every method under one protocol, over seeds, with the
paired statistics a research claim needs.

The runs are `distswitch sweep`'s (one sweep: each run a Ray Tune trial with its own Train worker,
as many at once as the machine holds), with the variants below as `sweep.variants`. Every method
gets the same total epochs, the same learning-rate schedule, the same fine-tuning epochs after its
last cut, the same warm-up (the switcher's dense epochs; gradual baselines start cutting there too),
and the same selection: the best validation epoch among those at the budget, tested once.

A run whose record (--record) or trial summary exists is not run again, so a killed benchmark
continues where it stopped (a sweep killed mid-grid is resumed by Tune itself). The table compares
each method with a reference per seed (paired: the same seed's data order and initialisation) and
with McNemar's exact test on the pooled test predictions.

    uv run python benchmarks/pareto.py --out outputs/pareto                       # the full sweep
    uv run python benchmarks/pareto.py --out outputs/p --models mlp --budgets 0.3 0.15   # reduced
    uv run python benchmarks/pareto.py --out outputs/p --quick                    # smoke (CI-sized)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from distswitch.compare import figure  # the figure `distswitch compare` draws from an MLflow store

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "mlp": ROOT / "configs/fashion_mlp.yaml",
    "lenet5": ROOT / "configs/fashion_lenet5.yaml",
    "resnet20": ROOT / "configs/fashion_lenet5.yaml",
}
# A model's own overrides on its config: ResNet-20 on Fashion-MNIST at CIFAR's shape (3x32x32).
MODEL_SET = {"resnet20": ["model.name=resnet20", "data.channels=3", "data.image_size=32"]}
SPARSE_LEARNING = 3e-3  # MLP at 15%, seed 0: switch 0.8788 / 0.8859 / 0.8673 at 3e-4 / 3e-3 / 1e-2; gradual magnitude 0.8851 at 3e-3, 0.8858 at 1e-2
# The switcher as first built (the schema's defaults), whatever the configs ship: every "switch" variant
# starts from it, so a variant's name means the same run in every record (the configs ship issue 36's
# choice, "switch-fair-rank").
SWITCH = [
    "method=switch",
    "switcher.gate=factor",
    "switcher.ties=index",
    "schedule.snn_steps=replace",
    "switcher.allocation=global",
]
# Issue 36's fair dynamics: a 0/1 gate (factors straight through), tied zeros ordered by the switcher's
# score, and an SNN step as an extra step (the TNN steps every batch).
FAIR = ["switcher.gate=hard", "switcher.ties=score", "schedule.snn_steps=extra"]
# Method variants: name -> overrides.
VARIANTS = {
    "dense": ["method=dense"],
    "switch": SWITCH,
    "switch-incoming": [*SWITCH, "switcher.describe=incoming"],
    "switch-norevive": [*SWITCH, "switcher.revive=false"],
    # Fewer TNN steps lost to SNN steps (1 in 9 instead of 1 in 5), the switcher's rate doubled.
    "switch-r8": [*SWITCH, "schedule.update_ratio=8", "optim.snn.lr=2e-3"],
    # No pressure toward the budget while switching: zeros from the ReLU only, the ramp of cuts alone.
    "switch-l1-0": [*SWITCH, "switcher.l1=0"],
    # Issue 36's fair dynamics, each alone: a 0/1 gate (factors straight through), tied zeros ordered
    # by the switcher's score, and an SNN step as an extra step (the TNN steps every batch).
    "switch-hard": [*SWITCH, "switcher.gate=hard"],
    "switch-ties": [*SWITCH, "switcher.ties=score"],
    "switch-extra": [*SWITCH, "schedule.snn_steps=extra"],
    "switch-fair": [*SWITCH, *FAIR],
    "switch-fair-rank": [*SWITCH, *FAIR, "switcher.allocation=rank"],
    # Issue 36's relational switcher (messages along the weights between units), alone and with the fair dynamics.
    "switch-graph": [*SWITCH, "switcher.arch=graph"],
    "switch-fair-graph": [*SWITCH, "switcher.arch=graph", *FAIR],
    # The relational switcher choosing the units within magnitude's per-layer shares (rank allocation).
    "switch-fair-graph-rank": [*SWITCH, "switcher.arch=graph", *FAIR, "switcher.allocation=rank"],
    "magnitude": ["method=magnitude"],
    "magnitude-group": ["method=magnitude", "prune.importance=group"],
    "magnitude-gradual-group": ["method=magnitude", "prune.schedule=gradual", "prune.importance=group"],
    "magnitude-gradual": ["method=magnitude", "prune.schedule=gradual"],
    # The peer check: Torch-Pruning's own pruner (group-norm importance, global ranking), our fine-tuning.
    "torch-pruning": ["method=torch-pruning"],
    "slimming": ["method=slimming"],
    "slimming-gradual": ["method=slimming", "prune.schedule=gradual"],
    # Sparse learning (train to be prunable): the same strength for every method.
    "switch-sl": [*SWITCH, f"budget.sparse_learning={SPARSE_LEARNING}"],
    "magnitude-sl": ["method=magnitude", f"budget.sparse_learning={SPARSE_LEARNING}"],
    "magnitude-gradual-sl": ["method=magnitude", "prune.schedule=gradual", f"budget.sparse_learning={SPARSE_LEARNING}"],
}
REFERENCE = "magnitude"  # the paired comparisons' reference (--reference)


def protocol(args) -> list[str]:
    """Overrides every run shares (the config supplies optimiser, schedule and data)."""
    common = [
        f"train.epochs={args.epochs}",
        f"schedule.warmup_epochs={args.warmup}",
        f"schedule.finetune_epochs={args.finetune}",
        f"prune.finetune_epochs={args.finetune}",
        f"switcher.l1={args.l1}",
        "switcher.target_kept=null",
        "data.loader=torch",
        "tracking.enabled=false",
        "train.progress=false",
        "distributed.num_workers=1",
        f"budget.kind={args.kind}",
        "train.channels_last=true",
    ]  # NHWC convolutions: LeNet5 trains ~1.5x faster on a CPU core
    if args.train_limit:
        common += [f"data.train_limit={args.train_limit}", "data.val_size=500"]
    return common + list(args.set)


def _name(model: str, variant: str, budget: float | None, seed: int) -> str:
    return f"{model}-{variant}" + (f"-b{budget:g}" if budget is not None else "") + f"-s{seed}"


def finished(model: str, args, out: Path) -> dict:
    """Every finished run of `model`, keyed (variant, budget, seed): its record, else its trial's summary."""
    done = {}
    for path in sorted(out.glob(f"sweeps/{model}-*/trials/*/summary.json")):
        s = json.loads(path.read_text())
        done[(s["config"]["sweep"]["variant"], s["config"]["budget"]["fraction"], s["config"]["train"]["seed"])] = s
    if args.record:
        for path in sorted(Path(args.record).glob(f"{model}-*.json")):
            s = json.loads(path.read_text())
            budget, seed = s["config"]["budget"]["fraction"], s["config"]["train"]["seed"]
            # Records of the in-process runs before the sweep name their variant in the file name only.
            suffix = len(_name("", "", budget, seed)) - 1
            variant = (s["config"].get("sweep") or {}).get("variant") or path.stem[len(model) + 1 : -suffix]
            if _name(model, variant, budget, seed) == path.stem:
                done[(variant, budget, seed)] = s
    return done


def sweep(model: str, variants: dict[str, list[str]], budgets: list, seeds: list[int], args, out: Path) -> None:
    """`distswitch sweep` of variants x budgets x seeds (in its own folder: a rerun resumes it)."""
    from distswitch.cli import main as distswitch
    from distswitch.config import parse_override

    # Parsed as the command line parses them (2e-3 a number, as yaml.safe_load would not).
    defined = {
        name: {".".join(key): value for key, value in map(parse_override, overrides)}
        for name, overrides in variants.items()
    }
    folder = out / "sweeps" / (f"{model}-" + "+".join(sorted(variants)) + "-b" + "+".join(f"{b}" for b in budgets))
    argv = [
        "sweep",
        str(CONFIGS[model]),
        *MODEL_SET.get(model, []),
        *protocol(args),
        f"out_dir={folder}",
        f"sweep.methods={json.dumps(sorted(variants))}",
        f"sweep.budgets={json.dumps(budgets)}",
        f"sweep.seeds={json.dumps(seeds)}",
        f"sweep.variants={json.dumps(defined)}",
    ]
    print(f"[pareto] sweep {folder.name}: seeds {seeds}: {' '.join(argv[2:])}", flush=True)
    start = time.perf_counter()
    if distswitch(argv) != 0:
        raise SystemExit(f"pareto: the sweep in {folder} failed (its log above); rerun to resume it")
    print(f"[pareto] sweep {folder.name}: {time.perf_counter() - start:.0f} s", flush=True)


def run_grid(model: str, cells: dict[str, list], seeds: list[int], args, out: Path) -> dict:
    """Each variant at its budgets x `seeds`, the missing runs only: one sweep for the variants
    missing every run, one per (variant, budget) for the rest. Returns every finished run."""
    done = finished(model, args, out)
    if args.report_only:
        return done
    missing = {(v, b): [s for s in seeds if (v, b, s) not in done] for v, budgets in cells.items() for b in budgets}
    fresh = [v for v, budgets in cells.items() if all(missing[(v, b)] == seeds for b in budgets)]
    for budgets in {tuple(cells[v]) for v in fresh}:  # variants with the same budgets share a sweep
        group = [v for v in fresh if tuple(cells[v]) == budgets]
        sweep(model, {v: VARIANTS[v] for v in group}, list(budgets), seeds, args, out)
    for (variant, budget), todo in missing.items():
        if variant not in fresh and todo:
            sweep(model, {variant: VARIANTS[variant]}, [budget], todo, args, out)
    done = finished(model, args, out)
    if args.record:  # results as data: committed, a benchmark resumes from them on any machine
        Path(args.record).mkdir(parents=True, exist_ok=True)
        for key, summary in done.items():
            record = Path(args.record) / f"{_name(model, *key)}.json"
            if not record.exists():
                record.write_text(json.dumps(summary, indent=1))
    return done


def widths_of(summary: dict) -> str:
    return "{" + ", ".join(f'"{layer}": {row["kept"]}' for layer, row in summary["kept_per_layer"].items()) + "}"


def diagnose(model: str, budgets: list[float], seeds: list[int], done: dict, args, out: Path) -> dict:
    """Split a gap into allocation and selection: each method's ranking with the other's per-layer
    widths (`budget.widths`, from the same seed and budget), run under the same protocol."""
    for budget in budgets:
        for seed in seeds:
            switch, magnitude = done.get(("switch", budget, seed)), done.get(("magnitude", budget, seed))
            if switch is None or magnitude is None:
                continue
            for variant, other, label in (
                ("magnitude", switch, "magnitude@switch-widths"),
                ("switch", magnitude, "switch@magnitude-widths"),
            ):
                VARIANTS[label] = [*VARIANTS[variant], f"budget.widths={widths_of(other)}"]
                if (label, budget, seed) not in done and not args.report_only:
                    sweep(model, {label: VARIANTS[label]}, [budget], [seed], args, out)
    return finished(model, args, out)


def test_predictions(summary: dict) -> torch.Tensor:
    """Per test example: was the compact model right? (for McNemar's paired test)."""
    from distswitch.config import Config
    from distswitch.data import make_loaders
    from distswitch.export import load_compact

    cfg = Config.from_dict({"data": summary["config"]["data"]})  # the test split is all it needs
    loaders = make_loaders(cfg, 0, 1, torch.device("cpu"))
    model = load_compact(summary["model_path"])
    right = []
    with torch.no_grad():
        for x, y in loaders.test:
            right.append(model(x.float()).argmax(1) == y)
    return torch.cat(right)


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """(a right & b wrong, a wrong & b right, exact two-sided p)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: dict, args) -> list[dict]:
    rows = []
    for (model, variant, budget), runs in results.items():
        acc = [r[args.metric] for r in runs.values()]
        test = [r["test_acc"] for r in runs.values()]
        macs = [r["compact"]["macs"] / r["dense"]["macs"] for r in runs.values()]
        params = [r["compact"]["params"] / r["dense"]["params"] for r in runs.values()]
        row = {
            "model": model,
            "method": variant,
            "budget": budget,
            "seeds": sorted(runs),
            "acc": _mean_std(acc),
            "test_acc": _mean_std(test),
            "macs": _mean_std(macs),
            "params": _mean_std(params),
            "macs_abs": statistics.fmean(r["compact"]["macs"] for r in runs.values()),
            "params_abs": statistics.fmean(r["compact"]["params"] for r in runs.values()),
            "budget_error": max((abs(m - budget) for m in (macs if args.kind == "macs" else params)), default=0.0)
            if budget is not None
            else 0.0,
        }
        ref = results.get((model, args.reference, budget))
        if ref and variant != args.reference and budget is not None:
            shared = sorted(set(runs) & set(ref))
            diffs = [runs[s][args.metric] - ref[s][args.metric] for s in shared]
            row["vs_reference"] = _mean_std(diffs) if diffs else None
            row["paired_t"] = paired_t(diffs)
            if args.mcnemar and shared:
                a = torch.cat([test_predictions(runs[s]) for s in shared])
                b = torch.cat([test_predictions(ref[s]) for s in shared])
                row["mcnemar"] = mcnemar(a, b)
        rows.append(row)
    holm(rows)
    return rows


def paired_t(diffs: list[float]) -> dict | None:
    """Paired t over seeds of (method - reference): t and the one-sided p-values that the method is
    better ("better") and that it is worse ("worse"); None below 2 seeds."""
    from scipy import stats

    if len(diffs) < 2:
        return None
    if statistics.pstdev(diffs) == 0:  # identical runs: no evidence either way
        return {"t": 0.0, "better": 1.0, "worse": 1.0, "n": len(diffs)}
    t = stats.ttest_1samp(diffs, 0.0, alternative="greater")
    return {"t": float(t.statistic), "better": float(t.pvalue), "worse": float(1 - t.pvalue), "n": len(diffs)}


def holm(rows: list[dict]) -> None:
    """Holm's step-down correction of each method's one-sided p-values over its cells (model x
    budget), in place: row["paired_t"]["better_holm"] / ["worse_holm"]."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("paired_t"):
            by_method.setdefault(r["method"], []).append(r)
    for cells in by_method.values():
        for side in ("better", "worse"):
            ordered = sorted(cells, key=lambda r: r["paired_t"][side])
            running = 0.0
            for i, r in enumerate(ordered):
                running = max(running, min(1.0, (len(ordered) - i) * r["paired_t"][side]))
                r["paired_t"][f"{side}_holm"] = running


def table(rows: list[dict], reference: str = REFERENCE, metric: str = "test_acc") -> str:
    """Markdown: `metric` per row (mean ± std over seeds), paired against `reference`; the McNemar
    column only where a row has one."""
    label = {"test_acc": "test acc", "val_acc": "validation acc (selected epoch)"}[metric]
    mcnemar = any("mcnemar" in r for r in rows)
    head = f" McNemar vs {reference} (only this right / only {reference} right, p) |" if mcnemar else ""
    lines = [
        f"| model | budget (MACs) | method | {label} (mean ± std) | compact MACs | compact params | "
        f"Δ vs {reference} (paired by seed, mean ± std) |{head} paired t: one-sided p better / worse "
        "(Holm over cells) | seeds |",
        "|---" * (9 + mcnemar) + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], -(r["budget"] or 2), r["method"])):
        acc, macs, params = r["acc"], r["macs"], r["params"]
        budget = "dense" if r["budget"] is None else f"{r['budget']:.0%}"
        vs = r.get("vs_reference")
        mc = r.get("mcnemar")
        lines.append(
            f"| {r['model']} | {budget} | "
            f"{r['method']} | {acc[0]:.4f} ± {acc[1]:.4f} | {r['macs_abs']:,.0f} ({macs[0]:.3f}) | "
            f"{r['params_abs']:,.0f} ({params[0]:.3f}) | {'' if not vs else f'{vs[0]:+.4f} ± {vs[1]:.4f}'} | "
            + (f"{'' if not mc else f'{mc[0]} / {mc[1]}, p={mc[2]:.3g}'} | " if mcnemar else "")
            + f"{_t_cell(r.get('paired_t'))} | {len(r['seeds'])} |"
        )
    return "\n".join(lines)


def _t_cell(t: dict | None) -> str:
    if not t:
        return ""
    return (
        f"t={t['t']:+.2f}: {t['better']:.3g} / {t['worse']:.3g} "
        f"({t.get('better_holm', t['better']):.3g} / {t.get('worse_holm', t['worse']):.3g})"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=sorted(CONFIGS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3, 0.15])
    parser.add_argument(
        "--methods", nargs="+", default=["dense", "switch", "magnitude", "slimming"], choices=sorted(VARIANTS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--kind", default="macs", choices=["macs", "params", "units"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--finetune", type=int, default=3)
    parser.add_argument(
        "--l1", type=float, default=0.05, help="switcher.l1 (the cost-weighted penalty) for switch runs"
    )
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run, KEY=VALUE")
    parser.add_argument("--no-mcnemar", dest="mcnemar", action="store_false")
    parser.add_argument("--reference", default=REFERENCE, help="method the paired comparisons are made against")
    parser.add_argument(
        "--record",
        default=None,
        help="folder that gets each finished run's summary as NAME.json (to commit); runs found there are not run again",
    )
    parser.add_argument(
        "--metric",
        default="test_acc",
        choices=["test_acc", "val_acc"],
        help="what the table compares: val_acc to choose settings, test_acc to report them",
    )
    parser.add_argument("--report-only", action="store_true", help="run nothing: tabulate the runs already in OUT")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also magnitude with the switch's per-layer widths and the switch with magnitude's",
    )
    parser.add_argument("--figure", default=None, help="PNG path (default: OUT/pareto.png)")
    parser.add_argument("--quick", action="store_true", help="smoke form: 1 seed, 2 budgets, 2 epochs, 2,000 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets, args.epochs, args.warmup, args.finetune = args.seeds[:1], args.budgets[:2], 3, 1, 1
        args.train_limit = args.train_limit or 2000
    out = Path(args.out)
    results: dict = {}
    for model in args.models:
        cells = {v: [None] if v == "dense" else list(args.budgets) for v in args.methods}
        done = run_grid(model, cells, list(args.seeds), args, out)
        if args.diagnose and {"switch", "magnitude"} <= set(args.methods):
            done = diagnose(model, list(args.budgets), list(args.seeds), done, args, out)
        for (variant, budget, seed), summary in done.items():
            if variant in args.methods or "@" in variant:
                if seed in args.seeds and (budget is None or budget in args.budgets):
                    results.setdefault((model, variant, budget), {})[seed] = summary
    rows = aggregate(results, args)
    report = {"protocol": protocol(args), "args": vars(args), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(rows, args.reference, args.metric)
    (out / "pareto.md").write_text(text + "\n")
    figure(rows, Path(args.figure) if args.figure else out / "pareto.png", title="Fashion-MNIST")
    print(text)
    return report


if __name__ == "__main__":
    main()
