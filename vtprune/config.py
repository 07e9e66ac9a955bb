"""The YAML config as typed dataclasses, validated on load.

Every problem raises ``ConfigError`` with one line naming the key and the allowed values; the CLI prints
it and exits with code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from vtprune.errors import ConfigError, shown

ENGINES = ("hf", "vllm")  # where a config runs: transformers' generate, or the vLLM serving engine (vtprune.vllm)
WEIGHTS = ("pretrained", "random")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN = ("sdpa", "eager", "flash_attention_2")
# A run name is one folder below output_dir: no separators, so results cannot land outside it.
NAME_PATTERN = re.compile(r"[\w .+@=-]+")
NAME_ALLOWED = "a folder name of letters, digits, spaces and . _ - + @ =, not '.' or '..'"


def _value(kind, lo=-math.inf, hi=math.inf, lo_open=False):
    """A check for a value of ``kind`` (bool, int or float) within [lo, hi] (lo excluded when ``lo_open``)."""

    def ok(value) -> bool:
        if kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            return False
        return math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi

    return ok


# The generate() / GenerationConfig keywords a config may set in eval.generation, each with its check and the
# allowed values as the error line states them. Other modules validate generation keywords against these.
GENERATION = {
    "max_new_tokens": (_value(int, 1), "a positive integer"),
    "min_new_tokens": (_value(int, 0), "an integer >= 0"),
    "do_sample": (_value(bool), "true or false"),
    "use_cache": (_value(bool), "true or false"),
    "temperature": (_value(float, 0), "a number >= 0"),
    "top_p": (_value(float, 0, 1, lo_open=True), "a number in (0, 1]"),
    "top_k": (_value(int, 0), "an integer >= 0"),
    "num_beams": (_value(int, 1), "a positive integer"),
    "repetition_penalty": (_value(float, 0, lo_open=True), "a number > 0"),
    "length_penalty": (_value(float), "a number"),
    "no_repeat_ngram_size": (_value(int, 0), "an integer >= 0"),
}
GENERATION_KEYS = tuple(GENERATION)


#: the config reference (docs/reference/config.md is generated from it and the dataclasses' defaults): per key,
#: its allowed values and its meaning; {families}, {strategies} and {offline} stand for the registries' names
CONFIG_DOCS = {
    "name": ("a folder name: letters, digits, spaces and `. _ - + @ =`; not `.` or `..` (default: the file's stem)",
             "run name; results go to `<output_dir>/<name>/`"),
    "model.path": ("HF id, local dir, {offline}",
                   "the model (required in a YAML file); a relative path that exists next to the YAML is taken from "
                   "there"),
    "model.family": ("{families}", "adapter; `auto` reads `model_type` from the HF config"),
    "model.weights": ("`pretrained`, `random`", "`random`: architecture only, for speed/memory benchmarks of "
                      "full-size models"),
    "model.dtype": ("`auto`, `float32`, `float16`, `bfloat16`", "`auto`: bfloat16 on CUDA, float32 on CPU"),
    "model.device": ("`auto`, `cpu`, `cuda`, `cuda:N`", ""),
    "model.attn_implementation": ("`sdpa`, `eager`, `flash_attention_2`",
                                  "the model keeps it; scores are recomputed for the one layer that needs them"),
    "pruning.strategy": ("{strategies}", "see [Strategies](../strategies/index.md)"),
    "pruning.keep_ratio": ("(0, 1]", "target fraction of visual tokens kept (the achieved one is recorded)"),
    "pruning.options": ("the strategy's declared options", "selection only, e.g. `{{budget_thres: 0.25}}` for adav"),
    "pruning.placement": ("in-LLM: `layer` (in [1, decoder layers − 1]) or `layers` (increasing: several stages); "
                          "vision: `after` (`attention`, `layer`); cross-attention models (mllama): "
                          "`prune_first_layer_cache`, `prune_first_layer` (true/false); pre-LLM: none",
                          "where the kept set takes effect (default: the strategy's); checked from the model's config "
                          "when it can be read offline, again once the model is loaded"),
    "eval.tasks": ("any task lmms-eval knows (`vtprune list tasks` lists vtprune's)",
                   "checked by `vtprune eval` / `sweep` (and `--dry-run`)"),
    "eval.limit": ("positive integer or null", "samples per task"),
    "eval.batch_size": ("positive integer", ""),
    "eval.generation": ("`max_new_tokens` (≥ 1), `min_new_tokens` (≥ 0), `do_sample`, `use_cache` (true/false), "
                        "`temperature` (≥ 0), `top_p` ((0, 1]), `top_k` (≥ 0), `num_beams` (≥ 1), "
                        "`repetition_penalty` (> 0), `length_penalty`, `no_repeat_ngram_size` (≥ 0)",
                        "`generate()` keywords, under a task's own and lmms-eval's `--gen_kwargs`"),
    "bench.batch_sizes": ("positive integers", ""),
    "bench.prompt_tokens": ("positive integer", "synthetic prompt length (text tokens)"),
    "bench.new_tokens": ("positive integer", "tokens generated per timed run"),
    "bench.warmup": ("≥ 0", "untimed runs first"),
    "bench.repeats": ("positive integer", "timed rounds; paired ratios with a bootstrap interval from 3 on"),
    "bench.threads": ("positive integer or null", "torch CPU threads while measuring (`--threads`); null leaves "
                      "torch's default (one per core)"),
    "output_dir": ("a folder you can write to (checked before anything loads)", ""),
    "seed": ("integer", "seeds `random` (per sample, from the sample's own tokens) and sampling"),
    "engine": ("`hf`, `vllm`", "transformers' `generate`, or the vLLM serving engine (its own environment; "
               "pre-LLM strategies on the families it serves)"),
}


@dataclass
class ModelConfig:
    path: str = "tiny:llava"
    family: str = "auto"
    weights: str = "pretrained"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    attn_implementation: str = "sdpa"


@dataclass
class PruningConfig:
    strategy: str = "none"
    keep_ratio: float = 1.0
    options: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)

    def point(self, strategy: str, keep_ratio: float) -> dict:
        """The pruning section of one sweep / bench point: the options and placement stay with their own strategy,
        any other strategy runs with its defaults."""
        same = strategy == self.strategy
        return {"strategy": strategy, "keep_ratio": float(keep_ratio), "options": dict(self.options) if same else {},
                "placement": dict(self.placement) if same else {}}


@dataclass
class EvalConfig:
    tasks: list = field(default_factory=lambda: ["vtprune_textvqa_mini"])
    limit: int | None = None
    batch_size: int = 1
    generation: dict = field(default_factory=lambda: {"max_new_tokens": 64, "do_sample": False})


@dataclass
class BenchConfig:
    batch_sizes: list = field(default_factory=lambda: [1, 4, 16])
    prompt_tokens: int = 64
    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None  # torch CPU threads while measuring; None leaves torch's default (one per core)


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    output_dir: str = "results"
    seed: int = 0
    engine: str = "hf"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        """A copy with some top-level fields or nested fields replaced: ``replace(pruning={"keep_ratio": 0.5})``."""
        return config_from_dict(merge_sections(self.to_dict(), sections))


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` are nested dicts merged over the file's values."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        data = _read_yaml(path.read_text(), path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"config: cannot read {path} as a YAML file: {reason}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of keys (name, model, pruning, eval, bench, output_dir, seed, engine)")
    data.setdefault("name", path.stem)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        # A relative model path that exists next to the config file is taken from there (architecture dirs).
        local = path.parent / model["path"]
        if not Path(model["path"]).is_absolute() and not Path(model["path"]).exists() and local.exists():
            data["model"] = {**model, "path": str(local.resolve())}
    data = merge_sections(data, overrides or {})
    # A file must name its model (the keyword API defaults it); a wrong type is left to the type check.
    if data.get("model") is None or isinstance(data["model"], dict) and "path" not in data["model"]:
        from vtprune.models.tiny import TINY_FAMILIES

        raise ConfigError(f"model.path: required (HF id, local dir, or {'|'.join('tiny:' + f for f in TINY_FAMILIES)})")
    return config_from_dict(data)


# A config is a few dozen values: past this many copies made by YAML aliases, the file is refused before it is built,
# so that an alias bomb (billion laughs) can neither eat memory nor make an error line endless.
MAX_VALUES = 10_000


def _read_yaml(text: str, path: Path):
    """The YAML document in ``text``, refusing duplicate keys (YAML keeps the last one silently) and documents that
    expand past ``MAX_VALUES``; checked on the composed node graph, where an alias is a shared node, not a copy."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}
        _check_nodes(root, path)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_nodes(root, path: Path) -> None:
    stack, seen, copies = [(root, "", False)], set(), 0
    while stack:
        node, where, copy = stack.pop()
        copy = copy or id(node) in seen  # reached again through an alias: all below it are copies
        seen.add(id(node))
        copies += copy
        if copies > MAX_VALUES:
            raise ConfigError(f"config: {path} expands its YAML aliases into more than {MAX_VALUES} "
                              f"values (an alias bomb?; allowed: at most {MAX_VALUES} values made by aliases)")
        if isinstance(node, yaml.MappingNode):
            lines = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                line = key.start_mark.line + 1
                if name is not None and (key.tag, name) in lines:
                    raise ConfigError(f"{where}{_key(name)}: duplicate key at line {line} of {path} (first at line "
                                      f"{lines[key.tag, name]}; allowed: each key once)")
                lines[key.tag, name] = line
                stack.append((value, f"{where}{_key(name)}.", copy))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}{i}.", copy) for i, item in enumerate(node.value))


