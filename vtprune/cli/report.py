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
    plots_dir: Annotated[Path | None, typer.Option("--plots-dir", help="PNG plots (default: plots/ beside the report; "
                                                    "with -o - none unless this is given).")] = None,
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
        # A report on stdout has no folder of its own: plots only where asked, never into the working directory.
        plots = plots_dir or (target.parent / "plots" if target else None)
        if plots:
            check_output_dir(plots, "--plots-dir")
        _echo_notes(results.notes)
        text = write_report(results, results_dir, target, plots)
    else:
        _echo_notes(results.notes)
        frame = merged_frame(results)
        text = frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records", indent=1) + "\n"
    if to_stdout:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(target, text)
        typer.echo(f"wrote {target}", err=True)


def _echo_notes(notes: list[str]) -> None:
    """The runs skipped while loading: the markdown lists them under Notes too, but whoever reads stdout or a CSV
    would never see them."""
    for note in notes:
        typer.echo(f"note: {note}", err=True)
