"""Read every run below a results folder (DESIGN §7) into three pandas frames."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vtprune.errors import VtpruneError
from vtprune.results import RUN_FILE, read_jsonl


@dataclass
class Results:
    runs: pd.DataFrame  # one row per run.json (+ run_dir)
    metrics: pd.DataFrame  # metrics.jsonl rows of every run
    bench: pd.DataFrame  # bench.jsonl rows of every run
    notes: list[str] = field(default_factory=list)


def load_results(root: str | Path) -> Results:
    """All complete runs below ``root``; raises VtpruneError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise VtpruneError(f"RESULTS_DIR: not a folder: {root}")
    runs, metrics, bench, notes = [], [], [], []
    for run_file in sorted(root.rglob(RUN_FILE)):
        try:
            run = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            notes.append(f"{run_file}: not valid JSON, skipped")
            continue
        if not run.get("finished"):
            # A sweep redoes such folders; their rows may be half written.
            notes.append(f"{run_file.parent}: incomplete run (no finished time), skipped")
            continue
        run_dir = run_file.parent
        run["run_dir"] = str(run_dir)
        runs.append(run)
        for name, rows in (("metrics.jsonl", metrics), ("bench.jsonl", bench)):
            if (run_dir / name).is_file():
                for row in read_jsonl(run_dir / name):
                    row.setdefault("run", run.get("name"))
                    row.setdefault("smoke", run.get("smoke", False))
                    row["finished"] = run["finished"]
                    rows.append(row)
    if not runs:
        raise VtpruneError(f"RESULTS_DIR: no complete runs (run.json) below {root}")
    return Results(pd.DataFrame(runs), _latest(pd.DataFrame(metrics), ["model", "strategy", "keep_ratio", "task", "metric"]),
                   _latest(pd.DataFrame(bench), ["model", "device", "dtype", "strategy", "keep_ratio", "batch_size"]), notes)


def _latest(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """One row per key: a point measured twice (a rerun, two shards) counts once, the newest."""
    if frame.empty:
        return frame
    key = [k for k in key if k in frame.columns]
    return frame.sort_values("finished", kind="stable").drop_duplicates(key, keep="last").reset_index(drop=True)
