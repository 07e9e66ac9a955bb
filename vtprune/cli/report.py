from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import check_output_dir, check_output_file, handle_errors

FORMATS = ("md", "csv", "json")


@app.command()
@handle_errors
def report(
    results_dir: Annotated[Path, typer.Argument(help="Folder searched recursively for runs (run.json).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report file ('-': stdout). "
                                                   "Default: RESULTS_DIR/report.<format>.")] = None,
    plots_dir: Annotated[Path | None, typer.Option("--plots-dir", help="PNG plots (default: plots/ beside the report).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md (tables + plots) | csv | json (the merged table).")] = "md",
) -> None:
    """Accuracy and speed tables of every run below RESULTS_DIR, relative to the unpruned run; PNG plots."""
    from vtprune.errors import VtpruneError
    from vtprune.report import load_results, merged_frame, write_report
    from vtprune.results import atomic_write_text

    if fmt not in FORMATS:
        raise VtpruneError(f"--format: '{fmt}' is not allowed (allowed: {', '.join(FORMATS)})")
    results = load_results(results_dir)
    to_stdout = output is not None and str(output) == "-"
    target = None if to_stdout else (output or results_dir / f"report.{fmt}")
    if target:
        check_output_file(target, "--output")
    if fmt == "md":
        plots = plots_dir or (target.parent if target else Path.cwd()) / "plots"
        check_output_dir(plots, "--plots-dir")
        text = write_report(results, results_dir, target, plots)
    else:
        # Only the markdown has a Notes section: say here which runs the table leaves out.
        for note in results.notes:
            typer.echo(f"note: {note}", err=True)
        frame = merged_frame(results)
        text = frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records", indent=1) + "\n"
    if to_stdout:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(target, text)
        typer.echo(f"wrote {target}", err=True)
