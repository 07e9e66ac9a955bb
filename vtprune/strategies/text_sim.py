"""text_sim: AdaV's text-to-image relevance alone."""

from vtprune.strategies.adav import text_relevance
from vtprune.strategies.base import register_strategy, topk_per_sample


@register_strategy("text_sim", needs=("text_embeds", "features"))
def keep_text_sim(signals, budgets):
    """Top-k visual tokens by AdaV's text relevance max_t softmax_v(100 · cos(text_t, image_v))."""
    return topk_per_sample(text_relevance(signals), signals.valid, budgets)
