"""The ``vtprune`` command line: a thin layer over the Python API. ``--help`` imports neither torch nor lmms-eval."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="vtprune",
    help="Visual-token pruning for VLMs: accuracy lost vs latency, memory and KV cache won.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module adds its commands to `app` on import (one file per command group).
for _module in ("list_cmd", "generate", "eval_cmd", "sweep", "bench", "serve_bench", "report", "show", "tasks_cmd"):
    importlib.import_module(f"vtprune.cli.{_module}")


def main() -> None:
    app()
