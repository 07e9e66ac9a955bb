"""What a pipeline takes and gives per sample, on either engine: images read whole and strictly, and the answer
record (``GenerationResult``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from vtprune.errors import VtpruneError
from vtprune.models.base import SampleRecord


@dataclass
class GenerationResult(SampleRecord):
    """One sample's answer and what happened to its visual tokens (``kept``, ``num_visual``, ``kept_fraction``)."""

    text: str = ""
    input_tokens: int = 0  # prompt tokens as the processor built them, image tokens included, before pruning
    output_tokens: int = 0  # tokens generated, up to the end-of-sequence token
    kept_slots: int = 0  # the slots this sample's kept set took in its batch: the batch's largest kept set (padded)
    # the first generated token's top-k log-probabilities, most likely first: {"ids": [...], "logprobs": [...]}
    first_topk: dict | None = None


@contextlib.contextmanager
def strict_image_decoding():
    """PIL refuses truncated images inside: importing lmms-eval sets ``LOAD_TRUNCATED_IMAGES`` for the whole
    process, which pads half an image with grey and lets it pass. The caller's setting is restored on exit."""
    from PIL import ImageFile

    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def read_image(source):
    """An image file (or a lazily decoded PIL image) as RGB, decoded whole: a truncated JPEG opens fine and fails
    only when its pixels are read. A VtpruneError names the file."""
    from PIL import Image

    try:
        with strict_image_decoding():
            if isinstance(source, Image.Image):
                source.load()
                return source.convert("RGB")
            with Image.open(source) as image:
                return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        name = getattr(source, "filename", None) or source
        raise VtpruneError(f"{name} is not a readable image ({reason}; allowed: an image file PIL can read, "
                           "e.g. PNG or JPEG)") from None


def _as_images(images):
    try:
        return [read_image(i) if isinstance(i, (str, Path)) else i for i in images]
    except VtpruneError as exc:
        raise VtpruneError(f"image: {exc}") from None
