"""results.md / results.csv / results.png of a heterogeneous-task experiment."""

from __future__ import annotations

from typing import Any

from mudsc.experiments.reports import Chart, ReportFiles, machine_line, md_table, pct


def markdown(results: dict[str, Any]) -> str:
    """results.md: scaled performance x100 per task and mean, every method; then per pair."""
    cfg, summary = results["config"], results["summary"]
    tasks = list(results["tasks"])
    header = ["method", *tasks, "mean", "merge s"]
    lines = [[m, *[pct(s["per_task"][t]) if t in s["per_task"] else "" for t in tasks],
              pct(s["mean"]), f"{s['seconds']['mean']:.1f}"]
             for m, s in summary.items()]  # fmt: skip
    loss_lines = [[t, f"{v['original_loss']:.4g}", f"{v['constant_loss']:.4g}"]
                  for t, v in results["tasks"].items()]  # fmt: skip
    text = [
        f"# {results['name']}",
        "",
        f"Heterogeneous tasks on {cfg['dataset']}: {cfg['arch']} {cfg['arch_args']} encoders "
        f"(embedding {cfg['embed_dim']}), one per task, each with its own decoder; "
        f"{len(results['pairs'])} encoder pair(s) merged with every method. Scaled performance "
        "x100 = 100 (L_const - L_merged) / (L_const - L_original), mean ± std over the pairs "
        "holding the task; 100 = as good as the original, 0 = as bad as a constant predictor. "
        + (
            "Each task keeps its own encoder head (fed through the unmerge matrix)."
            if cfg["hetero"]["keep_heads"]
            else "The whole encoder, head included, is merged."
        ),
        "",
        md_table(header, lines),
        "",
        md_table(["task", "original loss (test)", "constant-predictor loss"], loss_lines),
        "",
        f"{machine_line(results['machine'])} Created {results['created']}; this invocation "
        f"took {results['wall_seconds']:.0f} s (trained {results['work']['trained']} encoders, "
        f"ran {results['work']['merged']} merges; the rest was reused).",
    ]
    for p in results["pairs"]:
        rows = [[meth, *[f"{100 * s:.1f}" for s in r["scaled"]], f"{100 * r['mean']:.1f}",
                 "" if r["alpha"] is None else f"{r['alpha']:g}"]
                for meth, r in p["rows"].items()]  # fmt: skip
        text += ["", f"## {p['tasks'][0]} + {p['tasks'][1]}", "",
                 md_table(["method", *p["tasks"], "mean", "alpha"], rows)]  # fmt: skip
    return "\n".join(text) + "\n"


def csv_text(results: dict[str, Any]) -> str:
    """results.csv: one row per (pair, method, task)."""
    lines = ["pair,method,task,loss,scaled,alpha,merge_seconds"]
    for p in results["pairs"]:
        for meth, r in p["rows"].items():
            for i, task in enumerate(p["tasks"]):
                lines.append(f"{'+'.join(p['tasks'])},{meth},{task},{r['loss'][i]:.6g},"
                             f"{r['scaled'][i]:.6g},{'' if r['alpha'] is None else r['alpha']},"
                             f"{r['seconds']:.4g}")  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any]) -> Chart:
    """Scaled performance per task (tasks every method scored) and the mean, per method."""
    summary = results["summary"]
    methods = list(summary)
    series = {
        t: ([100 * summary[m]["per_task"][t]["mean"] for m in methods],
            [100 * summary[m]["per_task"][t]["std"] for m in methods])
        for t in results["tasks"]
        if all(t in summary[m]["per_task"] for m in methods)
    }  # fmt: skip
    series["mean"] = ([100 * summary[m]["mean"]["mean"] for m in methods],
                      [100 * summary[m]["mean"]["std"] for m in methods])  # fmt: skip
    title = f"{results['name']}: scaled performance per task (mean ± std over pairs)"
    return Chart(title, methods, series, "scaled performance x100", None)


def hetero_report(results: dict[str, Any]) -> ReportFiles:
    return ReportFiles(markdown(results), csv_text(results), chart(results))
