"""HiPrune: anchors by a middle vision layer's attention, their grid neighbours, registers by the deep layer's.

HiPrune (Liu, Du, Zhu, Lian, Li and Chen, arXiv 2025, "HiPrune: Training-Free Visual Token Pruning via Hierarchical
Attention in Vision-Language Models", arXiv 2508.00553; retitled in v3 "HiPrune: Hierarchical Attention for
Efficient Token Pruning in Vision-Language Models"). Rules read (not copied) from the authors' code,
github.com/Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py`` (``LlavaMetaForCausalLM.encode_images``)
with ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.feature_select``), the Qwen2.5-VL
version in ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (``Qwen2_5_VLForConditionalGeneration.forward``), defaults from
``README.md`` and ``bench_llava*.sh`` (alpha 0.1, object layer 9 of CLIP-L's 24; 16 of 32 on Qwen2.5-VL):

- global attention of a vision layer: the attention each patch receives, averaged over heads and over every
  query row (``vision_attention``);
- anchors: the top ``round(B · alpha / 5)`` tokens of a budget ``B`` by global attention at the object layer;
- buffers: each anchor's four neighbours (left, right, above, below);
- registers: the rest of the budget, the top tokens by global attention at the deep layer (the one whose output
  the projector reads: their ``mm_vision_select_layer``, layer 23 of 24 on LLaVA), anchors and buffers excluded.

Deliberate differences:

- object layer as a fraction of ``L``, the deep layer: ``clamp(round(object_layer · L), 1, L)``, since vtprune's
  test towers have 2–4 layers. The default 0.375 gives their layer 9 on LLaVA (``L`` = 23: 8.625 → 9); their
  Qwen2.5-VL setting, 16 of 32, is ``object_layer = 0.5``;
- buffers are true grid neighbours, same crop (``grid``: same group, ``|Δrow| + |Δcol| = 1``); they take flat
  index ±1 and ±width, clamped to the image, so an anchor at a row's end gets the next row's first token and one
  at the border gets itself. Tokens without a patch (newlines) are never anchors or buffers, may be registers;
- if anchors and buffers exceed the budget (only at large ``alpha`` or tiny budgets; their code then fails), the
  anchors come first in attention order, then the buffers anchor by anchor, each anchor's left, right, above,
  below, cut at ``B``;
- rounding half up (theirs is Python's ``round``, half to even: a budget of 25 gets 1 anchor here, 0 there);
- multi-crop models: one budget ``B`` (``ceil(keep_ratio · tokens)`` over the sample's packed, unpadded sequence,
  newlines included) and one ranking over all its crops; LLaVA-NeXT's code gives every crop ``int(B / crops)``
  with its own anchors and always keeps the row newlines, which here compete as registers with attention 0;
- ties → the lower index (stable sorts; theirs ``torch.topk``); each sample separately, padding never a candidate.
"""

import torch

from vtprune.strategies.base import Option, fraction_layer, half_up, register_strategy, topk_valid

#: a buffer's place next to its anchor, (Δrow, Δcolumn): their order of -1, +1, -width, +width
NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0))


def anchors_and_buffers(grid: torch.Tensor, patch: torch.Tensor, anchors: list[int]) -> list[int]:
    """``anchors`` then their grid neighbours among ``patch`` tokens, anchor by anchor, each token once."""
    where = {}
    for i, cell in zip(patch.nonzero().flatten().tolist(), grid[patch].tolist()):
        where.setdefault(tuple(cell), i)  # two tokens on one cell: the lower index stands for it
    chosen = dict.fromkeys(anchors)  # an ordered set
    for a in anchors:
        g, r, c = grid[a].tolist()
        for dr, dc in NEIGHBOURS:
            if (g, r + dr, c + dc) in where:
                chosen.setdefault(where[(g, r + dr, c + dc)])
    return list(chosen)


@register_strategy(
    "hiprune",
    needs=("vision_attention", "grid"),
    options={
        "alpha": Option(
            0.1, help="anchor and buffer share of the budget: round(alpha · budget / 5) anchors", bounds=(0.0, 1.0)
        ),
        "object_layer": Option(
            9 / 24,
            help="object (anchor) layer as a fraction of the vision layers up to the one the projector reads: "
            "layer clamp(round(object_layer · L), 1, L)",
            bounds=(0.0, 1.0),
        ),
    },
)
def keep_hiprune(signals, budgets, alpha=0.1, object_layer=9 / 24):
    """HiPrune: anchors by middle-layer attention, their grid neighbours, registers by deep-layer attention."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"hiprune: alpha must be between 0 and 1, got {alpha}")
    if not 0 <= object_layer <= 1:
        raise ValueError(f"hiprune: object_layer must be between 0 and 1, got {object_layer}")
    attention = signals.vision_attention.float()
    layers = attention.shape[1]
    middle = fraction_layer(object_layer, layers) - 1
    kept = []
    for b, k in enumerate(budgets.tolist()):
        valid, grid = signals.valid[b], signals.grid[b]
        k = min(k, int(valid.sum()))
        patch = valid & (grid[:, 0] >= 0)
        anchors = topk_valid(attention[b, middle], patch, half_up(k * alpha / 5)).tolist()
        chosen = anchors_and_buffers(grid, patch, anchors)[:k]
        free = valid.clone()
        free[chosen] = False
        registers = topk_valid(attention[b, layers - 1], free, k - len(chosen))
        kept.append(torch.cat([torch.tensor(chosen, dtype=torch.long, device=valid.device), registers]))
    return kept
