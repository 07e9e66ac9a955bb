"""PNG plots (matplotlib, Agg): accuracy and first-token KL vs achieved keep fraction; latency and KV cache vs batch
size."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from vtprune.report.tables import is_reference, row_timing_noisy, task_columns


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(str(p) for p in parts)).strip("-")


def accuracy_plots(acc: pd.DataFrame, plots_dir: Path, notes: list[str]) -> dict[tuple[str, str], Path]:
    """One PNG per (model, task column): % of unpruned vs achieved keep fraction, one line per strategy."""
    out = {}
    for model, group in acc.groupby("model", sort=True):
        for task, metric, label in task_columns(group):
            points = group[(group["task"] == task) & (group["metric"] == metric)]
            points = points.dropna(subset=["pct_of_unpruned", "kept_fraction_mean"])
            if points.empty:
                continue  # the tables' notes say why (unscored, or no unpruned row)
            path = plots_dir / f"accuracy_{_slug(model, label)}.png"
            out[(model, label)] = _keep_plot(points, "pct_of_unpruned", "% of unpruned", f"{model}: {label}", path)
    return out


def fidelity_plots(acc: pd.DataFrame, plots_dir: Path) -> dict[tuple[str, str], Path]:
    """One PNG per (model, task): mean first-token KL to the unpruned run vs achieved keep fraction, a line per strategy."""
    points = acc.dropna(subset=["kl_mean", "kept_fraction_mean"]) if "kl_mean" in acc.columns else acc.iloc[:0]
    # Fidelity is per task: the rows of a task's several metrics carry the same figures.
    points = points.drop_duplicates(["model", "task", "strategy", "keep_ratio"])
    return {
        (model, f"{task} KL"): _keep_plot(group, "kl_mean", "KL(unpruned ‖ pruned), nats", f"{model}: {task}",
                                          plots_dir / f"kl_{_slug(model, task)}.png")
        for (model, task), group in points.groupby(["model", "task"], sort=True)
    }


def _keep_plot(points: pd.DataFrame, column: str, ylabel: str, title: str, path: Path) -> Path:
    """``column`` against the achieved keep fraction, one line per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, line in points.groupby("strategy", sort=True):
        line = line.sort_values("kept_fraction_mean")
        ax.plot(line["kept_fraction_mean"], line[column], marker="o", label=strategy)
    ax.set(xlabel="achieved keep fraction", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def speed_plots(speed: pd.DataFrame, plots_dir: Path, notes: list[str]) -> dict[tuple, Path]:
    """One PNG per (model, device, dtype, strategy): latency and KV cache vs batch size, one line per keep ratio.

    The unpruned reference is drawn in every strategy's figure so each reads on its own.
    """
    plt = _pyplot()
    out = {}
    for (model, device, dtype), group in speed.groupby(["model", "device", "dtype"], sort=True):
        latency = "e2e_ms" if group["e2e_ms"].notna().any() else "ttft_ms"
        reference = group[is_reference(group)]
        for strategy, rows in group[~is_reference(group)].groupby("strategy", sort=True):
            fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
            lines = [("none @ 1", reference)] + [(f"keep {r:g}", g) for r, g in rows.groupby("keep_ratio", sort=True)]
            for name, line in lines:
                line = line.sort_values("batch_size")
                if line.empty:
                    continue
                # A noisy latency is no result (its interval is too wide): no point on the latency plot.
                timed = line[~line.apply(lambda row: row_timing_noisy(row, latency), axis=1)]
                left.plot(timed["batch_size"], timed[latency], marker="o", label=name)
                right.plot(line["batch_size"], line["kv_bytes"] / 2**20, marker="o", label=name)
            left.set(xlabel="batch size", ylabel=f"{'end-to-end' if latency == 'e2e_ms' else 'TTFT'} (ms)",
                     title=f"{strategy}: latency")
            right.set(xlabel="batch size", ylabel="KV cache (MiB)", title=f"{strategy}: KV cache")
            for ax in (left, right):
                ax.set_xticks(sorted(group["batch_size"].unique()))
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"{model} ({device}, {dtype})", fontsize=9)
            path = plots_dir / f"speed_{_slug(model, device, dtype, strategy)}.png"
            _save(fig, path)
            out[(model, device, dtype, strategy)] = path
        if group[~is_reference(group)].empty:
            notes.append(f"{model} ({device}, {dtype}): only unpruned bench rows, no speed plot")
    return out


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
