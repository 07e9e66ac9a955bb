"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): the LLaVA adapter over the model's anyres layout.

The visual tokens of one image are, in the model's own order: the base view (one crop of the whole image),
then the high-resolution crops stitched into one grid, unpadded to the image's aspect ratio, with an
``image_newline`` token closing every grid row. vtprune takes that sequence from the model's own
``get_image_features`` / ``pack_image_features``; newline tokens are candidates like any other visual token
and count in the budget. Per-token maps (crop ids, CLS saliency) are carried through the same
``pack_image_features`` as 1-channel feature maps, so token i's value is token i's.
"""

from __future__ import annotations

import torch
from PIL import Image

from vtprune.models.base import register_family
from vtprune.models.layout import GAP, TokenLayout, grid_boxes, to_image
from vtprune.models.llava import LlavaAdapter, VisualTokens


@register_family
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (LlavaNextForConditionalGeneration): anyres crops, unpad and newlines followed exactly."""

    # Selecting inside the tower (ToMe, FlowCut) leaves no patch grid for the anyres packing (unpadding, row newlines) to lay
    # out: not provided on the packed multi-crop families.
    signal_vision_keys = signal_vision_layer_attention = signal_vision_semantic = signal_vision_values = None

    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    model_types = ("llava_next",)

    def crops_per_image(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            for size in image_sizes
        ]

    def pack_maps(self, maps: torch.Tensor, image_sizes, newline_value: float) -> list[torch.Tensor]:
        """Pack a per-crop map ``[crops, P]`` (all images' crops in order) exactly like the features: ``[N_b]`` per image."""
        per_image = torch.split(maps[..., None], self.crops_per_image(image_sizes), dim=0)
        newline = maps.new_full((1,), newline_value)
        packed, _ = self.model.model.pack_image_features(
            list(per_image), image_sizes, self.model.config.vision_feature_select_strategy, image_newline=newline
        )
        return [p[:, 0] for p in packed]

    def visual_tokens(self, inputs) -> VisualTokens:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            output_hidden_states=True,
        )
        feats = list(out.pooler_output)
        # Group = crop id: base view 0, crops 1..n; newline tokens form their own last group (n + 1) so that
        # `uniform` spreads its share over the rows instead of treating separators as picture content.
        counts = self.crops_per_image(inputs["image_sizes"])
        tokens = out.hidden_states[0].shape[1] - (cfg.vision_feature_select_strategy == "default")
        ids = torch.cat([torch.arange(n, dtype=torch.float32) for n in counts])[:, None].expand(-1, tokens)
        groups = [
            torch.where(g < 0, n, g).round().long().to(f.device)
            for g, n, f in zip(self.pack_maps(ids.to(feats[0].device), inputs["image_sizes"], -1.0), counts, feats)
        ]
        return VisualTokens(feats, groups, out)

    def pre_projector(self, inputs, visual: VisualTokens):
        """Before the projector, packed like the features; a newline token has no such vector (zeros: never merged)."""
        chosen = self.selected_vision_features(visual)
        per_image = torch.split(chosen, self.crops_per_image(inputs["image_sizes"]), dim=0)
        packed, _ = self.model.model.pack_image_features(
            list(per_image), inputs["image_sizes"], self.model.config.vision_feature_select_strategy,
            image_newline=chosen.new_zeros(chosen.shape[-1]))
        return list(packed), self.model.model.multi_modal_projector

    def token_grid(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """(crop, row, column) on each crop's own patch grid, packed like the features (unpadded rows and columns
        are gone); newline tokens have no patch (-1)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        crops = sum(self.crops_per_image(inputs["image_sizes"]))
        p = torch.arange(side * side, dtype=torch.float32, device=visual.features[0].device)
        maps = [self.pack_maps(m.expand(crops, -1), inputs["image_sizes"], -1.0) for m in (p // side, p % side)]
        return [torch.stack([torch.where(r < 0, -1, g), r.round().long(), c.round().long()], dim=1)
                for g, r, c in zip(visual.groups, *maps)]

    def pack_saliency(self, inputs, crop_map: torch.Tensor) -> list[torch.Tensor]:
        """A saliency map per crop, packed like the features; newline tokens score 0 (no patch behind them)."""
        return self.pack_maps(crop_map, inputs["image_sizes"], 0.0)

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """LLaVA-NeXT: base view, then the anyres crops assembled, unpadded, with a newline token per row.

        The order comes from packing patch ids like the features (``pack_maps``), so unpad and newline placement
        are exactly the model's.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        per_crop = (size // patch) ** 2
        image_size = inputs["image_sizes"][b]
        rows, cols = get_anyres_image_grid_shape(image_size.tolist(), cfg.image_grid_pinpoints, size)
        crops = inputs["pixel_values"][b][: 1 + rows * cols]
        ids = torch.arange(len(crops) * per_crop, dtype=torch.float32, device=crops.device).view(len(crops), per_crop)
        order = self.pack_maps(ids, image_size[None], -1.0)[0].long().tolist()

        processor = self.processor.image_processor
        view = Image.new("RGB", (size + GAP + cols * size, max(size, rows * size)), "white")
        view.paste(to_image(crops[0], processor), (0, 0))
        cells = grid_boxes(0, 0, size // patch, size // patch, patch)
        for k in range(1, len(crops)):
            x0, y0 = size + GAP + (k - 1) % cols * size, (k - 1) // cols * size
            view.paste(to_image(crops[k], processor), (x0, y0))
            cells += grid_boxes(x0, y0, size // patch, size // patch, patch)
        return TokenLayout(view, [cells[i] if i >= 0 else None for i in order])

    # -- benchmarks ----------------------------------------------------------------------------------------

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        """The largest pinpoint is its own best resolution, so the grid is not unpadded; one newline per grid row."""
        vision = hf_config.vision_config
        side = vision.image_size // vision.patch_size
        h, w = max(hf_config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        rows, cols = h // vision.image_size * side, w // vision.image_size * side
        newlines = rows if getattr(hf_config, "use_image_newline_parameter", True) else 0
        return LlavaAdapter.max_visual_tokens(hf_config) + rows * cols + newlines

    def synthetic_image_size(self) -> list[int]:
        """The largest grid pinpoint: the most crops, as for a large photo."""
        return list(max(self.model.config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1]))

    def num_synthetic_visual(self) -> int:
        size = torch.tensor([self.synthetic_image_size()])
        crops = self.crops_per_image(size)[0]
        vision = self.model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + (self.model.config.vision_feature_select_strategy == "full")
        return len(self.pack_maps(torch.zeros(crops, tokens), size, 0.0)[0])

    def synthetic_pixels(self, batch_size: int, generator) -> dict:
        size = self.model.config.vision_config.image_size
        image_sizes = torch.tensor([self.synthetic_image_size()] * batch_size)
        crops = self.crops_per_image(image_sizes[:1])[0]
        pixels = torch.rand(batch_size, crops, 3, size, size, generator=generator) * 2 - 1
        return {"pixel_values": pixels, "image_sizes": image_sizes}

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """LLaVA-1.5's tower and projector per crop, times the crops of the largest pinpoint (the base view and
        its grid). The newline tokens are parameters, computed by nothing."""
        size = hf_config.vision_config.image_size
        h, w = max(hf_config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        return (1 + (h // size) * (w // size)) * super().vision_flops(hf_config)

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab, text=None, vision=None):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        from vtprune.models.tiny import LLAVA_TEMPLATE, clip_vision, llama_text

        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vision = clip_vision(**(vision or {}))
        size, patch = vision["image_size"], vision["patch_size"]
        pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]  # crops of one base image
        config = LlavaNextConfig(
            vision_config=vision, text_config=llama_text(vocab, tokenizer, cls.tiny_text_layers, **(text or {})),
            image_token_index=image_token_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
            image_seq_length=(size // patch) ** 2,
        )
        model = LlavaNextForConditionalGeneration(config).eval()
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
            chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
        )
        return model, processor
