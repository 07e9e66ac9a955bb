"""vtprune on vLLM: pre-LLM visual-token pruning inside a serving engine.

vLLM fixes an image's placeholder count in its multimodal processor, before the vision tower runs. The plugin
registers, per supported family, a model subclass whose processor emits ``budget(N, keep_ratio)`` placeholders and
whose ``embed_multimodal`` fills them with the tokens vtprune's own strategy selects from the vision features: the
same strategy functions and ``Selection`` contract as the Hugging Face engine, so the kept sets are equal.

Only pre-LLM placements run here: vLLM's paged KV cache gives every decoder layer one sequence length, so an
in-LLM cut (fastv, pdrop: later layers see fewer tokens) has no place to go. A config that asks for one is refused
at load.

This module imports no vLLM: it is the plugin's entry point (``vllm.general_plugins``) and the checks that the
vtprune side runs before starting an engine.
"""

from __future__ import annotations

import hashlib
import json

from vtprune.errors import ConfigError

#: family → (vLLM architecture vtprune registers, the module and class that implement it)
ARCHITECTURES = {
    "llava": ("VtpruneLlavaForConditionalGeneration", "vtprune.vllm.llava:VtpruneLlavaForConditionalGeneration"),
    "llava_next": ("VtpruneLlavaNextForConditionalGeneration",
                   "vtprune.vllm.llava_next:VtpruneLlavaNextForConditionalGeneration"),
    "llava_onevision": ("VtpruneLlavaOnevisionForConditionalGeneration",
                        "vtprune.vllm.llava_onevision:VtpruneLlavaOnevisionForConditionalGeneration"),
    "qwen2_5_vl": ("VtpruneQwen2_5_VLForConditionalGeneration",
                   "vtprune.vllm.qwen2_5_vl:VtpruneQwen2_5_VLForConditionalGeneration"),
}
#: the signals a family's vLLM model computes without giving up its fused attention: the vision features, their
#: layout, the CLS attention of the feature layer (LLaVA-OneVision: the attention received in the feature layer;
#: Qwen2.5-VL: in the last full-attention block; recomputed for that one layer), and the prompt's text embeddings
#: (the prompt reaches the processor through ``mm_processor_kwargs``)
SIGNALS = {
    "llava": ("features", "groups", "grid", "cls_attention", "text_embeds"),
    "llava_next": ("features", "groups", "grid", "cls_attention", "text_embeds"),
    "llava_onevision": ("features", "groups", "grid", "cls_attention", "text_embeds"),
    "qwen2_5_vl": ("features", "groups", "grid", "cls_attention", "text_embeds"),
}
#: the hf_config attribute the pruning plan travels in (``hf_overrides``), to the processor and the model
CONFIG_KEY = "vtprune_pruning"
#: ``mm_processor_kwargs`` keys of a request: its prompt text (chat-templated, the image token included) and its
#: pruning plan (JSON: strategy, keep_ratio, options, seed), which overrides the engine's
PROMPT_KEY = "vtprune_prompt"
PLAN_KEY = "vtprune_plan"


def plan_key(plan: dict) -> str:
    """A plan as the JSON text that travels in ``mm_processor_kwargs`` and keys the kept-set log."""
    return json.dumps(plan, sort_keys=True)


def prompt_ids(tokenizer, prompt: str, image_token: str, num_visual: int) -> list[int]:
    """The prompt's token ids as the HF processor makes them: the image token expanded to the visual tokens. The
    vLLM processor and the caller both compute them so: the seed key and the log tag are digests of them."""
    return list(tokenizer(prompt.replace(image_token, image_token * num_visual))["input_ids"])


def image_tag(image, key: bytes) -> int:
    """A signed 64-bit digest of one image and its prompt: how the caller finds its kept set in the log."""
    digest = hashlib.sha1(image.convert("RGB").tobytes() + key).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def register() -> None:
    """``vllm.general_plugins`` entry point: vLLM calls it in every process it starts; registering is idempotent."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)


def runs_on_vllm(strategy, options: dict | None = None) -> bool | str:
    """True, or why not: the families aside, a strategy runs on vLLM when it prunes before the LLM and its selection
    holds exactly the budget (under ``options``)."""
    if strategy.stage == "in_llm":
        return "it prunes inside the LLM (vLLM's paged KV cache gives every layer one length)"
    if strategy.stage == "vision":
        return "it merges inside the vision tower, which vtprune's vLLM model runs as vLLM's own"
    if not strategy.fills(options):
        return ("it may keep fewer tokens than the budget, and the prompt vLLM schedules holds one placeholder per "
                "token of the budget before the model runs")
    return True


def check(family: str | None, strategy, options: dict | None = None) -> None:
    """One line, before any engine starts, when ``strategy`` cannot run on ``family`` under vLLM (``None``: a family
    not known yet, before its config is read: only what holds for every family is checked)."""
    if family is not None and family not in ARCHITECTURES:
        raise ConfigError(f"engine: 'vllm' does not run model family '{family}' (allowed: {', '.join(ARCHITECTURES)})")
    usable = [name for name, s in _strategies() if supported(family or "llava", s)]
    why = runs_on_vllm(strategy, options)
    if why is not True:
        raise ConfigError(f"pruning.strategy: '{strategy.name}' cannot run on vLLM: {why} (allowed on vllm: "
                          f"{', '.join(usable)})")
    missing = [n for n in strategy.needs if family is not None and n not in SIGNALS[family]]
    if missing:
        raise ConfigError(f"pruning.strategy: '{strategy.name}' needs the signal '{missing[0]}', which vtprune's vLLM "
                          f"'{family}' model does not compute (allowed on vllm: {', '.join(usable)})")


def supported(family: str, strategy) -> bool:
    return runs_on_vllm(strategy) is True and set(strategy.needs) <= set(SIGNALS.get(family, ()))


def _strategies():
    from vtprune.strategies import STRATEGIES

    return STRATEGIES.items()
