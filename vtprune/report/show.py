"""Which visual tokens were kept, drawn on the image the model saw (``vtprune show``).

A family's *token layout* maps each visual-token index (the index space of ``GenerationResult.kept``) to a
patch box on the processor's view of the image (resized / padded / cropped, de-normalised back to pixels),
or to None for tokens without a patch (Mllama's per-tile CLS, LLaVA-NeXT's row newlines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from PIL import Image, ImageDraw, ImageFont

from vtprune.errors import VtpruneError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the layout image's pixels, x1/y1 exclusive
KEPT_OUTLINE = (255, 210, 0)
DIM = 0.3  # pruned patches keep this fraction of their brightness
GAP = 8


@dataclass
class TokenLayout:
    image: Image.Image  # the processor's view, crops / tiles assembled
    boxes: list[Box | None]  # one per visual token, in the model's own token order


@dataclass
class Panel:
    strategy: str
    keep_ratio: float
    kept: list[int]
    num_visual: int

    @property
    def title(self) -> str:
        ratio = "unpruned" if self.strategy == "none" else f"@ {self.keep_ratio:g}"
        return f"{self.strategy} {ratio}: kept {len(self.kept)}/{self.num_visual}"


def _to_image(pixels, image_processor) -> Image.Image:
    """A normalised ``[3, H, W]`` tensor back to the RGB pixels the processor produced."""
    import numpy as np

    x = pixels.detach().float().cpu().numpy()
    if getattr(image_processor, "do_normalize", True):
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / image_processor.rescale_factor
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _grid(x0: int, y0: int, rows: int, cols: int, patch: int) -> list[Box]:
    return [(x0 + c * patch, y0 + r * patch, x0 + (c + 1) * patch, y0 + (r + 1) * patch)
            for r in range(rows) for c in range(cols)]


def _llava_layout(adapter, inputs, b: int) -> TokenLayout:
    """LLaVA-1.5: one crop; patch tokens row-major; strategy 'full' keeps CLS first."""
    cfg = adapter.model.config
    patch = cfg.vision_config.patch_size
    view = _to_image(inputs["pixel_values"][b], adapter.processor.image_processor)
    boxes = _grid(0, 0, view.height // patch, view.width // patch, patch)
    if cfg.vision_feature_select_strategy == "full":
        boxes = [None, *boxes]
    return TokenLayout(view, boxes)


def _llava_next_layout(adapter, inputs, b: int) -> TokenLayout:
    """LLaVA-NeXT: base view, then the anyres crops assembled, unpadded, with a newline token per row.

    The order comes from running the model's own ``pack_image_features`` on token ids instead of features,
    so unpad and newline placement are exactly the model's.
    """
    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, get_anyres_image_grid_shape

    cfg = adapter.model.config
    size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    per_crop = (size // patch) ** 2
    image_size = inputs["image_sizes"][b]
    rows, cols = get_anyres_image_grid_shape(image_size.tolist(), cfg.image_grid_pinpoints, size)
    crops = inputs["pixel_values"][b][: 1 + rows * cols]
    ids = torch.arange(len(crops) * per_crop, dtype=torch.float32).view(len(crops), per_crop, 1)
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=cfg), [ids], image_size[None], cfg.vision_feature_select_strategy,
        image_newline=torch.tensor([-1.0]),
    )
    order = packed[0][:, 0].long().tolist()

    processor = adapter.processor.image_processor
    view = Image.new("RGB", (size + GAP + cols * size, max(size, rows * size)), "white")
    view.paste(_to_image(crops[0], processor), (0, 0))
    cells = _grid(0, 0, size // patch, size // patch, patch)
    for k in range(1, len(crops)):
        x0, y0 = size + GAP + (k - 1) % cols * size, (k - 1) // cols * size
        view.paste(_to_image(crops[k], processor), (x0, y0))
        cells += _grid(x0, y0, size // patch, size // patch, patch)
    return TokenLayout(view, [cells[i] if i >= 0 else None for i in order])


def _mllama_layout(adapter, inputs, b: int) -> TokenLayout:
    """Mllama: the padded canvas split into tiles row-major; per tile a CLS token, then its patches row-major.

    Empty (padding) tiles come last and are no candidates, so they have no entries here.
    """
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    cfg = adapter.model.config.vision_config
    size, patch = cfg.image_size, cfg.patch_size
    processor = adapter.processor.image_processor
    ratio_id = int(inputs["aspect_ratio_ids"][b][0])
    rows, cols = get_all_supported_aspect_ratios(processor.max_image_tiles)[ratio_id - 1]
    tiles = inputs["pixel_values"][b][0][: rows * cols]
    view = Image.new("RGB", (cols * size, rows * size))
    boxes: list[Box | None] = []
    for t, tile in enumerate(tiles):
        x0, y0 = t % cols * size, t // cols * size
        view.paste(_to_image(tile, processor), (x0, y0))
        boxes += [None, *_grid(x0, y0, size // patch, size // patch, patch)]
    return TokenLayout(view, boxes)


def _qwen2_5_vl_layout(adapter, inputs, b: int) -> TokenLayout:
    """Qwen2.5-VL: the image at the size the processor resized it to, one box per merged ``merge × merge`` patch
    cell, in raster order of the merged grid (the order of its image tokens).

    ``pixel_values`` is one flat ``[Σ patches, C·T·P·P]`` tensor for the batch; image ``b``'s rows follow the
    earlier images' ``grid_t·grid_h·grid_w`` (one image per sample, as ``prepare`` makes them). The processor's
    patchify orders each image's rows as ``(grid_t, grid_h/merge, grid_w/merge, merge, merge)`` and each row as
    ``(C, T, P, P)``, the T frames of a still image being copies; this undoes it for the first frame.
    """
    processor = adapter.processor.image_processor
    vision = adapter.model.config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    temporal, channels = vision.temporal_patch_size, vision.in_channels
    grids = inputs["image_grid_thw"].tolist()
    t, h, w = grids[b]
    start = sum(gt * gh * gw for gt, gh, gw in grids[:b])
    rows = inputs["pixel_values"][start : start + t * h * w]
    cells = rows.reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)[0, ..., 0, :, :]
    # (h/m, w/m, m, m, C, P, P) -> (C, h/m, m, P, w/m, m, P) -> [C, h·P, w·P]
    pixels = cells.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)
    view = _to_image(pixels, processor)
    return TokenLayout(view, _grid(0, 0, h // merge, w // merge, merge * patch))


LAYOUTS = {"llava": _llava_layout, "llava_next": _llava_next_layout, "mllama": _mllama_layout,
           "qwen2_5_vl": _qwen2_5_vl_layout}


def token_layout(adapter, inputs, sample: int = 0) -> TokenLayout:
    if adapter.family not in LAYOUTS:
        raise VtpruneError(f"show: no token layout for model family '{adapter.family}' (allowed: {', '.join(LAYOUTS)})")
    return LAYOUTS[adapter.family](adapter, inputs, sample)


def render_panel(layout: TokenLayout, panel: Panel, scale: int) -> tuple[Image.Image, list[Box]]:
    """The view with pruned patches dimmed and kept ones outlined, under a title; returns the kept boxes drawn
    (panel coordinates)."""
    if len(layout.boxes) != panel.num_visual:
        raise VtpruneError(f"show: the layout has {len(layout.boxes)} visual tokens but the model reported "
                           f"{panel.num_visual}: the token layout of this family does not match the adapter")
    full = layout.image.resize((layout.image.width * scale, layout.image.height * scale), Image.NEAREST)
    shown = full.point(lambda v: int(v * DIM))
    title_h = 24
    canvas = Image.new("RGB", (max(full.width, 200), full.height + title_h), "white")
    drawn = []
    draw = ImageDraw.Draw(canvas)
    for i in panel.kept:
        box = layout.boxes[i]
        if box is None:
            continue
        box = tuple(v * scale for v in box)
        shown.paste(full.crop(box), box[:2])
        drawn.append((box[0], box[1] + title_h, box[2], box[3] + title_h))
    canvas.paste(shown, (0, title_h))
    width = max(1, scale // 4)
    for x0, y0, x1, y1 in drawn:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=KEPT_OUTLINE, width=width)
    without_patch = sum(layout.boxes[i] is None for i in panel.kept)
    title = panel.title + (f" (+{without_patch} without patch)" if without_patch else "")
    draw.text((4, 5), title, fill="black", font=ImageFont.load_default())
    return canvas, drawn


def draw_panels(layout: TokenLayout, panels: list[Panel]) -> tuple[Image.Image, list[list[Box]]]:
    """All panels side by side; the kept boxes of each in the returned image's coordinates."""
    scale = max(1, math.ceil(320 / max(layout.image.size)))  # tiny models see 32 px: enlarge, pixel-exact
    rendered = [render_panel(layout, p, scale) for p in panels]
    out = Image.new("RGB", (sum(r.width for r, _ in rendered) + GAP * (len(rendered) - 1),
                            max(r.height for r, _ in rendered)), "white")
    boxes, x = [], 0
    for image, drawn in rendered:
        out.paste(image, (x, 0))
        boxes.append([(x0 + x, y0, x1 + x, y1) for x0, y0, x1, y1 in drawn])
        x += image.width + GAP
    return out, boxes


def show(pipe, image, question: str, strategies: list[str] | None = None, keep_ratio: float | None = None):
    """Run each strategy once on one image (one model load) and draw what it kept. Returns (image, panels, boxes)."""
    from vtprune.api import _as_images

    image = _as_images([image])[0]
    layout = token_layout(pipe.adapter, pipe.prepare([image], [question]))
    panels = []
    for strategy in strategies or [pipe.config.pruning.strategy]:
        # The config's own strategy keeps its options; another strategy runs with its defaults.
        run = pipe.with_pruning(None if strategy == pipe.config.pruning.strategy else strategy, keep_ratio)
        # One new token is enough: every strategy has selected by the end of prefill.
        out = run.generate([image], [question], max_new_tokens=1)[0]
        panels.append(Panel(strategy, run.plan.keep_ratio, out.kept, out.num_visual))
    drawing, boxes = draw_panels(layout, panels)
    return drawing, panels, boxes
