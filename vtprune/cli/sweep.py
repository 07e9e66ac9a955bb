"""``vtprune sweep ratios``: one eval per (strategy, keep ratio) over one loaded model.

Points land in ``<output_dir>/<config name>/<strategy>-<ratio>/`` and each point's run name is that folder's
name. The ``none``/1.0 reference point is always run, once; other strategies are not run at 1.0 (keeping
every token is the reference by definition). A point with a finished run.json is skipped, any other is
redone, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    OutputDirOpt,
    handle_errors,
    load_cli_config,
    parse_list,
    quiet_libraries,
)
from vtprune.cli.eval_cmd import LimitOpt
from vtprune.errors import VtpruneError

sweep_app = typer.Typer(help="Sweeps: many pruning points over one loaded model.", no_args_is_help=True,
                        pretty_exceptions_enable=False)
app.add_typer(sweep_app, name="sweep")


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

    # run.json is rewritten by each part (eval, then bench), so each part's rows must be there too.
    files = ("metrics.jsonl", "bench.jsonl") if bench else ("metrics.jsonl",)
    return is_complete(point_dir) and all((point_dir / f).is_file() for f in files)


@sweep_app.command("ratios")
@handle_errors
def ratios_(
    config: ConfigOpt,
    ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios, e.g. 1.0,0.75,0.5,0.25.")],
    strategies: Annotated[str | None, typer.Option(help="Comma-separated strategies (default: the config's).")] = None,
    bench: Annotated[bool, typer.Option("--bench", help="Also benchmark each point (bench.jsonl).")] = False,
    shard: Annotated[str | None, typer.Option(help="Run every n-th point: i/n, i from 0 (split machines).")] = None,
    limit: LimitOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Eval every (strategy, keep ratio) point into <output_dir>/<name>/<strategy>-<ratio>/, loading the model once."""
    cfg = load_cli_config(config, **{"eval.limit": limit, "output_dir": str(output_dir) if output_dir else None})
    from vtprune.bench.cost import check_ratios

    ratio_list = check_ratios(parse_list(ratios, float, "--ratios"))
    if not ratio_list:
        raise VtpruneError("--ratios: give at least one keep ratio in (0, 1], e.g. 0.5,0.25")
    names = parse_list(strategies, name="--strategies") or [cfg.pruning.strategy]
    i, n = parse_shard(shard)
    points = sweep_points(names, ratio_list)
    # Validate every point before loading anything: a bad strategy or ratio is one line, nothing written.
    configs = {}
    for s, r in points:
        configs[(s, r)] = cfg.replace(name=point_name(s, r), pruning=cfg.pruning.point(s, r))
    if bench:
        try:
            from vtprune.bench import run_bench
        except ImportError:
            raise VtpruneError("--bench: the benchmark module (vtprune.bench.run_bench) is not available") from None
    quiet_libraries()
    from vtprune.eval.runner import check_tasks

    check_tasks(cfg.eval.tasks)
    sweep_dir = Path(cfg.output_dir) / cfg.name
    todo = [p for p in points[i::n] if not point_complete(sweep_dir / point_name(*p), bench)]
    typer.echo(f"sweep {cfg.name}: {len(points[i::n])} points in this shard, {len(todo)} to run", err=True)
    if not todo:
        return
    import vtprune
    from vtprune.api import Pipeline
    from vtprune.eval.runner import run_eval

    base = vtprune.load(cfg)
    for point in todo:
        pipe = Pipeline(configs[point], base.adapter)
        point_dir = run_eval(pipe, output_dir=sweep_dir)
        if bench:
            run_bench(pipe, batch_sizes=None, output_dir=point_dir)
        typer.echo(str(point_dir))
