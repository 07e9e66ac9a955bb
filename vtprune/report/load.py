"""Read every run below a results folder (DESIGN §7) into three pandas frames."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vtprune.errors import VtpruneError
from vtprune.results import RUN_FILE, read_jsonl

ROW_FILES = ("metrics.jsonl", "bench.jsonl")


class CorruptFile(Exception):
    """A results file that cannot be read: its run is skipped with a note."""


@dataclass
class Results:
    runs: pd.DataFrame  # one row per run.json (+ run_dir)
    metrics: pd.DataFrame  # metrics.jsonl rows of every run
    bench: pd.DataFrame  # bench.jsonl rows of every run
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # run_dir -> its samples.jsonl rows (fidelity)
    bench_rows: pd.DataFrame | None = None  # every bench row, also those a newer run of the same point replaced


def load_results(root: str | Path) -> Results:
    """All complete runs below ``root``; raises VtpruneError when there is none. Unreadable runs and interrupted
    ones (rows but no finished run.json) are skipped, each with a note."""
    root = Path(root)
    if not root.is_dir():
        raise VtpruneError(f"RESULTS_DIR: not a folder: {root}")
    runs, metrics, bench, notes, samples = [], [], [], [], {}
    for run_dir in _run_dirs(root):
        try:
            run = _run_json(run_dir / RUN_FILE)
            if not run.get("finished"):
                # A sweep redoes such folders; their rows may be half written.
                notes.append(f"interrupted or still running: {run_dir} — run the same command again to resume")
                continue
            rows = {name: _rows(run_dir / name) for name in ROW_FILES}
            sample_rows = _rows(run_dir / "samples.jsonl")
        except CorruptFile as exc:
            notes.append(f"{exc}, skipped")
            continue
        run["run_dir"] = str(run_dir)
        runs.append(run)
        samples[str(run_dir)] = sample_rows
        for name, out in (("metrics.jsonl", metrics), ("bench.jsonl", bench)):
            for row in rows[name]:
                row["run_dir"] = str(run_dir)
                row.setdefault("run", run.get("name"))
                row.setdefault("smoke", run.get("smoke", False))
                row.setdefault("micro", run.get("micro", False))
                row["finished"] = run["finished"]
                out.append(row)
    if not runs:
        skipped = f" ({len(notes)} skipped: {notes[0]})" if notes else ""
        raise VtpruneError(f"RESULTS_DIR: no complete runs (run.json) below {root}{skipped}")
    return Results(pd.DataFrame(runs), _latest(pd.DataFrame(metrics), ["model", "strategy", "keep_ratio", "task", "metric"]),
                   _latest(pd.DataFrame(bench), ["model", "device", "dtype", "strategy", "keep_ratio", "batch_size"]), notes,
                   samples, pd.DataFrame(bench))


def _run_dirs(root: Path) -> list[Path]:
    """Every folder holding a run.json or any results file: one without run.json was interrupted."""
    return sorted({f.parent for name in (RUN_FILE, "samples.jsonl", *ROW_FILES) for f in root.rglob(name)})


def _run_json(path: Path) -> dict:
    """run.json as a dict (``{}`` when absent); CorruptFile when it is not a JSON object."""
    try:
        run = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        run = None
    if not isinstance(run, dict):
        raise CorruptFile(f"{path}: not a JSON object")
    return run


def _rows(path: Path) -> list[dict]:
    """The rows of a JSONL file (none when absent); CorruptFile when a line is not a JSON object."""
    try:
        rows = read_jsonl(path) if path.is_file() else []
    except ValueError:
        rows = None
    if rows is None or not all(isinstance(row, dict) for row in rows):
        raise CorruptFile(f"{path}: a line is not a JSON object")
    return rows


def _latest(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """One row per key: a point measured twice (a rerun, two shards) counts once, the newest."""
    if frame.empty:
        return frame
    key = [k for k in key if k in frame.columns]
    return frame.sort_values("finished", kind="stable").drop_duplicates(key, keep="last").reset_index(drop=True)
