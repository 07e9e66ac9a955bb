"""PNG plots (matplotlib, Agg): accuracy and first-token KL vs achieved keep fraction; paired speed ratios vs achieved
keep fraction; accuracy and loyalty vs measured TTFT speed-up and KV saved (Pareto); serving speed-ups vs
concurrency (vLLM)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pandas as pd

from vtprune.report.tables import (
    SERVE_COMPUTE_IDEAL,
    SERVE_IDEAL,
    SPEED_COLUMNS,
    TIMED,
    is_reference,
    row_timing_status,
    serve_status,
    task_columns,
)

LEFT_OUT = ("noisy", "missing")  # timing statuses that are no result: named under the figure, never drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers and in CI
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^v<>"


def _styles(values) -> dict:
    """One (colour, marker) per value, the same in every panel of a figure whatever each panel leaves out."""
    return {v: (f"C{i % 10}", MARKERS[i // 10 % len(MARKERS)]) for i, v in enumerate(sorted(set(values)))}


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(str(p) for p in parts)).strip("-")


def accuracy_plots(acc: pd.DataFrame, plots_dir: Path) -> dict[tuple[str, str], Path]:
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


def _timed_points(rows: pd.DataFrame, column: str, status_of=row_timing_status,
                  figure: str = "ratio") -> tuple[pd.DataFrame, pd.Series]:
    """The rows whose ``column`` timing is a result, and each one's (lo, hi) error-bar lengths; a ratio without a
    usable interval (two rounds, medians) is drawn without a bar. ``figure``: the row's ``<column>_<figure>`` (with
    ``_lo`` / ``_hi``) drawn, judged by ``status_of(row, column)``."""
    status = pd.Series([status_of(r, column) for r in rows.itertuples()], index=rows.index, dtype=object)
    kept = rows[~status.isin(LEFT_OUT)]
    ok = status[kept.index] == "ok"
    ratio = kept[f"{column}_{figure}"]
    bars = [(ratio - kept[f"{column}_{figure}_lo"]).where(ok, 0), (kept[f"{column}_{figure}_hi"] - ratio).where(ok, 0)]
    return kept, bars


def _left_out(rows: pd.DataFrame, column: str) -> list[str]:
    return [f"{r.strategy} {r.keep_ratio:g} batch {r.batch_size}" for r in rows.itertuples()
            if row_timing_status(r, column) in LEFT_OUT]


def speed_plots(speed: pd.DataFrame, plots_dir: Path) -> dict[tuple, Path]:
    """One PNG per (model, device, dtype): TTFT, decode, end-to-end and KV-cache ratios to the ``none`` of each
    row's own bench against the achieved keep fraction, one line per strategy and batch size, timings with their
    95 % interval; timings that are no result are named under the figure instead."""
    plt = _pyplot()
    out = {}
    speed = speed.assign(threads=speed["threads"] if "threads" in speed.columns else float("nan"))
    for (model, device, dtype), group in speed.groupby(["model", "device", "dtype"], sort=True):
        pruned = group[~is_reference(group) & group["ttft_ms_ref"].notna()].sort_values(
            ["strategy", "keep_ratio", "batch_size"], ascending=[True, False, True])
        if pruned.empty:
            continue  # the table's notes say why
        several = pruned["threads"].nunique() > 1
        colours = _styles(pruned["strategy"])
        markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(sorted(pruned["batch_size"].unique()))}
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
        left_out, handles = [], {}
        for ax, column in zip(axes, (*TIMED, "kv_bytes")):
            name = SPEED_COLUMNS[column][0]
            if column in TIMED and _left_out(pruned, column):
                left_out.append(f"{name}: {', '.join(_left_out(pruned, column))}")
            for (strategy, batch, threads), line in pruned.groupby(["strategy", "batch_size", "threads"], sort=True,
                                                                   dropna=False):
                line = line.sort_values("kept_fraction_mean")
                points, bars = _timed_points(line, column) if column in TIMED else (line, None)
                if points.empty:
                    continue
                label = f"{strategy}, batch {batch}" + (f", {threads:g} threads" if several else "")
                handles[label] = ax.errorbar(points["kept_fraction_mean"], points[f"{column}_ratio"], yerr=bars,
                                             color=colours[strategy][0], marker=markers[batch], capsize=3, label=label)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.set(xlabel="achieved keep fraction", ylabel="pruned / none (own bench)", title=name)
            ax.grid(alpha=0.3)
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
        path = plots_dir / f"speed_{_slug(model, device, dtype)}.png"
        _save_row(fig, path, f"{model} ({device}, {dtype}): ratio to the unpruned point of each row's own bench",
                  left_out, width=15, wrap=200, right=0.86)
        out[(model, device, dtype, "speed")] = path
    return out


SERVE_PANELS = {"req_per_s": "throughput (req/s) speed-up", "ttft_p50_ms": "TTFT p50 speed-up"}


def serve_plots(serve: pd.DataFrame, plots_dir: Path) -> dict[tuple, Path]:
    """One PNG per (model, device, dtype) of serve rows: the paired throughput (req/s) and TTFT p50 speed-ups
    against the concurrency (log 2), with their 95 % interval, one line per strategy@keep ratio and its ideal
    speed-up from the token counts dashed in the same colour; speed-ups that are no result are named under the
    figure instead."""
    plt = _pyplot()
    out = {}
    for (model, device, dtype), group in serve.groupby(["model", "device", "dtype"], sort=True):
        pruned = group[~is_reference(group)].sort_values(["strategy", "keep_ratio", "concurrency"],
                                                         ascending=[True, False, True])
        if pruned.empty:
            continue
        pruned = pruned.assign(plan=[f"{s}@{r:g}" for s, r in zip(pruned["strategy"], pruned["keep_ratio"])])
        styles = _styles(pruned["plan"])
        levels = sorted(pruned["concurrency"].dropna().unique())
        fig, axes = plt.subplots(1, len(SERVE_PANELS), figsize=(11, 3.8))
        left_out, handles = [], {}
        for ax, (column, name) in zip(axes, SERVE_PANELS.items()):
            ideal = SERVE_IDEAL[column][1]
            missed = [f"{r.plan} at {r.concurrency:g} client{'s' if r.concurrency != 1 else ''}"
                      for r in pruned.itertuples() if serve_status(r, column) in LEFT_OUT]
            if missed:
                left_out.append(f"{name}: {', '.join(missed)}")
            for plan, line in pruned.groupby("plan", sort=True):
                colour, marker = styles[plan]
                # The ideal is computed, not measured: drawn even where every measured point is left out.
                dashed = ax.plot(line["concurrency"], line[ideal], color=colour, linestyle="--", linewidth=1,
                                 marker="_", markersize=14)[0]  # a ticked ideal stays visible at one level alone
                handles.setdefault(plan, dashed)
                compute = SERVE_COMPUTE_IDEAL[column][1]
                if compute in line and line[compute].notna().any():  # runs before it was recorded have none
                    ax.plot(line["concurrency"], line[compute], color=colour, linestyle=":", linewidth=1, marker="_",
                            markersize=14)
                points, bars = _timed_points(line, column, serve_status, "speedup")
                if not points.empty:
                    handles[plan] = ax.errorbar(points["concurrency"], points[f"{column}_speedup"], yerr=bars,
                                                color=colour, marker=marker, capsize=3, label=plan)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [f"{c:g}" for c in levels])
            ax.set(xlabel="concurrent clients (closed loop)", ylabel="speed-up vs none (paired)", title=name)
            ax.grid(alpha=0.3)
        if handles:
            fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right",
                       title="dashed: ideal (tokens)\ndotted: ideal (compute)", title_fontsize=7)
        path = plots_dir / f"serve_{_slug(model, device, dtype)}.png"
        _save_row(fig, path, f"{model} ({device}, {dtype}) on vLLM: speed-up of each plan over the unpruned one, "
                  "paired by round (above 1 is better)", left_out, width=11, wrap=150, right=0.88)
        out[(model, device, dtype, "serving")] = path
    return out


def pareto_plots(acc: pd.DataFrame, speed: pd.DataFrame, plots_dir: Path) -> dict[tuple[str, str], Path]:
    """One PNG per (model, task column) that has both evals and benches: % of unpruned (and loyalty) against the
    measured TTFT speed-up and the KV cache saved, one point per strategy × keep ratio, the bench at the model's
    smallest batch size. Only points with both an eval and a bench row are drawn; TTFT speed-ups that are no result
    are named under the figure."""
    out = {}
    if speed.empty or "ttft_ms_ref" not in speed.columns:
        return out
    for model, group in acc.groupby("model", sort=True):
        bench = speed[(speed["model"] == model) & speed["ttft_ms_ref"].notna()]
        if bench.empty:
            continue
        batch, device, dtype = bench.sort_values(["batch_size", "device", "dtype"]).iloc[0][["batch_size", "device",
                                                                                              "dtype"]]
        bench = bench[(bench["batch_size"] == batch) & (bench["device"] == device) & (bench["dtype"] == dtype)]
        bench = bench.drop_duplicates(["strategy", "keep_ratio"], keep="last")
        where = f"bench at batch size {batch} ({device}, {dtype})"
        for task, metric, label in task_columns(group):
            scores = group[(group["task"] == task) & (group["metric"] == metric)]
            points = scores.merge(bench.drop(columns=["model", "kept_fraction_mean", "run_dir", "run"], errors="ignore"),
                                  on=["strategy", "keep_ratio"], how="inner", suffixes=("", "_bench"))
            points = points[points["pct_of_unpruned"].notna()]
            if (~is_reference(points)).sum() == 0:
                continue
            path = plots_dir / f"pareto_{_slug(model, label)}.png"
            out[(model, f"{label} Pareto")] = _pareto(points, f"{model}: {label} — {where}", path)
    return out


def _pareto(points: pd.DataFrame, title: str, path: Path) -> Path:
    plt = _pyplot()
    points = points.assign(kv_saved=100 * (1 - points["kv_bytes_ratio"]), speedup=1 / points["ttft_ms_ratio"])
    timed, _ = _timed_points(points, "ttft_ms")
    ys = [("pct_of_unpruned", "% of unpruned score")] + (
        [("loyalty", "loyalty (same answer as unpruned)")] if points["loyalty"].notna().any() else [])
    fig, axes = plt.subplots(len(ys), 2, figsize=(11, 3.6 * len(ys)), squeeze=False)
    styles, handles = _styles(points["strategy"]), {}
    for row_axes, (y, ylabel) in zip(axes, ys):
        for ax, x, xlabel, drawn in ((row_axes[0], "speedup", "measured TTFT speed-up (1 / paired ratio)", timed),
                                     (row_axes[1], "kv_saved", "KV cache saved (%)", points)):
            for strategy, line in drawn.dropna(subset=[x, y]).groupby("strategy", sort=True):
                line = line.sort_values("keep_ratio")
                xerr = None
                if x == "speedup":  # the speed-up's interval from the ratio's: 1 / hi … 1 / lo
                    ok = [row_timing_status(r, "ttft_ms") == "ok" for r in line.itertuples()]
                    xerr = [(line[x] - 1 / line["ttft_ms_ratio_hi"]).where(ok, 0),
                            (1 / line["ttft_ms_ratio_lo"] - line[x]).where(ok, 0)]
                colour, marker = styles[strategy]
                handles[strategy] = ax.errorbar(line[x], line[y], xerr=xerr, color=colour, marker=marker, capsize=3)
                for r in line.itertuples():
                    ax.annotate(f"{r.keep_ratio:g}", (getattr(r, x), getattr(r, y)), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    left = _left_out(points[~is_reference(points)], "ttft_ms")
    footer = textwrap.wrap("TTFT speed-up left out, no result (see Notes): " + ", ".join(left), 120) if left else []
    if footer:
        fig.text(0.01, 0.01, "\n".join(footer), fontsize=7, va="bottom")
    fig.suptitle(f"{title}; labels: keep ratio", fontsize=9)
    height = 3.6 * len(ys) + 0.14 * len(footer)
    fig.set_size_inches(11, height)
    _save(fig, path, rect=(0, 0.14 * len(footer) / height + (0.02 if footer else 0), 0.87, 1))
    return path


def _save_row(fig, path: Path, title: str, left_out: list[str], width: float, wrap: int, right: float) -> None:
    """A one-row figure saved with its title, the points left out (no result) named under it, the legend right of
    ``right``."""
    footer = textwrap.wrap("Left out, no result (see Notes): " + "; ".join(left_out), wrap) if left_out else []
    if footer:
        fig.text(0.01, 0.01, "\n".join(footer), fontsize=7, va="bottom")
    fig.suptitle(title, fontsize=9)
    height = 3.8 + 0.14 * len(footer)
    fig.set_size_inches(width, height)
    _save(fig, path, rect=(0, 0.14 * len(footer) / height + (0.02 if footer else 0), right, 1))


def _save(fig, path: Path, rect=(0, 0, 1, 1)) -> None:
    """Written to a temp name and renamed, so that a killed report never leaves half a PNG behind."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
