from typing import Annotated

import typer

from vtprune.cli import app

WHAT = ("strategies", "models", "tasks")


@app.command("list")
def list_(what: Annotated[str, typer.Argument(help="strategies | models | tasks")] = "strategies") -> None:
    """List what is available: strategies, model families, or evaluation tasks."""
    from vtprune.cli.common import fail

    if what not in WHAT:
        raise fail(f"list: unknown '{what}' (allowed: {', '.join(WHAT)})")
    for name, description in rows(what):
        typer.echo(f"{name:28s} {description}")


def rows(what: str) -> list[tuple[str, str]]:
    if what == "strategies":
        from vtprune.strategies import STRATEGIES

        out = []
        for name, s in STRATEGIES.items():
            where = f"[{where_it_prunes(s)}{'; ' + ', '.join(s.families) if s.families else '; all families'}]"
            opts = f" options: {', '.join(f'{k}={o.default}' for k, o in s.options.items())}" if s.options else ""
            out.append((name, f"{s.description} {where}{opts}"))
        return out
    if what == "models":
        from vtprune.models import FAMILIES
        from vtprune.models.tiny import TINY_FAMILIES

        return [
            (name, ((cls.__doc__ or "").strip().splitlines() or [""])[0] + (f" (tiny model: tiny:{name})" if name in TINY_FAMILIES else ""))
            for name, cls in FAMILIES.items()
        ]
    from vtprune.eval.tasks import TASKS

    return TASKS.items()


CROSS = "mllama: after the 1st cross-attention layer"


def where_it_prunes(strategy) -> str:
    """Where the kept set is applied: ``stage`` on self-attention models; one fixed point on Mllama."""
    if strategy.name == "none":
        return "nothing pruned"
    if strategy.families == ("mllama",):
        return CROSS
    where = {"pre_llm": "before the LLM", "in_llm": "inside the LLM"}[strategy.stage]
    return where if strategy.families else f"{where}; {CROSS}"
