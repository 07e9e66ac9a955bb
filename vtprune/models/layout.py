"""Where a family's visual tokens sit on the image the model saw: the family question behind ``vtprune show``.

A *token layout* maps each visual-token index (the index space of ``GenerationResult.kept``) to a patch box on
the processor's view of the image (resized / padded / cropped, de-normalised back to pixels), or to None for
tokens without a patch (Mllama's per-tile CLS, LLaVA-NeXT's row newlines). Each family builds its own
(``Adapter.token_layout``) from these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the layout image's pixels, x1/y1 exclusive
GAP = 8  # pixels between assembled crops (and between drawn panels)


@dataclass
class TokenLayout:
    image: Image.Image  # the processor's view, crops / tiles assembled
    boxes: list[Box | None]  # one per visual token, in the model's own token order


def to_image(pixels, image_processor) -> Image.Image:
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


def grid_boxes(x0: int, y0: int, rows: int, cols: int, patch: int) -> list[Box]:
    return [(x0 + c * patch, y0 + r * patch, x0 + (c + 1) * patch, y0 + (r + 1) * patch)
            for r in range(rows) for c in range(cols)]
