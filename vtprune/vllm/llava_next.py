"""LLaVA-NeXT on vLLM with vtprune's pre-LLM pruning: placeholders at the budget of the packed anyres sequence,
filled by the strategy's selection.

Follows vLLM's own LLaVA-NeXT model (``vllm/model_executor/models/llava_next.py``: ``LlavaNextProcessingInfo``,
``LlavaNextMultiModalProcessor``, ``LlavaNextForConditionalGeneration._merge_image_patch_embeddings``) and the HF
adapter (``vtprune/models/llava_next.py``): the visual tokens of one image are the base view, then the
high-resolution crops stitched into one grid, unpadded to the image's aspect ratio, with an ``image_newline`` token
closing every grid row; newline tokens are candidates like any other and count in the budget. Differences from
vLLM's classes:
- The placeholder count is ``budget(N, keep_ratio)`` of the packed count ``N`` (``get_num_image_tokens``, base +
  unpadded crops + newlines), which stays unpruned for vLLM's encoder budget.
- ``embed_multimodal`` (``AnyresSelection``, shared with LLaVA-OneVision) runs the CLIP tower once for every crop of
  the batch (layer by layer when a plan needs ``cls_attention``), packs the features with vLLM's own ``_merge_image_patch_embeddings``, and packs every per-patch
  map (crop id, row, column, CLS attention, the vectors before the projector) the same way: the packing is run once
  on the patch ids, with -1 for the newline, and each map is gathered by it. The HF adapter packs its maps through
  transformers' ``pack_image_features`` the same way, so token i's values are token i's on both engines.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.strategies import STRATEGIES
from vtprune.vllm.llava import TOWER_KEYS, BudgetPlaceholders, clip_tower
from vtprune.vllm.served import PlanFields, plan_groups, planned_input, select, signals_for


class VtpruneLlavaNextProcessor(BudgetPlaceholders, PlanFields, LlavaNextMultiModalProcessor):
    pass


class AnyresSelection:
    """Mixin of a LLaVA-NeXT-like vLLM model (before vLLM's class in the bases): the tower runs once for every crop of
    the batch, each image's features are packed (``pack_features``) and its per-patch maps packed the same way
    (``packed_maps``), then each plan's images are selected together. A family defines ``saliency_tower`` (its tower
    run layer by layer: the used features before the projector and the saliency per patch), ``pack_features`` and
    ``packed_maps``."""

    saliency_tower = None

    def tower(self, pixels: torch.Tensor, need_cls: bool):
        if need_cls:
            return self.saliency_tower(pixels)
        return self._image_pixels_to_features(self.vision_tower, pixels), None

    def embed_multimodal(self, **kwargs):
        planned, own = planned_input(self, kwargs)
        if planned is None:
            return own
        fields, image_input = planned
        pixels = list(image_input["pixel_values"])  # per image [crops, C, H, W]
        sizes = image_input["image_sizes"]
        need_cls = any("cls_attention" in STRATEGIES.get(p["strategy"]).needs for p, _ in plan_groups(fields["plan"]))
        vectors, cls = self.tower(torch.cat(pixels), need_cls)
        projected = self.multi_modal_projector(vectors)
        crops = [len(p) for p in pixels]
        per_image = list(zip(projected.split(crops), vectors.split(crops),
                             cls.split(crops) if cls is not None else [None] * len(crops)))
        out: list = [None] * len(pixels)
        for plan, index in plan_groups(fields["plan"]):
            packed = [self.pack_features(sizes[i], per_image[i][0]) for i in index]
            if plan["strategy"] == "none":
                for i, embeds in zip(index, packed):
                    out[i] = embeds
                continue
            strategy = STRATEGIES.get(plan["strategy"])
            maps = [self.packed_maps(sizes[i], *per_image[i][1:]) for i in index]
            signals = signals_for(strategy, plan, packed, [m["grid"] for m in maps],
                                  [fields["key"][i] for i in index], [fields["text_ids"][i] for i in index],
                                  self.language_model.embed_input_ids,
                                  [m["cls"] for m in maps] if "cls_attention" in strategy.needs else None,
                                  [m["groups"] for m in maps])
            chosen = select(strategy, plan, signals, packed, [fields["tag"][i] for i in index],
                            ([m["vectors"] for m in maps], self.multi_modal_projector))
            for i, (embeds, _) in zip(index, chosen):
                out[i] = embeds
        return out


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaNextForConditionalGeneration(AnyresSelection, LlavaNextForConditionalGeneration):
    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | TOWER_KEYS
    saliency_tower = clip_tower

    def pack_features(self, image_size, embeds: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(image_size, embeds, strategy="spatial_unpad")

    def packed_maps(self, image_size, vectors: torch.Tensor, cls: torch.Tensor | None) -> dict:
        """One image's per-patch maps packed like its features: ``groups`` (crop id: base 0, crops 1..n, newlines
        n + 1 — as the HF adapter, so that ``uniform`` spreads over rows), ``grid`` (crop, row, column; -1 for a
        newline), ``cls`` (0 for a newline) and ``vectors`` before the projector (zeros for a newline: never merged)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        patches = side * side
        rows, cols = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints,
                                                 vision.image_size)
        ids = torch.arange(len(vectors) * patches, dtype=torch.float32, device=vectors.device).view(len(vectors),
                                                                                                   patches, 1)
        # vLLM's packing reads only the config and the newline vector: run it on the ids with -1 as the newline.
        stub = SimpleNamespace(config=self.config, image_newline=ids.new_full((1,), -1.0))
        order = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            stub, image_size, ids, strategy="spatial_unpad")[:, 0].round().long()
        newline, at = order < 0, order.clamp(min=0)
        crop, cell = at // patches, at % patches
        grid = torch.stack([crop, cell // side, cell % side], dim=1).masked_fill(newline[:, None], -1)
        flat = vectors.reshape(-1, vectors.shape[-1])
        return {
            "groups": crop.masked_fill(newline, 1 + rows * cols),
            "grid": grid,
            "cls": None if cls is None else cls.reshape(-1)[at].masked_fill(newline, 0.0),
            "vectors": flat[at].masked_fill(newline[:, None], 0.0),
        }
