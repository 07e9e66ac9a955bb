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

import json
import os
import re

import numpy as np
import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vtprune.merge import slot_features
from vtprune.models.llava import first_row_attention
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.base import sample_generators
from vtprune.vllm import CONFIG_KEY, PLAN_KEY, PROMPT_KEY, image_tag, plan_key, prompt_ids

#: a file the model appends one JSON line per image to: its tag, kept slots and visual-token count (the engine
#: runs in another process; this is how the kept sets reach the caller)
KEPT_LOG = "VTPRUNE_VLLM_KEPT_LOG"


def plan_of(hf_config, mm_kwargs=None) -> dict:
    """The request's pruning plan (``mm_kwargs[PLAN_KEY]``, a JSON object), else the engine's, else none."""
    given = (mm_kwargs or {}).get(PLAN_KEY)
    plan = json.loads(given) if given else getattr(hf_config, CONFIG_KEY, None) or {"strategy": "none"}
    return {"keep_ratio": 1.0, "options": {}, "seed": 0, **plan}


def slots_for(plan: dict, num_visual: int) -> int:
    """Placeholders of an image of ``num_visual`` tokens under ``plan``: the strategy's budget."""
    return num_visual if plan["strategy"] == "none" else budget(num_visual, float(plan["keep_ratio"]))


class VtpruneLlavaInfo(LlavaProcessingInfo):
    """``get_num_image_tokens`` stays the unpruned count: vLLM sizes its encoder budget and profiling by it, an
    upper bound of every plan's. The prompt's count is the plan's (``_get_prompt_updates``)."""


