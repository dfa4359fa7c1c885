"""A store's runs as a person compares them: `distswitch runs` (a table) and `distswitch compare`
(the trade-off).

`compare`: the trade-off the method is about, across the runs of a store -- test
accuracy against the compact model's MACs and parameters, one marker per method, the seeds of one
setting aggregated (mean ± std), as pruning results are reported.

A setting is every config value of a run except those that only say where or how it ran (seed,
paths, tracking, workers); runs that share one are its seeds. A method's settings are told apart by
the values in which they differ (e.g. `switch (switcher.describe=incoming)`). `benchmarks/pareto.py`
draws its figure with the same `figure`.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from distswitch.config import ConfigError
from distswitch.delivery import mlflow_client
from distswitch.io import atomic_path
from distswitch.tracking import BEST

# Params that do not make a setting: where and how a run ran, and the seed its repeats differ in.
NOT_SETTING = (
    "train.seed",
    "out_dir",
    "tracking.",
    "distributed.",
    "data.root",
    "data.beton_dir",
    "data.num_workers",
    "data.loader",
    "train.progress",
    "train.device",
    "train.compile",
    "tune.",
    "sweep.",
)
COMPARE_TAG = "distswitch.compare"  # the run holding a comparison's figure and table (never compared)
METRICS = {
    "test_acc": BEST["test_acc"],
    "macs": BEST["macs"],
    "params": BEST["params"],
    "dense_macs": "dense/macs",
    "dense_params": "dense/params",
}


RUN_COLUMNS = (
    "experiment",
    "run",
    "status",
    "method",
    "model",
    "budget",
    "val_acc",
    "test_acc",
    "kept",
    "params",
    "macs",
)
# Sort keys of `distswitch runs --sort`: the metric behind each column, and whether larger is better.
_LARGER_FIRST = {"test_acc": True, "val_acc": True, "kept": False, "params": False, "macs": False}


def store_runs(uri: str, experiment: str | None = None) -> list:
    """(experiment name, run) for the runs of a store (a search's trials included), newest first:
    every experiment, or the one named."""
    client = mlflow_client(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment is not None:
        if experiment not in experiments.values():
            names = ", ".join(sorted(experiments.values())) or "none"
            raise ConfigError(f"--experiment: no experiment {experiment!r} in {uri} (there: {names})")
        experiments = {i: n for i, n in experiments.items() if n == experiment}
    if not experiments:
        return []
    runs = client.search_runs(list(experiments), order_by=["attributes.start_time DESC"], max_results=5000)
    return [(experiments[r.info.experiment_id], r) for r in runs]


def runs_table(uri: str, experiment: str | None = None, sort: str | None = None) -> list[dict]:
    """One row per run, newest first or best first by `sort` (`distswitch runs`)."""
    found = store_runs(uri, experiment)
    if sort is not None:
        metric, sign = BEST[sort], -1 if _LARGER_FIRST[sort] else 1
        found.sort(
            key=lambda er: (er[1].data.metrics.get(metric) is None, sign * (er[1].data.metrics.get(metric) or 0))
        )
    rows = []
    for name, run in found:
        p, m = run.data.params, run.data.metrics

        def num(key, fmt):  # called in this iteration only
            value = m.get(BEST[key])  # noqa: B023
            return "-" if value is None else format(value, fmt)

        budget = p.get("budget.fraction", "null")
        rows.append(
            {
                "experiment": name,
                "run": run.info.run_name,
                "status": run.info.status,
                "method": p.get("method", "-"),
                "model": p.get("model.name", "-"),
                "budget": f"{float(budget):.0%} {p.get('budget.kind', '')}".strip()
                if budget not in ("null", "None")
                else "-",
                "val_acc": num("val_acc", ".4f"),
                "test_acc": num("test_acc", ".4f"),
                "kept": num("kept", ".1%"),
                "params": num("params", ",.0f"),
                "macs": num("macs", ",.0f"),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in RUN_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in RUN_COLUMNS).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in RUN_COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def finished_runs(uri: str, experiment: str | None = None) -> list[dict]:
    """The store's finished training runs with their results, as plain records."""
    records = []
    for name, run in store_runs(uri, experiment):
        m, p = {k: run.data.metrics.get(v) for k, v in METRICS.items()}, run.data.params
        if run.info.status != "FINISHED" or run.data.tags.get(COMPARE_TAG) or None in m.values():
            continue  # unfinished, a search's parent, or a comparison itself
        setting = tuple(sorted((k, v) for k, v in p.items() if not k.startswith(NOT_SETTING)))
        budget = p.get("budget.fraction", "null")
        records.append(
            {
                "experiment": name,
                "run": run.info.run_name,
                "model": p.get("model.name", "?"),
                "method": p.get("method", "?"),
                "budget": None if budget in ("null", "None") else float(budget),
                "seed": p.get("train.seed"),
                "setting": setting,
                **{k: float(v) for k, v in m.items()},
            }
        )
    return records


def aggregate(records: list[dict]) -> list[dict]:
    """One row per setting: mean ± std over its seeds of test accuracy and of the compact model's
    MACs and params as fractions of dense, labelled by method and what sets it apart."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["setting"]].append(r)
    by_method: dict[tuple, list[tuple]] = defaultdict(list)
    for setting, runs in groups.items():
        by_method[(runs[0]["model"], runs[0]["method"])].append(setting)
    rows = []
    for (model, method), settings in by_method.items():
        # What tells this method's settings apart, budgets aside (those are the x axis).
        keys = {k for s in settings for k, _ in s if k != "budget.fraction"}
        differ = sorted(k for k in keys if len({dict(s).get(k) for s in settings}) > 1)
        for setting in settings:
            runs, values = groups[setting], dict(setting)
            label = method + (" (" + ", ".join(f"{k}={values.get(k)}" for k in differ) + ")" if differ else "")
            rows.append(
                {
                    "model": model,
                    "method": label,
                    "budget": runs[0]["budget"],
                    "seeds": sorted(str(r["seed"]) for r in runs),
                    "test_acc": _mean_std([r["test_acc"] for r in runs]),
                    "macs": _mean_std([r["macs"] / r["dense_macs"] for r in runs]),
                    "params": _mean_std([r["params"] / r["dense_params"] for r in runs]),
                    "macs_abs": statistics.fmean(r["macs"] for r in runs),
                    "params_abs": statistics.fmean(r["params"] for r in runs),
                }
            )
    return sorted(rows, key=lambda r: (r["model"], -(r["budget"] or 2), r["method"]))


def table(rows: list[dict]) -> str:
    lines = [
        "| model | budget | method | test acc (mean ± std) | compact MACs (of dense) | compact params (of dense) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(
            f"| {r['model']} | {budget} | {r['method']} | {r['test_acc'][0]:.4f} ± {r['test_acc'][1]:.4f} | "
            f"{r['macs_abs']:,.0f} ({r['macs'][0]:.3f}) | {r['params_abs']:,.0f} ({r['params'][0]:.3f}) | "
            f"{len(r['seeds'])} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, title: str = "") -> Path:
    """Test accuracy against compact MACs and against compact params (fractions of dense, log
    scale), one panel pair per model, one colour and line per method, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    colour = {m: f"C{i % 10}" for i, m in enumerate(sorted({r["method"] for r in rows}))}
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        for ax, size, name in zip(row_axes, ("macs", "params"), ("MACs", "parameters")):
            for method in sorted({r["method"] for r in mine}):
                pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r[size][0])
                style = (
                    {"marker": "*", "markersize": 12, "linestyle": "none"}
                    if method == "dense"
                    else {"marker": "o", "capsize": 3}
                )
                ax.errorbar(
                    [p[size][0] for p in pts],
                    [p["test_acc"][0] for p in pts],
                    xerr=[p[size][1] for p in pts],
                    yerr=[p["test_acc"][1] for p in pts],
                    label=method,
                    color=colour[method],
                    **style,
                )
            ax.set_xscale("log")
            ax.set_xlabel(f"compact {name} / dense {name} (log)")
            ax.set_ylabel("test accuracy (mean ± std over seeds)")
            ax.set_title(f"{model}{': ' + title if title else ''}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # its suffix tells savefig the format
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def compare(uri: str, experiment: str | None, out: Path) -> tuple[list[dict], Path, str]:
    """Rows, the figure (at `out`) and the table of a store's runs; both also logged to MLflow as
    artifacts of one run tagged `distswitch.compare` (in the experiment compared, or "compare"
    for a whole store), updated by each comparison."""
    records = finished_runs(uri, experiment)
    if not records:
        where = f"experiment {experiment!r}" if experiment else "the store"
        raise ConfigError(f"compare: no finished training runs in {where} at {uri}; train some first")
    rows = aggregate(records)
    text = table(rows)
    path = figure(rows, out, title=experiment or "every experiment")
    client = mlflow_client(uri)
    name = experiment or "compare"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    found = client.search_runs([exp_id], filter_string=f"tags.`{COMPARE_TAG}` = '1'", max_results=1)
    run_id = (
        found[0].info.run_id
        if found
        else client.create_run(
            exp_id, run_name=f"compare ({experiment or 'every experiment'})", tags={COMPARE_TAG: "1"}
        ).info.run_id
    )
    client.log_artifact(run_id, str(path), "compare")
    client.log_text(run_id, text, "compare/table.md")
    if not found:
        client.set_terminated(run_id, "FINISHED")
    return rows, path, text
