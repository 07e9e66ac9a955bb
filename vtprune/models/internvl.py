"""InternVL3 (``InternVLForConditionalGeneration``): dynamic tiling, an InternViT tower, pixel shuffle, a Qwen2 LLM.

The family questions, answered here; the pruning itself is LLaVA's pre-LLM splice and in-LLM cut (``llava.py``).
What differs from LLaVA:

- **Tiles**: the processor (``GotOcr2ImageProcessorPil``, ``crop_to_patches``) resizes the image to the
  ``columns × rows`` grid of 448 px tiles whose aspect ratio is closest to the image's (at most ``max_patches`` tiles,
  12 on InternVL3), cuts it into those tiles row-major, then appends a **thumbnail** tile, the whole image resized to
  448 px, *after* them; an image that fits one tile has that tile only, no thumbnail. ``pixel_values`` is one flat
  ``[Σ tiles, 3, 448, 448]`` tensor for the batch, the samples' tiles in order.
- **Image tokens**: one contiguous run of ``image_token_id`` (``<IMG_CONTEXT>``) per image, the tiles' tokens one
  after the other in tile order, between ``<img>`` and ``</img>`` (text tokens to vtprune: they stay). A sample's tile
  count is its image tokens over the tokens per tile; ``input_ids == image_token_id`` finds them.
- **Visual tokens**: each tile runs through InternViT (patches + a CLS token), the CLS token is dropped
  (``vision_feature_select_strategy`` ``default``), the 32×32 patch grid is **pixel-shuffled** (``downsample_ratio``
  0.5: every 2×2 patches become one token of 4× the width, 16×16 = 256 tokens per tile), then the projector MLP
  (``multi_modal_projector``). The features of a sample are all its tiles' 256 tokens, in tile order
  (``get_image_features(...).pooler_output`` flattened).
- **Groups** (``groups``, the first column of ``grid``): the whole-image view is group 0 — the thumbnail, or the only
  tile of a one-tile image — and the grid tiles are groups 1..n in their row-major order, so that ``hired`` takes
  the thumbnail for its base view as it takes LLaVA-NeXT's. In token order the thumbnail's group 0 comes *last*.
- **Per-token maps through the model's own pixel shuffle**: the token a patch ends up in, and the order of the four
  patches inside a token's channels, are whatever ``InternVLModel.pixel_shuffle`` makes of them (it works on a
  transposed layout and transposes back). vtprune never re-derives that: every per-patch map (patch row and
  column, CLS saliency) is shaped ``[tiles, side, side, C]`` and sent through that function, exactly like the
  features, so token ``i``'s value is token ``i``'s. ``token_grid`` = (group, row, column) on the tile's 16×16 token
  grid, where a token's row / column is its four source patches' (``min // 2``).
- **Saliency** (``cls_attention``, what ``fastervlm``, ``cls_saliency``, ``adav``, ``visionzip``, ``vispruner`` and
  ``hired`` rank by): the CLS query's attention to the tile's patches in the vision layer producing the used features
  (``vision_feature_layer``, −1: the last of 24), softmax over CLS + patches, mean over heads, the CLS column dropped;
  recomputed eagerly from that layer's ``layernorm_before``, ``q_proj``/``k_proj`` and ``q_norm``/``k_norm`` (identity
  on InternViT-300M) with the layer's scale ``head_dim ** -0.5``, so the tower keeps its fast attention. Then per
  token the **mean over its 2×2 patches** (the per-patch map pixel-shuffled as above), per tile; a sample's scores are
  its tiles' in order. LLaVA's CLS rule, pooled the way the features are merged; not taken from a published InternVL
  port of these methods.
- **Vectors before the projector** (``pre_projector``, ``downsample``'s merge space): the pixel-shuffled tower output,
  ``[256, 4 · 1024]`` per tile, that ``multi_modal_projector`` reads; the projection of a token's own vector is its
  feature. ``downsample`` pools them (over each tile's token grid) and projects.
- **Positions**: plain 1-D positions (Qwen2, no M-RoPE): LLaVA's renumbering of the shortened sequence.
- **Processor**: transformers' ``InternVLProcessor`` requires a video processor, which needs torchvision (not a
  vtprune dependency); the family loads the same processor without its video part (``image_only_processor``).
- **Counts from the config** (``max_visual_tokens``, ``cost``, ``bench``): the largest input is the most grid tiles
  plus the thumbnail, ``(max + 1) · 256`` tokens (13 · 256 = 3328 on InternVL3-8B). The tile limit is the processor's
  (``max_patches``), not in an ``-hf`` model config: vtprune reads ``max_dynamic_patch`` (the original InternVL
  config's name for it) from the model config when present, and otherwise takes 12, the processor's default.
  The tiny model writes its own (4).
- **vtprune show** (``token_layout``): the grid tiles assembled at their places, the thumbnail apart to their right.
  The grid's ``columns × rows`` is not among the model inputs (only the tile count is); of the arrangements of that
  many tiles, the one whose assembled canvas, resized to one tile, is closest to the thumbnail (mean squared
  difference) is drawn — the same picture, so the right one for any image with content (ties → fewest columns).
"""

