from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    ImageOpt,
    KeepRatioOpt,
    QuestionOpt,
    StrategyOpt,
    check_image,
    handle_errors,
    load_cli_config,
    quiet_libraries,
)


@app.command()
@handle_errors
def generate(
    config: ConfigOpt,
    image: ImageOpt,
    question: QuestionOpt,
    strategy: StrategyOpt = None,
    keep_ratio: KeepRatioOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
) -> None:
    """Answer one question about one image with pruning applied; prints the answer and the kept count."""
    cfg = load_cli_config(config, **{"pruning.strategy": strategy, "pruning.keep_ratio": keep_ratio})
    check_image(image)
    quiet_libraries()
    import vtprune

    out = vtprune.load(cfg).generate([image], [question], max_new_tokens=max_new_tokens)[0]
    typer.echo(out.text)
    typer.echo(
        f"[{cfg.pruning.strategy} @ {cfg.pruning.keep_ratio}] kept {out.num_kept}/{out.num_visual} visual tokens "
        f"({out.kept_fraction:.3f}), selection {out.select_seconds * 1000:.1f} ms",
        err=True,
    )
