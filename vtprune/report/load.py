"""Read every run below a results folder (docs: Results layout) into pandas frames: accuracy (``metrics.jsonl``),
speed on Hugging Face (``bench.jsonl``) and serving under load on vLLM (``serve.jsonl``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from vtprune.errors import VtpruneError
from vtprune.results import RUN_FILE, read_jsonl

ROW_FILES = ("metrics.jsonl", "bench.jsonl", "serve.jsonl")
# What the report groups and joins on: a row without one of them cannot be placed in any table.
REQUIRED = {
    "metrics.jsonl": ("model", "strategy", "keep_ratio", "task", "metric"),
    "bench.jsonl": ("model", "strategy", "keep_ratio", "batch_size", "device", "dtype"),
    "serve.jsonl": ("model", "strategy", "keep_ratio", "concurrency", "device", "dtype"),
    "samples.jsonl": ("task", "doc_id", "output"),
}
CHECKOUT = Path(__file__).resolve().parents[2]  # the vtprune checkout this report runs from


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
    serve: pd.DataFrame = field(default_factory=pd.DataFrame)  # serve.jsonl rows of every run (vtprune serve-bench)
    serve_rows: pd.DataFrame | None = None  # every serve row, also those a newer run of the same point replaced


def load_results(root: str | Path) -> Results:
    """All complete runs below ``root``; raises VtpruneError when there is none. Unreadable runs and interrupted
    ones (rows but no finished run.json) are skipped, each with a note."""
    root = Path(root)
    if not root.is_dir():
        raise VtpruneError(f"RESULTS_DIR: not a folder: {root}")
    runs, metrics, bench, serve, notes, samples = [], [], [], [], [], {}
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
        if "versions" not in run:
            notes.append(f"{run_dir / RUN_FILE}: an older run.json without `versions`: its package versions are unknown")
        run["run_dir"] = str(run_dir)
        runs.append(run)
        samples[str(run_dir)] = sample_rows
        for name, out in (("metrics.jsonl", metrics), ("bench.jsonl", bench), ("serve.jsonl", serve)):
            for row in rows[name]:
                # A run.json without the flags (a serve-bench's) is labelled by its model's name, as eval's is.
                for flag, prefix in (("smoke", "tiny:"), ("micro", "micro:")):
                    row.setdefault(flag, run.get(flag, str(row["model"]).startswith(prefix)))
                row["model"] = model_name(row["model"])
                row.setdefault("engine", _engine(run))
                if name != "serve.jsonl" and row["engine"] != "hf":
                    # An eval (or bench) on another engine is another measurement of the same point: its own model
                    # label keeps it from replacing the HF one and pairs it with its own engine's unpruned run.
                    row["model"] = f"{row['model']} ({row['engine']})"
                row["run_dir"] = str(run_dir)
                row.setdefault("run", run.get("name"))
                row["finished"] = run["finished"]
                out.append(row)
    if not runs:
        skipped = f" ({len(notes)} skipped: {notes[0]})" if notes else ""
        raise VtpruneError(f"RESULTS_DIR: no complete runs (run.json) below {root}{skipped}")
    latest_metrics = _latest(pd.DataFrame(metrics), ["model", "strategy", "keep_ratio", "task", "metric"])
    latest_bench = _latest(pd.DataFrame(bench), ["model", "device", "dtype", "strategy", "keep_ratio", "batch_size",
                                                 "threads"])
    # A run whose every row a newer run replaced is counted in the header but in no table: say which and why.
    latest_serve = _latest(pd.DataFrame(serve), ["model", "engine", "device", "dtype", "strategy", "keep_ratio",
                                                 "concurrency"])
    shown = {d for frame in (latest_metrics, latest_bench, latest_serve) for d in frame.get("run_dir", [])}
    hidden = [Path(r["run_dir"]).relative_to(root).as_posix() for r in runs if r["run_dir"] not in shown
              and any(row["run_dir"] == r["run_dir"] for row in (*metrics, *bench, *serve))]
    if hidden:
        notes.append("not shown, every point of theirs measured again by a newer run: " + ", ".join(hidden))
    return Results(pd.DataFrame(runs), latest_metrics, latest_bench, notes, samples, pd.DataFrame(bench),
                   latest_serve, pd.DataFrame(serve))


def _engine(run: dict) -> str:
    """Where a run's rows were measured: its run.json's ``engine``, else its config's, else ``hf`` (every
    run from before vLLM)."""
    config = run.get("config")
    engine = run.get("engine") or (config.get("engine") if isinstance(config, dict) else None)
    return str(engine) if engine else "hf"


def _run_dirs(root: Path) -> list[Path]:
    """Every folder holding a run.json or any results file: one without run.json was interrupted. Hidden folders
    below ``root`` are not runs yet (a sweep stages a point in ``.partial/`` until it is complete)."""
    found = {f.parent for name in (RUN_FILE, "samples.jsonl", *ROW_FILES) for f in root.rglob(name)}
    return sorted(d for d in found if not any(part.startswith(".") for part in d.relative_to(root).parts))


def model_name(model) -> str:
    """How a report names a model: hub ids and ``micro:`` / ``tiny:`` names as they are, a path inside the vtprune
    checkout relative to it, any other absolute path by its last two components, so that no report carries the
    folders of the machine that ran it (rows of older runs hold the absolute path)."""
    text = str(model)
    path = Path(text).expanduser()
    if not path.is_absolute():
        return text
    if path.is_relative_to(CHECKOUT):
        return path.relative_to(CHECKOUT).as_posix()
    return "/".join(path.parts[-2:])


def _run_json(path: Path) -> dict:
    """run.json as a dict (``{}`` when absent); CorruptFile when it is not a vtprune run.json (not a JSON object, or
    another tool's file whose ``finished`` is not a timestamp)."""
    try:
        run = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # also bytes that are not UTF-8
        run = None
    if not isinstance(run, dict):
        raise CorruptFile(f"{path}: not a JSON object")
    for key in ("started", "finished"):
        if run.get(key) is not None and not _timestamp(run[key]):
            raise CorruptFile(f"{path}: not a vtprune run.json ({key}: {json.dumps(run[key])[:40]}, not a time)")
    if not isinstance(run.get("versions", {}), dict):
        raise CorruptFile(f"{path}: not a vtprune run.json (versions is not an object)")
    return run


def _timestamp(value) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _rows(path: Path) -> list[dict]:
    """The rows of a JSONL file (none when absent); CorruptFile when a line is not a JSON object or lacks a field the
    report places it by."""
    try:
        rows = read_jsonl(path) if path.is_file() else []
    except ValueError:
        rows = None
    if rows is None or not all(isinstance(row, dict) for row in rows):
        raise CorruptFile(f"{path}: a line is not a JSON object")
    for number, row in enumerate(rows, 1):
        missing = [key for key in REQUIRED[path.name] if row.get(key) is None]
        if missing:
            raise CorruptFile(f"{path}: row {number} has no {', '.join(missing)}")
        for key in ("keep_ratio", "concurrency"):
            if key in row and (isinstance(row[key], bool) or not isinstance(row[key], (int, float))):
                raise CorruptFile(f"{path}: row {number}: {key} {json.dumps(row[key])[:40]} is not a number")
    return rows


def _latest(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """One row per key: a point measured twice (a rerun, two shards) counts once, the newest."""
    if frame.empty:
        return frame
    key = [k for k in key if k in frame.columns]
    return frame.sort_values("finished", kind="stable").drop_duplicates(key, keep="last").reset_index(drop=True)
