"""``vtprune eval``: one config on its lmms-eval tasks → results/<name>/ (run.json, metrics.jsonl, samples.jsonl)."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    OutputDirOpt,
    handle_errors,
    load_cli_config,
    options_named,
    parse_list,
    quiet_libraries,
)

LimitOpt = Annotated[int | None, typer.Option(help="Samples per task (overrides eval.limit).")]
IncludePathOpt = Annotated[
    list[Path] | None,
    typer.Option("--include-path", help="Folder of extra lmms-eval task YAMLs (repeatable), as lmms-eval's own."),
]


@app.command("eval")
@handle_errors
def eval_(
    config: ConfigOpt,
    limit: LimitOpt = None,
    output_dir: OutputDirOpt = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated lmms-eval tasks (overrides eval.tasks).")] = None,
    include_path: IncludePathOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the resolved config; run nothing.")
    ] = False,
) -> None:
    """Score one config on lmms-eval tasks; writes results/<name>/ (run.json, metrics.jsonl, samples.jsonl).

    Data parallel (CPU or GPUs): ``torchrun --nproc_per_node 2 -m vtprune eval -c X.yaml`` or
    ``accelerate launch --num_processes 2 -m vtprune eval -c X.yaml``; results equal one process's.
    """
    import yaml

    from vtprune.errors import VtpruneError

    for folder in include_path or []:
        if not folder.is_dir():
            raise VtpruneError(f"--include-path: not a folder: {folder}")
    overrides = {
        "eval.limit": limit,
        "output_dir": str(output_dir) if output_dir else None,
        "eval.tasks": parse_list(tasks, name="--tasks"),
    }
    cfg = load_cli_config(config, **overrides)
    quiet_libraries()
    from vtprune.eval.runner import check_tasks

    with options_named(overrides):
        check_tasks(cfg.eval.tasks, include_path or ())
    if dry_run:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    import vtprune
    from vtprune.eval.lmms_model import data_parallel_device
    from vtprune.eval.runner import run_eval

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = data_parallel_device(cfg.model.device, world, int(os.environ.get("LOCAL_RANK", "0")))
    run_dir = run_eval(vtprune.load(cfg, device=device), include_paths=include_path or ())
    if int(os.environ.get("RANK", "0")) == 0:
        print_scores(run_dir)


def print_scores(run_dir: Path) -> None:
    """The score table the run wrote (metrics.jsonl), then the folder."""
    import json

    from rich.console import Console
    from rich.table import Table

    from vtprune.report.tables import MICRO_MARK
    from vtprune.results import RUN_FILE, read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    table = Table("task", "metric", "value", "± stderr", "n", "kept", "loyalty", "top-1", "KL", title=f"{run_dir.name}",
                  title_justify="left")

    def figure(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    for r in rows:
        value = "unscored" if r["value"] is None else f"{r['value']:.4f}"
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        kept = "" if r["kept_fraction_mean"] is None else f"{r['num_kept_mean']:.1f}/{r['num_visual_mean']:.1f}"
        table.add_row(r["task"], r["metric"], value, stderr, str(r["n"]), kept, figure(r.get("loyalty")),
                      figure(r.get("top1_agreement")), figure(r.get("kl_mean"), 4))
    # Piped or logged output has no width to fit: rich would squeeze the names to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table)
    note = (json.loads((run_dir / RUN_FILE).read_text()).get("fidelity") or {}).get("note")
    if note:
        console.print(f"fidelity: {note}", soft_wrap=True)
    if rows and rows[0].get("smoke"):
        console.print("smoke figures: a tiny random model shows the machinery works, not how accurate a strategy is")
    if rows and rows[0].get("micro"):
        console.print(f"{MICRO_MARK}")
    typer.echo(str(run_dir))
