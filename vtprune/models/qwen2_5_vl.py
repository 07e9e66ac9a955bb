"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, 2×2 patch merger, M-RoPE.

The family questions, answered here; the pruning itself is LLaVA's pre-LLM splice and in-LLM cut (``llava.py``):

- **Image tokens**: one contiguous run of ``image_token_id`` per image, between vision start / end tokens;
  ``grid_t·grid_h·grid_w / merge²`` of them, so the count depends on the image size. ``pixel_values`` is one
  flat ``[Σ patches, C·T·P·P]`` tensor for the whole batch.
- **Visual tokens**: the merger's outputs (``get_image_features(...).pooler_output``), one tensor per image, in
  the order of its image tokens: raster order of the merged grid.
- **Positions**: M-RoPE ``[3, B, S]`` (t, h, w) from ``get_rope_index`` on the *whole* prompt. The pre-LLM
  splice keeps each kept token's original 3-D position (computed on the full sequence, then gathered), so a
  kept patch keeps its place in the image; ``generate`` continues decode positions from the last one passed.
  Renumbering instead would move every kept token. In-LLM (``fastv``) layers receive per-position cos/sin,
  which the cut gathers exactly as for Llama.
- **Saliency without a CLS token** (``cls_attention``, so ``fastervlm``, ``cls_saliency`` and ``adav`` run): the
  attention each patch *receives* in the last full-attention vision block (``max(fullatt_block_indexes)``),
  softmax within its own image, averaged over heads and over query patches, then pooled (mean) over the 2×2
  patches that the merger turns into one visual token. Recomputed from that block's own ``qkv`` and rotary
  embedding on its captured input, so the tower keeps its fast attention; the block sees patches in window
  order, which ``argsort(window_index)`` undoes, as the tower does for its output. This follows the issue's
  definition; VisionZip's and VisPruner's Qwen ports were not consulted (no network here), so it is not
  claimed to match them.
- **No per-layer received attention** (``vision_attention``, what ``hiprune`` ranks by): most of the tower's blocks
  attend within 112-pixel windows, and only the last full-attention block's input is captured; a global
  received-attention map per layer is not defined there the way HiPrune defines it on CLIP, so the signal is not
  provided (left for when a window-aware definition is chosen).
- **Downsampling** (``downsample``, merges in the *input* space): dynamic resolution lets the image itself shrink.
  Each image is rebuilt from its patches, resized (bilinear, antialiased, in normalised pixel space) to the largest
  merged grid ``H' × W'`` within the budget that keeps its aspect ratio (within a factor 1.5), re-patchified, and its
  run of image tokens shortened to match; the model then runs its own path on the smaller image (its own M-RoPE
  positions), the vision tower included. ``kept`` records, for each new token, the original token under its centre.
- **Processor**: transformers' ``Qwen2_5_VLProcessor`` insists on a video processor, which needs torchvision
  (not a vtprune dependency): ``image_only_processor()`` is the same class without the video part.
