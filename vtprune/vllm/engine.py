"""A vtprune config served by vLLM: ``VllmPipeline.start(config)`` then ``generate(images, prompts)``, the same
contract as ``vtprune.api.Pipeline`` (answer text, kept indices, visual-token count per sample).

Runs in the vLLM environment (``scripts/install-vllm.sh``). One engine serves every pruning plan: the plan goes
with each request (``mm_processor_kwargs``), so ``with_pruning`` gives another plan over the same engine, as the HF
pipeline's does over the same weights, and a benchmark can interleave pruned and unpruned requests.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from vtprune.errors import ConfigError
from vtprune.vllm import ARCHITECTURES, PLAN_KEY, PROMPT_KEY, check, image_tag, plan_key, prompt_ids

#: engine arguments for the CPU and the small models vtprune runs offline; a caller's own win
CPU_ENGINE = {"enforce_eager": True, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 30}
#: on a GPU, vLLM's own defaults (CUDA graphs, memory share), with room for LLaVA-NeXT's long prompts
GPU_ENGINE = {"max_model_len": 4096}
#: one image a prompt, as vtprune's eval sends; no video where the family has it (the plan prunes images)
MM_LIMITS = {"qwen2_5_vl": {"image": 1, "video": 0}, "llava_onevision": {"image": 1, "video": 0}}


class ServedModel:
    """What the eval and its records read of a pipeline's adapter, for a model that vLLM serves: its family, the
    device and dtype it runs in, and the visual tokens an image makes (the HF processor's count)."""

    def __init__(self, family: str, processor, dtype: str):
        import torch

        self.family, self.processor = family, processor
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SimpleNamespace(dtype=getattr(torch, dtype))

    def visual_tokens_for_size(self, height: int, width: int) -> int:
        from vtprune.models.base import Adapter

        return Adapter.visual_tokens_for_size(self, height, width)


class VllmPipeline:
    def __init__(self, config, llm, processor, family: str, kept_log: Path, engine_args: dict):
        from vtprune.strategies import STRATEGIES

        self.config, self.llm, self.processor, self.family = config, llm, processor, family
        self.kept_log, self.engine_args = kept_log, engine_args
        self.adapter = ServedModel(family, processor, engine_args["dtype"])
        strategy = STRATEGIES.get(config.pruning.strategy)
        check(family, strategy, config.pruning.options)
        p = config.pruning
        self.plan = {"strategy": p.strategy, "keep_ratio": p.keep_ratio, "options": dict(p.options), "seed": config.seed}

    @classmethod
    def start(cls, config, start_engine: bool = True, **engine_args) -> VllmPipeline:
        """Start a vLLM engine on ``config``'s model (``micro:`` and local paths, HF ids) with vtprune's plugin;
        ``start_engine=False``: only the processor and the engine's arguments (for an ``AsyncLLM`` of the caller's)."""
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("engine: 'vllm' needs vLLM, which lives in its own environment: run "
                              "`bash scripts/install-vllm.sh`, then use .venv-vllm/bin/vtprune") from None
        from transformers import AutoConfig, AutoProcessor

        from vtprune.models import resolve_path

        path = resolve_path(config.model.path)
        family = AutoConfig.from_pretrained(path).model_type
        from vtprune.strategies import STRATEGIES

        check(family, STRATEGIES.get(config.pruning.strategy), config.pruning.options)  # before the engine starts
        if config.model.weights == "random":  # an architecture config alone: vLLM makes the weights itself
            path, engine_args = str(random_weights_dir(path, family)), {"load_format": "dummy", **engine_args}
        # The model's process appends every selection here: the kept sets come back through it. Not for an engine
        # of the caller's (a benchmark's), where the writes would weigh on the pruned requests alone.
        kept_log = Path(tempfile.mkstemp(prefix="vtprune-kept-", suffix=".jsonl")[1])
        if start_engine:
            os.environ["VTPRUNE_VLLM_KEPT_LOG"] = str(kept_log)
        dtype = "float32" if config.model.dtype == "auto" else config.model.dtype
        args = dict(model=path, dtype=dtype, seed=config.seed, limit_mm_per_prompt=MM_LIMITS.get(family, {"image": 1}),
                    hf_overrides={"architectures": [ARCHITECTURES[family][0]]}, **((GPU_ENGINE if _has_cuda() else CPU_ENGINE) | engine_args))
        llm = LLM(**args) if start_engine else None
        return cls(config, llm, AutoProcessor.from_pretrained(path), family, kept_log, args)

    def for_config(self, config) -> VllmPipeline:
        """Another config's plan on the same engine (a sweep point)."""
        return VllmPipeline(config, self.llm, self.processor, self.family, self.kept_log, self.engine_args)

    def with_pruning(self, strategy: str | None = None, keep_ratio: float | None = None, options: dict | None = None):
        p = self.config.pruning
        pruning = p.point(strategy or p.strategy, p.keep_ratio if keep_ratio is None else keep_ratio)
        if options is not None:
            pruning["options"] = options
        return self.for_config(self.config.replace(pruning=pruning))

    def request(self, image, prompt: str) -> dict:
        """One vLLM request: the prompt's token ids exactly as the HF engine tokenizes them, the image, the plan."""
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
        )
        ids = self.processor.tokenizer(text)["input_ids"]
        return {"prompt_token_ids": list(ids), "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {PROMPT_KEY: text, PLAN_KEY: plan_key(self.plan)}}

    def num_visual(self, image) -> int:
        """Visual tokens of ``image`` before pruning (the HF processor's count, as vLLM's processor has it)."""
        return self.adapter.visual_tokens_for_size(image.height, image.width)

    def generate(self, images, prompts, max_new_tokens: int | None = None, **sampling) -> list:
        """One image and one prompt per sample; greedy unless ``sampling`` says otherwise."""
        import numpy as np

        from vtprune.samples import GenerationResult, _as_images

        images = _as_images(images)
        requests = [self.request(img, p) for img, p in zip(images, prompts)]
        outputs = self.llm.generate(requests, self.sampling(max_new_tokens, **sampling), use_tqdm=False)
        kept = self.kept_sets()
        results = []
        for img, req, out in zip(images, requests, outputs):
            num_visual = self.num_visual(img)
            ids = prompt_ids(self.processor.tokenizer, req["mm_processor_kwargs"][PROMPT_KEY],
                             self.processor.image_token, num_visual)
            if self.plan["strategy"] == "none":
                record = {"kept": list(range(num_visual)), "merged": []}
            else:
                tag = image_tag(img, np.asarray(ids, dtype=np.int64).tobytes())
                record = kept[(tag, plan_key(self.plan))]
            first = (out.outputs[0].logprobs or [None])[0]
            ranked = sorted(first.items(), key=lambda item: item[1].rank) if first else []
            results.append(GenerationResult(
                kept=sorted(record["kept"] + record["merged"]), merged=record["merged"], num_visual=num_visual,
                text=out.outputs[0].text.strip(), input_tokens=len(ids), output_tokens=len(out.outputs[0].token_ids),
                kept_slots=len(record["kept"]) + len(record["merged"]),
                first_topk={"ids": [t for t, _ in ranked], "logprobs": [lp.logprob for _, lp in ranked]} if first else None,
            ))
        return results

    def sampling(self, max_new_tokens: int | None = None, **sampling):
        """vLLM sampling parameters from the config's generation settings: greedy unless they sample. The first
        token's top-k log-probabilities come back too, for the fidelity figures (``vtprune.fidelity``)."""
        from vllm import SamplingParams

        from vtprune.fidelity import TOP_K

        gen = {**self.config.eval.generation, **sampling}
        return SamplingParams(max_tokens=max_new_tokens or gen.get("max_new_tokens", 16),
                              temperature=gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0,
                              top_p=gen.get("top_p", 1.0), seed=self.config.seed, logprobs=TOP_K)

    def kept_sets(self) -> dict:
        """(tag, plan) → the selection the model logged."""
        out = {}
        for line in self.kept_log.read_text().splitlines():
            row = json.loads(line)
            out[(row["tag"], plan_key(row["plan"]))] = row
        return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def random_weights_dir(path: str, family: str) -> Path:
    """A directory vLLM serves a ``weights: random`` architecture from (``load_format="dummy"``: vLLM fills the
    weights): the architecture's ``config.json`` beside the tokenizer, chat template and processor of the family's
    micro model, the processor sized to the architecture's vision tower and the image token id set to the
    tokenizer's. Speed figures only: the answers are noise. Cached under ``$VTPRUNE_CACHE/served``."""
    import hashlib
    import shutil

    from vtprune.models import MICRO_ROOT
    from vtprune.models.tiny import cache_root, cached

    if family != "llava":
        raise ConfigError(f"model.weights: 'random' on engine 'vllm' is served for family 'llava' only, not "
                          f"'{family}' (allowed: llava)")
    source = Path(path) / "config.json"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]

    def build(out: Path) -> None:
        micro = MICRO_ROOT / family
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
            shutil.copy(micro / name, out / name)
        config = json.loads(source.read_text())
        tokenizer = json.loads((micro / "tokenizer_config.json").read_text())
        vocab = {t["content"]: t["id"] for t in json.loads((micro / "tokenizer.json").read_text())["added_tokens"]}
        config["image_token_index"] = vocab[json.loads((micro / "processor_config.json").read_text())["image_token"]]
        config["pad_token_id"] = config["text_config"]["pad_token_id"] = vocab[tokenizer["pad_token"]]
        (out / "config.json").write_text(json.dumps(config, indent=2))
        processor = json.loads((out / "processor_config.json").read_text())
        side, patch = config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
        processor["image_processor"].update(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        processor["patch_size"] = patch
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2))

    return cached(cache_root() / "served" / f"{Path(path).name}-{digest}", build, f"{path} (random weights)")
