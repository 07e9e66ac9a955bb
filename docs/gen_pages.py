"""The docs pages made from the code at build time (mkdocs-gen-files): strategies, model families, the config
reference, the CLI reference and the committed reports. Whatever a registry or a docstring says is written here as
it is, so the site cannot drift from the code."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import mkdocs_gen_files

from vtprune.config import CONFIG_DOCS, Config
from vtprune.models import FAMILIES, micro_families
from vtprune.models.tiny import TINY_FAMILIES
from vtprune.strategies import STRATEGIES

VLLM = importlib.import_module("vtprune.vllm")  # the plugin's checks; it imports no vLLM

ROOT = Path(__file__).resolve().parents[1]


def write(path: str, text: str) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def families_of(strategy) -> list[str]:
    return [name for name, cls in FAMILIES.items() if cls.runs(strategy)]


def option_rows(strategy) -> list[str]:
    rows = []
    for name, option in strategy.options.items():
        allowed = " \\| ".join(map(str, option.choices)) if option.choices else (
            f"[{option.bounds[0]}, {option.bounds[1]}]" if option.bounds else type(option.default).__name__)
        rows.append(f"| `{name}` | `{option.default}` | {cell(allowed)} | {cell(option.help)} |")
    return rows


def module_doc(obj) -> str:
    return inspect.cleandoc(inspect.getmodule(obj).__doc__ or "")


def notes(kind: str, name: str) -> list[str]:
    """The hand-written notes of a strategy or family (docs/_notes/<kind>/<name>.md), where there are any."""
    path = ROOT / "docs" / "_notes" / kind / f"{name}.md"
    return ["", path.read_text().strip(), ""] if path.is_file() else []


# -- strategies -----------------------------------------------------------------------------------------------

index = ["# Strategies", "",
         f"{len(STRATEGIES.names())} strategies, generated from the registry (`vtprune list strategies`). The kind says "
         "where a strategy acts (pre-LLM, in-LLM, multi-stage, inside the vision tower) and whether it merges tokens; "
         "[Concepts](../concepts.md) explains each.", "",
         "| strategy | kind | what it keeps | families |", "|---|---|---|---|"]
for name, strategy in STRATEGIES.items():
    families = families_of(strategy)
    on = "all" if len(families) == len(FAMILIES.names()) else ", ".join(families)
    index.append(f"| [`{name}`]({name}.md) | {strategy.kind} | {cell(strategy.description)} | {on} |")
    page = [f"# `{name}`", "", strategy.description, "",
            f"- **Kind**: {strategy.kind}",
            f"- **Runs on**: {', '.join(families) or 'no family'}",
            f"- **Signals**: {', '.join(f'`{n}`' for n in strategy.needs) or 'none'}"]
    if strategy.placement:
        page.append(f"- **Default placement**: {', '.join(f'`{k}: {v}`' for k, v in strategy.placement.items())}")
    if strategy.merges:
        page.append(f"- **Merges** in the space of: `{strategy.merge_space}`")
    on_vllm = [f for f in VLLM.ARCHITECTURES if VLLM.supported(f, strategy)]
    page.append(f"- **Runs on vLLM**: {'yes (' + ', '.join(on_vllm) + ')' if on_vllm else 'no'}")
    if strategy.options:
        page += ["", "## Options", "", "| option | default | allowed | meaning |", "|---|---|---|---|",
                 *option_rows(strategy)]
    doc = module_doc(strategy.fn)
    if doc:
        page += ["", "## The rule, its source and its differences", "", doc, ""]
    page += notes("strategies", name)
    write(f"strategies/{name}.md", "\n".join(page))
write("strategies/index.md", "\n".join(index) + "\n")

# -- model families -------------------------------------------------------------------------------------------

index = ["# Model families", "", "Generated from the adapter registry (`vtprune list models`).", "",
         "| family | model class | offline models | pre-LLM signals | in-LLM signals |", "|---|---|---|---|---|"]
for name, cls in FAMILIES.items():
    offline = [f"`tiny:{name}`"] * (name in TINY_FAMILIES) + [f"`micro:{name}`"] * (name in micro_families())
    index.append(f"| [`{name}`]({name}.md) | `{cls.model_class}` | {', '.join(offline) or '—'} | "
                 f"{', '.join(cls.provides('pre_llm'))} | {', '.join(cls.provides('in_llm')) or '—'} |")
    runs = [s for s, strategy in STRATEGIES.items() if cls.runs(strategy)]
    page = [f"# `{name}`", "", inspect.cleandoc(cls.__doc__ or ""), "",
            f"- **transformers class**: `{cls.model_class}` (model types: {', '.join(cls.model_types)})",
            f"- **Offline models**: {', '.join(offline) or 'none'}",
            f"- **Signals before the LLM**: {', '.join(f'`{s}`' for s in cls.provides('pre_llm'))}",
            f"- **Signals inside the LLM**: {', '.join(f'`{s}`' for s in cls.provides('in_llm')) or 'none'}",
            f"- **Signals inside the vision tower**: {', '.join(f'`{s}`' for s in cls.provides('vision')) or 'none'}",
            f"- **Strategies that run**: {', '.join(f'[`{s}`](../strategies/{s}.md)' for s in runs)}",
            "", "## How the adapter answers the family questions", "", module_doc(cls), "",
            *notes("models", name)]
    write(f"models/{name}.md", "\n".join(page))
write("models/index.md", "\n".join(index) + "\n")

# -- config reference -----------------------------------------------------------------------------------------


def config_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from config_keys(f.default_factory, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield key, default


def dynamic(text: str) -> str:
    """The registries' names where a config doc says {families}, {strategies}, {offline}."""
    offline = [f"tiny:{f}" for f in TINY_FAMILIES] + [f"micro:{f}" for f in micro_families()]
    return text.format(families=", ".join(["auto", *sorted(FAMILIES.names())]),
                       strategies=", ".join(STRATEGIES.names()), offline=", ".join(offline))


