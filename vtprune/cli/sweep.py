"""``vtprune sweep ratios``: one eval per (strategy, keep ratio) over one loaded model.

Points land in ``<output_dir>/<config name>/<strategy>-<ratio>/`` and each point's run name is that folder's
name. The ``none``/1.0 reference point is always run, once; other strategies are not run at 1.0 (keeping
every token is the reference by definition).

Resuming: a finished point is reused only when its run.json records the settings asked for now (``point_settings``);
an unfinished one is run again; a finished one made with other settings is refused, naming the difference, unless
``--force`` reruns it. Each point is run into ``<sweep>/.partial/<point>/`` and moved in place once complete, so an
interrupted (re)run leaves the old results or no point, never a mix that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    OutputDirOpt,
    check_output_dir,
    check_strategies,
    handle_errors,
    load_cli_config,
    parse_list,
    quiet_libraries,
)
from vtprune.cli.eval_cmd import LimitOpt
from vtprune.errors import ConfigError, VtpruneError

sweep_app = typer.Typer(help="Sweeps: many pruning points over one loaded model.", no_args_is_help=True,
                        pretty_exceptions_enable=False)
app.add_typer(sweep_app, name="sweep")

STAGING = ".partial"


def point_name(strategy: str, ratio: float) -> str:
    return f"{strategy}-{float(ratio)}"


def sweep_points(strategies: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """The reference first, then every strategy at every ratio below 1, in the order given."""
    points = [("none", 1.0)]
    for strategy in strategies:
        for ratio in ratios:
            if strategy != "none" and ratio < 1.0 and (strategy, ratio) not in points:
                points.append((strategy, ratio))
    return points


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (i from 0 to n-1) → (i, n)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise VtpruneError(f"--shard: '{text}' must be i/n with 0 <= i < n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise VtpruneError(f"--shard: '{text}' must be i/n with 0 <= i < n, e.g. 0/2")
    return i, n


def point_complete(point_dir: Path, bench: bool) -> bool:
    from vtprune.results import is_complete

    if not (is_complete(point_dir) and (point_dir / "metrics.jsonl").is_file()):
        return False
    # run.json is rewritten by each part (eval, then bench): its kind says whether the bench part finished.
    return not bench or (_run(point_dir).get("kind") == "eval+bench" and (point_dir / "bench.jsonl").is_file())


def _run(point_dir: Path) -> dict:
    from vtprune.results import RUN_FILE

    try:
        run = json.loads((point_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def point_settings(config: dict, tasks, limit, version, bench: bool) -> dict:
    """What decides a point's results, keyed by the config field (as run.json records it): two points with equal
    settings are the same experiment. Device, batch size and attention kernel are left out: they change speed,
    not what is measured."""

    def get(*keys):
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    settings = {
        "model.path": get("model", "path"), "model.weights": get("model", "weights"), "model.dtype": get("model", "dtype"),
        "pruning.strategy": get("pruning", "strategy"), "pruning.keep_ratio": get("pruning", "keep_ratio"),
        "pruning.options": get("pruning", "options"), "pruning.placement": get("pruning", "placement"),
        "eval.tasks": tasks, "eval.limit": limit, "eval.generation": get("eval", "generation"), "seed": get("seed"),
        "vtprune version": version, "engine": get("engine") or "hf",
    }
    if bench:
        settings["bench"] = get("bench")
    return settings


def recorded_settings(point_dir: Path, bench: bool) -> dict:
    run = _run(point_dir)
    version = run.get("versions", {}).get("vtprune") if isinstance(run.get("versions"), dict) else None
    return point_settings(run.get("config") or {}, run.get("tasks"), run.get("limit"), version, bench)


def requested_settings(cfg, bench: bool) -> dict:
    from vtprune.results import versions

    # Through JSON, as run.json holds it: tuples become lists, paths strings.
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    return point_settings(config, config["eval"]["tasks"], cfg.eval.limit, versions()["vtprune"], bench)


def differences(recorded: dict, requested: dict, prefix: str = "") -> list[str]:
    """``"<key> <recorded> there, <requested> asked"`` for each key that differs, down to the key inside a section
    (``eval.generation.max_new_tokens``), so that the one line stays short."""

    def short(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    out = []
    for key in [*requested, *(k for k in recorded if k not in requested)]:
        old, new = recorded.get(key), requested.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} {short(old)} there, {short(new)} asked")
    return out


def plan(points, configs, sweep_dir: Path, bench: bool, force: bool, option: str) -> list:
    """The points to run. Refuses, before anything is written or loaded, a finished point made with other
    settings (unless ``force``) and a point whose folder cannot be written."""
    todo, refused = [], []
    for point in points:
        point_dir = sweep_dir / point_name(*point)
        if point_complete(point_dir, bench):
            diff = differences(recorded_settings(point_dir, bench), requested_settings(configs[point], bench))
            if not diff:
                continue
            if not force:
                refused.append((point_dir, diff))
                continue
        for path in (point_dir, sweep_dir / STAGING / point_dir.name):
            check_output_dir(path, option)  # e.g. a file where the point's folder should be
        todo.append(point)
    if refused:
        point_dir, diff = refused[0]
        more = f", and {len(refused) - 1} more points" if len(refused) > 1 else ""
        raise VtpruneError(f"sweep point {point_dir} was made with other settings ({'; '.join(diff)}){more}: pass "
                           f"--force to rerun {'them' if more else 'it'} in place, or use another --output-dir")
    return todo


def run_point(pipe, sweep_dir: Path, bench: bool) -> Path:
    """Run one point into the staging folder, then put it in place of any old one."""
    from vtprune.eval.runner import run_eval
    from vtprune.results import RUN_FILE

    name = pipe.config.name
    staging = sweep_dir / STAGING
    shutil.rmtree(staging / name, ignore_errors=True)  # left by a killed run of this point
    new = run_eval(pipe, output_dir=staging, reference_dir=sweep_dir)
    if bench:
        from vtprune.bench import run_bench

        run_bench(pipe, batch_sizes=None, output_dir=new)
    final = sweep_dir / name
    if final.exists():
        # run.json first: should the process die here, the old point reads as unfinished and is run again.
        (final / RUN_FILE).unlink(missing_ok=True)
        shutil.rmtree(final)
    new.rename(final)
    with contextlib.suppress(OSError):
        staging.rmdir()
    return final


def summary(point_dir: Path) -> tuple[str, str]:
    """(scores, kept fraction) of a finished point, as short text."""
    from vtprune.results import read_jsonl

    try:
        rows = read_jsonl(point_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return "metrics.jsonl not readable", "—"
    scores, kept = [], {}
    for r in rows:
        value = "unscored" if r.get("value") is None else f"{r['value']:.3f}"
        loyalty = "" if r.get("loyalty") is None else f" (loyalty {r['loyalty']:.2f})"
        scores.append(f"{r.get('task')} {r.get('metric')} {value}{loyalty}")
        if r.get("kept_fraction_mean") is not None:
            kept[r.get("task")] = (r["kept_fraction_mean"], r.get("n") or 0)
    weight = sum(n for _, n in kept.values())
    fraction = f"{sum(f * n for f, n in kept.values()) / weight:.3f}" if weight else "—"
    return "; ".join(scores) or "no metrics", fraction


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{s // 60:.0f} min {s % 60:02.0f} s"


def print_summary(sweep_dir: Path, points, times: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("point", "scores", "kept", "time", title=f"sweep {sweep_dir}", title_justify="left")
    for point in points:
        name = point_name(*point)
        scores, kept = summary(sweep_dir / name)
        table.add_row(name, scores.replace("; ", "\n"), kept, _seconds(times[point]) if point in times else "reused")
    # Off a terminal (a log file, CI) rich would squeeze the table to 80 columns.
    (Console() if sys.stdout.isatty() else Console(width=120)).print(table)
    folder = shlex.quote(str(sweep_dir))
    typer.echo(f"next: vtprune report {folder} -o {shlex.quote(str(sweep_dir / 'REPORT.md'))}")


@sweep_app.command("ratios")
@handle_errors
def ratios_(
    config: ConfigOpt,
    ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios, e.g. 1.0,0.75,0.5,0.25.")],
    strategies: Annotated[str | None, typer.Option(help="Comma-separated strategies (default: the config's).")] = None,
    bench: Annotated[bool, typer.Option("--bench", help="Also benchmark each point (bench.jsonl).")] = False,
    shard: Annotated[str | None, typer.Option(help="Run every n-th point: i/n, i from 0 (split machines).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Rerun finished points made with other settings (limit, tasks, ...), replacing them.")] = False,
    limit: LimitOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Eval every (strategy, keep ratio) point into <output_dir>/<name>/<strategy>-<ratio>/, loading the model once."""
    cfg = load_cli_config(config, **{"eval.limit": limit, "output_dir": str(output_dir) if output_dir else None})
    from vtprune.bench.cost import check_ratios

    ratio_list = check_ratios(parse_list(ratios, float, "--ratios"))
    if not ratio_list:
        raise VtpruneError("--ratios: give at least one keep ratio in (0, 1], e.g. 0.5,0.25")
    names = parse_list(strategies, name="--strategies")
    check_strategies(names)
    i, n = parse_shard(shard)
    points = sweep_points(names or [cfg.pruning.strategy], ratio_list)
    # Validate every point before loading anything: a bad strategy or ratio is one line, nothing written.
    configs = {}
    for s, r in points:
        try:
            configs[(s, r)] = cfg.replace(name=point_name(s, r), pruning=cfg.pruning.point(s, r))
        except ConfigError as exc:
            key, _, problem = str(exc).partition(": ")
            option = {"pruning.strategy": "--strategies" if names else None, "pruning.keep_ratio": "--ratios"}.get(key)
            raise (ConfigError(f"{option}: {problem}") if option else exc) from None
    if bench and cfg.engine != "hf":
        raise VtpruneError(f"--bench: times transformers' generate; engine '{cfg.engine}' is measured under load by "
                           "`vtprune serve-bench` (allowed with --bench: engine hf)")
    if bench:
        try:
            from vtprune.bench import run_bench  # noqa: F401
        except ImportError:
            raise VtpruneError("--bench: the benchmark module (vtprune.bench.run_bench) is not available") from None
    quiet_libraries()
    from vtprune.eval.runner import check_tasks

    check_tasks(cfg.eval.tasks)
    sweep_dir = Path(cfg.output_dir) / cfg.name
    mine = points[i::n]
    todo = plan(mine, configs, sweep_dir, bench, force, "--output-dir" if output_dir else "output_dir")
    typer.echo(f"sweep {cfg.name}: {len(mine)} points in this shard, {len(todo)} to run, "
               f"{len(mine) - len(todo)} reused ({cfg.model.path}, {', '.join(cfg.eval.tasks)}, "
               f"limit {cfg.eval.limit if cfg.eval.limit is not None else 'none'})", err=True)
    times = {}
    if todo:
        import vtprune

        base = vtprune.load(cfg)
        for k, point in enumerate(todo, 1):
            begun = time.monotonic()
            point_dir = run_point(base.for_config(configs[point]), sweep_dir, bench)
            times[point] = time.monotonic() - begun
            scores, kept = summary(point_dir)
            left = len(todo) - k
            # The first point also pays once for the task index, the datasets and warm-up: leave it out once
            # there are others to go by.
            durations = list(times.values())
            each = sum(durations[1:] or durations) / len(durations[1:] or durations)
            eta = f", ETA {_seconds(each * left)}" if left else ""
            typer.echo(f"[{k}/{len(todo)}] {point_dir.name}: {scores}; kept {kept}; {_seconds(times[point])}{eta}",
                       err=True)
    print_summary(sweep_dir, mine, times)
