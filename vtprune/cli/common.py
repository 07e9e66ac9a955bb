"""What every command shares: option aliases, config loading with overrides, and the error handler."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from pathlib import Path
from typing import Annotated

import typer

from vtprune.errors import ConfigError, VtpruneError, shown

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see the docs: Reference, Config).")]
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


# OSError numbers that are a fault of the machine, not of the input: one line and exit code 1.
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
ENVIRONMENT_ERRNOS = FULL | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EIO}
# The variables that place the folders vtprune and its libraries write into (the caches of vtprune, lmms-eval and
# Hugging Face datasets), most specific first: a fault in one of them names the variable to change.
FOLDER_VARIABLES = ("VTPRUNE_CACHE", "LMMS_EVAL_DATASETS_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME",
                    "TMPDIR", "HOME")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (code 2: bad input; 1: a fault of the machine)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn a VtpruneError into one line and exit code 2, a full disk or a folder that cannot be written into one
    line and exit code 1, Ctrl-C into one line and exit code 130 (finished results are on disk, so the same command
    resumes); a traceback only with VTPRUNE_DEBUG=1."""

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
        except (typer.Exit, typer.Abort):  # exceptions too, but already the command's chosen ending
            raise
        except Exception as exc:
            line = environment_fault(exc)
            if line is None or os.environ.get("VTPRUNE_DEBUG"):
                raise
            raise fail(line, 1) from None

    return wrapper


def environment_fault(exc: BaseException) -> str | None:
    """The error line for a full disk or an unusable folder anywhere in ``exc``'s chain (libraries wrap the OSError:
    lmms-eval's retries, safetensors' Rust errors), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return _fault_line(exc.errno, exc.strerror, exc.filename)
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return _fault_line(errno.ENOSPC, "No space left on device", None)
        exc = exc.__cause__ or exc.__context__
    return None


def _fault_line(number: int, reason: str, filename) -> str:
    if number in FULL:
        where = f" writing {filename}" if filename else ""
        return f"{reason.lower()}{where} (free some space, then run the same command again)"
    path = os.path.abspath(os.fsdecode(filename)) if filename else None
    for variable in FOLDER_VARIABLES:
        value = os.environ.get(variable, "")
        folder = os.path.abspath(value) if value else None
        if path and folder and folder != os.path.dirname(folder) and Path(path).is_relative_to(folder):
            others = ", or VTPRUNE_CACHE and HF_HOME" if variable == "HOME" else ""
            return f"{variable}: cannot use {path}: {reason} (set {variable} to a writable folder{others})"
    return f"cannot use {path or 'a file'}: {reason} (allowed: a folder that exists and is writable)"


def parse_list(text: str | None, kind=str, name: str = "list") -> list | None:
    """``"1,4,16"`` → ``[1, 4, 16]``; a bad item is a VtpruneError naming the option."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    try:
        if "" in items:  # "0.5,,0.25" or a trailing comma: a value lost in typing, not one to skip
            raise ValueError
        return [kind(t) for t in items]
    except ValueError:
        raise VtpruneError(f"{name}: {shown(text)} must be a comma-separated list of {kind.__name__} values, none "
                           "empty") from None


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


def check_text(text: str, option: str) -> None:
    """Text typed on the command line. The shell hands bytes that are not UTF-8 over as surrogate escapes, which no
    tokenizer can encode: name the byte instead of failing deep inside the model."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise VtpruneError(f"{option}: {what} at position {exc.start + 1} is not UTF-8 text (allowed: UTF-8 text)") from None


def check_strategies(names: list[str] | None) -> None:
    """Unknown names fail here, naming the option, before any model loads."""
    from vtprune.strategies import STRATEGIES

    for name in names or []:
        try:
            STRATEGIES.get(name)
        except VtpruneError as exc:
            raise VtpruneError(f"--strategies: {str(exc).partition(': ')[2]}") from None
