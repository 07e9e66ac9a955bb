"""Qwen2.5-VL on vLLM with vtprune's pre-LLM pruning: placeholders at the budget, filled by the strategy's selection,
each kept token at its own M-RoPE position.

Follows vLLM's own Qwen2.5-VL model (``vllm/model_executor/models/qwen2_5_vl.py``: ``Qwen2_5_VLMultiModalProcessor``
with ``get_replacement_qwen2vl``, ``Qwen2_5_VLForConditionalGeneration`` with ``get_mrope_input_positions``) and its
video pruning (EVS: ``_postprocess_video_embeds_evs`` returns the kept embeddings with their (t, h, w) positions in 4
extra channels, ``recompute_mrope_positions`` moves them into the request's M-RoPE positions), for images, per
request. Differences from vLLM's classes:
- The image placeholder count is ``budget(N, keep_ratio)`` of the plan (``N = t·h·w / merge²``); the scheduler and
  the KV cache see the pruned length from the start. ``get_num_image_tokens`` stays unpruned: vLLM sizes its encoder
  budget by it. Videos are refused (the plan is for images).
- ``embed_multimodal`` runs vLLM's vision tower once for the batch, block by block with its own modules, keeping
  the input of its last full-attention block when a strategy needs ``cls_attention`` (the attention each merged token receives there, recomputed as the
  HF adapter does: ``vtprune/models/qwen2_5_vl.py``) and the patch merger's input (the vectors a merge before the
  projector averages). Every image's embeddings, pruned or not, carry 4 position channels.
- Positions as vtprune's HF engine has them: each kept token keeps its place on the image's merged grid, and the
  text after the image starts ``max(t, h, w)`` after the image's first position, as if nothing were pruned. The 4th
  channel is therefore ``max(t, h, w)`` where vLLM's EVS puts the grid's width (the same for square grids; for a
  taller image EVS would start the text inside the image's rows). ``get_mrope_input_positions`` knows the
  placeholder run may be shorter than the grid, so the prompt's initial positions already have the final length.
- vLLM 0.32's runners recompute positions after the encoder only when *video* pruning is configured (and its CPU
  runner never sets the flag): ``enable_position_recompute`` switches the recompute on for a runner whose model is
  this one.
"""

from __future__ import annotations

import functools
import itertools

import einops
import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    cast_overflow_tensors,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vtprune.models.llava import received_attention
from vtprune.strategies import STRATEGIES
from vtprune.vllm.served import PlanFields, plan_groups, plan_of, pop_fields, select, signals_for, slots_for


