"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP tower.

The family questions, answered here; the pruning itself is LLaVA's pre-LLM splice and in-LLM cut (``llava.py``)
and most of the layout code is LLaVA-NeXT's (``llava_next.py``). What differs from LLaVA-NeXT:

- **Layout**: base view (one crop of the whole image), then the high-resolution crops stitched into one grid,
  unpadded to the image's aspect ratio, then — new in OneVision — *bilinearly downsampled* when the unpadded grid
  holds more than about ``max`` crops' worth of patches (``vision_aspect_ratio`` ``anyres_max_<max>``, 9 on the 7B
  model: ``ratio = sqrt(h·w / (max · side²)) > 1.1`` shrinks the grid by ``ratio``), and an ``image_newline``
  token closing every grid row. As on LLaVA-NeXT every per-token map (saliency, crop ids, patch coordinates, the
  vectors before the projector) goes through the model's own ``pack_image_features`` — unpad, interpolation and
  newlines included — so token i's value is token i's. A downsampled token is a bilinear blend of up to four
  patches; its crop and patch (``groups``, ``grid``, ``show``) are those of the patch nearest the point it samples,
  found by packing the stitched grid's row and column coordinates (a linear map, which bilinear interpolation
  reproduces exactly).
- **No CLS token** (SigLIP, ``vision_feature_select_strategy`` ``full``): every visual token is a patch (or a
  newline). The saliency signal ``cls_attention`` (what ``fastervlm``, ``cls_saliency``, ``adav``, ``visionzip``
  and ``vispruner`` rank by) is here the attention each patch *receives* inside the vision layer whose output the
  projector reads (``vision_feature_layer``, −1: the last of the 26 layers on the 7B model): softmax over the
  crop's patches (eager formula, recomputed from that layer's ``layer_norm1``/``q_proj``/``k_proj`` so the tower
  keeps its fast attention), averaged over heads and over query patches, per crop; then packed like the features
  (interpolated with them where the grid is downsampled), newline tokens 0. Each crop's scores sum to 1.
  vtprune's definition, as on Qwen2.5-VL; not taken from a published OneVision port of these methods.
- **Vectors before the projector** (``pre_projector``, ``downsample``'s merge space): the SigLIP outputs packed
  like the features. Where the grid is downsampled, the model interpolates *after* the projector, so the
  projection of an interpolated vision vector is close to, not equal to, that token's feature (the projector is
  not linear); elsewhere it is equal, as on LLaVA-NeXT.
- **Processor**: transformers' ``LlavaOnevisionProcessor`` requires a video processor, which needs torchvision (not
  a vtprune dependency); the family loads the same processor without its video part (``image_only_processor``).
- **Counts from the config** (``max_visual_tokens``, ``cost``, ``bench``): the image of the grid pinpoint that gives
  the most visual tokens, which with downsampling is not the largest pinpoint: on the 7B model 1920×768 px
  (5×2 crops, 135×54 patches, ratio 1.05 so not downsampled) gives 729 + 135·55 = 8154 tokens, while
  2304×2304 (6×6 crops) is downsampled to 81×81 and gives 729 + 81·82 = 7371.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vtprune.flops import encoder_layer_flops
from vtprune.models.base import register_family
from vtprune.models.layout import GAP, TokenLayout, grid_boxes, to_image
from vtprune.models.llava import VisualTokens, received_attention
from vtprune.models.llava_next import LlavaNextAdapter


