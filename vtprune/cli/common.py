"""What every command shares: option aliases, config loading with overrides, and the error handler."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Annotated

import typer

from vtprune.errors import ConfigError, VtpruneError

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see README: Config reference).")]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Results folder (overrides output_dir).")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help="Override pruning.strategy.")]
ImageOpt = Annotated[Path, typer.Option("--image", help="Image file.")]
QuestionOpt = Annotated[str, typer.Option("--question", "-q", help="Prompt text.")]
KeepRatioOpt = Annotated[float | None, typer.Option("--keep-ratio", help="Override pruning.keep_ratio, in (0, 1].")]
# The option behind each config key a command overrides, so that an error names what the user typed.
OVERRIDE_OPTIONS = {
    "pruning.strategy": "--strategy",
    "pruning.keep_ratio": "--keep-ratio",
    "eval.limit": "--limit",
    "eval.tasks": "--tasks",
    "bench.batch_sizes": "--batch-sizes",
    "bench.threads": "--threads",
    "output_dir": "--output-dir",
}
INTERRUPTED = "interrupted — run the same command again to resume"


def fail(message: str) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def handle_errors(fn):
    """Turn a VtpruneError into one line and exit code 2, Ctrl-C into one line and exit code 130 (finished
    results are on disk, so the same command resumes); a traceback only with VTPRUNE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VtpruneError as exc:
            if os.environ.get("VTPRUNE_DEBUG"):
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            if os.environ.get("VTPRUNE_DEBUG"):
                raise
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None

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
    """Load a config with CLI overrides; ``None`` values are not overrides. Commands that write results pass an
    ``output_dir`` override (``None`` when not given): its run folder is checked here, before any model loads."""
    from vtprune.config import load_config

    given = {dotted: value for dotted, value in overrides.items() if value is not None}
    sections: dict = {}
    for dotted, value in given.items():
        section, _, key = dotted.partition(".")
        if key:
            sections.setdefault(section, {})[key] = value
        else:
            sections[section] = value
    with options_named(overrides):
        cfg = load_config(config, sections)
    if "output_dir" in overrides:
        option = OVERRIDE_OPTIONS["output_dir"] if "output_dir" in given else "output_dir"
        check_output_dir(Path(cfg.output_dir) / cfg.name, option)
    return cfg


@contextlib.contextmanager
def options_named(overrides: dict):
    """Re-raise a ConfigError about a config key that a CLI option set (``overrides``: config key → the option's
    value, ``None`` when not given) as an error about that option, the thing the user typed."""
    try:
        yield
    except ConfigError as exc:
        key, _, problem = str(exc).partition(": ")
        if overrides.get(key) is not None and key in OVERRIDE_OPTIONS:
            raise ConfigError(f"{OVERRIDE_OPTIONS[key]}: {problem}") from None
        raise


def check_output_dir(path: Path, option: str, target: Path | None = None) -> None:
    """Fail unless ``path`` is, or can be made, a folder we may write ``target`` (default: the folder) into.
    Creates nothing: a folder made here would stay behind when a later check fails."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = (f"{existing} is a file, not a folder" if not existing.is_dir() else
               f"folder {existing} is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise VtpruneError(f"{option}: cannot write {target or path}: {problem} (allowed: a path in a writable folder)")


def check_output_file(path: Path, option: str) -> None:
    """A file to write: not an existing folder, and its folder writable."""
    if path.is_dir():
        raise VtpruneError(f"{option}: {path} is a folder, not a file (allowed: a file path in a writable folder)")
    check_output_dir(path.parent, option, path)


def quiet_libraries() -> None:
    """Keep transformers / datasets progress bars and warnings, and lmms-eval's DEBUG/INFO log, off the terminal.

    Only the ``vtprune`` command calls this: the process is ours. lmms-eval logs through loguru's global logger,
    whose default sink prints everything from DEBUG up.
    """
    import sys

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from loguru import logger
    except ImportError:  # no lmms-eval here (a GPU image running `bench` only): nothing logs through loguru
        return
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("VTPRUNE_LOG_LEVEL", "WARNING"))


def check_image(path: Path) -> None:
    from vtprune.api import read_image

    if not path.is_file():
        raise VtpruneError(f"--image: file not found: {path}")
    try:
        read_image(path)
    except VtpruneError as exc:
        raise VtpruneError(f"--image: {exc}") from None


def check_strategies(names: list[str] | None) -> None:
    """Unknown names fail here, naming the option, before any model loads."""
    from vtprune.strategies import STRATEGIES

    for name in names or []:
        try:
            STRATEGIES.get(name)
        except VtpruneError as exc:
            raise VtpruneError(f"--strategies: {str(exc).partition(': ')[2]}") from None
