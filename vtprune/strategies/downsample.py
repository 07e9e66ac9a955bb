"""downsample: the image at a lower resolution, as VTC-Bench's downsampling baseline (arXiv 2510.07143).

VTC-Bench finds that running the model on a downsampled image beats many pruning methods. For vision towers of a
fixed input size (CLIP in LLaVA-1.5 / LLaVA-NeXT crops) downsampling means pooling the patch grid *before the
projector*: the selection is ``pool``'s (each crop's grid in ``s × s`` windows, the smallest square stride that meets
the budget), but each window is averaged over the vision tower's output and then projected, so the LLM sees the
projection of a coarser grid rather than the mean of projected patches (``pool``). On Qwen2.5-VL the vectors before
the projector are the patch merger's input (each merged token's 2×2 normed patch vectors), averaged then put through
the merger's MLP.

Deliberate difference: the vision tower still runs at full resolution (the same vision FLOPs as ``none``); a true
resize of the input image, which would also save vision compute on Qwen2.5-VL's dynamic resolution, is not done.
"""

from vtprune.strategies.base import register_strategy
from vtprune.strategies.pool import keep_pool


@register_strategy("downsample", needs=("grid",), merge_space="input")
def keep_downsample(signals, budgets):
    """Downsampling: average pooling of each crop's patch grid before the projector, the stride meeting the budget."""
    return keep_pool(signals, budgets)
