"""LLaVA-1.5 on vLLM with vtprune's pre-LLM pruning: placeholders at the budget, filled by the strategy's selection.

Follows vLLM's own LLaVA model (``vllm/model_executor/models/llava.py``: ``LlavaProcessingInfo``,
``LlavaMultiModalProcessor``, ``LlavaForConditionalGeneration``) and the pattern of its video pruning (the placeholder
count a formula of the input, the model returning only the kept embeddings). Differences from vLLM's class:
- ``get_num_image_tokens`` is ``budget(N, keep_ratio)``: the prompt, the scheduler and the KV cache see the pruned
  length from the start.
- ``embed_multimodal`` runs the CLIP tower layer by layer with vLLM's own modules so that the feature layer's input
  is at hand, recomputes that one layer's CLS→patch attention (``cls_attention``, as the HF adapter does), embeds the
  prompt's text tokens after the image (``text_embeds``), and returns per image the selection's slots only.
- The pruning plan (strategy, keep ratio, options, seed) is per request, in ``mm_processor_kwargs[PLAN_KEY]``, over
  the engine's default (``hf_overrides[CONFIG_KEY]``, else none): one engine serves pruned and unpruned requests
  side by side, as a paired benchmark needs. The processor also carries, per image, the prompt's text token ids and
  the seed key of the HF engine (the digest of the whole expanded prompt), from ``mm_processor_kwargs[PROMPT_KEY]``.
  Both are part of vLLM's multimodal hash, so its processor and encoder caches never serve one request's selection
  to another.
- Checkpoints whose CLIP tower keys lack ``vision_model.`` (vtprune's micro models, saved by transformers 5.2x) load
  as they are.
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vtprune.models.llava import first_row_attention
from vtprune.strategies import STRATEGIES
from vtprune.vllm.served import PlanFields, plan_groups, plan_of, planned_input, select, signals_for, slots_for


class VtpruneLlavaInfo(LlavaProcessingInfo):
    """``get_num_image_tokens`` stays the unpruned count: vLLM sizes its encoder budget and profiling by it, an
    upper bound of every plan's. The prompt's count is the plan's (``_get_prompt_updates``)."""


#: checkpoints whose vision tower keys (CLIP, SigLIP) lack ``vision_model.`` (vtprune's tiny and micro models, saved by
#: transformers 5.2x)
TOWER_KEYS = WeightsMapper(orig_to_new_regex={re.compile(r"^vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."})


class BudgetPlaceholders:
    """Mixin of a LLaVA-like vLLM processor (before vLLM's in the bases): an image's placeholders are the plan's
    budget of its visual tokens (``info.get_num_image_tokens``, the unpruned count)."""

    def visual_tokens_of(self, width: int, height: int, hf_kwargs: dict) -> int:
        return self.info.get_num_image_tokens(image_width=width, image_height=height)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        plan = plan_of(self.info.get_hf_config(), hf_processor_mm_kwargs)
        image_id = self.info.get_hf_config().image_token_index

        def replacement(i: int) -> list[int]:
            # Looked up here, as vLLM's own does: a cached image brings its replacement and no item.
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(i)
            return [image_id] * slots_for(plan, self.info.get_num_image_tokens(image_width=size.width,
                                                                               image_height=size.height))

        return [PromptReplacement(modality="image", target=[image_id], replacement=replacement)]


class VtpruneLlavaProcessor(BudgetPlaceholders, PlanFields, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaProcessor, info=VtpruneLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | TOWER_KEYS

    def embed_multimodal(self, **kwargs):
        planned, own = planned_input(self, kwargs)
        if planned is None:
            return own
        fields, image_input = planned
        pixel_values = image_input["pixel_values"]
        out: list = [None] * len(fields["plan"])
        for plan, index in plan_groups(fields["plan"]):
            if plan["strategy"] == "none":
                embeds = self.multi_modal_projector(self._image_pixels_to_features(self.vision_tower, pixel_values[index]))
            else:
                embeds = self.pruned_embeddings(plan, pixel_values[index], *([fields[k][i] for i in index]
                                                                              for k in ("text_ids", "key", "tag")))
            for i, e in zip(index, embeds):
                out[i] = e
        return out

    def pruned_embeddings(self, plan: dict, pixel_values, text_ids, keys, tags) -> list[torch.Tensor]:
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("vtprune on vLLM: LLaVA with several vision feature layers is not supported")
        strategy = STRATEGIES.get(plan["strategy"])
        # Only the signals the strategy needs: the tower runs layer by layer only when its CLS attention is needed.
        if "cls_attention" in strategy.needs:
            vectors, cls = clip_tower(self, pixel_values)
        else:
            vectors, cls = self._image_pixels_to_features(self.vision_tower, pixel_values), None
        features = self.multi_modal_projector(vectors)
        n = features.shape[1]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        p = torch.arange(side * side, device=features.device)
        grid = torch.stack([torch.zeros_like(p), p // side, p % side], dim=1)  # (crop, row, column), row-major
        if n == len(p) + 1:  # strategy "full": the CLS token comes first and has no patch
            grid = torch.cat([grid.new_full((1, 3), -1), grid])
        signals = signals_for(strategy, plan, list(features), [grid] * len(features), keys, text_ids,
                              self.language_model.embed_input_ids, None if cls is None else list(cls))
        return [e for e, _ in select(strategy, plan, signals, features, tags, (vectors, self.multi_modal_projector))]


def clip_tower(model, pixel_values: torch.Tensor):
    """The used features before the projector ``[B, P, D_v]`` and the CLS→patch attention ``[B, P]`` of the layer
    that makes them (head mean), from the CLIP modules of vLLM's LLaVA-like ``model`` run one layer at a time (vLLM
    builds the tower up to the feature layer)."""
    tower = model.vision_tower.vision_model
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
    *before, last = tower.encoder.layers
    for layer in before:
        hidden = layer(hidden)
    attn = last.self_attn
    q, k, _ = attn.qkv_proj(last.layer_norm1(hidden))[0].chunk(3, dim=-1)
    cls = first_row_attention(q[:, :1], k, attn.num_heads, attn.head_dim, attn.scale)
    out = last(hidden)
    if model.config.vision_feature_select_strategy == "default":
        return out[:, 1:], cls[:, 1:]
    return out, cls
