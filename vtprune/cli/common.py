"""What every command shares: option aliases, config loading with overrides, and the error handler."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import typer

from vtprune.errors import VtpruneError

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see README: Config reference).")]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Results folder (overrides output_dir).")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help="Override pruning.strategy.")]
ImageOpt = Annotated[Path, typer.Option("--image", help="Image file.")]
QuestionOpt = Annotated[str, typer.Option("--question", "-q", help="Prompt text.")]
KeepRatioOpt = Annotated[float | None, typer.Option("--keep-ratio", help="Override pruning.keep_ratio, in (0, 1].")]


def fail(message: str) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def handle_errors(fn):
    """Turn a VtpruneError into one line and exit code 2; a traceback only with VTPRUNE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VtpruneError as exc:
            if os.environ.get("VTPRUNE_DEBUG"):
                raise
            raise fail(str(exc)) from None

    return wrapper


def parse_list(text: str | None, kind=str, name: str = "list") -> list | None:
    """``"1,4,16"`` → ``[1, 4, 16]``; a bad item is a VtpruneError naming the option."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise VtpruneError(f"{name}: '{text}' must be a comma-separated list of {kind.__name__} values") from None


def load_cli_config(config: Path, **overrides):
    """Load a config with CLI overrides; ``None`` values are not overrides."""
    from vtprune.config import load_config

    sections: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key:
            sections.setdefault(section, {})[key] = value
        else:
            sections[section] = value
    return load_config(config, sections)


def quiet_libraries() -> None:
    """Keep transformers / datasets progress bars and warnings off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_image(path: Path) -> None:
    if not path.is_file():
        raise VtpruneError(f"--image: file not found: {path}")


def check_strategies(names: list[str] | None) -> None:
    """Unknown names fail here, naming the option, before any model loads."""
    from vtprune.strategies import STRATEGIES

    for name in names or []:
        try:
            STRATEGIES.get(name)
        except VtpruneError as exc:
            raise VtpruneError(f"--strategies: {str(exc).partition(': ')[2]}") from None
