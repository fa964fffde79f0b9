"""Tables and plots of an offline evaluation: ``table.json``, ``table.md`` and PNG figures."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# Metrics of the table, in column order, with their headers and whether lower is better.
METRICS = (
    ("return_time", "return time (days)", True),
    ("day1_retention", "day-1 retention", False),
    ("click_rate", "click", False),
    ("long_view_rate", "long view", False),
    ("like_rate", "like", False),
    ("distinct_clusters", "distinct clusters", False),
    # Of the first step's [users, actions] matrix: every policy acts on the same users there.
    ("nuclear_norm_first_step", "nuclear norm", False),
)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation of each metric over the seeds of each method.

    ``runs`` maps a method name to one metrics dict per seed, each with a ``seed`` key.
    """
    table: dict[str, dict[str, Any]] = {}
    for method, results in runs.items():
        row: dict[str, Any] = {"seeds": [result["seed"] for result in results]}
        for key, _, _ in METRICS:
            values = [float(r[key]) for r in results if r.get(key) is not None]
            if not values:
                continue
            row[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        if "action_type" in results[0]:
            row["action_type"] = results[0]["action_type"]
        shares = _mean_shares([result.get("level_selected") for result in results])
        if shares:
            row["level_selected"] = shares
        table[method] = row
    return table


def _mean_shares(shares: list[dict[str, float] | None]) -> dict[str, float] | None:
    present = [share for share in shares if share]
    if not present:
        return None
    keys = sorted({key for share in present for key in share})
    return {key: statistics.fmean(share.get(key, 0.0) for share in present) for key in keys}


def write_table(table: dict[str, Any], extra: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write ``table.json`` (methods as keys plus ``extra``) and ``table.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "table.json"
    json_path.write_text(json.dumps({"methods": table, **extra}, indent=2) + "\n")
    md_path = folder / "table.md"
    md_path.write_text(markdown_table(table, extra))
    return json_path, md_path


def markdown_table(table: dict[str, Any], extra: dict[str, Any]) -> str:
    """Render the methods table as markdown, mean ± standard deviation over the seeds."""
    seeds = next(iter(table.values()))["seeds"] if table else []
    lines = [
        "# Offline evaluation",
        "",
        f"Mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        "measured side by side in one run inside the simulator fitted to the log. "
        "Return time: lower is better; the other columns: higher is better.",
        "",
        "| method | action | " + " | ".join(header for _, header, _ in METRICS) + " |",
        "|---|---|" + "---:|" * len(METRICS),
    ]
    for method, row in table.items():
        cells = [_cell(row.get(key)) for key, _, _ in METRICS]
        lines.append(f"| {method} | {row.get('action_type', '')} | " + " | ".join(cells) + " |")
    lines += ["", *_notes(extra)]
    return "\n".join(lines) + "\n"


def _cell(value: dict[str, float] | None) -> str:
    if value is None or math.isnan(value["mean"]):
        return "–"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def _notes(extra: dict[str, Any]) -> list[str]:
    validation = extra.get("simulator_validation") or {}
    lines = ["## Simulator validation", ""]
    lines += _auc_lines(validation.get("auc") or {})
    lines += _gap_lines(validation.get("return_gap") or {})
    lines += _length_lines(validation.get("session_length") or {})
    lines += [
        "## What was read",
        "",
        "Topic offsets, `{partition: [first, end)}`; the same offsets and seeds give the same "
        "numbers:",
        "",
        "```",
        json.dumps(extra.get("topic_offsets", {}), indent=1),
        "```",
        "",
    ]
    return lines


def _auc_lines(auc: dict[str, Any]) -> list[str]:
    signals = [name for name, value in auc.items() if isinstance(value, dict)]
    if not signals:
        return []
    lines = [
        "Response model, AUC on test-day impressions (KuaiSim's authors report about 0.72 "
        "click, 0.73 long view and 0.82 like on the whole KuaiRand-Pure log):",
        "",
        "| signal | AUC | predicted rate | observed rate | positives |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in signals:
        row = auc[name]
        lines.append(
            f"| {name} | {_number(row.get('auc'), 3)} | {_number(row.get('predicted_rate'), 4)} "
            f"| {_number(row.get('observed_rate'), 4)} | {row.get('positives', '–')} |"
        )
    return [*lines, "", f"_{auc.get('note', '')}_", ""]


def _number(value: float | None, digits: int) -> str:
    """Format a figure with ``digits`` decimals, or a dash where it is undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _gap_lines(gaps: dict[str, Any]) -> list[str]:
    lines = []
    for split, row in gaps.items():
        if not isinstance(row, dict) or "real" not in row:
            continue
        header = " | ".join(str(day) if day < 10 else "10+" for day in range(1, 11))
        lines += [
            f"Return gaps of {split}-day user-days, shares of gaps of 1 to 10 days "
            f"(total variation distance {_number(row.get('total_variation'), 4)}):",
            "",
            f"| | {header} |",
            "|---|" + "---:|" * 10,
            "| real | " + " | ".join(_number(v, 3) for v in row["real"] or []) + " |",
            "| simulated | " + " | ".join(_number(v, 3) for v in row["simulated"] or []) + " |",
            "",
            f"_{row.get('note', '')}_",
            "",
        ]
    return lines


def _length_lines(lengths: dict[str, Any]) -> list[str]:
    lines = []
    for split, row in lengths.items():
        if isinstance(row, dict) and "real_mean" in row:
            lines.append(
                f"Requests per {split} user-day: real {_number(row['real_mean'], 2)}, "
                f"simulated {_number(row['simulated_mean'], 2)}."
            )
    note = next((row.get("note") for row in lengths.values() if isinstance(row, dict)), None)
    if lines and note:
        lines += ["", f"_{note}_"]
    return [*lines, ""] if lines else []


def plot_return_time(table: dict[str, Any], path: Path) -> None:
    """Plot return time by method: means over the seeds, standard deviations as error bars."""
    plt = _pyplot()
    methods = [m for m in table if "return_time" in table[m]]
    means = [table[m]["return_time"]["mean"] for m in methods]
    stds = [table[m]["return_time"]["std"] for m in methods]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    # Points, not bars from zero: the methods differ by hundredths of a day.
    axes.errorbar(range(len(methods)), means, yerr=stds, fmt="o", capsize=4)
    axes.grid(axis="y", alpha=0.3)
    axes.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    axes.set_ylabel("mean return time (days, lower is better)")
    axes.set_title("Return time by method in the simulator")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gap_histograms(real: list[float], simulated: list[float], path: Path) -> None:
    """Shares of return gaps of 1..10 days, real log against the simulator's."""
    plt = _pyplot()
    days = list(range(1, len(real) + 1))
    width = 0.4
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar([d - width / 2 for d in days], real, width, label="real log")
    axes.bar([d + width / 2 for d in days], simulated, width, label="simulator")
    axes.set_xticks(days, [str(d) if d < len(days) else f"{d}+" for d in days])
    axes.set_xlabel("return gap (days)")
    axes.set_ylabel("share of user-days")
    axes.legend()
    axes.set_title("Return gaps under the logged behaviour")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_selection_shares(table: dict[str, Any], path: Path) -> bool:
    """Stacked bars of how often each expert level is selected; False if no method selects."""
    rows = {m: row["level_selected"] for m, row in table.items() if row.get("level_selected")}
    if not rows:
        return False
    plt = _pyplot()
    levels = sorted({level for shares in rows.values() for level in shares})
    figure, axes = plt.subplots(figsize=(7, 3.5))
    left = [0.0] * len(rows)
    for level in levels:
        shares = [rows[m].get(level, 0.0) for m in rows]
        axes.barh(list(rows), shares, left=left, label=f"level {level}")
        left = [a + b for a, b in zip(left, shares, strict=True)]
    axes.set_xlabel("share of requests served by the expert")
    axes.legend(loc="lower right")
    axes.set_title("Adaptive expert selection")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