from __future__ import annotations

import re

import torch
from PIL import Image

from vtprune.errors import ConfigError
from vtprune.flops import encoder_layer_flops
from vtprune.models.base import register_family
from vtprune.models.layout import GAP, TokenLayout, to_image
from vtprune.models.llava import LlavaAdapter, VisualTokens, first_row_attention

#: The named tokens InternVL's processor reads from its tokenizer (``tokenizer.start_image_token``, ...).
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
#: The processor's default tile limit (``GotOcr2ImageProcessorPil.max_patches``, InternVL3's preprocessor config).
DEFAULT_MAX_TILES = 12


def _first(value) -> int:
    """``image_size`` / ``patch_size`` of an InternVL vision config: an int, or a (height, width) pair."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


@register_family
class InternVLAdapter(LlavaAdapter):
    """InternVL3 (InternVLForConditionalGeneration): dynamic tiles + thumbnail, InternViT CLS saliency, pixel shuffle."""

    # Selecting inside the tower (ToMe, FlowCut): pixel shuffle needs the tile's whole patch grid after the tower, and
    # InternViT's layers (layer scale) are not CLIP's: not provided.
    signal_vision_keys = signal_vision_layer_attention = signal_vision_semantic = signal_vision_values = None

    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    model_types = ("internvl",)

    @classmethod
    def load_processor(cls, path):
        return image_only_processor().from_pretrained(path)

    # -- geometry ------------------------------------------------------------------------------------------

    @staticmethod
    def geometry(hf_config) -> tuple[int, int, int]:
        """(tile size in px, patches per tile side, patches per token side: ``1 / downsample_ratio``)."""
        vision = hf_config.vision_config
        size = _first(vision.image_size)
        merge = round(1 / hf_config.downsample_ratio)
        return size, size // _first(vision.patch_size), merge

    @classmethod
    def tokens_per_tile(cls, hf_config) -> int:
        _, side, merge = cls.geometry(hf_config)
        return (side // merge) ** 2

    def tiles_per_sample(self, inputs) -> list[int]:
        """Tiles of each sample's image (grid tiles + thumbnail), from its run of image tokens."""
        per_tile = self.tokens_per_tile(self.model.config)
        counts = (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        if any(c % per_tile for c in counts) or sum(counts) // per_tile != len(inputs["pixel_values"]):
            raise ValueError(f"{counts} image tokens per sample for {len(inputs['pixel_values'])} tiles of "
                             f"{per_tile} tokens")
        return [c // per_tile for c in counts]

    @staticmethod
    def tile_groups(n: int) -> list[int]:
        """Group of each of an image's ``n`` tiles in order: grid tiles 1..n-1, the thumbnail (last) 0; one tile: 0."""
        return [0] if n == 1 else [*range(1, n), 0]

    def shuffle_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """``[tiles, side, side, C]`` per-patch maps through the model's own ``pixel_shuffle``: ``[tiles, N, merge², C]``
        per token (``N`` tokens per tile, in the features' order), its source patches' values."""
        shuffled = self.model.model.pixel_shuffle(maps, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(len(maps), -1, shuffled.shape[-1] // maps.shape[-1], maps.shape[-1])

    def patch_sources(self, device) -> torch.Tensor:
        """``[N, merge², 2]`` (row, column) of the patches merged into each token of a tile, in the features' order."""
        _, side, _ = self.geometry(self.model.config)
        p = torch.arange(side, device=device)
        rows, cols = torch.meshgrid(p, p, indexing="ij")
        return self.shuffle_maps(torch.stack([rows, cols], dim=-1)[None])[0]

    def tile_token_grid(self, device) -> torch.Tensor:
        """``[N, 2]`` (row, column) of each token of a tile on its ``side / merge`` token grid, in the features' order."""
        _, _, merge = self.geometry(self.model.config)
        return self.patch_sources(device).amin(dim=1) // merge

    # -- visual tokens and signals -------------------------------------------------------------------------

    def visual_tokens(self, inputs) -> VisualTokens:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            output_hidden_states=True,
        )
        counts = self.tiles_per_sample(inputs)
        feats = [f.flatten(0, 1) for f in torch.split(out.pooler_output, counts)]
        per_tile = out.pooler_output.shape[1]
        groups = [torch.tensor(self.tile_groups(n), device=f.device).repeat_interleave(per_tile)
                  for n, f in zip(counts, feats)]
        return VisualTokens(feats, groups, out)

    def selected_vision_features(self, visual: VisualTokens) -> torch.Tensor:
        """``[tiles, P, D]`` the tower output ``get_image_features`` reads (``vision_feature_layer``), CLS dropped."""
        cfg = self.model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ConfigError("model: InternVL reads a single vision_feature_layer")
        out = visual.vision
        chosen = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        return chosen[:, 1:] if cfg.vision_feature_select_strategy == "default" else chosen

    def pre_projector(self, inputs, visual: VisualTokens):
        """The pixel-shuffled tower output ``multi_modal_projector`` reads, ``[N_b, merge² · D]`` per sample in the
        features' order: the projection of a token's own vector is its feature."""
        chosen = self.selected_vision_features(visual)
        _, side, _ = self.geometry(self.model.config)
        shuffled = self.shuffle_maps(chosen.reshape(len(chosen), side, side, -1)).flatten(2)  # [tiles, N, merge²·D]
        counts = self.tiles_per_sample(inputs)
        return [v.flatten(0, 1) for v in torch.split(shuffled, counts)], self.model.model.multi_modal_projector

    def token_grid(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """(group, row, column) of each visual token on its tile's token grid (16×16 on InternVL3), features' order."""
        device = visual.features[0].device
        tile = self.tile_token_grid(device)
        out = []
        for groups in visual.groups:
            cells = tile.repeat(len(groups) // len(tile), 1)
            out.append(torch.cat([groups[:, None], cells], dim=1))
        return out

    def tile_cls_attention(self, vision_output) -> torch.Tensor:
        """``[tiles, P]`` CLS→patch attention in the vision layer producing the used features, head mean, CLS column
        dropped; patches row-major (module docstring). Recomputed from the layer's own norm and q/k projections."""
        index, layer_input = self.feature_layer(vision_output)
        layer = self.model.model.vision_tower.encoder.layer[index]
        attn = layer.attention
        x = layer.layernorm_before(layer_input)
        return first_row_attention(attn.q_norm(attn.q_proj(x[:, :1])), attn.k_norm(attn.k_proj(x)), attn.num_heads,
                                   attn.head_dim, attn.scale)[:, 1:]

    def cls_attention(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """Per visual token the mean CLS attention of its merged patches, tiles in order (module docstring)."""
        return self.pack_saliency(inputs, self.tile_cls_attention(visual.vision))

    def pack_saliency(self, inputs, crop_map: torch.Tensor) -> list[torch.Tensor]:
        """A per-patch map of each tile as per-token maps: the mean over the patches pixel shuffle merges."""
        _, side, _ = self.geometry(self.model.config)
        pooled = self.shuffle_maps(crop_map.reshape(len(crop_map), side, side, 1))[..., 0].mean(dim=-1)  # [tiles, N]
        return [s.flatten() for s in torch.split(pooled, self.tiles_per_sample(inputs))]

    def vision_layer_qk(self, index: int, layer_input: torch.Tensor):
        """InternViT's layer ``index``: its own norm, q/k projections and q/k norms."""
        layer = self.model.model.vision_tower.encoder.layer[index]
        attn = layer.attention
        x = layer.layernorm_before(layer_input)
        return attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x)), attn.num_heads, attn.head_dim, attn.scale

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    @staticmethod
    def tile_arrangement(tiles: torch.Tensor) -> tuple[int, int]:
        """(columns, rows) of an image's grid tiles: the arrangement whose canvas, resized to one tile, is closest to
        the thumbnail (the last tile); ties → the fewest columns. One tile: (1, 1)."""
        import torch.nn.functional as F

        n = len(tiles)
        if n <= 2:
            return 1, 1
        grid, thumbnail = tiles[: n - 1].float(), tiles[n - 1].float()
        channels, size = grid.shape[1], grid.shape[-1]
        best, best_error = (1, n - 1), None
        for cols in (c for c in range(1, n) if (n - 1) % c == 0):
            rows = (n - 1) // cols
            canvas = grid.reshape(rows, cols, channels, size, size).permute(2, 0, 3, 1, 4)
            canvas = canvas.reshape(1, channels, rows * size, cols * size)
            small = F.interpolate(canvas, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            error = float((small - thumbnail).pow(2).mean())
            if best_error is None or error < best_error:
                best, best_error = (cols, rows), error
        return best

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """InternVL: the grid tiles assembled (``tile_arrangement``), the thumbnail apart to their right; one box per
        token on its 2×2 patch cell of its tile, in the features' order (``tile_token_grid``)."""
        cfg = self.model.config
        size, side, merge = self.geometry(cfg)
        cell = size // side * merge
        counts = self.tiles_per_sample(inputs)
        start = sum(counts[:b])
        tiles = inputs["pixel_values"][start : start + counts[b]]
        cols, rows = self.tile_arrangement(tiles)
        n = len(tiles)
        processor = self.processor.image_processor
        width = cols * size + (GAP + size if n > 1 else 0)
        view = Image.new("RGB", (width, max(rows, 1) * size), "white")
        grid = self.tile_token_grid(tiles.device).tolist()
        boxes = []
        for t, tile in enumerate(tiles):
            if n > 1 and t == n - 1:  # the thumbnail
                x0, y0 = cols * size + GAP, 0
            else:
                x0, y0 = t % cols * size, t // cols * size
            view.paste(to_image(tile, processor), (x0, y0))
            boxes += [(x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell) for r, c in grid]
        return TokenLayout(view, boxes)

    # -- config-only counts and benchmarks -----------------------------------------------------------------

    @classmethod
    def max_tiles(cls, hf_config) -> int:
        """Tiles of the largest input: the most grid tiles (``max_dynamic_patch``, else 12) and the thumbnail."""
        grid = int(getattr(hf_config, "max_dynamic_patch", None) or DEFAULT_MAX_TILES)
        return grid + 1 if grid > 1 else 1

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        return cls.max_tiles(hf_config) * cls.tokens_per_tile(hf_config)

    def visual_tokens_for_size(self, height: int, width: int) -> int:
        """The processor's count less ``<img>`` and ``</img>``, which are text tokens to vtprune."""
        return super().visual_tokens_for_size(height, width) - 2

    def num_synthetic_visual(self) -> int:
        """The synthetic image: the most grid tiles and the thumbnail."""
        return self.max_visual_tokens(self.model.config)

    def synthetic_pixels(self, batch_size: int, generator) -> dict:
        size = self.geometry(self.model.config)[0]
        tiles = batch_size * self.max_tiles(self.model.config)
        return {"pixel_values": torch.rand(tiles, 3, size, size, generator=generator) * 2 - 1}

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """Every tile of the synthetic image through InternViT (patch embedding; patches + CLS through every encoder
        layer up to the one whose features are used: all 24 with ``vision_feature_layer`` −1), then the projector MLP
        over the pixel-shuffled tokens (``merge² · D_vision → D_text → D_text``). The shuffle computes nothing."""
        vision, hidden = hf_config.vision_config, hf_config.text_config.hidden_size
        size, side, merge = cls.geometry(hf_config)
        patch, patches, tokens = size // side, side * side, cls.tokens_per_tile(hf_config)
        layers = hf_config.vision_feature_layer % (vision.num_hidden_layers + 1)  # hidden_states[0] is the embedding
        embed = 2 * patches * vision.num_channels * patch**2 * vision.hidden_size
        tower = embed + layers * encoder_layer_flops(patches + 1, vision.hidden_size, vision.intermediate_size)
        projector = 2 * tokens * (merge**2 * vision.hidden_size * hidden + hidden * hidden)
        return cls.max_tiles(hf_config) * (tower + projector)

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab):
        """InternVL3: an InternViT tower (CLS token, features of the last layer, ``default`` strategy: CLS dropped) on
        64 px tiles of 8 px patches, pixel shuffle 0.5 (8x8 patches -> 4x4 = 16 tokens per tile), a Qwen2 language model,
        and the processor's dynamic tiling with at most 4 tiles plus a thumbnail tile after them (none for one tile).

        Width x height -> tiles -> visual tokens: 40x40 -> 1x1 (no thumbnail) -> 16, 30x70 -> 1 column x 2 rows + thumbnail
        -> 48, 90x40 -> 2 columns x 1 row + thumbnail -> 48, 100x100 -> 2x2 + thumbnail -> 80.
        The tokenizer is LLaVA's BPE plus InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` (the image token), ``<video>``
        and Qwen's ``<|im_start|>`` / ``<|im_end|>`` turn markers, added here only (so the other families' tokenizers stay
        as they are), named like InternVL3's: no BOS, the turn ends with ``<|im_end|>``, the image tokens' names for the
        processor. The CLS token and the position embeddings, zeros in a fresh init, are drawn at random so that the CLS
        attention is not uniform (trained checkpoints have both).
        """
        from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tokenizer.add_tokens([*INTERNVL_TOKENS.values(), "<|im_start|>", "<|im_end|>"], special_tokens=True)
        # The named tokens the InternVL processor reads (tokenizer.start_image_token, .context_image_token_id, ...).
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer, padding_side="left", eos_token="<|im_end|>", pad_token="<pad>",
            unk_token="<unk>", extra_special_tokens=dict(INTERNVL_TOKENS),
        )
        vocab = len(tokenizer)
        max_tiles = 4
        config = InternVLConfig(
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=64,
                patch_size=8, attention_bias=True, use_mean_pooling=True, initializer_range=0.2,
            ),
            text_config=dict(
                model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                num_hidden_layers=cls.tiny_text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
            image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        config.max_dynamic_patch = max_tiles  # the processor's max_patches, for config-only counts (vtprune.models.internvl)
        model = InternVLForConditionalGeneration(config).eval()
        with torch.no_grad():
            embeddings = model.model.vision_tower.embeddings
            embeddings.cls_token.normal_(std=0.5)
            embeddings.position_embeddings.normal_(std=0.5)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )
        processor = image_only_processor()(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16, chat_template=_INTERNVL_TEMPLATE,
        )
        return model, processor


def image_only_processor():
    """``InternVLProcessor`` without its video processor, for images only.

    transformers' ``InternVLProcessor`` requires a video processor, and InternVL's video processor needs torchvision:
    without it the stock class can neither be built nor loaded. The sub-processors are read from ``__init__``'s
    signature, so this subclass drops the video argument and sets the attributes the stock ``__init__`` sets (the
    image tokens' names from the tokenizer, InternVL's own names where the tokenizer has none); it keeps the class
    name, so a saved ``processor_config.json`` names the stock class. ``from_pretrained`` on it loads a stock
    InternVL checkpoint's tokenizer, image processor and ``image_seq_length``.
    """
    from transformers import InternVLProcessor as Stock
    from transformers.processing_utils import ProcessorMixin

    class InternVLProcessor(Stock):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            names = {key: getattr(tokenizer, key, None) or value for key, value in INTERNVL_TOKENS.items()}
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = names["start_image_token"], names["end_image_token"]
            self.image_token, self.video_token = names["context_image_token"], names["video_token"]
            self.start_image_token_id = tokenizer.convert_tokens_to_ids(self.start_image_token)
            self.end_image_token_id = tokenizer.convert_tokens_to_ids(self.end_image_token)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return InternVLProcessor


# InternVL3's chat format (Qwen2.5's turns, the image as <IMG_CONTEXT> on its own line), no system prompt.
_INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