@register_family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): anyres crops, unpad, downsampling, newlines followed.

    Saliency (``cls_attention``) is the attention each SigLIP patch receives: the tower has no CLS token."""

    signal_vision_cls_attention = None  # SigLIP has no CLS token

    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    model_types = ("llava_onevision",)
    video_processor = "LlavaOnevisionVideoProcessor"

    @classmethod
    def load_processor(cls, path):
        return image_only_processor().from_pretrained(path)

    @property
    def patch_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    # -- layout --------------------------------------------------------------------------------------------

    def crops_per_image(self, image_sizes) -> list[int]:
        """Base view + high-resolution crops of each image (one image per sample, as ``get_image_features``
        counts them when ``batch_num_images`` is absent or all ones)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            for size in image_sizes
        ]

    def crop_grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of the high-resolution crops of one image."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        cfg = self.model.config
        size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
        return get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def pack_maps(self, maps: torch.Tensor, image_sizes, newline_value: float) -> list[torch.Tensor]:
        """Pack a per-crop map ``[crops, P]`` (all images' crops in order) exactly like the features: ``[N_b]`` per
        image — unpadded, downsampled (bilinear, where the model downsamples) and with the newline value per row."""
        per_image = torch.split(maps[..., None], self.crops_per_image(image_sizes), dim=0)
        newline = maps.new_full((1,), newline_value)
        packed, _ = self.model.model.pack_image_features(
            list(per_image), image_sizes, image_newline=newline, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        )
        return [p[:, 0] for p in packed]

    def stitched_coordinates(self, image_sizes, device) -> list[torch.Tensor]:
        """``[N_b, 3]`` float per image: ``crop_coordinates`` packed like the features — after downsampling the exact
        point each token samples; newline tokens -1."""
        per_image = [crop_coordinates(n, self.crop_grid(size)[1], self.patch_side, device)
                     for size, n in zip(image_sizes, self.crops_per_image(image_sizes))]
        coords = torch.cat(per_image)
        maps = [self.pack_maps(coords[..., c].contiguous(), image_sizes, -1.0) for c in range(3)]
        return [torch.stack(m, dim=1) for m in zip(*maps)]

    def patch_sources(self, image_sizes, device) -> list[torch.Tensor]:
        """``[N_b, 3]`` long (crop, row, column) of the patch behind each visual token (``sources_of``)."""
        return [sources_of(coords, self.crop_grid(size)[1], self.patch_side)
                for size, coords in zip(image_sizes, self.stitched_coordinates(image_sizes, device))]

    def visual_tokens(self, inputs) -> VisualTokens:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            output_hidden_states=True,
        )
        feats = list(out.pooler_output)
        # Group = crop id of the token's patch: base view 0, crops 1..n; newline tokens form their own last group
        # (n + 1), as on LLaVA-NeXT.
        counts = self.crops_per_image(inputs["image_sizes"])
        sources = self.patch_sources(inputs["image_sizes"], feats[0].device)
        groups = [torch.where(s[:, 0] < 0, n, s[:, 0]) for s, n in zip(sources, counts)]
        return VisualTokens(feats, groups, out)

    def pre_projector(self, inputs, visual: VisualTokens):
        """The SigLIP outputs the projector reads, packed like the features (downsampled where they are); a newline
        token has no such vector (zeros: never merged). See the module docstring for the downsampled tokens."""
        chosen = self.selected_vision_features(visual)
        per_image = torch.split(chosen, self.crops_per_image(inputs["image_sizes"]), dim=0)
        packed, _ = self.model.model.pack_image_features(
            list(per_image), inputs["image_sizes"], image_newline=chosen.new_zeros(chosen.shape[-1]),
            vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return list(packed), self.model.model.multi_modal_projector

    def token_grid(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """(crop, row, column) of each token's patch on its crop's own patch grid (``patch_sources``); newline
        tokens have no patch (-1)."""
        return self.patch_sources(inputs["image_sizes"], visual.features[0].device)

    # -- saliency ------------------------------------------------------------------------------------------

    def crop_cls_attention(self, vision_output) -> torch.Tensor:
        """``[crops, P]`` attention each patch receives in the vision layer producing the used features: softmax over
        the crop's patches, mean over heads and query patches (SigLIP has no CLS token; module docstring).

        Recomputed from that layer's ``layer_norm1``/``q_proj``/``k_proj``, one crop at a time (a crop's
        ``[heads, P, P]`` is 34 MB in float32 on the 7B model)."""
        index, layer_input = self.feature_layer(vision_output)
        q, k, heads, head_dim, scale = self.vision_layer_qk(index, layer_input)
        return torch.stack([received_attention(qc, kc, heads, head_dim, scale) for qc, kc in zip(q, k)])

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """LLaVA-OneVision: base view, then the anyres crops assembled (touching, as the model stitches them); one box
        per token on the patch it samples — a downsampled token's box is the ``ratio × ratio`` patch area around
        its sampling point; newline tokens have none. Order and geometry come from ``stitched_coordinates``."""
        cfg = self.model.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        side = size // patch
        image_size = inputs["image_sizes"][b]
        rows, cols = self.crop_grid(image_size)
        crops = inputs["pixel_values"][b][: 1 + rows * cols]
        coords = self.stitched_coordinates(image_size[None], crops.device)[0].tolist()

        processor = self.processor.image_processor
        view = Image.new("RGB", (size + GAP + cols * size, max(size, rows * size)), "white")
        view.paste(to_image(crops[0], processor), (0, 0))
        for k in range(1, len(crops)):
            view.paste(to_image(crops[k], processor), (size + GAP + (k - 1) % cols * size, (k - 1) // cols * size))
        base = grid_boxes(0, 0, side, side, patch)
        grid = [(r, c) for kind, r, c in coords if kind >= 0.5]
        # The spacing of the sampled points: 1 patch, or the downsampling ratio (rows and columns apart).
        row_step, col_step = (_step(sorted({v[i] for v in grid})) for i in (0, 1))
        boxes = []
        for kind, r, c in coords:
            if kind < 0:
                boxes.append(None)
            elif kind < 0.5:
                boxes.append(base[round(r) * side + round(c)])
            else:
                y0, y1 = ((r + 0.5 - row_step / 2) * patch, (r + 0.5 + row_step / 2) * patch)
                x0, x1 = ((c + 0.5 - col_step / 2) * patch, (c + 0.5 + col_step / 2) * patch)
                boxes.append((size + GAP + round(x0), round(y0), size + GAP + round(x1), round(y1)))
        return TokenLayout(view, boxes)

    # -- config-only counts and benchmarks -----------------------------------------------------------------

    @classmethod
    def visual_tokens_at(cls, hf_config, height: int, width: int) -> int:
        """Visual tokens of an image of exactly one grid pinpoint's size (so nothing is unpadded): the base view,
        then the crops' grid, downsampled as ``pack_image_features`` does, with a newline per row."""
        vision = hf_config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = height // vision.image_size * side, width // vision.image_size * side
        max_crops = int(hf_config.vision_aspect_ratio.removeprefix("anyres_max_"))  # "anyres_max_9" -> 9
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return side * side + rows * (cols + 1)

    @classmethod
    def synthetic_pinpoint(cls, hf_config) -> list[int]:
        """The grid pinpoint whose image gives the most visual tokens (ties: the most crops, then the first)."""
        return list(max(hf_config.image_grid_pinpoints,
                        key=lambda hw: (cls.visual_tokens_at(hf_config, *hw), hw[0] * hw[1])))

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        return cls.visual_tokens_at(hf_config, *cls.synthetic_pinpoint(hf_config))

    def synthetic_image_size(self) -> list[int]:
        """The pinpoint with the most visual tokens (not the largest: large grids are downsampled)."""
        return self.synthetic_pinpoint(self.model.config)

    def num_synthetic_visual(self) -> int:
        size = torch.tensor([self.synthetic_image_size()])
        crops = self.crops_per_image(size)[0]
        return len(self.pack_maps(torch.zeros(crops, self.patch_side**2), size, 0.0)[0])

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """The synthetic image's crops (base view + grid) through the SigLIP tower (patch embedding; every encoder
        layer up to the one whose output is used, patches only: no CLS) and the projector MLP over every patch.
        The downsampling and the newline tokens compute next to nothing."""
        vision, hidden = hf_config.vision_config, hf_config.text_config.hidden_size
        patches = (vision.image_size // vision.patch_size) ** 2
        feature_layers = hf_config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        layers = max(i % (vision.num_hidden_layers + 1) for i in feature_layers)  # hidden_states[0] is the embedding
        embed = 2 * patches * vision.num_channels * vision.patch_size**2 * vision.hidden_size
        tower = embed + layers * encoder_layer_flops(patches, vision.hidden_size, vision.intermediate_size)
        projector = 2 * patches * (len(feature_layers) * vision.hidden_size * hidden + hidden * hidden)
        h, w = cls.synthetic_pinpoint(hf_config)
        crops = 1 + (h // vision.image_size) * (w // vision.image_size)
        return crops * (tower + projector)

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab, text=None, vision=None):
        """LLaVA-OneVision: a SigLIP tower (no CLS token, features of the last layer, strategy ``full``), a Qwen2 language
        model, anyres crops of 32 px with a newline per grid row, and the grid downsampled beyond two crops' worth of
        patches (``anyres_max_2``, the 7B model's ``anyres_max_9`` scaled to 2x2 grids). ``text`` / ``vision``
        override entries of the two configs (the micro model); the grid pinpoints follow the crop size.

        Width x height -> visual tokens: 30x70 -> 56 (2x1 crops, 8x4 patches, not downsampled), 90x40 -> 52 (1x2 crops,
        unpadded), 80x50 -> 44 (2x2 crops unpadded to 6x8 patches, downsampled to 4x6), 40x40 -> 46 (8x8 to 5x5).
        The tokenizer is LLaVA's plus a ``<video>`` token (the model's video token id), added here only.
        """
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        from vtprune.models.tiny import LLAVA_TEMPLATE

        tokenizer.add_tokens(["<video>"], special_tokens=True)
        vocab = len(tokenizer)
        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False,
        ) | (vision or {})
        size, patch = vision["image_size"], vision["patch_size"]
        pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=dict(
                model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                num_hidden_layers=cls.tiny_text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            ) | (text or {}),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
            vision_aspect_ratio="anyres_max_2",
        )
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=pinpoints)
        processor = image_only_processor()(
            image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(size // patch) ** 2,
            vision_feature_select_strategy="full",
            chat_template=LLAVA_TEMPLATE, vision_aspect_ratio="anyres_max_2",
        )
        return model, processor


def crop_coordinates(crops: int, grid_cols: int, side: int, device=None) -> torch.Tensor:
    """``[crops, P, 3]`` float of one image's crops before packing: (0 base view / 1 crop, row, column) of every
    patch — the base view's own row and column, a crop's on the stitched grid (``rows·side × cols·side``). Packed
    like the features (bilinear where the grid is downsampled: a linear map survives it exactly), they give the point
    each visual token samples (the HF adapter and vtprune's vLLM model alike)."""
    p = torch.arange(side * side, dtype=torch.float32, device=device)
    crop = torch.arange(crops - 1, dtype=torch.float32, device=device)[:, None]
    kind = torch.cat([p.new_zeros(1, side * side), p.new_ones(crops - 1, side * side)])
    rows = torch.cat([(p // side)[None], (crop // grid_cols) * side + p // side])
    cols = torch.cat([(p % side)[None], (crop % grid_cols) * side + p % side])
    return torch.stack([kind, rows, cols], dim=-1)


def sources_of(coords: torch.Tensor, grid_cols: int, side: int) -> torch.Tensor:
    """``[N, 3]`` long (crop, row, column) of the patch behind each visual token, from its packed coordinates
    (``crop_coordinates``) — for a downsampled token, the patch nearest the point it samples; crop 0 is the base view,
    crops 1..n the grid's row-major; -1 on newlines (coordinates -1)."""
    line = coords[:, 0] < 0
    base = coords[:, 0] < 0.5
    r, c = coords[:, 1].round().long(), coords[:, 2].round().long()
    crop = torch.where(base, 0, 1 + (r // side) * grid_cols + c // side)
    row, col = torch.where(base, r, r % side), torch.where(base, c, c % side)
    return torch.where(line[:, None], -1, torch.stack([crop, row, col], dim=1))


def _step(values: list[float]) -> float:
    """The spacing of evenly spaced sampling coordinates (1 patch when there is only one)."""
    return values[1] - values[0] if len(values) > 1 else 1.0


def image_only_processor():
    """``LlavaOnevisionProcessor`` without its video processor, for images only.

    transformers' ``LlavaOnevisionProcessor`` requires a video processor, which needs torchvision: without it the
    stock class can neither be built nor loaded. The sub-processors are read from ``__init__``'s signature, so this
    subclass drops the video argument and sets the same attributes the stock ``__init__`` sets; it keeps the class
    name, so a saved ``processor_config.json`` names the stock class. ``from_pretrained`` on it loads a stock
    LLaVA-OneVision checkpoint's tokenizer and image processor (and its ``num_image_tokens``,
    ``vision_feature_select_strategy`` and ``vision_aspect_ratio``).
    """
    from transformers import LlavaOnevisionProcessor as Stock
    from transformers.processing_utils import ProcessorMixin

    class LlavaOnevisionProcessor(Stock):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", None) or image_token
            self.video_token = getattr(tokenizer, "video_token", None) or video_token
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return LlavaOnevisionProcessor
