from vtprune.strategies.base import register_strategy, topk_per_sample


@register_strategy("cls_saliency", needs=("cls_attention",))
def keep_cls_saliency(signals, budgets):
    """Top-k of the vision encoder's CLS→patch attention (per tile, head mean): Trimmed Llama's baseline."""
    return topk_per_sample(signals.cls_attention, signals.valid, budgets)
