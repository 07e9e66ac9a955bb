"""The markdown report: the header, then the tables of ``vtprune.report.tables`` with the figures that
``vtprune.report.plots`` draws from the same frames, then the notes both collected."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from vtprune.report.load import Results
from vtprune.report.plots import accuracy_plots, fidelity_plots, pareto_plots, serve_plots, speed_plots
from vtprune.report.tables import (
    MICRO_MARK,
    SMOKE_MARK,
    UNSCORED,
    accuracy_frame,
    accuracy_section,
    flagged,
    grouped_notes,
    serve_frame,
    serve_section,
    speed_frame,
    speed_section,
)


def header_section(results: Results, root: Path) -> list[str]:
    runs = results.runs
    out = ["# vtprune report", ""]
    for column, mark in (("smoke", SMOKE_MARK), ("micro", MICRO_MARK)):
        if any(flagged(frame, column) for frame in (runs, results.metrics, results.bench, results.serve)):
            out += [f"> **{mark}**", ""]
    # An older run.json without versions reads NaN here.
    versions = sorted({", ".join(f"{k} {v}" for k, v in r.items() if v) for r in runs.get("versions", [])
                       if isinstance(r, dict)})
    # A serve-bench's run.json names no dtype: its rows do.
    dtypes = pd.concat([frame.get("dtype", pd.Series(dtype=object)) for frame in (runs, results.serve)])
    dates = sorted(d for d in pd.concat([runs.get("started", pd.Series()), runs.get("finished", pd.Series())]).dropna())
    out += [
        f"- Results: `{root}` ({len(runs)} runs)",
        f"- Device: {'; '.join(sorted(set(runs.get('device', pd.Series()).dropna().astype(str)))) or 'unknown'}",
        f"- dtype: {', '.join(sorted(set(dtypes.dropna().astype(str)))) or 'unknown'}",
        f"- Versions: {'; '.join(versions) or 'unknown'}",
        f"- Runs dated: {dates[0]} … {dates[-1]}" if dates else "- Runs dated: unknown",
        f"- Report written: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- '{UNSCORED}': the run recorded outputs but no score (e.g. a judge-scored task without an API key).",
    ]
    # What whoever ran a bench wrote about its conditions (e.g. a busy machine) belongs beside its figures.
    said = runs[["name", "note"]].dropna() if {"name", "note"} <= set(runs.columns) else pd.DataFrame()
    out += [f"- Run `{row.name}`: {row.note}" for row in said.itertuples()]
    return out + [""]


def write_report(results: Results, root: Path, output: Path | None, plots_dir: Path | None) -> str:
    """The markdown report; plots are written under ``plots_dir`` (none when it is None) and linked relative to
    ``output``."""
    notes, flags = list(results.notes), {}
    acc, speed = accuracy_frame(results.metrics, results.samples), speed_frame(results.bench, results.bench_rows)
    serve = serve_frame(results.serve, results.serve_rows)
    base = output.parent if output is not None else Path.cwd()

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path, base)).as_posix()

    acc_plots, speed_plots_, serve_plots_ = {}, {}, {}
    if plots_dir is not None:
        if not acc.empty:
            acc_plots = {**accuracy_plots(acc, plots_dir), **fidelity_plots(acc, plots_dir),
                         **pareto_plots(acc, speed, plots_dir)}
        if not speed.empty:
            speed_plots_ = speed_plots(speed, plots_dir)
        if not serve.empty:
            serve_plots_ = serve_plots(serve, plots_dir)
    lines = header_section(results, root)
    lines += accuracy_section(acc, acc_plots, relative, notes, flags)
    lines += speed_section(speed, speed_plots_, relative, notes, flags)
    lines += serve_section(serve, serve_plots_, relative, notes, flags)
    notes += grouped_notes(flags)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
