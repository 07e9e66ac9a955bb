"""Which visual tokens were kept, drawn on the image the model saw (``vtprune show``).

Each family answers where its tokens are (``Adapter.token_layout``, ``vtprune.models.layout``): a patch box per
visual-token index on the processor's view of the image, or None for tokens without a patch; this module draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from vtprune.errors import VtpruneError
from vtprune.models.layout import GAP, Box, TokenLayout

KEPT_OUTLINE = (255, 210, 0)
DIM = 0.3  # pruned patches keep this fraction of their brightness


@dataclass
class Panel:
    strategy: str
    keep_ratio: float
    kept: list[int]
    num_visual: int
    merged: int = 0  # of the kept slots, those carrying a merged token (outlined like the others)

    @property
    def title(self) -> str:
        ratio = "unpruned" if self.strategy == "none" else f"@ {self.keep_ratio:g}"
        merged = f" ({self.merged} merged)" if self.merged else ""
        return f"{self.strategy} {ratio}: kept {len(self.kept)}/{self.num_visual}{merged}"


def token_layout(adapter, inputs, sample: int = 0) -> TokenLayout:
    try:
        return adapter.token_layout(inputs, sample)
    except NotImplementedError:
        raise VtpruneError(f"show: no token layout for model family '{adapter.family}'") from None


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
        panels.append(Panel(strategy, run.plan.keep_ratio, out.kept, out.num_visual, len(out.merged)))
    drawing, boxes = draw_panels(layout, panels)
    return drawing, panels, boxes
