"""FasterVLM: keep the visual tokens the vision encoder's CLS token attends to most."""

from vtprune.strategies.base import register_strategy, topk_per_sample


@register_strategy("fastervlm", needs=("cls_attention",))
def keep_fastervlm(signals, budgets):
    """FasterVLM: top-k visual tokens by the vision encoder's CLS→patch attention, before the LLM."""
    return topk_per_sample(signals.cls_attention, signals.valid, budgets)
