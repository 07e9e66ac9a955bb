"""FasterVLM: keep the visual tokens the vision encoder's CLS token attends to most.

FasterVLM ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818). Deliberate
difference on multi-crop models (LLaVA-NeXT): vtprune ranks every token of the packed sequence together — base
view, unpadded crops and row newlines (saliency 0, so they go last) — with one global budget, while the authors'
LLaVA-NeXT code takes the top-k of each crop separately in the spatial layout before unpadding. The global ranking
lets the budget move to the crops the CLS tokens find salient; the per-crop rule guarantees every crop a share
(``hired`` splits the budget between the views explicitly). On single-crop models the two are the same.
"""

from vtprune.strategies.base import register_strategy, topk_per_sample


@register_strategy("fastervlm", needs=("cls_attention",))
def keep_fastervlm(signals, budgets):
    """FasterVLM: top-k visual tokens by the vision encoder's CLS→patch attention, before the LLM."""
    return topk_per_sample(signals.cls_attention, signals.valid, budgets)
