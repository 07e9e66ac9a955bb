"""The Python API: ``load()`` a pipeline from a config, then ``generate()`` with pruning applied."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from vtprune.config import Config, config_from_dict, load_config
from vtprune.fidelity import first_token_topk
from vtprune.samples import GenerationResult, _as_images, read_image, strict_image_decoding  # noqa: F401 (API)

# transformers samples from torch's global RNG, which every model in the process shares.
_GLOBAL_RNG = threading.RLock()


class Pipeline:
    """A loaded model with a pruning plan. ``with_pruning`` gives another plan over the same weights."""

    def __init__(self, config: Config, adapter):
        from vtprune.models.base import PrunePlan
        from vtprune.strategies import STRATEGIES

        self.config = config
        self.adapter = adapter
        strategy = STRATEGIES.get(config.pruning.strategy)
        adapter.check_strategy(strategy)
        p = config.pruning
        self.plan = PrunePlan(strategy, p.keep_ratio, dict(p.options), config.seed, dict(p.placement))
        adapter.placement(self.plan)  # checked against the loaded model before any call

    @property
    def model(self):
        return self.adapter.model

    @property
    def processor(self):
        return self.adapter.processor

    def with_pruning(self, strategy: str | None = None, keep_ratio: float | None = None, options: dict | None = None,
                     placement: dict | None = None):
        """The same model with another strategy / keep ratio (no reload): how sweeps share weights. The config's
        options and placement stay with its own strategy; another one starts from its defaults."""
        p = self.config.pruning
        pruning = p.point(strategy or p.strategy, p.keep_ratio if keep_ratio is None else keep_ratio)
        pruning.update({k: v for k, v in (("options", options), ("placement", placement)) if v is not None})
        return Pipeline(self.config.replace(pruning=pruning), self.adapter)

    def for_config(self, config: Config) -> Pipeline:
        """Another config's plan over the same model (a sweep point): its name, strategy, ratio, options."""
        return Pipeline(config, self.adapter)

    def prepare(self, images, prompts):
        return self.adapter.prepare(_as_images(images), list(prompts))

    def generate(self, images, prompts, **gen) -> list[GenerationResult]:
        """One image and one prompt per sample; ``gen`` goes to transformers' ``generate``.

        Sampling draws from ``config.seed`` on every call; the caller's torch RNG state is left as it was.
        """
        import torch

        gen = {**self.config.eval.generation, **gen}
        images = _as_images(images)
        # The model for the whole call, before the RNG lock: every caller takes the two in the same order.
        with self.adapter.exclusive():
            inputs = self.adapter.prepare(images, list(prompts))
            tokenizer = self.processor.tokenizer
            gen.setdefault("pad_token_id", tokenizer.pad_token_id)
            sampling = gen.get("do_sample")
            seeded = _seeded_rng(self.adapter.device, self.config.seed) if sampling else contextlib.nullcontext()
            with seeded, torch.inference_mode(), first_token_topk(self.model, len(images)) as first:
                new_ids, records = self.adapter.generate(inputs, self.plan, **gen)
            texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
            prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
            new_lengths = (new_ids != gen["pad_token_id"]).sum(-1).tolist()
        first = first or [None] * len(records)
        slots = max(r.num_kept for r in records)
        return [
            GenerationResult(**vars(r), text=t.strip(), input_tokens=int(p), output_tokens=int(n), kept_slots=slots,
                             first_topk=f)
            for t, r, p, n, f in zip(texts, records, prompt_lengths, new_lengths, first)
        ]


def kept_padding(kept: list[int], slots: list[int]) -> float:
    """The fraction of the kept-token slots that were padding: each sample's kept set (``kept`` tokens) took the
    ``slots`` of its batch's largest."""
    total = sum(slots)
    return 1 - sum(kept) / total if total else 0.0


@contextlib.contextmanager
def _seeded_rng(device, seed: int):
    """torch's global RNG seeded from ``seed`` for one call (on ``device`` too if CUDA), then restored."""
    import torch

    cuda = [device] if device.type == "cuda" else []
    with _GLOBAL_RNG, torch.random.fork_rng(devices=cuda):
        # Not torch.manual_seed: it also seeds (or queues a seed for) every CUDA device, outside this fork.
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def load(config: str | Path | Config | None = None, **keys) -> Pipeline:
    """``load("configs/x.yaml")`` or ``load(model="tiny:llava", strategy="uniform", keep_ratio=0.5)``.

    Keyword shortcuts: ``model`` (path), ``family``, ``strategy``, ``keep_ratio``, ``options``, ``placement``, ``weights``,
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
    if cfg.engine == "vllm":  # in vLLM's own environment (scripts/install-vllm.sh)
        from vtprune.vllm.engine import VllmPipeline

        return VllmPipeline.start(cfg)
    return Pipeline(cfg, load_model(cfg.model))


_MODEL_KEYS = {"model": "path", "family": "family", "weights": "weights", "dtype": "dtype", "device": "device",
               "attn_implementation": "attn_implementation"}
_PRUNING_KEYS = {"strategy": "strategy", "keep_ratio": "keep_ratio", "options": "options", "placement": "placement"}


def _sections(keys: dict) -> dict:
    sections: dict = {}
    for key, value in keys.items():
        if key in _MODEL_KEYS:
            sections.setdefault("model", {})[_MODEL_KEYS[key]] = value
        elif key in _PRUNING_KEYS:
            sections.setdefault("pruning", {})[_PRUNING_KEYS[key]] = float(value) if key == "keep_ratio" else value
        elif key in ("seed", "name", "output_dir", "engine"):
            sections[key] = value
        else:
            from vtprune.errors import ConfigError

            allowed = ", ".join([*_MODEL_KEYS, *_PRUNING_KEYS, "seed", "name", "output_dir", "engine"])
            raise ConfigError(f"load: unknown keyword '{key}' (allowed: {allowed})")
    return sections
