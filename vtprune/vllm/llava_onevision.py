"""LLaVA-OneVision on vLLM with vtprune's pre-LLM pruning: placeholders at the budget of the packed anyres sequence
(downsampled where the model downsamples), filled by the strategy's selection.

Follows vLLM's own LLaVA-OneVision model (``vllm/model_executor/models/llava_onevision.py``:
``LlavaOnevisionProcessingInfo``, ``LlavaOnevisionMultiModalProcessor``,
``LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings``) and the HF adapter
(``vtprune/models/llava_onevision.py``). The selection is LLaVA-NeXT's (``AnyresSelection``); what differs:
- **Every map is packed by vLLM's own packing**, run on the map itself (a stub ``self`` holding the config and the
  map's newline value), as the HF adapter runs transformers' ``pack_image_features`` on its maps: the packing
  interpolates (``anyres_max``), so NeXT's patch-id gather does not apply. Crop and patch of a downsampled token come
  from packed coordinates (``crop_coordinates``/``sources_of``, shared with the HF adapter: a linear map survives
  bilinear interpolation exactly); the saliency and the vectors before the projector are interpolated with the
  features.
- **Saliency**: SigLIP has no CLS token; ``cls_attention`` is the attention each patch receives in the feature
  layer, per crop (``received_attention``, the HF adapter's definition), recomputed from vLLM's own SigLIP modules
  run one layer at a time.
- **Deliberate differences from vLLM's class**: vLLM 0.32 counts and packs every OneVision model at ``anyres_max_9``
  (``_get_num_unpadded_features`` has 9 written in, ``_process_image_input`` never passes the config's
  ``vision_aspect_ratio``); here both follow the config, as transformers does (the tiny model is ``anyres_max_2``).
  The count is that of the packing itself, run on an empty map. The profiling image is the one of vLLM's choice or
  the grid pinpoint with the most tokens (``LlavaOnevisionAdapter.synthetic_pinpoint``), whichever gives more.
- Images only: the plan prunes images; the engine starts with no video (``MM_LIMITS``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vtprune.models.llava import received_attention
from vtprune.models.llava_onevision import LlavaOnevisionAdapter, crop_coordinates, sources_of
from vtprune.vllm.llava import TOWER_KEYS, BudgetPlaceholders
from vtprune.vllm.llava_next import AnyresSelection
from vtprune.vllm.served import PlanFields


def pack(config, image_size, maps: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """One image's per-crop maps ``[crops, P, C]`` packed as vLLM's LLaVA-OneVision packs its features (unpad,
    bilinear downsampling at the config's ``anyres_max``, ``newline`` ``[C]`` closing every row): ``[N, C]``."""
    stub = SimpleNamespace(config=config, image_newline=newline)  # the packing reads only these two
    return LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        stub, image_size, maps, image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio,
        strategy="spatial_unpad")


def siglip_tower(model, pixel_values: torch.Tensor):
    """The used features before the projector ``[crops, P, D_v]`` and the attention each patch receives in the layer
    that makes them ``[crops, P]`` (per crop, head and query mean: ``received_attention``), from the SigLIP modules
    of vLLM's model run one layer at a time (vLLM builds the tower up to the feature layer, without its post norm,
    and LLaVA-OneVision reads every patch: strategy ``full``)."""
    if not isinstance(model.config.vision_feature_layer, int):
        raise ValueError("vtprune on vLLM: LLaVA-OneVision with several vision feature layers is not supported")
    tower = model.vision_tower.vision_model
    hidden = tower.embeddings(pixel_values)
    *before, last = tower.encoder.layers
    for layer in before:
        hidden, _ = layer(hidden)
    attn = last.self_attn
    q, k, _ = attn.qkv_proj(last.layer_norm1(hidden))[0].chunk(3, dim=-1)
    received = torch.stack([received_attention(qc, kc, attn.num_heads, attn.head_dim, attn.scale)
                            for qc, kc in zip(q, k)])
    out, _ = last(hidden)
    return out, received


class VtpruneLlavaOnevisionInfo(LlavaOnevisionProcessingInfo):
    """An image's visual tokens as the config's packing makes them (vLLM's formula assumes ``anyres_max_9``)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = get_anyres_image_grid_shape((image_height, image_width), config.image_grid_pinpoints,
                                                 vision.image_size)
        empty = torch.zeros(1 + rows * cols, side * side, 1)
        return len(pack(config, torch.tensor([image_height, image_width]), empty, empty.new_zeros(1)))

    def get_image_size_with_most_features(self) -> ImageSize:
        height, width = LlavaOnevisionAdapter.synthetic_pinpoint(self.get_hf_config())
        sizes = [super().get_image_size_with_most_features(), ImageSize(width=width, height=height)]
        return max(sizes, key=lambda s: self.get_num_image_tokens(image_width=s.width, image_height=s.height))


class VtpruneLlavaOnevisionProcessor(BudgetPlaceholders, PlanFields, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaOnevisionProcessor, info=VtpruneLlavaOnevisionInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class VtpruneLlavaOnevisionForConditionalGeneration(AnyresSelection, LlavaOnevisionForConditionalGeneration):
    hf_to_vllm_mapper = LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper | TOWER_KEYS
    saliency_tower = siglip_tower

    def pack_features(self, image_size, embeds: torch.Tensor) -> torch.Tensor:
        return pack(self.config, image_size, embeds, self.image_newline)

    def _merge_image_patch_embeddings(self, image_size, patch_embeddings, *, image_newline=None,
                                      vision_aspect_ratio=None, strategy: str):
        # vLLM's own image path (taken only without vtprune's processor fields) packs at the config's anyres_max too
        # (vLLM 0.32 passes none: 9)
        return super()._merge_image_patch_embeddings(image_size, patch_embeddings, image_newline=image_newline,
                                                     vision_aspect_ratio=self.config.vision_aspect_ratio,
                                                     strategy=strategy)

    def packed_maps(self, image_size, vectors: torch.Tensor, received: torch.Tensor | None) -> dict:
        """One image's per-patch maps packed like its features, as the HF adapter packs them: ``groups`` (crop id of
        the token's patch: base 0, crops 1..n, newlines n + 1), ``grid`` (crop, row, column of that patch; -1 for a
        newline), ``cls`` (received attention, interpolated with the features; 0 for a newline) and ``vectors``
        before the projector (zeros for a newline: never merged)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints,
                                                 vision.image_size)
        coords = crop_coordinates(len(vectors), cols, side, vectors.device)
        sources = sources_of(pack(self.config, image_size, coords, coords.new_full((3,), -1.0)), cols, side)
        return {
            "groups": torch.where(sources[:, 0] < 0, 1 + rows * cols, sources[:, 0]),
            "grid": sources,
            "cls": None if received is None else pack(self.config, image_size, received[..., None],
                                                      received.new_zeros(1))[:, 0],
            "vectors": pack(self.config, image_size, vectors, vectors.new_zeros(vectors.shape[-1])),
        }
