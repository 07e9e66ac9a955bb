"""``vtprune eval``. The lmms-eval run itself lands with the evaluation issue; --dry-run works now."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from vtprune.cli import app
from vtprune.cli.common import ConfigOpt, OutputDirOpt, handle_errors, load_cli_config, parse_list


@app.command("eval")
@handle_errors
def eval_(
    config: ConfigOpt,
    limit: Annotated[Optional[int], typer.Option(help="Samples per task (overrides eval.limit).")] = None,
    output_dir: OutputDirOpt = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated tasks (overrides eval.tasks).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved config; run nothing.")] = False,
) -> None:
    """Score one config on its lmms-eval tasks; writes results/<name>/ (run.json, metrics.jsonl, samples.jsonl)."""
    import yaml

    cfg = load_cli_config(
        config,
        **{"eval.limit": limit, "output_dir": str(output_dir) if output_dir else None, "eval.tasks": parse_list(tasks, name="--tasks")},
    )
    if dry_run:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    from vtprune.errors import VtpruneError

    raise VtpruneError("eval: the lmms-eval runner has not landed yet (issue 5); use --dry-run")
