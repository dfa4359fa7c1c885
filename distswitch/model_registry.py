"""MLflow's model registry for compact models (`tracking.register: NAME`).

Each run's logged compact model becomes a version of NAME, tagged with what a team picks a model by
(method, budget, accuracies, compact MACs and params, whether it meets its budget, the git commit).
The alias `best` points at the version with the best validation accuracy among those that meet the
same budget as the newest one: register one name per budget (e.g. `fashion-lenet5-macs50`), and
`models:/NAME@best` is the best compact model at that budget.
"""

from __future__ import annotations

BEST = "best"
BUDGET_SLACK = 0.01  # a compact model within 1% of its budget's fraction meets it (the export's guarantee)


def version_tags(summary: dict) -> dict[str, str]:
    """What a version is chosen by, from the run's summary."""
    budget = summary["config"]["budget"]
    kind, fraction = budget["kind"], budget["fraction"]
    spent = summary["compact"][kind] / summary["dense"][kind] if fraction is not None else 1.0
    return {
        "method": summary["method"],
        "budget": "none" if fraction is None else f"{kind}:{fraction:g}",
        "meets_budget": str(fraction is None or spent <= fraction + BUDGET_SLACK).lower(),
        "val_acc": f"{summary['val_acc']:.6f}",
        "test_acc": f"{summary['test_acc']:.6f}",
        "compact_macs": str(summary["compact"]["macs"]),
        "compact_params": str(summary["compact"]["params"]),
        "git_commit": summary.get("git_sha") or "unknown",
    }


def register(client, name: str, version: str, summary: dict) -> str:
    """Tag `version` of `name` (already created by log_model's registration) and move the alias
    `best` to the best version at its budget. Returns the version `best` points at."""
    tags = version_tags(summary)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    peers = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get("budget") == tags["budget"] and v.tags.get("meets_budget") == "true"
    ]
    if not peers:
        return ""
    # Ties: the newer version (same accuracy, newer code).
    best = max(peers, key=lambda v: (float(v.tags.get("val_acc", "-1")), int(v.version)))
    client.set_registered_model_alias(name, BEST, best.version)
    return best.version