def enable_position_recompute() -> None:
    """Make vLLM's model runner move the M-RoPE positions the model returns with its image embeddings into the
    request (``recompute_mrope_positions``) for a model that sets ``vtprune_prunes_images``. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner's base: it gathers for both

    gather = GPUModelRunner._gather_mm_embeddings
    if getattr(gather, "vtprune", False):
        return

    @functools.wraps(gather)
    def gather_with_positions(self, *args, **kwargs):
        if getattr(self.get_model(), "vtprune_prunes_images", False):
            self.is_multimodal_pruning_enabled = True
        return gather(self, *args, **kwargs)

    gather_with_positions.vtprune = True
    GPUModelRunner._gather_mm_embeddings = gather_with_positions


def grid_positions(grid_thw, merge: int) -> torch.Tensor:
    """``[N, 3]`` (t, row, column) of an image's merged tokens, raster order (the order of its image tokens)."""
    t, h, w = (int(x) for x in grid_thw)
    return torch.from_numpy(np.indices((t, h // merge, w // merge)).reshape(3, -1).T.copy())


def with_positions(embeds: torch.Tensor, grid_thw, merge: int, slots: torch.Tensor) -> torch.Tensor:
    """``embeds`` (the image's tokens at ``slots``) with 4 channels: each one's (t, h, w) position on the merged grid
    and, in every row, the distance from the image's first position to the text after it (``max(t, h, w)``)."""
    full = grid_positions(grid_thw, merge)
    extent = int(full.max()) + 1 if len(full) else 0
    positions = torch.cat([full[slots.cpu()], torch.full((len(slots), 1), extent, dtype=full.dtype)], dim=1)
    return torch.cat([embeds, positions.to(embeds)], dim=1)


class VtpruneQwen2_5_VLProcessor(PlanFields, Qwen2_5_VLMultiModalProcessor):
    def visual_tokens_of(self, width: int, height: int, hf_kwargs: dict) -> int:
        return self.info.get_num_image_tokens(image_width=width, image_height=height,
                                              image_processor=self.info.get_image_processor(), mm_kwargs=hf_kwargs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        plan = plan_of(config, hf_processor_mm_kwargs)
        merge = config.vision_config.spatial_merge_size

        def replacement(i: int) -> list[int]:
            grid = out_mm_kwargs["image"][i]["image_grid_thw"].data
            return [config.image_token_id] * slots_for(plan, int(grid.prod()) // merge**2)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(VtpruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtpruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    vtprune_prunes_images = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Every image's embeddings carry their positions (also read by vLLM: no encoder CUDA graph, which would
        # bypass embed_multimodal); the runner built this model, so its class is imported by now.
        self.is_multimodal_pruning_enabled = True
        enable_position_recompute()

    @property
    def merge(self) -> int:
        return self.visual.spatial_merge_size

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """As vLLM's, but an image's run of placeholders may be shorter than its grid: the run takes the grid's first
        positions (``recompute_mrope_positions`` puts the kept ones there), and the text after it starts where it
        would after the whole grid."""
        parts, start, next_pos = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError("vtprune on vLLM: Qwen2.5-VL serves images only")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
            grid = grid_positions(feature.data["image_grid_thw"].data.tolist(), self.merge).T.numpy()
            parts.append(grid[:, :length] + next_pos + text)
            next_pos += text + int(grid.max()) + 1
            start = offset + length
        tail = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_pos)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(positions.copy()), int(positions.max() + 1 - len(input_tokens))

    def embed_multimodal(self, **kwargs):
        fields = pop_fields(kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if "video" in inputs:
            raise ValueError("vtprune on vLLM: Qwen2.5-VL serves images only")
        image_input = inputs.get("image")
        if image_input is None:
            return []
        grids = image_input["image_grid_thw"].tolist()
        if fields["plan"] is None or image_input["type"] != "pixel_values":
            embeds = self._process_image_input(image_input)
            return tuple(with_positions(e, g, self.merge, torch.arange(len(e))) for e, g in zip(embeds, grids))
        need_cls = any("cls_attention" in STRATEGIES.get(p["strategy"]).needs for p, _ in plan_groups(fields["plan"]))
        features, vectors, cls = self.tower(image_input["pixel_values"], grids, need_cls)
        out: list = [None] * len(grids)
        for plan, index in plan_groups(fields["plan"]):
            if plan["strategy"] == "none":
                chosen = [(features[i], torch.arange(len(features[i]))) for i in index]
            else:
                strategy = STRATEGIES.get(plan["strategy"])
                signals = signals_for(
                    strategy, plan, [features[i] for i in index],
                    [self.token_grid(grids[i]).to(features[i].device) for i in index],
                    [fields["key"][i] for i in index], [fields["text_ids"][i] for i in index],
                    self.language_model.embed_input_ids,
                    [cls[i] for i in index] if "cls_attention" in strategy.needs else None)
                chosen = select(strategy, plan, signals, [features[i] for i in index], [fields["tag"][i] for i in index],
                                ([vectors[i] for i in index], self.visual.merger.mlp))
            for i, (embeds, slots) in zip(index, chosen):
                out[i] = with_positions(embeds, grids[i], self.merge, slots)
        return tuple(out)

    def token_grid(self, grid_thw) -> torch.Tensor:
        """(0, row, column) of an image's merged tokens, as the HF adapter's ``token_grid`` (frames repeat the grid)."""
        positions = grid_positions(grid_thw, self.merge)
        return torch.cat([torch.zeros_like(positions[:, :1]), positions[:, 1:]], dim=1)

    def tower(self, pixel_values: torch.Tensor, grids: list, need_cls: bool):
        """Per image: the merged tokens, their vectors before the merger's MLP (``ln_q(x)`` of their ``merge²``
        patches, concatenated) and, ``need_cls``, the attention each receives in the last full-attention block
        (head mean, query mean within the image, pooled over its patches). vLLM's
        ``Qwen2_5_VisionTransformer.forward`` step by step, with its own modules, so that the block's and the
        merger's inputs are at hand (hooks would not do: vLLM's compile decorator calls ``forward`` directly)."""
        visual = self.visual
        meta = visual.prepare_encoder_metadata(grids)
        hidden = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype))
        length, unit = hidden.shape[0], visual.spatial_merge_unit
        # The blocks see patches in window order; reverse_indices undoes it, as the tower does for its output.
        hidden = hidden.reshape(length // unit, unit, -1)[meta["window_index"]].reshape(length, 1, -1)
        received = None
        for i, block in enumerate(visual.blocks):
            scope = "full" if i in visual.fullatt_block_indexes else "window"
            cu_seqlens = meta["cu_seqlens" if scope == "full" else "cu_window_seqlens"]
            if need_cls and i == max(visual.fullatt_block_indexes):
                received = block_received_attention(block.attn, block.norm1(hidden), cu_seqlens, meta["rotary_pos_emb_cos"],
                                              meta["rotary_pos_emb_sin"])
            hidden = block(hidden, cu_seqlens=cu_seqlens, rotary_pos_emb_cos=meta["rotary_pos_emb_cos"],
                           rotary_pos_emb_sin=meta["rotary_pos_emb_sin"], max_seqlen=meta[f"max_seqlen_{scope}"],
                           sequence_lengths=meta.get(f"sequence_lengths_{scope}"))
        if hidden.dtype == torch.float16:
            hidden = cast_overflow_tensors(hidden)
        reverse = meta["reverse_indices"]
        merger = visual.merger
        sizes = [int(np.prod(g)) // self.merge**2 for g in grids]
        merged = merger(hidden)[reverse].split(sizes)
        vectors = merger.ln_q(hidden).view(-1, merger.hidden_size)[reverse].split(sizes)
        cls = None if received is None else received.view(-1, self.merge**2).mean(dim=1)[reverse].split(sizes)
        return merged, vectors, cls


def block_received_attention(attn, x: torch.Tensor, cu_seqlens, cos, sin) -> torch.Tensor:
    """``[L]`` attention each patch receives within its own image in block ``attn`` (its input ``x`` ``[L, 1, C]``,
    window order): ``received_attention`` per image segment, on the queries and keys
    ``Qwen2_5_VisionAttention.forward`` computes before leaving the scores to a fused kernel."""
    qkv = einops.rearrange(attn.qkv(x)[0], "s b (three head d) -> b s three head d", three=3,
                           head=attn.num_attention_heads_per_partition)
    qk = einops.rearrange(qkv[:, :, :2], "b s two head d -> (two b) s head d", two=2).contiguous()
    q, k = attn.apply_rotary_emb(qk, cos, sin).flatten(2).unbind(dim=0)  # [L, H·d] each (batch 1)
    heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    return torch.cat([received_attention(q[start:end], k[start:end], heads, head_dim, head_dim**-0.5)
                      for start, end in itertools.pairwise(cu_seqlens.tolist())])
