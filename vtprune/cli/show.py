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
    check_text,
    handle_errors,
    load_cli_config,
    parse_list,
    quiet_libraries,
)
from vtprune.errors import VtpruneError
from vtprune.results import atomic_file

# The image types `show` writes: the common ones, as far as this PIL can save them.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@app.command()
@handle_errors
def show(
    config: ConfigOpt,
    image: ImageOpt,
    question: QuestionOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Image to write: .png, .jpg, .webp, ...")],
    strategies: Annotated[str | None, typer.Option("--strategies", help="Comma-separated: one panel each "
                                                      "(default: the config's strategy).")] = None,
    keep_ratio: KeepRatioOpt = None,
) -> None:
    """Draw which visual tokens were kept: pruned patches dimmed, kept ones outlined, on the image the model saw."""
    names = parse_list(strategies, str, "--strategies")
    check_text(question, "--question")
    cfg = load_cli_config(config, **{"pruning.keep_ratio": keep_ratio})
    check_image(image)
    check_strategies(names)
    check_output_file(output, "--output")
    image_format = output_format(output)
    quiet_libraries()
    import vtprune
    from vtprune.report.show import show as draw_kept

    drawing, panels, _ = draw_kept(vtprune.load(cfg), image, question, names)
    with atomic_file(output, "wb") as f:  # a full disk leaves no half image
        drawing.save(f, format=image_format)
    for panel in panels:
        typer.echo(panel.title, err=True)
    typer.echo(f"wrote {output}", err=True)


def output_format(path: Path) -> str:
    """PIL's format name for the file's extension; an unknown one fails before the model loads, not after."""
    from PIL import Image

    formats = {ext: Image.registered_extensions().get(ext) for ext in EXTENSIONS}
    allowed = [ext for ext, name in formats.items() if name in Image.SAVE]
    if path.suffix.lower() not in allowed:
        got = f"'{path.suffix}' is not an image type show writes" if path.suffix else "no image extension"
        raise VtpruneError(f"--output: {path.name}: {got} (allowed: {', '.join(allowed)})")
    return formats[path.suffix.lower()]
