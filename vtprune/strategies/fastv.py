"""FastV: keep the visual tokens the last prompt token attends to most at one LLM layer."""

from vtprune.strategies.base import Option, register_strategy, topk_per_sample


@register_strategy(
    "fastv",
    needs=("last_token_attention",),
    options={"layer": Option(2, help="prune after this LLM layer")},
    stage="in_llm",
)
def keep_fastv(signals, budgets, layer=2):
    """FastV: top-k visual tokens by the last prompt token's attention at layer K, averaged over heads.

    ``last_token_attention`` [B, H, N] is that attention at layer ``layer``; the adapter reads ``layer`` to know where
    to compute it and where to cut, so the selection itself does not use it. Layers after K see only the
    kept tokens (and so does their KV cache).
    """
    return topk_per_sample(signals.last_token_attention.float().mean(dim=1), signals.valid, budgets)
