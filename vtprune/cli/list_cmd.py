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
        from vtprune.models import FAMILIES
        from vtprune.strategies import STRATEGIES

        out = []
        for name, s in STRATEGIES.items():
            families = [f for f, cls in FAMILIES.items() if cls.runs(s)]
            on = "all families" if len(families) == len(FAMILIES.names()) else ", ".join(families)
            opts = f" options: {', '.join(option_text(k, o) for k, o in s.options.items())}" if s.options else ""
            opts += f" placement: {', '.join(f'{k}={placement_text(v)}' for k, v in s.placement.items())}" if s.placement else ""
            out.append((name, f"{s.description} [{where_it_prunes(s, families)}; {on}]{opts}"))
        return out
    if what == "models":
        from vtprune.models import FAMILIES, micro_families
        from vtprune.models.tiny import TINY_FAMILIES

        def offline(name):
            names = [f"tiny:{name}"] * (name in TINY_FAMILIES) + [f"micro:{name} (trained)"] * (name in micro_families())
            return f" (offline: {', '.join(names)})" if names else ""

        return [(name, ((cls.__doc__ or "").strip().splitlines() or [""])[0] + offline(name))
                for name, cls in FAMILIES.items()]
    from vtprune.eval.tasks import TASKS

    return TASKS.items()


def option_text(name: str, option) -> str:
    """``name=default`` with the allowed values: ``mode=adaptive (adaptive|budget)``, ``budget_thres=0.25 [0.0, 0.5]``."""
    allowed = f" ({'|'.join(map(str, option.choices))})" if option.choices else ""
    allowed += f" [{option.bounds[0]}, {option.bounds[1]}]" if option.bounds else ""
    return f"{name}={option.default}{allowed}"


def placement_text(value) -> str:
    """A default placement value; fractional layers are fractions of the model's depth."""
    if value == "all":
        return "every layer"
    if isinstance(value, (list, tuple)) and any(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]·depth"
    return str(value)


def where_it_prunes(strategy, families: list[str]) -> str:
    """Where the kept set is applied and how: the strategy's kind on self-attention families (pre-LLM, in-LLM,
    multi-stage, merge), the family's own point on families that prune at one point whatever the stage (mllama)."""
    from vtprune.models import FAMILIES

    if strategy.name == "none":
        return "nothing pruned"
    classes = [FAMILIES.get(f) for f in families]
    where = [strategy.kind] if any(
        c.in_llm_signals is not None for c in classes) else []
    return "; ".join(where + [f"{c.family}: {c.prunes_at}" for c in classes if c.prunes_at])