class VtpruneLlavaProcessor(LlavaMultiModalProcessor):
    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        hf_kwargs = dict(hf_kwargs)
        prompt = hf_kwargs.pop(PROMPT_KEY, None)
        plan = plan_of(self.info.get_hf_config(), {PLAN_KEY: hf_kwargs.pop(PLAN_KEY, None)})
        out = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        images = mm_items.get_items("image", ImageProcessorItems) if "image" in mm_items else None
        if images is None or not len(images):
            return out
        hf_processor = self.info.get_hf_processor()
        image_token = hf_processor.image_token
        image_id = self.info.get_hf_config().image_token_index
        tokenizer = self.info.get_tokenizer()
        encoded_plan = torch.frombuffer(bytearray(plan_key(plan).encode()), dtype=torch.uint8)
        text_ids, keys, tags = [], [], []
        for i in range(len(images)):
            size = images.get_image_size(i)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            # Profiling runs send no prompt: an image token alone, with one text token so text scores are defined.
            ids = prompt_ids(tokenizer, prompt if prompt is not None else image_token + ".", image_token, n)
            image_pos = [j for j, t in enumerate(ids) if t == image_id]
            if len(image_pos) != n:
                raise ValueError(f"{PROMPT_KEY}: the prompt must hold exactly one image token '{image_token}' "
                                 f"({len(image_pos) // max(n, 1)} found)")
            key = np.asarray(ids, dtype=np.int64).tobytes()
            text_ids.append(torch.tensor(ids[image_pos[-1] + 1:], dtype=torch.long))
            keys.append(torch.frombuffer(bytearray(key), dtype=torch.uint8))
            tags.append(torch.tensor([image_tag(images.get(i), key)], dtype=torch.long))
        out.passthrough_data.update(vtprune_text_ids=text_ids, vtprune_key=keys, vtprune_tag=tags,
                                    vtprune_plan=[encoded_plan] * len(images))
        return out

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        plan = plan_of(self.info.get_hf_config(), hf_processor_mm_kwargs)
        image_id = self.info.get_hf_config().image_token_index

        def replacement(i: int) -> list[int]:
            # Looked up here, as vLLM's own does: a cached image brings its replacement and no item.
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(i)
            return [image_id] * slots_for(plan, self.info.get_num_image_tokens(image_width=size.width,
                                                                               image_height=size.height))

        return [PromptReplacement(modality="image", target=[image_id], replacement=replacement)]

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return dict(
            super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            vtprune_text_ids=MultiModalFieldConfig.batched("image"),
            vtprune_key=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            vtprune_tag=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            vtprune_plan=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaProcessor, info=VtpruneLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={re.compile(r"^vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}
    )

    def embed_multimodal(self, **kwargs):
        fields = {name: kwargs.pop(f"vtprune_{name}", None) for name in ("text_ids", "key", "tag", "plan")}
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if fields["plan"] is None or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        plans = [bytes(p.cpu().numpy().tobytes()).decode() for p in fields["plan"]]
        pixel_values = image_input["pixel_values"]
        out: list = [None] * len(plans)
        # Requests of several plans share a batch: each plan's images are selected together.
        for encoded in dict.fromkeys(plans):
            index = [i for i, p in enumerate(plans) if p == encoded]
            plan = json.loads(encoded)
            if plan["strategy"] == "none":
                embeds = self.multi_modal_projector(self._image_pixels_to_features(self.vision_tower, pixel_values[index]))
            else:
                embeds = self.pruned_embeddings(plan, pixel_values[index], *([fields[k][i] for i in index]
                                                                              for k in ("text_ids", "key", "tag")))
            for i, e in zip(index, embeds):
                out[i] = e
        return out

    def tower(self, pixel_values: torch.Tensor):
        """The used features before the projector ``[B, P, D_v]`` and the CLS→patch attention ``[B, P]`` of the
        layer that makes them (head mean), from vLLM's CLIP modules run one layer at a time."""
        tower = self.vision_tower.vision_model
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
        *before, last = tower.encoder.layers
        for layer in before:
            hidden = layer(hidden)
        attn = last.self_attn
        q, k, _ = attn.qkv_proj(last.layer_norm1(hidden))[0].chunk(3, dim=-1)
        cls = first_row_attention(q[:, :1], k, attn.num_heads, attn.head_dim, attn.scale)
        out = last(hidden)
        if self.config.vision_feature_select_strategy == "default":
            return out[:, 1:], cls[:, 1:]
        return out, cls

    def pruned_embeddings(self, plan: dict, pixel_values, text_ids, keys, tags) -> list[torch.Tensor]:
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("vtprune on vLLM: LLaVA with several vision feature layers is not supported")
        strategy = STRATEGIES.get(plan["strategy"])
        # Only the signals the strategy needs: the tower runs layer by layer only when its CLS attention is needed.
        if "cls_attention" in strategy.needs:
            vectors, cls = self.tower(pixel_values)
        else:
            vectors, cls = self._image_pixels_to_features(self.vision_tower, pixel_values), None
        features = self.multi_modal_projector(vectors)
        batch, n = features.shape[:2]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        p = torch.arange(side * side, device=features.device)
        grid = torch.stack([torch.zeros_like(p), p // side, p % side], dim=1)  # (crop, row, column), row-major
        if n == len(p) + 1:  # strategy "full": the CLS token comes first and has no patch
            grid = torch.cat([grid.new_full((1, 3), -1), grid])
        signals = Signals(
            valid=torch.ones(batch, n, dtype=torch.bool, device=features.device), features=features,
            groups=torch.zeros(batch, n, dtype=torch.long, device=features.device), grid=grid.expand(batch, -1, -1),
            cls_attention=cls,
            generators=sample_generators(int(plan["seed"]), [bytes(k.cpu().numpy().tobytes()) for k in keys]),
        )
        if "text_embeds" in strategy.needs:
            longest = max(len(t) for t in text_ids)
            text = torch.zeros(batch, longest, dtype=torch.long, device=features.device)
            signals.text_valid = torch.zeros(batch, longest, dtype=torch.bool, device=features.device)
            for b, ids in enumerate(text_ids):
                text[b, : len(ids)], signals.text_valid[b, : len(ids)] = ids.to(features.device), True
            signals.text_embeds = self.language_model.embed_input_ids(text) * signals.text_valid[..., None]
        selections = strategy.selections(signals, float(plan["keep_ratio"]), **plan["options"])
        expected = slots_for(plan, n)
        merges_before = strategy.merge_space in ("vision", "input")
        out, log = [], []
        for b, selection in enumerate(selections):
            slots = selection.slots
            if len(slots) != expected:
                raise ValueError(f"vtprune on vLLM: '{strategy.name}' kept {len(slots)} tokens where the prompt "
                                 f"holds {expected} placeholders (budget({n}, {plan['keep_ratio']}))")
            feats = slot_features(selection, features[b], (vectors[b], self.multi_modal_projector) if merges_before
                                  else None)
            out.append(feats[slots.to(feats.device)])
            log.append({"tag": int(tags[b].reshape(-1)[0]), "plan": plan, "kept": selection.kept.tolist(),
                        "merged": selection.anchors.tolist(), "num_visual": n})
        path = os.environ.get(KEPT_LOG)
        if path:
            with open(path, "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in log))
        return out
