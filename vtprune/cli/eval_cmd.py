"""``vtprune eval``: one config on its lmms-eval tasks → results/<name>/ (run.json, metrics.jsonl, samples.jsonl)."""

import os
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import ConfigOpt, OutputDirOpt, handle_errors, load_cli_config, parse_list, quiet_libraries

LimitOpt = Annotated[int | None, typer.Option(help="Samples per task (overrides eval.limit).")]


@app.command("eval")
@handle_errors
def eval_(
    config: ConfigOpt,
    limit: LimitOpt = None,
    output_dir: OutputDirOpt = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (overrides eval.tasks).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the resolved config; run nothing.")
    ] = False,
) -> None:
    """Score one config on its lmms-eval tasks; writes results/<name>/ (run.json, metrics.jsonl, samples.jsonl).

    Data parallel on several GPUs: ``accelerate launch -m vtprune eval --config X.yaml``.
    """
    import yaml

    overrides = {
        "eval.limit": limit,
        "output_dir": str(output_dir) if output_dir else None,
        "eval.tasks": parse_list(tasks, name="--tasks"),
        "model.device": rank_device(),
    }
    cfg = load_cli_config(config, **overrides)
    if dry_run:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    quiet_libraries()
    import vtprune
    from vtprune.eval.runner import run_eval

    run_dir = run_eval(vtprune.load(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(str(run_dir))


def rank_device() -> str | None:
    """Under ``accelerate launch`` with several processes each one takes the GPU of its local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return None