"""

from __future__ import annotations

import itertools
import math

import torch

from vtprune.flops import encoder_layer_flops
from vtprune.models.base import PrunePlan, SampleRecord, register_family
from vtprune.models.layout import TokenLayout, grid_boxes, to_image
from vtprune.models.llava import LlavaAdapter, VisualTokens, received_attention


@register_family
class Qwen2_5_VLAdapter(LlavaAdapter):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): dynamic resolution, merged patches, M-RoPE positions kept."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    model_types = ("qwen2_5_vl",)
    video_processor = "Qwen2VLVideoProcessor"
    # Like Qwen: no BOS, the turn ends with <|im_end|>; Qwen's specials come after the shared ones, so that the other
    # families' tokenizers (and weights) stay as they are.
    tiny_token_names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    tiny_specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                     "<|video_pad|>")

    @classmethod
    def load_processor(cls, path):
        return image_only_processor().from_pretrained(path)

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    # -- visual tokens and signals -------------------------------------------------------------------------

    def visual_tokens(self, inputs) -> VisualTokens:
        """Merged tokens per image; ``vision`` keeps the input of the last full-attention block for saliency."""
        tower = self.model.model.visual
        block = tower.blocks[max(self.model.config.vision_config.fullatt_block_indexes)].attn
        captured = {}

        def capture(module, args, kwargs):
            captured["x"] = args[0] if args else kwargs["hidden_states"]
            captured["cu_seqlens"] = kwargs["cu_seqlens"]
            captured["rope"] = kwargs["position_embeddings"]

        def capture_merger(module, args):
            captured["merger_input"] = args[0]

        # Only for this call of the tower (the model is held by the caller); removed even on error.
        handles = [block.register_forward_pre_hook(capture, with_kwargs=True),
                   tower.merger.register_forward_pre_hook(capture_merger)]
        try:
            out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        finally:
            for handle in handles:
                handle.remove()
        feats = list(out.pooler_output)
        groups = [torch.zeros(len(f), dtype=torch.long, device=f.device) for f in feats]
        return VisualTokens(feats, groups, {**captured, "grid": inputs["image_grid_thw"], "block": block})

    def pre_projector(self, inputs, visual: VisualTokens):
        """Before the patch merger's MLP: each merged token's ``merge × merge`` normed patch vectors, concatenated
        (``ln_q(x).view(-1, 4·D)``), in the tokens' order (the tower works in window order)."""
        from transformers.vision_utils import get_vision_window_index

        merger, vision = self.model.model.visual.merger, self.model.config.vision_config
        grouped = merger.ln_q(visual.vision["merger_input"]).view(-1, merger.hidden_size)
        window_index, _ = get_vision_window_index(visual.vision["grid"], vision.spatial_merge_size, vision.window_size,
                                                  vision.patch_size)
        ordered = grouped[torch.argsort(window_index.to(grouped.device))]
        return list(torch.split(ordered, [len(f) for f in visual.features])), merger.mlp

    def token_grid(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """(0, row, column) on each image's merged grid, raster order (the order of its image tokens)."""
        out = []
        for (t, h, w), f in zip(inputs["image_grid_thw"].tolist(), visual.features):
            width = w // self.merge_size
            i = torch.arange(len(f), device=f.device) % (h // self.merge_size * width)  # frames repeat the grid
            out.append(torch.stack([torch.zeros_like(i), i // width, i % width], dim=1))
        return out

    signal_vision_attention = None  # module docstring: the window blocks have no global attention map
    # Selecting inside the tower (ToMe, FlowCut): window attention and the 2×2 patch merger need the whole patch grid
    signal_vision_keys = signal_vision_layer_attention = signal_vision_semantic = signal_vision_values = None
    signal_vision_cls_attention = None  # no CLS token

    def cls_attention(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """Attention received per merged token in the last full-attention block (module docstring), per image."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
        from transformers.vision_utils import get_vision_window_index

        v = visual.vision
        attn, x, cu = v["block"], v["x"], v["cu_seqlens"].tolist()
        length = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [L, H, d]
        q, k = (t.flatten(1) for t in apply_rotary_pos_emb_vision(q, k, *v["rope"]))  # [L, H·d]
        heads, head_dim = attn.num_heads, q.shape[1] // attn.num_heads
        received = [received_attention(q[start:end], k[start:end], heads, head_dim, attn.scaling)
                    for start, end in itertools.pairwise(cu)]  # full attention: one segment per image
        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(v["grid"], vision.spatial_merge_size, vision.window_size, vision.patch_size)
        pooled = torch.cat(received).view(-1, self.merge_size**2).mean(dim=1)[torch.argsort(window_index.to(x.device))]
        return list(torch.split(pooled, [len(f) for f in visual.features]))

    # -- positions -----------------------------------------------------------------------------------------

    def prompt_positions(self, inputs) -> torch.Tensor:
        """``[3, B, S]`` M-RoPE positions of the whole prompt (t, h, w), left padding at 0."""
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        )
        return positions

    def spliced_positions(self, inputs, stays: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each kept token's original 3-D position, re-left-padded like the shortened rows."""
        full = self.prompt_positions(inputs)
        out = full.new_zeros(3, *attention_mask.shape)
        for b, stay in enumerate(stays):
            kept = full[:, b, stay]
            out[:, b, attention_mask.shape[1] - kept.shape[1] :] = kept
        return out

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """Qwen2.5-VL: the image at the size the processor resized it to, one box per merged ``merge × merge`` patch
        cell, in raster order of the merged grid (the order of its image tokens).

        ``pixel_values`` is one flat ``[Σ patches, C·T·P·P]`` tensor for the batch; image ``b``'s rows follow the
        earlier images' ``grid_t·grid_h·grid_w`` (one image per sample, as ``prepare`` makes them). The processor's
        patchify orders each image's rows as ``(grid_t, grid_h/merge, grid_w/merge, merge, merge)`` and each row as
        ``(C, T, P, P)``, the T frames of a still image being copies; this undoes it for the first frame.
        """
        t, h, w = inputs["image_grid_thw"][b].tolist()
        view = to_image(self.image_pixels(inputs, b), self.processor.image_processor)
        return TokenLayout(view, grid_boxes(0, 0, h // self.merge_size, w // self.merge_size,
                                            self.merge_size * self.model.config.vision_config.patch_size))

    def image_pixels(self, inputs, b: int) -> torch.Tensor:
        """Image ``b`` as the normalised ``[C, h·P, w·P]`` tensor its patches came from (the first frame)."""
        vision = self.model.config.vision_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        grids = inputs["image_grid_thw"].tolist()
        t, h, w = grids[b]
        start = sum(gt * gh * gw for gt, gh, gw in grids[:b])
        rows = inputs["pixel_values"][start : start + t * h * w]
        cells = rows.reshape(t, h // merge, w // merge, merge, merge, vision.in_channels, vision.temporal_patch_size,
                             patch, patch)[0, ..., 0, :, :]
        # (h/m, w/m, m, m, C, P, P) -> (C, h/m, m, P, w/m, m, P) -> [C, h·P, w·P]
        return cells.permute(4, 0, 2, 5, 1, 3, 6).reshape(vision.in_channels, h * patch, w * patch)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's patch rows ``[h·w, C·T·P·P]`` of one still image ``[C, h·P, w·P]`` (its frame repeated)."""
        vision = self.model.config.vision_config
        patch, merge, frames = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        channels, h, w = pixels.shape[0], pixels.shape[1] // patch, pixels.shape[2] // patch
        cells = pixels.reshape(channels, h // merge, merge, patch, w // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
        cells = cells[..., None, :, :].expand(*cells.shape[:5], frames, patch, patch)  # (h/m, w/m, m, m, C, T, P, P)
        return cells.reshape(h * w, channels * frames * patch * patch)

    # -- downsampling the input (downsample) ---------------------------------------------------------------

    def downsampled(self, inputs, plan: PrunePlan) -> tuple[dict, list[SampleRecord]]:
        """The batch with every image resized to a merged grid within its budget, and the records (module docstring)."""
        import time

        import torch.nn.functional as F

        from vtprune.models.llava import _pad_rows
        from vtprune.strategies.base import budget

        start_time = time.perf_counter()
        merge, patch = self.merge_size, self.model.config.vision_config.patch_size
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        rows, pixels, grids, records = [], [], [], []
        for b, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
            height, width = h // merge, w // merge
            new_h, new_w = fitted_grid(height, width, budget(t * height * width, plan.keep_ratio) // t)
            image = self.image_pixels(inputs, b)
            if (new_h, new_w) != (height, width):
                size = (new_h * merge * patch, new_w * merge * patch)
                image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0].to(image)
            pixels.append(self.patchify(image))
            grids.append([t, new_h * merge, new_w * merge])
            row = ids[b][mask[b]]
            image_at = torch.nonzero(row == self.image_token_id).flatten()
            new_run = row.new_full((t * new_h * new_w,), self.image_token_id)
            rows.append(torch.cat([row[: image_at[0]], new_run, row[image_at[-1] + 1 :]]))
            under = sorted({(int((i + 0.5) * height / new_h)) * width + int((j + 0.5) * width / new_w)
                            for i in range(new_h) for j in range(new_w)})
            records.append(SampleRecord(kept=under, num_visual=t * height * width))
        pad = int(self.text_config.pad_token_id or 0)
        input_ids, attention_mask = _pad_rows(rows, fill=pad)
        out = {"input_ids": input_ids, "attention_mask": attention_mask.long(),
               "mm_token_type_ids": (input_ids == self.image_token_id).long() * attention_mask,
               "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids, device=ids.device)}
        seconds = (time.perf_counter() - start_time) / len(records)
        for record in records:
            record.select_seconds = seconds
        return out, records

    def _generate(self, inputs, plan: PrunePlan, **gen):
        if plan.strategy.merge_space != "input":
            return super()._generate(inputs, plan, **gen)
        small, records = self.downsampled(inputs, plan)
        out = self.model.generate(**small, **gen)
        return out[:, small["input_ids"].shape[1] :], records

    def _prefill_logits(self, inputs, plan: PrunePlan):
        if plan.strategy.merge_space != "input":
            return super()._prefill_logits(inputs, plan)
        small, records = self.downsampled(inputs, plan)
        return self.model(**small, position_ids=self.prompt_positions(small)).logits[:, -1], records

    # -- config-only counts and benchmarks -----------------------------------------------------------------

    #: patches per side of the synthetic image (benchmarks, ``cost``): 32 × 14 px = 448 px on the 7B model
    SYNTHETIC_PATCHES = 32

    @classmethod
    def visual_tokens_for(cls, hf_config, grid_h: int, grid_w: int) -> int:
        """Visual tokens of one image whose patch grid is ``grid_h × grid_w``."""
        return grid_h * grid_w // hf_config.vision_config.spatial_merge_size**2

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        """The count depends on the image size: this is the synthetic benchmark image's (448 px on the 7B model)."""
        return cls.visual_tokens_for(hf_config, cls.SYNTHETIC_PATCHES, cls.SYNTHETIC_PATCHES)

    def num_synthetic_visual(self) -> int:
        return self.max_visual_tokens(self.model.config)

    def synthetic_inputs(self, batch_size: int, prompt_tokens: int, generator: torch.Generator | None = None):
        """A square synthetic image per sample between its vision markers, then random text: ``prompt_tokens``
        text tokens in all (no tokenizer)."""
        cfg, vision = self.model.config, self.model.config.vision_config
        side, n = self.SYNTHETIC_PATCHES, self.num_synthetic_visual()
        # The vision start / end markers count among the prompt's text tokens, as `cost` counts them.
        text = self.synthetic_words(batch_size, max(prompt_tokens - 2, 0), generator, cfg.image_token_id,
                                    cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        image = torch.tensor([cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id])
        input_ids = torch.cat([image.expand(batch_size, -1), text], dim=1)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.rand(batch_size * side * side, patch_dim, generator=generator) * 2 - 1
        inputs = {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == cfg.image_token_id).long(), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, side, side]] * batch_size),
        }
        return self.on_model(inputs)

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """The synthetic 32×32-patch image: patch embedding (Conv3d over ``temporal_patch_size`` frames), the blocks
        (gated MLP; attention over the whole image in ``fullatt_block_indexes``, within each window elsewhere), then
        the merger MLP over the merged tokens. Windows are ``window_size`` px squares of merged patches, the last
        one per row / column cut short (16 windows of 64 patches on the 7B model): exact as transformers splits
        them, whose non-flash path runs each window on its own."""
        return cls._tower_flops(hf_config, cls.SYNTHETIC_PATCHES, cls.SYNTHETIC_PATCHES)

    @classmethod
    def resized_vision_flops(cls, hf_config, keep_ratio: float) -> int:
        """The tower on the synthetic image resized as ``downsampled`` resizes it (``fitted_grid`` within budget)."""
        from vtprune.strategies.base import budget

        merge = hf_config.vision_config.spatial_merge_size
        grid = cls.SYNTHETIC_PATCHES // merge
        rows, cols = fitted_grid(grid, grid, budget(grid * grid, keep_ratio))
        return cls._tower_flops(hf_config, rows * merge, cols * merge)

    @classmethod
    def _tower_flops(cls, hf_config, rows: int, cols: int) -> int:
        """``vision_flops`` of an image of ``rows × cols`` patches."""
        vision = hf_config.vision_config
        merge, hidden, patches = vision.spatial_merge_size, vision.hidden_size, rows * cols
        window = vision.window_size // merge // vision.patch_size  # in merged patches

        def spans(side):  # window extents along one axis, in merged patches
            return [window] * (side // window) + ([side % window] if side % window else [])

        window_pairs = sum((a * b * merge * merge) ** 2 for a in spans(rows // merge) for b in spans(cols // merge))
        full = len(vision.fullatt_block_indexes)
        embed = 2 * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * hidden
        blocks = full * encoder_layer_flops(patches, hidden, vision.intermediate_size, mlp_matrices=3) + (
            vision.depth - full) * encoder_layer_flops(patches, hidden, vision.intermediate_size, mlp_matrices=3,
                                                       pairs=window_pairs)
        merged = merge * merge * hidden
        merger = 2 * (patches // merge**2) * merged * (merged + vision.out_hidden_size)
        return embed + blocks + merger

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab, text=None, vision=None):
        """Qwen2.5-VL: dynamic resolution (8-px patches, 2x2 merge), window attention with full-attention blocks, M-RoPE.

        Images are resized to multiples of 16 px with an area between 32x32 and 96x96 pixels, so a picture gives 4 to 36
        visual tokens and different sizes give different counts (width x height: 40x30 -> 4, 30x70 -> 8, 56x56 -> 16,
        112x56 -> 28, 112x112 -> 36).
        Windows are 32 px (2x2 merged tokens): images larger than one window really use window attention in
        blocks 0 and 2, while blocks 1 and 3 attend over the whole image.
        """
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        )}
        patch, merge, temporal = 8, 2, 2
        config = Qwen2_5_VLConfig(
            vision_config=dict(
                depth=4, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=patch,
                spatial_merge_size=merge, temporal_patch_size=temporal, window_size=32, out_hidden_size=64,
                fullatt_block_indexes=[1, 3], tokens_per_second=2, initializer_range=0.2,
            ) | (vision or {}),
            text_config=dict(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=cls.tiny_text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            ) | (text or {}),
            **ids,
        )
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96}, patch_size=patch, merge_size=merge,
            temporal_patch_size=temporal,
        )
        processor = image_only_processor()(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE
        )
        return model, processor


def image_only_processor():
    """``Qwen2_5_VLProcessor`` without its video processor, for images only.

    transformers' ``Qwen2_5_VLProcessor`` requires a video processor, and the Qwen2-VL video processor needs
    torchvision: without it the stock class can neither be built nor loaded. The sub-processors are read from
    ``__init__``'s signature, so this subclass drops the video argument; it keeps the class name, so a saved
    ``processor_config.json`` names the stock class and loads normally where torchvision exists.
    ``from_pretrained`` on it loads a stock Qwen2.5-VL checkpoint's tokenizer and image processor.
    """
    from transformers import Qwen2_5_VLProcessor as Stock

    class Qwen2_5_VLProcessor(Stock):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
            super(Stock, self).__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return Qwen2_5_VLProcessor


def fitted_grid(height: int, width: int, cells: int) -> tuple[int, int]:
    """The largest ``h × w <= cells`` grid (h <= height, w <= width) whose aspect ratio is within a factor 1.5 of
    ``height / width``; ties → the closer aspect ratio, then the taller grid; 1 × 1 when none is that close."""
    if height * width <= cells:
        return height, width
    target, tolerance = math.log(height / width), math.log(1.5) + 1e-9
    best, best_key = (1, 1), (0,)
    for h in range(1, height + 1):
        for w in range(1, min(width, cells // h) + 1):
            error = abs(math.log(h / w) - target)
            key = (h * w, -error, h)
            if error <= tolerance and key > best_key:
                best, best_key = (h, w), key
    return best


_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