rows = ["# Config reference", "",
        "A run is one YAML file. Every key is optional except `model.path`; unknown keys are errors. Generated from "
        "`vtprune.config` (the dataclasses' defaults and `CONFIG_DOCS`).", "",
        "| key | default | allowed values | meaning |", "|---|---|---|---|"]
for key, default in config_keys(Config):
    allowed, meaning = CONFIG_DOCS[key]
    shown = "`null`" if default is None else f"`{default}`"
    rows.append(f"| `{key}` | {cell(shown)} | {cell(dynamic(allowed))} | {cell(dynamic(meaning))} |")
rows += ["", "A bad config prints one line naming the key and the allowed values and exits with code 2 before "
         "anything is written; `vtprune eval --config X --dry-run` checks everything that needs no weights.", ""]
write("reference/config.md", "\n".join(rows))

# -- CLI reference ----------------------------------------------------------------------------------------------


def command_rows(command, path: str) -> list[str]:
    import click

    lines = [f"## `{path}`", "", inspect.cleandoc(command.help or ""), ""]
    params = [p for p in command.params if p.name != "help"]
    if params:
        lines += ["| argument / option | default | meaning |", "|---|---|---|"]
        for p in params:
            names = ", ".join(f"`{o}`" for o in p.opts) if isinstance(p, click.Option) else f"`{p.name.upper()}`"
            default = "" if p.default is None or isinstance(p, click.Argument) and p.required else f"`{p.default}`"
            lines.append(f"| {names} | {cell(default)} | {cell(getattr(p, 'help', '') or '')} |")
        lines.append("")
    return lines


def cli_page() -> str:
    import typer

    from vtprune.cli import app

    group = typer.main.get_command(app)
    lines = ["# Command line", "", "Generated from the Typer app (`vtprune --help`, `vtprune COMMAND --help`).", ""]
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for sub, child in subcommands.items():
                lines += command_rows(child, f"vtprune {name} {sub}")
        else:
            lines += command_rows(command, f"vtprune {name}")
    return "\n".join(lines)


write("reference/cli.md", cli_page())

# -- committed reports --------------------------------------------------------------------------------------------

for folder in sorted(p for p in (ROOT / "results").iterdir() if p.is_dir()):
    # the folder's README (how its runs were made, what they showed), then its report
    parts = [(folder / name).read_text() for name in ("README.md", "REPORT.md") if (folder / name).is_file()]
    if not parts:
        continue
    write(f"results/{folder.name}/index.md", "\n\n---\n\n".join(parts))
    for picture in sorted(folder.glob("plots/*.png")):
        with mkdocs_gen_files.open(f"results/{folder.name}/plots/{picture.name}", "wb") as f:
            f.write(picture.read_bytes())
