"""The Python API: ``load()`` a pipeline from a config, then ``generate()`` with pruning applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vtprune.config import Config, config_from_dict, load_config
from vtprune.models.base import SampleRecord


@dataclass
class GenerationResult(SampleRecord):
    """One sample's answer and what happened to its visual tokens (``kept``, ``num_visual``, ``kept_fraction``)."""

    text: str = ""


class Pipeline:
    """A loaded model with a pruning plan. ``with_pruning`` gives another plan over the same weights."""

    def __init__(self, config: Config, adapter):
        from vtprune.models.base import PrunePlan
        from vtprune.strategies import STRATEGIES

        self.config = config
        self.adapter = adapter
        strategy = STRATEGIES.get(config.pruning.strategy)
        adapter.check_strategy(strategy)
        self.plan = PrunePlan(strategy, config.pruning.keep_ratio, dict(config.pruning.options), config.seed)

    @property
    def model(self):
        return self.adapter.model

    @property
    def processor(self):
        return self.adapter.processor

    def with_pruning(self, strategy: str | None = None, keep_ratio: float | None = None, options: dict | None = None):
        """The same model with another strategy / keep ratio (no reload): how sweeps share weights."""
        pruning = {
            "strategy": strategy or self.config.pruning.strategy,
            "keep_ratio": self.config.pruning.keep_ratio if keep_ratio is None else float(keep_ratio),
            "options": self.config.pruning.options if options is None and strategy is None else (options or {}),
        }
        return Pipeline(self.config.replace(pruning=pruning), self.adapter)

    def prepare(self, images, prompts):
        return self.adapter.prepare(_as_images(images), list(prompts))

    def generate(self, images, prompts, **gen) -> list[GenerationResult]:
        """One image and one prompt per sample; ``gen`` goes to transformers' ``generate``."""
        import torch

        gen = {**self.config.eval.generation, **gen}
        if gen.get("do_sample"):
            torch.manual_seed(self.config.seed)
        inputs = self.prepare(images, prompts)
        tokenizer = self.processor.tokenizer
        gen.setdefault("pad_token_id", tokenizer.pad_token_id)
        with torch.inference_mode():
            new_ids, records = self.adapter.generate(inputs, self.plan, **gen)
        texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        return [GenerationResult(**vars(r), text=t.strip()) for t, r in zip(texts, records)]


def _as_images(images):
    from PIL import Image

    return [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i for i in images]


def load(config: str | Path | Config | None = None, **keys) -> Pipeline:
    """``load("configs/x.yaml")`` or ``load(model="tiny:llava", strategy="uniform", keep_ratio=0.5)``.

    Keyword shortcuts: ``model`` (path), ``family``, ``strategy``, ``keep_ratio``, ``options``, ``weights``,
    ``dtype``, ``device``, ``attn_implementation``, ``seed``; over a config file they override its values.
    """
    from vtprune.models import load_model

    sections = _sections(keys)
    if isinstance(config, Config):
        cfg = config.replace(**sections) if sections else config
    elif config is not None:
        cfg = load_config(config, sections)
    else:
        cfg = config_from_dict({"name": "api", **sections})
    return Pipeline(cfg, load_model(cfg.model))


_MODEL_KEYS = {"model": "path", "family": "family", "weights": "weights", "dtype": "dtype", "device": "device",
               "attn_implementation": "attn_implementation"}
_PRUNING_KEYS = {"strategy": "strategy", "keep_ratio": "keep_ratio", "options": "options"}


def _sections(keys: dict) -> dict:
    sections: dict = {}
    for key, value in keys.items():
        if key in _MODEL_KEYS:
            sections.setdefault("model", {})[_MODEL_KEYS[key]] = value
        elif key in _PRUNING_KEYS:
            sections.setdefault("pruning", {})[_PRUNING_KEYS[key]] = float(value) if key == "keep_ratio" else value
        elif key in ("seed", "name", "output_dir"):
            sections[key] = value
        else:
            from vtprune.errors import ConfigError

            allowed = ", ".join([*_MODEL_KEYS, *_PRUNING_KEYS, "seed", "name", "output_dir"])
            raise ConfigError(f"load: unknown keyword '{key}' (allowed: {allowed})")
    return sections
