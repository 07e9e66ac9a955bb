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
    check_text,
    handle_errors,
    load_cli_config,
    quiet_libraries,
)
from vtprune.config import GENERATION
from vtprune.errors import VtpruneError
from vtprune.results import is_smoke


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
    ok, allowed = GENERATION["max_new_tokens"]
    if not ok(max_new_tokens):
        raise VtpruneError(f"--max-new-tokens: {max_new_tokens} is not allowed (allowed: {allowed})")
    check_text(question, "--question")
    cfg = load_cli_config(config, **{"pruning.strategy": strategy, "pruning.keep_ratio": keep_ratio})
    check_image(image)
    quiet_libraries()
    import vtprune

    out = vtprune.load(cfg).generate([image], [question], max_new_tokens=max_new_tokens)[0]
    typer.echo(out.text)
    if is_smoke(cfg):  # its garbled text is expected: say so, or it reads as a broken install
        typer.echo(f"note: {cfg.model.path} is a tiny random model: this answer is a smoke output, not a real one",
                   err=True)
    typer.echo(
        f"[{cfg.pruning.strategy} @ {cfg.pruning.keep_ratio}] kept {out.num_kept}/{out.num_visual} visual tokens "
        f"({out.kept_fraction:.3f}), selection {out.select_seconds * 1000:.1f} ms",
        err=True,
    )
