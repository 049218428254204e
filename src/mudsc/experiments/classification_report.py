"""results.md / results.csv / results.png of a classification-pairs experiment."""

from __future__ import annotations

from typing import Any

from mudsc.experiments.reports import Chart, ReportFiles, machine_line, md_table, pct
from mudsc.plots.frontier import frontier_png, frontier_points, has_partial


def _ratio(ms: dict[str, float] | None) -> str:
    """A cost relative to one source model, e.g. 1.45."""
    return "" if ms is None else f"{ms['mean']:.2f}"


def _cost(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _alpha_cell(alpha: Any) -> str:
    return f"{alpha:g}" if isinstance(alpha, int | float) else ""


def study_table(summary: dict[str, Any], order: list[str]) -> list[str]:
    """With variants: one line per settings (top level first), one column per method,
    each cell joint / avg (mean ± std); the knob-at-a-time view of a study."""
    merged = [n for n in order if not n.startswith("model ") and n != "ensemble"]
    labels = list(dict.fromkeys(n.partition(" @ ")[2] for n in merged))
    if labels == [""]:
        return []
    methods = list(dict.fromkeys(n.partition(" @ ")[0] for n in merged))
    lines = []
    for label in labels:
        cells = []
        for method in methods:
            s = summary.get(f"{method} @ {label}" if label else method)
            cells.append(f"{pct(s['joint'])} / {pct(s['avg'])}" if s else "")
        lines.append([label or "(top level)", *cells])
    return ["", "Joint / avg accuracy per variant (one knob changed from the top level):", "",
            md_table(["variant", *methods], lines)]  # fmt: skip


def markdown(results: dict[str, Any], order: list[str]) -> str:
    """results.md: the summary table, then one table per pair."""
    cfg, summary, pairs = results["config"], results["summary"], results["pairs"]
    n_tasks = len(pairs[0]["tasks"])
    task_cols = [f"task {t}" for t in range(n_tasks)]
    header = ["model / method", "joint", *task_cols, "avg", "merge s", "alpha", "params x",
              "FLOPs x"]  # fmt: skip
    lines = []
    for name in order:
        s = summary[name]
        alpha = s.get("alpha")
        lines.append([
            name, pct(s["joint"]), *[pct(t) for t in s["per_task"]], pct(s["avg"]),
            f"{s['seconds']['mean']:.1f}" if "seconds" in s else "",
            ", ".join(f"{a:g}" for a in alpha["values"]) if alpha else "",
            _ratio(s.get("params")), _ratio(s.get("flops")),
        ])  # fmt: skip
    text = [
        f"# {results['name']}",
        "",
        f"{cfg['dataset']} {cfg.get('split', '')}, {cfg['arch']} {cfg['arch_args']}, "
        f"{len(pairs)} pair(s); accuracy in %, mean ± std (sample std) over pairs.",
        "task t = the classes of model t; a source model's avg mixes its own task with one "
        "it never saw. alpha = the chosen balance factor per pair (MuDSC methods; "
        f"'{cfg['alpha']}' in the config), 1 for weight-only matching.",
        "",
        md_table(header, lines),
        *study_table(summary, order),
        "",
        f"{machine_line(results['machine'])} Created {results['created']}; this invocation "
        f"took {results['wall_seconds']:.0f} s (trained {results['work']['trained']} models, "
        f"ran {results['work']['merged']} merges; the rest was reused).",
    ]
    for p in pairs:
        rows = []
        for name in order:
            r = p["rows"][name]
            rows.append([
                name, f"{100 * r['joint']:.1f}", *[f"{100 * a:.1f}" for a in r["per_task"]],
                f"{100 * r['avg']:.1f}", f"{r['seconds']:.1f}" if "seconds" in r else "",
                _alpha_cell(r.get("alpha")), _cost(r.get("params")), _cost(r.get("flops")),
            ])  # fmt: skip
        text += ["", f"## pair {p['pair']}: tasks {p['tasks']} (split seed {p['split_seed']}, "
                 f"model seeds {p['model_seeds']})", "", md_table(header, rows)]  # fmt: skip
    return "\n".join(text) + "\n"


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def csv_text(results: dict[str, Any], order: list[str]) -> str:
    """results.csv: one row per (pair, model/method), then mean and std rows."""
    n_tasks = len(results["pairs"][0]["tasks"])
    header = ["pair", "row", "joint", *[f"task_{t}" for t in range(n_tasks)], "avg",
              "merge_seconds", "alpha"]  # fmt: skip
    lines = [",".join(header)]
    for p in results["pairs"]:
        for name in order:
            r = p["rows"][name]
            lines.append(",".join([str(p["pair"]), name, _fmt(r["joint"]),
                                   *[_fmt(a) for a in r["per_task"]], _fmt(r["avg"]),
                                   _fmt(r.get("seconds")), _fmt(r.get("alpha"))]))  # fmt: skip
    for stat in ("mean", "std"):
        for name in order:
            s = results["summary"][name]
            lines.append(",".join([
                stat, name, _fmt(s["joint"][stat]), *[_fmt(t[stat]) for t in s["per_task"]],
                _fmt(s["avg"][stat]), _fmt(s.get("seconds", {}).get(stat)),
                _fmt(s.get("alpha", {}).get(stat)),
            ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], order: list[str]) -> Chart:
    """Joint and avg accuracy of the ensemble and every method, mean ± std over pairs."""
    names = [n for n in order if not n.startswith("model ")]
    summary = results["summary"]
    series = {
        metric: ([100 * summary[n][metric]["mean"] for n in names],
                 [100 * summary[n][metric]["std"] for n in names])
        for metric in ("joint", "avg")
    }  # fmt: skip
    cfg = results["config"]
    title = (f"{results['name']}: {cfg['dataset']} {cfg['split']}, {cfg['arch']}, "
             f"{len(results['pairs'])} pair(s), mean ± std")  # fmt: skip
    return Chart(title, names, series, "test accuracy (%)")


def frontier(results: dict[str, Any]) -> dict[str, bytes]:
    """results-frontier.png when the experiment has partial merges (rows costing more than
    one model): accuracy against parameters and FLOPs."""
    n_models = len(results["pairs"][0]["tasks"])
    points = frontier_points(results["summary"], n_models)
    if not has_partial(points):
        return {}
    cfg = results["config"]
    title = (f"{results['name']}: {cfg['arch']} {cfg['arch_args']}, partial merges, "
             f"{len(results['pairs'])} pair(s), mean ± std")  # fmt: skip
    return {"results-frontier.png": frontier_png(points, title)}


def classification_report(results: dict[str, Any], order: list[str]) -> ReportFiles:
    """The report files, rows in ``order`` (and the frontier figure of partial merges)."""
    return ReportFiles(
        markdown(results, order), csv_text(results, order), chart(results, order),
        frontier(results),
    )  # fmt: skip
