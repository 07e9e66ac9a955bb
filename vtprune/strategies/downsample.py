"""downsample: the image at a lower resolution, as VTC-Bench's downsampling baseline (arXiv 2510.07143).

VTC-Bench finds that running the model on a downsampled image beats many pruning methods. A strategy that merges
in the *input* space (``merge_space="input"``):

- a family whose vision tower takes any resolution (Qwen2.5-VL) resizes the image itself to the largest merged
  grid within the budget, keeping its aspect ratio, and runs the whole model — vision tower included — on it
  (``Qwen2_5_VLAdapter.downsampled``); this selection function is not used there;
- towers of a fixed input size (CLIP in LLaVA-1.5 / LLaVA-NeXT crops) cannot take a smaller image, so the patch
  grid is pooled *before the projector*: ``pool``'s windows (each crop's grid in ``s × s`` windows, the smallest
  square stride that meets the budget), each averaged over the vision tower's output and then projected, so the
  LLM sees the projection of a coarser grid rather than the mean of projected patches (``pool``).

Deliberate differences: on fixed-resolution towers the tower still runs at full resolution (the vision FLOPs of
``none``); on Qwen2.5-VL the resize is bilinear (antialiased) in normalised pixel space, where the processor would
resize the PIL image (bicubic) before normalising.
"""

from vtprune.strategies.base import register_strategy
from vtprune.strategies.pool import keep_pool


@register_strategy("downsample", needs=("grid",), merge_space="input", merges=True, fills_budget=False)
def keep_downsample(signals, budgets):
    """Downsampling: the image resized (any-resolution towers) or its patch grid pooled before the projector."""
    return keep_pool(signals, budgets)
