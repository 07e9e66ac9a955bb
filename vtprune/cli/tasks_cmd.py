"""``vtprune tasks export DIR``: the mini tasks as task YAMLs for lmms-eval's own CLI (``--include_path DIR``);
``vtprune tasks list``: the same as ``vtprune list tasks``. A thin layer over ``vtprune.eval.task_export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import check_output_dir, handle_errors, parse_list

tasks_app = typer.Typer(help="vtprune's evaluation tasks: list them, export the mini tasks for lmms-eval's CLI.",
                        no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("list")
def list_tasks() -> None:
    """The tasks vtprune knows by name (the same as `vtprune list tasks`)."""
    from vtprune.cli.list_cmd import list_

    list_("tasks")


@tasks_app.command("export")
@handle_errors
def export(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write: new, empty, or an earlier export "
                                           "(replaced as a whole).")],
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated mini tasks (default: all of them).")]
    = None,
) -> None:
    """Write the mini tasks' YAMLs and data into DIR, for `python -m lmms_eval --include_path DIR --tasks NAME`."""
    from vtprune.errors import VtpruneError
    from vtprune.eval.task_export import check_export_folder, export_tasks, mini_task_names

    try:
        names = mini_task_names(parse_list(tasks, name="--tasks"))
    except VtpruneError as exc:
        text = str(exc)
        raise VtpruneError(text if text.startswith("--tasks:") else f"--tasks: {text}") from None
    try:
        check_export_folder(folder)
    except VtpruneError as exc:
        raise VtpruneError(f"DIR: {exc}") from None
    check_output_dir(folder, "DIR")
    for path in export_tasks(folder, names):
        typer.echo(path)
    typer.echo(f"run one with: python -m lmms_eval --model vtprune --model_args config=CONFIG.yaml --include_path "
               f"{folder} --tasks {names[0]} --output_path OUT", err=True)
