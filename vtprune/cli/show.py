from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    ImageOpt,
    KeepRatioOpt,
    QuestionOpt,
    check_image,
    check_output_file,
    check_strategies,
    handle_errors,
    load_cli_config,
    parse_list,
    quiet_libraries,
)


@app.command()
@handle_errors
def show(
    config: ConfigOpt,
    image: ImageOpt,
    question: QuestionOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")],
    strategies: Annotated[str | None, typer.Option("--strategies", help="Comma-separated: one panel each "
                                                      "(default: the config's strategy).")] = None,
    keep_ratio: KeepRatioOpt = None,
) -> None:
    """Draw which visual tokens were kept: pruned patches dimmed, kept ones outlined, on the image the model saw."""
    names = parse_list(strategies, str, "--strategies")
    cfg = load_cli_config(config, **{"pruning.keep_ratio": keep_ratio})
    check_image(image)
    check_strategies(names)
    check_output_file(output, "--output")
    quiet_libraries()
    import vtprune
    from vtprune.report.show import show as draw_kept

    drawing, panels, _ = draw_kept(vtprune.load(cfg), image, question, names)
    output.parent.mkdir(parents=True, exist_ok=True)
    drawing.save(output)
    for panel in panels:
        typer.echo(panel.title, err=True)
    typer.echo(f"wrote {output}", err=True)