def _key(name) -> str:
    """A key as an error line names it: plain names as they are, anything else (a newline, an int) as a short repr."""
    return name if isinstance(name, str) and NAME_PATTERN.fullmatch(name) and len(name) <= 60 else shown(name)


def merge_sections(data: dict, sections: dict) -> dict:
    """``data`` with each section's keys merged over its own (a mapping) or replacing it (anything else)."""
    merged = dict(data)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict) -> Config:
    config = _build(Config, data, "")
    validate(config)
    return config


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {shown(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{prefix}{_key(unknown[0])}: unknown key (allowed: {', '.join(names)})")
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, value, f"{prefix}{f.name}.")
        else:
            values[f.name] = _coerce(value, hint, f"{prefix}{f.name}")
    return cls(**values)


def _coerce(value, hint, key):
    allowed = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
    optional = hint in (int | None, str | None, float | None)
    if value is None and optional:
        return None
    base = {int | None: int, str | None: str, float | None: float}.get(hint, hint)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list and isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, base) or (base in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {allowed[base]}{' or null' if optional else ''}, got {shown(value)}")
    return value


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {shown(value)} is not allowed (allowed: {', '.join(allowed)})")


def validate(config: Config) -> None:
    from vtprune.strategies import STRATEGIES

    m, p = config.model, config.pruning
    if not NAME_PATTERN.fullmatch(config.name) or config.name in (".", ".."):
        raise ConfigError(f"name: {shown(config.name)} is not allowed (allowed: {NAME_ALLOWED})")
    from vtprune.models import FAMILIES

    _choice("model.family", m.family, ["auto", *FAMILIES.names()])
    _choice("model.weights", m.weights, WEIGHTS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.attn_implementation", m.attn_implementation, ATTN)
    if not (m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:") and m.device[5:].isdigit()):
        raise ConfigError(f"model.device: {shown(m.device)} is not allowed (allowed: auto, cpu, cuda, cuda:N)")
    if m.path.startswith("tiny:"):
        from vtprune.models.tiny import TINY_FAMILIES

        _choice("model.path", m.path, [f"tiny:{f}" for f in TINY_FAMILIES])
    if m.path.startswith("micro:"):
        from vtprune.models import micro_families

        _choice("model.path", m.path, [f"micro:{f}" for f in micro_families()])
    if not (isinstance(p.keep_ratio, float) and 0 < p.keep_ratio <= 1 and math.isfinite(p.keep_ratio)):
        raise ConfigError(f"pruning.keep_ratio: {p.keep_ratio} is outside the allowed range (0, 1]")
    strategy = STRATEGIES.get(p.strategy)
    for key, value in p.options.items():
        if key not in strategy.options:
            from vtprune.placement import SETTINGS

            allowed = ", ".join(strategy.options) or "none"
            moved = any(key in keys for keys in SETTINGS.values())
            hint = f"; where it prunes is set by pruning.placement.{key}" if moved else ""
            raise ConfigError(f"pruning.options.{_key(key)}: strategy '{p.strategy}' has no such option (allowed: {allowed}){hint}")
        _check_option(f"pruning.options.{key}", value, strategy.options[key])
    family = declared_family(config)
    if family in FAMILIES:
        FAMILIES.get(family).check_strategy(strategy)
    cross_attention, layers = model_facts(config.model, family)
    from vtprune.placement import resolve_placement

    resolve_placement(strategy, p.placement, cross_attention=cross_attention, decoder_layers=layers, model=m.path)
    _choice("engine", config.engine, ENGINES)
    if config.engine == "vllm":
        from vtprune.vllm import check

        check(family, strategy, p.options)  # in-LLM placements are refused with their strategy
    # Names are checked against lmms-eval's task index by vtprune.eval.tasks.check_tasks, where a run needs them:
    # indexing every lmms-eval task takes seconds, too slow for each config load.
    if not config.eval.tasks or not all(isinstance(t, str) and t for t in config.eval.tasks):
        raise ConfigError(f"eval.tasks: {shown(config.eval.tasks)} must be a non-empty list of task names")
    if config.eval.limit is not None and config.eval.limit < 1:
        raise ConfigError(f"eval.limit: {config.eval.limit} must be a positive integer or null")
    if config.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size: {config.eval.batch_size} must be a positive integer")
    check_generation(config.eval.generation)
    b = config.bench
    if not b.batch_sizes or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in b.batch_sizes):
        raise ConfigError(f"bench.batch_sizes: {shown(b.batch_sizes)} must be a list of positive integers")
    for key in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(b, key) < 1:
            raise ConfigError(f"bench.{key}: {getattr(b, key)} must be a positive integer")
    if b.warmup < 0:
        raise ConfigError(f"bench.warmup: {b.warmup} must be zero or a positive integer")
    if b.threads is not None and b.threads < 1:
        raise ConfigError(f"bench.threads: {shown(b.threads)} must be a positive integer or null")


def _check_option(key: str, value, option) -> None:
    kind = type(option.default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {shown(value)}")
    if option.choices and value not in option.choices:
        raise ConfigError(f"{key}: {shown(value)} is not allowed (allowed: {', '.join(map(str, option.choices))})")
    if option.bounds and not option.bounds[0] <= value <= option.bounds[1]:
        raise ConfigError(f"{key}: {value} is outside the allowed range [{option.bounds[0]}, {option.bounds[1]}]")


def check_generation(values: dict, where: str = "eval.generation") -> None:
    """Generation keywords: known keys (GENERATION_KEYS), each value of its type and range; errors say ``where``."""
    for key, value in values.items():
        if key not in GENERATION:
            raise ConfigError(f"{where}.{_key(key)}: unknown key (allowed: {', '.join(GENERATION_KEYS)})")
        ok, allowed = GENERATION[key]
        if not ok(value):
            raise ConfigError(f"{where}.{key}: {shown(value)} is not allowed (allowed: {allowed})")


def model_facts(model: ModelConfig, family: str | None) -> tuple[bool | None, int | None]:
    """Whether the model has cross-attention layers and how many decoder layers its LLM has, from its config alone;
    None for what cannot be read offline (the adapter checks again once the model is loaded)."""
    from vtprune.models import FAMILIES

    cross = FAMILIES.get(family).cross_attention if family in FAMILIES else None
    if model.path.startswith("tiny:"):
        from vtprune.models.tiny import TINY_TEXT_LAYERS

        # The tiny recipe itself, so that validating never builds (or needs) the tiny checkpoint.
        return cross, TINY_TEXT_LAYERS.get(model.path[5:])
    try:
        from transformers import AutoConfig

        from vtprune.models import MICRO_ROOT

        path = str(MICRO_ROOT / model.path[6:]) if model.path.startswith("micro:") else model.path
        text = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config(decoder=True)
        return bool(getattr(text, "cross_attention_layers", None)), text.num_hidden_layers
    except (OSError, ValueError, KeyError, AttributeError):
        return cross, None


def declared_family(config: Config) -> str | None:
    """The model family if it is known without reading the model (explicit, or a tiny or micro model); else None."""
    if config.model.family != "auto":
        return config.model.family
    for prefix in ("tiny:", "micro:"):
        if config.model.path.startswith(prefix):
            return config.model.path[len(prefix):]
    return None
